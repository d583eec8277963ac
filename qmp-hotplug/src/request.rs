//! What the engine is asked to plug: a device (all functions of a slot or an IOMMU group,
//! with the objects and descriptors they need) and what the guest should see afterwards.
//!
//! A [`PlugRequest`] holds typed values: each function's `device_add` is a
//! [`QemuDevice`] (its id a [`QemuId`], its address a [`DevFn`]),
//! the host function it passes through a [`HostRef`] (a [`Bdf`] or a sysfs path), objects
//! are [`QemuObject`]s. They become JSON only where the engine talks QMP and in the
//! journal. [`PlugRequest::from_action`] takes them from a `pcie-topology` plan's
//! [`HotplugAction`] as they are; [`PlugRequest::new`] and [`PlugFunction::new`] build a
//! request for any other planner; [`PlugFunction::from_qmp`] reads `device_add` arguments
//! (what the serde form holds, see below).
//!
//! # Serde form
//!
//! A request reads and writes as JSON whose functions are `device_add` argument objects:
//!
//! ```json
//! {"port": "rp0", "device": "gpu0",
//!  "objects": [{"qom_type": "iommufd", "id": "iommufd0"}],
//!  "fds": [{"fdname": "iommu", "path": "/dev/iommu", "writable": true}],
//!  "functions": [{"qdev": {"driver": "vfio-pci", "id": "gpu0", "bus": "rp0", "addr": "0.0",
//!                          "host": "0000:41:00.0", "iommufd": "iommufd0"},
//!                 "expect": {"kind": "pci", "bus": 1, "slot": 0, "function": 0}}]}
//! ```
//!
//! `device` may be left out (requests written before it existed): it is then the function
//! whose id is the port (s390x), else the function at function 0, else the first.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pcie_topology::plan::{ExpectedBar, GuestLocation, HotplugAction};
use pcie_topology::qemu::PropValue;
use pcie_topology::{DevFn, HostRef, QemuDevice, QemuId, QemuObject};
use pcilibs::bdf::{Bdf, BdfError};
use pcilibs::requirement::Resource;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Errors in a request, found before anything is sent to QEMU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlugRequestError {
    /// The request has no device.
    #[error("the request for port {0} has no device")]
    NoFunctions(String),
    /// `device_add` arguments lack a string member.
    #[error("device_add arguments lack a string `{member}`")]
    MissingMember {
        /// The member, `driver` or `id`.
        member: &'static str,
    },
    /// An id is not a valid QEMU id (`[A-Za-z][A-Za-z0-9._-]*`).
    #[error("{0:?} is not a valid QEMU id")]
    BadId(String),
    /// An id appears twice in the request.
    #[error("id {0:?} appears twice")]
    DuplicateId(String),
    /// The request's device id is none of its functions' ids.
    #[error("the request's device {device} is none of its functions")]
    UnknownDevice {
        /// The device id.
        device: String,
    },
    /// An `addr` value could not be read as `slot[.function]`.
    #[error("device {id}: cannot read addr {addr}")]
    BadAddr {
        /// The device id.
        id: String,
        /// The value as given.
        addr: String,
    },
    /// A property value is not a boolean, an integer or a string (the values `device_add`
    /// properties take).
    #[error("device {id}: property {name} is {value}, not a boolean, an integer or a string")]
    BadProperty {
        /// The device id.
        id: String,
        /// The property.
        name: String,
        /// The value as given (cut to 64 bytes).
        value: String,
    },
    /// A VFIO device's `host=` is not a PCI address.
    #[error("device {id}: host= is not a PCI address: {source}")]
    BadHost {
        /// The device id.
        id: String,
        /// Why.
        source: BdfError,
    },
    /// A VFIO device names its host function in its properties instead of
    /// [`PlugFunction::host`], where the engine's checks would not see it.
    #[error("device {id}: the host function goes in PlugFunction::host, not in the `{name}` property")]
    UntypedHost {
        /// The device id.
        id: String,
        /// `host` or `sysfsdev`.
        name: String,
    },
    /// A property names what the device or object has a field for (`driver`, `id`, `bus`,
    /// `addr`, `multifunction` other than `off`; an object's `qom-type` or `id`): its
    /// arguments would say it twice.
    #[error("{id}: property {name} is a field of its own, not a property")]
    ShadowedProperty {
        /// The device or object id.
        id: String,
        /// The property.
        name: String,
    },
    /// Two functions share a bus, slot and function number.
    #[error("devices {0} and {1} have the same PCI address")]
    SameAddress(String, String),
    /// A multi-function slot has no function 0 (the guest would never see it).
    #[error("multi-function slot of {0} has no function 0")]
    NoFunctionZero(String),
    /// A function of a multi-function slot says `multifunction=off`.
    #[error("device {0} is part of a multi-function slot but sets multifunction=off")]
    MultifunctionOff(String),
    /// The request, as JSON, is larger than [`MAX_REQUEST_BYTES`].
    #[error("the request is {bytes} bytes as JSON, more than {MAX_REQUEST_BYTES}")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PlugRequestError>;

/// Largest request, as JSON (every journal record carrying it must stay below
/// [`crate::journal::MAX_RECORD_BYTES`]).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// One device to hotplug onto one port: every function (or every member of an IOMMU
/// group), the QOM objects and descriptors they need, and the checks to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RequestWire")]
#[non_exhaustive]
pub struct PlugRequest {
    /// The port the device goes on: the engine's unit of serialization and bookkeeping
    /// (the root or downstream port's QEMU id; on s390x, which has no ports, the device
    /// id).
    pub port: QemuId,
    /// The device's id: what [`crate::Engine::unplug`] takes (a plan's device id, the id
    /// of its function 0; on s390x the device itself). One of the functions' ids.
    pub device: QemuId,
    /// QOM objects created before the devices and deleted after them
    /// (`iommufd`, `memory-backend-*`, ...).
    #[serde(default)]
    pub objects: Vec<QemuObject>,
    /// Descriptors handed to QEMU with `getfd` before the devices: files the engine opens,
    /// or descriptors the caller holds ([`FdRequest`]).
    #[serde(default)]
    pub fds: Vec<FdRequest>,
    /// The devices, in the order given; the engine moves the function 0 of a
    /// multi-function slot last.
    pub functions: Vec<PlugFunction>,
    /// A boot-time placeholder to take off the port before anything is added (a planner
    /// plugs one behind a switch downstream port so that firmware sizes the port's
    /// windows; see [`PlaceholderRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<PlaceholderRequest>,
}

/// A [`PlugRequest`] as JSON has it, before the device id is filled in.
#[derive(Deserialize)]
struct RequestWire {
    port: QemuId,
    #[serde(default)]
    device: Option<QemuId>,
    #[serde(default)]
    objects: Vec<QemuObject>,
    #[serde(default)]
    fds: Vec<FdRequest>,
    functions: Vec<PlugFunction>,
    #[serde(default)]
    placeholder: Option<PlaceholderRequest>,
}

impl TryFrom<RequestWire> for PlugRequest {
    type Error = PlugRequestError;
    fn try_from(w: RequestWire) -> Result<Self> {
        let device = match w.device {
            Some(d) => d,
            None => default_device(&w.port, &w.functions)
                .ok_or_else(|| PlugRequestError::NoFunctions(w.port.to_string()))?,
        };
        Ok(PlugRequest {
            port: w.port,
            device,
            objects: w.objects,
            fds: w.fds,
            functions: w.functions,
            placeholder: w.placeholder,
        })
    }
}

/// The device id of a request that does not say: the function named like the port
/// (s390x, where the port is the device), else the one at function 0, else the first.
fn default_device(port: &QemuId, functions: &[PlugFunction]) -> Option<QemuId> {
    let named = functions.iter().find(|f| f.id() == port);
    let zero = || functions.iter().find(|f| f.device.addr.is_some_and(|a| a.function() == 0));
    named.or_else(zero).or_else(|| functions.first()).map(|f| f.id().clone())
}

/// A device plugged at boot that holds a port's windows open until the real device
/// comes: the engine `device_del`s it, waits for `DEVICE_DELETED` (up to
/// [`crate::EngineOptions::placeholder_timeout`]; the removal needs a guest OS that
/// answers the slot), then `object-del`s its backends, all journaled, before the first
/// `object-add` or `device_add` of the request. While the guest has not released it the
/// port stays taken (`unplug-pending`), and a late `DEVICE_DELETED` frees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlaceholderRequest {
    /// `device_del` these, in order. For a multi-function placeholder list function 0
    /// only: QEMU then removes the whole slot.
    pub devices: Vec<QemuId>,
    /// Then `object-del` these (the placeholder's memory backends).
    #[serde(default)]
    pub objects: Vec<QemuId>,
}

impl PlaceholderRequest {
    /// Remove `devices`, then delete `objects`.
    pub fn new(devices: Vec<QemuId>, objects: Vec<QemuId>) -> Self {
        PlaceholderRequest { devices, objects }
    }
}

/// A descriptor passed to QEMU under a name (`getfd`), e.g. `/dev/iommu` for an
/// `iommufd` object's `fd` property or a VFIO cdev for `vfio-pci`'s `fd`.
///
/// Either a file the engine opens ([`FdRequest::open`]: regular files, character and
/// block devices are passed; a FIFO, socket or directory is refused with
/// `EngineError::SpecialFile` before the plug takes the port or journals anything), or a
/// descriptor the caller already holds ([`FdRequest::held`]), which the engine passes and
/// then closes.
///
/// The journal records a held descriptor by its name only: a descriptor cannot outlive
/// the process that held it. If that process dies while a plug is under way and a device
/// still has to be added, recovery cannot pass it again and rolls the plug back
/// (`EngineError::DescriptorGone`); once every device was added, QEMU holds its own copy
/// and recovery finishes the plug as usual. A path is opened again by recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FdWire", into = "FdWire")]
#[non_exhaustive]
pub struct FdRequest {
    /// The name QEMU knows the descriptor by.
    pub fdname: String,
    source: FdSource,
}

/// Where a passed descriptor comes from.
#[derive(Clone)]
enum FdSource {
    /// A file the engine opens.
    Path { path: PathBuf, writable: bool },
    /// A descriptor the caller held; `None` once the engine took it or when read back
    /// from the journal.
    Held(Option<Arc<OwnedFd>>),
}

impl PartialEq for FdSource {
    /// Held descriptors compare by their name alone (the request's `fdname`): a request
    /// read back from the journal equals the one written.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (FdSource::Path { path: a, writable: wa }, FdSource::Path { path: b, writable: wb }) => {
                a == b && wa == wb
            }
            (FdSource::Held(_), FdSource::Held(_)) => true,
            _ => false,
        }
    }
}

impl Eq for FdSource {}

impl fmt::Debug for FdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdSource::Path { path, writable } => {
                f.debug_struct("Path").field("path", path).field("writable", writable).finish()
            }
            FdSource::Held(fd) => f.debug_tuple("Held").field(&fd.as_ref().map(|fd| &**fd)).finish(),
        }
    }
}

/// An [`FdRequest`] as JSON has it: a path, or `"held": true`.
#[derive(Serialize, Deserialize)]
struct FdWire {
    fdname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    writable: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    held: bool,
}

impl TryFrom<FdWire> for FdRequest {
    type Error = String;
    fn try_from(w: FdWire) -> std::result::Result<Self, String> {
        let source = match (w.path, w.held) {
            (Some(path), false) => FdSource::Path { path, writable: w.writable },
            (None, true) => FdSource::Held(None),
            (Some(_), true) => return Err(format!("descriptor {}: a path or held, not both", w.fdname)),
            (None, false) => return Err(format!("descriptor {}: no path and not held", w.fdname)),
        };
        Ok(FdRequest { fdname: w.fdname, source })
    }
}

impl From<FdRequest> for FdWire {
    fn from(r: FdRequest) -> FdWire {
        match r.source {
            FdSource::Path { path, writable } => {
                FdWire { fdname: r.fdname, path: Some(path), writable, held: false }
            }
            FdSource::Held(_) => FdWire { fdname: r.fdname, path: None, writable: false, held: true },
        }
    }
}

impl FdRequest {
    /// The engine opens `path` (read-write when `writable`, else read-only) and passes it
    /// under `fdname`.
    pub fn open(fdname: impl Into<String>, path: impl Into<PathBuf>, writable: bool) -> Self {
        FdRequest { fdname: fdname.into(), source: FdSource::Path { path: path.into(), writable } }
    }

    /// The engine passes `fd`, which the caller opened, under `fdname`, and closes it
    /// after the plug.
    pub fn held(fdname: impl Into<String>, fd: OwnedFd) -> Self {
        FdRequest { fdname: fdname.into(), source: FdSource::Held(Some(Arc::new(fd))) }
    }

    /// The file the engine opens, `None` for a held descriptor.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            FdSource::Path { path, .. } => Some(path),
            FdSource::Held(_) => None,
        }
    }

    /// Whether the engine opens the file read-write.
    pub fn writable(&self) -> bool {
        matches!(self.source, FdSource::Path { writable: true, .. })
    }

    /// Takes a held descriptor out of the request (`None` for a path, or when it was taken
    /// already or read back from the journal).
    pub(crate) fn take_held(&mut self) -> Option<Arc<OwnedFd>> {
        match &mut self.source {
            FdSource::Held(fd) => fd.take(),
            FdSource::Path { .. } => None,
        }
    }
}

/// One `device_add` and what must be true after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FunctionWire", into = "FunctionWire")]
#[non_exhaustive]
pub struct PlugFunction {
    /// The device: driver, id, bus, address, `multifunction` and further properties.
    /// The host function it passes through is [`PlugFunction::host`], not a property.
    pub device: QemuDevice,
    /// The host function a VFIO device passes through (`host=` or `sysfsdev=` in its
    /// `device_add`); the engine checks it before the plug (it exists, its IOMMU group is
    /// viable).
    pub host: Option<HostRef>,
    /// What proves the device arrived.
    pub expect: Expectation,
    /// The BARs (and ROM) the guest must place in the port's windows when the function
    /// arrives, for [`crate::EngineOptions::check_live_windows`]; empty: not checked.
    pub needs: Vec<Resource>,
}

/// A [`PlugFunction`] as JSON has it: its `device_add` arguments.
#[derive(Serialize, Deserialize)]
struct FunctionWire {
    qdev: Map<String, Value>,
    #[serde(default)]
    expect: Expectation,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    needs: Vec<Resource>,
}

impl TryFrom<FunctionWire> for PlugFunction {
    type Error = PlugRequestError;
    fn try_from(w: FunctionWire) -> Result<Self> {
        Ok(PlugFunction::from_qmp(&w.qdev)?.with_expect(w.expect).with_needs(w.needs))
    }
}

impl From<PlugFunction> for FunctionWire {
    fn from(f: PlugFunction) -> FunctionWire {
        FunctionWire { qdev: f.qmp_arguments(), expect: f.expect, needs: f.needs }
    }
}

/// The `device_add` property a host function is passed as, and its value.
fn host_property(host: &HostRef) -> Option<(&'static str, String)> {
    match host {
        HostRef::Pci(bdf) => Some(("host", bdf.to_string())),
        HostRef::Sysfsdev(path) => Some(("sysfsdev", path.clone())),
        _ => None,
    }
}

/// True for the drivers whose `host=`/`sysfsdev=` name a host device to pass through.
fn is_vfio(driver: &str) -> bool {
    driver.starts_with("vfio")
}

impl PlugFunction {
    /// A function that adds `device`, expected present in QEMU ([`Expectation::Present`]),
    /// with no host function and no needs.
    pub fn new(device: QemuDevice) -> Self {
        PlugFunction { device, host: None, expect: Expectation::Present, needs: Vec::new() }
    }

    /// Passes `host` through (`host=` for a PCI function, `sysfsdev=` for a path).
    pub fn with_host(mut self, host: HostRef) -> Self {
        self.host = Some(host);
        self
    }

    /// What proves the device arrived.
    pub fn with_expect(mut self, expect: Expectation) -> Self {
        self.expect = expect;
        self
    }

    /// The BARs the guest must place in the port's windows.
    pub fn with_needs(mut self, needs: Vec<Resource>) -> Self {
        self.needs = needs;
        self
    }

    /// Reads `device_add` arguments (`driver`, `id`, `bus`, `addr`, `multifunction` and
    /// properties), the form other tools and the request's JSON have. A VFIO device's
    /// `host=` (`0000:01:00.0`, or `01:00.0` in domain 0 as QEMU accepts it) becomes a
    /// [`HostRef::Pci`], its `sysfsdev=` a [`HostRef::Sysfsdev`]; `multifunction=off` stays
    /// a property, so that the engine can refuse it in a multi-function slot.
    pub fn from_qmp(args: &Map<String, Value>) -> Result<Self> {
        let text = |member: &'static str| {
            args.get(member).and_then(Value::as_str).ok_or(PlugRequestError::MissingMember { member })
        };
        let driver = text("driver")?;
        let id_text = text("id")?;
        let id = QemuId::new(id_text).map_err(|_| PlugRequestError::BadId(id_text.to_owned()))?;
        let bad = |name: &str, v: &Value| PlugRequestError::BadProperty {
            id: id_text.to_owned(),
            name: name.to_owned(),
            value: cut(&v.to_string()),
        };
        let mut device = QemuDevice::new(driver, id);
        let mut host = None;
        for (name, v) in args {
            match name.as_str() {
                "driver" | "id" => {}
                "bus" => device.bus = Some(v.as_str().ok_or_else(|| bad(name, v))?.to_owned()),
                "addr" => {
                    let addr = parse_addr(v).ok_or_else(|| PlugRequestError::BadAddr {
                        id: id_text.to_owned(),
                        addr: cut(&v.to_string()),
                    })?;
                    device.addr = Some(addr);
                }
                "multifunction" => match switch(v).ok_or_else(|| bad(name, v))? {
                    true => device.multifunction = true,
                    false => {
                        device.props.insert(name.clone(), PropValue::Bool(false));
                    }
                },
                "host" if is_vfio(driver) => {
                    let text = v.as_str().ok_or_else(|| bad(name, v))?;
                    let bdf = Bdf::parse_any(text)
                        .map_err(|source| PlugRequestError::BadHost { id: id_text.to_owned(), source })?;
                    host = Some(HostRef::Pci(bdf));
                }
                "sysfsdev" if is_vfio(driver) => {
                    host = Some(HostRef::Sysfsdev(v.as_str().ok_or_else(|| bad(name, v))?.to_owned()));
                }
                _ => {
                    device.props.insert(name.clone(), prop_value(v).ok_or_else(|| bad(name, v))?);
                }
            }
        }
        Ok(PlugFunction { device, host, expect: Expectation::Present, needs: Vec::new() })
    }

    /// The device's QEMU id.
    pub fn id(&self) -> &QemuId {
        &self.device.id
    }

    /// The `device_add` arguments: the device's ([`QemuDevice::to_qmp`]) and the host
    /// function's `host=` or `sysfsdev=`.
    pub fn qmp_arguments(&self) -> Map<String, Value> {
        let mut m = self.device.to_qmp();
        if let Some((name, value)) = self.host.as_ref().and_then(host_property) {
            m.insert(name.into(), Value::String(value));
        }
        m
    }

    /// Whether the device says `multifunction=off` as a property.
    fn multifunction_off(&self) -> bool {
        matches!(self.device.props.get("multifunction"), Some(PropValue::Bool(false)))
    }

    /// A VFIO device whose properties name its host function, where the checks miss it.
    fn untyped_host(&self) -> Option<&str> {
        let named = ["host", "sysfsdev"].into_iter().find(|p| self.device.props.contains_key(*p));
        named.filter(|_| is_vfio(&self.device.driver))
    }
}

/// A non-negative [`PropValue::Signed`] as the [`PropValue::Int`] JSON reads it as.
fn one_form(v: &mut PropValue) {
    if let PropValue::Signed(n) = *v {
        if let Ok(n) = u64::try_from(n) {
            *v = PropValue::Int(n);
        }
    }
}

/// `on`/`off` as QEMU reads a boolean property: a JSON boolean, or its words.
fn switch(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "on" | "true" | "yes" => Some(true),
            "off" | "false" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A JSON property value as a [`PropValue`]; `None` for what `device_add` properties do
/// not take (fractions, lists, objects, null).
fn prop_value(v: &Value) -> Option<PropValue> {
    match v {
        Value::Bool(b) => Some(PropValue::Bool(*b)),
        Value::String(s) => Some(PropValue::Str(s.clone())),
        Value::Number(n) => n.as_u64().map(PropValue::Int).or_else(|| n.as_i64().map(PropValue::Signed)),
        _ => None,
    }
}

/// `s` cut to 64 bytes at a character boundary, for error messages.
fn cut(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default().to_owned()
}

/// What must be true once a device is plugged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Expectation {
    /// The device exists in QEMU (`qom-list /machine/peripheral`); for devices that are
    /// not on a PCI bus QEMU reports: CCW devices, `vfio-ap`, the `zpci` device (its PCI
    /// function is [`Expectation::Pci`] at any address).
    #[default]
    Present,
    /// The device is in `query-pci` under its id, where and as large as planned.
    Pci(PciExpectation),
}

/// Where a PCI function must appear in `query-pci`, and with which BAR sizes.
///
/// Its place is either an address (bus, slot, function: the bus as the firmware numbered
/// it) or, for a guest that numbers buses itself (Linux `pci=assign-busses`), a place in
/// the tree: directly below the bridge [`PciExpectation::parent`] at slot and function,
/// whatever number the guest gave that bridge's bus. [`crate::pci::check`] says which of
/// the two it used ([`VisibilityCheck`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PciExpectation {
    /// Guest bus number (as firmware numbered it); unchecked when `None` or when
    /// [`PciExpectation::parent`] is set.
    #[serde(default)]
    pub bus: Option<u8>,
    /// Slot (device) number.
    #[serde(default)]
    pub slot: Option<u8>,
    /// Function number.
    #[serde(default)]
    pub function: Option<u8>,
    /// BARs whose size must match exactly, each a different BAR of the function.
    #[serde(default)]
    pub bars: Vec<BarExpectation>,
    /// The QEMU id of the bridge (root port, switch downstream port, PCI bridge) whose
    /// secondary bus the function must be on; when set, the bus number is not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<QemuId>,
    /// Vendor and device ids the function must show; unchecked when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<PciIds>,
}

/// A PCI function's vendor and device ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PciIds {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
}

impl PciIds {
    /// Vendor `vendor`, device `device`.
    pub fn new(vendor: u16, device: u16) -> Self {
        PciIds { vendor, device }
    }
}

impl std::fmt::Display for PciIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// How the engine found a plugged function where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum VisibilityCheck {
    /// In `query-pci` at its planned bus, slot and function, BARs as planned.
    Address,
    /// In `query-pci` directly below its planned bridge at its slot and function, BARs as
    /// planned, whatever the bus's number (the guest renumbers buses).
    TreePlace,
    /// In `query-pci` with its BARs as planned, wherever it is.
    BarsOnly,
    /// Present in QEMU (`/machine/peripheral`); not a PCI function QEMU reports.
    Present,
}

impl std::fmt::Display for VisibilityCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VisibilityCheck::Address => "by address (bus, slot, function)",
            VisibilityCheck::TreePlace => "by place in the tree (bridge, slot, function)",
            VisibilityCheck::BarsOnly => "by BAR sizes only",
            VisibilityCheck::Present => "present in QEMU",
        })
    }
}

impl PciExpectation {
    /// The function at `bdf`'s bus, slot and function (its domain is not checked:
    /// `query-pci` has none), with `bars`.
    pub fn at(bdf: Bdf, bars: Vec<BarExpectation>) -> Self {
        PciExpectation {
            bus: Some(bdf.bus()),
            slot: Some(bdf.device()),
            function: Some(bdf.function()),
            bars,
            parent: None,
            ids: None,
        }
    }

    /// Directly below bridge `parent` at `addr` (its slot and function), with `bars`,
    /// whatever number the guest gives the bridge's bus.
    pub fn below(parent: QemuId, addr: DevFn, bars: Vec<BarExpectation>) -> Self {
        PciExpectation {
            bus: None,
            slot: Some(addr.slot()),
            function: Some(addr.function()),
            bars,
            parent: Some(parent),
            ids: None,
        }
    }

    /// Anywhere, with `bars` (check the BARs only).
    pub fn anywhere(bars: Vec<BarExpectation>) -> Self {
        PciExpectation { bus: None, slot: None, function: None, bars, parent: None, ids: None }
    }

    /// This expectation with the function's vendor and device ids checked too.
    pub fn with_ids(mut self, ids: PciIds) -> Self {
        self.ids = Some(ids);
        self
    }
}

/// One BAR's expected size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BarExpectation {
    /// BAR index as `query-pci` numbers it (0–5, [`BarExpectation::ROM`] for the ROM).
    /// `None`: any of BARs 0–5 of this size that no other expectation of the function
    /// holds (for a caller that knows a BAR's size but not its index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bar: Option<u8>,
    /// Size in bytes.
    pub size: u64,
}

impl BarExpectation {
    /// The index `query-pci` gives the expansion ROM.
    pub const ROM: u8 = 6;

    /// The BAR at `bar` must have `size` bytes.
    pub fn at(bar: u8, size: u64) -> BarExpectation {
        BarExpectation { bar: Some(bar), size }
    }

    /// Some BAR (0–5) must have `size` bytes.
    pub fn any(size: u64) -> BarExpectation {
        BarExpectation { bar: None, size }
    }

    /// What `query-pci` must show for one of a plan's entries: the size the function shows
    /// ([`ExpectedBar::visible_size`]: a resizable BAR's current size, not the maximum the
    /// plan made room for) at the entry's index (the ROM at [`BarExpectation::ROM`]; any
    /// BAR of that size when the plan does not know the index, as in version 1 plans).
    /// `None` for an entry `query-pci` never shows: an SR-IOV VF BAR aperture.
    pub fn planned(b: &ExpectedBar) -> Option<BarExpectation> {
        let size = b.visible_size()?;
        Some(match (b.index, b.rom) {
            (Some(index), _) => BarExpectation::at(index, size),
            (None, true) => BarExpectation::at(BarExpectation::ROM, size),
            (None, false) => BarExpectation::any(size),
        })
    }
}

impl Expectation {
    /// What proves a function planned at `location` with `bars` arrived: a PCI function
    /// in `query-pci` at its planned bus, slot and function, with each BAR `query-pci`
    /// will show at its index and size ([`BarExpectation::planned`]); a zPCI function the
    /// same at any address ([`PciExpectation::anywhere`]: its planned BDF is the guest's
    /// view, not QEMU's, and `query-pci` lists it on s390x's own PCI bus); anything else
    /// (ccw, vfio-ap) present in QEMU.
    ///
    /// This is what QEMU shows. Whether the guest lists the function is the caller's to
    /// check in the guest: QEMU holds a hotplugged function whether or not the guest's
    /// kernel ever picks it up.
    pub fn planned(location: &GuestLocation, bars: &[ExpectedBar]) -> Expectation {
        let bars = || bars.iter().filter_map(BarExpectation::planned).collect();
        match location {
            GuestLocation::Pci { bdf, .. } => Expectation::Pci(PciExpectation::at(*bdf, bars())),
            GuestLocation::Zpci { .. } => Expectation::Pci(PciExpectation::anywhere(bars())),
            _ => Expectation::Present,
        }
    }

    /// [`Expectation::planned`] for a guest that numbers buses itself (the plan's
    /// [`HotplugAction::guest_renumbers_buses`]): a function behind a bridge (its path has
    /// more than one hop, its `device_add` names the bridge as its bus) is expected below
    /// that bridge at its slot and function, not at a bus number; a function on a root
    /// bus keeps its address (nothing renumbers a root bus).
    pub fn planned_in_tree(
        device: &QemuDevice,
        location: &GuestLocation,
        bars: &[ExpectedBar],
    ) -> Expectation {
        let behind_bridge = location.path().is_some_and(|p| p.hops.len() > 1);
        let parent = device.bus.as_deref().filter(|_| behind_bridge).and_then(|b| QemuId::new(b).ok());
        match (location, parent) {
            (GuestLocation::Pci { bdf, .. }, Some(parent)) => Expectation::Pci(PciExpectation::below(
                parent,
                DevFn::from(*bdf),
                bars.iter().filter_map(BarExpectation::planned).collect(),
            )),
            _ => Expectation::planned(location, bars),
        }
    }
}

/// A validated request with the order in which its devices are added.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prepared {
    /// Indices into `functions`, in plug order.
    pub(crate) order: Vec<usize>,
    /// For each function (by index): `Some((slot key, function))` when it is a PCI function.
    pub(crate) pci: Vec<Option<(SlotKey, u8)>>,
}

/// A PCI slot of a request: the bus its functions name and the slot number.
pub(crate) type SlotKey = (Option<String>, u8);

/// Reads a PCI `addr` value (`"1f.7"`, `"0x3.0x1"`, `"4"` or an integer devfn).
fn parse_addr(v: &Value) -> Option<DevFn> {
    match v {
        Value::Number(n) => {
            let devfn = u8::try_from(n.as_u64()?).ok()?;
            DevFn::new(devfn >> 3, devfn & 7).ok()
        }
        Value::String(s) => {
            let hex = |p: &str| {
                let p = p.trim();
                let p = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")).unwrap_or(p);
                u8::from_str_radix(p, 16).ok()
            };
            let (slot, func) = match s.split_once('.') {
                Some((a, b)) => (hex(a)?, hex(b)?),
                None => (hex(s)?, 0),
            };
            DevFn::new(slot, func).ok()
        }
        _ => None,
    }
}

/// What the guest places in the port's windows when the function arrives: each BAR at the
/// size the guest shows, not the SR-IOV VF apertures (VFs come later, in the guest).
fn visible_needs(bars: &[ExpectedBar]) -> Vec<Resource> {
    bars.iter()
        .filter_map(|b| {
            let size = b.visible_size()?;
            Some(Resource { kind: b.kind, prefetchable: b.prefetchable, rom: b.rom, size, align: size })
        })
        .collect()
}

/// `device` without the properties that name its host function (they come from the
/// typed [`HostRef`] when the arguments are made).
fn without_host_props(mut device: QemuDevice) -> QemuDevice {
    device.props.remove("host");
    device.props.remove("sysfsdev");
    device
}

impl PlugRequest {
    /// A request to plug `functions` onto `port` as the device `device` (one of the
    /// functions' ids: what [`crate::Engine::unplug`] takes), with no objects,
    /// descriptors or placeholder: for a runtime that places devices itself.
    ///
    /// ```
    /// use pcie_topology::{HostRef, QemuDevice, QemuId};
    /// use pcilibs::bdf::Bdf;
    /// use qmp_hotplug::{PlugFunction, PlugRequest};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let id = QemuId::new("gpu0")?;
    /// let mut gpu = QemuDevice::new("vfio-pci", id.clone());
    /// gpu.bus = Some("rp3".into());
    /// let gpu = PlugFunction::new(gpu).with_host(HostRef::Pci(Bdf::parse("0000:41:00.0")?));
    /// let request = PlugRequest::new(QemuId::new("rp3")?, id, vec![gpu])
    ///     .with_iommufd(QemuId::new("iommufd0")?, None);
    /// let args = request.functions[0].qmp_arguments();
    /// assert_eq!((args["host"].as_str(), args["iommufd"].as_str()), (Some("0000:41:00.0"), Some("iommufd0")));
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(port: QemuId, device: QemuId, functions: Vec<PlugFunction>) -> Self {
        PlugRequest { port, device, objects: Vec::new(), fds: Vec::new(), functions, placeholder: None }
    }

    /// The request for one hotplug action of a `pcie-topology` plan
    /// ([`pcie_topology::Plan::hotplug_actions`], or an action for a device placed later).
    ///
    /// - `port`: the action's port; on s390x, which has no ports, the device id
    ///   ([`HotplugAction::port_or_device`]). `device`: the action's device.
    /// - `objects`: the action's `object_add`.
    /// - `functions`: for each of the action's functions in its order (function 0 last;
    ///   the engine keeps function 0 of a multi-function slot last in any case), first its
    ///   companions (the s390x `zpci` device) expected [`Expectation::Present`], then its
    ///   `device_add` expected as [`Expectation::planned`] says: a PCI function at its
    ///   planned bus, slot and function with each BAR pinned to the plan's index at the
    ///   size `query-pci` shows (the ROM as BAR 6; SR-IOV VF apertures not expected; a
    ///   resizable BAR at its current size); a zPCI function the same at any address
    ///   (QEMU's bus and slot are not the guest's); ccw and vfio-ap functions present. Its
    ///   host function is the action's typed one.
    /// - `placeholder`: the action's `remove_placeholder`.
    /// - each function's `needs`: its BARs as the guest will show them, for the engine's
    ///   optional live-window check.
    ///
    /// The action's devices, objects and ids are typed values checked when they were made;
    /// they are taken as they are. An `iommufd` object and each function's `iommufd`
    /// property come with the action ([`HotplugAction::with_iommufd`]) or with
    /// [`PlugRequest::with_iommufd`]; descriptors are the caller's to add
    /// ([`PlugRequest::with_fd`], [`PlugRequest::with_fd_path`]). A BAR the plan has no
    /// index for (a request built from bare sizes, a version 1 plan) is expected by size on
    /// any BAR 0–5 ([`BarExpectation::any`]).
    pub fn from_action(action: &HotplugAction) -> PlugRequest {
        let mut functions = Vec::new();
        for f in &action.functions {
            functions.extend(f.companions.iter().map(|c| PlugFunction::new(c.clone())));
            let device = if f.host.is_some() {
                without_host_props(f.device_add.clone())
            } else {
                f.device_add.clone()
            };
            let expect = if action.guest_renumbers_buses {
                Expectation::planned_in_tree(&f.device_add, &f.guest, &f.bars)
            } else {
                Expectation::planned(&f.guest, &f.bars)
            };
            functions.push(PlugFunction {
                device,
                host: f.host.clone(),
                expect,
                needs: visible_needs(&f.bars),
            });
        }
        let placeholder = action
            .remove_placeholder
            .as_ref()
            .map(|p| PlaceholderRequest::new(p.device_del.clone(), p.object_del.clone()));
        PlugRequest {
            port: action.port_or_device().clone(),
            device: action.device.clone(),
            objects: action.object_add.clone(),
            fds: Vec::new(),
            functions,
            placeholder,
        }
    }

    /// Adds a QOM object, created before the devices and deleted after them.
    pub fn with_object(mut self, object: QemuObject) -> Self {
        self.objects.push(object);
        self
    }

    /// Passes `fd`, a descriptor the caller holds, to QEMU under `fdname` before the
    /// devices are added; the engine closes its copy after the plug. See [`FdRequest`]
    /// for what a restart does with it.
    pub fn with_fd(mut self, fdname: impl Into<String>, fd: OwnedFd) -> Self {
        self.fds.push(FdRequest::held(fdname, fd));
        self
    }

    /// Has the engine open `path` (read-write when `writable`) and pass it to QEMU under
    /// `fdname` before the devices are added.
    pub fn with_fd_path(
        mut self,
        fdname: impl Into<String>,
        path: impl Into<PathBuf>,
        writable: bool,
    ) -> Self {
        self.fds.push(FdRequest::open(fdname, path, writable));
        self
    }

    /// Puts the request's `vfio-pci` functions on the iommufd VFIO interface (QEMU 9.0 and
    /// Linux 6.6 on), for requests not made from an action that has it already
    /// ([`HotplugAction::with_iommufd`]): an `iommufd` object `id` is created before the
    /// functions and deleted after them, and each `vfio-pci` function gets `iommufd=<id>`.
    /// With `dev_iommu` (an open `/dev/iommu`), QEMU takes that descriptor, passed as
    /// `<id>-fd`, instead of opening `/dev/iommu` itself.
    pub fn with_iommufd(mut self, id: QemuId, dev_iommu: Option<OwnedFd>) -> Self {
        let mut object = QemuObject::new("iommufd", id.clone());
        if let Some(fd) = dev_iommu {
            let fdname = format!("{id}-fd");
            object = object.prop("fd", fdname.as_str());
            self.fds.push(FdRequest::held(fdname, fd));
        }
        self.objects.insert(0, object);
        for f in self.functions.iter_mut().filter(|f| f.device.driver == "vfio-pci") {
            f.device.props.insert("iommufd".into(), PropValue::Str(id.to_string()));
        }
        self
    }

    /// Takes a boot-time placeholder off the port first.
    pub fn with_placeholder(mut self, placeholder: PlaceholderRequest) -> Self {
        self.placeholder = Some(placeholder);
        self
    }

    /// Checks the request and fills in `multifunction=on` where a slot has several
    /// functions. Returns the plug order.
    pub(crate) fn prepare(&mut self) -> Result<Prepared> {
        if self.functions.is_empty() {
            return Err(PlugRequestError::NoFunctions(self.port.to_string()));
        }
        self.check_ids()?;
        self.check_properties()?;
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if bytes > MAX_REQUEST_BYTES {
            return Err(PlugRequestError::TooLarge { bytes });
        }
        let pci = self.pci_addresses();
        let mut groups: BTreeMap<&SlotKey, Vec<(usize, u8)>> = BTreeMap::new();
        for (i, p) in pci.iter().enumerate() {
            if let Some((key, func)) = p {
                groups.entry(key).or_default().push((i, *func));
            }
        }
        let mut multi_zero = HashSet::new();
        let mut multi = Vec::new();
        for members in groups.values().filter(|m| m.len() > 1) {
            let mut seen: BTreeMap<u8, usize> = BTreeMap::new();
            for &(i, func) in members {
                if let Some(&other) = seen.get(&func) {
                    return Err(PlugRequestError::SameAddress(self.id_at(other), self.id_at(i)));
                }
                seen.insert(func, i);
            }
            let Some(&zero) = seen.get(&0) else {
                let first = members.first().map(|m| m.0).unwrap_or_default();
                return Err(PlugRequestError::NoFunctionZero(self.id_at(first)));
            };
            multi_zero.insert(zero);
            multi.extend(members.iter().map(|m| m.0));
        }
        for i in multi {
            self.set_multifunction(i)?;
        }
        // Function 0 of a multi-function slot goes last: the guest scans a slot when
        // function 0 appears, so every other function must already be there.
        let mut order: Vec<usize> = (0..self.functions.len()).collect();
        order.sort_by_key(|i| multi_zero.contains(i));
        Ok(Prepared { order, pci })
    }

    /// Ids unique across functions, objects and placeholder; the device one of the
    /// functions. (Each id is a [`QemuId`], valid when it was made.)
    fn check_ids(&self) -> Result<()> {
        let mut seen = HashSet::new();
        let placeholder = self.placeholder.iter().flat_map(|p| p.devices.iter().chain(&p.objects));
        for id in self
            .functions
            .iter()
            .map(PlugFunction::id)
            .chain(self.objects.iter().map(|o| &o.id))
            .chain(placeholder)
        {
            if !seen.insert(id) {
                return Err(PlugRequestError::DuplicateId(id.to_string()));
            }
        }
        if !self.functions.iter().any(|f| *f.id() == self.device) {
            return Err(PlugRequestError::UnknownDevice { device: self.device.to_string() });
        }
        Ok(())
    }

    /// Properties are what QEMU reads as properties: none repeats a field (the QMP
    /// arguments, and the journal's copy of them, would say it twice), no VFIO host
    /// function hides among them, and each number has its one form (a non-negative
    /// `Signed` becomes `Int`), so that the request reads back from JSON as it is.
    fn check_properties(&mut self) -> Result<()> {
        let shadowed = |id: &QemuId, name: &str| PlugRequestError::ShadowedProperty {
            id: id.to_string(),
            name: name.to_owned(),
        };
        for f in &mut self.functions {
            if let Some(name) = f.untyped_host() {
                return Err(PlugRequestError::UntypedHost { id: f.id().to_string(), name: name.into() });
            }
            if let Some(name) =
                ["driver", "id", "bus", "addr"].into_iter().find(|n| f.device.props.contains_key(*n))
            {
                return Err(shadowed(f.id(), name));
            }
            if f.device.props.get("multifunction").is_some_and(|v| *v != PropValue::Bool(false)) {
                return Err(shadowed(f.id(), "multifunction"));
            }
            f.device.props.values_mut().for_each(one_form);
        }
        for o in &mut self.objects {
            if let Some(name) = ["qom-type", "id"].into_iter().find(|n| o.props.contains_key(*n)) {
                return Err(shadowed(&o.id, name));
            }
            o.props.values_mut().for_each(one_form);
        }
        Ok(())
    }

    fn id_at(&self, i: usize) -> String {
        self.functions.get(i).map(|f| f.id().to_string()).unwrap_or_default()
    }

    fn set_multifunction(&mut self, i: usize) -> Result<()> {
        let Some(f) = self.functions.get_mut(i) else { return Ok(()) };
        if f.multifunction_off() {
            return Err(PlugRequestError::MultifunctionOff(f.id().to_string()));
        }
        // Sent as a JSON boolean: QEMU 10 rejects the string "on" here ("Invalid
        // parameter type for 'multifunction', expected: boolean"); 7.2 takes both.
        f.device.multifunction = true;
        Ok(())
    }

    /// For each function: its (slot, function) when it is a PCI function: its address,
    /// else the slot and function it is expected at. A function expected anywhere (a zPCI
    /// function: QEMU picks its address) belongs to no slot of the request.
    fn pci_addresses(&self) -> Vec<Option<(SlotKey, u8)>> {
        self.functions
            .iter()
            .map(|f| {
                let (slot, func) = match (f.device.addr, &f.expect) {
                    (Some(a), _) => (a.slot(), a.function()),
                    (None, Expectation::Pci(PciExpectation { slot: Some(slot), function, .. })) => {
                        (*slot, function.unwrap_or(0))
                    }
                    (None, _) => return None,
                };
                Some(((f.device.bus.clone(), slot), func))
            })
            .collect()
    }

    /// Every QEMU id of the request: functions, then objects.
    pub fn ids(&self) -> impl Iterator<Item = &QemuId> {
        self.functions.iter().map(PlugFunction::id).chain(self.objects.iter().map(|o| &o.id))
    }

    /// Ids of every device that must be gone before the port is free: the functions,
    /// then the placeholder's devices.
    pub fn device_ids(&self) -> impl Iterator<Item = &QemuId> {
        self.functions
            .iter()
            .map(PlugFunction::id)
            .chain(self.placeholder.iter().flat_map(|p| p.devices.iter()))
    }
}

#[cfg(test)]
mod plan_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(s: &str) -> QemuId {
        QemuId::new(s).unwrap()
    }

    fn func(name: &str, slot: u8, function: u8) -> PlugFunction {
        let mut d = QemuDevice::new("vfio-pci", id(name));
        d.bus = Some("rp0".into());
        d.addr = Some(DevFn::new(slot, function).unwrap());
        PlugFunction::new(d)
    }

    fn request(functions: Vec<PlugFunction>) -> PlugRequest {
        let device = functions.first().map_or_else(|| id("none"), |f| f.id().clone());
        PlugRequest::new(id("rp0"), device, functions)
    }

    #[test]
    fn addr_forms() {
        let at = |v: Value| parse_addr(&v).map(|a| (a.slot(), a.function()));
        assert_eq!(at(json!("1f.7")), Some((0x1f, 7)));
        assert_eq!(at(json!("0x3.0x1")), Some((3, 1)));
        assert_eq!(at(json!("4")), Some((4, 0)));
        assert_eq!(at(json!(9)), Some((1, 1)));
        assert_eq!(at(json!("0.8")), None);
        assert_eq!(at(json!("20.0")), None);
        assert_eq!(at(json!("zz")), None);
    }

    #[test]
    fn function_zero_last_and_multifunction_on() {
        let mut r = request(vec![func("f0", 0, 0), func("f1", 0, 1), func("f2", 0, 2)]);
        let p = r.prepare().unwrap();
        assert_eq!(p.order, vec![1, 2, 0]);
        assert!(r.functions.iter().all(|f| f.device.multifunction));
        assert!(r
            .functions
            .iter()
            .all(|f| f.qmp_arguments().get("multifunction") == Some(&Value::Bool(true))));
    }

    #[test]
    fn rejects_bad_requests() {
        let mut r = request(vec![func("f1", 0, 1), func("f2", 0, 2)]);
        assert!(matches!(r.prepare(), Err(PlugRequestError::NoFunctionZero(_))));
        let mut r = request(vec![func("a", 0, 0), func("a", 0, 1)]);
        assert!(matches!(r.prepare(), Err(PlugRequestError::DuplicateId(_))));
        let mut r = request(vec![func("a", 0, 0), func("b", 0, 0)]);
        assert!(matches!(r.prepare(), Err(PlugRequestError::SameAddress(..))));
        let mut off = func("a", 0, 0);
        off.device = off.device.prop("multifunction", false);
        let mut r = request(vec![off, func("b", 0, 1)]);
        assert!(matches!(r.prepare(), Err(PlugRequestError::MultifunctionOff(_))));
        let mut r = PlugRequest::new(id("rp0"), id("x"), vec![]);
        assert_eq!(r.prepare(), Err(PlugRequestError::NoFunctions("rp0".into())));
        let mut r = PlugRequest::new(id("rp0"), id("other"), vec![func("a", 0, 0)]);
        assert_eq!(r.prepare(), Err(PlugRequestError::UnknownDevice { device: "other".into() }));
        // A host function as a bare property would slip past the VFIO checks.
        let mut f = func("a", 0, 0);
        f.device = f.device.prop("host", "0000:01:00.0");
        let mut r = request(vec![f]);
        assert!(matches!(r.prepare(), Err(PlugRequestError::UntypedHost { .. })));
        // A property that repeats a field would be said twice in the arguments.
        for (name, value) in [("addr", PropValue::from("0.3")), ("multifunction", PropValue::Bool(true))] {
            let mut f = func("a", 0, 0);
            f.device.props.insert(name.into(), value);
            let e = request(vec![f]).prepare().unwrap_err();
            assert_eq!(e, PlugRequestError::ShadowedProperty { id: "a".into(), name: name.into() });
        }
        let o = QemuObject::new("memory-backend-ram", id("m")).prop("id", "x");
        let e = request(vec![func("a", 0, 0)]).with_object(o).prepare().unwrap_err();
        assert!(matches!(e, PlugRequestError::ShadowedProperty { name, .. } if name == "id"));
    }

    /// Whatever typed values a caller builds, the request reads back from its JSON (the
    /// journal's form) equal to what was prepared.
    #[test]
    fn prepared_requests_read_back_equal() {
        let mut f = func("a", 0, 0);
        f.device.props.insert("bootindex".into(), PropValue::Signed(-1));
        f.device.props.insert("vectors".into(), PropValue::Signed(4));
        let mut r = request(vec![f, func("b", 0, 1)]).with_object(
            QemuObject::new("memory-backend-ram", id("m")).prop("size", PropValue::Signed(1 << 20)),
        );
        r.prepare().unwrap();
        assert_eq!(r.functions[0].device.props["vectors"], PropValue::Int(4));
        let back: PlugRequest = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    /// Ids and addresses are checked when `device_add` arguments are read: no request
    /// holds an invalid one.
    #[test]
    fn qmp_arguments_are_read_typed() {
        let read = |v: Value| PlugFunction::from_qmp(v.as_object().unwrap());
        assert_eq!(read(json!({"driver": "e1000e", "id": "1a"})), Err(PlugRequestError::BadId("1a".into())));
        assert_eq!(read(json!({"id": "a"})), Err(PlugRequestError::MissingMember { member: "driver" }));
        assert!(matches!(
            read(json!({"driver": "e", "id": "a", "addr": "0.9"})),
            Err(PlugRequestError::BadAddr { .. })
        ));
        let e = read(json!({"driver": "vfio-pci", "id": "g0", "host": "../../etc"})).unwrap_err();
        assert!(matches!(&e, PlugRequestError::BadHost { id, .. } if id == "g0"), "{e}");
        assert!(e.to_string().contains("../../etc"), "{e}");
        let f = read(json!({"driver": "vfio-pci", "id": "g0", "bus": "rp0", "addr": "0x0.0x1",
                            "host": "41:00.1", "rombar": 0, "bootindex": -1, "x-vga": false,
                            "multifunction": "on"}))
        .unwrap();
        assert_eq!(f.host, Some(HostRef::Pci(Bdf::parse("0000:41:00.1").unwrap())));
        assert_eq!(f.device.addr, Some(DevFn::new(0, 1).unwrap()));
        assert!(f.device.multifunction);
        assert_eq!(f.device.props["bootindex"], PropValue::Signed(-1));
        assert!(!f.device.props.contains_key("host"));
        assert_eq!(
            Value::Object(f.qmp_arguments()),
            json!({"driver": "vfio-pci", "id": "g0", "bus": "rp0", "addr": "0x0.0x1", "multifunction": true,
                   "host": "0000:41:00.1", "rombar": 0, "bootindex": -1, "x-vga": false})
        );
        let ccw =
            read(json!({"driver": "vfio-ccw", "id": "d0", "sysfsdev": "/sys/bus/mdev/devices/u1"})).unwrap();
        assert_eq!(ccw.host, Some(HostRef::Sysfsdev("/sys/bus/mdev/devices/u1".into())));
        // Not a VFIO device: `host` is an ordinary property.
        let other = read(json!({"driver": "usb-host", "id": "u0", "host": "x"})).unwrap();
        assert_eq!(other.host, None);
        assert_eq!(other.device.props["host"], PropValue::Str("x".into()));
    }

    /// Values `device_add` properties do not take (nested objects, lists, fractions) are
    /// refused when read, before anything is journaled or sent; so is a huge request.
    #[test]
    fn nested_or_huge_arguments_are_refused() {
        let nested = |levels: usize| {
            let mut v = json!("leaf");
            for _ in 0..levels {
                v = json!({ "x": v });
            }
            v
        };
        for bad in [nested(130), nested(1), json!([1]), json!(0.5), Value::Null] {
            let args = json!({"driver": "e1000e", "id": "a", "deep": bad});
            let e = PlugFunction::from_qmp(args.as_object().unwrap()).unwrap_err();
            assert!(matches!(&e, PlugRequestError::BadProperty { name, .. } if name == "deep"), "{e}");
            assert!(e.to_string().len() < 300, "the value is cut in the message: {e}");
        }
        let text = json!({"port": "rp0", "functions": [{"qdev": {"driver": "e1000e", "id": "a", "deep": nested(200)}}]});
        let e = serde_json::from_value::<PlugRequest>(text).unwrap_err();
        assert!(e.to_string().contains("property deep"), "{e}");
        let mut f = func("a", 0, 0);
        f.device = f.device.prop("big", "x".repeat(MAX_REQUEST_BYTES));
        let mut r = request(vec![f]);
        assert!(matches!(r.prepare(), Err(PlugRequestError::TooLarge { .. })));
    }

    #[test]
    fn serde_roundtrip_with_defaults() {
        let text = r#"{"port": "net0", "functions": [{"qdev": {"driver": "virtio-net-ccw", "id": "net0", "devno": "fe.0.0042"}}]}"#;
        let r: PlugRequest = serde_json::from_str(text).unwrap();
        assert_eq!(r.functions[0].expect, Expectation::Present);
        assert_eq!(r.device, id("net0"));
        let back: PlugRequest = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    /// Without a `device` member the device is the function named like the port, else the
    /// one at function 0, else the first.
    #[test]
    fn device_id_of_older_requests() {
        let read = |v: Value| serde_json::from_value::<PlugRequest>(v).unwrap().device.to_string();
        let zpci = json!({"port": "vnet1", "functions": [
            {"qdev": {"driver": "zpci", "id": "zpci1", "target": "vnet1"}},
            {"qdev": {"driver": "virtio-net-pci", "id": "vnet1"}}]});
        assert_eq!(read(zpci), "vnet1");
        let slot = json!({"port": "rp0", "functions": [
            {"qdev": {"driver": "e1000e", "id": "nic0-f1", "addr": "0.1"}},
            {"qdev": {"driver": "e1000e", "id": "nic0", "addr": "0.0"}}]});
        assert_eq!(read(slot), "nic0");
        let bare = json!({"port": "rp0", "functions": [{"qdev": {"driver": "e1000e", "id": "n0"}}]});
        assert_eq!(read(bare), "n0");
        assert!(serde_json::from_value::<PlugRequest>(json!({"port": "rp0", "functions": []})).is_err());
    }

    /// A held descriptor is journaled by name; the request read back equals the one
    /// written, and knows it holds no descriptor.
    #[test]
    fn held_descriptors_are_journaled_by_name() {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut r = request(vec![func("a", 0, 0)])
            .with_fd("cdev", fd)
            .with_fd_path("iommu", "/dev/iommu", true)
            .with_iommufd(id("iommufd0"), Some(OwnedFd::from(std::fs::File::open("/dev/null").unwrap())));
        let text = serde_json::to_value(&r).unwrap();
        assert_eq!(
            text["fds"],
            json!([{"fdname": "cdev", "held": true}, {"fdname": "iommu", "path": "/dev/iommu", "writable": true},
                   {"fdname": "iommufd0-fd", "held": true}])
        );
        assert_eq!(
            text["objects"],
            json!([{"qom_type": "iommufd", "id": "iommufd0", "props": {"fd": "iommufd0-fd"}}])
        );
        assert_eq!(text["functions"][0]["qdev"]["iommufd"], "iommufd0");
        let mut back: PlugRequest = serde_json::from_value(text).unwrap();
        assert_eq!(back, r);
        assert!(back.fds[0].take_held().is_none(), "read back, the descriptor is gone");
        assert!(r.fds[0].take_held().is_some());
        assert!(r.fds[0].take_held().is_none(), "taken once");
        assert_eq!(r.fds[1].path(), Some(Path::new("/dev/iommu")));
        assert!(r.fds[1].writable());
        assert!(serde_json::from_value::<FdRequest>(json!({"fdname": "x"})).is_err());
        assert!(
            serde_json::from_value::<FdRequest>(json!({"fdname": "x", "path": "/a", "held": true})).is_err()
        );
    }
}

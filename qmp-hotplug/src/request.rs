//! What the engine is asked to plug: a device (all functions of a slot or an IOMMU group,
//! with the objects and descriptors they need) and what the guest should see afterwards.
//!
//! These types are the engine's own, small and serde-able, so that any planner can fill
//! them in; [`DeviceRequest::from_action`] builds one from a `pcie-topology` plan's
//! [`HotplugAction`].

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use pcie_topology::plan::{ExpectedBar, GuestLocation, HotplugAction};
use pcie_topology::QemuObject;
use pcilibs::requirement::Resource;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Errors in a request, found before anything is sent to QEMU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The port name is empty.
    #[error("the request names no port")]
    NoPort,
    /// The request has no device.
    #[error("the request for port {0} has no device")]
    NoFunctions(String),
    /// A device's `qdev` arguments lack a string member.
    #[error("device #{index} lacks a string `{member}`")]
    MissingMember {
        /// Position in `functions`.
        index: usize,
        /// The member, `driver` or `id`.
        member: &'static str,
    },
    /// An id is not a valid QEMU id (`[A-Za-z][A-Za-z0-9._-]*`).
    #[error("{0:?} is not a valid QEMU id")]
    BadId(String),
    /// An id appears twice in the request.
    #[error("id {0:?} appears twice")]
    DuplicateId(String),
    /// An `addr` value could not be read as `slot[.function]`.
    #[error("device {id}: cannot read addr {addr}")]
    BadAddr {
        /// The device id.
        id: String,
        /// The value as given.
        addr: String,
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
    /// A `qdev` or object property nests deeper than [`MAX_NESTING`] levels. QEMU may take
    /// it, but the journal could not read its record back, so it is refused before
    /// anything is journaled or sent.
    #[error("{id}: arguments nested deeper than {MAX_NESTING} levels")]
    TooDeep {
        /// The device or object id.
        id: String,
    },
    /// The request, as JSON, is larger than [`MAX_REQUEST_BYTES`].
    #[error("the request is {bytes} bytes as JSON, more than {MAX_REQUEST_BYTES}")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, RequestError>;

/// Deepest nesting of a device's `qdev` arguments or an object's properties, counting
/// the argument object itself as 1. Journal records are read back with JSON's usual
/// recursion limit (128), and a request sits a few levels down in them; real arguments
/// are one or two levels deep.
pub const MAX_NESTING: usize = 32;

/// Largest request, as JSON (every journal record carrying it must stay below
/// [`crate::journal::MAX_RECORD_BYTES`]).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// True when `v` nests containers deeper than `limit` (the outermost counts as 1).
/// Iterative, so that a value of any depth is measured without deep recursion.
fn deeper_than(v: &Value, limit: usize) -> bool {
    let mut stack = vec![(v, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(m) => Box::new(m.values()),
            _ => continue,
        };
        if depth > limit {
            return true;
        }
        stack.extend(children.map(|c| (c, depth.saturating_add(1))));
    }
    false
}

/// One device to hotplug onto one port: every function (or every member of an IOMMU
/// group), the QOM objects and descriptors they need, and the checks to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRequest {
    /// The port the device goes on: the engine's unit of serialization and bookkeeping
    /// (usually the root or downstream port's QEMU id; on s390x a CCW or zPCI slot name).
    pub port: String,
    /// QOM objects created before the devices and deleted after them
    /// (`iommufd`, `memory-backend-*`, ...).
    #[serde(default)]
    pub objects: Vec<ObjectRequest>,
    /// Descriptors opened by the engine and handed to QEMU with `getfd` before the devices.
    #[serde(default)]
    pub fds: Vec<FdRequest>,
    /// The devices (`device_add` arguments), in the order given; the engine moves the
    /// function 0 of a multi-function slot last.
    pub functions: Vec<FunctionRequest>,
    /// A boot-time placeholder to take off the port before anything is added (a planner
    /// plugs one behind a switch downstream port so that firmware sizes the port's
    /// windows; see [`PlaceholderRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<PlaceholderRequest>,
}

/// A device plugged at boot that holds a port's windows open until the real device
/// comes: the engine `device_del`s it, waits for `DEVICE_DELETED` (up to
/// [`crate::EngineOptions::placeholder_timeout`]; the removal needs a guest OS that
/// answers the slot), then `object-del`s its backends, all journaled, before the first
/// `object-add` or `device_add` of the request. While the guest has not released it the
/// port stays taken (`unplug-pending`), and a late `DEVICE_DELETED` frees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceholderRequest {
    /// `device_del` these, in order. For a multi-function placeholder list function 0
    /// only: QEMU then removes the whole slot.
    pub devices: Vec<String>,
    /// Then `object-del` these (the placeholder's memory backends).
    #[serde(default)]
    pub objects: Vec<String>,
}

/// A QOM object for `object-add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectRequest {
    /// `qom-type`, e.g. `iommufd` or `memory-backend-ram`.
    pub qom_type: String,
    /// The object's id.
    pub id: String,
    /// Further properties, passed as they are.
    #[serde(default)]
    pub props: Map<String, Value>,
}

impl ObjectRequest {
    /// Reads a QMP `object-add` argument object (`qom-type`, `id`, properties), the form a
    /// planner emits. `None` when `qom-type` or `id` is missing.
    pub fn from_object_add(args: &Map<String, Value>) -> Option<ObjectRequest> {
        let qom_type = args.get("qom-type")?.as_str()?.to_owned();
        let id = args.get("id")?.as_str()?.to_owned();
        let mut props = args.clone();
        props.remove("qom-type");
        props.remove("id");
        Some(ObjectRequest { qom_type, id, props })
    }

    /// The `object-add` arguments.
    pub fn arguments(&self) -> Value {
        let mut m = self.props.clone();
        m.insert("qom-type".into(), Value::String(self.qom_type.clone()));
        m.insert("id".into(), Value::String(self.id.clone()));
        Value::Object(m)
    }
}

/// A file the engine opens and passes to QEMU under a name (`getfd`), e.g. `/dev/iommu`
/// for an `iommufd` object's `fd` property or a VFIO cdev for `vfio-pci`'s `fd`. Regular
/// files, character and block devices are passed; a FIFO, socket or directory is refused
/// (`EngineError::SpecialFile`) before the plug takes the port or journals anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRequest {
    /// The name QEMU knows the descriptor by.
    pub fdname: String,
    /// The file to open.
    pub path: PathBuf,
    /// Open read-write (else read-only).
    #[serde(default)]
    pub writable: bool,
}

/// One `device_add` and what must be true after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRequest {
    /// The `device_add` arguments: `driver`, `id`, `bus`, `addr`, `multifunction` and the
    /// device's properties (`host=`, `sysfsdev=`, `memdev=`, ...).
    pub qdev: Map<String, Value>,
    /// What proves the device arrived.
    #[serde(default)]
    pub expect: Expectation,
    /// The BARs (and ROM) the guest must place in the port's windows when the function
    /// arrives, for [`crate::EngineOptions::check_live_windows`]; empty: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<Resource>,
}

impl FunctionRequest {
    /// The device's QEMU id (empty when missing; validation rejects that).
    pub fn id(&self) -> &str {
        self.qdev.get("id").and_then(Value::as_str).unwrap_or_default()
    }

    /// The QEMU driver name.
    pub fn driver(&self) -> &str {
        self.qdev.get("driver").and_then(Value::as_str).unwrap_or_default()
    }

    /// A string property of the device.
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.qdev.get(name).and_then(Value::as_str)
    }
}

/// What must be true once a device is plugged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Expectation {
    /// The device exists in QEMU (`qom-list /machine/peripheral`); for devices that are
    /// not on a PCI bus QEMU reports: CCW devices, `vfio-ap`, `zpci`.
    #[default]
    Present,
    /// The device is in `query-pci` under its id, where and as large as planned.
    Pci(PciExpectation),
}

/// Where a PCI function must appear in `query-pci`, and with which BAR sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciExpectation {
    /// Guest bus number (as firmware numbered it); unchecked when `None`.
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
}

/// One BAR's expected size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// will show at its index and size ([`BarExpectation::planned`]); anything else (ccw,
    /// vfio-ap, and zPCI, whose planned BDF is the guest's view, not QEMU's) present in
    /// QEMU.
    pub fn planned(location: &GuestLocation, bars: &[ExpectedBar]) -> Expectation {
        match location {
            GuestLocation::Pci { bdf, .. } => Expectation::Pci(PciExpectation {
                bus: Some(bdf.bus()),
                slot: Some(bdf.device()),
                function: Some(bdf.function()),
                bars: bars.iter().filter_map(BarExpectation::planned).collect(),
            }),
            _ => Expectation::Present,
        }
    }
}

/// A validated request with the order in which its devices are added.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prepared {
    /// Indices into `functions`, in plug order.
    pub(crate) order: Vec<usize>,
    /// For each function (by index): `Some((group key, function))` when it is a PCI function.
    pub(crate) pci: Vec<Option<(String, u8)>>,
}

/// Whether `id` is a valid QEMU id.
pub fn valid_qemu_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Reads a PCI `addr` value (`"1f.7"`, `"0x3.0x1"`, `"4"` or an integer devfn) as
/// (slot, function).
pub fn parse_addr(v: &Value) -> Option<(u8, u8)> {
    match v {
        Value::Number(n) => {
            let devfn = u8::try_from(n.as_u64()?).ok()?;
            Some((devfn >> 3, devfn & 7))
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
            (slot < 32 && func < 8).then_some((slot, func))
        }
        _ => None,
    }
}

/// What the guest places in the port's windows when the function arrives: each BAR at the
/// size the guest shows, not the SR-IOV VF apertures (VFs come later, in the guest).
fn visible_needs(bars: &[pcie_topology::plan::ExpectedBar]) -> Vec<Resource> {
    bars.iter()
        .filter_map(|b| {
            let size = b.visible_size()?;
            Some(Resource { kind: b.kind, prefetchable: b.prefetchable, rom: b.rom, size, align: size })
        })
        .collect()
}

/// A plan's object as the engine's: its type, id and properties as QMP has them.
fn object_request(o: &QemuObject) -> ObjectRequest {
    ObjectRequest {
        qom_type: o.qom_type.clone(),
        id: o.id.to_string(),
        props: o.props.iter().map(|(k, v)| (k.clone(), v.to_qmp())).collect(),
    }
}

impl DeviceRequest {
    /// The request for one hotplug action of a `pcie-topology` plan
    /// ([`pcie_topology::Plan::hotplug_actions`], or an action for a device placed later).
    ///
    /// - `port`: the action's port; on s390x, which has no ports, the device id
    ///   ([`HotplugAction::port_or_device`]).
    /// - `objects`: the action's `object_add`.
    /// - `functions`: for each of the action's functions in its order (function 0 last;
    ///   the engine keeps function 0 of a multi-function slot last in any case), first its
    ///   companions (the s390x `zpci` device) expected [`Expectation::Present`], then its
    ///   `device_add` expected as [`Expectation::planned`] says: a PCI function at its
    ///   planned bus, slot and function with each BAR pinned to the plan's index at the
    ///   size `query-pci` shows (the ROM as BAR 6; SR-IOV VF apertures not expected; a
    ///   resizable BAR at its current size); ccw, zPCI and vfio-ap functions present.
    /// - `placeholder`: the action's `remove_placeholder`.
    /// - each function's `needs`: its BARs as the guest will show them, for the engine's
    ///   optional live-window check.
    ///
    /// The action's devices and objects are typed values whose ids and addresses were
    /// checked when they were made; they become QMP arguments here
    /// ([`pcie_topology::QemuDevice::to_qmp`]) and are not read back. An `iommufd` object
    /// and each function's `iommufd` property come with the action
    /// ([`HotplugAction::with_iommufd`]); descriptors (`fds`) are the caller's to add. A
    /// BAR the plan has no index for (a request built from bare sizes, a version 1 plan)
    /// is expected by size on any BAR 0–5 ([`BarExpectation::any`]).
    pub fn from_action(action: &HotplugAction) -> DeviceRequest {
        let mut functions = Vec::new();
        for f in &action.functions {
            functions.extend(f.companions.iter().map(|c| FunctionRequest {
                qdev: c.to_qmp(),
                expect: Expectation::Present,
                needs: Vec::new(),
            }));
            functions.push(FunctionRequest {
                qdev: f.device_add.to_qmp(),
                expect: Expectation::planned(&f.guest, &f.bars),
                needs: visible_needs(&f.bars),
            });
        }
        let placeholder = action.remove_placeholder.as_ref().map(|p| PlaceholderRequest {
            devices: p.device_del.iter().map(ToString::to_string).collect(),
            objects: p.object_del.iter().map(ToString::to_string).collect(),
        });
        DeviceRequest {
            port: action.port_or_device().to_string(),
            objects: action.object_add.iter().map(object_request).collect(),
            fds: Vec::new(),
            functions,
            placeholder,
        }
    }

    /// Checks the request and fills in `multifunction=on` where a slot has several
    /// functions. Returns the plug order.
    pub(crate) fn prepare(&mut self) -> Result<Prepared> {
        if self.port.is_empty() {
            return Err(RequestError::NoPort);
        }
        self.check_shape()?;
        if self.functions.is_empty() {
            return Err(RequestError::NoFunctions(self.port.clone()));
        }
        let mut ids = HashSet::new();
        for (index, f) in self.functions.iter().enumerate() {
            for member in ["driver", "id"] {
                if f.qdev.get(member).and_then(Value::as_str).is_none() {
                    return Err(RequestError::MissingMember { index, member });
                }
            }
            check_id(f.id(), &mut ids)?;
        }
        for o in &self.objects {
            check_id(&o.id, &mut ids)?;
        }
        if let Some(ph) = &self.placeholder {
            for id in ph.devices.iter().chain(&ph.objects) {
                check_id(id, &mut ids)?;
            }
        }
        let pci = self.pci_addresses()?;
        let mut groups: BTreeMap<&str, Vec<(usize, u8)>> = BTreeMap::new();
        for (i, p) in pci.iter().enumerate() {
            if let Some((key, func)) = p {
                groups.entry(key.as_str()).or_default().push((i, *func));
            }
        }
        let mut multi_zero = HashSet::new();
        for members in groups.values().filter(|m| m.len() > 1) {
            let mut seen: BTreeMap<u8, usize> = BTreeMap::new();
            for &(i, func) in members {
                if let Some(&other) = seen.get(&func) {
                    return Err(RequestError::SameAddress(self.id_at(other), self.id_at(i)));
                }
                seen.insert(func, i);
            }
            let Some(&zero) = seen.get(&0) else {
                let first = members.first().map(|m| m.0).unwrap_or_default();
                return Err(RequestError::NoFunctionZero(self.id_at(first)));
            };
            multi_zero.insert(zero);
            for &(i, _) in members {
                self.set_multifunction(i)?;
            }
        }
        // Function 0 of a multi-function slot goes last: the guest scans a slot when
        // function 0 appears, so every other function must already be there.
        let mut order: Vec<usize> = (0..self.functions.len()).collect();
        order.sort_by_key(|i| multi_zero.contains(i));
        Ok(Prepared { order, pci })
    }

    /// Nesting and size within what the journal writes and reads back.
    fn check_shape(&self) -> Result<()> {
        let args = self
            .functions
            .iter()
            .map(|f| (f.id(), &f.qdev))
            .chain(self.objects.iter().map(|o| (o.id.as_str(), &o.props)));
        for (id, map) in args {
            // The map itself is level 1; its values start at level 2.
            if map.values().any(|v| deeper_than(v, MAX_NESTING.saturating_sub(1))) {
                return Err(RequestError::TooDeep { id: id.to_owned() });
            }
        }
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if bytes > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge { bytes });
        }
        Ok(())
    }

    fn id_at(&self, i: usize) -> String {
        self.functions.get(i).map(|f| f.id().to_owned()).unwrap_or_default()
    }

    fn set_multifunction(&mut self, i: usize) -> Result<()> {
        let Some(f) = self.functions.get_mut(i) else { return Ok(()) };
        let off = match f.qdev.get("multifunction") {
            Some(Value::Bool(b)) => !b,
            Some(Value::String(s)) => matches!(s.as_str(), "off" | "false" | "no"),
            _ => false,
        };
        if off {
            return Err(RequestError::MultifunctionOff(f.id().to_owned()));
        }
        // A JSON boolean: QEMU 10 rejects the string "on" here ("Invalid parameter type
        // for 'multifunction', expected: boolean"); 7.2 takes both.
        f.qdev.insert("multifunction".into(), Value::Bool(true));
        Ok(())
    }

    /// For each function: its (bus/slot group key, function) when it is a PCI function.
    fn pci_addresses(&self) -> Result<Vec<Option<(String, u8)>>> {
        self.functions
            .iter()
            .map(|f| {
                let expected = match &f.expect {
                    Expectation::Pci(p) => Some(p),
                    _ => None,
                };
                let addr = match f.qdev.get("addr") {
                    Some(v) => Some(parse_addr(v).ok_or_else(|| RequestError::BadAddr {
                        id: f.id().to_owned(),
                        addr: v.to_string(),
                    })?),
                    None => None,
                };
                if addr.is_none() && expected.is_none() {
                    return Ok(None);
                }
                let (slot, func) = match (addr, expected) {
                    (Some(a), _) => a,
                    (None, Some(p)) => (p.slot.unwrap_or(0), p.function.unwrap_or(0)),
                    (None, None) => return Ok(None),
                };
                let bus = f.prop("bus").unwrap_or_default();
                Ok(Some((format!("{bus}/{slot}"), func)))
            })
            .collect()
    }

    /// Every QEMU id of the request: functions, then objects.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.functions.iter().map(FunctionRequest::id).chain(self.objects.iter().map(|o| o.id.as_str()))
    }

    /// Ids of every device that must be gone before the port is free: the functions,
    /// then the placeholder's devices.
    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.functions
            .iter()
            .map(FunctionRequest::id)
            .chain(self.placeholder.iter().flat_map(|p| p.devices.iter().map(String::as_str)))
    }
}

fn check_id<'a>(id: &'a str, seen: &mut HashSet<&'a str>) -> Result<()> {
    if !valid_qemu_id(id) {
        return Err(RequestError::BadId(id.to_owned()));
    }
    if !seen.insert(id) {
        return Err(RequestError::DuplicateId(id.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod plan_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn func(id: &str, addr: &str) -> FunctionRequest {
        let qdev = json!({"driver": "vfio-pci", "id": id, "bus": "rp0", "addr": addr});
        FunctionRequest {
            qdev: qdev.as_object().unwrap().clone(),
            expect: Expectation::Present,
            needs: vec![],
        }
    }

    #[test]
    fn addr_forms() {
        assert_eq!(parse_addr(&json!("1f.7")), Some((0x1f, 7)));
        assert_eq!(parse_addr(&json!("0x3.0x1")), Some((3, 1)));
        assert_eq!(parse_addr(&json!("4")), Some((4, 0)));
        assert_eq!(parse_addr(&json!(9)), Some((1, 1)));
        assert_eq!(parse_addr(&json!("0.8")), None);
        assert_eq!(parse_addr(&json!("zz")), None);
    }

    #[test]
    fn function_zero_last_and_multifunction_on() {
        let mut r = DeviceRequest {
            port: "rp0".into(),
            objects: vec![],
            fds: vec![],
            placeholder: None,
            functions: vec![func("f0", "0.0"), func("f1", "0.1"), func("f2", "0.2")],
        };
        let p = r.prepare().unwrap();
        assert_eq!(p.order, vec![1, 2, 0]);
        assert!(r.functions.iter().all(|f| f.qdev.get("multifunction") == Some(&Value::Bool(true))));
    }

    #[test]
    fn rejects_bad_requests() {
        let mut r = DeviceRequest {
            port: "rp0".into(),
            objects: vec![],
            fds: vec![],
            placeholder: None,
            functions: vec![func("f1", "0.1"), func("f2", "0.2")],
        };
        assert!(matches!(r.prepare(), Err(RequestError::NoFunctionZero(_))));
        let mut r = DeviceRequest {
            port: "rp0".into(),
            objects: vec![],
            fds: vec![],
            placeholder: None,
            functions: vec![func("a", "0.0"), func("a", "0.1")],
        };
        assert!(matches!(r.prepare(), Err(RequestError::DuplicateId(_))));
        let mut r = DeviceRequest {
            port: "rp0".into(),
            objects: vec![],
            fds: vec![],
            placeholder: None,
            functions: vec![func("1a", "0.0")],
        };
        assert!(matches!(r.prepare(), Err(RequestError::BadId(_))));
        let mut f = func("a", "0.0");
        f.qdev.insert("multifunction".into(), json!("off"));
        let mut r = DeviceRequest {
            port: "rp0".into(),
            objects: vec![],
            fds: vec![],
            placeholder: None,
            functions: vec![f, func("b", "0.1")],
        };
        assert!(matches!(r.prepare(), Err(RequestError::MultifunctionOff(_))));
        let mut r = DeviceRequest {
            port: "".into(),
            objects: vec![],
            fds: vec![],
            functions: vec![],
            placeholder: None,
        };
        assert_eq!(r.prepare(), Err(RequestError::NoPort));
    }

    /// A `qdev` property nested 130 levels deep (QEMU takes it) is refused before
    /// anything is sent: the journal could not read its record back. So is a huge one.
    #[test]
    fn deep_or_huge_arguments_are_refused() {
        let nested = |levels: usize| {
            let mut v = json!("leaf");
            for _ in 0..levels {
                v = json!({ "x": v });
            }
            v
        };
        let mut f = func("a", "0.0");
        f.qdev.insert("deep".into(), nested(130));
        let mut r = DeviceRequest {
            port: "rp0".into(),
            objects: vec![],
            fds: vec![],
            placeholder: None,
            functions: vec![f],
        };
        assert_eq!(r.prepare(), Err(RequestError::TooDeep { id: "a".into() }));
        // Up to the limit is fine: the map plus MAX_NESTING - 1 levels below it.
        r.functions[0].qdev.insert("deep".into(), nested(MAX_NESTING - 1));
        r.prepare().unwrap();
        r.functions[0].qdev.insert("deep".into(), nested(MAX_NESTING));
        assert!(matches!(r.prepare(), Err(RequestError::TooDeep { .. })));
        r.functions[0].qdev.insert("deep".into(), json!([[1]]));
        r.objects.push(ObjectRequest {
            qom_type: "memory-backend-ram".into(),
            id: "m".into(),
            props: nested(200).as_object().unwrap().clone(),
        });
        assert_eq!(r.prepare(), Err(RequestError::TooDeep { id: "m".into() }));
        r.objects.clear();
        r.functions[0].qdev.insert("big".into(), json!("x".repeat(MAX_REQUEST_BYTES)));
        assert!(matches!(r.prepare(), Err(RequestError::TooLarge { .. })));
    }

    #[test]
    fn object_add_arguments_round_trip() {
        let args = json!({"qom-type": "iommufd", "id": "iommufd0", "fd": "iommu-fd"});
        let o = ObjectRequest::from_object_add(args.as_object().unwrap()).unwrap();
        assert_eq!((o.qom_type.as_str(), o.id.as_str()), ("iommufd", "iommufd0"));
        assert_eq!(o.arguments(), args);
        assert!(ObjectRequest::from_object_add(json!({"id": "x"}).as_object().unwrap()).is_none());
    }

    #[test]
    fn serde_roundtrip_with_defaults() {
        let text = r#"{"port": "rp1", "functions": [{"qdev": {"driver": "virtio-net-ccw", "id": "n0", "devno": "fe.0.0042"}}]}"#;
        let r: DeviceRequest = serde_json::from_str(text).unwrap();
        assert_eq!(r.functions[0].expect, Expectation::Present);
        let back: DeviceRequest = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}

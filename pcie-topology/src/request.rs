//! What the planner is asked to place: devices with all their functions, and hotplug
//! profiles for spare ports.
//!
//! The planner's input is its own small type, so it does not depend on how the facts were
//! gathered (sysfs, VFIO, an lspci dump or a hand-written profile). Each function carries
//! its resources as [`FunctionResource`]s: a [`pcilibs::requirement::Resource`] (what the
//! window rule [`pcilibs::requirement::Requirement::of`] sizes ports from) with the BAR
//! index it sits at and what it stands for ([`ResourceRole`]), so that the plan can say
//! which BARs the guest will show, where, and at which size.

use std::collections::BTreeMap;

use pcilibs::bar::{Bar, BarKind};
use pcilibs::bdf::Bdf;
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::requirement::{Requirement, RequirementError, Resource};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::qemu::{PropValue, QemuError, QemuId, QemuObject};
use crate::units::{fmt_size, parse_size, GIB, MAX_IO_SIZE, MAX_PHYS_BITS, MIB};

/// Errors in a request or a profile.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A device id or object id is not a valid QEMU id.
    #[error(transparent)]
    Id(#[from] QemuError),
    /// A device has no functions, more than 8, or two with the same number.
    #[error("device `{device}`: {why}")]
    Functions {
        /// Device id.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// The resources do not form a valid requirement.
    #[error("device `{device}`: {source}")]
    Requirement {
        /// Device id (or profile name).
        device: String,
        /// The underlying error.
        source: RequirementError,
    },
    /// A host function has BARs of unknown size (a config-space dump carries no sizes).
    #[error("host function {bdf}: size of {what} unknown (read it from sysfs or VFIO)")]
    UnknownSize {
        /// Host function.
        bdf: Bdf,
        /// Which BARs (`BAR 0, VF BAR 2`).
        what: String,
    },
    /// A resource is larger than any platform can address: memory beyond
    /// `1 << MAX_PHYS_BITS` bytes ([`crate::units::MAX_PHYS_BITS`]), I/O beyond
    /// [`crate::units::MAX_IO_SIZE`].
    #[error("device `{device}`: a resource of {} ({size:#x} bytes) is larger than any platform addresses ({limit:#x} bytes)", fmt_size(*.size))]
    TooLarge {
        /// Device id (or profile name).
        device: String,
        /// Size (or alignment) of the resource.
        size: u64,
        /// The most a resource of its kind can have.
        limit: u64,
    },
    /// A channel device asks for a subchannel set other than 0–3.
    #[error("device `{device}`: subchannel set {ssid} does not exist (0-3)")]
    Ssid {
        /// Device id.
        device: String,
        /// The subchannel set asked for.
        ssid: u8,
    },
    /// A profile text could not be read.
    #[error("profile `{0}`: expected a known name (h100, a100, nvswitch, nic) or a list like `16M:mem32,128G:pref64`")]
    Profile(String),
}

/// Where a function comes from on the host.
///
/// In JSON: `{"pci": "0000:01:00.0"}` (the address in its sysfs text form) or
/// `{"sysfsdev": "/sys/bus/mdev/devices/…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum HostRef {
    /// A host PCI function, passed as `vfio-pci,host=`. (Requests written before it was
    /// typed said `{"bdf": "0000:01:00.0"}`; that still reads.)
    #[serde(alias = "bdf")]
    Pci(Bdf),
    /// A sysfs device path, passed as `sysfsdev=` (vfio-pci, vfio-ccw, mdev, vfio-ap).
    Sysfsdev(String),
}

/// What a [`FunctionResource`] stands for, and so what the guest will show of it.
///
/// A planner reserves room for all three; only a [`ResourceRole::Bar`] appears in the
/// guest (and in QEMU's `query-pci`) at the planned size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ResourceRole {
    /// A BAR or the expansion ROM at the size the function has now: the guest sees it at
    /// its index with this size.
    #[default]
    Bar,
    /// Room for the SR-IOV VFs' BAR at the index (VF BAR size times TotalVFs,
    /// [`ResourceOptions::include_sriov_vfs`]). It belongs to the physical function's SR-IOV
    /// capability, not to its BARs, and QEMU's `vfio-pci` hides that capability from the
    /// guest: `query-pci` never shows it.
    VfAperture,
    /// A resizable BAR planned at its largest supported size
    /// ([`ResourceOptions::rebar_max`]). QEMU 7.2's `vfio-pci` does not expose the
    /// Resizable BAR capability, so the guest sees the BAR at `current` bytes.
    ResizableMax {
        /// The BAR's size now (what the guest sees).
        current: u64,
    },
}

impl ResourceRole {
    /// Whether this is [`ResourceRole::Bar`].
    pub fn is_bar(&self) -> bool {
        *self == ResourceRole::Bar
    }
}

/// One address-space resource of a function: what the port's windows must hold
/// ([`Resource`]), the BAR index it sits at and what it stands for.
///
/// In JSON the resource's members sit next to `index` and `role`, so a plain
/// [`Resource`] reads as a BAR of unknown index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionResource {
    /// Kind, prefetchability, size and alignment, as the window rule needs them.
    #[serde(flatten)]
    pub resource: Resource,
    /// BAR index (0–5; [`FunctionResource::ROM`] for the expansion ROM; for a VF aperture
    /// the VF BAR's index). `None` when whoever built the request does not know it; the
    /// guest is then checked for a BAR of that size at any index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u8>,
    /// What the entry stands for.
    #[serde(default, skip_serializing_if = "ResourceRole::is_bar")]
    pub role: ResourceRole,
}

impl From<Resource> for FunctionResource {
    /// A BAR of unknown index (the ROM at [`FunctionResource::ROM`]) as the function has it now.
    fn from(resource: Resource) -> Self {
        FunctionResource {
            resource,
            index: resource.rom.then_some(FunctionResource::ROM),
            role: ResourceRole::Bar,
        }
    }
}

impl FunctionResource {
    /// The index PCI gives the expansion ROM (the one after BAR 5).
    pub const ROM: u8 = 6;

    /// BAR `index` of `size` bytes (a power of two) at its natural alignment.
    pub fn bar(index: u8, kind: BarKind, prefetchable: bool, size: u64) -> Self {
        FunctionResource::at(index, Resource::bar(kind, prefetchable, size))
    }

    /// An expansion ROM of `size` bytes (a power of two).
    pub fn rom(size: u64) -> Self {
        FunctionResource::from(Resource { rom: true, ..Resource::bar(BarKind::Mem32, false, size) })
    }

    /// `resource` as the BAR at `index`, at the size the function has now.
    pub fn at(index: u8, resource: Resource) -> Self {
        FunctionResource { resource, index: Some(index), role: ResourceRole::Bar }
    }

    /// The resources of a host function that `opts` selects, each with its index and role:
    /// BARs of known size (at their largest resizable size with `rebar_max`, when larger),
    /// the ROM (`include_rom`), the SR-IOV VF BAR apertures (`include_sriov_vfs`). Same
    /// resources, in the same order, as pcilibs' [`FunctionFacts::resources`]; a VF
    /// aperture whose size does not fit 64 bits is [`RequestError::Requirement`] with
    /// [`RequirementError::Overflow`].
    pub fn of_facts(
        facts: &FunctionFacts,
        opts: &ResourceOptions,
    ) -> Result<Vec<FunctionResource>, RequestError> {
        let mut out = Vec::with_capacity(facts.bars.len() + 1);
        for b in &facts.bars {
            let Some(size) = b.size else { continue };
            let max = if opts.rebar_max { rebar_max(facts, b).filter(|m| *m > size) } else { None };
            out.push(match max {
                Some(max) => FunctionResource {
                    resource: Resource::bar(b.kind, b.prefetchable, max),
                    index: Some(b.index),
                    role: ResourceRole::ResizableMax { current: size },
                },
                None => FunctionResource::bar(b.index, b.kind, b.prefetchable, size),
            });
        }
        if opts.include_rom {
            if let Some(size) = facts.rom_size {
                out.push(FunctionResource::rom(size));
            }
        }
        if opts.include_sriov_vfs {
            if let Some(s) = facts.sriov.as_ref().filter(|s| s.total_vfs > 0) {
                for b in &s.vf_bars {
                    let Some(size) = b.size else { continue };
                    let total = size.checked_mul(u64::from(s.total_vfs)).ok_or_else(|| {
                        RequestError::Requirement {
                            device: facts.bdf.to_string(),
                            source: RequirementError::Overflow,
                        }
                    })?;
                    out.push(FunctionResource {
                        resource: Resource {
                            kind: b.kind,
                            prefetchable: b.prefetchable,
                            rom: false,
                            size: total,
                            align: size,
                        },
                        index: Some(b.index),
                        role: ResourceRole::VfAperture,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The size the guest sees for this entry once the function is plugged (QEMU's
    /// `query-pci` included): the size for a BAR or ROM, the current size for a resizable
    /// BAR planned at its maximum, `None` for a VF aperture.
    pub fn visible_size(&self) -> Option<u64> {
        visible_size(self.role, self.resource.size)
    }
}

/// See [`FunctionResource::visible_size`].
pub(crate) fn visible_size(role: ResourceRole, size: u64) -> Option<u64> {
    match role {
        ResourceRole::Bar => Some(size),
        ResourceRole::ResizableMax { current } => Some(current),
        ResourceRole::VfAperture => None,
    }
}

/// The largest size a resizable memory BAR supports, as pcilibs sizes it.
fn rebar_max(facts: &FunctionFacts, b: &Bar) -> Option<u64> {
    if b.kind == BarKind::Io {
        return None;
    }
    facts.rebar.iter().find(|r| r.bar == b.index).and_then(|r| r.supported_sizes.iter().copied().max())
}

/// One function of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionRequest {
    /// Function number on the device (0..=7); function 0 must exist.
    pub function: u8,
    /// QEMU driver for this function (`vfio-pci`, `ivshmem-plain`, `virtio-net-pci`, …).
    pub driver: String,
    /// Driver properties other than id/bus/addr/multifunction (e.g. `memdev`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub props: BTreeMap<String, PropValue>,
    /// Objects this function needs created first (e.g. a memory backend).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<QemuObject>,
    /// Host function passed through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostRef>,
    /// Address-space resources: BARs, ROM, SR-IOV VF apertures, each with its index and role.
    pub resources: Vec<FunctionResource>,
    /// The function has a PCI Express capability (false: a conventional PCI function). It
    /// does not decide where the device goes: see [`DeviceRequest::attach`].
    #[serde(default = "yes")]
    pub pcie: bool,
    /// 24-bit class code, when known (`0x030200` for a 3D controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<u32>,
}

fn yes() -> bool {
    true
}

impl FunctionRequest {
    /// A function with a driver and resources, PCIe, no host reference.
    pub fn new(function: u8, driver: &str, resources: Vec<FunctionResource>) -> Self {
        FunctionRequest {
            function,
            driver: driver.to_string(),
            props: BTreeMap::new(),
            objects: Vec::new(),
            host: None,
            resources,
            pcie: true,
            class: None,
        }
    }

    /// A `vfio-pci` function for host function `bdf` with the given resources (`host=`
    /// names it in the `-device`/`device_add` arguments).
    pub fn vfio(function: u8, bdf: Bdf, resources: Vec<FunctionResource>) -> Self {
        let mut f = FunctionRequest::new(function, "vfio-pci", resources);
        f.props.insert("host".into(), PropValue::Str(bdf.to_string()));
        f.host = Some(HostRef::Pci(bdf));
        f
    }

    /// This function passing through the host device at `sysfsdev` (a sysfs path: a
    /// mediated device, a `vfio-ccw` subchannel), passed as `sysfsdev=`.
    pub fn with_sysfsdev(mut self, sysfsdev: &str) -> Self {
        self.props.insert("sysfsdev".into(), PropValue::Str(sysfsdev.to_string()));
        self.host = Some(HostRef::Sysfsdev(sysfsdev.to_string()));
        self
    }

    /// An `ivshmem-plain` GPU stand-in: one 64-bit prefetchable BAR of `size` bytes backed
    /// by a RAM backend with `reserve=off` (no host memory used), plus its 256-byte BAR 0.
    /// `ivshmem-plain` has its registers at BAR 0 and the shared memory at BAR 2.
    pub fn ivshmem(function: u8, device_id: &QemuId, size: u64) -> Result<Self, QemuError> {
        let mem_id = QemuId::new(format!("{device_id}-mem{function}"))?;
        let mut f = FunctionRequest::new(
            function,
            "ivshmem-plain",
            vec![
                FunctionResource::bar(0, BarKind::Mem32, false, 256),
                FunctionResource::bar(2, BarKind::Mem64, true, size),
            ],
        );
        f.props.insert("memdev".into(), PropValue::Str(mem_id.to_string()));
        f.objects.push(QemuObject::unbacked_ram(mem_id, size));
        Ok(f)
    }
}

impl FunctionRequest {
    /// A `vfio-pci` function for a host function described by pcilibs, with the resources
    /// `opts` selects (ROM, SR-IOV VF apertures, largest resizable BAR sizes), each at the
    /// index the facts give it ([`FunctionResource::of_facts`]).
    pub fn from_facts(
        function: u8,
        facts: &FunctionFacts,
        opts: &ResourceOptions,
    ) -> Result<Self, RequestError> {
        let unknown = facts.unknown_sizes(opts);
        if !unknown.is_empty() {
            let what: Vec<String> =
                unknown.iter().map(|(i, vf)| format!("{}BAR {i}", if *vf { "VF " } else { "" })).collect();
            return Err(RequestError::UnknownSize { bdf: facts.bdf, what: what.join(", ") });
        }
        let mut f = FunctionRequest::vfio(function, facts.bdf, FunctionResource::of_facts(facts, opts)?);
        f.pcie = facts.is_pcie;
        f.class = Some(facts.class_code);
        Ok(f)
    }
}

/// What a device is plugged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Attach {
    /// A hotpluggable PCIe port — a root port or a switch downstream port — whose windows
    /// the planner can size, whether or not the functions have a PCI Express capability.
    /// QEMU accepts a conventional PCI device (`ivshmem-plain`, a conventional host
    /// function under `vfio-pci`) on such a port and Linux drives it there. On a platform
    /// without ports ([`Addressing::Zpci`](crate::platform::Addressing::Zpci), s390x) the
    /// device is a zPCI function of its own.
    #[default]
    Port,
    /// A slot of a PCIe-to-PCI bridge, for a legacy device that needs a conventional bus.
    /// QEMU 7.2's `pcie-pci-bridge` has no `*-reserve` properties; firmware sizes its
    /// windows from the devices present at boot, so a device hotplugged behind it gets
    /// only what an empty bridge gets (see `PlanError::BridgeWindow`).
    PciBridge,
    /// The channel subsystem (s390x): a `virtio-*-ccw` or `vfio-ccw` device, which gets a
    /// device number in subchannel set `ssid` (0–3). Only on a platform with
    /// [`Addressing::Zpci`](crate::platform::Addressing::Zpci).
    Channel {
        /// Subchannel set.
        ssid: u8,
    },
    /// The adjunct-processor bus (s390x `vfio-ap`): no guest address.
    Ap,
}

impl Attach {
    fn is_port(&self) -> bool {
        *self == Attach::Port
    }
}

/// A device to place: every function of it lands on one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceRequest {
    /// QEMU id of function 0; function `n` of the device gets `<id>-f<n>`
    /// ([`crate::plan::function_id`]).
    pub id: QemuId,
    /// All functions (function 0 included).
    pub functions: Vec<FunctionRequest>,
    /// Peer-to-peer group: devices of one group go behind one switch in switch-port mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_group: Option<String>,
    /// Host IOMMU group, when known (all members must be placed together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// Host NUMA node, when known (NUMA mode puts the device on that node's expander).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Plug at boot (`-device`) instead of hotplugging it once the guest runs.
    #[serde(default)]
    pub cold_plug: bool,
    /// What the device is plugged into: a PCIe port unless it needs a conventional bus.
    #[serde(default, skip_serializing_if = "Attach::is_port")]
    pub attach: Attach,
    /// The id the runtime knows the device by, when that is not a valid QEMU id (Kata's
    /// hex device ids): the plan keeps it with the device, so either finds the other
    /// ([`crate::Plan::device_by_runtime_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_id: Option<String>,
}

impl DeviceRequest {
    /// A device with the given functions, hotplugged, no group or node.
    pub fn new(id: QemuId, functions: Vec<FunctionRequest>) -> Self {
        DeviceRequest {
            id,
            functions,
            p2p_group: None,
            iommu_group: None,
            numa_node: None,
            cold_plug: false,
            attach: Attach::Port,
            runtime_id: None,
        }
    }

    /// This device known to the runtime as `runtime_id` (kept in the plan with it).
    pub fn with_runtime_id(mut self, runtime_id: impl Into<String>) -> Self {
        self.runtime_id = Some(runtime_id.into());
        self
    }

    /// A channel device (s390x) of `driver` (`virtio-net-ccw`, `vfio-ccw`, …) with no other
    /// properties, its device number allocated in subchannel set `ssid` (0–3).
    pub fn channel(id: QemuId, driver: &str, ssid: u8) -> Self {
        let mut d = DeviceRequest::new(id, vec![FunctionRequest::new(0, driver, Vec::new())]);
        d.attach = Attach::Channel { ssid };
        d
    }

    /// A `vfio-ap` matrix device (s390x): its mediated device's sysfs path
    /// (`/sys/devices/vfio_ap/matrix/<uuid>`), passed as `sysfsdev=`.
    pub fn vfio_ap(id: QemuId, sysfsdev: &str) -> Self {
        let f = FunctionRequest::new(0, "vfio-ap", Vec::new()).with_sysfsdev(sysfsdev);
        let mut d = DeviceRequest::new(id, vec![f]);
        d.attach = Attach::Ap;
        d
    }

    /// A single-function ivshmem GPU stand-in with one `size`-byte prefetchable BAR.
    pub fn ivshmem(id: &str, size: u64) -> Result<Self, RequestError> {
        let id = QemuId::new(id)?;
        let f = FunctionRequest::ivshmem(0, &id, size)?;
        Ok(DeviceRequest::new(id, vec![f]))
    }

    /// One guest device for host functions that must go together (the functions of one
    /// host device, or the members of one IOMMU group).
    ///
    /// Guest function numbers ([`guest_function_numbers`]): functions of one host slot
    /// keep their numbers when host function 0 is among them (a GPU's function 0 and its
    /// audio function 1 stay 0 and 1); without host function 0 — a lone SR-IOV VF, or VFs
    /// of one slot — they are numbered 0, 1, … in host function order, because a guest
    /// device needs a function 0. Functions from several slots are numbered 0, 1, … in the
    /// order given. Each function keeps its host address in [`FunctionRequest::host`];
    /// [`DeviceRequest::host_functions`] lists the host → guest mapping. IOMMU group and
    /// NUMA node come from the first function.
    pub fn from_facts(
        id: QemuId,
        functions: &[FunctionFacts],
        opts: &ResourceOptions,
    ) -> Result<Self, RequestError> {
        let first = functions.first().ok_or_else(|| RequestError::Functions {
            device: id.to_string(),
            why: "no host functions".into(),
        })?;
        let mut out = Vec::new();
        for (facts, number) in functions.iter().zip(guest_function_numbers(functions)) {
            out.push(FunctionRequest::from_facts(number, facts, opts)?);
        }
        let mut d = DeviceRequest::new(id, out);
        d.iommu_group = first.iommu_group;
        d.numa_node = first.numa_node;
        d.validate()?;
        Ok(d)
    }

    /// Host function → guest function number, for every function passed through, in
    /// function order of the request.
    pub fn host_functions(&self) -> Vec<(&HostRef, u8)> {
        self.functions.iter().filter_map(|f| f.host.as_ref().map(|h| (h, f.function))).collect()
    }

    /// Checks function numbers (0 present, unique, at most 8) and that the resources are valid.
    pub fn validate(&self) -> Result<(), RequestError> {
        let err = |why: &str| RequestError::Functions { device: self.id.to_string(), why: why.to_string() };
        if self.functions.is_empty() {
            return Err(err("no functions"));
        }
        if self.functions.len() > 8 {
            return Err(err("more than 8 functions"));
        }
        let mut seen = [false; 8];
        for f in &self.functions {
            let slot = seen.get_mut(usize::from(f.function)).ok_or_else(|| err("function number above 7"))?;
            if *slot {
                return Err(err("two functions with the same number"));
            }
            *slot = true;
        }
        if !seen[0] {
            return Err(err("function 0 is missing"));
        }
        for f in &self.functions {
            check_indices(&f.resources).map_err(|why| err(&format!("function {}: {why}", f.function)))?;
        }
        self.requirement().map(|_| ())
    }

    /// All resources of all functions.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.functions.iter().flat_map(|f| f.resources.iter().map(|r| &r.resource))
    }

    /// What a port holding this device must forward; a resource larger than any platform
    /// addresses is [`RequestError::TooLarge`].
    pub fn requirement(&self) -> Result<Requirement, RequestError> {
        check_sizes(self.id.as_str(), self.resources())?;
        Requirement::of(self.resources())
            .map_err(|source| RequestError::Requirement { device: self.id.to_string(), source })
    }

    /// Whether every function is PCI Express.
    pub fn is_pcie(&self) -> bool {
        self.functions.iter().all(|f| f.pcie)
    }
}

/// Refuses resources larger than any platform addresses (sizes and alignments beyond
/// `1 << MAX_PHYS_BITS` bytes of memory or [`MAX_IO_SIZE`] of I/O): no window can hold them,
/// and refusing them here keeps every sum the planner makes far from 2^64.
pub(crate) fn check_sizes<'a>(
    name: &str,
    resources: impl IntoIterator<Item = &'a Resource>,
) -> Result<(), RequestError> {
    for r in resources {
        let limit = if r.kind == BarKind::Io { MAX_IO_SIZE } else { 1u64 << MAX_PHYS_BITS };
        let size = r.size.max(r.align);
        if size > limit {
            return Err(RequestError::TooLarge { device: name.to_string(), size, limit });
        }
    }
    Ok(())
}

/// Checks the BAR indices of one function's resources: BARs at 0–5 (a 64-bit BAR takes
/// its register and the next, so it cannot sit at 5), the ROM at [`FunctionResource::ROM`]
/// and nothing else there, no two resources on one register (the function's own BARs
/// and its VF BAR apertures counted apart: they are registers of different structures).
fn check_indices(resources: &[FunctionResource]) -> Result<(), String> {
    let mut own = [false; 7];
    let mut vf = [false; 6];
    for r in resources {
        let Some(index) = r.index else { continue };
        let rom = r.resource.rom;
        if rom != (index == FunctionResource::ROM) {
            return Err(format!("resource at index {index}: index 6 is the ROM's and only the ROM's"));
        }
        let start = usize::from(index);
        let end = start + if !rom && r.resource.kind == BarKind::Mem64 { 2 } else { 1 };
        let limit = if rom { own.len() } else { 6 };
        let registers: &mut [bool] = if r.role == ResourceRole::VfAperture { &mut vf } else { &mut own };
        let slots = registers.get_mut(start..end).filter(|_| end <= limit).ok_or_else(|| {
            format!("BAR {index} ({} registers) does not fit BAR registers 0-5", end - start)
        })?;
        if slots.iter().any(|taken| *taken) {
            return Err(format!("BAR {index}: two resources on one BAR register"));
        }
        slots.fill(true);
    }
    Ok(())
}

/// The guest function number of each host function of one guest device, in the order
/// given (see [`DeviceRequest::from_facts`]).
///
/// One host slot with function 0 among the functions: the host numbers. One slot without
/// function 0 (SR-IOV VFs passed through alone or together): 0, 1, … in host function
/// order. Several slots: 0, 1, … in the order given. Numbers above 7 (more than 8
/// functions) are left for [`DeviceRequest::validate`] to reject.
pub fn guest_function_numbers(functions: &[FunctionFacts]) -> Vec<u8> {
    let slot = |f: &FunctionFacts| (f.bdf.domain(), f.bdf.bus(), f.bdf.device());
    let one_slot = functions.windows(2).all(|w| w.first().map(slot) == w.last().map(slot));
    let dense = |n: usize| u8::try_from(n).unwrap_or(u8::MAX);
    if !one_slot {
        return (0..functions.len()).map(dense).collect();
    }
    if functions.iter().any(|f| f.bdf.function() == 0) {
        return functions.iter().map(|f| f.bdf.function()).collect();
    }
    let mut host: Vec<u8> = functions.iter().map(|f| f.bdf.function()).collect();
    host.sort_unstable();
    host.dedup();
    functions
        .iter()
        .map(|f| dense(host.iter().position(|h| *h == f.bdf.function()).unwrap_or(usize::MAX)))
        .collect()
}

/// What a spare port must be ready to take later: the resources of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HotplugProfile {
    /// Short name shown in plans and explanations (`h100`, `custom`).
    pub name: String,
    /// Resources of the device the port must fit (indices where the profile knows them).
    pub resources: Vec<FunctionResource>,
}

impl HotplugProfile {
    /// A profile with the given resources.
    pub fn new(name: &str, resources: Vec<FunctionResource>) -> Self {
        HotplugProfile { name: name.to_string(), resources }
    }

    /// An H100-class GPU: 16 MiB 32-bit BAR 0, 128 GiB 64-bit prefetchable BAR 1 and
    /// 32 MiB 64-bit prefetchable BAR 3.
    pub fn h100() -> Self {
        HotplugProfile::nvidia_gpu("h100", 128 * GIB)
    }

    /// An A100-class GPU: 16 MiB 32-bit BAR 0, 64 GiB 64-bit prefetchable BAR 1 and
    /// 32 MiB 64-bit prefetchable BAR 3.
    pub fn a100() -> Self {
        HotplugProfile::nvidia_gpu("a100", 64 * GIB)
    }

    /// The BAR layout NVIDIA data-center GPUs share: registers at BAR 0, the frame buffer
    /// aperture at BAR 1, a 32 MiB BAR 3.
    fn nvidia_gpu(name: &str, aperture: u64) -> Self {
        HotplugProfile::new(
            name,
            vec![
                FunctionResource::bar(0, BarKind::Mem32, false, 16 * MIB),
                FunctionResource::bar(1, BarKind::Mem64, true, aperture),
                FunctionResource::bar(3, BarKind::Mem64, true, 32 * MIB),
            ],
        )
    }

    /// An NVSwitch function (class 0x0680): one 32 MiB 32-bit BAR 0.
    pub fn nvswitch() -> Self {
        HotplugProfile::new("nvswitch", vec![FunctionResource::bar(0, BarKind::Mem32, false, 32 * MIB)])
    }

    /// A typical NIC function: 16 KiB and 64 KiB 64-bit non-prefetchable BARs (no
    /// particular device, so no indices).
    pub fn nic() -> Self {
        HotplugProfile::new(
            "nic",
            vec![
                Resource::bar(BarKind::Mem64, false, 64 << 10).into(),
                Resource::bar(BarKind::Mem64, false, 16 << 10).into(),
            ],
        )
    }

    /// A profile from the resources of a device (of all its functions).
    pub fn of_device(device: &DeviceRequest) -> Self {
        let resources = device.functions.iter().flat_map(|f| f.resources.iter().copied()).collect();
        HotplugProfile::new(device.id.as_str(), resources)
    }

    /// Parses a known name (`h100`, `a100`, `nvswitch`, `nic`) or a list of
    /// `SIZE:KIND` items with KIND one of `mem32`, `pref32`, `mem64`, `pref64`, `io`
    /// (`16M:mem32,128G:pref64,32M:pref64`; such a list has no BAR indices).
    pub fn parse(text: &str) -> Result<Self, RequestError> {
        match text {
            "h100" => return Ok(Self::h100()),
            "a100" => return Ok(Self::a100()),
            "nvswitch" => return Ok(Self::nvswitch()),
            "nic" => return Ok(Self::nic()),
            _ => {}
        }
        let bad = || RequestError::Profile(text.to_string());
        let mut resources = Vec::new();
        for item in text.split(',') {
            let (size, kind) = item.split_once(':').ok_or_else(bad)?;
            let size = parse_size(size).map_err(|_| bad())?;
            if !size.is_power_of_two() {
                return Err(bad());
            }
            let (kind, pref) = match kind {
                "mem32" => (BarKind::Mem32, false),
                "pref32" => (BarKind::Mem32, true),
                "mem64" => (BarKind::Mem64, false),
                "pref64" => (BarKind::Mem64, true),
                "io" => (BarKind::Io, false),
                _ => return Err(bad()),
            };
            resources.push(Resource::bar(kind, pref, size).into());
        }
        let p = HotplugProfile::new("custom", resources);
        p.requirement()?;
        Ok(p)
    }

    /// What a port reserved for this profile must forward; a resource larger than any
    /// platform addresses is [`RequestError::TooLarge`].
    pub fn requirement(&self) -> Result<Requirement, RequestError> {
        check_sizes(&self.name, self.resources.iter().map(|r| &r.resource))?;
        Requirement::of(self.resources.iter().map(|r| &r.resource))
            .map_err(|source| RequestError::Requirement { device: self.name.clone(), source })
    }

    /// One line listing the resources (`16M mem32 + 128G pref64 + 32M pref64`).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .resources
            .iter()
            .map(|r| &r.resource)
            .map(|r| {
                let kind = match (r.kind, r.prefetchable) {
                    (BarKind::Io, _) => "io",
                    (BarKind::Mem32, false) => "mem32",
                    (BarKind::Mem32, true) => "pref32",
                    (BarKind::Mem64, false) => "mem64",
                    (_, true) => "pref64",
                    _ => "mem",
                };
                format!("{} {kind}", fmt_size(r.size))
            })
            .collect();
        parts.join(" + ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse() {
        let p = HotplugProfile::parse("16M:mem32,128G:pref64,32M:pref64").unwrap();
        assert_eq!(p.requirement().unwrap(), HotplugProfile::h100().requirement().unwrap());
        assert!(HotplugProfile::parse("3M:mem32").is_err());
        assert!(HotplugProfile::parse("16M:weird").is_err());
        assert_eq!(HotplugProfile::h100().describe(), "16M mem32 + 128G pref64 + 32M pref64");
    }

    #[test]
    fn devices_are_validated() {
        let d = DeviceRequest::ivshmem("gpu0", 128 * GIB).unwrap();
        d.validate().unwrap();
        assert_eq!(d.requirement().unwrap().pref.size, 128 * GIB);
        let mut bad = d.clone();
        bad.functions[0].function = 1;
        assert!(bad.validate().is_err());
        assert!(DeviceRequest::ivshmem("0gpu", GIB).is_err());
    }

    /// An nvme-like function at `bdf` in IOMMU group `group`, with one 16 KiB BAR.
    fn nvme(bdf: &str, group: u32) -> FunctionFacts {
        use pcilibs::bar::Bar;
        let mut f = FunctionFacts::new(Bdf::parse(bdf).unwrap(), 0x1b36, 0x0010, 0x010802);
        f.revision = 2;
        f.is_pcie = true;
        f.bars = vec![Bar { index: 0, kind: BarKind::Mem64, prefetchable: false, size: Some(16 << 10) }];
        f.iommu_group = Some(group);
        f.driver = Some("vfio-pci".into());
        f
    }

    /// A GPU-like physical function: 16 MiB BAR 0, a resizable 64-bit prefetchable BAR 2
    /// (256 MiB now, up to 8 GiB), a 128 KiB ROM and 4 VFs, each with a 32-bit 64 KiB VF
    /// BAR 0 and a 64-bit prefetchable 32 MiB VF BAR 3. `opts` with everything on.
    fn sriov_rebar_pf() -> (FunctionFacts, ResourceOptions) {
        use pcilibs::bar::Bar;
        use pcilibs::facts::{RebarFacts, SriovFacts};
        let mut f = nvme("0000:07:00.0", 9);
        let bar = |index, kind, prefetchable, size| Bar { index, kind, prefetchable, size: Some(size) };
        f.bars = vec![bar(0, BarKind::Mem32, false, 16 * MIB), bar(2, BarKind::Mem64, true, 256 * MIB)];
        f.rom_size = Some(128 << 10);
        f.rebar = vec![RebarFacts::new(2, vec![256 * MIB, 512 * MIB, 8 * GIB], 256 * MIB)];
        let vf_bars = vec![bar(0, BarKind::Mem32, false, 64 << 10), bar(3, BarKind::Mem64, true, 32 * MIB)];
        f.sriov = Some(SriovFacts::new(4, 1, 1, 0x1234, vf_bars));
        let opts = ResourceOptions::all();
        (f, opts)
    }

    #[test]
    fn resources_from_facts_keep_the_index_and_say_what_they_stand_for() {
        let (facts, opts) = sriov_rebar_pf();
        let r = FunctionResource::of_facts(&facts, &opts).unwrap();
        // The same resources pcilibs lists, in its order.
        let plain: Vec<Resource> = r.iter().map(|r| r.resource).collect();
        assert_eq!(plain, facts.resources(&opts).unwrap());
        let tagged: Vec<(Option<u8>, ResourceRole, u64)> =
            r.iter().map(|r| (r.index, r.role, r.resource.size)).collect();
        assert_eq!(
            tagged,
            [
                (Some(0), ResourceRole::Bar, 16 * MIB),
                (Some(2), ResourceRole::ResizableMax { current: 256 * MIB }, 8 * GIB),
                (Some(6), ResourceRole::Bar, 128 << 10),
                (Some(0), ResourceRole::VfAperture, 4 * (64 << 10)),
                (Some(3), ResourceRole::VfAperture, 4 * 32 * MIB),
            ]
        );
        let visible: Vec<Option<u64>> = r.iter().map(FunctionResource::visible_size).collect();
        assert_eq!(visible, [Some(16 * MIB), Some(256 * MIB), Some(128 << 10), None, None]);
        // Without the options: the BARs as they are now, nothing else.
        let now = FunctionResource::of_facts(&facts, &ResourceOptions::default()).unwrap();
        let bars_now = [
            FunctionResource::bar(0, BarKind::Mem32, false, 16 * MIB),
            FunctionResource::bar(2, BarKind::Mem64, true, 256 * MIB),
        ];
        assert_eq!(now, bars_now);
        // A ReBAR maximum no larger than now is just the BAR.
        let mut small = facts.clone();
        small.rebar[0].supported_sizes = vec![128 * MIB, 256 * MIB];
        let r = FunctionResource::of_facts(&small, &opts).unwrap();
        assert_eq!(r[1], FunctionResource::bar(2, BarKind::Mem64, true, 256 * MIB));
        // The device request validates (VF BAR 0 and BAR 0 are different registers).
        let d = DeviceRequest::from_facts(QemuId::new("gpu").unwrap(), &[facts], &opts).unwrap();
        assert_eq!(d.functions[0].resources.len(), 5);
    }

    #[test]
    fn resource_json_is_a_resource_plus_index_and_role() {
        let (facts, opts) = sriov_rebar_pf();
        for r in FunctionResource::of_facts(&facts, &opts).unwrap() {
            let back: FunctionResource = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back, r);
        }
        // A plain resource (a request written before indices) reads as a BAR of unknown index.
        let plain = Resource::bar(BarKind::Mem64, true, GIB);
        let r: FunctionResource = serde_json::from_str(&serde_json::to_string(&plain).unwrap()).unwrap();
        assert_eq!(r, FunctionResource { resource: plain, index: None, role: ResourceRole::Bar });
        let text = serde_json::to_string(&FunctionResource::bar(2, BarKind::Mem64, true, GIB)).unwrap();
        assert!(text.contains(r#""index":2"#) && !text.contains("role"), "{text}");
    }

    /// A host function is written `{"pci": address}`; `{"bdf": address}`, as requests said
    /// before, still reads. Text that is not an address is refused.
    #[test]
    fn host_functions_in_json() {
        let pci = HostRef::Pci(Bdf::parse("0000:01:00.1").unwrap());
        assert_eq!(serde_json::to_string(&pci).unwrap(), r#"{"pci":"0000:01:00.1"}"#);
        for text in [r#"{"pci":"0000:01:00.1"}"#, r#"{"bdf":"0000:01:00.1"}"#] {
            assert_eq!(serde_json::from_str::<HostRef>(text).unwrap(), pci, "{text}");
        }
        assert!(serde_json::from_str::<HostRef>(r#"{"pci":"../../etc"}"#).is_err());
        let vmd = HostRef::Pci(Bdf::parse("10000:e1:00.0").unwrap());
        assert_eq!(serde_json::to_string(&vmd).unwrap(), r#"{"pci":"10000:e1:00.0"}"#);
    }

    #[test]
    fn bad_indices_are_refused() {
        let id = QemuId::new("dev").unwrap();
        let device =
            |resources| DeviceRequest::new(id.clone(), vec![FunctionRequest::new(0, "x", resources)]);
        let mem32 = |i| FunctionResource::bar(i, BarKind::Mem32, false, 4096);
        let mem64 = |i| FunctionResource::bar(i, BarKind::Mem64, true, GIB);
        let ok = [
            vec![mem32(0), mem64(1), mem32(3), mem64(4), FunctionResource::rom(4096)],
            vec![mem32(5)],
            vec![mem64(0), FunctionResource { role: ResourceRole::VfAperture, ..mem64(0) }],
            vec![Resource::bar(BarKind::Mem32, false, 4096).into(), mem32(0)],
        ];
        for r in ok {
            device(r.clone()).validate().unwrap_or_else(|e| panic!("{r:?}: {e}"));
        }
        let bad = [
            (vec![mem64(5)], "does not fit"),
            (vec![mem32(6)], "index 6"),
            (vec![mem32(7)], "does not fit"),
            (vec![mem64(0), mem32(1)], "two resources"),
            (vec![mem32(2), mem32(2)], "two resources"),
            (vec![FunctionResource { index: Some(0), ..FunctionResource::rom(4096) }], "index 6"),
        ];
        for (r, why) in bad {
            let e = device(r.clone()).validate().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("function 0"), "{r:?}: {e}");
        }
    }

    #[test]
    fn stand_ins_and_profiles_know_their_indices() {
        let d = DeviceRequest::ivshmem("gpu0", GIB).unwrap();
        let at: Vec<(Option<u8>, u64)> =
            d.functions[0].resources.iter().map(|r| (r.index, r.resource.size)).collect();
        assert_eq!(at, [(Some(0), 256), (Some(2), GIB)]);
        let h100: Vec<Option<u8>> = HotplugProfile::h100().resources.iter().map(|r| r.index).collect();
        assert_eq!(h100, [Some(0), Some(1), Some(3)]);
        assert!(HotplugProfile::parse("16M:mem32").unwrap().resources.iter().all(|r| r.index.is_none()));
        assert_eq!(HotplugProfile::of_device(&d).resources, d.functions[0].resources);
    }

    fn numbers(d: &DeviceRequest) -> Vec<(String, u8)> {
        d.host_functions()
            .into_iter()
            .map(|(h, n)| match h {
                HostRef::Pci(b) => (b.to_string(), n),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_lone_vf_becomes_function_0() {
        let id = QemuId::new("vf").unwrap();
        for host in ["0000:03:00.2", "0000:03:00.1", "0000:03:01.7"] {
            let d = DeviceRequest::from_facts(id.clone(), &[nvme(host, 4)], &ResourceOptions::default())
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(numbers(&d), [(host.to_string(), 0)]);
            assert_eq!(d.functions[0].props["host"], PropValue::Str(host.into()));
            assert_eq!(d.iommu_group, Some(4));
        }
    }

    #[test]
    fn functions_of_one_slot_keep_or_close_up_their_numbers() {
        let id = QemuId::new("dev").unwrap();
        let opts = ResourceOptions::default();
        // Host function 0 present: the host numbers stay, gaps included.
        let d =
            DeviceRequest::from_facts(id.clone(), &[nvme("0000:02:00.2", 1), nvme("0000:02:00.0", 1)], &opts)
                .unwrap();
        assert_eq!(numbers(&d), [("0000:02:00.2".into(), 2), ("0000:02:00.0".into(), 0)]);
        // Without host function 0 (two VFs of one slot): 0, 1 in host function order,
        // whatever order they were given in.
        let d =
            DeviceRequest::from_facts(id.clone(), &[nvme("0000:02:00.5", 1), nvme("0000:02:00.3", 1)], &opts)
                .unwrap();
        assert_eq!(numbers(&d), [("0000:02:00.5".into(), 1), ("0000:02:00.3".into(), 0)]);
        // Several slots: 0, 1 in the order given.
        let d =
            DeviceRequest::from_facts(id.clone(), &[nvme("0000:05:00.1", 1), nvme("0000:04:00.3", 1)], &opts)
                .unwrap();
        assert_eq!(numbers(&d), [("0000:05:00.1".into(), 0), ("0000:04:00.3".into(), 1)]);
        // The same function twice is still an error, not a silent renumbering.
        let err = DeviceRequest::from_facts(id, &[nvme("0000:02:00.3", 1), nvme("0000:02:00.3", 1)], &opts)
            .unwrap_err();
        assert!(err.to_string().contains("same number"), "{err}");
    }
}

//! The plan: boot-time port devices, hotplug actions and expected guest locations.
//!
//! A [`Plan`] is plain data: serialize it with [`Plan::to_json`] (same plan, same bytes),
//! keep it next to the VM, and [`Plan::from_json`] it after a restart. The hotplug engine
//! asks it for [`HotplugAction`]s, which carry the exact `device_add` / `object-add`
//! argument objects and what the guest must then show.

use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::requirement::{Requirement, RequirementError, Resource};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AddressSpaceError, PlanError};
use crate::foreign::{Foreign, MemoryHotplug, PlacedForeign};
use crate::format::{upgrade, PLAN_VERSION, PLAN_VERSION_OLDEST};
use crate::path::GuestPciPath;
use crate::planner::{check_attach, zpci};
use crate::platform::{Addressing, ExtraArgs, PlatformSpec};
use crate::qemu::{DevFn, PropValue, QemuDevice, QemuId, QemuObject};
use crate::request::{
    visible_size, Attach, DeviceRequest, FunctionResource, HostRef, HotplugProfile, RequestError,
    ResourceRole,
};
use crate::reserve::WindowReservation;
use crate::sim::PlacedWindow;
use crate::units::{fmt_size, human_size};

/// Placement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Mode {
    /// One root port per device (all functions of a device on it).
    #[default]
    RootPort,
    /// Devices of one peer-to-peer group behind one switch; others on root ports.
    SwitchPort,
    /// One `pxb-pcie` expander per host NUMA node; devices on their node's expander
    /// (peer-to-peer groups still share a switch).
    Numa,
}

/// A root bus: `pcie.0` or a `pxb-pcie` expander.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostBridge {
    /// Bus id (`pcie.0`, or the expander's id).
    pub id: String,
    /// Root bus number (0 for `pcie.0`, `bus_nr` for an expander).
    pub bus_nr: u8,
    /// Last bus number of this root's range (the next expander starts above it).
    pub last_bus: u8,
    /// NUMA node of an expander.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// The expander's `-device` (on `pcie.0`); `None` for `pcie.0` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<QemuDevice>,
}

/// Kind of a place a device can go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PortKind {
    /// A `pcie-root-port`.
    Root,
    /// A switch downstream port.
    Downstream,
    /// A slot of a PCIe-to-PCI bridge (devices that need a conventional bus).
    BridgeSlot,
}

/// The windows a port reserves and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reservation {
    /// What the port is for (`device gpu0`, `spare: h100 (16M mem32 + 128G pref64 + 32M pref64)`).
    pub purpose: String,
    /// What must fit (pcilibs requirement of the device, profile or switch below).
    pub need: Requirement,
    /// 32-bit non-prefetchable window the guest gets.
    pub mem: WindowReservation,
    /// 64-bit prefetchable window the guest gets.
    pub pref: WindowReservation,
    /// I/O window the guest gets.
    pub io: WindowReservation,
    /// Extra bus numbers below the port.
    pub bus_reserve: u8,
    /// One explanation per window and property.
    pub why: Vec<String>,
}

impl Reservation {
    /// Whether a device needing `need` fits these windows wherever the firmware placed them.
    pub fn holds(&self, need: &Requirement) -> bool {
        self.mem.holds(&need.mem) && self.pref.holds(&need.pref) && self.io.holds(&need.io)
    }
}

/// Boot-time devices that make the firmware size a switch downstream port's windows.
///
/// `xio3130-downstream` has no `*-reserve` properties, and firmware sizes a port's windows
/// from what is plugged at boot only. A placeholder — `ivshmem-plain` functions backed by
/// `memory-backend-ram,reserve=off`, one per prefetchable BAR of the profile, so no host
/// memory is used, plus on x86 a `qxl` function whose RAM BAR stands in for the profile's
/// 32-bit BARs — is plugged at boot and removed before the first hotplug on the port; the
/// window the firmware gave it stays assigned to the port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Placeholder {
    /// Memory backends of the placeholder functions.
    pub objects: Vec<QemuObject>,
    /// Placeholder functions (function 0 last is not needed at boot; order is by function).
    pub devices: Vec<QemuDevice>,
    /// True while the placeholder is plugged; false once a hotplug action removed it.
    pub present: bool,
}

/// A place for one device: a root port, a downstream port or a bridge slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Port {
    /// Id of the port device (for a bridge slot: `<bridge id>` plus the slot).
    pub id: QemuId,
    /// Kind.
    pub kind: PortKind,
    /// The port's `-device` (for a bridge slot: `None`, the bridge is in [`Plan::bridges`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<QemuDevice>,
    /// Bus id a device plugged here gets as `bus=`.
    pub target_bus: String,
    /// Slot a device plugged here gets as `addr=` (0 behind a port).
    pub target_slot: u8,
    /// Root bus this port belongs to.
    pub host_bridge: String,
    /// Switch upstream port above, for downstream ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<QemuId>,
    /// Guest address of the port itself (for a bridge slot: the bridge's).
    pub bdf: Bdf,
    /// Guest path of the port itself.
    pub path: GuestPciPath,
    /// Bus a device plugged here is on.
    pub secondary_bus: u8,
    /// Last bus number of the port's range.
    pub subordinate_bus: u8,
    /// Windows.
    pub reservation: Reservation,
    /// Hotplug profile of a spare port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<HotplugProfile>,
    /// Boot-time placeholder of a downstream port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<Placeholder>,
    /// Device now planned on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupant: Option<QemuId>,
    /// NUMA node (of the expander the port is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Peer-to-peer group of the switch the port is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_group: Option<String>,
}

/// A switch: upstream port on a root port, downstream ports below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Switch {
    /// Upstream port id.
    pub id: QemuId,
    /// The upstream port's `-device`.
    pub upstream: QemuDevice,
    /// Root port above.
    pub root_port: QemuId,
    /// Bus of the upstream port.
    pub bus: u8,
    /// Bus of the downstream ports.
    pub secondary_bus: u8,
    /// Peer-to-peer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_group: Option<String>,
}

/// A PCIe-to-PCI bridge for devices that need a conventional bus ([`Attach::PciBridge`]).
///
/// QEMU 7.2's `pcie-pci-bridge` has no `*-reserve` properties: firmware sizes its windows
/// from the devices plugged at boot, and an empty one gets only the firmware's minimum
/// (see [`PlanError::BridgeWindow`]). Devices are hotplugged into its slots through its
/// SHPC controller (or ACPI on q35).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PciBridge {
    /// Bridge id.
    pub id: QemuId,
    /// Its `-device`.
    pub device: QemuDevice,
    /// Its guest address.
    pub bdf: Bdf,
    /// Bus of the devices behind it.
    pub secondary_bus: u8,
    /// Memory window the bridge has for everything behind it. With a hotplugged device
    /// behind it: the firmware's minimum for an empty bridge, which prefetchable BARs share
    /// (firmware may open no prefetchable window there). Otherwise: what the boot-time
    /// devices' non-prefetchable BARs need.
    #[serde(default)]
    pub mem: WindowReservation,
    /// Prefetchable window: what the boot-time devices' prefetchable BARs need (empty
    /// when a device is hotplugged behind the bridge: those BARs count in `mem`).
    #[serde(default)]
    pub pref: WindowReservation,
    /// I/O window.
    #[serde(default)]
    pub io: WindowReservation,
}

/// A resource the plan made room for on a function, and what the guest will show of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExpectedBar {
    /// Address space.
    pub kind: BarKind,
    /// Prefetchable.
    pub prefetchable: bool,
    /// Expansion ROM.
    pub rom: bool,
    /// Size in bytes the plan made room for (see [`ExpectedBar::visible_size`] for what
    /// the guest shows).
    pub size: u64,
    /// BAR index (0–5, [`FunctionResource::ROM`] for the ROM, the VF BAR's index for a VF
    /// aperture); `None` when the request did not say (and in version 1 plans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u8>,
    /// What the entry stands for: a BAR as the guest will show it, an SR-IOV VF aperture,
    /// or a resizable BAR at its largest size.
    #[serde(default, skip_serializing_if = "ResourceRole::is_bar")]
    pub role: ResourceRole,
}

impl From<&FunctionResource> for ExpectedBar {
    fn from(r: &FunctionResource) -> Self {
        let FunctionResource { resource: res, index, role } = *r;
        ExpectedBar {
            kind: res.kind,
            prefetchable: res.prefetchable,
            rom: res.rom,
            size: res.size,
            index,
            role,
        }
    }
}

impl ExpectedBar {
    /// The size the guest (and QEMU's `query-pci`) shows for this entry once the function
    /// is plugged: `size` for a BAR or ROM, the current size for a resizable BAR planned at
    /// its largest, `None` for an SR-IOV VF aperture (not a BAR of the function there).
    pub fn visible_size(&self) -> Option<u64> {
        visible_size(self.role, self.size)
    }
}

/// One function of a placed device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlacedFunction {
    /// Function number.
    pub function: u8,
    /// Its `-device` / `device_add` (bus, addr and `multifunction` filled in).
    pub device: QemuDevice,
    /// Devices to add right before it (the s390x `zpci` device of a PCI function).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<QemuDevice>,
    /// Where the guest will see it.
    pub location: GuestLocation,
    /// Resources the plan made room for: the BARs the guest must show assigned (at their
    /// index and [`ExpectedBar::visible_size`]), SR-IOV VF apertures it will not show.
    pub bars: Vec<ExpectedBar>,
    /// Host function, if passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostRef>,
}

/// Where the guest sees a function.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "bus")]
#[non_exhaustive]
pub enum GuestLocation {
    /// A PCI function: predicted BDF and path.
    Pci {
        /// Predicted guest address (`query-pci` reports bus/slot/function).
        bdf: Bdf,
        /// Guest path (Kata agent form under `pcie.0`).
        path: GuestPciPath,
    },
    /// A channel device on the guest's ccw bus (`0.0.0042`).
    Ccw {
        /// Bus id in the guest (`0.<ssid>.<devno>`).
        busid: String,
    },
    /// An s390x zPCI function: the guest's PCI domain is the uid (`0001:00:00.0`).
    Zpci {
        /// zPCI uid.
        uid: u16,
        /// zPCI function id.
        fid: u32,
        /// Guest address (domain = uid).
        bdf: Bdf,
    },
    /// An adjunct-processor queue device (vfio-ap): no address in the guest's PCI or ccw bus.
    Ap,
}

impl GuestLocation {
    /// The guest address of a PCI or zPCI function.
    pub fn bdf(&self) -> Option<Bdf> {
        match self {
            GuestLocation::Pci { bdf, .. } | GuestLocation::Zpci { bdf, .. } => Some(*bdf),
            _ => None,
        }
    }

    /// The guest path of a PCI function.
    pub fn path(&self) -> Option<&GuestPciPath> {
        match self {
            GuestLocation::Pci { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// A device in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlacedDevice {
    /// Id (function 0's QEMU id).
    pub id: QemuId,
    /// Port it is on (`None` where the platform has no ports: s390x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<QemuId>,
    /// Plugged at boot.
    pub cold_plug: bool,
    /// Host IOMMU group (members are plugged and unplugged together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// Peer-to-peer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_group: Option<String>,
    /// Objects to create before the functions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<QemuObject>,
    /// Functions, by function number.
    pub functions: Vec<PlacedFunction>,
    /// What the device needs.
    pub need: Requirement,
    /// The id the runtime knows the device by ([`DeviceRequest::runtime_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_id: Option<String>,
}

impl PlacedDevice {
    /// Host function → guest function number, for every function passed through.
    pub fn host_functions(&self) -> Vec<(&HostRef, u8)> {
        self.functions.iter().filter_map(|f| f.host.as_ref().map(|h| (h, f.function))).collect()
    }
}

/// Address-space usage the plan was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AddressReport {
    /// 32-bit MMIO the windows need (packed).
    pub mmio32_needed: u64,
    /// 32-bit MMIO the machine has for PCI.
    pub mmio32_available: u64,
    /// I/O ports the windows need.
    pub io_needed: u64,
    /// I/O ports available.
    pub io_available: u64,
    /// 64-bit MMIO the windows need: packed by alignment, or, where the firmware lays
    /// them out end to end from where the plan says (SeaBIOS from 1.16.3 on), the region
    /// they take there.
    pub mmio64_needed: u64,
    /// Where the 64-bit aperture will be (`None`: no 64-bit window).
    pub mmio64_aperture: Option<crate::platform::Range>,
    /// One past the last byte of guest RAM.
    pub ram_end: u64,
    /// One past the device memory region QEMU makes for memory hotplug, when there is
    /// one: the 64-bit aperture starts above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_end: Option<u64>,
    /// Guest physical address bits the plan needs.
    pub phys_bits_needed: u8,
    /// Guest physical address bits the caller said the guest CPU has.
    pub guest_phys_bits: Option<u8>,
    /// Host physical address bits (from KVM or /proc/cpuinfo), when known.
    pub host_phys_bits: Option<u8>,
}

/// Options of the planner that are kept with the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlanOptions {
    /// Guest RAM in bytes (decides how much RAM sits above 4 GiB).
    pub guest_ram: u64,
    /// Guest CPU physical address bits, when fixed by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_phys_bits: Option<u8>,
    /// Host physical address bits, when known (see [`crate::physbits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_phys_bits: Option<u8>,
    /// Pack root ports 8 per slot as functions (`multifunction=on`).
    pub pack_root_ports: bool,
    /// Extra bus numbers for each spare root port (room for a switch hotplugged later).
    pub spare_bus_reserve: u8,
    /// Plug placeholders behind empty switch downstream ports so firmware sizes their windows.
    pub switch_placeholders: bool,
    /// First slot of the root bus to use. The plan accounts only for the devices it
    /// emits: start QEMU with `-nodefaults` (q35 otherwise puts a VGA device in slot 1 and
    /// a NIC in slot 2), or raise this past the slots other devices take.
    pub first_root_slot: u8,
    /// Size reservations from requirements (false: emit no `*-reserve`, the machine's
    /// defaults — used to show that the guest then fails with "no space").
    pub size_reservations: bool,
    /// Put every device with a function that has no PCI Express capability behind the
    /// PCIe-to-PCI bridge, as [`Attach::PciBridge`] does for one device. Off by default:
    /// such devices go on PCIe ports like any other, where their windows can be reserved.
    #[serde(default)]
    pub conventional_behind_bridge: bool,
    /// How `pxb-pcie` expanders get their root bus numbers.
    #[serde(default)]
    pub expander_buses: ExpanderBuses,
    /// The guest kernel numbers every bus itself (Linux `pci=assign-busses`, as Kata's
    /// NVIDIA configurations boot): the bus numbers of the plan's BDFs do not hold in the
    /// guest. Slots, functions, paths and the tree do; hotplug actions say so
    /// ([`HotplugAction::guest_renumbers_buses`]), so an engine checks a device by its
    /// place in the tree instead.
    #[serde(default)]
    pub guest_renumbers_buses: bool,
}

/// How `pxb-pcie` expanders get their root bus numbers (`bus_nr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ExpanderBuses {
    /// Each expander's root bus follows the last bus number of the root bus before it
    /// (pcie.0, then each expander in turn): as few bus numbers as possible.
    #[default]
    Packed,
    /// As Kata's runtime numbers them and its agent reads them: the expander of NUMA node
    /// `n` has root bus `0x20 * (n + 1)`, so a guest path whose first element is 0x20 or
    /// more names an expander's root complex (`20/00/00`, see
    /// [`crate::GuestPciPath::kata`]). Nodes 0 to 6 only (node 7 would need bus 0x100);
    /// pcie.0 and each expander keep within their 0x20 bus numbers.
    KataAgent,
}

impl PlanOptions {
    /// Whether `device` goes behind the PCIe-to-PCI bridge: it asks for a conventional bus,
    /// or it is conventional and [`PlanOptions::conventional_behind_bridge`] is set.
    pub fn behind_bridge(&self, device: &DeviceRequest) -> bool {
        device.attach == Attach::PciBridge || (self.conventional_behind_bridge && !device.is_pcie())
    }

    /// These options with `host_phys_bits` read from KVM or /proc/cpuinfo (see
    /// [`crate::physbits::host_phys_bits`]); unchanged when neither tells it.
    pub fn with_host_phys_bits(mut self) -> Self {
        if let Ok(h) = crate::physbits::host_phys_bits() {
            self.host_phys_bits = Some(h.bits);
        }
        self
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            guest_ram: 2 << 30,
            guest_phys_bits: None,
            host_phys_bits: None,
            pack_root_ports: false,
            spare_bus_reserve: 0,
            switch_placeholders: true,
            first_root_slot: 1,
            size_reservations: true,
            conventional_behind_bridge: false,
            expander_buses: ExpanderBuses::Packed,
            guest_renumbers_buses: false,
        }
    }
}

/// Spare ports for later hotplug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SpareRequest {
    /// What each spare port must be able to take.
    pub profile: HotplugProfile,
    /// How many ports.
    pub count: u32,
    /// Put them on this NUMA node's expander (NUMA mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Put them on the switch of this peer-to-peer group (switch-port and NUMA modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_group: Option<String>,
}

impl SpareRequest {
    /// `count` spare ports for `profile`, on no particular NUMA node or switch.
    pub fn new(profile: HotplugProfile, count: u32) -> Self {
        SpareRequest { profile, count, numa_node: None, p2p_group: None }
    }

    /// These spares on NUMA node `node`'s expander (NUMA mode).
    pub fn with_numa_node(mut self, node: u32) -> Self {
        self.numa_node = Some(node);
        self
    }

    /// These spares on the switch of peer-to-peer group `group` (switch-port and NUMA
    /// modes).
    pub fn with_p2p_group(mut self, group: impl Into<String>) -> Self {
        self.p2p_group = Some(group.into());
        self
    }
}

/// Everything the planner is asked.
///
/// ```
/// use pcie_topology::{DeviceRequest, HotplugProfile, Mode, PlanRequest, SpareRequest};
///
/// let mut request = PlanRequest::default()
///     .with_mode(Mode::SwitchPort)
///     .with_devices(vec![DeviceRequest::ivshmem("gpu0", 1 << 30)?])
///     .with_spares(vec![SpareRequest::new(HotplugProfile::h100(), 2).with_p2p_group("g0")]);
/// request.options.guest_ram = 8 << 30;
/// # Ok::<(), pcie_topology::request::RequestError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub struct PlanRequest {
    /// Placement policy.
    pub mode: Mode,
    /// Devices to place (cold-plugged or hotplugged later).
    pub devices: Vec<DeviceRequest>,
    /// Spare ports.
    pub spares: Vec<SpareRequest>,
    /// Options.
    pub options: PlanOptions,
    /// What else the VMM puts on the machine (its own devices on the root bus, memory
    /// hotplug).
    #[serde(default, skip_serializing_if = "Foreign::is_empty")]
    pub foreign: Foreign,
}

impl PlanRequest {
    /// This request planned around what else the VMM puts on the machine.
    pub fn with_foreign(mut self, foreign: Foreign) -> Self {
        self.foreign = foreign;
        self
    }

    /// This request with placement policy `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// This request with `devices` to place.
    pub fn with_devices(mut self, devices: Vec<DeviceRequest>) -> Self {
        self.devices = devices;
        self
    }

    /// This request with `spares`.
    pub fn with_spares(mut self, spares: Vec<SpareRequest>) -> Self {
        self.spares = spares;
        self
    }

    /// This request with `options`.
    pub fn with_options(mut self, options: PlanOptions) -> Self {
        self.options = options;
        self
    }
}

/// Steps that must happen before the first hotplug onto a port with a placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlaceholderRemoval {
    /// `device_del` these (function 0 removes the slot; wait for `DEVICE_DELETED` of each).
    pub device_del: Vec<QemuId>,
    /// Then `object-del` these.
    pub object_del: Vec<QemuId>,
}

/// One function to `device_add`, with what the guest must show afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionAction {
    /// Function number.
    pub function: u8,
    /// `device_add` these first (the s390x `zpci` device of a PCI function).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<QemuDevice>,
    /// The device to `device_add` ([`QemuDevice::to_qmp`] gives the QMP arguments).
    pub device_add: QemuDevice,
    /// Where the guest must then show it.
    pub guest: GuestLocation,
    /// The function's planned resources ([`PlacedFunction::bars`]): each BAR the guest must
    /// show, where [`ExpectedBar::visible_size`] says it shows one.
    pub bars: Vec<ExpectedBar>,
    /// The host function passed through ([`PlacedFunction::host`]), typed: the same
    /// function `device_add`'s `host=` or `sysfsdev=` names, for the checks a runtime runs
    /// before the plug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostRef>,
}

impl FunctionAction {
    /// QEMU id of the function (its `device_add`'s).
    pub fn id(&self) -> &QemuId {
        &self.device_add.id
    }
}

/// Everything the hotplug engine needs to plug one device (all its functions) and to
/// unplug it again.
///
/// Everything in it is typed ([`QemuDevice`], [`QemuObject`], [`QemuId`]); the engine
/// turns it into QMP arguments when it sends them ([`QemuDevice::to_qmp`],
/// [`QemuObject::to_qmp`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HotplugAction {
    /// Device id: what [`Plan::release`] takes, and what the engine unplugs by.
    pub device: QemuId,
    /// Port it goes on (`None` on s390x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<QemuId>,
    /// Host IOMMU group (other devices of the group must be plugged with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// Placeholder to remove first, when the port has one still plugged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_placeholder: Option<PlaceholderRemoval>,
    /// Objects to `object-add` before any function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object_add: Vec<QemuObject>,
    /// Functions in plug order: highest function first, function 0 last (the guest scans
    /// the slot when function 0 appears).
    pub functions: Vec<FunctionAction>,
    /// `device_del` order for unplug: function 0 (QEMU removes the whole slot), then any
    /// function still listed.
    pub unplug: Vec<QemuId>,
    /// `object-del` after the functions are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object_del: Vec<QemuId>,
    /// The port's windows, to check that every BAR landed inside them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Reservation>,
    /// The id the runtime knows the device by ([`PlacedDevice::runtime_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_id: Option<String>,
    /// The guest numbers buses itself ([`PlanOptions::guest_renumbers_buses`]): the bus
    /// of each function's planned address will not hold; its port, slot and function do.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_renumbers_buses: bool,
}

impl HotplugAction {
    /// The id the engine keeps the device under: the port it goes on, or the device
    /// itself where the platform has no ports (s390x). One device per port, so the
    /// device id ([`HotplugAction::device`], what [`Plan::release`] takes) finds it too.
    pub fn port_or_device(&self) -> &QemuId {
        self.port.as_ref().unwrap_or(&self.device)
    }

    /// The action with its `vfio-pci` functions on the iommufd VFIO interface (QEMU 9.0
    /// and Linux 6.6 on) instead of a VFIO container: an `iommufd` object `id` is created
    /// before the functions and deleted after them, and each `vfio-pci` function gets
    /// `iommufd=<id>`. With `fd`, QEMU takes `/dev/iommu` as the descriptor passed under
    /// that name (`getfd`) instead of opening it itself.
    pub fn with_iommufd(mut self, id: QemuId, fd: Option<&str>) -> Self {
        let mut object = QemuObject::new("iommufd", id.clone());
        if let Some(fd) = fd {
            object = object.prop("fd", fd);
        }
        self.object_add.insert(0, object);
        self.object_del.push(id.clone());
        for f in self.functions.iter_mut().filter(|f| f.device_add.driver == "vfio-pci") {
            f.device_add.props.insert("iommufd".into(), PropValue::Str(id.to_string()));
        }
        self
    }
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Plan {
    /// Format version ([`PLAN_VERSION`]).
    pub version: u32,
    /// The machine.
    pub platform: PlatformSpec,
    /// Placement policy.
    pub mode: Mode,
    /// Options used.
    pub options: PlanOptions,
    /// Root buses.
    pub host_bridges: Vec<HostBridge>,
    /// Switches.
    pub switches: Vec<Switch>,
    /// PCIe-to-PCI bridges.
    pub bridges: Vec<PciBridge>,
    /// Ports, in guest enumeration order.
    pub ports: Vec<Port>,
    /// Devices.
    pub devices: Vec<PlacedDevice>,
    /// Address-space check.
    pub address: AddressReport,
    /// Platform arguments derived from the totals.
    pub extra: ExtraArgs,
    /// The VMM's own devices on the root bus, where the plan expects them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<PlacedForeign>,
    /// Memory hotplug the plan was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<MemoryHotplug>,
}

impl Plan {
    /// JSON with a trailing newline; same plan, same bytes.
    pub fn to_json(&self) -> Result<String, PlanError> {
        let mut s = serde_json::to_string_pretty(self).map_err(|e| PlanError::Json(e.to_string()))?;
        s.push('\n');
        Ok(s)
    }

    /// Reads a plan written by [`Plan::to_json`], checking the format version first. A
    /// plan of an older version this build still reads ([`PLAN_VERSION_OLDEST`]) comes
    /// back as the current version, members it lacked at their defaults.
    pub fn from_json(text: &str) -> Result<Plan, PlanError> {
        let mut v: Value = serde_json::from_str(text).map_err(|e| PlanError::Json(e.to_string()))?;
        let found = v.get("version").and_then(Value::as_u64).unwrap_or(0);
        if !(u64::from(PLAN_VERSION_OLDEST)..=u64::from(PLAN_VERSION)).contains(&found) {
            return Err(PlanError::Version {
                found: u32::try_from(found).unwrap_or(u32::MAX),
                oldest: PLAN_VERSION_OLDEST,
                supported: PLAN_VERSION,
            });
        }
        if found < u64::from(PLAN_VERSION) {
            // `found` is within the u32 versions checked above.
            upgrade(&mut v, u32::try_from(found).unwrap_or(PLAN_VERSION))?;
        }
        let mut plan: Plan = serde_json::from_value(v).map_err(|e| PlanError::Json(e.to_string()))?;
        plan.version = PLAN_VERSION;
        Ok(plan)
    }

    /// Guest CPU `phys-bits` to set when the plan needs more than the machine's default.
    pub fn cpu_phys_bits(&self) -> Option<u8> {
        (self.address.phys_bits_needed > self.platform.default_phys_bits)
            .then_some(self.address.phys_bits_needed)
    }

    /// `-object`/`-device` arguments of everything plugged at boot, in enumeration order.
    pub fn device_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut dev = |d: &QemuDevice| {
            out.push("-device".to_string());
            out.push(d.to_arg());
        };
        for hb in &self.host_bridges {
            if let Some(d) = &hb.device {
                dev(d);
            }
        }
        for b in &self.bridges {
            dev(&b.device);
        }
        for p in &self.ports {
            if let Some(d) = &p.device {
                dev(d);
            }
            for s in self.switches.iter().filter(|s| s.root_port == p.id) {
                dev(&s.upstream);
            }
        }
        let mut objs = Vec::new();
        let mut devs = Vec::new();
        for p in &self.ports {
            if let Some(ph) = p.placeholder.as_ref().filter(|ph| ph.present) {
                objs.extend(ph.objects.iter().map(QemuObject::to_arg));
                devs.extend(ph.devices.iter().map(QemuDevice::to_arg));
            }
        }
        for d in self.devices.iter().filter(|d| d.cold_plug) {
            objs.extend(d.objects.iter().map(QemuObject::to_arg));
            for f in &d.functions {
                devs.extend(f.companions.iter().map(QemuDevice::to_arg));
                devs.push(f.device.to_arg());
            }
        }
        let mut args = Vec::new();
        for o in objs {
            args.push("-object".to_string());
            args.push(o);
        }
        args.extend(out);
        for d in devs {
            args.push("-device".to_string());
            args.push(d);
        }
        args
    }

    /// Full QEMU arguments for the machine part of the plan: `-machine`, firmware, the
    /// boot-time devices and the platform's extra arguments. The caller adds CPU
    /// ([`Plan::cpu_phys_bits`]), memory, accelerator, kernel and QMP socket.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args = vec!["-machine".to_string(), self.platform.machine.clone()];
        args.extend(self.platform.firmware_args.iter().cloned());
        args.extend(self.device_args());
        args.extend(self.extra.qemu.iter().cloned());
        args
    }

    /// Where the firmware will put each port's memory and prefetchable windows, as this
    /// crate simulates it: root ports' windows one after another from the base of the
    /// 32-bit hole and of the 64-bit aperture, largest guaranteed alignment first (then
    /// size), downstream ports' windows the same way inside their root port's. With
    /// [`crate::bars_fit`] it checks that a device's BARs fit where its windows land.
    /// [`AddressSpaceError::Overflow`] when a window would end past 2^64 (a plan file can
    /// say anything).
    pub fn window_layout(&self) -> Result<Vec<PlacedWindow>, AddressSpaceError> {
        crate::sim::layout(self)
    }

    /// Guest kernel arguments the platform needs (empty where firmware sizes windows).
    pub fn kernel_args(&self) -> &[String] {
        &self.extra.kernel
    }

    /// The port a device is on.
    pub fn port(&self, id: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.id.as_str() == id)
    }

    /// A device of the plan.
    pub fn device(&self, id: &str) -> Option<&PlacedDevice> {
        self.devices.iter().find(|d| d.id.as_str() == id)
    }

    /// The device the runtime knows as `runtime_id` ([`DeviceRequest::runtime_id`]).
    pub fn device_by_runtime_id(&self, runtime_id: &str) -> Option<&PlacedDevice> {
        self.devices.iter().find(|d| d.runtime_id.as_deref() == Some(runtime_id))
    }

    /// The hotplug action for a device of the plan.
    pub fn hotplug_action(&self, device: &str) -> Result<HotplugAction, PlanError> {
        let d = self.device(device).ok_or_else(|| PlanError::UnknownDevice(device.to_string()))?;
        let port = d.port.as_ref().and_then(|p| self.port(p.as_str()));
        let remove_placeholder =
            port.and_then(|p| p.placeholder.as_ref()).filter(|ph| ph.present).map(|ph| PlaceholderRemoval {
                device_del: ph
                    .devices
                    .iter()
                    .filter(|x| x.addr.is_some_and(|a| a.function() == 0))
                    .map(|x| x.id.clone())
                    .collect(),
                object_del: ph.objects.iter().map(|o| o.id.clone()).collect(),
            });
        let mut functions: Vec<FunctionAction> = d
            .functions
            .iter()
            .map(|f| FunctionAction {
                function: f.function,
                companions: f.companions.clone(),
                device_add: f.device.clone(),
                guest: f.location.clone(),
                bars: f.bars.clone(),
                host: f.host.clone(),
            })
            .collect();
        functions.sort_by_key(|f| std::cmp::Reverse(f.function));
        let mut unplug: Vec<QemuId> = Vec::new();
        for f in d.functions.iter() {
            unplug.push(f.device.id.clone());
            unplug.extend(f.companions.iter().map(|c| c.id.clone()));
        }
        Ok(HotplugAction {
            device: d.id.clone(),
            port: d.port.clone(),
            iommu_group: d.iommu_group,
            remove_placeholder,
            object_add: d.objects.clone(),
            functions,
            unplug,
            object_del: d.objects.iter().map(|o| o.id.clone()).collect(),
            windows: port.map(|p| p.reservation.clone()),
            runtime_id: d.runtime_id.clone(),
            guest_renumbers_buses: self.options.guest_renumbers_buses,
        })
    }

    /// Devices of the plan that share host IOMMU group `group` (plug and unplug them
    /// together: a group is only viable for VFIO when all its members are assigned).
    pub fn iommu_group_members(&self, group: u32) -> Vec<&QemuId> {
        self.devices.iter().filter(|d| d.iommu_group == Some(group)).map(|d| &d.id).collect()
    }

    /// Hotplug actions of every device that is not plugged at boot, in plan order.
    pub fn hotplug_actions(&self) -> Result<Vec<HotplugAction>, PlanError> {
        self.devices.iter().filter(|d| !d.cold_plug).map(|d| self.hotplug_action(d.id.as_str())).collect()
    }

    /// A text for people: every port, what it is for, and why each reservation has its size.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "platform {} ({}), mode {:?}\n",
            self.platform.name, self.platform.machine, self.mode
        ));
        for b in &self.bridges {
            out.push_str(&format!(
                "{} ({} at {}, secondary bus {:02x}): windows mem {}, pref {}, io {:#x} for the devices behind it\n",
                b.id,
                b.device.driver,
                b.bdf,
                b.secondary_bus,
                human_size(b.mem.size),
                human_size(b.pref.size),
                b.io.size
            ));
        }
        for p in &self.ports {
            let driver = p.device.as_ref().map_or("bridge slot", |d| d.driver.as_str());
            out.push_str(&format!(
                "{} ({driver} at {}, secondary bus {:02x}, path {}): {}\n",
                p.id, p.bdf, p.secondary_bus, p.path, p.reservation.purpose
            ));
            for why in &p.reservation.why {
                out.push_str(&format!("    {why}\n"));
            }
            if let Some(ph) = &p.placeholder {
                let ids: Vec<String> = ph.devices.iter().map(|d| d.id.to_string()).collect();
                out.push_str(&format!(
                    "    placeholder {} plugged at boot so firmware sizes this port's windows; removed before the first hotplug\n",
                    ids.join(", ")
                ));
            }
            if let Some(o) = &p.occupant {
                out.push_str(&format!("    holds {o}\n"));
            }
        }
        let a = &self.address;
        out.push_str(&format!(
            "32-bit MMIO: {} of {} used; I/O: {:#x} of {:#x}\n",
            human_size(a.mmio32_needed),
            human_size(a.mmio32_available),
            a.io_needed,
            a.io_available
        ));
        match a.mmio64_aperture {
            Some(r) => out.push_str(&format!(
                "64-bit MMIO: {} needed, aperture {:#x}..{:#x} ({})\n",
                human_size(a.mmio64_needed),
                r.base,
                r.end(),
                human_size(r.size)
            )),
            None => out.push_str("64-bit MMIO: none needed\n"),
        }
        out.push_str(&format!("guest phys-bits needed: {}", a.phys_bits_needed));
        if let Some(b) = self.cpu_phys_bits() {
            out.push_str(&format!(
                " (above the machine default {}: start the CPU with phys-bits={b})",
                self.platform.default_phys_bits
            ));
        }
        out.push('\n');
        for k in &self.extra.kernel {
            out.push_str(&format!("guest kernel argument: {k}\n"));
        }
        for q in &self.extra.qemu {
            out.push_str(&format!("platform argument: {q}\n"));
        }
        out
    }

    /// Places a device at run time on the best free port that holds it (the smallest
    /// fitting window; NUMA node and peer-to-peer group respected when given) and returns
    /// its hotplug action. The plan records the device; a placeholder on the port is marked
    /// removed, because the action removes it. On a platform without ports
    /// ([`Addressing::Zpci`], s390x) the device gets the lowest free device number or zPCI
    /// uid and fid instead, numbers freed by [`Plan::release`] included.
    pub fn place(&mut self, request: DeviceRequest) -> Result<HotplugAction, PlanError> {
        if let Addressing::Zpci { first_devno } = self.platform.addressing {
            zpci::place(self, &request, first_devno)?;
            return self.hotplug_action(request.id.as_str());
        }
        request.validate()?;
        check_attach(&self.platform, &request)?;
        if self.ids_in_use().any(|id| request_ids(&request).any(|r| r == id)) {
            return Err(PlanError::DuplicateId(request.id.to_string()));
        }
        let need = request.requirement()?;
        let behind_bridge = self.options.behind_bridge(&request);
        let on_bridge = bridge_requirement(request.resources())
            .map_err(|source| RequestError::Requirement { device: request.id.to_string(), source })?;
        let candidate = self
            .ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.occupant.is_none())
            // A root port with a switch below it has no occupant but no free slot either.
            .filter(|(_, p)| !self.switches.iter().any(|s| s.root_port == p.id))
            .filter(|(_, p)| (p.kind == PortKind::BridgeSlot) == behind_bridge)
            .filter(|(_, p)| {
                request.numa_node.is_none() || self.mode != Mode::Numa || p.numa_node == request.numa_node
            })
            .filter(|(_, p)| {
                request.p2p_group.is_none() || p.p2p_group.is_none() || p.p2p_group == request.p2p_group
            })
            .filter(|(_, p)| {
                if p.kind == PortKind::BridgeSlot {
                    self.bridge_takes(&p.target_bus, &on_bridge)
                } else {
                    p.reservation.holds(&need)
                }
            })
            .min_by_key(|(i, p)| (p.reservation.pref.size, p.reservation.mem.size, *i))
            .map(|(i, _)| i);
        let index =
            candidate.ok_or_else(|| PlanError::NoFreePort { device: request.id.to_string(), need })?;
        let placed = place_on_port(
            self.ports.get(index).ok_or_else(|| PlanError::UnknownDevice(request.id.to_string()))?,
            &request,
            need,
        )?;
        let id = placed.id.to_string();
        if let Some(port) = self.ports.get_mut(index) {
            port.occupant = Some(placed.id.clone());
        }
        self.devices.push(placed);
        let action = self.hotplug_action(&id)?;
        if let Some(ph) = self.ports.get_mut(index).and_then(|p| p.placeholder.as_mut()) {
            ph.present = false;
        }
        Ok(action)
    }

    /// Whether PCIe-to-PCI bridge `bridge` has room for one more device needing `extra`
    /// (a [`bridge_requirement`]) next to the devices already behind it. Only the bridge's
    /// memory and I/O windows count: a prefetchable window is not sure to exist.
    fn bridge_takes(&self, bridge: &str, extra: &Requirement) -> bool {
        let Some(b) = self.bridges.iter().find(|b| b.id.as_str() == bridge) else { return false };
        let slots: Vec<&QemuId> = self
            .ports
            .iter()
            .filter(|p| p.kind == PortKind::BridgeSlot && p.target_bus == bridge)
            .map(|p| &p.id)
            .collect();
        let bars: Vec<Resource> = self
            .devices
            .iter()
            .filter(|d| d.port.as_ref().is_some_and(|p| slots.contains(&p)))
            .flat_map(|d| d.functions.iter().flat_map(|f| f.bars.iter()))
            .filter(|bar| bar.size > 0)
            .map(|bar| Resource {
                kind: bar.kind,
                prefetchable: false,
                rom: bar.rom,
                size: bar.size,
                // The largest power of two dividing the size: a BAR's natural alignment,
                // or more than an SR-IOV aperture needs (safe side).
                align: 1u64 << bar.size.trailing_zeros(),
            })
            .collect();
        let Ok(occupied) = Requirement::of(&bars) else { return false };
        occupied
            .combine(extra)
            .is_ok_and(|all| b.mem.holds(&all.mem) && b.io.holds(&all.io) && all.pref.is_empty())
    }

    /// Removes a device from the plan and frees its port (call once the device is gone).
    pub fn release(&mut self, device: &str) -> Result<PlacedDevice, PlanError> {
        let index = self
            .devices
            .iter()
            .position(|d| d.id.as_str() == device)
            .ok_or_else(|| PlanError::UnknownDevice(device.to_string()))?;
        let d = self.devices.remove(index);
        if let Some(p) = self.ports.iter_mut().find(|p| Some(&p.id) == d.port.as_ref()) {
            p.occupant = None;
        }
        Ok(d)
    }

    /// Marks `port` taken by `device`, a device the plan did not place (one a hotplug
    /// engine holds there while the plan, read back from an older file, does not know
    /// it), so that [`Plan::place`] does not hand the port out; [`Plan::unhold`] frees it
    /// again. Holding a port for the device already on it is no change.
    pub fn hold(&mut self, port: &str, device: QemuId) -> Result<(), PlanError> {
        let p = self
            .ports
            .iter_mut()
            .find(|p| p.id.as_str() == port)
            .ok_or_else(|| PlanError::UnknownPort(port.to_string()))?;
        match &p.occupant {
            Some(o) if *o != device => {
                Err(PlanError::PortTaken { port: port.to_string(), occupant: o.to_string() })
            }
            _ => {
                p.occupant = Some(device);
                Ok(())
            }
        }
    }

    /// Frees `port` when [`Plan::hold`] took it (no device of the plan is on it); returns
    /// the device that held it, `None` when the port was free. A port with a placed device
    /// is freed by [`Plan::release`] instead.
    pub fn unhold(&mut self, port: &str) -> Result<Option<QemuId>, PlanError> {
        let placed = self.devices.iter().find(|d| d.port.as_ref().is_some_and(|p| p.as_str() == port));
        if let Some(d) = placed {
            return Err(PlanError::PortTaken { port: port.to_string(), occupant: d.id.to_string() });
        }
        let p = self
            .ports
            .iter_mut()
            .find(|p| p.id.as_str() == port)
            .ok_or_else(|| PlanError::UnknownPort(port.to_string()))?;
        Ok(p.occupant.take())
    }

    /// Every QEMU id the plan uses.
    pub fn ids_in_use(&self) -> impl Iterator<Item = &str> {
        let hb = self.host_bridges.iter().filter_map(|h| h.device.as_ref()).map(|d| d.id.as_str());
        let sw = self.switches.iter().map(|s| s.id.as_str());
        let br = self.bridges.iter().map(|b| b.id.as_str());
        let ports = self.ports.iter().filter_map(|p| p.device.as_ref()).map(|d| d.id.as_str());
        let ph = self.ports.iter().filter_map(|p| p.placeholder.as_ref()).flat_map(|ph| {
            ph.devices.iter().map(|d| d.id.as_str()).chain(ph.objects.iter().map(|o| o.id.as_str()))
        });
        let devs = self.devices.iter().flat_map(|d| {
            d.functions
                .iter()
                .flat_map(|f| {
                    std::iter::once(f.device.id.as_str()).chain(f.companions.iter().map(|c| c.id.as_str()))
                })
                .chain(d.objects.iter().map(|o| o.id.as_str()))
        });
        let foreign = self.foreign.iter().map(|f| f.device.id.as_str()).filter(|id| !id.is_empty());
        hb.chain(sw).chain(br).chain(ports).chain(ph).chain(devs).chain(foreign)
    }
}

/// Ids a request will use: function ids and object ids.
pub(crate) fn request_ids(request: &DeviceRequest) -> impl Iterator<Item = String> + '_ {
    request
        .functions
        .iter()
        .map(move |f| function_id(&request.id, f.function))
        .chain(request.functions.iter().flat_map(|f| f.objects.iter().map(|o| o.id.to_string())))
}

/// QEMU id of function `function` of device `id` (`gpu0`, `gpu0-f1`).
pub fn function_id(id: &QemuId, function: u8) -> String {
    if function == 0 {
        id.to_string()
    } else {
        format!("{id}-f{function}")
    }
}

/// Builds the placed device for `request` on `port`.
pub(crate) fn place_on_port(
    port: &Port,
    request: &DeviceRequest,
    need: Requirement,
) -> Result<PlacedDevice, PlanError> {
    let multi = request.functions.len() > 1;
    let mut functions = Vec::new();
    let mut objects = Vec::new();
    let mut sorted: Vec<_> = request.functions.iter().collect();
    sorted.sort_by_key(|f| f.function);
    for f in sorted {
        let devfn = DevFn::new(port.target_slot, f.function)?;
        let mut device =
            QemuDevice::new(f.driver.clone(), QemuId::new(function_id(&request.id, f.function))?);
        device.bus = Some(port.target_bus.clone());
        device.addr = Some(devfn);
        device.multifunction = multi && f.function == 0;
        device.props = f.props.clone();
        objects.extend(f.objects.iter().cloned());
        functions.push(PlacedFunction {
            function: f.function,
            device,
            companions: Vec::new(),
            location: GuestLocation::Pci {
                bdf: devfn.on_bus(port.bdf.domain(), port.secondary_bus),
                path: port.path.join(devfn),
            },
            bars: f.resources.iter().map(ExpectedBar::from).collect(),
            host: f.host.clone(),
        });
    }
    Ok(PlacedDevice {
        id: request.id.clone(),
        port: Some(port.id.clone()),
        cold_plug: request.cold_plug,
        iommu_group: request.iommu_group,
        p2p_group: request.p2p_group.clone(),
        objects,
        functions,
        need,
        runtime_id: request.runtime_id.clone(),
    })
}

/// What resources need from a PCIe-to-PCI bridge's windows: prefetchable BARs are counted
/// in the memory window, because an empty bridge may get no prefetchable window (AAVMF).
pub fn bridge_requirement<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
) -> Result<Requirement, RequirementError> {
    let folded: Vec<Resource> =
        resources.into_iter().map(|r| Resource { prefetchable: false, ..*r }).collect();
    Requirement::of(&folded)
}

/// A short text for a requirement (`mem 16M, pref 128G+32M @128G`).
pub(crate) fn describe_requirement(r: &Requirement) -> String {
    let mut parts = Vec::new();
    if !r.mem.is_empty() {
        parts.push(format!("mem {} @{}", fmt_size(r.mem.size), fmt_size(r.mem.align)));
    }
    if !r.pref.is_empty() {
        parts.push(format!("pref64 {} @{}", fmt_size(r.pref.size), fmt_size(r.pref.align)));
    }
    if !r.io.is_empty() {
        parts.push(format!("io {:#x}", r.io.size));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

//! Errors of planning, checking and changing a plan.

use pcilibs::requirement::Requirement;
use thiserror::Error;

pub use crate::alloc::AllocError;
use crate::foreign::ForeignError;
use crate::qemu::QemuError;
use crate::request::RequestError;
use crate::units::human_size;

/// What does not fit in the guest's address space, and by how much.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AddressSpaceError {
    /// The ports' 32-bit windows exceed the machine's 32-bit PCI hole.
    #[error("32-bit MMIO: the ports need {} but the 32-bit hole has {} ({} short)", human_size(*.needed), human_size(*.available), human_size(.needed.saturating_sub(*.available)))]
    Mmio32 {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The ports' I/O windows exceed the I/O space.
    #[error("I/O space: the ports need {needed:#x} ports but only {available:#x} exist (each port with I/O takes 4 KiB)")]
    Io {
        /// Ports needed.
        needed: u64,
        /// Ports available.
        available: u64,
    },
    /// The 64-bit windows exceed the platform's fixed 64-bit aperture.
    #[error("64-bit MMIO: the ports need {} but the machine's 64-bit aperture has {} ({} short)", human_size(*.needed), human_size(*.available), human_size(.needed.saturating_sub(*.available)))]
    Mmio64Aperture {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The address space ends above what the guest (or host) physical address width reaches.
    #[error("physical address width: the plan ends at {end:#x} and needs {needed_bits} bits, but the {source_name} has {available_bits} ({} short)", human_size(.end.saturating_sub(1u64.checked_shl(u32::from(*.available_bits)).unwrap_or(u64::MAX))))]
    PhysBits {
        /// One past the highest address the plan uses.
        end: u64,
        /// Bits needed.
        needed_bits: u8,
        /// Bits available.
        available_bits: u8,
        /// Whose width: `guest CPU` or `host`.
        source_name: String,
    },
    /// Memory hotplug's device memory region reaches into the machine's fixed 64-bit
    /// aperture (QEMU would move the aperture; the plan does not follow it there).
    #[error("memory hotplug: device memory ends at {memory_end:#x}, above the start of the machine's 64-bit PCI aperture at {aperture_base:#x}; lower maxmem")]
    MemoryOverlapsAperture {
        /// One past the device memory region.
        memory_end: u64,
        /// First address of the aperture.
        aperture_base: u64,
    },
    /// Firmware that lays the 64-bit windows out upwards from the end of RAM (SeaBIOS up
    /// to 1.16.2) would leave a hotplug port's window without room for its BARs outside
    /// the range QEMU reserves below 1 TiB for AMD-vendor CPUs, however much the first
    /// port window grows to move it.
    #[error("64-bit MMIO: port `{port}`'s window cannot hold its BARs clear of {reserved_base:#x}-{reserved_last:#x}, which QEMU reserves below 1 TiB for AMD-vendor CPUs, where the firmware lays the windows out from the end of RAM; use fewer or smaller ports, or SeaBIOS 1.16.3 or later")]
    ReservedRange {
        /// The port whose window cannot hold its BARs.
        port: String,
        /// First address of the reserved range.
        reserved_base: u64,
        /// Last address of the reserved range.
        reserved_last: u64,
    },
    /// The arithmetic of the address space overflowed 64 bits.
    #[error("address-space totals overflow 64 bits")]
    Overflow,
}

/// Errors of the planner and of plan changes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A device request or profile is invalid.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A QEMU id or address is invalid.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// A free set ran out (ports, slots, chassis, bus numbers).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The address space does not hold the plan.
    #[error(transparent)]
    AddressSpace(#[from] AddressSpaceError),
    /// The description of the VMM's own devices or memory hotplug is wrong.
    #[error(transparent)]
    Foreign(#[from] ForeignError),
    /// Two things want the same QEMU id.
    #[error("QEMU id `{0}` is used twice")]
    DuplicateId(String),
    /// The platform lacks what the request needs (switches, expanders, PCIe ports).
    #[error("platform `{platform}` does not support {what}")]
    Unsupported {
        /// Platform name.
        platform: String,
        /// What is missing.
        what: String,
    },
    /// A switch downstream port cannot get a window for what it must hold.
    #[error("switch downstream port `{port}` cannot hold {need}: the port has no *-reserve properties and firmware sizes its window from boot-time devices only; enable boot-time placeholders or use a root port")]
    DownstreamWindow {
        /// Port id.
        port: String,
        /// Description of what does not fit.
        need: String,
    },
    /// Devices behind a PCIe-to-PCI bridge need more than the bridge is sure to get.
    #[error("PCIe-to-PCI bridge `{bridge}` cannot hold {need} for {devices}: pcie-pci-bridge has no *-reserve properties, so with a device hotplugged behind it the firmware gives the bridge only what an empty bridge gets ({available}); plug these devices at boot, or on a PCIe port")]
    BridgeWindow {
        /// Bridge id.
        bridge: String,
        /// The devices behind it.
        devices: String,
        /// What they need (prefetchable BARs counted in the memory window).
        need: String,
        /// What an empty bridge gets on this platform.
        available: String,
    },
    /// Bus numbers of a segment ran out (256 per segment, expander ranges included).
    #[error("bus numbers: the topology needs {needed} buses but a PCI segment has 256")]
    Buses {
        /// Bus numbers needed.
        needed: u32,
    },
    /// A root bus needs bus numbers past where the next root bus starts (with
    /// [`crate::ExpanderBuses::KataAgent`], every 0x20 buses).
    #[error("bus numbers: root bus {root:#x} needs buses up to {last:#x}, but the next root bus starts at {limit:#x} (expander buses numbered as Kata's agent reads them); use fewer ports per NUMA node")]
    BusRange {
        /// The root bus.
        root: u32,
        /// Its last bus number as needed.
        last: u32,
        /// First bus number of the next root bus.
        limit: u32,
    },
    /// No free port can hold a device being placed at run time.
    #[error("no free port holds device `{device}` (needs mem {}, pref {}, io {})", human_size(.need.mem.size), human_size(.need.pref.size), human_size(.need.io.size))]
    NoFreePort {
        /// Device id.
        device: String,
        /// What it needs.
        need: Requirement,
    },
    /// A device id is not in the plan.
    #[error("device `{0}` is not in the plan")]
    UnknownDevice(String),
    /// A port id is not in the plan.
    #[error("port `{0}` is not in the plan")]
    UnknownPort(String),
    /// A port is taken by another device.
    #[error("port `{port}` is taken by `{occupant}`")]
    PortTaken {
        /// The port.
        port: String,
        /// The device on it.
        occupant: String,
    },
    /// A plan file has another format version.
    #[error(
        "plan format version {found} is not supported (this build reads versions {oldest} to {supported})"
    )]
    Version {
        /// Version in the file.
        found: u32,
        /// Oldest version this build reads.
        oldest: u32,
        /// Newest version this build reads (the one it writes).
        supported: u32,
    },
    /// A plan file is not valid JSON for a plan.
    #[error("plan JSON: {0}")]
    Json(String),
}

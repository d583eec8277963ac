//! What else the VMM puts on the machine: devices the plan does not make and the memory
//! hotplug range.
//!
//! A runtime such as Kata's starts QEMU with devices of its own next to the plan's ports:
//! `virtio-rng-pci`, `vhost-vsock-pci` or `virtio-serial-pci` on `pcie.0` without `addr=`,
//! a `pci-bridge` pinned to a slot, a root port with a bridge behind it, and memory
//! hotplug (`-m …,slots=…,maxmem=…`). Each of them changes what the firmware does with
//! the plan's ports:
//!
//! - **Slots.** QEMU gives a device on the root bus without `addr=` the lowest slot that
//!   is free when it creates the device. Whatever order the command line has, those
//!   devices end up in the lowest slots not reserved by the machine and not pinned by
//!   another device, as long as the plan keeps out of them (a pinned port created first
//!   in one of those slots would push them elsewhere, or be refused: "slot 1 function 0
//!   not available for pcie-root-port, in use by virtio-rng-pci"). The planner hands
//!   those slots to them first ([`Foreign::root_slots`]).
//! - **Bus numbers.** Firmware numbers the bridges of a root bus depth-first in devfn
//!   order; a foreign bridge takes the bus numbers below it ([`ForeignDevice::buses`])
//!   before the plan's ports that follow it, so every BDF behind those ports moves.
//! - **Address space.** A foreign device's BARs and a foreign bridge's windows take part
//!   of the 32-bit hole, the I/O space and the 64-bit aperture
//!   ([`ForeignDevice::resources`]).
//! - **Memory hotplug.** QEMU puts a device memory region after RAM (aligned to 1 GiB,
//!   `maxmem - ram` plus 1 GiB per slot, on q35 and `virt` alike) and tells the firmware
//!   where it ends (fw_cfg `etc/reserved-memory-end`); SeaBIOS and OVMF start the 64-bit
//!   PCI aperture there, not after RAM. With `-m 2G,slots=10,maxmem=64G` the windows
//!   start at 0x13_0000_0000 (76 GiB) instead of 4 GiB ([`MemoryHotplug`]).

use std::collections::BTreeSet;

use pcilibs::requirement::{Requirement, RequirementError, Resource};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::qemu::DevFn;
use crate::units::{align_up, GIB};

/// Errors in the description of the VMM's own devices.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ForeignError {
    /// A device is pinned to a slot the machine reserves or another device is pinned to.
    #[error("foreign device `{id}` is pinned to root bus slot {slot:#x}, which the machine or another device takes")]
    SlotTaken {
        /// The device's id.
        id: String,
        /// The slot.
        slot: u8,
    },
    /// More auto-addressed devices than free root bus slots.
    #[error("{count} devices without addr= on the root bus, but only {free} slots are free")]
    NoSlots {
        /// Devices without a fixed slot.
        count: usize,
        /// Free slots.
        free: usize,
    },
    /// `maxmem` below the RAM size (QEMU refuses that too).
    #[error("memory hotplug: maxmem {maxmem:#x} is below the RAM size {ram:#x}")]
    MaxMem {
        /// RAM in bytes.
        ram: u64,
        /// maxmem in bytes.
        maxmem: u64,
    },
    /// The device memory region would end past 2^64.
    #[error("memory hotplug: the device memory region ends past 2^64")]
    Overflow,
    /// A device's resources cannot be added up.
    #[error("foreign device `{id}`: {source}")]
    Resources {
        /// The device's id.
        id: String,
        /// What is wrong.
        source: RequirementError,
    },
}

/// A device the VMM puts on the root bus (`pcie.0`) itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ForeignDevice {
    /// The id the VMM gives it (any text: it is the VMM's, not the plan's, and may be
    /// empty); the plan keeps its own ids apart from it.
    #[serde(default)]
    pub id: String,
    /// QEMU driver (`virtio-rng-pci`, `pci-bridge`).
    pub driver: String,
    /// Its slot and function on the root bus (`addr=`); `None` when QEMU picks the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<DevFn>,
    /// Bus numbers the firmware gives below it: 0 for an endpoint, 1 for a bridge with
    /// nothing behind it, more for a port with a bridge behind it or `bus-reserve`.
    #[serde(default)]
    pub buses: u8,
    /// What it takes from the root bus's address space: its BARs, or a bridge's windows
    /// as the firmware will size them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
}

impl ForeignDevice {
    /// An endpoint `driver` called `id` that QEMU gives the first free slot (no `addr=`).
    pub fn auto(id: &str, driver: &str) -> Self {
        ForeignDevice {
            id: id.to_string(),
            driver: driver.to_string(),
            addr: None,
            buses: 0,
            resources: Vec::new(),
        }
    }

    /// An endpoint `driver` called `id` pinned to `addr` on the root bus.
    pub fn at(id: &str, driver: &str, addr: DevFn) -> Self {
        ForeignDevice { addr: Some(addr), ..ForeignDevice::auto(id, driver) }
    }

    /// This device with `buses` bus numbers below it (a bridge: 1).
    pub fn with_buses(mut self, buses: u8) -> Self {
        self.buses = buses;
        self
    }

    /// This device taking `resources` from the root bus's address space.
    pub fn with_resources(mut self, resources: Vec<Resource>) -> Self {
        self.resources = resources;
        self
    }

    /// What the device takes from the root bus's windows.
    pub fn requirement(&self) -> Result<Requirement, ForeignError> {
        Requirement::of(&self.resources)
            .map_err(|source| ForeignError::Resources { id: self.id.clone(), source })
    }
}

/// Memory hotplug as QEMU's `-m <ram>,slots=<slots>,maxmem=<maxmem>` asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MemoryHotplug {
    /// `slots=`: DIMM slots.
    pub slots: u32,
    /// `maxmem=` in bytes: RAM plus what can be hotplugged.
    pub maxmem: u64,
}

impl MemoryHotplug {
    /// `slots` DIMM slots up to `maxmem` bytes of memory in all.
    pub fn new(slots: u32, maxmem: u64) -> Self {
        MemoryHotplug { slots, maxmem }
    }

    /// One past the device memory region QEMU makes for `ram` bytes of RAM ending at
    /// `ram_end`: it starts at `ram_end` rounded up to 1 GiB and holds `maxmem - ram`
    /// plus 1 GiB per slot (each DIMM may need 1 GiB alignment), and the firmware is told
    /// its end rounded up to 1 GiB. `ram_end` itself when `maxmem` equals `ram` (QEMU
    /// makes no region then).
    pub fn end(&self, ram: u64, ram_end: u64) -> Result<u64, ForeignError> {
        if self.maxmem < ram {
            return Err(ForeignError::MaxMem { ram, maxmem: self.maxmem });
        }
        if self.maxmem == ram {
            return Ok(ram_end);
        }
        let base = align_up(ram_end, GIB);
        let size = (self.maxmem - ram).checked_add(u64::from(self.slots).saturating_mul(GIB));
        base.zip(size)
            .and_then(|(b, s)| b.checked_add(s))
            .and_then(|e| align_up(e, GIB))
            .ok_or(ForeignError::Overflow)
    }
}

/// What else the VMM puts on the machine: its own devices on the root bus and memory
/// hotplug. Empty by default: the plan then has the machine to itself (QEMU started with
/// `-nodefaults`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Foreign {
    /// Devices on the root bus, in any order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<ForeignDevice>,
    /// Memory hotplug, when QEMU is started with `slots=` and `maxmem=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<MemoryHotplug>,
}

impl Foreign {
    /// Nothing else on the machine.
    pub fn new() -> Self {
        Foreign::default()
    }

    /// These devices on the root bus.
    pub fn with_devices(mut self, devices: Vec<ForeignDevice>) -> Self {
        self.devices = devices;
        self
    }

    /// Memory hotplug.
    pub fn with_memory_hotplug(mut self, hotplug: MemoryHotplug) -> Self {
        self.memory_hotplug = Some(hotplug);
        self
    }

    /// True when the VMM adds nothing.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.memory_hotplug.is_none()
    }

    /// The root bus slot of every device, in the order of [`Foreign::devices`], given the
    /// slots the machine itself reserves: pinned devices where pinned, the others in the
    /// lowest slots left, one each in list order (QEMU's choice for a device without
    /// `addr=`).
    pub fn root_slots(&self, reserved: &[u8]) -> Result<Vec<DevFn>, ForeignError> {
        let mut taken: BTreeSet<u8> = reserved.iter().copied().collect();
        for d in &self.devices {
            if let Some(a) = d.addr {
                if a.function() == 0 && !taken.insert(a.slot()) {
                    return Err(ForeignError::SlotTaken { id: d.id.clone(), slot: a.slot() });
                }
            }
        }
        let free: Vec<u8> = (0..=0x1fu8).filter(|s| !taken.contains(s)).collect();
        let auto = self.devices.iter().filter(|d| d.addr.is_none()).count();
        if auto > free.len() {
            return Err(ForeignError::NoSlots { count: auto, free: free.len() });
        }
        let mut next = free.into_iter();
        let mut out = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            let addr = match d.addr {
                Some(a) => a,
                // `auto <= free.len()` was checked above.
                None => DevFn::new(next.next().unwrap_or(0x1f), 0)
                    .map_err(|_| ForeignError::NoSlots { count: auto, free: 0 })?,
            };
            out.push(addr);
        }
        Ok(out)
    }
}

/// A foreign device where the plan expects it: slot and, for a bridge, bus numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlacedForeign {
    /// The device as described.
    pub device: ForeignDevice,
    /// Its slot and function on the root bus.
    pub addr: DevFn,
    /// First bus number below it (a bridge's secondary bus); `None` for an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_bus: Option<u8>,
    /// Last bus number below it; `None` for an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subordinate_bus: Option<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(s: u8) -> DevFn {
        DevFn::new(s, 0).unwrap()
    }

    /// Devices without addr= fill the lowest free slots around the pinned ones, in order.
    #[test]
    fn auto_devices_take_the_lowest_free_slots() {
        let f = Foreign::new().with_devices(vec![
            ForeignDevice::auto("rng0", "virtio-rng-pci"),
            ForeignDevice::at("pci-bridge-0", "pci-bridge", slot(2)).with_buses(1),
            ForeignDevice::auto("vsock", "vhost-vsock-pci"),
            ForeignDevice::auto("serial0", "virtio-serial-pci"),
        ]);
        let slots = f.root_slots(&[0, 0x1f]).unwrap();
        assert_eq!(slots, vec![slot(1), slot(2), slot(3), slot(4)]);
        let clash = Foreign::new().with_devices(vec![ForeignDevice::at("x", "pci-bridge", slot(0))]);
        assert!(matches!(clash.root_slots(&[0]), Err(ForeignError::SlotTaken { slot: 0, .. })));
        let many = Foreign::new().with_devices(vec![ForeignDevice::auto("a", "virtio-rng-pci"); 31]);
        assert!(matches!(many.root_slots(&[0, 0x1f]), Err(ForeignError::NoSlots { count: 31, free: 30 })));
    }

    /// QEMU 7.2 with -m 2G,slots=10,maxmem=64G put the 64-bit windows at 0x13_0000_0000.
    #[test]
    fn device_memory_end_as_qemu_reports_it() {
        let h = MemoryHotplug::new(10, 64 * GIB);
        assert_eq!(h.end(2 * GIB, 4 * GIB).unwrap(), 0x13_0000_0000);
        assert_eq!(MemoryHotplug::new(0, 2 * GIB).end(2 * GIB, 4 * GIB).unwrap(), 4 * GIB);
        assert!(matches!(MemoryHotplug::new(1, GIB).end(2 * GIB, 4 * GIB), Err(ForeignError::MaxMem { .. })));
        assert_eq!(MemoryHotplug::new(u32::MAX, u64::MAX).end(GIB, 4 * GIB), Err(ForeignError::Overflow));
    }
}

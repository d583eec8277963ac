//! Vendor-specific capability (ID 0x09), with the layouts this crate knows.
//!
//! * QEMU's bridges (Red Hat vendor ID 0x1b36: `pcie-root-port`, `pci-bridge`, …) carry a
//!   *resource reservation* capability telling firmware how much to reserve behind the
//!   bridge: byte 2 is the length (32), byte 3 the type (1 = resource reserve), then a
//!   32-bit bus count at +4, a 64-bit I/O size at +8, a 32-bit non-prefetchable memory
//!   size at +16, a 32-bit prefetchable (32-bit) memory size at +20 and a 64-bit
//!   prefetchable memory size at +24. A field of all ones means "not set".
//! * virtio devices (vendor 0x1af4) describe their register blocks: type at +3, BAR at
//!   +4, offset at +8, length at +12.

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// PCI vendor ID of Red Hat, used by QEMU's own PCI devices.
pub(crate) const VENDOR_REDHAT: u16 = 0x1b36;
/// PCI vendor ID of virtio devices.
pub(crate) const VENDOR_VIRTIO: u16 = 0x1af4;
/// Type byte of QEMU's resource reservation capability.
pub(crate) const QEMU_RESOURCE_RESERVE: u8 = 1;
/// Length of QEMU's resource reservation capability.
pub(crate) const QEMU_RESOURCE_RESERVE_LEN: u8 = 32;

/// A decoded vendor-specific capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VendorSpecific {
    /// QEMU's bridge resource reservation hints.
    QemuResourceReserve(QemuResourceReserve),
    /// A virtio register-block locator.
    Virtio(VirtioCap),
    /// A layout this crate does not know.
    Raw {
        /// Length byte (byte 2).
        length: u8,
    },
}

/// QEMU's bridge resource reservation (set with `bus-reserve`, `io-reserve`, `mem-reserve`,
/// `pref32-reserve`, `pref64-reserve`). `None` means the property was not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QemuResourceReserve {
    /// Minimum number of buses to reserve below the bridge.
    pub bus: Option<u32>,
    /// I/O space bytes to reserve.
    pub io: Option<u64>,
    /// Non-prefetchable memory bytes to reserve.
    pub mem: Option<u32>,
    /// 32-bit prefetchable memory bytes to reserve.
    pub pref32: Option<u32>,
    /// 64-bit prefetchable memory bytes to reserve.
    pub pref64: Option<u64>,
}

/// virtio PCI capability: where one register block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VirtioCap {
    /// Block type (1 common, 2 notify, 3 ISR, 4 device, 5 PCI config access, 8 shared memory).
    pub cfg_type: u8,
    /// BAR holding the block.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length of the block.
    pub length: u32,
}

impl VendorSpecific {
    pub(crate) fn decode(r: &Regs<'_>, vendor_id: u16) -> Result<Self> {
        let length = r.u8(2)?;
        if vendor_id == VENDOR_REDHAT
            && length >= QEMU_RESOURCE_RESERVE_LEN
            && r.u8(3)? == QEMU_RESOURCE_RESERVE
        {
            let set32 = |v: u32| (v != u32::MAX).then_some(v);
            let set64 = |v: u64| (v != u64::MAX).then_some(v);
            return Ok(VendorSpecific::QemuResourceReserve(QemuResourceReserve {
                bus: set32(r.u32(4)?),
                io: set64(r.u64(8)?),
                mem: set32(r.u32(16)?),
                pref32: set32(r.u32(20)?),
                pref64: set64(r.u64(24)?),
            }));
        }
        if vendor_id == VENDOR_VIRTIO && length >= 16 {
            return Ok(VendorSpecific::Virtio(VirtioCap {
                cfg_type: r.u8(3)?,
                bar: r.u8(4)?,
                offset: r.u32(8)?,
                length: r.u32(12)?,
            }));
        }
        Ok(VendorSpecific::Raw { length })
    }
}

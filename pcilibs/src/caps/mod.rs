//! The standard capability list (offsets 0x40..0x100) and its decoders.
//!
//! # Walk rules
//!
//! The walk starts at the capabilities pointer when the status register has its
//! capability-list bit. Every pointer has its two low bits masked off (they are reserved
//! and software must ignore them). The walk stops, returning what it found so far plus a
//! [`CapError`], when a pointer lands inside the 64-byte header, when an entry was already
//! visited (a loop), when an entry's ID is 0xff (what a missing function or a broken list
//! reads as), or when the entry lies past the bytes available. At most 48 entries are
//! followed (`(256 - 64) / 4`), so every walk ends.

use alloc::vec::Vec;

use crate::config::{ConfigSpace, Header, HEADER_SIZE, PCI_CONFIG_SIZE};

pub mod msi;
pub mod msix;
pub mod pcie;
pub mod pm;
pub mod vendor;

/// Capability IDs (PCI Code and ID Assignment specification).
pub mod id {
    /// Null capability.
    pub const NULL: u8 = 0x00;
    /// PCI Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// AGP.
    pub const AGP: u8 = 0x02;
    /// Vital Product Data.
    pub const VPD: u8 = 0x03;
    /// Slot identification.
    pub const SLOT_ID: u8 = 0x04;
    /// Message Signaled Interrupts.
    pub const MSI: u8 = 0x05;
    /// CompactPCI hot swap.
    pub const COMPACT_PCI_HOT_SWAP: u8 = 0x06;
    /// PCI-X.
    pub const PCI_X: u8 = 0x07;
    /// HyperTransport.
    pub const HYPERTRANSPORT: u8 = 0x08;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// Debug port.
    pub const DEBUG_PORT: u8 = 0x0a;
    /// CompactPCI central resource control.
    pub const COMPACT_PCI_CRC: u8 = 0x0b;
    /// PCI Standard Hot-Plug Controller.
    pub const HOT_PLUG: u8 = 0x0c;
    /// Bridge subsystem vendor/device ID.
    pub const SUBSYSTEM_ID: u8 = 0x0d;
    /// AGP 8x.
    pub const AGP3: u8 = 0x0e;
    /// Secure device.
    pub const SECURE: u8 = 0x0f;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSI_X: u8 = 0x11;
    /// Serial ATA data/index configuration.
    pub const SATA: u8 = 0x12;
    /// Advanced Features.
    pub const ADVANCED_FEATURES: u8 = 0x13;
    /// Enhanced Allocation.
    pub const ENHANCED_ALLOCATION: u8 = 0x14;
    /// Flattening Portal Bridge.
    pub const FLATTENING_PORTAL_BRIDGE: u8 = 0x15;
}

/// At most this many standard capabilities are followed.
pub const MAX_CAPABILITIES: usize = (PCI_CONFIG_SIZE - HEADER_SIZE) / 4;

/// Errors walking or decoding the standard capability list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CapError {
    /// A pointer (from the header or from the entry at `from`) lands inside the header.
    #[error("capability pointer {pointer:#04x} (from {from:#04x}) points into the 64-byte header")]
    PointerIntoHeader {
        /// Register holding the pointer.
        from: u8,
        /// The pointer value, low bits masked.
        pointer: u8,
    },
    /// The entry at `offset` was already visited.
    #[error("capability list loops back to {offset:#04x}")]
    Loop {
        /// The revisited entry.
        offset: u8,
    },
    /// The entry at `offset` has ID 0xff.
    #[error("capability at {offset:#04x} has ID 0xff: the list is broken")]
    BrokenId {
        /// Offset of the entry.
        offset: u8,
    },
    /// The entry's header or a register it needs lies past the available bytes.
    #[error("capability {id:#04x} at {offset:#04x} needs bytes up to {needed:#x}, only {len:#x} available")]
    Truncated {
        /// Capability ID (0 when even the ID byte is missing).
        id: u8,
        /// Offset of the entry.
        offset: u8,
        /// End offset of the register that is missing.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
    /// More entries than fit in 192 bytes: a corrupt list.
    #[error("more than {MAX_CAPABILITIES} capabilities")]
    TooMany,
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, CapError>;

/// One entry of the standard list: its ID and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CapEntry {
    /// Capability ID.
    pub id: u8,
    /// Offset in configuration space (0x40..=0xfc).
    pub offset: u8,
}

/// Iterator over the standard capability list; yields at most one `Err`, then ends.
#[derive(Debug, Clone)]
pub struct CapIter<'a> {
    cs: ConfigSpace<'a>,
    next: u8,
    from: u8,
    visited: u64,
    count: usize,
    done: bool,
}

impl<'a> CapIter<'a> {
    /// Starts a walk over `cs` (with its decoded `header`).
    pub fn new(cs: ConfigSpace<'a>, header: &Header) -> Self {
        let start = match header.capabilities_pointer {
            Some(p) if header.has_capabilities() => p,
            _ => 0,
        };
        let from = header
            .header_type
            .capabilities_pointer_register()
            .and_then(|r| u8::try_from(r).ok())
            .unwrap_or(0);
        CapIter { cs, next: start & !3, from, visited: 0, count: 0, done: false }
    }

    fn fail(&mut self, e: CapError) -> Option<Result<CapEntry>> {
        self.done = true;
        Some(Err(e))
    }
}

impl Iterator for CapIter<'_> {
    type Item = Result<CapEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next == 0 {
            return None;
        }
        let offset = self.next;
        if usize::from(offset) < HEADER_SIZE {
            return self.fail(CapError::PointerIntoHeader { from: self.from, pointer: offset });
        }
        let bit = 1u64 << (offset / 4);
        if self.visited & bit != 0 {
            return self.fail(CapError::Loop { offset });
        }
        self.visited |= bit;
        self.count += 1;
        if self.count > MAX_CAPABILITIES {
            return self.fail(CapError::TooMany);
        }
        let at = usize::from(offset);
        let (Some(id), Some(next)) = (self.cs.u8(at), self.cs.u8(at + 1)) else {
            let id = self.cs.u8(at).unwrap_or(0);
            return self.fail(CapError::Truncated { id, offset, needed: at + 2, len: self.cs.len() });
        };
        if id == 0xff {
            return self.fail(CapError::BrokenId { offset });
        }
        self.from = offset + 1;
        self.next = next & !3;
        Some(Ok(CapEntry { id, offset }))
    }
}

/// The entries of the standard list and the error that ended the walk, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapWalk {
    /// Entries in list order.
    pub entries: Vec<CapEntry>,
    /// Why the walk stopped early.
    pub error: Option<CapError>,
}

/// Walks the whole standard list.
pub fn walk(cs: ConfigSpace<'_>, header: &Header) -> CapWalk {
    let mut w = CapWalk::default();
    for item in CapIter::new(cs, header) {
        match item {
            Ok(e) => w.entries.push(e),
            Err(e) => w.error = Some(e),
        }
    }
    w
}

/// Offset of the first capability with `id`, if the (possibly broken) list has one.
pub fn find(cs: ConfigSpace<'_>, header: &Header, id: u8) -> Option<u8> {
    CapIter::new(cs, header).map_while(|r| r.ok()).find(|e| e.id == id).map(|e| e.offset)
}

/// A decoded standard capability.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Capability {
    /// Power Management (0x01).
    PowerManagement(pm::PowerManagement),
    /// MSI (0x05).
    Msi(msi::Msi),
    /// MSI-X (0x11).
    MsiX(msix::MsiX),
    /// PCI Express (0x10).
    PciExpress(pcie::PciExpress),
    /// Vendor specific (0x09).
    Vendor(vendor::VendorSpecific),
    /// Bridge subsystem IDs (0x0d).
    SubsystemId {
        /// Subsystem vendor ID.
        vendor_id: u16,
        /// Subsystem ID.
        device_id: u16,
    },
    /// PCI-X (0x07); its registers are not decoded.
    PciX,
    /// A capability whose registers this crate does not decode (see the entry's ID).
    Other,
}

/// One capability: where it is and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cap {
    /// Capability ID.
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u8,
    /// Decoded registers, or why they could not be decoded.
    pub decoded: Result<Capability>,
}

/// Human name of a capability ID.
pub fn name(id: u8) -> &'static str {
    match id {
        id::NULL => "Null",
        id::POWER_MANAGEMENT => "Power Management",
        id::AGP => "AGP",
        id::VPD => "Vital Product Data",
        id::SLOT_ID => "Slot Identification",
        id::MSI => "MSI",
        id::COMPACT_PCI_HOT_SWAP => "CompactPCI hot-swap",
        id::PCI_X => "PCI-X",
        id::HYPERTRANSPORT => "HyperTransport",
        id::VENDOR => "Vendor Specific",
        id::DEBUG_PORT => "Debug port",
        id::COMPACT_PCI_CRC => "CompactPCI central resource control",
        id::HOT_PLUG => "Hot-plug capable",
        id::SUBSYSTEM_ID => "Subsystem ID",
        id::AGP3 => "AGP3",
        id::SECURE => "Secure device",
        id::PCI_EXPRESS => "Express",
        id::MSI_X => "MSI-X",
        id::SATA => "SATA HBA",
        id::ADVANCED_FEATURES => "PCI Advanced Features",
        id::ENHANCED_ALLOCATION => "Enhanced Allocation",
        id::FLATTENING_PORTAL_BRIDGE => "Flattening Portal Bridge",
        _ => "Unknown",
    }
}

/// Decodes the capability `entry` of a function whose header is `header`.
pub fn decode(cs: ConfigSpace<'_>, header: &Header, entry: CapEntry) -> Cap {
    let r = Regs { cs, id: entry.id, offset: entry.offset };
    let decoded = match entry.id {
        id::POWER_MANAGEMENT => pm::PowerManagement::decode(&r).map(Capability::PowerManagement),
        id::MSI => msi::Msi::decode(&r).map(Capability::Msi),
        id::MSI_X => msix::MsiX::decode(&r).map(Capability::MsiX),
        id::PCI_EXPRESS => pcie::PciExpress::decode(&r).map(Capability::PciExpress),
        id::VENDOR => vendor::VendorSpecific::decode(&r, header.vendor_id).map(Capability::Vendor),
        id::SUBSYSTEM_ID => subsystem_id(&r),
        id::PCI_X => Ok(Capability::PciX),
        _ => Ok(Capability::Other),
    };
    Cap { id: entry.id, offset: entry.offset, decoded }
}

fn subsystem_id(r: &Regs<'_>) -> Result<Capability> {
    Ok(Capability::SubsystemId { vendor_id: r.u16(4)?, device_id: r.u16(6)? })
}

/// Registers of one capability, read relative to its offset; missing bytes are errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Regs<'a> {
    cs: ConfigSpace<'a>,
    id: u8,
    offset: u8,
}

impl Regs<'_> {
    fn missing(&self, rel: usize, width: usize) -> CapError {
        CapError::Truncated {
            id: self.id,
            offset: self.offset,
            needed: usize::from(self.offset) + rel + width,
            len: self.cs.len(),
        }
    }

    /// Byte at `rel` past the capability start.
    pub(crate) fn u8(&self, rel: usize) -> Result<u8> {
        self.cs.u8(usize::from(self.offset) + rel).ok_or_else(|| self.missing(rel, 1))
    }

    /// 16-bit register at `rel`.
    pub(crate) fn u16(&self, rel: usize) -> Result<u16> {
        self.cs.u16(usize::from(self.offset) + rel).ok_or_else(|| self.missing(rel, 2))
    }

    /// 32-bit register at `rel`.
    pub(crate) fn u32(&self, rel: usize) -> Result<u32> {
        self.cs.u32(usize::from(self.offset) + rel).ok_or_else(|| self.missing(rel, 4))
    }

    /// 64-bit register at `rel`.
    pub(crate) fn u64(&self, rel: usize) -> Result<u64> {
        self.cs.u64(usize::from(self.offset) + rel).ok_or_else(|| self.missing(rel, 8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_caps(list: &[(u8, u8, u8)]) -> [u8; 256] {
        // (offset, id, next)
        let mut b = [0u8; 256];
        b[0] = 0x86;
        b[1] = 0x80;
        b[6] = 0x10;
        b[0x34] = list.first().map_or(0, |c| c.0);
        for &(off, id, next) in list {
            b[off as usize] = id;
            b[off as usize + 1] = next;
        }
        b
    }

    fn run(b: &[u8]) -> CapWalk {
        let h = Header::parse(b).unwrap();
        walk(ConfigSpace::new(b), &h)
    }

    #[test]
    fn follows_list_and_masks_low_bits() {
        let b = with_caps(&[(0x40, 0x01, 0x53), (0x50, 0x05, 0x00)]);
        let w = run(&b);
        assert_eq!(w.entries, [CapEntry { id: 1, offset: 0x40 }, CapEntry { id: 5, offset: 0x50 }]);
        assert_eq!(w.error, None);
    }

    #[test]
    fn loop_is_reported() {
        let b = with_caps(&[(0x40, 0x01, 0x50), (0x50, 0x05, 0x40)]);
        let w = run(&b);
        assert_eq!(w.entries.len(), 2);
        assert_eq!(w.error, Some(CapError::Loop { offset: 0x40 }));
        let b = with_caps(&[(0x40, 0x01, 0x40)]);
        assert_eq!(run(&b).error, Some(CapError::Loop { offset: 0x40 }));
    }

    #[test]
    fn header_pointer_broken_id_and_truncation() {
        let b = with_caps(&[(0x40, 0x01, 0x10)]);
        assert_eq!(run(&b).error, Some(CapError::PointerIntoHeader { from: 0x41, pointer: 0x10 }));
        let b = with_caps(&[(0x40, 0xff, 0x00)]);
        assert_eq!(run(&b).error, Some(CapError::BrokenId { offset: 0x40 }));
        let b = with_caps(&[(0x40, 0x01, 0x00)]);
        let w = run(&b[..64]);
        assert!(matches!(w.error, Some(CapError::Truncated { offset: 0x40, .. })));
        assert!(w.entries.is_empty());
    }

    #[test]
    fn no_status_bit_no_walk() {
        let mut b = with_caps(&[(0x40, 0x01, 0x00)]);
        b[6] = 0;
        assert_eq!(run(&b), CapWalk::default());
    }
}

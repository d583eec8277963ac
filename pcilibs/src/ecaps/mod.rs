//! The extended capability list (offsets 0x100..0x1000) and its decoders.
//!
//! # Walk rules
//!
//! Extended configuration space exists only on PCI Express and PCI-X functions; on a
//! conventional function the bytes at 0x100 are often an alias of the first 256 (as in
//! pciutils' `broken-ecaps` dump) and must not be read as capabilities, so
//! [`walk_if_present`] walks only when a PCI Express or PCI-X capability is present.
//!
//! The walk starts at 0x100. A header of 0 or all ones there means "no extended
//! capabilities". The next pointer (bits 31:20) has its two low bits masked off; 0 ends
//! the list. The walk stops with an [`EcapError`] when a next pointer is below 0x100,
//! when an entry was already visited (a loop), or when an entry lies past the bytes
//! available. At most 960 entries are followed (`(4096 - 256) / 4`), so every walk ends.

use alloc::vec::Vec;

use crate::config::{ConfigSpace, PCIE_CONFIG_SIZE, PCI_CONFIG_SIZE};

pub mod aer;
pub mod misc;
pub mod rebar;
pub mod sriov;

/// Extended capability IDs.
pub mod id {
    /// Null.
    pub const NULL: u16 = 0x0000;
    /// Advanced Error Reporting.
    pub const AER: u16 = 0x0001;
    /// Virtual Channel.
    pub const VC: u16 = 0x0002;
    /// Device Serial Number.
    pub const DSN: u16 = 0x0003;
    /// Power Budgeting.
    pub const POWER_BUDGETING: u16 = 0x0004;
    /// Root Complex Link Declaration.
    pub const RC_LINK: u16 = 0x0005;
    /// Root Complex Internal Link Control.
    pub const RC_INTERNAL_LINK: u16 = 0x0006;
    /// Root Complex Event Collector Endpoint Association.
    pub const RCEC_ASSOCIATION: u16 = 0x0007;
    /// Multi-Function Virtual Channel.
    pub const MFVC: u16 = 0x0008;
    /// Virtual Channel (alternate ID).
    pub const VC2: u16 = 0x0009;
    /// Root Complex Register Block header.
    pub const RCRB: u16 = 0x000a;
    /// Vendor-specific extended capability.
    pub const VENDOR: u16 = 0x000b;
    /// Access Control Services.
    pub const ACS: u16 = 0x000d;
    /// Alternative Routing-ID Interpretation.
    pub const ARI: u16 = 0x000e;
    /// Address Translation Services.
    pub const ATS: u16 = 0x000f;
    /// Single Root I/O Virtualization.
    pub const SRIOV: u16 = 0x0010;
    /// Multi-Root I/O Virtualization.
    pub const MRIOV: u16 = 0x0011;
    /// Multicast.
    pub const MULTICAST: u16 = 0x0012;
    /// Page Request Interface.
    pub const PRI: u16 = 0x0013;
    /// Resizable BAR.
    pub const REBAR: u16 = 0x0015;
    /// Dynamic Power Allocation.
    pub const DPA: u16 = 0x0016;
    /// TPH Requester.
    pub const TPH: u16 = 0x0017;
    /// Latency Tolerance Reporting.
    pub const LTR: u16 = 0x0018;
    /// Secondary PCI Express.
    pub const SECONDARY_PCIE: u16 = 0x0019;
    /// Protocol Multiplexing.
    pub const PMUX: u16 = 0x001a;
    /// Process Address Space ID.
    pub const PASID: u16 = 0x001b;
    /// LN Requester.
    pub const LNR: u16 = 0x001c;
    /// Downstream Port Containment.
    pub const DPC: u16 = 0x001d;
    /// L1 PM Substates.
    pub const L1PM: u16 = 0x001e;
    /// Precision Time Measurement.
    pub const PTM: u16 = 0x001f;
    /// Designated vendor-specific.
    pub const DVSEC: u16 = 0x0023;
    /// VF Resizable BAR.
    pub const VF_REBAR: u16 = 0x0024;
    /// Data Link Feature.
    pub const DATA_LINK_FEATURE: u16 = 0x0025;
    /// Physical Layer 16.0 GT/s.
    pub const PL_16GT: u16 = 0x0026;
    /// Lane Margining at the Receiver.
    pub const LANE_MARGINING: u16 = 0x0027;
    /// Physical Layer 32.0 GT/s.
    pub const PL_32GT: u16 = 0x002a;
    /// Data Object Exchange.
    pub const DOE: u16 = 0x002e;
}

/// At most this many extended capabilities are followed.
pub const MAX_EXT_CAPABILITIES: usize = (PCIE_CONFIG_SIZE - PCI_CONFIG_SIZE) / 4;

/// Errors walking or decoding the extended capability list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EcapError {
    /// The entry at `from` points below 0x100.
    #[error("extended capability at {from:#x} points to {next:#x}, below 0x100")]
    PointerBelowExtendedSpace {
        /// Entry holding the pointer.
        from: u16,
        /// Pointer value.
        next: u16,
    },
    /// The entry at `offset` was already visited.
    #[error("extended capability list loops back to {offset:#x}")]
    Loop {
        /// The revisited entry.
        offset: u16,
    },
    /// An entry header or a register lies past the available bytes.
    #[error(
        "extended capability {id:#06x} at {offset:#x} needs bytes up to {needed:#x}, only {len:#x} available"
    )]
    Truncated {
        /// Capability ID (0 when the header itself is missing).
        id: u16,
        /// Entry offset.
        offset: u16,
        /// End offset of the missing register.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
    /// A field holds a value the specification does not allow.
    #[error("extended capability {id:#06x} at {offset:#x}: {what}")]
    Invalid {
        /// Capability ID.
        id: u16,
        /// Entry offset.
        offset: u16,
        /// What is wrong.
        what: &'static str,
    },
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, EcapError>;

/// One entry of the extended list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ExtCapEntry {
    /// Capability ID.
    pub id: u16,
    /// Capability version.
    pub version: u8,
    /// Offset (0x100..=0xffc).
    pub offset: u16,
}

/// Iterator over the extended list; yields at most one `Err`, then ends.
#[derive(Debug, Clone)]
pub struct ExtCapIter<'a> {
    cs: ConfigSpace<'a>,
    next: u16,
    from: u16,
    visited: [u64; 16],
    done: bool,
}

impl<'a> ExtCapIter<'a> {
    /// Starts a walk at 0x100 (whether or not the function has extended space; see
    /// [`walk_if_present`]).
    pub fn new(cs: ConfigSpace<'a>) -> Self {
        ExtCapIter { cs, next: PCI_CONFIG_SIZE as u16, from: 0, visited: [0; 16], done: false }
    }

    fn fail(&mut self, e: EcapError) -> Option<Result<ExtCapEntry>> {
        self.done = true;
        Some(Err(e))
    }
}

impl Iterator for ExtCapIter<'_> {
    type Item = Result<ExtCapEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next == 0 {
            return None;
        }
        let offset = self.next;
        if usize::from(offset) < PCI_CONFIG_SIZE {
            return self.fail(EcapError::PointerBelowExtendedSpace { from: self.from, next: offset });
        }
        let Some(header) = self.cs.u32(usize::from(offset)) else {
            if offset == PCI_CONFIG_SIZE as u16 {
                // Only 256 bytes available: nothing to walk, not an error.
                self.done = true;
                return None;
            }
            let needed = usize::from(offset) + 4;
            return self.fail(EcapError::Truncated { id: 0, offset, needed, len: self.cs.len() });
        };
        if offset == PCI_CONFIG_SIZE as u16 && (header == 0 || header == u32::MAX) {
            self.done = true;
            return None;
        }
        let slot = usize::from(offset / 4);
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        let Some(seen) = self.visited.get_mut(word) else {
            return self.fail(EcapError::Truncated { id: 0, offset, needed: 0, len: self.cs.len() });
        };
        if *seen & bit != 0 {
            return self.fail(EcapError::Loop { offset });
        }
        *seen |= bit;
        self.from = offset;
        self.next = ((header >> 20) & 0xffc) as u16;
        Some(Ok(ExtCapEntry { id: header as u16, version: ((header >> 16) & 0xf) as u8, offset }))
    }
}

/// The entries of the extended list and the error that ended the walk, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExtCapWalk {
    /// Entries in list order.
    pub entries: Vec<ExtCapEntry>,
    /// Why the walk stopped early.
    pub error: Option<EcapError>,
}

/// Walks the extended list from 0x100.
pub fn walk(cs: ConfigSpace<'_>) -> ExtCapWalk {
    let mut w = ExtCapWalk::default();
    for item in ExtCapIter::new(cs) {
        match item {
            Ok(e) => w.entries.push(e),
            Err(e) => w.error = Some(e),
        }
    }
    w
}

/// Walks the extended list only when `has_extended_space` (the function has a PCI Express
/// or PCI-X capability); otherwise returns an empty walk.
pub fn walk_if_present(cs: ConfigSpace<'_>, has_extended_space: bool) -> ExtCapWalk {
    if has_extended_space {
        walk(cs)
    } else {
        ExtCapWalk::default()
    }
}

/// Offset of the first extended capability with `id`.
pub fn find(cs: ConfigSpace<'_>, id: u16) -> Option<u16> {
    ExtCapIter::new(cs).map_while(|r| r.ok()).find(|e| e.id == id).map(|e| e.offset)
}

/// A decoded extended capability.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExtCapability {
    /// Advanced Error Reporting.
    Aer(aer::Aer),
    /// Device Serial Number.
    Dsn(misc::Dsn),
    /// Access Control Services.
    Acs(misc::Acs),
    /// Alternative Routing-ID Interpretation.
    Ari(misc::Ari),
    /// Address Translation Services.
    Ats(misc::Ats),
    /// Single Root I/O Virtualization.
    Sriov(sriov::Sriov),
    /// Page Request Interface.
    Pri(misc::Pri),
    /// Resizable BAR.
    Rebar(rebar::Rebar),
    /// VF Resizable BAR.
    VfRebar(rebar::Rebar),
    /// Process Address Space ID.
    Pasid(misc::Pasid),
    /// Vendor-specific extended capability header.
    Vendor(misc::VendorHeader),
    /// Designated vendor-specific capability header.
    Dvsec(misc::DvsecHeader),
    /// A capability whose registers are not decoded (see the entry's ID and version).
    Other,
}

/// One extended capability: where it is and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExtCap {
    /// Capability ID.
    pub id: u16,
    /// Version.
    pub version: u8,
    /// Offset.
    pub offset: u16,
    /// Decoded registers, or why they could not be decoded.
    pub decoded: Result<ExtCapability>,
}

/// Decodes one entry.
pub fn decode(cs: ConfigSpace<'_>, entry: ExtCapEntry) -> ExtCap {
    let r = Regs { cs, id: entry.id, offset: entry.offset };
    let decoded = match entry.id {
        id::AER => aer::Aer::decode(&r).map(ExtCapability::Aer),
        id::DSN => misc::Dsn::decode(&r).map(ExtCapability::Dsn),
        id::ACS => misc::Acs::decode(&r).map(ExtCapability::Acs),
        id::ARI => misc::Ari::decode(&r).map(ExtCapability::Ari),
        id::ATS => misc::Ats::decode(&r).map(ExtCapability::Ats),
        id::SRIOV => sriov::Sriov::decode(&r).map(ExtCapability::Sriov),
        id::PRI => misc::Pri::decode(&r).map(ExtCapability::Pri),
        id::REBAR => rebar::Rebar::decode(&r).map(ExtCapability::Rebar),
        id::VF_REBAR => rebar::Rebar::decode(&r).map(ExtCapability::VfRebar),
        id::PASID => misc::Pasid::decode(&r).map(ExtCapability::Pasid),
        id::VENDOR => misc::VendorHeader::decode(&r).map(ExtCapability::Vendor),
        id::DVSEC => misc::DvsecHeader::decode(&r).map(ExtCapability::Dvsec),
        _ => Ok(ExtCapability::Other),
    };
    ExtCap { id: entry.id, version: entry.version, offset: entry.offset, decoded }
}

/// Human name of an extended capability ID.
pub fn name(id: u16) -> &'static str {
    match id {
        id::NULL => "Null",
        id::AER => "Advanced Error Reporting",
        id::VC | id::VC2 => "Virtual Channel",
        id::DSN => "Device Serial Number",
        id::POWER_BUDGETING => "Power Budgeting",
        id::RC_LINK => "Root Complex Link",
        id::RC_INTERNAL_LINK => "Root Complex Internal Link",
        id::RCEC_ASSOCIATION => "Root Complex Event Collector",
        id::MFVC => "Multi-Function Virtual Channel",
        id::RCRB => "Root Complex Register Block",
        id::VENDOR => "Vendor Specific Information",
        id::ACS => "Access Control Services",
        id::ARI => "Alternative Routing-ID Interpretation (ARI)",
        id::ATS => "Address Translation Service (ATS)",
        id::SRIOV => "Single Root I/O Virtualization (SR-IOV)",
        id::MRIOV => "Multi-Root I/O Virtualization",
        id::MULTICAST => "Multicast",
        id::PRI => "Page Request Interface (PRI)",
        id::REBAR => "Physical Resizable BAR",
        id::DPA => "Dynamic Power Allocation",
        id::TPH => "Transaction Processing Hints",
        id::LTR => "Latency Tolerance Reporting",
        id::SECONDARY_PCIE => "Secondary PCI Express",
        id::PMUX => "Protocol Multiplexing",
        id::PASID => "Process Address Space ID (PASID)",
        id::LNR => "LN Requester",
        id::DPC => "Downstream Port Containment",
        id::L1PM => "L1 PM Substates",
        id::PTM => "Precision Time Measurement",
        id::DVSEC => "Designated Vendor-Specific",
        id::VF_REBAR => "VF Resizable BAR",
        id::DATA_LINK_FEATURE => "Data Link Feature",
        id::PL_16GT => "Physical Layer 16.0 GT/s",
        id::LANE_MARGINING => "Lane Margining at the Receiver",
        id::PL_32GT => "Physical Layer 32.0 GT/s",
        id::DOE => "Data Object Exchange",
        _ => "Unknown",
    }
}

/// Registers of one extended capability, read relative to its offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Regs<'a> {
    cs: ConfigSpace<'a>,
    id: u16,
    offset: u16,
}

impl<'a> Regs<'a> {
    fn missing(&self, rel: usize, width: usize) -> EcapError {
        EcapError::Truncated {
            id: self.id,
            offset: self.offset,
            needed: usize::from(self.offset) + rel + width,
            len: self.cs.len(),
        }
    }

    /// An `Invalid` error for this capability.
    pub(crate) fn invalid(&self, what: &'static str) -> EcapError {
        EcapError::Invalid { id: self.id, offset: self.offset, what }
    }

    /// The whole configuration space.
    pub(crate) fn config(&self) -> ConfigSpace<'a> {
        self.cs
    }

    /// Offset of the capability.
    pub(crate) fn offset(&self) -> usize {
        usize::from(self.offset)
    }

    /// Byte at `rel`.
    pub(crate) fn u8(&self, rel: usize) -> Result<u8> {
        self.cs.u8(self.offset() + rel).ok_or_else(|| self.missing(rel, 1))
    }

    /// 16-bit register at `rel`.
    pub(crate) fn u16(&self, rel: usize) -> Result<u16> {
        self.cs.u16(self.offset() + rel).ok_or_else(|| self.missing(rel, 2))
    }

    /// 32-bit register at `rel`.
    pub(crate) fn u32(&self, rel: usize) -> Result<u32> {
        self.cs.u32(self.offset() + rel).ok_or_else(|| self.missing(rel, 4))
    }

    /// 64-bit register at `rel`.
    pub(crate) fn u64(&self, rel: usize) -> Result<u64> {
        self.cs.u64(self.offset() + rel).ok_or_else(|| self.missing(rel, 8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(list: &[(u16, u16, u16)]) -> alloc::vec::Vec<u8> {
        // (offset, id, next)
        let mut b = alloc::vec![0u8; 4096];
        for &(off, id, next) in list {
            let h = u32::from(id) | (1 << 16) | (u32::from(next) << 20);
            b[off as usize..off as usize + 4].copy_from_slice(&h.to_le_bytes());
        }
        b
    }

    #[test]
    fn follows_the_list() {
        let b = space(&[(0x100, 1, 0x148), (0x148, 0x10, 0x0)]);
        let w = walk(ConfigSpace::new(&b));
        assert_eq!(w.error, None);
        assert_eq!(
            w.entries,
            [
                ExtCapEntry { id: 1, version: 1, offset: 0x100 },
                ExtCapEntry { id: 0x10, version: 1, offset: 0x148 }
            ]
        );
    }

    #[test]
    fn loops_low_pointers_and_truncation_are_errors() {
        let b = space(&[(0x100, 1, 0x200), (0x200, 2, 0x100)]);
        assert_eq!(walk(ConfigSpace::new(&b)).error, Some(EcapError::Loop { offset: 0x100 }));
        let b = space(&[(0x100, 1, 0x40)]);
        assert_eq!(
            walk(ConfigSpace::new(&b)).error,
            Some(EcapError::PointerBelowExtendedSpace { from: 0x100, next: 0x40 })
        );
        let b = space(&[(0x100, 1, 0x200)]);
        let w = walk(ConfigSpace::new(&b[..0x180]));
        assert_eq!(w.entries.len(), 1);
        assert!(matches!(w.error, Some(EcapError::Truncated { offset: 0x200, .. })));
    }

    #[test]
    fn empty_space_has_no_entries() {
        for b in [alloc::vec![0u8; 4096], alloc::vec![0xffu8; 4096], alloc::vec![0u8; 256]] {
            assert_eq!(walk(ConfigSpace::new(&b)), ExtCapWalk::default());
        }
        let b = space(&[(0x100, 1, 0)]);
        assert_eq!(walk_if_present(ConfigSpace::new(&b), false), ExtCapWalk::default());
    }
}

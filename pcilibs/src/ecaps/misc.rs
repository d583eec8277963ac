//! Small extended capabilities: DSN, ACS, ARI, ATS, PRI, PASID and vendor headers.

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// Device Serial Number (0x0003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Dsn {
    /// The 64-bit serial number.
    pub serial: u64,
}

impl Dsn {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        Ok(Dsn { serial: r.u64(4)? })
    }
}

/// Access Control Services (0x000d).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Acs {
    /// ACS capability register (bit 0 source validation, 1 translation blocking,
    /// 2 P2P request redirect, 3 P2P completion redirect, 4 upstream forwarding,
    /// 5 P2P egress control, 6 direct translated P2P).
    pub capabilities: u16,
    /// ACS control register (same bit layout, enables).
    pub control: u16,
    /// Egress control vector size (bits 15:8 of the capability register).
    pub egress_vector_size: u8,
}

impl Acs {
    /// Whether P2P request redirect and completion redirect and upstream forwarding are
    /// all enabled, i.e. peer-to-peer traffic is forced through the root complex.
    pub fn isolates_peers(&self) -> bool {
        self.control & 0b1_1100 == 0b1_1100
    }

    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let capabilities = r.u16(4)?;
        Ok(Acs { capabilities, control: r.u16(6)?, egress_vector_size: (capabilities >> 8) as u8 })
    }
}

/// Alternative Routing-ID Interpretation (0x000e).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ari {
    /// MFVC function groups capable.
    pub mfvc: bool,
    /// ACS function groups capable.
    pub acs: bool,
    /// Next function number in the device (0 ends the chain).
    pub next_function: u8,
}

impl Ari {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let cap = r.u16(4)?;
        Ok(Ari { mfvc: cap & 1 != 0, acs: cap & 2 != 0, next_function: (cap >> 8) as u8 })
    }
}

/// Address Translation Services (0x000f).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ats {
    /// Invalidate queue depth (1..=32).
    pub invalidate_queue_depth: u8,
    /// Page aligned requests.
    pub page_aligned_request: bool,
    /// Global invalidate supported.
    pub global_invalidate: bool,
    /// ATS enabled.
    pub enabled: bool,
    /// Smallest translation unit (encoded, 4 KiB << value).
    pub smallest_translation_unit: u8,
}

impl Ats {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let cap = r.u16(4)?;
        let ctl = r.u16(6)?;
        let depth = (cap & 0x1f) as u8;
        Ok(Ats {
            invalidate_queue_depth: if depth == 0 { 32 } else { depth },
            page_aligned_request: cap & (1 << 5) != 0,
            global_invalidate: cap & (1 << 6) != 0,
            enabled: ctl & (1 << 15) != 0,
            smallest_translation_unit: (ctl & 0x1f) as u8,
        })
    }
}

/// Page Request Interface (0x0013).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Pri {
    /// PRI enabled.
    pub enabled: bool,
    /// Stopped (status bit 8).
    pub stopped: bool,
    /// PRG response PASID required.
    pub pasid_required: bool,
    /// Outstanding page request capacity.
    pub outstanding_capacity: u32,
    /// Outstanding page request allocation.
    pub outstanding_allocation: u32,
}

impl Pri {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let ctl = r.u16(4)?;
        let sta = r.u16(6)?;
        Ok(Pri {
            enabled: ctl & 1 != 0,
            stopped: sta & (1 << 8) != 0,
            pasid_required: sta & (1 << 15) != 0,
            outstanding_capacity: r.u32(8)?,
            outstanding_allocation: r.u32(0xc)?,
        })
    }
}

/// Process Address Space ID (0x001b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Pasid {
    /// Execute permission supported.
    pub execute: bool,
    /// Privileged mode supported.
    pub privileged: bool,
    /// Max PASID width in bits.
    pub max_width: u8,
    /// PASID enabled.
    pub enabled: bool,
}

impl Pasid {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let cap = r.u16(4)?;
        let ctl = r.u16(6)?;
        Ok(Pasid {
            execute: cap & (1 << 1) != 0,
            privileged: cap & (1 << 2) != 0,
            max_width: ((cap >> 8) & 0x1f) as u8,
            enabled: ctl & 1 != 0,
        })
    }
}

/// Header of a vendor-specific extended capability (0x000b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VendorHeader {
    /// VSEC ID.
    pub vsec_id: u16,
    /// VSEC revision.
    pub revision: u8,
    /// Length in bytes.
    pub length: u16,
}

impl VendorHeader {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let h = r.u32(4)?;
        Ok(VendorHeader { vsec_id: h as u16, revision: ((h >> 16) & 0xf) as u8, length: (h >> 20) as u16 })
    }
}

/// Header of a designated vendor-specific capability (0x0023).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DvsecHeader {
    /// Vendor that defined the layout.
    pub vendor_id: u16,
    /// Revision.
    pub revision: u8,
    /// Length in bytes.
    pub length: u16,
    /// DVSEC ID.
    pub dvsec_id: u16,
}

impl DvsecHeader {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let h1 = r.u32(4)?;
        Ok(DvsecHeader {
            vendor_id: h1 as u16,
            revision: ((h1 >> 16) & 0xf) as u8,
            length: (h1 >> 20) as u16,
            dvsec_id: r.u16(8)?,
        })
    }
}

//! Advanced Error Reporting (extended capability 0x0001).

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// Decoded AER registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Aer {
    /// Uncorrectable error status.
    pub uncorrectable_status: u32,
    /// Uncorrectable error mask.
    pub uncorrectable_mask: u32,
    /// Uncorrectable error severity (1 = fatal).
    pub uncorrectable_severity: u32,
    /// Correctable error status.
    pub correctable_status: u32,
    /// Correctable error mask.
    pub correctable_mask: u32,
    /// First error pointer (bit number in the uncorrectable status).
    pub first_error_pointer: u8,
    /// ECRC generation capable.
    pub ecrc_generation_capable: bool,
    /// ECRC generation enabled.
    pub ecrc_generation_enabled: bool,
    /// ECRC check capable.
    pub ecrc_check_capable: bool,
    /// ECRC check enabled.
    pub ecrc_check_enabled: bool,
}

impl Aer {
    /// True when any unmasked uncorrectable or correctable error is logged.
    pub fn has_unmasked_errors(&self) -> bool {
        self.uncorrectable_status & !self.uncorrectable_mask != 0
            || self.correctable_status & !self.correctable_mask != 0
    }

    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let cc = r.u32(0x18)?;
        Ok(Aer {
            uncorrectable_status: r.u32(0x04)?,
            uncorrectable_mask: r.u32(0x08)?,
            uncorrectable_severity: r.u32(0x0c)?,
            correctable_status: r.u32(0x10)?,
            correctable_mask: r.u32(0x14)?,
            first_error_pointer: (cc & 0x1f) as u8,
            ecrc_generation_capable: cc & (1 << 5) != 0,
            ecrc_generation_enabled: cc & (1 << 6) != 0,
            ecrc_check_capable: cc & (1 << 7) != 0,
            ecrc_check_enabled: cc & (1 << 8) != 0,
        })
    }
}

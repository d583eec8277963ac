//! Resizable BAR (0x0015) and VF Resizable BAR (0x0024).
//!
//! Each entry has a capability register whose bits 31:4 say which sizes the BAR supports
//! (bit 4 = 1 MiB, bit 5 = 2 MiB, … bit 31 = 128 TiB) and a control register with the BAR
//! index (2:0), the number of entries (7:5, first entry only), the current size (13:8,
//! encoded as `1 MiB << n`) and, since PCIe 5.0, more supported sizes in bits 31:16
//! (bit 16 = 256 TiB … bit 31 = 8 EiB).

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

const MIB: u64 = 1 << 20;

/// One resizable BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RebarEntry {
    /// BAR index this entry controls.
    pub bar: u8,
    /// Supported sizes as a mask: bit `n` set means `1 MiB << n` is supported.
    pub supported: u64,
    /// Current size in bytes.
    pub current_size: u64,
}

impl RebarEntry {
    /// Supported sizes in bytes, smallest first.
    pub fn sizes(&self) -> impl Iterator<Item = u64> + '_ {
        (0..44u32).filter(|n| self.supported & (1 << n) != 0).map(|n| MIB << n)
    }

    /// Largest supported size in bytes.
    pub fn max_size(&self) -> Option<u64> {
        (self.supported != 0).then(|| MIB << (63 - self.supported.leading_zeros()))
    }
}

/// Decoded Resizable BAR capability.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rebar {
    /// One entry per resizable BAR.
    pub entries: Vec<RebarEntry>,
}

impl Rebar {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let first_ctl = r.u32(8)?;
        let count = (first_ctl >> 5) & 7;
        if count == 0 || count > 6 {
            return Err(r.invalid("number of resizable BARs is not 1..=6"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let cap = r.u32(4 + 8 * i)?;
            let ctl = r.u32(8 + 8 * i)?;
            let supported = u64::from(cap >> 4) | (u64::from(ctl >> 16) << 28);
            let current = (ctl >> 8) & 0x3f;
            entries.push(RebarEntry {
                bar: (ctl & 7) as u8,
                supported,
                current_size: MIB.checked_shl(current).unwrap_or(0),
            });
        }
        Ok(Rebar { entries })
    }
}

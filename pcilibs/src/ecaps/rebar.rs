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
/// Size encodings: bit `n` (and a current-size field of `n`) means `1 MiB << n`; the
/// registers define `n` up to 43 (8 EiB), and `1 MiB << 44` would not fit 64 bits.
const SIZE_ENCODINGS: u32 = 44;

/// One resizable BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RebarEntry {
    /// BAR index this entry controls.
    pub bar: u8,
    /// Supported sizes as a mask: bit `n` set means `1 MiB << n` is supported (bits 44
    /// and up mean nothing and are ignored).
    pub supported: u64,
    /// Current size in bytes (0 when the register holds a reserved encoding).
    pub current_size: u64,
}

impl RebarEntry {
    /// Supported sizes in bytes, smallest first.
    pub fn sizes(&self) -> impl Iterator<Item = u64> + '_ {
        (0..SIZE_ENCODINGS).filter(|n| self.supported & (1 << n) != 0).map(|n| MIB << n)
    }

    /// Largest supported size in bytes.
    pub fn max_size(&self) -> Option<u64> {
        self.sizes().last()
    }
}

/// Decoded Resizable BAR capability.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
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
                current_size: if current < SIZE_ENCODINGS { MIB << current } else { 0 },
            });
        }
        Ok(Rebar { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits past the defined encodings used to shift a size out of 64 bits: the largest
    /// size read as 0 (`1 MiB << 44` wraps) instead of the largest defined one.
    #[test]
    fn sizes_past_the_encodings_do_not_wrap() {
        let e = RebarEntry { bar: 0, supported: (1 << 63) | (1 << 50) | (1 << 43) | 1, current_size: 0 };
        assert_eq!(e.max_size(), Some(1 << 63));
        assert_eq!(e.sizes().collect::<Vec<_>>(), [MIB, 1 << 63]);
        let none = RebarEntry { bar: 0, supported: 1 << 60, current_size: 0 };
        assert_eq!(none.max_size(), None);
        for supported in [0u64, 1, u64::MAX, 0xf_ffff_ffff_ffff] {
            let e = RebarEntry { bar: 0, supported, current_size: 0 };
            assert!(e.sizes().all(|s| s.is_power_of_two() && s >= MIB));
            assert_eq!(e.max_size(), e.sizes().max());
        }
    }
}

//! Base Address Registers: what kind of address space a BAR decodes and how large it is.

use serde::{Deserialize, Serialize};

/// The address space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BarKind {
    /// I/O port space.
    Io,
    /// 32-bit memory space (also the legacy "below 1 MiB" encoding).
    Mem32,
    /// 64-bit memory space; occupies two BAR slots.
    Mem64,
}

/// One decoded and sized BAR of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bar {
    /// BAR slot index (0..=5 for type 0, 0..=1 for type 1). For a 64-bit BAR, the lower slot.
    pub index: u8,
    /// Address space the BAR decodes.
    pub kind: BarKind,
    /// Whether the memory BAR is prefetchable (always false for I/O).
    pub prefetchable: bool,
    /// Size in bytes, a power of two; `None` when the size is unknown (no sizing source).
    pub size: Option<u64>,
}

use alloc::vec::Vec;

use crate::config::{ConfigSpace, Header};

/// Errors decoding BAR registers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BarError {
    /// Memory type bits 2:1 are `11`, a reserved encoding.
    #[error("BAR {index}: reserved memory type encoding in {raw:#010x}")]
    ReservedType {
        /// BAR slot.
        index: u8,
        /// Register value.
        raw: u32,
    },
    /// A 64-bit BAR starts in the last slot, so its upper half does not exist.
    #[error("BAR {index}: 64-bit BAR in the last slot has no upper half")]
    Mem64InLastSlot {
        /// BAR slot.
        index: u8,
    },
    /// A 64-bit BAR's upper half was not supplied to [`decode_register`].
    #[error("BAR {index}: 64-bit BAR without its upper half")]
    MissingUpperHalf {
        /// BAR slot of the lower half.
        index: u8,
    },
    /// The register lies past the available bytes.
    #[error("BAR {index}: register at {offset:#x} is past the available bytes")]
    Truncated {
        /// BAR slot.
        index: u8,
        /// Register offset.
        offset: usize,
    },
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, BarError>;

/// A BAR as the registers describe it (no size: registers alone cannot tell it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BarRegister {
    /// Slot index; for a 64-bit BAR the lower slot.
    pub index: u8,
    /// Address space decoded.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Programmed base address (flag bits cleared; both halves for 64-bit).
    pub address: u64,
    /// Raw value of the (lower) register.
    pub raw: u32,
    /// Memory type `01`: the legacy "below 1 MiB" encoding (reported as [`BarKind::Mem32`]).
    pub below_1m: bool,
}

impl BarRegister {
    /// Whether the register reads as all zeros or all ones, which is what an
    /// unimplemented BAR, or an implemented but unassigned 32-bit one, reads as.
    /// Without a size source such a BAR cannot be told apart from no BAR.
    pub fn looks_unused(&self) -> bool {
        self.raw == 0 || self.raw == u32::MAX
    }

    /// Combines the register with a size.
    pub fn with_size(&self, size: Option<u64>) -> Bar {
        Bar { index: self.index, kind: self.kind, prefetchable: self.prefetchable, size }
    }
}

/// The decoded BAR registers of one block (the header's, or the SR-IOV VF BARs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BarRegisters {
    /// Every slot that decodes, in order; the upper half of a 64-bit BAR has no entry.
    pub bars: Vec<BarRegister>,
    /// Slots that do not decode.
    pub errors: Vec<BarError>,
}

impl BarRegisters {
    /// The register of slot `index`, if one starts there.
    pub fn get(&self, index: u8) -> Option<&BarRegister> {
        self.bars.iter().find(|b| b.index == index)
    }
}

/// Decodes one BAR register value; `upper` supplies the next slot for 64-bit BARs.
pub fn decode_register(index: u8, raw: u32, upper: Option<u32>, last_slot: bool) -> Result<BarRegister> {
    if raw & 1 == 1 {
        return Ok(BarRegister {
            index,
            kind: BarKind::Io,
            prefetchable: false,
            address: u64::from(raw & !3),
            raw,
            below_1m: false,
        });
    }
    let prefetchable = raw & 8 != 0;
    let low = u64::from(raw & !0xf);
    match (raw >> 1) & 3 {
        0 | 1 => Ok(BarRegister {
            index,
            kind: BarKind::Mem32,
            prefetchable,
            address: low,
            raw,
            below_1m: (raw >> 1) & 3 == 1,
        }),
        2 if last_slot => Err(BarError::Mem64InLastSlot { index }),
        2 => {
            let hi = upper.ok_or(BarError::MissingUpperHalf { index })?;
            Ok(BarRegister {
                index,
                kind: BarKind::Mem64,
                prefetchable,
                address: (u64::from(hi) << 32) | low,
                raw,
                below_1m: false,
            })
        }
        _ => Err(BarError::ReservedType { index, raw }),
    }
}

/// Decodes `count` consecutive BAR registers starting at `base`.
pub fn decode_block(cs: ConfigSpace<'_>, base: usize, count: u8) -> BarRegisters {
    let mut out = BarRegisters::default();
    let mut i: u8 = 0;
    while i < count {
        let offset = base + usize::from(i) * 4;
        let Some(raw) = cs.u32(offset) else {
            out.errors.push(BarError::Truncated { index: i, offset });
            break;
        };
        let last = i + 1 == count;
        let upper = if last { None } else { cs.u32(offset + 4) };
        match decode_register(i, raw, upper, last) {
            Ok(b) => {
                i += if b.kind == BarKind::Mem64 { 2 } else { 1 };
                out.bars.push(b);
            }
            Err(BarError::MissingUpperHalf { index }) => {
                out.errors.push(BarError::Truncated { index: index + 1, offset: offset + 4 });
                break;
            }
            Err(e) => {
                out.errors.push(e);
                i += 1;
            }
        }
    }
    out
}

/// Decodes the BARs of the header (6 for type 0, 2 for type 1, 1 for CardBus).
pub fn decode_header_bars(cs: ConfigSpace<'_>, header: &Header) -> BarRegisters {
    decode_block(cs, crate::config::reg::BAR0, header.header_type.bar_count())
}

/// The expansion ROM base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RomRegister {
    /// Programmed address (bits 31:11).
    pub address: u32,
    /// ROM address decoding enabled (bit 0).
    pub enabled: bool,
    /// Raw register.
    pub raw: u32,
}

/// Decodes the expansion ROM register, if the layout has one and the bytes are there.
pub fn decode_rom(cs: ConfigSpace<'_>, header: &Header) -> Option<RomRegister> {
    let raw = cs.u32(header.header_type.rom_register()?)?;
    Some(RomRegister { address: raw & 0xffff_f800, enabled: raw & 1 != 0, raw })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(regs: &[u32]) -> BarRegisters {
        let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
        decode_block(ConfigSpace::new(&bytes), 0, regs.len() as u8)
    }

    #[test]
    fn decodes_every_kind() {
        let b = block(&[0xfebf_1000, 0x0000_c001, 0xe000_000c, 0x0000_0001, 0x0010_0008, 0]);
        assert!(b.errors.is_empty());
        let kinds: Vec<_> = b.bars.iter().map(|r| (r.index, r.kind, r.prefetchable)).collect();
        assert_eq!(
            kinds,
            [
                (0, BarKind::Mem32, false),
                (1, BarKind::Io, false),
                (2, BarKind::Mem64, true),
                (4, BarKind::Mem32, true),
                (5, BarKind::Mem32, false)
            ]
        );
        assert_eq!(b.get(2).unwrap().address, 0x1_e000_0000);
        assert_eq!(b.get(1).unwrap().address, 0xc000);
        assert!(b.get(5).unwrap().looks_unused());
    }

    #[test]
    fn reserved_type_and_last_slot_are_errors() {
        let b = block(&[0x0000_0006, 0, 0x0000_0004]);
        assert_eq!(
            b.errors,
            [BarError::ReservedType { index: 0, raw: 6 }, BarError::Mem64InLastSlot { index: 2 }]
        );
        assert_eq!(b.bars.len(), 1);
        let legacy = block(&[0x000d_0002]);
        assert!(legacy.bars[0].below_1m);
        assert_eq!(legacy.bars[0].kind, BarKind::Mem32);
    }

    #[test]
    fn truncated_block_stops() {
        let bytes = 0x0000_000cu32.to_le_bytes();
        let b = decode_block(ConfigSpace::new(&bytes), 0, 6);
        assert!(b.bars.is_empty());
        assert_eq!(b.errors, [BarError::Truncated { index: 1, offset: 4 }]);
    }
}

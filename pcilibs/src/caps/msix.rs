//! MSI-X capability (ID 0x11).

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// Decoded MSI-X capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MsiX {
    /// MSI-X enabled.
    pub enabled: bool,
    /// All vectors masked.
    pub function_mask: bool,
    /// Number of table entries (vectors), 1..=2048.
    pub table_size: u16,
    /// BAR index (BIR) holding the vector table.
    pub table_bar: u8,
    /// Offset of the vector table in that BAR.
    pub table_offset: u32,
    /// BAR index holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the pending-bit array in that BAR.
    pub pba_offset: u32,
}

impl MsiX {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let ctl = r.u16(2)?;
        let table = r.u32(4)?;
        let pba = r.u32(8)?;
        Ok(MsiX {
            enabled: ctl & (1 << 15) != 0,
            function_mask: ctl & (1 << 14) != 0,
            table_size: (ctl & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
            pba_bar: (pba & 7) as u8,
            pba_offset: pba & !7,
        })
    }
}

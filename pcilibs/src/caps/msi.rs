//! Message Signaled Interrupts capability (ID 0x05).

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// Decoded MSI capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Msi {
    /// MSI enabled.
    pub enabled: bool,
    /// Vectors the function can request (1, 2, 4, … 32).
    pub vectors_capable: u8,
    /// Vectors software enabled.
    pub vectors_enabled: u8,
    /// The message address is 64 bits wide.
    pub address_64bit: bool,
    /// Per-vector masking capable.
    pub per_vector_masking: bool,
}

impl Msi {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let ctl = r.u16(2)?;
        // Encodings above 5 are reserved; clamp so the count stays meaningful.
        let count = |field: u16| 1u8 << field.min(5);
        Ok(Msi {
            enabled: ctl & 1 != 0,
            vectors_capable: count((ctl >> 1) & 7),
            vectors_enabled: count((ctl >> 4) & 7),
            address_64bit: ctl & (1 << 7) != 0,
            per_vector_masking: ctl & (1 << 8) != 0,
        })
    }
}

//! PCI Power Management capability (ID 0x01).

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// Decoded Power Management capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PowerManagement {
    /// Version of the PM specification (bits 2:0 of PMC).
    pub version: u8,
    /// D1 supported.
    pub d1: bool,
    /// D2 supported.
    pub d2: bool,
    /// PME# support bit mask (bits 15:11 of PMC: D0, D1, D2, D3hot, D3cold).
    pub pme_support: u8,
    /// Device-specific initialization required.
    pub dsi: bool,
    /// Auxiliary current requirement field (bits 8:6 of PMC).
    pub aux_current: u8,
    /// Current power state (0 = D0 … 3 = D3hot).
    pub power_state: u8,
    /// No soft reset when going D3hot → D0.
    pub no_soft_reset: bool,
    /// PME enable.
    pub pme_enabled: bool,
    /// PME status.
    pub pme_status: bool,
}

impl PowerManagement {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let pmc = r.u16(2)?;
        let csr = r.u16(4)?;
        Ok(PowerManagement {
            version: (pmc & 7) as u8,
            d1: pmc & (1 << 9) != 0,
            d2: pmc & (1 << 10) != 0,
            pme_support: (pmc >> 11) as u8,
            dsi: pmc & (1 << 5) != 0,
            aux_current: ((pmc >> 6) & 7) as u8,
            power_state: (csr & 3) as u8,
            no_soft_reset: csr & (1 << 3) != 0,
            pme_enabled: csr & (1 << 8) != 0,
            pme_status: csr & (1 << 15) != 0,
        })
    }
}

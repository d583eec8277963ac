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

//! Address-space requirement of a set of functions behind one bridge window.
//!
//! # The rule
//!
//! A PCI-to-PCI bridge (a PCIe root port or switch port) forwards three windows:
//! I/O, non-prefetchable memory (32-bit only) and prefetchable memory (64-bit capable).
//! Every BAR below the bridge must fit one of them at its *natural alignment*
//! (a BAR of size `s` sits at a multiple of `s`). Following Linux's bridge sizing
//! (`pbus_size_mem` with a 64-bit prefetchable window):
//!
//! | BAR                          | window   |
//! |------------------------------|----------|
//! | I/O                          | `io`     |
//! | 32- or 64-bit non-prefetchable memory | `mem` |
//! | 32-bit prefetchable memory   | `mem` (a 64-bit prefetchable window cannot take it) |
//! | 64-bit prefetchable memory   | `pref`   |
//! | expansion ROM                | `mem`    |
//!
//! For each window the resources are ordered by alignment, largest first, and packed
//! one after another. Because every alignment is a power of two and every resource size
//! is a multiple of its own alignment, that packing leaves no gaps, so the smallest
//! window is the sum of the sizes and its start must be aligned to the largest
//! alignment. Finally the size is rounded up to the bridge's granularity
//! (4 KiB for I/O, 1 MiB for memory) and the alignment is at least that granularity.
//!
//! An SR-IOV VF BAR is one resource of `per-VF size × VF count` bytes aligned to the
//! per-VF size (VF BARs of all VFs are contiguous).

use serde::{Deserialize, Serialize};

use crate::bar::BarKind;

/// Bridge I/O window granularity (PCI-to-PCI bridge spec).
pub const IO_GRANULARITY: u64 = 4 << 10;
/// Bridge memory window granularity (PCI-to-PCI bridge spec).
pub const MEM_GRANULARITY: u64 = 1 << 20;

/// One piece of address space a function needs: a BAR, a ROM or an SR-IOV VF BAR aperture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resource {
    /// Address space decoded.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Whether this is an expansion ROM (always placed in the non-prefetchable window).
    pub rom: bool,
    /// Size in bytes (a multiple of `align`).
    pub size: u64,
    /// Required alignment in bytes (a power of two).
    pub align: u64,
}

impl Resource {
    /// A BAR of `size` bytes (a power of two) at its natural alignment.
    pub fn bar(kind: BarKind, prefetchable: bool, size: u64) -> Self {
        Resource { kind, prefetchable, rom: false, size, align: size }
    }

    /// The window this resource must be placed in, per the rule in the module docs.
    pub fn window(&self) -> Window {
        match (self.kind, self.prefetchable, self.rom) {
            (BarKind::Io, _, _) => Window::Io,
            (_, _, true) => Window::Mem,
            (BarKind::Mem64, true, false) => Window::Pref,
            _ => Window::Mem,
        }
    }
}

/// The three windows of a PCI-to-PCI bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Window {
    /// I/O window.
    Io,
    /// Non-prefetchable memory window (below 4 GiB).
    Mem,
    /// 64-bit prefetchable memory window.
    Pref,
}

/// Minimal size and alignment of one bridge window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowRequirement {
    /// Smallest window size in bytes; 0 when nothing needs this window.
    pub size: u64,
    /// Alignment of the window start in bytes; 0 when `size` is 0.
    pub align: u64,
}

impl WindowRequirement {
    /// True when nothing needs this window.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// A window that holds both `self` and `other` (each packed at its alignment).
    ///
    /// Returns `None` on arithmetic overflow.
    pub fn combine(&self, other: &WindowRequirement) -> Option<WindowRequirement> {
        if self.is_empty() {
            return Some(*other);
        }
        if other.is_empty() {
            return Some(*self);
        }
        // Largest alignment first; the second part starts at the first's end rounded up.
        let (first, second) = if self.align >= other.align { (self, other) } else { (other, self) };
        let start = align_up(first.size, second.align)?;
        Some(WindowRequirement { size: start.checked_add(second.size)?, align: first.align })
    }
}

/// Address-space requirement of a set of functions for the three bridge windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requirement {
    /// I/O window.
    pub io: WindowRequirement,
    /// Non-prefetchable (32-bit) memory window.
    pub mem: WindowRequirement,
    /// 64-bit prefetchable memory window.
    pub pref: WindowRequirement,
}

/// Errors computing a requirement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequirementError {
    /// A resource's alignment is zero or not a power of two, or its size is not a multiple of it.
    #[error("resource of {size:#x} bytes has invalid alignment {align:#x}")]
    BadAlignment {
        /// Size of the offending resource.
        size: u64,
        /// Its alignment.
        align: u64,
    },
    /// The sum of the sizes does not fit in 64 bits.
    #[error("address-space requirement overflows 64 bits")]
    Overflow,
}

impl Requirement {
    /// Computes the requirement of `resources` per the rule in the module docs.
    pub fn of<'a, I>(resources: I) -> Result<Requirement, RequirementError>
    where
        I: IntoIterator<Item = &'a Resource>,
    {
        let mut per_window: [alloc::vec::Vec<(u64, u64)>; 3] = Default::default();
        for r in resources {
            if r.size == 0 {
                continue;
            }
            if r.align == 0 || !r.align.is_power_of_two() || r.size % r.align != 0 {
                return Err(RequirementError::BadAlignment { size: r.size, align: r.align });
            }
            let slot = match r.window() {
                Window::Io => 0,
                Window::Mem => 1,
                Window::Pref => 2,
            };
            if let Some(list) = per_window.get_mut(slot) {
                list.push((r.align, r.size));
            }
        }
        let [io, mem, pref] = per_window;
        Ok(Requirement {
            io: pack(io, IO_GRANULARITY)?,
            mem: pack(mem, MEM_GRANULARITY)?,
            pref: pack(pref, MEM_GRANULARITY)?,
        })
    }

    /// The requirement of a window that holds both `self` and `other` (e.g. two
    /// downstream ports below one upstream port use [`Requirement::combine`]).
    pub fn combine(&self, other: &Requirement) -> Result<Requirement, RequirementError> {
        let c = |a: &WindowRequirement, b: &WindowRequirement| a.combine(b).ok_or(RequirementError::Overflow);
        Ok(Requirement {
            io: c(&self.io, &other.io)?,
            mem: c(&self.mem, &other.mem)?,
            pref: c(&self.pref, &other.pref)?,
        })
    }
}

/// Packs `(align, size)` items largest alignment first and rounds to `granularity`.
fn pack(
    mut items: alloc::vec::Vec<(u64, u64)>,
    granularity: u64,
) -> Result<WindowRequirement, RequirementError> {
    if items.is_empty() {
        return Ok(WindowRequirement::default());
    }
    items.sort_unstable_by(|a, b| b.cmp(a));
    let mut size: u64 = 0;
    let mut align = granularity;
    for (a, s) in items {
        size = align_up(size, a).and_then(|v| v.checked_add(s)).ok_or(RequirementError::Overflow)?;
        align = align.max(a);
    }
    let size = align_up(size, granularity).ok_or(RequirementError::Overflow)?;
    Ok(WindowRequirement { size, align })
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    if align <= 1 {
        return Some(v);
    }
    let mask = align - 1;
    v.checked_add(mask).map(|x| x & !mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn h100_like_gpu() {
        let bars = [
            Resource::bar(BarKind::Mem32, false, 16 * MIB),
            Resource::bar(BarKind::Mem64, true, 128 * GIB),
            Resource::bar(BarKind::Mem64, true, 32 * MIB),
        ];
        let r = Requirement::of(&bars).unwrap();
        assert_eq!(r.mem, WindowRequirement { size: 16 * MIB, align: 16 * MIB });
        assert_eq!(r.pref, WindowRequirement { size: 128 * GIB + 32 * MIB, align: 128 * GIB });
        assert!(r.io.is_empty());
    }

    #[test]
    fn small_bars_round_to_granularity() {
        let bars = [Resource::bar(BarKind::Io, false, 32), Resource::bar(BarKind::Mem32, false, 4096)];
        let r = Requirement::of(&bars).unwrap();
        assert_eq!(r.io, WindowRequirement { size: 4096, align: 4096 });
        assert_eq!(r.mem, WindowRequirement { size: MIB, align: MIB });
    }

    #[test]
    fn pref32_and_rom_go_to_mem() {
        let rom = Resource { rom: true, ..Resource::bar(BarKind::Mem32, true, 512 << 10) };
        let bars = [Resource::bar(BarKind::Mem32, true, 8 * MIB), rom];
        let r = Requirement::of(&bars).unwrap();
        assert_eq!(r.mem.size, 9 * MIB);
        assert!(r.pref.is_empty());
    }

    #[test]
    fn vf_aperture_is_not_power_of_two() {
        let vf =
            Resource { kind: BarKind::Mem64, prefetchable: true, rom: false, size: 7 * 16384, align: 16384 };
        let r = Requirement::of(&[vf, Resource::bar(BarKind::Mem64, true, 2 * MIB)]).unwrap();
        assert_eq!(r.pref, WindowRequirement { size: 3 * MIB, align: 2 * MIB });
    }

    #[test]
    fn bad_alignment_is_an_error() {
        let bad = Resource { kind: BarKind::Mem32, prefetchable: false, rom: false, size: 3000, align: 3000 };
        assert!(matches!(Requirement::of(&[bad]), Err(RequirementError::BadAlignment { .. })));
    }

    #[test]
    fn overflow_is_an_error() {
        let big = Resource::bar(BarKind::Mem64, true, 1 << 63);
        assert_eq!(Requirement::of(&[big, big]), Err(RequirementError::Overflow));
    }

    #[test]
    fn combine_packs_largest_alignment_first() {
        let a = WindowRequirement { size: 2 * MIB, align: MIB };
        let b = WindowRequirement { size: 4 * GIB, align: 4 * GIB };
        assert_eq!(a.combine(&b), Some(WindowRequirement { size: 4 * GIB + 2 * MIB, align: 4 * GIB }));
    }
}

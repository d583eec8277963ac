//! Where firmware that places the 64-bit PCI region at the end of the guest's physical
//! address space puts each window, reproduced address by address.
//!
//! This is SeaBIOS from 1.16.3 on (`src/fw/pciinit.c`, `pci_bios_map_devices` and
//! `pci_bios_check_devices`), described by [`Mmio64Aperture::EndOfAddressSpace`]:
//!
//! - The top is `1 << phys-bits`, the guest's width capped at `max_bits` unless the RAM
//!   above 4 GiB reaches `uncapped_ram_above_4g`.
//! - Every 64-bit entry of the root buses (root port and bridge prefetchable windows,
//!   64-bit BARs of devices on the root bus) moves to the 64-bit region, in the order
//!   largest alignment first, then largest size (ties keep the firmware's bus order).
//! - The region starts at `top - ALIGN(ALIGN(sum, 1 GiB), step)`, `step` 1 GiB, or
//!   `top >> 3` when the firmware pads (RAM above 4 GiB), but never below the end of RAM
//!   or of the memory hotplug region; then aligned to the first entry's alignment and to
//!   1 GiB. Entries follow one another from there.
//! - When it pads, each hotplug port's prefetchable window is aligned to at least
//!   `top >> 11` and is at least that large.
//!
//! Which window lands where thus depends on every other window, so the planner lays them
//! all out as the firmware will and then checks each window where it really starts.

use pcilibs::bar::BarKind;
use pcilibs::requirement::{Resource, WindowRequirement};

use crate::error::AddressSpaceError;
use crate::platform::{Mmio64Aperture, PlatformSpec, Range};
use crate::reserve::WindowReservation;
use crate::units::{align_up, GIB};

/// The range QEMU reserves in the e820 map below 1 TiB for a guest CPU of AMD's vendor
/// with 40 or more physical address bits (the HyperTransport hole, `AMD_HT_START` ..
/// 1 TiB; TCG's default `qemu64` CPU is one). SeaBIOS moves the region down when it
/// overlaps it, and Linux assigns no BAR there: measured with SeaBIOS 1.16.2, a root
/// port window whose only 128 GiB-aligned slot was 896 GiB..1 TiB could not take a
/// 128 GiB BAR ("failed to assign"). The planner keeps every BAR out of it whatever
/// the vendor.
pub const AMD_HT_HOLE: Range = Range::new(0xfd_0000_0000, 0x100_0000_0000 - 0xfd_0000_0000);

/// Phys-bits SeaBIOS believes under QEMU whatever the CPU vendor: below 41 it checks the
/// vendor (Intel 36 or 39, AMD 40) and otherwise ignores the width, placing the region
/// as SeaBIOS 1.16.2 did. Plans for this rule ask for at least this many bits.
pub const TRUSTED_PHYS_BITS: u8 = 41;

/// The firmware's parameters for one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndPlacement {
    /// One past the highest address the firmware uses.
    pub(crate) top: u64,
    /// Whether the firmware pads hotplug windows (RAM above 4 GiB).
    pub(crate) pad: bool,
    /// The region never starts below this (end of RAM or of the memory hotplug region).
    pub(crate) floor: u64,
}

/// A 64-bit entry on the root buses, as the firmware sizes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The window (or BAR).
    pub(crate) window: WindowReservation,
}

/// The firmware's layout: region and each entry's start, in the input's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The region the entries take, `[base, end)` with `end` rounded to 1 GiB.
    pub(crate) region: Range,
    /// Start of each entry, indexed like the input.
    pub(crate) starts: Vec<u64>,
    /// For each entry, the starts of every entry of the same size and alignment (the
    /// firmware orders those by bus number, which the check does not assume).
    pub(crate) tie_starts: Vec<Vec<u64>>,
}

impl EndPlacement {
    /// The parameters `spec` gives a guest of `guest_bits` physical address bits with
    /// `ram` bytes of RAM whose region must start at or above `floor`; `None` when the
    /// platform's aperture is not of this kind or the firmware would not trust the width.
    pub(crate) fn of(spec: &PlatformSpec, guest_bits: u8, ram: u64, floor: u64) -> Option<Self> {
        let Mmio64Aperture::EndOfAddressSpace { max_bits, uncapped_ram_above_4g } = spec.mmio64 else {
            return None;
        };
        if !(TRUSTED_PHYS_BITS..64).contains(&guest_bits) {
            return None;
        }
        let above = spec.ram_above_4g(ram);
        let uncapped = uncapped_ram_above_4g.is_some_and(|r| above >= r);
        let bits = if uncapped { guest_bits } else { guest_bits.min(max_bits) };
        Some(EndPlacement { top: 1u64 << bits, pad: above > 0, floor })
    }

    /// Alignment and least size the firmware gives a hotplug port's prefetchable window
    /// when it pads (0 otherwise).
    pub(crate) fn pad_align(&self) -> u64 {
        if self.pad {
            self.top >> 11
        } else {
            0
        }
    }

    /// A hotplug port's prefetchable window as the firmware sizes it: `window` as sized
    /// without padding, grown to the pad alignment and rounded to it.
    pub(crate) fn padded(&self, window: WindowReservation) -> Result<WindowReservation, AddressSpaceError> {
        let pad = self.pad_align();
        if pad == 0 || window.align >= pad && window.size >= pad {
            return Ok(window);
        }
        let align = window.align.max(pad);
        let size = align_up(window.size.max(align), align).ok_or(AddressSpaceError::Overflow)?;
        Ok(WindowReservation { size, align })
    }

    /// Lays out `entries` as the firmware does; `None` when they do not fit between the
    /// floor and the top.
    pub(crate) fn layout(&self, entries: &[Entry]) -> Result<Option<Layout>, AddressSpaceError> {
        let overflow = || AddressSpaceError::Overflow;
        let order = firmware_order(entries);
        let sum = order.iter().try_fold(0u64, |a, (_, w)| a.checked_add(w.size)).ok_or_else(overflow)?;
        let first_align = order.first().map_or(1, |(_, w)| w.align.max(1));
        let mut size = align_up(sum, GIB).ok_or_else(overflow)?;
        if self.pad {
            size = align_up(size, self.top >> 3).ok_or_else(overflow)?;
        }
        let Some(from_top) = self.top.checked_sub(size) else { return Ok(None) };
        let mut base = from_top.max(self.floor);
        // SeaBIOS's `e820_is_used`: a region over a reserved range moves down by its size.
        if overlaps(base, size, AMD_HT_HOLE) {
            let Some(lower) = base.checked_sub(size) else { return Ok(None) };
            if lower < self.floor {
                return Ok(None);
            }
            base = lower;
        }
        let base = align_up(base, first_align).and_then(|b| align_up(b, GIB)).ok_or_else(overflow)?;
        let layout = lay_out_from(base, entries, &order)?;
        Ok((layout.region.end() <= self.top).then_some(layout))
    }
}

/// Lays `entries` out as SeaBIOS up to 1.16.2 does: in the same order as
/// [`EndPlacement::layout`], from the end of RAM (`floor`) aligned to the first entry's
/// alignment and to 1 GiB, upwards without a limit.
pub(crate) fn layout_after_ram(floor: u64, entries: &[Entry]) -> Result<Layout, AddressSpaceError> {
    let overflow = || AddressSpaceError::Overflow;
    let order = firmware_order(entries);
    let first_align = order.first().map_or(1, |(_, w)| w.align.max(1));
    let base = align_up(floor, first_align).and_then(|b| align_up(b, GIB)).ok_or_else(overflow)?;
    lay_out_from(base, entries, &order)
}

/// Lays `entries` out as the firmware lays out the windows below a bridge whose own
/// window starts at `base`: in the same order as [`layout_after_ram`], end to end.
pub(crate) fn layout_inside(base: u64, entries: &[Entry]) -> Result<Layout, AddressSpaceError> {
    let order = firmware_order(entries);
    lay_out_from(base, entries, &order)
}

/// Places the windows of `order` one after the other from `base`; the region ends at the
/// next 1 GiB boundary. Each entry's start, and the starts of every window equal to its
/// own (the places its tie group may get).
fn lay_out_from(
    base: u64,
    entries: &[Entry],
    order: &[(usize, WindowReservation)],
) -> Result<Layout, AddressSpaceError> {
    let overflow = || AddressSpaceError::Overflow;
    let mut starts = vec![0u64; entries.len()];
    let mut placed: Vec<(WindowReservation, u64)> = Vec::with_capacity(order.len());
    let mut at = base;
    for (i, w) in order {
        if let Some(s) = starts.get_mut(*i) {
            *s = at;
        }
        placed.push((*w, at));
        at = at.checked_add(w.size).ok_or_else(overflow)?;
    }
    let end = align_up(at, GIB).ok_or_else(overflow)?;
    let tie_starts = entries
        .iter()
        .map(|e| placed.iter().filter(|(w, _)| *w == e.window).map(|(_, s)| *s).collect())
        .collect();
    Ok(Layout { region: Range::new(base, end - base), starts, tie_starts })
}

/// The entries that take space, as (input index, window) in the firmware's order: largest
/// alignment first, then largest size. Stable: ties keep the input order (the tie groups
/// of [`Layout`] make that irrelevant).
fn firmware_order(entries: &[Entry]) -> Vec<(usize, WindowReservation)> {
    let mut order: Vec<(usize, WindowReservation)> =
        entries.iter().map(|e| e.window).enumerate().filter(|(_, w)| w.size > 0).collect();
    order.sort_by_key(|(_, w)| std::cmp::Reverse((w.align, w.size)));
    order
}

/// Index of the first entry in the firmware's order (largest alignment, then size) that
/// `pick` accepts.
pub(crate) fn first_in_order(entries: &[Entry], pick: impl Fn(usize) -> bool) -> Option<usize> {
    firmware_order(entries).into_iter().map(|(i, _)| i).find(|i| pick(*i))
}

fn overlaps(base: u64, size: u64, range: Range) -> bool {
    base < range.end() && range.base < base.saturating_add(size)
}

/// Whether the guest kernel can assign `bars` (sizes of prefetchable BARs, each aligned to
/// its size) inside `[start, start + size)`: largest first, each at the lowest free address
/// aligned to it, as Linux assigns a hotplugged device's BARs in its bridge window.
pub(crate) fn kernel_fits(start: u64, size: u64, bars: &[u64]) -> bool {
    let resources: Vec<Resource> = bars.iter().map(|b| Resource::bar(BarKind::Mem64, true, *b)).collect();
    crate::sim::assign_bars_avoiding(start, size, &resources, &[AMD_HT_HOLE]).is_some()
}

/// Whether a window of `window` bytes fits the requirement at any start of `starts`.
pub(crate) fn fits_everywhere(starts: &[u64], size: u64, bars: &[u64], need: &WindowRequirement) -> bool {
    if need.is_empty() {
        return true;
    }
    starts.iter().all(|s| kernel_fits(*s, size, bars))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{MIB, TIB};

    const H100: [u64; 2] = [128 * GIB, 32 * MIB];

    #[test]
    fn kernel_puts_small_bars_before_an_aligned_large_one() {
        // A window starting 32 MiB below a 128 GiB boundary holds an H100 exactly.
        assert!(kernel_fits(128 * GIB - 32 * MIB, 128 * GIB + 32 * MIB, &H100));
        assert!(kernel_fits(128 * GIB, 128 * GIB + 32 * MIB, &H100));
        assert!(!kernel_fits(128 * GIB + 32 * MIB, 128 * GIB + 32 * MIB, &H100));
        assert!(kernel_fits(64 * GIB, 192 * GIB, &H100));
        assert!(!kernel_fits(GIB, 192 * GIB, &H100));
    }

    #[test]
    fn region_ends_at_the_top() {
        let p = EndPlacement { top: 16 * TIB, pad: false, floor: 4 * GIB };
        let e = Entry { window: WindowReservation { size: 128 * GIB, align: 2 * MIB } };
        let l = p.layout(&[e]).unwrap().unwrap();
        // As measured on SeaBIOS 1.17.0: one 128 GiB window at 0xfe0_0000_0000.
        assert_eq!(l.starts, vec![0xfe0_0000_0000]);
        assert_eq!(l.region, Range::new(0xfe0_0000_0000, 128 * GIB));
    }

    #[test]
    fn padding_aligns_the_region_to_an_eighth() {
        let p = EndPlacement { top: 2 * TIB, pad: true, floor: 6 * GIB };
        assert_eq!(p.pad_align(), GIB);
        let w = p.padded(WindowReservation { size: 128 * GIB + 32 * MIB, align: 2 * MIB }).unwrap();
        assert_eq!(w, WindowReservation { size: 129 * GIB, align: GIB });
        let l = p.layout(&[Entry { window: w }, Entry { window: w }]).unwrap().unwrap();
        // 258 GiB rounded to an eighth of the address space (256 GiB): 512 GiB below the top.
        assert_eq!(l.region.base, 2 * TIB - 512 * GIB);
        assert_eq!(l.tie_starts[0], vec![2 * TIB - 512 * GIB, 2 * TIB - 512 * GIB + w.size]);
    }

    #[test]
    fn nothing_goes_into_the_ht_hole() {
        // The window's only 128 GiB-aligned slot is 896 GiB..1 TiB (measured refused).
        assert!(!kernel_fits(0xc0_ffa0_0000, 0x400_0000_0000 - 0x3c0_0000_0000 + 0x4000_0000, &[128 * GIB]));
        assert!(kernel_fits(0x100_0000_0000, 128 * GIB, &[128 * GIB]));
        // A region over the hole moves down by its size.
        let p = EndPlacement { top: 2 * TIB, pad: false, floor: 4 * GIB };
        let e = Entry { window: WindowReservation { size: 1536 * GIB, align: 2 * MIB } };
        let l = p.layout(&[e]).unwrap();
        assert_eq!(l, None);
    }

    #[test]
    fn too_much_for_the_top_is_no_layout() {
        let p = EndPlacement { top: TIB, pad: false, floor: 4 * GIB };
        let e = Entry { window: WindowReservation { size: TIB, align: 2 * MIB } };
        assert_eq!(p.layout(&[e]).unwrap(), None);
    }
}

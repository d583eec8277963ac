//! Sizing a port's windows so that what it must hold fits under the platform's rule.
//!
//! The input is a [`WindowRequirement`] from pcilibs (size of the packed resources and the
//! largest alignment among them). The output is the value of the port's `*-reserve`
//! property (if the rule reads one) and the [`WindowReservation`] the guest will really get: its size
//! and the start alignment the firmware guarantees. A resource set fits a window when
//! packing it from the worst start the guarantee allows still ends inside the window, see
//! [`WindowReservation::holds`].

use pcilibs::requirement::WindowRequirement;
use serde::{Deserialize, Serialize};

use crate::error::AddressSpaceError;
use crate::platform::WindowRule;
use crate::units::{align_up, human_size, next_pow2};

/// A bridge window as the guest will get it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowReservation {
    /// Size in bytes (0: no window).
    pub size: u64,
    /// Alignment of the window start the platform guarantees (0 when `size` is 0).
    pub align: u64,
}

impl WindowReservation {
    /// Whether `need` fits wherever the window starts, given only its guaranteed alignment.
    ///
    /// The worst start for a requirement of alignment `A` inside a window aligned to `g < A`
    /// is `A - g` bytes before an `A` boundary, so `A - g` bytes are lost to alignment.
    pub fn holds(&self, need: &WindowRequirement) -> bool {
        if need.is_empty() {
            return true;
        }
        let slack = need.align.saturating_sub(self.align.max(1));
        need.size.checked_add(slack).is_some_and(|total| total <= self.size)
    }

    /// The window as a requirement one level up (a switch's upstream port packs its
    /// downstream windows like resources).
    pub fn as_requirement(&self) -> WindowRequirement {
        if self.size == 0 {
            WindowRequirement::default()
        } else {
            WindowRequirement { size: self.size, align: self.align }
        }
    }
}

/// The space `windows` take when firmware places them one after another: largest
/// alignment first and, among equal alignments, in the order given (the bus scan order),
/// each at the next address its alignment allows. EDK2 orders a bridge's children so;
/// where a window's size is not a multiple of its alignment (OVMF's boot-time windows),
/// another order would need a different amount of space.
pub(crate) fn pack_windows(
    windows: impl Iterator<Item = WindowReservation>,
) -> Result<WindowRequirement, AddressSpaceError> {
    let mut list: Vec<WindowReservation> = windows.filter(|w| w.size > 0).collect();
    list.sort_by_key(|w| std::cmp::Reverse(w.align));
    let mut total = WindowRequirement::default();
    for w in list {
        total = total.combine(&w.as_requirement()).ok_or(AddressSpaceError::Overflow)?;
    }
    Ok(total)
}

/// How one window of one port is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sized {
    /// Value for the port's `*-reserve` property, when the rule reads one.
    pub(crate) reserve: Option<u64>,
    /// The window the guest gets.
    pub(crate) window: WindowReservation,
    /// Why this size, in one sentence.
    pub(crate) why: String,
}

/// Sizes one window holding `need`; [`AddressSpaceError::Overflow`] when the window's size
/// does not fit 64 bits (the planner refuses such requests earlier, see
/// [`crate::units::MAX_PHYS_BITS`]).
///
/// `present_at_boot` is true when what the port holds is plugged at boot (a cold-plugged
/// device, a switch, a placeholder): the firmware then aligns the window to its largest
/// child, so no slack is needed, and the window stays when the child is unplugged.
/// `granularity` is 1 MiB for memory windows and 4 KiB for I/O.
pub(crate) fn size_window(
    rule: WindowRule,
    need: &WindowRequirement,
    granularity: u64,
    present_at_boot: bool,
) -> Result<Sized, AddressSpaceError> {
    let overflow = || AddressSpaceError::Overflow;
    // Memory windows of the unaligned rules come in steps of the start alignment
    // (SeaBIOS 1.16 programs bridge memory windows in 2 MiB steps).
    let gran = match rule {
        WindowRule::ReserveUnaligned { start_align }
        | WindowRule::KernelHotplugSize { start_align }
        | WindowRule::ReservePlaced { start_align }
            if granularity >= pcilibs::requirement::MEM_GRANULARITY =>
        {
            granularity.max(start_align)
        }
        _ => granularity.max(1),
    };
    let need_size = align_up(need.size, gran).ok_or_else(overflow)?;
    if need.is_empty() {
        return Ok(match rule {
            // OVMF reads a reservation of 0 as "none given" and pads the port with its
            // default instead (512 MiB prefetchable, measured with edk2 2022.11): windows
            // the plan does not count, which can push a planned window out of the
            // aperture. The smallest window it honours, 1 MiB, keeps it out.
            WindowRule::ReservePowerOfTwo if granularity >= pcilibs::requirement::MEM_GRANULARITY => Sized {
                reserve: Some(gran),
                window: WindowReservation { size: gran, align: gran },
                why: format!(
                    "nothing needs this window; {} because the firmware replaces a reservation of 0 with its default (512 MiB prefetchable)",
                    human_size(gran)
                ),
            },
            WindowRule::ReservePowerOfTwo => Sized {
                reserve: Some(0),
                window: WindowReservation::default(),
                why: "nothing needs this window; reservation 0 disables the firmware's default".into(),
            },
            WindowRule::NoWindows => {
                Sized { reserve: None, window: WindowReservation::default(), why: String::new() }
            }
            _ => Sized {
                reserve: Some(0),
                window: WindowReservation { size: gran, align: gran },
                why: format!(
                    "nothing needs this window; the firmware keeps its minimum of {}",
                    human_size(gran)
                ),
            },
        });
    }
    if present_at_boot {
        return boot_sized(rule, need.align.max(gran), need_size, granularity);
    }
    Ok(match rule {
        // Under ReservePlaced too: the 32-bit windows are placed in the 32-bit hole with
        // only that alignment; the planner resizes the prefetchable ones for where the
        // firmware lays them out (`Builder::place_at_end`).
        WindowRule::ReserveUnaligned { start_align }
        | WindowRule::KernelHotplugSize { start_align }
        | WindowRule::ReservePlaced { start_align } => {
            let start = if granularity >= pcilibs::requirement::MEM_GRANULARITY {
                start_align.max(gran)
            } else {
                gran
            };
            let slack = need.align.saturating_sub(start);
            let size = need_size.checked_add(slack).and_then(|s| align_up(s, gran)).ok_or_else(overflow)?;
            let why = if slack > 0 {
                format!(
                    "{} needed + {} slack: the empty window is only {}-aligned, so a {}-aligned BAR may lose up to {} to alignment",
                    human_size(need_size),
                    human_size(slack),
                    human_size(start),
                    human_size(need.align),
                    human_size(slack)
                )
            } else {
                format!(
                    "{} needed; alignment {} is guaranteed by the window start",
                    human_size(need_size),
                    human_size(need.align)
                )
            };
            let reserve =
                matches!(rule, WindowRule::ReserveUnaligned { .. } | WindowRule::ReservePlaced { .. })
                    .then_some(size);
            Sized { reserve, window: WindowReservation { size, align: start }, why }
        }
        WindowRule::ReservePowerOfTwo => {
            let size = next_pow2(need_size.max(need.align)).ok_or_else(overflow)?;
            Sized {
                reserve: Some(size),
                window: WindowReservation { size, align: size },
                why: format!(
                    "{} needed, rounded up to a power of two ({}) as the firmware does; it aligns the window to that size",
                    human_size(need_size),
                    human_size(size)
                ),
            }
        }
        WindowRule::NoWindows => {
            Sized { reserve: None, window: WindowReservation::default(), why: String::new() }
        }
    })
}

/// A window sized by firmware from what is plugged at boot: aligned to the largest child
/// (`align`), holding the children packed (`need_size`, already in window steps).
fn boot_sized(
    rule: WindowRule,
    align: u64,
    need_size: u64,
    granularity: u64,
) -> Result<Sized, AddressSpaceError> {
    let overflow = || AddressSpaceError::Overflow;
    if rule == WindowRule::ReservePowerOfTwo {
        // EDK2's PCI bus driver packs the children and rounds the sum up to the window
        // granularity only (1 MiB, 4 KiB for I/O): BARs of 16 MiB, 1 MiB and 8 KiB get an
        // 18 MiB window, measured. The port's reservation then pads the window to at least
        // the reserved size, and a prefetchable reservation of 0 means "the firmware's
        // default" (hundreds of MiB): 1 MiB asks for nothing beyond what the children take.
        let mem = granularity >= pcilibs::requirement::MEM_GRANULARITY;
        return Ok(Sized {
            reserve: Some(if mem { granularity } else { 0 }),
            window: WindowReservation { size: need_size, align },
            why: format!(
                "{} for what is plugged at boot; firmware packs the BARs and aligns the window to the largest ({})",
                human_size(need_size),
                human_size(align)
            ),
        });
    }
    // SeaBIOS also rounds the window's size up to that alignment.
    let size = align_up(need_size, align).ok_or_else(overflow)?;
    let reserve = match rule {
        WindowRule::ReserveUnaligned { .. } | WindowRule::ReservePlaced { .. } => Some(need_size),
        _ => None,
    };
    Ok(Sized {
        reserve,
        window: WindowReservation { size, align },
        why: format!(
            "{} for what is plugged at boot; firmware aligns the window to its largest BAR ({}) and rounds it to that",
            human_size(size),
            human_size(align)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{GIB, MIB};

    const H100_PREF: WindowRequirement = WindowRequirement { size: 128 * GIB + 32 * MIB, align: 128 * GIB };

    #[test]
    fn seabios_needs_slack_for_alignment() {
        let s = size_window(WindowRule::ReserveUnaligned { start_align: 2 * MIB }, &H100_PREF, MIB, false)
            .unwrap();
        assert_eq!(s.reserve, Some(256 * GIB + 30 * MIB));
        assert!(s.window.holds(&H100_PREF));
        // The reservation DESIGN.md saw fail: 128 GiB at 1 MiB alignment cannot hold 128 GiB.
        let plain = WindowReservation { size: 128 * GIB, align: MIB };
        assert!(!plain.holds(&WindowRequirement { size: 128 * GIB, align: 128 * GIB }));
        // 256 GiB, the size that worked in the guest, does.
        assert!(WindowReservation { size: 256 * GIB, align: MIB }
            .holds(&WindowRequirement { size: 128 * GIB, align: 128 * GIB }));
    }

    #[test]
    fn ovmf_rounds_to_power_of_two() {
        let s = size_window(WindowRule::ReservePowerOfTwo, &H100_PREF, MIB, false).unwrap();
        assert_eq!(s.reserve, Some(256 * GIB));
        assert_eq!(s.window, WindowReservation { size: 256 * GIB, align: 256 * GIB });
        let single = WindowRequirement { size: 128 * GIB, align: 128 * GIB };
        assert_eq!(
            size_window(WindowRule::ReservePowerOfTwo, &single, MIB, false).unwrap().reserve,
            Some(128 * GIB)
        );
    }

    #[test]
    fn boot_time_children_align_the_window() {
        let s = size_window(WindowRule::ReserveUnaligned { start_align: 2 * MIB }, &H100_PREF, MIB, true)
            .unwrap();
        // As SeaBIOS showed behind a switch port: 128 GiB + 32 MiB rounds up to 256 GiB.
        assert_eq!(s.window, WindowReservation { size: 256 * GIB, align: 128 * GIB });
        assert!(s.window.holds(&H100_PREF));
    }

    /// OVMF gave a switch downstream port whose boot-time placeholder has BARs of 16 MiB,
    /// 1 MiB and 8 KiB an 18 MiB window at 16 MiB alignment, not 32 MiB (random seed 3001).
    #[test]
    fn ovmf_boot_time_windows_are_the_packed_bars_in_mib_steps() {
        let bars = WindowRequirement { size: 17 * MIB + 8 * 1024, align: 16 * MIB };
        let s = size_window(WindowRule::ReservePowerOfTwo, &bars, MIB, true).unwrap();
        assert_eq!(s.window, WindowReservation { size: 18 * MIB, align: 16 * MIB });
        // A prefetchable reservation of 0 would pad the window to the firmware's default.
        assert_eq!(s.reserve, Some(MIB));
        let io = WindowRequirement { size: 32, align: 32 };
        let s = size_window(WindowRule::ReservePowerOfTwo, &io, 4 * 1024, true).unwrap();
        assert_eq!((s.window.size, s.reserve), (4 * 1024, Some(0)));
        // SeaBIOS rounds the same window up to its alignment.
        let s = size_window(WindowRule::ReserveUnaligned { start_align: 2 * MIB }, &bars, MIB, true).unwrap();
        assert_eq!(s.window, WindowReservation { size: 32 * MIB, align: 16 * MIB });
    }

    /// Sizes whose window would not fit 64 bits were sized `u64::MAX` (a reservation of
    /// 16 EiB less a little); they are errors. (Sizes this large never get here from a
    /// request: see `MAX_PHYS_BITS`.)
    #[test]
    fn windows_past_64_bits_are_errors() {
        let rules = [
            WindowRule::ReserveUnaligned { start_align: 2 * MIB },
            WindowRule::ReservePowerOfTwo,
            WindowRule::KernelHotplugSize { start_align: MIB },
        ];
        let past = WindowRequirement { size: (1 << 63) + 4 * MIB, align: 1 << 63 };
        let unaligned = WindowRequirement { size: u64::MAX - 5, align: 1 << 63 };
        for rule in rules {
            assert_eq!(size_window(rule, &past, MIB, false), Err(AddressSpaceError::Overflow), "{rule:?}");
            for present in [false, true] {
                let got = size_window(rule, &unaligned, MIB, present);
                assert_eq!(got, Err(AddressSpaceError::Overflow), "{rule:?}");
            }
        }
        // 2^63 at its own alignment, present at boot, is still a 64-bit number.
        let huge = WindowRequirement { size: 1 << 63, align: 1 << 63 };
        let s = size_window(WindowRule::ReserveUnaligned { start_align: 2 * MIB }, &huge, MIB, true).unwrap();
        assert_eq!(s.window, WindowReservation { size: 1 << 63, align: 1 << 63 });
    }
}

//! Reservations for firmware that lays the 64-bit region out at the end of the address
//! space ([`WindowRule::ReservePlaced`]): the windows are laid out as the firmware will,
//! and each hotplug port is checked where its window really starts.

use pcilibs::requirement::{Window, WindowRequirement};

use super::Builder;
use crate::end_placement::{
    fits_everywhere, layout_after_ram, layout_inside, EndPlacement, Entry, Layout, AMD_HT_HOLE,
    TRUSTED_PHYS_BITS,
};
use crate::error::{AddressSpaceError, PlanError};
use crate::plan::{PciBridge, PortKind};
use crate::platform::{Mmio64Aperture, Range, WindowRule};
use crate::reserve::WindowReservation;
use crate::units::{align_up, human_size, GIB, MAX_PHYS_BITS};

/// How the hotplug ports' prefetchable windows are sized, tried in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sizing {
    /// What the profile needs, nothing more: enough wherever the layout starts the
    /// window on a boundary of the largest BAR.
    Exact,
    /// Rounded to 1 GiB: the firmware rounds the region to 1 GiB below the top, so a
    /// window of whole GiB that ends at the top has its largest BAR aligned at its end
    /// and the smaller BARs before it.
    Gib,
    /// Rounded to half the largest BAR's alignment: windows that follow one another
    /// start alternately on a boundary and half-way, and the smaller BARs go before the
    /// large one where it starts half-way.
    HalfAlign,
    /// The largest BAR's alignment as slack: enough at any start.
    Unaligned,
}

impl Sizing {
    fn size(self, need: &WindowRequirement, start_align: u64) -> Result<u64, AddressSpaceError> {
        let overflow = || AddressSpaceError::Overflow;
        let gran = start_align.max(1);
        let size = match self {
            Sizing::Exact => need.size,
            Sizing::Gib => align_up(need.size, GIB).ok_or_else(overflow)?,
            Sizing::HalfAlign => align_up(need.size, (need.align / 2).max(gran)).ok_or_else(overflow)?,
            Sizing::Unaligned => {
                need.size.checked_add(need.align.saturating_sub(gran)).ok_or_else(overflow)?
            }
        };
        align_up(size, gran).ok_or_else(overflow)
    }

    fn why(self) -> &'static str {
        match self {
            Sizing::Exact => "exactly what it needs: the firmware's layout starts it where its largest BAR is aligned",
            Sizing::Gib => "what it needs rounded to 1 GiB: in the firmware's layout its largest BAR is aligned at the window's end and the smaller ones go before it",
            Sizing::HalfAlign => "rounded to half its largest BAR: in the firmware's layout the windows start alternately on and half-way between boundaries of that BAR, and smaller BARs go first where a window starts half-way",
            Sizing::Unaligned => "with its largest BAR's alignment as slack: the firmware's layout cannot promise a better start here",
        }
    }
}

/// A port whose device comes later: its index, the sizes of its prefetchable BARs and its
/// prefetchable requirement.
struct Target {
    port: usize,
    bars: Vec<u64>,
    need: WindowRequirement,
}

/// A switch whose downstream ports wait for devices: the index of its root port, each
/// downstream port's index and prefetchable window, and the targets among them.
struct SwitchTarget {
    root: usize,
    windows: Vec<(usize, WindowReservation)>,
    targets: Vec<Target>,
}

impl SwitchTarget {
    /// Whether every target holds its BARs clear of [`AMD_HT_HOLE`] wherever the firmware
    /// may put it when the root port's window starts at any of `root_starts`: inside it
    /// the downstream windows follow one another in the firmware's order.
    fn fits(&self, root_starts: &[u64]) -> Result<bool, AddressSpaceError> {
        let entries: Vec<Entry> = self.windows.iter().map(|(_, w)| Entry { window: *w }).collect();
        for start in root_starts {
            let layout = layout_inside(*start, &entries)?;
            for t in &self.targets {
                let Some(at) = self.windows.iter().position(|(i, _)| *i == t.port) else { continue };
                let (Some(entry), Some(starts)) = (entries.get(at), layout.tie_starts.get(at)) else {
                    continue;
                };
                if !fits_everywhere(starts, entry.window.size, &t.bars, &t.need) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// What the layout decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    /// The 64-bit region.
    pub(crate) region: Range,
    /// The guest's physical address bits it was laid out for.
    pub(crate) bits: u8,
}

impl<'a> Builder<'a> {
    /// Ports on a root bus that take a device after boot, with what they must hold.
    fn end_targets(&self) -> Result<Vec<Target>, PlanError> {
        let mut out = Vec::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.kind != PortKind::Root || self.switches.iter().any(|s| s.root_port == p.id) {
                continue;
            }
            out.extend(self.target(i)?);
        }
        Ok(out)
    }

    /// Port `i` as a target: what its device (plugged after boot) or its profile puts in
    /// its prefetchable window; `None` for a port with a cold-plugged device, nothing to
    /// wait for, or nothing prefetchable.
    fn target(&self, i: usize) -> Result<Option<Target>, PlanError> {
        let Some(p) = self.ports.get(i) else { return Ok(None) };
        let resources: Vec<_> = match (self.device_of.get(&i), &p.profile) {
            (Some(d), _) => {
                let d =
                    self.request.devices.get(*d).ok_or_else(|| PlanError::UnknownDevice(d.to_string()))?;
                if d.cold_plug {
                    return Ok(None);
                }
                d.resources().copied().collect()
            }
            (None, Some(profile)) => profile.resources.iter().map(|r| r.resource).collect(),
            (None, None) => return Ok(None),
        };
        let bars: Vec<u64> =
            resources.iter().filter(|r| r.window() == Window::Pref).map(|r| r.size).collect();
        let need = p.reservation.need.pref;
        Ok((!need.is_empty()).then_some(Target { port: i, bars, need }))
    }

    /// The switches on root ports whose downstream ports take a device after boot: the
    /// root port's index, every downstream port's prefetchable window (they share the
    /// root port's window) and the targets among them.
    fn switch_targets(&self) -> Result<Vec<SwitchTarget>, PlanError> {
        let mut out = Vec::new();
        for sw in &self.switches {
            let Some(root) = self.ports.iter().position(|p| p.id == sw.root_port) else { continue };
            let mut windows = Vec::new();
            let mut targets = Vec::new();
            for (i, p) in self.ports.iter().enumerate().filter(|(_, p)| p.switch.as_ref() == Some(&sw.id)) {
                windows.push((i, p.reservation.pref));
                targets.extend(self.target(i)?);
            }
            if !targets.is_empty() {
                out.push(SwitchTarget { root, windows, targets });
            }
        }
        Ok(out)
    }

    /// Root ports whose prefetchable reservation the plan sets freely: spares and ports of
    /// devices plugged later, not switch ports.
    fn filler_ports(&self) -> Vec<usize> {
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PortKind::Root && !self.switches.iter().any(|s| s.root_port == p.id))
            .filter(|(i, p)| {
                let cold = self
                    .device_of
                    .get(i)
                    .and_then(|d| self.request.devices.get(*d))
                    .is_some_and(|d| d.cold_plug);
                !cold && (p.profile.is_some() || self.device_of.contains_key(i))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The root-bus entries for windows `windows` (one per port, unpadded) and the
    /// bridges; `index[i]` is port `i`'s entry.
    fn end_entries(
        &self,
        place: &EndPlacement,
        windows: &[WindowReservation],
        bridges: &[PciBridge],
    ) -> Result<(Vec<Entry>, Vec<Option<usize>>), PlanError> {
        let mut entries = Vec::new();
        let mut index = vec![None; self.ports.len()];
        for (i, p) in self.ports.iter().enumerate() {
            if p.kind != PortKind::Root {
                continue;
            }
            let mut w = windows.get(i).copied().unwrap_or_default();
            if place.pad && self.switches.iter().any(|s| s.root_port == p.id) {
                // Downstream ports are hotplug ports too: the firmware pads each of
                // them, and the root port above covers what they add up to.
                w = self.padded_switch_window(place, &p.id, w)?;
            }
            if let Some(slot) = index.get_mut(i) {
                *slot = Some(entries.len());
            }
            entries.push(Entry { window: place.padded(w)? });
        }
        for b in bridges {
            entries.push(Entry { window: place.padded(b.pref)? });
        }
        for f in &self.foreign {
            let r = f.device.requirement()?;
            entries.push(Entry { window: WindowReservation { size: r.pref.size, align: r.pref.align } });
        }
        Ok((entries, index))
    }

    /// A switch's root port window when the firmware pads its downstream ports.
    fn padded_switch_window(
        &self,
        place: &EndPlacement,
        root_port: &crate::qemu::QemuId,
        unpadded: WindowReservation,
    ) -> Result<WindowReservation, PlanError> {
        let Some(sw) = self.switches.iter().find(|s| &s.root_port == root_port) else { return Ok(unpadded) };
        let mut need = WindowRequirement::default();
        for d in self.ports.iter().filter(|d| d.switch.as_ref() == Some(&sw.id)) {
            let w = place.padded(d.reservation.pref)?;
            need = need.combine(&w.as_requirement()).ok_or(AddressSpaceError::Overflow)?;
        }
        let size = align_up(need.size, need.align.max(1)).ok_or(AddressSpaceError::Overflow)?;
        Ok(WindowReservation { size: size.max(unpadded.size), align: need.align.max(unpadded.align) })
    }

    /// Whether firmware that does not pad keeps every window below 4 GiB: it moves the
    /// 64-bit entries up only when the 32-bit hole cannot hold them all.
    fn all_fit_low(&self, windows: &[WindowReservation], bridges: &[PciBridge]) -> bool {
        let roots = self.ports.iter().zip(windows).filter(|(p, _)| p.kind == PortKind::Root);
        let ports = roots.map(|(p, w)| p.reservation.mem.size.saturating_add(w.size));
        let bridges = bridges.iter().map(|b| b.mem.size.saturating_add(b.pref.size));
        let total = ports.chain(bridges).fold(0u64, u64::saturating_add);
        total <= self.spec.mmio32.size
    }

    /// Sizes the hotplug ports' prefetchable windows for the firmware's layout (see the
    /// module docs) and returns the region, or `None` where the firmware will not place
    /// the region at the end (a width it does not trust, or everything below 4 GiB).
    pub(super) fn place_at_end(&mut self, bridges: &mut [PciBridge]) -> Result<Option<Placed>, PlanError> {
        if matches!(self.spec.window_rule, WindowRule::ReserveUnaligned { .. })
            && self.spec.mmio64 == Mmio64Aperture::GrowsAfterRam
        {
            self.avoid_hole_after_ram(bridges)?;
            return Ok(None);
        }
        let WindowRule::ReservePlaced { start_align } = self.spec.window_rule else { return Ok(None) };
        let ram = self.opts.guest_ram;
        let floor = self.aperture_floor()?;
        let targets = self.end_targets()?;
        let unpadded: Vec<WindowReservation> = self.ports.iter().map(|p| p.reservation.pref).collect();
        let widths: Vec<u8> = match self.opts.guest_phys_bits {
            Some(bits) => vec![bits],
            None => (self.spec.default_phys_bits.max(TRUSTED_PHYS_BITS)..=MAX_PHYS_BITS).collect(),
        };
        let mut last_need = 0u64;
        // The smallest working layout of the first width that has one.
        type Best = (u64, Vec<Entry>, Vec<Option<usize>>, Sizing, Range);
        let mut best: Option<Best> = None;
        for bits in widths {
            let Some(place) = EndPlacement::of(&self.spec, bits, ram, floor) else {
                return self.classic_fallback(start_align, &targets).map(|()| None);
            };
            for sizing in [Sizing::Exact, Sizing::Gib, Sizing::HalfAlign, Sizing::Unaligned] {
                let mut windows = unpadded.clone();
                for t in &targets {
                    let size = sizing.size(&t.need, start_align)?;
                    if let Some(w) = windows.get_mut(t.port) {
                        *w = WindowReservation { size, align: start_align };
                    }
                }
                // Windows that fit the 32-bit hole are placed there, with only the 2 MiB
                // start alignment: only the sizes with the large BARs' alignment as slack
                // hold them then. Smaller sizes that fit low are no plan at all, and
                // larger ones the firmware places at the end (random seed 6024 on
                // SeaBIOS 1.16.3: a 512 MiB BAR fitted low exactly, so the slack sizes
                // were written, which no longer fitted low and went to the end of a
                // width the plan had not laid out, inside QEMU's HT hole).
                if !place.pad && self.all_fit_low(&windows, bridges) {
                    if sizing == Sizing::Unaligned {
                        return self.classic_fallback(start_align, &targets).map(|()| None);
                    }
                    continue;
                }
                let (entries, _) = self.end_entries(&place, &windows, bridges)?;
                last_need = entries.iter().fold(0u64, |a, e| a.saturating_add(e.window.size));
                // A region whose size is not a multiple of its first window's alignment
                // is pushed past the top when the firmware aligns its start, and one that
                // is not a multiple of the large BARs' (half) alignment starts the windows
                // off their boundaries: one hotplug port may take the difference (tried
                // on each in turn, the smallest difference first).
                let first_align = entries.iter().map(|e| e.window.align).max().unwrap_or(1).max(1);
                let large = targets.iter().map(|t| t.need.align).max().unwrap_or(1).max(1);
                let total = align_up(last_need, GIB).ok_or(AddressSpaceError::Overflow)?;
                let mut fillers: Vec<u64> = [first_align, large / 2, large]
                    .iter()
                    .filter(|p| **p >= GIB)
                    .map(|p| (p - total % p) % p)
                    .filter(|f| *f > 0)
                    .collect();
                fillers.sort_unstable();
                fillers.dedup();
                let mut tries: Vec<Option<(usize, u64)>> = vec![None];
                for filler in fillers {
                    tries.extend(self.filler_ports().into_iter().map(|i| Some((i, filler))));
                }
                for grow in tries {
                    let mut windows = windows.clone();
                    if let Some((w, filler)) = grow.and_then(|(i, f)| windows.get_mut(i).zip(Some(f))) {
                        w.size = w.size.checked_add(filler).ok_or(AddressSpaceError::Overflow)?;
                    }
                    let (entries, index) = self.end_entries(&place, &windows, bridges)?;
                    let Some(layout) = place.layout(&entries)? else { continue };
                    let fits = targets.iter().all(|t| {
                        let e = index.get(t.port).copied().flatten();
                        let entry = e.and_then(|e| entries.get(e).zip(layout.tie_starts.get(e)));
                        entry.is_some_and(|(entry, starts)| {
                            fits_everywhere(starts, entry.window.size, &t.bars, &t.need)
                        })
                    });
                    let total = entries.iter().fold(0u64, |a, e| a.saturating_add(e.window.size));
                    if fits && best.as_ref().map_or(true, |b| total < b.0) {
                        best = Some((total, entries, index, sizing, layout.region));
                    }
                }
            }
            if let Some((_, entries, index, sizing, region)) = best.take() {
                self.apply_end(&place, &entries, &index, &targets, sizing, bridges);
                return Ok(Some(Placed { region, bits }));
            }
        }
        let available = self.opts.guest_phys_bits.map_or(0, |b| {
            let top = EndPlacement::of(&self.spec, b, ram, floor).map_or(0, |p| p.top);
            top.saturating_sub(floor)
        });
        Err(AddressSpaceError::Mmio64Aperture { needed: last_need, available }.into())
    }

    /// Writes the chosen windows: every root port's prefetchable window as the firmware
    /// sizes it, and the bridges' too.
    fn apply_end(
        &mut self,
        place: &EndPlacement,
        entries: &[Entry],
        index: &[Option<usize>],
        targets: &[Target],
        sizing: Sizing,
        bridges: &mut [PciBridge],
    ) {
        for (i, p) in self.ports.iter_mut().enumerate() {
            if let Some(e) = index.get(i).copied().flatten().and_then(|e| entries.get(e)) {
                p.reservation.pref = e.window;
            }
        }
        for t in targets {
            if let Some(p) = self.ports.get_mut(t.port) {
                // Where it was laid out, the window takes the profile as a window aligned
                // to its largest BAR would: that is the guarantee it records.
                p.reservation.pref.align = p.reservation.pref.align.max(t.need.align);
                p.reservation.why.push(format!(
                    "64-bit prefetchable window {} ({}): {}",
                    human_size(p.reservation.pref.size),
                    human_size(t.need.size),
                    sizing.why()
                ));
                if place.pad {
                    p.reservation.why.push(format!(
                        "the firmware pads hotplug windows (RAM above 4 GiB): at least {} and aligned to it",
                        human_size(place.pad_align())
                    ));
                }
            }
        }
        let first_bridge = index.iter().flatten().count();
        for (b, e) in bridges.iter_mut().zip(entries.iter().skip(first_bridge)) {
            b.pref = e.window;
        }
    }

    /// Where the 64-bit windows may begin: the end of RAM, or of memory hotplug's device
    /// memory region above it.
    fn aperture_floor(&self) -> Result<u64, PlanError> {
        let ram = self.opts.guest_ram;
        let ram_end = self.spec.ram_end(ram)?;
        Ok(match self.request.foreign.memory_hotplug {
            Some(h) => h.end(ram, ram_end)?,
            None => ram_end,
        })
    }

    /// SeaBIOS up to 1.16.2 lays the windows out upwards from the end of RAM; one that
    /// comes to straddle QEMU's reserved range below 1 TiB ([`AMD_HT_HOLE`]) may have no
    /// aligned slot left for its largest BAR outside it (measured: 4 × 128 GiB windows of
    /// 256 GiB + 30 MiB, the fourth from 772 GiB, its only slot at 896 GiB..1 TiB refused;
    /// random seed 2004: two 256 GiB spare windows, the second at
    /// 0x80ffe00000-0x100ffbfffff, its only slot 768 GiB..1 TiB refused). The first port
    /// window in the firmware's order grows until every hotplug port's window holds its
    /// profile clear of the range; where no growth does, the plan is refused.
    fn avoid_hole_after_ram(&mut self, bridges: &[PciBridge]) -> Result<(), PlanError> {
        let floor = self.aperture_floor()?;
        let targets = self.end_targets()?;
        let switches = self.switch_targets()?;
        let windows: Vec<WindowReservation> = self.ports.iter().map(|p| p.reservation.pref).collect();
        let no_pad = EndPlacement { top: u64::MAX, pad: false, floor };
        let (mut entries, index) = self.end_entries(&no_pad, &windows, bridges)?;
        if self.all_fit_low(&windows, bridges) {
            return Ok(());
        }
        // Only a window the plan sizes freely can grow (through its reservation; the
        // firmware rounds a switch's or a boot-time device's window to its largest BAR),
        // and growing the first of them in the firmware's order moves every window after
        // it: a bridge window, a switch or one of the VMM's BARs may come before it
        // (larger alignment). With none, the layout is checked as it is.
        let free: Vec<usize> =
            self.filler_ports().into_iter().filter_map(|i| index.get(i).copied().flatten()).collect();
        let first = crate::end_placement::first_in_order(&entries, |e| free.contains(&e));
        let original = first.and_then(|e| entries.get(e)).map(|e| e.window).unwrap_or_default();
        let steps = if first.is_some() { 2 * AMD_HT_HOLE.end() / GIB } else { 0 };
        let mut unfit = None;
        for k in 0..=steps {
            let grow = k * GIB;
            if let Some(e) = first.and_then(|e| entries.get_mut(e)) {
                e.window.size = original.size.checked_add(grow).ok_or(AddressSpaceError::Overflow)?;
            }
            let layout = layout_after_ram(floor, &entries)?;
            if layout.region.base >= AMD_HT_HOLE.end() || layout.region.end() <= AMD_HT_HOLE.base {
                return Ok(());
            }
            match self.misfit(&targets, &switches, &entries, &index, &layout)? {
                Some(port) => unfit = unfit.or(Some(port)),
                None => return self.record_growth(first, &index, original, grow),
            }
        }
        let port = unfit.and_then(|i| self.ports.get(i)).map(|p| p.id.to_string()).unwrap_or_default();
        Err(AddressSpaceError::ReservedRange {
            port,
            reserved_base: AMD_HT_HOLE.base,
            reserved_last: AMD_HT_HOLE.end().saturating_sub(1),
        }
        .into())
    }

    /// The first port (a target root port, or a switch's root port) whose BARs do not fit
    /// clear of [`AMD_HT_HOLE`] in `layout`, or `None` when all do.
    fn misfit(
        &self,
        targets: &[Target],
        switches: &[SwitchTarget],
        entries: &[Entry],
        index: &[Option<usize>],
        layout: &Layout,
    ) -> Result<Option<usize>, PlanError> {
        let starts_of =
            |port: usize| index.get(port).copied().flatten().and_then(|e| layout.tie_starts.get(e));
        for t in targets {
            let e = index.get(t.port).copied().flatten();
            let entry = e.and_then(|e| entries.get(e).zip(starts_of(t.port)));
            let fits = entry
                .is_some_and(|(entry, starts)| fits_everywhere(starts, entry.window.size, &t.bars, &t.need));
            if !fits {
                return Ok(Some(t.port));
            }
        }
        for sw in switches {
            if !sw.fits(starts_of(sw.root).map_or(&[][..], Vec::as_slice))? {
                return Ok(Some(sw.root));
            }
        }
        Ok(None)
    }

    /// Writes `grow` more bytes into the reservation of the port whose entry is `first`.
    fn record_growth(
        &mut self,
        first: Option<usize>,
        index: &[Option<usize>],
        original: WindowReservation,
        grow: u64,
    ) -> Result<(), PlanError> {
        let port = first.and_then(|f| index.iter().position(|e| *e == Some(f)));
        let Some(p) = port.and_then(|i| self.ports.get_mut(i)).filter(|_| grow > 0) else { return Ok(()) };
        p.reservation.pref.size = original.size.checked_add(grow).ok_or(AddressSpaceError::Overflow)?;
        p.reservation.why.push(format!(
            "{} more than it needs: the firmware lays the windows out from the end of RAM, and this moves the others' large BARs clear of the range QEMU reserves below 1 TiB for AMD-vendor CPUs",
            human_size(grow)
        ));
        Ok(())
    }

    /// The firmware places the region as SeaBIOS 1.16.2 did: only 2 MiB start alignment
    /// is promised, so the largest BAR's alignment is slack.
    fn classic_fallback(&mut self, start_align: u64, targets: &[Target]) -> Result<(), PlanError> {
        for t in targets {
            let size = Sizing::Unaligned.size(&t.need, start_align)?;
            if let Some(p) = self.ports.get_mut(t.port) {
                p.reservation.pref = WindowReservation { size, align: start_align };
                p.reservation.why.push(format!(
                    "64-bit prefetchable window {}: {} (the firmware does not place the region at the end of the address space for this guest)",
                    human_size(size),
                    Sizing::Unaligned.why()
                ));
            }
        }
        Ok(())
    }
}

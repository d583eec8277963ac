//! A simulation of how firmware lays out bridge windows and how the guest kernel assigns
//! BARs inside them, used to check a plan's promise that every BAR fits.
//!
//! The layout follows the firmware's order: the root-level windows of each kind are
//! sorted by their (guaranteed) alignment, largest first, then in bus order, and placed one
//! after another from the aperture base; windows of downstream ports are placed the same
//! way inside their root port's window. BARs are then assigned inside a window largest
//! alignment first, each at the next address aligned to its size, as Linux does. The
//! checks can also start a window at any other address its guaranteed alignment allows,
//! which is how firmware with other devices present may place it.

use pcilibs::requirement::{Resource, Window as WindowKind};
use serde::{Deserialize, Serialize};

use crate::error::AddressSpaceError;
use crate::plan::{Plan, PortKind};
use crate::platform::Range;
use crate::qemu::QemuId;
use crate::reserve::WindowReservation;
use crate::units::align_up;

/// A window placed at an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlacedWindow {
    /// Port id.
    pub port: QemuId,
    /// Which window.
    pub kind: WindowKind,
    /// First address.
    pub base: u64,
    /// Size.
    pub size: u64,
}

impl PlacedWindow {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// Assigns `resources` of one window kind inside `[base, base + size)` the way Linux does;
/// returns each resource's address, or `None` if one does not fit.
pub(crate) fn assign_bars(base: u64, size: u64, resources: &[Resource]) -> Option<Vec<(Resource, u64)>> {
    assign_bars_avoiding(base, size, resources, &[])
}

/// [`assign_bars`] keeping clear of `reserved` ranges. Linux takes the resources largest
/// alignment first and gives each the lowest free address aligned to it inside the
/// window (`allocate_resource` walks the gaps), so a small BAR can go below a large one
/// whose alignment left room before it.
pub(crate) fn assign_bars_avoiding(
    base: u64,
    size: u64,
    resources: &[Resource],
    reserved: &[Range],
) -> Option<Vec<(Resource, u64)>> {
    let mut list: Vec<Resource> = resources.to_vec();
    list.sort_by_key(|r| std::cmp::Reverse((r.align, r.size)));
    let end = base.checked_add(size)?;
    let mut taken: Vec<(u64, u64)> = reserved.iter().map(|r| (r.base, r.end())).collect();
    let mut out = Vec::new();
    for r in list {
        let mut at = align_up(base, r.align.max(1))?;
        loop {
            let next = at.checked_add(r.size)?;
            if next > end {
                return None;
            }
            match taken.iter().find(|(s, e)| at < *e && *s < next) {
                None => break,
                Some((_, e)) => at = align_up(*e, r.align.max(1))?,
            }
        }
        let next = at.checked_add(r.size)?;
        taken.push((at, next));
        out.push((r, at));
    }
    Some(out)
}

/// Places windows of one kind sequentially from `base` in firmware order;
/// [`AddressSpaceError::Overflow`] when one would end past 2^64.
fn place_sequence(
    base: u64,
    windows: &[(QemuId, WindowReservation)],
    kind: WindowKind,
) -> Result<Vec<PlacedWindow>, AddressSpaceError> {
    let mut list: Vec<&(QemuId, WindowReservation)> = windows.iter().filter(|(_, w)| w.size > 0).collect();
    // Stable: equal alignments keep the bus scan order, as in `reserve::pack_windows`.
    list.sort_by_key(|w| std::cmp::Reverse(w.1.align));
    let mut cursor = base;
    let mut out = Vec::new();
    for (port, w) in list {
        let at = align_up(cursor, w.align.max(1)).ok_or(AddressSpaceError::Overflow)?;
        out.push(PlacedWindow { port: port.clone(), kind, base: at, size: w.size });
        cursor = at.checked_add(w.size).ok_or(AddressSpaceError::Overflow)?;
    }
    Ok(out)
}

/// Lays out every port's memory and prefetchable windows: root-level windows in the
/// 32-bit hole and the 64-bit aperture, downstream windows inside their root port's.
/// [`AddressSpaceError::Overflow`] when a window would end past 2^64 (a plan file can
/// say anything).
pub(crate) fn layout(plan: &Plan) -> Result<Vec<PlacedWindow>, AddressSpaceError> {
    let mut out = Vec::new();
    let roots: Vec<_> = plan.ports.iter().filter(|p| p.kind == PortKind::Root).collect();
    let pref_base = plan.address.mmio64_aperture.map_or(plan.platform.mmio32.base, |a| a.base);
    for (kind, base) in [(WindowKind::Mem, plan.platform.mmio32.base), (WindowKind::Pref, pref_base)] {
        let pick = |w: &crate::plan::Reservation| if kind == WindowKind::Mem { w.mem } else { w.pref };
        let top: Vec<(QemuId, WindowReservation)> =
            roots.iter().map(|p| (p.id.clone(), pick(&p.reservation))).collect();
        let placed = place_sequence(base, &top, kind)?;
        for sw in &plan.switches {
            let Some(parent) = placed.iter().find(|w| w.port == sw.root_port) else { continue };
            let below: Vec<(QemuId, WindowReservation)> = plan
                .ports
                .iter()
                .filter(|p| p.switch.as_ref() == Some(&sw.id))
                .map(|p| (p.id.clone(), pick(&p.reservation)))
                .collect();
            out.extend(place_sequence(parent.base, &below, kind)?);
        }
        out.extend(placed);
    }
    Ok(out)
}

/// Whether `resources` fit a port's windows at `mem` (the 32-bit window: non-prefetchable
/// BARs and the ROM) and `pref` (the prefetchable window) when Linux assigns them there:
/// largest alignment first, each at the next address aligned to its size. A plan's
/// windows come from [`Plan::window_layout`]; a live guest's from its bridge registers.
pub fn bars_fit(mem: Range, pref: Range, resources: &[Resource]) -> bool {
    let of =
        |k: WindowKind| -> Vec<Resource> { resources.iter().filter(|r| r.window() == k).copied().collect() };
    let m = of(WindowKind::Mem);
    let p = of(WindowKind::Pref);
    (m.is_empty() || assign_bars(mem.base, mem.size, &m).is_some())
        && (p.is_empty() || assign_bars(pref.base, pref.size, &p).is_some())
}

//! The whole-address-space check: 32-bit hole, I/O space, 64-bit aperture and physical
//! address width, before any VM starts.
//!
//! Every total is checked arithmetic: a sum or round-up past 2^64 is
//! [`AddressSpaceError::Overflow`], never a wrapped (release) or panicking (debug) number,
//! and a plan ending above `1 << MAX_PHYS_BITS` is refused whatever the caller says the
//! CPU has, because no platform addresses more.

use pcilibs::requirement::{Requirement, WindowRequirement, MEM_GRANULARITY};

use crate::error::{AddressSpaceError, PlanError};
use crate::plan::{AddressReport, Plan, Port, PortKind};
use crate::planner::Placed;
use crate::platform::{Mmio64Aperture, Range, Totals};
use crate::reserve::{pack_windows as pack, WindowReservation};
use crate::units::{bits_for_end, MAX_PHYS_BITS};

/// The prefetchable padding OVMF gives a hotplug-capable bridge that carries no
/// reservation (a switch downstream port): a 256th of its 64-bit aperture, once that is
/// larger than the 32 GiB default (EDK2's `PciHotPlugInitDxe` since edk2-stable202211);
/// at least `floor`, the padding measured.
fn ovmf_padding(aperture: u64, floor: u64) -> Result<u64, AddressSpaceError> {
    const DEFAULT_APERTURE: u64 = 32 << 30;
    let share = if aperture > DEFAULT_APERTURE {
        crate::units::next_pow2(aperture >> 8).ok_or(AddressSpaceError::Overflow)?
    } else {
        0
    };
    Ok(share.max(floor))
}

/// An OVMF aperture that holds `pref` and the padding of `downstream` switch downstream
/// ports, the padding depending on the aperture's own size: grown until both fit (a
/// handful of doublings; more downstream ports than a 256th each allows overflow and are
/// an error).
fn padded_aperture(
    spec: &crate::platform::PlatformSpec,
    below: u64,
    pref: WindowRequirement,
    downstream: u64,
    floor: u64,
) -> Result<Option<Range>, AddressSpaceError> {
    let mut each = floor;
    for _ in 0..64 {
        let padding = each.checked_mul(downstream).ok_or(AddressSpaceError::Overflow)?;
        let with_padding = pref.size.checked_add(padding).ok_or(AddressSpaceError::Overflow)?;
        let Some(range) = spec.mmio64_range_above(below, with_padding, pref.align)? else {
            return Ok(None);
        };
        let needed_each = if downstream == 0 { 0 } else { ovmf_padding(range.size, floor)? };
        if needed_each <= each {
            return Ok(Some(range));
        }
        each = needed_each;
    }
    Err(AddressSpaceError::Overflow)
}

/// Checks 32-bit hole, I/O space, 64-bit aperture and physical address width.
///
/// `placed` is the 64-bit region the planner laid out for firmware that places it at the
/// end of the address space, with the width it was laid out for.
pub(crate) fn check_address_space(
    plan: &Plan,
    hotplug: &Totals,
    placed: Option<Placed>,
) -> Result<(AddressReport, Totals), PlanError> {
    let spec = &plan.platform;
    let top: Vec<&Port> = plan.ports.iter().filter(|p| p.kind == PortKind::Root).collect();
    // PCIe-to-PCI bridges sit on pcie.0 next to the root ports, with the windows the
    // planner worked out for them (at least the 1 MiB granularity for memory).
    let bridge_mem = plan.bridges.iter().map(|b| {
        if b.mem.size >= MEM_GRANULARITY {
            b.mem
        } else {
            WindowReservation { size: MEM_GRANULARITY, align: MEM_GRANULARITY }
        }
    });
    // The VMM's own devices on the root bus take their BARs and windows next to them.
    let foreign: Vec<Requirement> =
        plan.foreign.iter().map(|f| f.device.requirement()).collect::<Result<_, _>>()?;
    let as_window = |w: &WindowRequirement| WindowReservation { size: w.size, align: w.align };
    let mem = pack(
        top.iter()
            .map(|p| p.reservation.mem)
            .chain(bridge_mem)
            .chain(foreign.iter().map(|f| as_window(&f.mem))),
    )?;
    let io = top
        .iter()
        .map(|p| p.reservation.io.size)
        .chain(plan.bridges.iter().map(|b| b.io.size))
        .chain(foreign.iter().map(|f| f.io.size))
        .try_fold(0u64, u64::checked_add)
        .ok_or(AddressSpaceError::Overflow)?;
    let pref = pack(
        top.iter()
            .map(|p| p.reservation.pref)
            .chain(plan.bridges.iter().map(|b| b.pref))
            .chain(foreign.iter().map(|f| as_window(&f.pref))),
    )?;
    if mem.size > spec.mmio32.size {
        return Err(AddressSpaceError::Mmio32 { needed: mem.size, available: spec.mmio32.size }.into());
    }
    if io > spec.io.size {
        return Err(AddressSpaceError::Io { needed: io, available: spec.io.size }.into());
    }
    let ram = plan.options.guest_ram;
    let ram_end = spec.ram_end(ram)?;
    // Memory hotplug's device memory region sits above RAM; firmware starts the 64-bit
    // aperture above it.
    let memory_end = plan.memory_hotplug.map(|h| h.end(ram, ram_end)).transpose()?;
    let below_aperture = memory_end.unwrap_or(ram_end);
    let grows =
        matches!(spec.mmio64, Mmio64Aperture::GrowsAfterRam | Mmio64Aperture::EndOfAddressSpace { .. });
    let aperture = if let Some(p) = placed {
        Some(p.region)
    } else if pref.is_empty() && grows {
        None
    } else if let Mmio64Aperture::FwCfgSized { downstream_padding, .. } = spec.mmio64 {
        let downstream = plan.ports.iter().filter(|p| p.kind == PortKind::Downstream).count() as u64;
        padded_aperture(spec, below_aperture, pref, downstream, downstream_padding)?
    } else {
        spec.mmio64_range_above(below_aperture, pref.size, pref.align)?
    };
    if let (Mmio64Aperture::Fixed { base, .. }, Some(end)) = (spec.mmio64, memory_end) {
        if end > base {
            return Err(
                AddressSpaceError::MemoryOverlapsAperture { memory_end: end, aperture_base: base }.into()
            );
        }
    }
    if let (Mmio64Aperture::Fixed { size, .. }, false) = (spec.mmio64, pref.is_empty()) {
        if pref.size > size {
            return Err(AddressSpaceError::Mmio64Aperture { needed: pref.size, available: size }.into());
        }
    }
    if matches!(spec.mmio64, Mmio64Aperture::None) && !pref.is_empty() {
        return Err(AddressSpaceError::Mmio64Aperture { needed: pref.size, available: 0 }.into());
    }
    if aperture.is_none() && !pref.is_empty() {
        return Err(AddressSpaceError::Mmio64Aperture { needed: pref.size, available: 0 }.into());
    }
    let end_of = |aperture: Option<Range>| -> Result<u64, AddressSpaceError> {
        match aperture {
            Some(a) => Ok(a.checked_end().ok_or(AddressSpaceError::Overflow)?.max(below_aperture)),
            None => Ok(below_aperture),
        }
    };
    // The aperture as asked for (the fw_cfg size), then where the firmware puts it for
    // the guest CPU's width: the caller's, or what the plan will ask for (the machine's
    // default unless the plan needs more).
    let asked = aperture;
    let guest_bits = plan
        .options
        .guest_phys_bits
        .unwrap_or_else(|| spec.default_phys_bits.max(bits_for_end(end_of(asked).unwrap_or(u64::MAX))));
    let aperture = asked.map(|a| spec.mmio64_placed(a, guest_bits));
    let end = end_of(aperture)?;
    // The firmware lays the region out for the width the planner chose: the guest needs
    // at least that many bits even where the region ends lower (the width decides where).
    let laid_out_for = placed.map_or(0, |p| p.bits);
    let needed_bits = bits_for_end(end).max(bits_for_end(ram_end)).max(laid_out_for);
    let widest = (Some(MAX_PHYS_BITS), "widest platform (52-bit x86-64 MAXPHYADDR and aarch64 IPA)");
    for (have, who) in
        [widest, (plan.options.guest_phys_bits, "guest CPU"), (plan.options.host_phys_bits, "host")]
    {
        if let Some(bits) = have {
            if bits < needed_bits {
                return Err(AddressSpaceError::PhysBits {
                    end,
                    needed_bits,
                    available_bits: bits,
                    source_name: who.to_string(),
                }
                .into());
            }
        }
    }
    let report = AddressReport {
        mmio32_needed: mem.size,
        mmio32_available: spec.mmio32.size,
        io_needed: io,
        io_available: spec.io.size,
        // Where the firmware lays the windows out end to end, the region it takes is what
        // they need; packing by alignment (the bound elsewhere) can exceed it.
        mmio64_needed: placed.map_or(pref.size, |p| p.region.size),
        mmio64_aperture: aperture,
        ram_end,
        memory_end,
        phys_bits_needed: needed_bits,
        guest_phys_bits: plan.options.guest_phys_bits,
        host_phys_bits: plan.options.host_phys_bits,
    };
    let totals =
        Totals { mmio64_needed: asked.map_or(0, |a| a.size), phys_bits_needed: needed_bits, ..*hotplug };
    Ok((report, totals))
}

//! SeaBIOS up to 1.16.2 lays the root ports' 64-bit prefetchable windows out one after
//! the other from the end of RAM, without looking at the e820 map, while QEMU reserves
//! [`AMD_HT_HOLE`] (0xfd00000000..1 TiB) there for an AMD-vendor CPU with 40 or more
//! physical address bits (TCG's `qemu64` is one). Linux assigns no BAR over that range
//! (bookworm, Linux 6.1: "can't assign; no space"). Each plan here is laid out as the
//! firmware lays it out, independently of the planner, and every hotplug port's window
//! must hold its largest BAR clear of the range wherever it lands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use arch_x86_aarch64::{FirmwareGeneration, Q35};
use pcie_topology::units::{GIB, MIB};
use pcie_topology::{
    plan, AddressSpaceError, DeviceRequest, Foreign, ForeignDevice, HotplugProfile, Mode, Plan, PlanError,
    PlanRequest, PortKind, SpareRequest, AMD_HT_HOLE,
};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;

/// Each root port's 64-bit prefetchable window (port id, size) and every start the
/// firmware may give it. The firmware orders the 64-bit entries of the root bus (port
/// windows, 2 MiB-aligned when empty, and the VMM's own 64-bit BARs, aligned to their
/// size) largest alignment first, then largest size, and lays them end to end from the
/// end of RAM aligned to the first one and to 1 GiB; entries of one size and alignment
/// may come in either order (measured: SeaBIOS 1.16.2 put the port of the higher bus
/// number first).
fn firmware_layout(plan: &Plan) -> Vec<(String, u64, Vec<u64>)> {
    let floor = plan.platform.ram_end(plan.options.guest_ram).unwrap().max(4 * GIB);
    // A switch's root port window is aligned to the largest of its downstream windows.
    let below = |root: &str| {
        let switch = plan.switches.iter().find(|s| s.root_port.as_str() == root);
        let downstream =
            plan.ports.iter().filter(|p| switch.is_some_and(|s| p.switch.as_ref() == Some(&s.id)));
        downstream.map(|p| p.reservation.pref.align).max().unwrap_or(0)
    };
    let ports = plan
        .ports
        .iter()
        .filter(|p| p.kind == PortKind::Root && p.reservation.pref.size > 0)
        .map(|p| (Some(p.id.to_string()), p.reservation.pref.size, below(p.id.as_str()).max(2 * MIB)));
    let vmm = plan.foreign.iter().map(|f| f.device.requirement().unwrap().pref).filter(|w| w.size > 0);
    let mut entries: Vec<(Option<String>, u64, u64)> =
        ports.chain(vmm.map(|w| (None, w.size, w.align))).collect();
    entries.sort_by_key(|(_, size, align)| std::cmp::Reverse((*align, *size)));
    let first_align = entries.first().map_or(1, |(_, _, align)| *align);
    let base = floor.div_ceil(first_align) * first_align;
    let sizes: Vec<u64> = entries.iter().map(|(_, size, _)| *size).collect();
    let placed: Vec<(u64, u64)> =
        sizes.iter().copied().zip(lay_out(base.div_ceil(GIB) * GIB, &sizes)).collect();
    entries
        .into_iter()
        .filter_map(|(id, size, _)| {
            let starts = placed.iter().filter(|(s, _)| *s == size).map(|(_, start)| *start).collect();
            id.map(|id| (id, size, starts))
        })
        .collect()
}

/// The start of each of `sizes`, laid end to end from `base`.
fn lay_out(base: u64, sizes: &[u64]) -> Vec<u64> {
    let mut at = base;
    sizes
        .iter()
        .map(|size| {
            let start = at;
            at += size;
            start
        })
        .collect()
}

/// Whether `[start, start + size)` holds a `bar`-aligned slot of `bar` bytes outside
/// [`AMD_HT_HOLE`]: the lowest aligned slot, or the lowest one past the range.
fn holds_clear_of_the_hole(start: u64, size: u64, bar: u64) -> bool {
    let end = start + size;
    let lowest = start.div_ceil(bar) * bar;
    let past_hole = lowest.max(AMD_HT_HOLE.end().div_ceil(bar) * bar);
    let clear = |slot: u64| slot + bar <= AMD_HT_HOLE.base || slot >= AMD_HT_HOLE.end();
    [lowest, past_hole].into_iter().any(|slot| slot + bar <= end && clear(slot))
}

/// Checks every window of `plan` whose port waits for a BAR of `bar` bytes (`ports`).
fn check(plan: &Plan, ports: &[String], bar: u64, what: &str) {
    let layout = firmware_layout(plan);
    for port in ports {
        let (_, size, starts) = layout.iter().find(|(id, _, _)| id == port).unwrap();
        for start in starts {
            assert!(
                holds_clear_of_the_hole(*start, *size, bar),
                "{what}: port {port}, window {start:#x}-{:#x}, has no {bar:#x}-aligned slot outside {:#x}-{:#x}",
                start + size - 1,
                AMD_HT_HOLE.base,
                AMD_HT_HOLE.end() - 1,
            );
        }
    }
}

fn spare_ports(plan: &Plan) -> Vec<String> {
    plan.ports.iter().filter(|p| p.profile.is_some()).map(|p| p.id.to_string()).collect()
}

/// The layout above, fed with the reservations the guest ran with before the fix (two
/// windows of 0x7fffe00000 and two of 2 MiB), gives the addresses the guest showed.
#[test]
fn the_layout_gives_the_addresses_measured_in_the_guest() {
    let windows = [0x7f_ffe0_0000u64, 0x7f_ffe0_0000, 2 * MIB, 2 * MIB];
    let starts = lay_out(4 * GIB, &windows);
    // From the guest's dmesg: 00:02.0 [mem 0x100000000-0x80ffdfffff 64bit pref],
    // 00:01.0 [mem 0x80ffe00000-0x100ffbfffff 64bit pref] holding the e820 range.
    assert_eq!(starts, [0x1_0000_0000, 0x80_ffe0_0000, 0x100_ffc0_0000, 0x100_ffe0_0000]);
    assert!(holds_clear_of_the_hole(starts[0], windows[0], 256 * GIB));
    assert!(!holds_clear_of_the_hole(starts[1], windows[1], 256 * GIB));
}

/// Random seed 2004 (regression scenario `random-2004`): two spare ports for a 256 GiB
/// BAR on SeaBIOS 1.16.2. Both windows were sized 511.9 GiB (the BAR and its alignment
/// slack); the second one, at 0x80ffe00000-0x100ffbfffff, had its only aligned slot over
/// the reserved range and the guest refused the BAR.
#[test]
fn two_spare_ports_for_256g_hold_their_bar_clear_of_the_ht_hole() {
    let profile = HotplugProfile::parse("256:mem32,256G:pref64").unwrap();
    let mut request = PlanRequest::default().with_spares(vec![SpareRequest::new(profile, 2)]);
    request.options.guest_ram = 256 * MIB;
    let platform = Q35::for_generation(FirmwareGeneration::SeaBiosAfterRam, "").unwrap();
    let plan = plan(&platform, &request).unwrap();
    check(&plan, &spare_ports(&plan), 256 * GIB, "seed 2004");
}

/// A 64 GiB BAR of the VMM's own on the root bus comes first in the firmware's order:
/// the two 256 GiB spare windows follow it from 128 GiB, and the second one, from 640 GiB,
/// would have its only aligned slot over the range. The plan grows the first port window
/// instead, or refuses.
#[test]
fn a_vmm_bar_first_in_the_firmware_order_still_leaves_the_windows_clear_of_the_ht_hole() {
    let vmm = ForeignDevice::auto("vmm0", "ivshmem-plain").with_resources(vec![Resource::bar(
        BarKind::Mem64,
        true,
        64 * GIB,
    )]);
    let profile = HotplugProfile::parse("256:mem32,256G:pref64").unwrap();
    let mut request = PlanRequest::default()
        .with_spares(vec![SpareRequest::new(profile, 2)])
        .with_foreign(Foreign::new().with_devices(vec![vmm]));
    request.options.guest_ram = 256 * MIB;
    let platform = Q35::for_generation(FirmwareGeneration::SeaBiosAfterRam, "").unwrap();
    let plan = plan(&platform, &request).unwrap();
    check(&plan, &spare_ports(&plan), 256 * GIB, "a VMM BAR first");
}

/// Three 256 GiB devices behind one switch: the switch's root port window is aligned to
/// 256 GiB and comes first, at 256 GiB..1 TiB, and the third downstream window,
/// 0xc000000000-0xffffffffff, holds the reserved range (measured on bookworm: "clipped
/// [mem size 0x4000000000 64bit pref] to [mem size 0x3d00000000 64bit pref] for e820
/// entry", then "can't assign; no space"). No reservation moves it: refused.
#[test]
fn a_switch_window_over_the_ht_hole_is_refused() {
    let devices = (0..3)
        .map(|i| {
            let mut d = DeviceRequest::ivshmem(&format!("g{i}"), 256 * GIB).unwrap();
            d.p2p_group = Some("p2p0".into());
            d
        })
        .collect();
    let mut request = PlanRequest::default().with_mode(Mode::SwitchPort).with_devices(devices);
    request.options.guest_ram = 256 * MIB;
    let platform = Q35::for_generation(FirmwareGeneration::SeaBiosAfterRam, "").unwrap();
    let Err(e) = plan(&platform, &request) else { panic!("three 256G devices behind a switch were planned") };
    assert!(
        matches!(
            &e,
            PlanError::AddressSpace(AddressSpaceError::ReservedRange { port, reserved_base: 0xfd_0000_0000, reserved_last: 0xff_ffff_ffff })
                if port == "rp0"
        ),
        "{e}"
    );
}

/// Two 256 GiB devices behind a switch (its window first, 256..768 GiB, clear of the
/// range) and two 256 GiB spare root ports after it: the first spare window grows so that
/// both hold their BAR clear of the range.
#[test]
fn spare_windows_after_a_switch_move_clear_of_the_ht_hole() {
    let devices = (0..2)
        .map(|i| {
            let mut d = DeviceRequest::ivshmem(&format!("g{i}"), 256 * GIB).unwrap();
            d.p2p_group = Some("p2p0".into());
            d
        })
        .collect();
    let profile = HotplugProfile::parse("256:mem32,256G:pref64").unwrap();
    let mut request = PlanRequest::default()
        .with_mode(Mode::SwitchPort)
        .with_devices(devices)
        .with_spares(vec![SpareRequest::new(profile, 2)]);
    request.options.guest_ram = 256 * MIB;
    let platform = Q35::for_generation(FirmwareGeneration::SeaBiosAfterRam, "").unwrap();
    let plan = plan(&platform, &request).unwrap();
    let spares = spare_ports(&plan);
    assert_eq!(spares.len(), 2);
    check(&plan, &spares, 256 * GIB, "a switch and two spares");
}

/// The same across counts, BAR sizes and RAM sizes, with spare ports and ports planned
/// for a hotplugged device (210 plans): every one holds each BAR clear of the range.
#[test]
fn every_hotplug_window_after_ram_holds_its_bar_clear_of_the_ht_hole() {
    let platform = Q35::for_generation(FirmwareGeneration::SeaBiosAfterRam, "").unwrap();
    for bar in [32 * GIB, 64 * GIB, 128 * GIB, 256 * GIB, 512 * GIB] {
        for spares in 0..=4u32 {
            for devices in 0..=2usize {
                for ram in [256 * MIB, 8 * GIB, 600 * GIB] {
                    if spares == 0 && devices == 0 {
                        continue;
                    }
                    let what = format!("{spares} spares and {devices} devices of {bar:#x}, RAM {ram:#x}");
                    let profile = HotplugProfile::parse(&format!("{}G:pref64", bar / GIB)).unwrap();
                    let ids: Vec<String> = (0..devices).map(|i| format!("d{i}")).collect();
                    let list = ids
                        .iter()
                        .map(|id| {
                            let mut d = DeviceRequest::ivshmem(id, bar).unwrap();
                            d.cold_plug = false;
                            d
                        })
                        .collect();
                    let mut request = PlanRequest::default()
                        .with_devices(list)
                        .with_spares(vec![SpareRequest::new(profile, spares)]);
                    request.options.guest_ram = ram;
                    // The guest's width is left to the plan, so each of them plans.
                    let plan = plan(&platform, &request).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let mut ports = spare_ports(&plan);
                    for id in &ids {
                        ports.push(plan.device(id).unwrap().port.as_ref().unwrap().to_string());
                    }
                    check(&plan, &ports, bar, &what);
                }
            }
        }
    }
}

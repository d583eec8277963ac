//! What an accepted plan promises, checked after every successful `plan()`.
//!
//! The checks are the planner's own promises (see the crate docs of `pcie-topology`): ids
//! and guest addresses are unique, every device fits the windows of its port, the
//! address-space report adds up and fits the machine, a plan reloads from its JSON as the
//! same plan, and every device has a hotplug action the engine accepts.

use std::collections::BTreeSet;

use pcie_topology::plan::GuestLocation;
use pcie_topology::platform::Range;
use pcie_topology::{bars_fit, DeviceRequest, Plan, PortKind};
use pcilibs::requirement::{Resource, Window as WindowKind};

/// Panics (a finding) when `plan`, made from `requests`, breaks one of the promises
/// above. A plan made with `size_reservations` off keeps the machine's default windows on
/// purpose (to show the guest failing), so its devices are not expected to fit.
pub fn accepted_plan(plan: &Plan, requests: &[DeviceRequest]) {
    unique_ids_and_addresses(plan);
    devices_fit_their_ports(plan, plan.options.size_reservations);
    if plan.options.size_reservations {
        bars_fit_the_simulated_layout(plan, requests);
    }
    address_report_adds_up(plan);
    reloads_as_itself(plan);
    actions_are_accepted(plan);
}

fn unique_ids_and_addresses(plan: &Plan) {
    let ids: Vec<&str> = plan.ids_in_use().collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "an id is used twice: {ids:?}");
    let mut addresses = BTreeSet::new();
    for p in plan.ports.iter().filter(|p| p.kind != PortKind::BridgeSlot) {
        assert!(
            addresses.insert((p.host_bridge.clone(), p.bdf.bus(), p.bdf.devfn())),
            "two ports at {}",
            p.bdf
        );
    }
    for d in &plan.devices {
        for f in &d.functions {
            if let GuestLocation::Pci { bdf, .. } = &f.location {
                let port = d.port.as_ref().and_then(|p| plan.port(p.as_str()));
                let root = port.map(|p| p.host_bridge.clone()).unwrap_or_default();
                assert!(addresses.insert((root, bdf.bus(), bdf.devfn())), "two functions at {bdf}");
            }
        }
    }
}

fn devices_fit_their_ports(plan: &Plan, fit: bool) {
    for d in &plan.devices {
        let Some(port_id) = &d.port else { continue };
        let port = plan.port(port_id.as_str());
        let port = port.unwrap_or_else(|| panic!("{}: port {port_id} is not in the plan", d.id));
        assert_eq!(port.occupant.as_ref(), Some(&d.id), "{}: port {} names another occupant", d.id, port.id);
        if fit && port.kind != PortKind::BridgeSlot {
            assert!(
                port.reservation.holds(&d.need),
                "{} does not fit {}: {:?}",
                d.id,
                port.id,
                port.reservation
            );
        }
    }
}

fn address_report_adds_up(plan: &Plan) {
    let a = &plan.address;
    assert!(a.mmio32_needed <= a.mmio32_available, "32-bit MMIO over budget: {a:?}");
    assert!(a.io_needed <= a.io_available, "I/O over budget: {a:?}");
    let io: Option<u64> = plan
        .ports
        .iter()
        .filter(|p| p.kind == PortKind::Root)
        .map(|p| p.reservation.io.size)
        .chain(plan.bridges.iter().map(|b| b.io.size))
        .try_fold(0u64, |sum, s| sum.checked_add(s));
    assert_eq!(io, Some(a.io_needed), "I/O windows do not add up to the report: {a:?}");
    if a.mmio64_needed > 0 {
        let aperture = a.mmio64_aperture.unwrap_or_else(|| panic!("64-bit windows but no aperture: {a:?}"));
        assert!(aperture.size >= a.mmio64_needed, "aperture smaller than the windows: {a:?}");
        assert!(aperture.base.checked_add(aperture.size).is_some(), "aperture beyond 2^64: {a:?}");
        let bits = u32::from(a.phys_bits_needed);
        let end = aperture.base + aperture.size;
        assert!(bits >= 64 || end <= 1u64 << bits, "aperture ends past {bits} physical address bits: {a:?}");
    }
}

/// Every resource of a port's device (as requested: an SR-IOV aperture keeps its VF
/// BAR's alignment, which the plan's BAR list does not carry) or profile fits at the
/// simulated window start and one alignment further.
fn bars_fit_the_simulated_layout(plan: &Plan, requests: &[DeviceRequest]) {
    let layout =
        plan.window_layout().unwrap_or_else(|e| panic!("an accepted plan has no window layout: {e}"));
    for p in plan.ports.iter().filter(|p| p.kind != PortKind::BridgeSlot) {
        let resources: Vec<Resource> = match (&p.occupant, &p.profile) {
            (Some(d), _) => match requests.iter().find(|r| r.id == *d) {
                Some(r) => r.resources().copied().filter(|r| r.size > 0).collect(),
                None => panic!("{}: occupant {d} was not requested", p.id),
            },
            (None, Some(prof)) => prof.resources.iter().map(|r| r.resource).filter(|r| r.size > 0).collect(),
            _ => continue,
        };
        let r = &p.reservation;
        let at = |kind| layout.iter().find(|w| w.kind == kind && w.port == p.id).map_or(0, |w| w.base);
        for shift in [0u64, 1] {
            let m = at(WindowKind::Mem).saturating_add(shift.saturating_mul(r.mem.align.max(1)));
            let pf = at(WindowKind::Pref).saturating_add(shift.saturating_mul(r.pref.align.max(1)));
            assert!(
                bars_fit(Range::new(m, r.mem.size), Range::new(pf, r.pref.size), &resources),
                "{}: {resources:?} does not fit mem {m:#x}+{:#x} pref {pf:#x}+{:#x}",
                p.id,
                r.mem.size,
                r.pref.size
            );
        }
    }
}

fn reloads_as_itself(plan: &Plan) {
    let json = plan.to_json().unwrap_or_else(|e| panic!("an accepted plan does not serialize: {e}"));
    let again = Plan::from_json(&json).unwrap_or_else(|e| panic!("a written plan does not read back: {e}"));
    assert_eq!(&again, plan, "the plan read back differs");
    assert_eq!(again.to_json().ok().as_deref(), Some(json.as_str()), "same plan, other bytes");
}

fn actions_are_accepted(plan: &Plan) {
    let _ = plan.qemu_args();
    let _ = plan.kernel_args();
    let _ = plan.cpu_phys_bits();
    let _ = plan.explain();
    for d in &plan.devices {
        let action = plan
            .hotplug_action(d.id.as_str())
            .unwrap_or_else(|e| panic!("{}: planned device without a hotplug action: {e}", d.id));
        if !d.cold_plug {
            let request = qmp_hotplug::PlugRequest::from_action(&action);
            assert_eq!(
                request.port,
                *action.port_or_device(),
                "{}: the engine's request is for another port",
                d.id
            );
        }
    }
}

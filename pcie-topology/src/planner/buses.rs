//! Bus numbers as firmware (or the guest kernel) assigns them, and guest paths.

use super::Builder;
use crate::error::PlanError;
use crate::path::GuestPciPath;
use crate::plan::{ExpanderBuses, HostBridge, PciBridge, PortKind};
use crate::platform::BusNumbering;
use crate::qemu::DevFn;

/// Something on a root bus that the firmware gives bus numbers to, in devfn order.
#[derive(Debug, Clone, Copy)]
enum Entry {
    /// A root port of the plan (index into the ports).
    Port(usize),
    /// The plan's PCIe-to-PCI bridge.
    Bridge,
    /// A device of the VMM's with bus numbers below it (index into the foreign list).
    Foreign(usize),
}

/// Kata's agent reads a first path element of at least this as an expander's root bus,
/// and Kata's runtime spaces expander root buses by it.
const KATA_EXPANDER_BUS_MIN: u32 = crate::path::KATA_ROOT_COMPLEX_MIN;

/// The root bus number of expander `hb` when the buses before it (from root bus
/// `prev_root` on) end at `next - 1`, on platform `platform`.
fn expander_root(
    numbering: ExpanderBuses,
    hb: &HostBridge,
    prev_root: u32,
    next: u32,
    platform: &str,
) -> Result<u32, PlanError> {
    match numbering {
        ExpanderBuses::Packed => Ok(next),
        ExpanderBuses::KataAgent => {
            let node = hb.numa_node.unwrap_or(0);
            let root = node
                .checked_add(1)
                .and_then(|n| n.checked_mul(KATA_EXPANDER_BUS_MIN))
                .filter(|r| *r <= 0xff)
                .ok_or_else(|| PlanError::Unsupported {
                    platform: platform.to_string(),
                    what: format!("NUMA node {node} with expander buses numbered as Kata's agent reads them (nodes 0 to 6)"),
                })?;
            if root < next {
                // Only when an earlier expander had a higher node: the planner orders
                // expanders by node, so this is a plan file's or a caller's mistake.
                return Err(PlanError::BusRange { root: prev_root, last: next - 1, limit: root });
            }
            Ok(root)
        }
    }
}

/// Assigns bus numbers depth-first per root bus and expander `bus_nr` ranges, and fills in
/// BDFs and paths of ports, switches and bridges.
pub(super) fn number_buses(
    b: &mut Builder<'_>,
    host_bridges: &mut [HostBridge],
    bridges: &mut [PciBridge],
) -> Result<(), PlanError> {
    let per_hb_ports = b.per_root.clone();
    let kernel = b.spec.bus_numbering == BusNumbering::KernelDepthFirst;
    let mut next: u32 = 0;
    let numbering = b.opts.expander_buses;
    let mut prev_root = 0;
    for (hb_index, hb) in host_bridges.iter_mut().enumerate() {
        let root =
            if hb_index == 0 { next } else { expander_root(numbering, hb, prev_root, next, &b.spec.name)? };
        prev_root = root;
        if root > 255 {
            return Err(PlanError::Buses { needed: root + 1 });
        }
        hb.bus_nr = root as u8;
        if let Some(d) = hb.device.as_mut() {
            *d = d.clone().prop("bus_nr", u64::from(root));
        }
        next = root + 1;
        let root_path = if hb_index == 0 { None } else { Some(root as u8) };
        let mut indices: Vec<usize> = per_hb_ports.get(hb_index).cloned().unwrap_or_default();
        indices.retain(|i| b.ports.get(*i).is_some_and(|p| p.kind == PortKind::Root));
        indices.sort_by_key(|i| b.ports.get(*i).map(|p| DevFn::from(p.bdf)));
        // Items on the root bus in devfn order: root ports, and on pcie.0 the PCI bridge
        // and the VMM's own bridges.
        let mut entries: Vec<(DevFn, Entry)> = indices
            .iter()
            .filter_map(|i| b.ports.get(*i).map(|p| (DevFn::from(p.bdf), Entry::Port(*i))))
            .collect();
        if hb_index == 0 {
            for br in bridges.iter() {
                entries.push((DevFn::from(br.bdf), Entry::Bridge));
            }
            for (k, f) in b.foreign.iter().enumerate().filter(|(_, f)| f.device.buses > 0) {
                entries.push((f.addr, Entry::Foreign(k)));
            }
        }
        entries.sort_by_key(|e| e.0);
        for (devfn, entry) in entries {
            let sec = next;
            if let Entry::Foreign(k) = entry {
                let buses = b.foreign.get(k).map_or(1, |f| u32::from(f.device.buses));
                next = sec + buses;
                if let Some(f) = b.foreign.get_mut(k) {
                    f.secondary_bus = Some(clamp_bus(sec)?);
                    f.subordinate_bus = Some(clamp_bus(next - 1)?);
                }
                continue;
            }
            next += 1;
            match entry {
                Entry::Foreign(_) => {}
                Entry::Port(i) => {
                    let port_id = b.ports.get(i).map(|p| p.id.clone());
                    let sw_index = b.switches.iter().position(|s| Some(&s.root_port) == port_id.as_ref());
                    let path = GuestPciPath { root_bus: root_path, hops: vec![devfn] };
                    if let Some(si) = sw_index {
                        let up_sec = next;
                        next += 1;
                        let sw_id = b.switches.get(si).map(|s| s.id.clone());
                        if let Some(s) = b.switches.get_mut(si) {
                            s.bus = sec as u8;
                            s.secondary_bus = up_sec as u8;
                        }
                        let up_path = path.join(DevFn::default());
                        let mut ds: Vec<usize> = (0..b.ports.len())
                            .filter(|j| {
                                b.ports.get(*j).is_some_and(|p| p.switch.is_some() && p.switch == sw_id)
                            })
                            .collect();
                        ds.sort_by_key(|j| b.ports.get(*j).map(|p| DevFn::from(p.bdf)));
                        for j in ds {
                            let dsec = next;
                            let reserve = if kernel { u32::from(b.opts.spare_bus_reserve) } else { 0 };
                            next = dsec + 1 + reserve;
                            if let Some(p) = b.ports.get_mut(j) {
                                let dfn = DevFn::from(p.bdf);
                                p.bdf = dfn.on_bus(0, up_sec as u8);
                                p.path = up_path.join(dfn);
                                p.secondary_bus = clamp_bus(dsec)?;
                                p.subordinate_bus = clamp_bus(dsec + reserve)?;
                            }
                        }
                    }
                    let reserve = b.ports.get(i).map_or(0, |p| {
                        if kernel {
                            u32::from(b.opts.spare_bus_reserve)
                        } else {
                            u32::from(p.reservation.bus_reserve)
                        }
                    });
                    let sub = (next - 1).max(sec + reserve);
                    next = sub + 1;
                    if let Some(p) = b.ports.get_mut(i) {
                        p.bdf = devfn.on_bus(0, root as u8);
                        p.path = path;
                        p.secondary_bus = clamp_bus(sec)?;
                        p.subordinate_bus = clamp_bus(sub)?;
                    }
                }
                Entry::Bridge => {
                    if let Some(br) = bridges.iter_mut().find(|br| DevFn::from(br.bdf) == devfn) {
                        br.secondary_bus = clamp_bus(sec)?;
                        let br_id = br.id.to_string();
                        for p in b
                            .ports
                            .iter_mut()
                            .filter(|p| p.kind == PortKind::BridgeSlot && p.target_bus == br_id)
                        {
                            p.bdf = devfn.on_bus(0, 0);
                            p.path = GuestPciPath { root_bus: None, hops: vec![devfn] };
                            p.secondary_bus = clamp_bus(sec)?;
                            p.subordinate_bus = clamp_bus(sec)?;
                        }
                    }
                }
            }
        }
        hb.last_bus = clamp_bus(next - 1)?;
        if numbering == ExpanderBuses::KataAgent {
            // Each root bus keeps within its 0x20 bus numbers, so that the next expander's
            // root bus number is still free.
            let limit = (root / KATA_EXPANDER_BUS_MIN + 1) * KATA_EXPANDER_BUS_MIN;
            if next > limit {
                return Err(PlanError::BusRange { root, last: next - 1, limit });
            }
        }
    }
    Ok(())
}

fn clamp_bus(bus: u32) -> Result<u8, PlanError> {
    u8::try_from(bus).map_err(|_| PlanError::Buses { needed: bus + 1 })
}

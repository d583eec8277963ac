//! Building a plan from a [`PlanRequest`] for a [`Platform`].
//!
//! Steps: choose root buses (one `pxb-pcie` per NUMA node in NUMA mode), group devices
//! into root ports and switches, hand out ids, slots, chassis/slot pairs and bus numbers
//! from free sets, size every window with the platform's
//! [`WindowRule`](crate::platform::WindowRule), place the devices, then check the whole
//! address space and ask the platform for its extra arguments.

mod buses;
mod windows;
pub(crate) mod zpci;

use std::collections::{BTreeMap, BTreeSet};

use pcilibs::requirement::Requirement;

use crate::alloc::{FreeSet, IdAllocator};
use crate::check::check_address_space;
use crate::error::PlanError;
use crate::foreign::PlacedForeign;
use crate::format::PLAN_VERSION;
use crate::path::GuestPciPath;
use crate::plan::{
    place_on_port, request_ids, AddressReport, HostBridge, Mode, PciBridge, PlacedDevice, Plan, PlanOptions,
    PlanRequest, Port, PortKind, Reservation, Switch,
};
use crate::platform::{Addressing, Platform, PlatformSpec, Totals};
use crate::qemu::{DevFn, QemuDevice, QemuId};
use crate::request::{Attach, DeviceRequest, HotplugProfile};
use crate::reserve::WindowReservation;

/// What one port is for, before it has a name.
#[derive(Debug, Clone)]
struct PortSpec {
    device: Option<usize>,
    profile: Option<HotplugProfile>,
    p2p_group: Option<String>,
}

/// Something on a root bus.
#[derive(Debug, Clone)]
enum Item {
    Port(PortSpec),
    Switch { group: Option<String>, downstream: Vec<PortSpec> },
}

/// The request sorted onto root buses: index 0 is `pcie.0`, then one per NUMA node.
struct Layout {
    nodes: Vec<u32>,
    items: BTreeMap<usize, Vec<Item>>,
    behind_bridge: Vec<usize>,
}

impl Layout {
    fn of(request: &PlanRequest) -> Layout {
        let numa = request.mode == Mode::Numa;
        let switches = matches!(request.mode, Mode::SwitchPort | Mode::Numa);
        let mut nodes: BTreeSet<u32> = BTreeSet::new();
        if numa {
            nodes.extend(request.devices.iter().filter_map(|d| d.numa_node));
            nodes.extend(request.spares.iter().filter_map(|s| s.numa_node));
        }
        let nodes: Vec<u32> = nodes.into_iter().collect();
        let root_of = |node: Option<u32>| {
            node.filter(|_| numa).and_then(|n| nodes.iter().position(|x| *x == n)).map_or(0, |i| i + 1)
        };
        let mut items = Items::default();
        for i in 0..=nodes.len() {
            items.lists.insert(i, Vec::new());
        }
        let mut behind_bridge = Vec::new();
        for (i, d) in request.devices.iter().enumerate() {
            if request.options.behind_bridge(d) {
                behind_bridge.push(i);
                continue;
            }
            let spec = PortSpec { device: Some(i), profile: None, p2p_group: d.p2p_group.clone() };
            items.push(root_of(d.numa_node), spec, switches && d.p2p_group.is_some());
        }
        for s in &request.spares {
            // `check_capacity` bounded the counts: this loop runs at most 255 times in all.
            for _ in 0..s.count {
                let spec = PortSpec {
                    device: None,
                    profile: Some(s.profile.clone()),
                    p2p_group: s.p2p_group.clone(),
                };
                items.push(root_of(s.numa_node), spec, switches && s.p2p_group.is_some());
            }
        }
        Layout { nodes, items: items.lists, behind_bridge }
    }
}

/// Plans `request` for `platform`.
pub fn plan(platform: &dyn Platform, request: &PlanRequest) -> Result<Plan, PlanError> {
    let spec = platform.spec();
    if let Addressing::Zpci { first_devno } = spec.addressing {
        return zpci::plan(spec, request, first_devno);
    }
    check_capacity(request)?;
    check_request(&spec, request)?;
    // The VMM's own ids are taken too: QEMU refuses a second device of the same id.
    let mut taken: BTreeSet<String> =
        request.foreign.devices.iter().map(|f| f.id.clone()).filter(|id| !id.is_empty()).collect();
    for d in &request.devices {
        for id in request_ids(d) {
            if !taken.insert(id.clone()) {
                return Err(PlanError::DuplicateId(id));
            }
        }
    }
    let layout = Layout::of(request);
    let mut b = Builder::new(spec, request, taken)?;
    let mut host_bridges = Vec::new();
    for (index, items) in &layout.items {
        let node = index.checked_sub(1).and_then(|i| layout.nodes.get(i)).copied();
        host_bridges.push(b.add_root_bus(*index, node, items)?);
    }
    let mut bridges = b.add_pci_bridge(&layout.behind_bridge)?;
    b.size_windows()?;
    b.size_bridges(&mut bridges)?;
    buses::number_buses(&mut b, &mut host_bridges, &mut bridges)?;
    let (ports, devices) = b.place_devices()?;
    let foreign = std::mem::take(&mut b.foreign);
    let mut plan = Plan {
        version: PLAN_VERSION,
        platform: b.spec.clone(),
        mode: request.mode,
        options: b.opts.clone(),
        host_bridges,
        switches: b.switches.clone(),
        bridges,
        ports,
        devices,
        address: AddressReport::default(),
        extra: Default::default(),
        foreign,
        memory_hotplug: request.foreign.memory_hotplug,
    };
    let (report, totals) = check_address_space(&plan, &b.hotplug_totals)?;
    plan.address = report;
    plan.extra = platform.extra_args(&totals);
    Ok(plan)
}

/// Bus numbers of one PCI segment: every root bus and every port takes one.
const SEGMENT_BUSES: u64 = 256;

/// Refuses a request for more ports than a PCI segment has bus numbers, before anything
/// is built or allocated: every root port and downstream port (one per device on a port,
/// one per spare) takes a bus number of its own, and bus 0 is the root bus. Root buses of
/// expanders, switch buses and reserved buses only add to that, so this is a lower bound
/// and never refuses a plan that fits. (Spares used to be expanded one entry each first:
/// `count = u32::MAX` aborted on allocation.)
fn check_capacity(request: &PlanRequest) -> Result<(), PlanError> {
    let on_ports = request.devices.iter().filter(|d| !request.options.behind_bridge(d)).count();
    // Saturating: any sum that saturates is far above the 256 it is compared with.
    let spares = request.spares.iter().fold(0u64, |n, s| n.saturating_add(u64::from(s.count)));
    let foreign = request.foreign.devices.iter().map(|f| u64::from(f.buses)).sum::<u64>();
    let needed = u64::try_from(on_ports)
        .unwrap_or(u64::MAX)
        .saturating_add(spares)
        .saturating_add(foreign)
        .saturating_add(1);
    if needed > SEGMENT_BUSES {
        return Err(PlanError::Buses { needed: u32::try_from(needed).unwrap_or(u32::MAX) });
    }
    Ok(())
}

/// Checks what the platform cannot do before anything is built.
fn check_request(spec: &PlatformSpec, request: &PlanRequest) -> Result<(), PlanError> {
    let unsupported =
        |what: &str| PlanError::Unsupported { platform: spec.name.clone(), what: what.to_string() };
    if spec.root_port.is_none() {
        return Err(unsupported("PCIe root ports"));
    }
    for d in &request.devices {
        d.validate()?;
        check_attach(spec, d)?;
    }
    let switches = matches!(request.mode, Mode::SwitchPort | Mode::Numa)
        && (request.devices.iter().any(|d| d.p2p_group.is_some())
            || request.spares.iter().any(|s| s.p2p_group.is_some()));
    if switches && (spec.switch_upstream.is_none() || spec.switch_downstream.is_none()) {
        return Err(unsupported("PCIe switches"));
    }
    if request.mode == Mode::Numa && spec.expander.is_none() {
        return Err(unsupported("pxb-pcie expanders (NUMA mode)"));
    }
    if request.devices.iter().any(|d| request.options.behind_bridge(d)) && spec.pci_bridge.is_none() {
        return Err(unsupported("PCIe-to-PCI bridges for devices that need a conventional bus"));
    }
    Ok(())
}

/// Refuses a device that goes on a bus a PCIe-port platform does not have.
pub(crate) fn check_attach(spec: &PlatformSpec, device: &DeviceRequest) -> Result<(), PlanError> {
    let what = match device.attach {
        Attach::Channel { .. } => "channel (CCW) devices",
        Attach::Ap => "vfio-ap devices",
        _ => return Ok(()),
    };
    Err(PlanError::Unsupported { platform: spec.name.clone(), what: what.to_string() })
}

/// Items per root bus, with the switch of each peer-to-peer group found by a map lookup
/// (a scan of the list per device was quadratic in the number of groups).
#[derive(Default)]
struct Items {
    lists: BTreeMap<usize, Vec<Item>>,
    /// (root bus, group) → index of the group's switch in that root bus's list.
    switch_of: BTreeMap<(usize, Option<String>), usize>,
}

impl Items {
    fn push(&mut self, root: usize, spec: PortSpec, behind_switch: bool) {
        let list = self.lists.entry(root).or_default();
        if !behind_switch {
            list.push(Item::Port(spec));
            return;
        }
        let key = (root, spec.p2p_group.clone());
        if let Some(Item::Switch { downstream, .. }) = self.switch_of.get(&key).and_then(|i| list.get_mut(*i))
        {
            downstream.push(spec);
            return;
        }
        self.switch_of.insert(key, list.len());
        list.push(Item::Switch { group: spec.p2p_group.clone(), downstream: vec![spec] });
    }
}

/// Root ports grouped per slot: one each, or up to 8 as functions when packing.
fn group_root_ports(items: &[Item], pack: bool) -> Vec<Vec<&Item>> {
    let per_slot = if pack { 8 } else { 1 };
    items.chunks(per_slot).map(|c| c.iter().collect()).collect()
}

#[derive(Default)]
struct Ids {
    allocators: BTreeMap<String, IdAllocator>,
}

impl Ids {
    fn alloc(&mut self, prefix: &str, taken: &BTreeSet<String>) -> Result<String, PlanError> {
        let a = self.allocators.entry(prefix.to_string()).or_insert_with(|| IdAllocator::new(prefix));
        Ok(a.alloc(|id| taken.contains(id))?)
    }
}

/// Plan state while it is built.
struct Builder<'a> {
    spec: PlatformSpec,
    opts: PlanOptions,
    request: &'a PlanRequest,
    /// Ids the request's devices use.
    taken: BTreeSet<String>,
    ids: Ids,
    chassis: FreeSet,
    root_slots: FreeSet,
    ports: Vec<Port>,
    switches: Vec<Switch>,
    /// Port indices per root bus, in the order they were made.
    per_root: Vec<Vec<usize>>,
    /// Port index -> device index of the request.
    device_of: BTreeMap<usize, usize>,
    /// Kernel-rule sizes every hotplug bridge gets.
    hotplug_totals: Totals,
    /// The VMM's own devices on the root bus, with their slots (bus numbers follow).
    foreign: Vec<PlacedForeign>,
}

impl<'a> Builder<'a> {
    fn new(spec: PlatformSpec, request: &'a PlanRequest, taken: BTreeSet<String>) -> Result<Self, PlanError> {
        let opts = request.options.clone();
        let mut root_slots = FreeSet::new("root bus slot", u32::from(opts.first_root_slot), 31);
        for s in &spec.reserved_root_slots {
            // A reserved slot below `first_root_slot` is outside the set already.
            let _ = root_slots.take(u32::from(*s));
        }
        // The VMM's devices take their slots first: pinned ones where pinned, the others
        // where QEMU will put them (the lowest slots left).
        let slots = request.foreign.root_slots(&spec.reserved_root_slots)?;
        let mut foreign = Vec::with_capacity(slots.len());
        for (device, addr) in request.foreign.devices.iter().zip(slots) {
            // Below `first_root_slot`, or a second function of a taken slot: not ours anyway.
            let _ = root_slots.take(u32::from(addr.slot()));
            foreign.push(PlacedForeign {
                device: device.clone(),
                addr,
                secondary_bus: None,
                subordinate_bus: None,
            });
        }
        Ok(Builder {
            spec,
            opts,
            request,
            taken,
            ids: Ids::default(),
            chassis: FreeSet::new("chassis", 1, 255),
            root_slots,
            ports: Vec::new(),
            switches: Vec::new(),
            per_root: Vec::new(),
            device_of: BTreeMap::new(),
            hotplug_totals: Totals::default(),
            foreign,
        })
    }

    fn id(&mut self, prefix: &str) -> Result<QemuId, PlanError> {
        let id = self.ids.alloc(prefix, &self.taken)?;
        Ok(QemuId::new(id)?)
    }

    /// Root ports (and switches behind them) of one root bus, and the expander device for
    /// root buses other than `pcie.0`.
    fn add_root_bus(
        &mut self,
        index: usize,
        node: Option<u32>,
        items: &[Item],
    ) -> Result<HostBridge, PlanError> {
        let hb_id = if index == 0 { self.spec.root_bus.clone() } else { self.id("pxb")?.to_string() };
        let mut expander_slots = FreeSet::new("expander bus slot", 0, 31);
        let chassis_nr = self.chassis.alloc()?;
        let mut chassis_slots = FreeSet::new("chassis slot", 1, 255);
        let mut port_indices = Vec::new();
        for group in group_root_ports(items, self.opts.pack_root_ports) {
            let slot = if index == 0 { self.root_slots.alloc()? } else { expander_slots.alloc()? };
            let multi = group.len() > 1;
            for (function, item) in group.iter().enumerate() {
                let devfn = DevFn::new(slot as u8, function as u8)?;
                let rp_id = self.id("rp")?;
                let mut dev = QemuDevice::new(self.spec.root_port.clone().unwrap_or_default(), rp_id.clone());
                dev.bus = Some(hb_id.clone());
                dev.addr = Some(devfn);
                dev.multifunction = multi && function == 0;
                dev = dev
                    .prop("chassis", u64::from(chassis_nr))
                    .prop("slot", u64::from(chassis_slots.alloc()?));
                let spec = match item {
                    Item::Port(p) => p.clone(),
                    Item::Switch { group, .. } => {
                        PortSpec { device: None, profile: None, p2p_group: group.clone() }
                    }
                };
                port_indices.push(self.new_port(
                    rp_id.as_str(),
                    PortKind::Root,
                    Some(dev),
                    &hb_id,
                    node,
                    &spec,
                    devfn,
                )?);
                if let Item::Switch { group, downstream } = item {
                    let ds = self.add_switch(&rp_id, &hb_id, node, group, downstream)?;
                    port_indices.extend(ds);
                }
            }
        }
        let device = if index == 0 {
            None
        } else {
            let slot = self.root_slots.alloc()?;
            let mut d =
                QemuDevice::new(self.spec.expander.clone().unwrap_or_default(), QemuId::new(hb_id.clone())?);
            d.bus = Some(self.spec.root_bus.clone());
            d.addr = Some(DevFn::new(slot as u8, 0)?);
            if let Some(n) = node {
                d = d.prop("numa_node", u64::from(n));
            }
            Some(d)
        };
        self.per_root.push(port_indices);
        Ok(HostBridge { id: hb_id, bus_nr: 0, last_bus: 0, numa_node: node, device })
    }

    /// A switch below root port `rp_id`: upstream port and one downstream port per spec.
    fn add_switch(
        &mut self,
        rp_id: &QemuId,
        hb_id: &str,
        node: Option<u32>,
        group: &Option<String>,
        downstream: &[PortSpec],
    ) -> Result<Vec<usize>, PlanError> {
        let sw_id = self.id("sw")?;
        let mut up = QemuDevice::new(self.spec.switch_upstream.clone().unwrap_or_default(), sw_id.clone());
        up.bus = Some(rp_id.to_string());
        up.addr = Some(DevFn::new(0, 0)?);
        self.switches.push(Switch {
            id: sw_id.clone(),
            upstream: up,
            root_port: rp_id.clone(),
            bus: 0,
            secondary_bus: 0,
            p2p_group: group.clone(),
        });
        let sw_chassis = self.chassis.alloc()?;
        let mut indices = Vec::new();
        for (k, ds) in downstream.iter().enumerate() {
            // A switch has 32 slots on its internal bus, one downstream port each.
            let dfn = DevFn::new(u8::try_from(k).unwrap_or(u8::MAX), 0)?;
            let dp_id = self.id("dp")?;
            let mut dd =
                QemuDevice::new(self.spec.switch_downstream.clone().unwrap_or_default(), dp_id.clone());
            dd.bus = Some(sw_id.to_string());
            dd.addr = Some(dfn);
            dd = dd.prop("chassis", u64::from(sw_chassis)).prop("slot", (k as u64) + 1);
            let spec = PortSpec { p2p_group: group.clone(), ..ds.clone() };
            let i = self.new_port(dp_id.as_str(), PortKind::Downstream, Some(dd), hb_id, node, &spec, dfn)?;
            if let Some(p) = self.ports.get_mut(i) {
                p.switch = Some(sw_id.clone());
            }
            indices.push(i);
        }
        Ok(indices)
    }

    /// Devices that need a conventional bus go behind one PCIe-to-PCI bridge on `pcie.0`.
    fn add_pci_bridge(&mut self, devices: &[usize]) -> Result<Vec<PciBridge>, PlanError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let br_id = self.id("pcibr")?;
        let devfn = DevFn::new(self.root_slots.alloc()? as u8, 0)?;
        let mut dev = QemuDevice::new(self.spec.pci_bridge.clone().unwrap_or_default(), br_id.clone());
        dev.bus = Some(self.spec.root_bus.clone());
        dev.addr = Some(devfn);
        let bridge = PciBridge {
            id: br_id.clone(),
            device: dev,
            bdf: devfn.on_bus(0, 0),
            secondary_bus: 0,
            mem: WindowReservation::default(),
            pref: WindowReservation::default(),
            io: WindowReservation::default(),
        };
        let mut slots = FreeSet::new("PCI bridge slot", 1, 31);
        let root = self.spec.root_bus.clone();
        for &i in devices {
            let s = slots.alloc()? as u8;
            let spec = PortSpec { device: Some(i), profile: None, p2p_group: None };
            let idx = self.new_port(
                &format!("{br_id}-s{s}"),
                PortKind::BridgeSlot,
                None,
                &root,
                None,
                &spec,
                devfn,
            )?;
            if let Some(p) = self.ports.get_mut(idx) {
                p.target_bus = br_id.to_string();
                p.target_slot = s;
            }
            if let Some(first) = self.per_root.first_mut() {
                first.push(idx);
            }
        }
        Ok(vec![bridge])
    }

    #[allow(clippy::too_many_arguments)]
    fn new_port(
        &mut self,
        id: &str,
        kind: PortKind,
        device: Option<QemuDevice>,
        hb: &str,
        numa_node: Option<u32>,
        spec: &PortSpec,
        devfn: DevFn,
    ) -> Result<usize, PlanError> {
        let purpose = match (spec.device, &spec.profile) {
            (Some(i), _) => {
                let d = self.request.devices.get(i).map(|d| d.id.to_string()).unwrap_or_default();
                format!("device {d}")
            }
            (None, Some(p)) => format!("spare for {} ({})", p.name, p.describe()),
            (None, None) => "switch".to_string(),
        };
        let target_bus = device.as_ref().map(|d| d.id.to_string()).unwrap_or_default();
        self.ports.push(Port {
            id: QemuId::new(id.replace('.', "-"))?,
            kind,
            device,
            target_bus,
            target_slot: 0,
            host_bridge: hb.to_string(),
            switch: None,
            bdf: devfn.on_bus(0, 0),
            path: GuestPciPath { root_bus: None, hops: vec![devfn] },
            secondary_bus: 0,
            subordinate_bus: 0,
            reservation: Reservation {
                purpose,
                need: Requirement::default(),
                mem: WindowReservation::default(),
                pref: WindowReservation::default(),
                io: WindowReservation::default(),
                bus_reserve: 0,
                why: Vec::new(),
            },
            profile: spec.profile.clone(),
            placeholder: None,
            occupant: None,
            numa_node,
            p2p_group: spec.p2p_group.clone(),
        });
        let index = self.ports.len() - 1;
        if let Some(d) = spec.device {
            self.device_of.insert(index, d);
        }
        Ok(index)
    }

    /// Puts each device on its port; returns the ports in guest enumeration order.
    fn place_devices(&mut self) -> Result<(Vec<Port>, Vec<PlacedDevice>), PlanError> {
        let mut order: Vec<usize> = (0..self.ports.len()).collect();
        order.sort_by_key(|i| self.ports.get(*i).map(|p| (p.bdf, p.target_slot)));
        let mut devices = Vec::new();
        for i in &order {
            let (Some(port), Some(d)) =
                (self.ports.get(*i), self.device_of.get(i).and_then(|d| self.request.devices.get(*d)))
            else {
                continue;
            };
            let placed = place_on_port(port, d, d.requirement()?)?;
            let id = placed.id.clone();
            devices.push(placed);
            if let Some(p) = self.ports.get_mut(*i) {
                p.occupant = Some(id);
            }
        }
        Ok((order.iter().filter_map(|i| self.ports.get(*i).cloned()).collect(), devices))
    }
}

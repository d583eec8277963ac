//! Building a plan from a [`PlanRequest`] for a [`Platform`].
//!
//! Steps: choose root buses (one `pxb-pcie` per NUMA node in NUMA mode), group devices
//! into root ports and switches, hand out ids, slots, chassis/slot pairs and bus numbers
//! from free sets, size every window with the platform's [`WindowRule`], place the devices,
//! then check the whole address space and ask the platform for its extra arguments.

use std::collections::{BTreeMap, BTreeSet};

use pcilibs::requirement::IO_GRANULARITY;
use pcilibs::requirement::{Requirement, WindowRequirement, MEM_GRANULARITY};

use crate::alloc::{FreeSet, IdAllocator};
use crate::error::{AddressSpaceError, PlanError};
use crate::path::{GuestBdf, GuestPciPath};
use crate::plan::{
    describe_requirement, place_on_port, request_ids, AddressReport, HostBridge, Mode, PciBridge,
    Placeholder, Plan, PlanRequest, Port, PortKind, Reservation, Switch, PLAN_VERSION,
};
use crate::platform::{BusNumbering, Mmio64Aperture, Platform, PlatformSpec, Totals, WindowRule};
use crate::qemu::{DevFn, PropValue, QemuDevice, QemuId, QemuObject};
use crate::request::HotplugProfile;
use crate::reserve::{size_window, Window};
use crate::units::{bits_for_end, human_size, next_pow2, GIB, MIB};

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

/// Plans `request` for `platform`.
pub fn plan(platform: &dyn Platform, request: &PlanRequest) -> Result<Plan, PlanError> {
    let spec = platform.spec();
    let opts = request.options.clone();
    check_request(&spec, request)?;

    let mut taken: BTreeSet<String> = BTreeSet::new();
    for d in &request.devices {
        for id in request_ids(d) {
            if !taken.insert(id.clone()) {
                return Err(PlanError::DuplicateId(id));
            }
        }
    }
    let mut ids = Ids::default();

    // Root buses: pcie.0, plus one expander per NUMA node in NUMA mode.
    let numa = request.mode == Mode::Numa;
    let switches = matches!(request.mode, Mode::SwitchPort | Mode::Numa);
    let mut nodes: BTreeSet<u32> = BTreeSet::new();
    if numa {
        nodes.extend(request.devices.iter().filter_map(|d| d.numa_node));
        nodes.extend(request.spares.iter().filter_map(|s| s.numa_node));
    }
    let node_index: BTreeMap<u32, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i + 1)).collect();
    let mut items: Vec<Vec<Item>> = vec![Vec::new(); nodes.len() + 1];
    let mut conventional: Vec<usize> = Vec::new();

    let hb_of = |node: Option<u32>| node.and_then(|n| node_index.get(&n).copied()).unwrap_or(0);
    for (i, d) in request.devices.iter().enumerate() {
        if !d.is_pcie() {
            conventional.push(i);
            continue;
        }
        let spec_ = PortSpec { device: Some(i), profile: None, p2p_group: d.p2p_group.clone() };
        let list = items
            .get_mut(hb_of(if numa { d.numa_node } else { None }))
            .ok_or(PlanError::Buses { needed: 0 })?;
        push_item(list, spec_, switches && d.p2p_group.is_some());
    }
    for s in &request.spares {
        let list = items
            .get_mut(hb_of(if numa { s.numa_node } else { None }))
            .ok_or(PlanError::Buses { needed: 0 })?;
        for _ in 0..s.count {
            let spec_ =
                PortSpec { device: None, profile: Some(s.profile.clone()), p2p_group: s.p2p_group.clone() };
            push_item(list, spec_, switches && s.p2p_group.is_some());
        }
    }

    let mut b = Builder {
        spec: spec.clone(),
        opts: opts.clone(),
        request,
        ports: Vec::new(),
        switches: Vec::new(),
        device_of: BTreeMap::new(),
        hotplug_totals: Totals::default(),
    };
    let mut chassis = FreeSet::new("chassis", 1, 255);
    let mut host_bridges = Vec::new();
    let mut root_slots = FreeSet::new("root bus slot", u32::from(opts.first_root_slot), 31);
    for s in &spec.reserved_root_slots {
        let _ = root_slots.take(u32::from(*s));
    }

    // Ports per root bus (bus numbers are filled in by `number_buses`).
    let mut per_hb_ports: Vec<Vec<usize>> = Vec::new();
    for (hb_index, list) in items.iter().enumerate() {
        let (hb_id, numa_node) = if hb_index == 0 {
            (spec.root_bus.clone(), None)
        } else {
            let id = ids.alloc("pxb", &taken)?;
            (id, nodes.iter().nth(hb_index - 1).copied())
        };
        let mut expander_slots = FreeSet::new("expander bus slot", 0, 31);
        let slots = if hb_index == 0 { &mut root_slots } else { &mut expander_slots };
        let chassis_nr = chassis.alloc()?;
        let mut chassis_slots = FreeSet::new("chassis slot", 1, 255);
        let mut port_indices = Vec::new();
        let groups = group_root_ports(list, opts.pack_root_ports);
        for group in groups {
            let slot = slots.alloc()?;
            let multi = group.len() > 1;
            for (function, item) in group.iter().enumerate() {
                let devfn = DevFn::new(slot as u8, function as u8)?;
                let rp_id = ids.alloc("rp", &taken)?;
                let mut dev =
                    QemuDevice::new(spec.root_port.clone().unwrap_or_default(), QemuId::new(rp_id.clone())?);
                dev.bus = Some(hb_id.clone());
                dev.addr = Some(devfn);
                dev.multifunction = multi && function == 0;
                dev = dev
                    .prop("chassis", u64::from(chassis_nr))
                    .prop("slot", u64::from(chassis_slots.alloc()?));
                let (spec_, switch) = match item {
                    Item::Port(p) => (p.clone(), None),
                    Item::Switch { group, downstream } => (
                        PortSpec { device: None, profile: None, p2p_group: group.clone() },
                        Some((group.clone(), downstream.clone())),
                    ),
                };
                let port_index =
                    b.new_port(&rp_id, PortKind::Root, Some(dev), &hb_id, numa_node, &spec_, devfn)?;
                port_indices.push(port_index);
                if let Some((group, downstream)) = switch {
                    let sw_id = ids.alloc("sw", &taken)?;
                    let mut up = QemuDevice::new(
                        spec.switch_upstream.clone().unwrap_or_default(),
                        QemuId::new(sw_id.clone())?,
                    );
                    up.bus = Some(rp_id.clone());
                    up.addr = Some(DevFn::new(0, 0)?);
                    b.switches.push(Switch {
                        id: QemuId::new(sw_id.clone())?,
                        upstream: up,
                        root_port: QemuId::new(rp_id.clone())?,
                        bus: 0,
                        secondary_bus: 0,
                        p2p_group: group.clone(),
                    });
                    let sw_chassis = chassis.alloc()?;
                    for (k, ds) in downstream.iter().enumerate() {
                        let dp_id = ids.alloc("dp", &taken)?;
                        let dfn =
                            DevFn::new(u8::try_from(k).map_err(|_| PlanError::Buses { needed: 0 })?, 0)?;
                        let mut dd = QemuDevice::new(
                            spec.switch_downstream.clone().unwrap_or_default(),
                            QemuId::new(dp_id.clone())?,
                        );
                        dd.bus = Some(sw_id.clone());
                        dd.addr = Some(dfn);
                        dd = dd.prop("chassis", u64::from(sw_chassis)).prop("slot", (k as u64) + 1);
                        let mut ds = ds.clone();
                        ds.p2p_group = group.clone();
                        let i =
                            b.new_port(&dp_id, PortKind::Downstream, Some(dd), &hb_id, numa_node, &ds, dfn)?;
                        if let Some(p) = b.ports.get_mut(i) {
                            p.switch = Some(QemuId::new(sw_id.clone())?);
                        }
                        port_indices.push(i);
                    }
                }
            }
        }
        let device = if hb_index == 0 {
            None
        } else {
            let slot = root_slots.alloc()?;
            let mut d =
                QemuDevice::new(spec.expander.clone().unwrap_or_default(), QemuId::new(hb_id.clone())?);
            d.bus = Some(spec.root_bus.clone());
            d.addr = Some(DevFn::new(slot as u8, 0)?);
            if let Some(n) = numa_node {
                d = d.prop("numa_node", u64::from(n));
            }
            Some(d)
        };
        host_bridges.push(HostBridge { id: hb_id, bus_nr: 0, last_bus: 0, numa_node, device });
        per_hb_ports.push(port_indices);
    }

    // Conventional PCI devices go behind one PCIe-to-PCI bridge on pcie.0.
    let mut bridges = Vec::new();
    if !conventional.is_empty() {
        let br_id = ids.alloc("pcibr", &taken)?;
        let slot = root_slots.alloc()?;
        let devfn = DevFn::new(slot as u8, 0)?;
        let mut dev =
            QemuDevice::new(spec.pci_bridge.clone().unwrap_or_default(), QemuId::new(br_id.clone())?);
        dev.bus = Some(spec.root_bus.clone());
        dev.addr = Some(devfn);
        bridges.push(PciBridge {
            id: QemuId::new(br_id.clone())?,
            device: dev,
            bdf: GuestBdf { segment: 0, bus: 0, devfn },
            secondary_bus: 0,
        });
        let mut bslots = FreeSet::new("PCI bridge slot", 1, 31);
        for i in conventional {
            let s = bslots.alloc()? as u8;
            let spec_ = PortSpec { device: Some(i), profile: None, p2p_group: None };
            let idx = b.new_port(
                &format!("{br_id}.s{s}"),
                PortKind::BridgeSlot,
                None,
                &spec.root_bus,
                None,
                &spec_,
                devfn,
            )?;
            if let Some(p) = b.ports.get_mut(idx) {
                p.target_bus = br_id.clone();
                p.target_slot = s;
            }
            if let Some(first) = per_hb_ports.first_mut() {
                first.push(idx);
            }
        }
    }

    b.size_windows(&mut ids, &taken)?;
    number_buses(&mut b, &mut host_bridges, &mut bridges, &per_hb_ports)?;

    // Devices onto their ports.
    let mut devices = Vec::new();
    let mut order: Vec<usize> = (0..b.ports.len()).collect();
    order.sort_by_key(|i| b.ports.get(*i).map(|p| (p.bdf, p.target_slot)));
    for i in &order {
        let Some(port) = b.ports.get(*i) else { continue };
        let Some(di) = b.device_of.get(i).copied() else { continue };
        let Some(d) = request.devices.get(di) else { continue };
        let placed = place_on_port(port, d, d.requirement()?)?;
        devices.push((placed, *i));
    }
    for (placed, i) in &devices {
        if let Some(p) = b.ports.get_mut(*i) {
            p.occupant = Some(placed.id.clone());
        }
    }
    let devices = devices.into_iter().map(|(d, _)| d).collect();
    let ports: Vec<Port> = order.iter().filter_map(|i| b.ports.get(*i).cloned()).collect();

    let mut plan = Plan {
        version: PLAN_VERSION,
        platform: spec.clone(),
        mode: request.mode,
        options: opts,
        host_bridges,
        switches: b.switches.clone(),
        bridges,
        ports,
        devices,
        address: AddressReport::default(),
        extra: Default::default(),
    };
    let (report, totals) = check_address_space(&plan, &b.hotplug_totals)?;
    plan.address = report;
    plan.extra = platform.extra_args(&totals);
    Ok(plan)
}

/// Checks what the platform cannot do before anything is built.
fn check_request(spec: &PlatformSpec, request: &PlanRequest) -> Result<(), PlanError> {
    let unsupported =
        |what: &str| PlanError::Unsupported { platform: spec.name.clone(), what: what.to_string() };
    if spec.root_port.is_none() {
        return Err(unsupported("PCIe root ports (use the platform's own planner)"));
    }
    for d in &request.devices {
        d.validate()?;
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
    if request.devices.iter().any(|d| !d.is_pcie()) && spec.pci_bridge.is_none() {
        return Err(unsupported("PCIe-to-PCI bridges for conventional devices"));
    }
    Ok(())
}

fn push_item(list: &mut Vec<Item>, spec: PortSpec, behind_switch: bool) {
    if behind_switch {
        for item in list.iter_mut() {
            if let Item::Switch { group, downstream } = item {
                if *group == spec.p2p_group {
                    downstream.push(spec);
                    return;
                }
            }
        }
        list.push(Item::Switch { group: spec.p2p_group.clone(), downstream: vec![spec] });
    } else {
        list.push(Item::Port(spec));
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

struct Builder<'a> {
    spec: PlatformSpec,
    opts: crate::plan::PlanOptions,
    request: &'a PlanRequest,
    ports: Vec<Port>,
    switches: Vec<Switch>,
    /// Port index -> device index of the request.
    device_of: BTreeMap<usize, usize>,
    /// Kernel-rule sizes every hotplug bridge gets.
    hotplug_totals: Totals,
}

impl Builder<'_> {
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
            bdf: GuestBdf { segment: 0, bus: 0, devfn },
            path: GuestPciPath { root_bus: None, hops: vec![devfn] },
            secondary_bus: 0,
            subordinate_bus: 0,
            reservation: Reservation {
                purpose,
                need: Requirement::default(),
                mem: Window::default(),
                pref: Window::default(),
                io: Window::default(),
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
}

impl Builder<'_> {
    fn is_switch_port(&self, port: &Port) -> bool {
        self.switches.iter().any(|s| s.root_port == port.id)
    }

    /// Sizes every window: downstream ports and plain root ports first, then the root
    /// ports above switches from their downstream ports, then the kernel rule's uniform
    /// sizes.
    fn size_windows(&mut self, ids: &mut Ids, taken: &BTreeSet<String>) -> Result<(), PlanError> {
        let rule = self.spec.window_rule;
        let sizing = self.opts.size_reservations;
        // Pass 1: ports that hold a device or a profile.
        for i in 0..self.ports.len() {
            let Some(port) = self.ports.get(i) else { continue };
            if self.is_switch_port(port) {
                continue;
            }
            let (need, cold) = match (self.device_of.get(&i), &port.profile) {
                (Some(d), _) => {
                    let d = self
                        .request
                        .devices
                        .get(*d)
                        .ok_or_else(|| PlanError::UnknownDevice(d.to_string()))?;
                    (d.requirement()?, d.cold_plug)
                }
                (None, Some(p)) => (p.requirement()?, false),
                (None, None) => (Requirement::default(), false),
            };
            let kind = port.kind;
            let port_id = port.id.to_string();
            let can_reserve = kind == PortKind::Root || self.spec.downstream_reserve;
            let kernel = matches!(rule, WindowRule::KernelHotplugSize { .. });
            let placeholder = kind == PortKind::Downstream
                && !cold
                && !can_reserve
                && !kernel
                && sizing
                && self.opts.switch_placeholders
                && !(need.pref.is_empty() && need.mem.size <= MEM_GRANULARITY);
            let present = cold || placeholder || kind == PortKind::BridgeSlot;
            let mut res =
                self.reservation_for(&need, present, sizing && (can_reserve || kernel || placeholder));
            if placeholder {
                let ph = self.placeholder_for(ids, taken, &port_id, &need)?;
                let ph_need = placeholder_requirement(&ph);
                res = self.reservation_for(&ph_need, true, true);
                res.need = need;
                if !res.holds(&need) {
                    let hint = if self.spec.mem32_placeholder.is_none() && !res.mem.holds(&need.mem) {
                        "; this platform has no device whose 32-bit BAR can stand in for the profile's"
                    } else {
                        ""
                    };
                    return Err(PlanError::DownstreamWindow {
                        port: port_id,
                        need: format!(
                            "{} with placeholder windows {}{hint}",
                            describe_requirement(&need),
                            describe_requirement(&ph_need)
                        ),
                    });
                }
                res.why.push(format!(
                    "the switch downstream port has no *-reserve properties: a boot-time placeholder ({}) makes firmware size the windows, and is removed before the first hotplug",
                    describe_requirement(&ph_need)
                ));
                if let Some(p) = self.ports.get_mut(i) {
                    p.placeholder = Some(ph);
                }
            } else if kind == PortKind::Downstream && !cold && !can_reserve && !kernel && sizing {
                let min = Window { size: MEM_GRANULARITY, align: MEM_GRANULARITY };
                if !(min.holds(&need.mem) && min.holds(&need.pref)) {
                    return Err(PlanError::DownstreamWindow {
                        port: port_id,
                        need: describe_requirement(&need),
                    });
                }
            }
            if let Some(p) = self.ports.get_mut(i) {
                p.reservation.need = need;
                p.reservation.mem = res.mem;
                p.reservation.pref = res.pref;
                p.reservation.io = res.io;
                p.reservation.why = res.why;
                if kind == PortKind::Root && p.profile.is_some() && p.occupant.is_none() {
                    p.reservation.bus_reserve = self.opts.spare_bus_reserve;
                }
            }
        }
        if let WindowRule::KernelHotplugSize { .. } = rule {
            self.apply_kernel_sizes();
        }
        // Pass 2: root ports above switches cover their downstream ports.
        let switches = self.switches.clone();
        for sw in &switches {
            let mut need = Requirement::default();
            for p in self.ports.iter().filter(|p| p.switch.as_ref() == Some(&sw.id)) {
                let r = &p.reservation;
                let windows = Requirement {
                    mem: r.mem.as_requirement(),
                    pref: r.pref.as_requirement(),
                    io: r.io.as_requirement(),
                };
                need = need.combine(&windows).map_err(|_| AddressSpaceError::Overflow)?;
            }
            let mut res = self.reservation_for(&need, true, sizing);
            res.why.insert(0, format!("covers the windows of switch {}'s downstream ports", sw.id));
            if let Some(p) = self.ports.iter_mut().find(|p| p.id == sw.root_port) {
                p.reservation.purpose = format!("switch {}", sw.id);
                p.reservation.need = need;
                p.reservation.mem = res.mem;
                p.reservation.pref = res.pref;
                p.reservation.io = res.io;
                p.reservation.why = res.why;
            }
        }
        if let WindowRule::KernelHotplugSize { .. } = rule {
            // A root port above a switch is a hotplug bridge too: the kernel adds its share.
            let (hp_mem, hp_pref) = (self.hotplug_totals.hotplug_mem, self.hotplug_totals.hotplug_pref);
            for sw in &switches {
                if let Some(p) = self.ports.iter_mut().find(|p| p.id == sw.root_port) {
                    p.reservation.mem.size = p.reservation.mem.size.saturating_add(hp_mem);
                    p.reservation.pref.size = p.reservation.pref.size.saturating_add(hp_pref);
                }
            }
        }
        self.write_reserve_props();
        Ok(())
    }

    /// Windows for `need` under the platform's rule (or the machine default without sizing).
    fn reservation_for(&self, need: &Requirement, present: bool, sizing: bool) -> Reservation {
        let rule = self.spec.window_rule;
        if !sizing && !present {
            let min = self.min_window();
            return Reservation {
                purpose: String::new(),
                need: *need,
                mem: min,
                pref: min,
                io: Window::default(),
                bus_reserve: 0,
                why: vec![format!(
                    "no reservation: the firmware gives an empty port its default minimum windows ({})",
                    human_size(min.size)
                )],
            };
        }
        let mem = size_window(rule, &need.mem, MEM_GRANULARITY, present);
        let pref = size_window(rule, &need.pref, MEM_GRANULARITY, present);
        let io = size_window(rule, &need.io, IO_GRANULARITY, present);
        let mut why = Vec::new();
        why.push(format!("32-bit window {}: {}", human_size(mem.window.size), mem.why));
        why.push(format!("64-bit prefetchable window {}: {}", human_size(pref.window.size), pref.why));
        if need.io.is_empty() {
            why.push("no I/O window: nothing needs I/O ports, and only about 16 ports can have one".into());
        } else {
            why.push(format!("I/O window {:#x}: {}", io.window.size, io.why));
        }
        Reservation {
            purpose: String::new(),
            need: *need,
            mem: mem.window,
            pref: pref.window,
            io: if need.io.is_empty() { Window::default() } else { io.window },
            bus_reserve: 0,
            why,
        }
    }

    /// The windows firmware gives an empty hotplug port by default.
    fn min_window(&self) -> Window {
        let size = match self.spec.window_rule {
            WindowRule::ReserveUnaligned { start_align } | WindowRule::KernelHotplugSize { start_align } => {
                start_align.max(MEM_GRANULARITY)
            }
            _ => 2 * MIB,
        };
        Window { size, align: size }
    }

    /// Kernel rule: every hotplug bridge gets the largest spare need as extra space.
    fn apply_kernel_sizes(&mut self) {
        let mut hp_mem = 0u64;
        let mut hp_pref = 0u64;
        // Ports that are empty at boot: spares and ports of devices hotplugged later.
        for (i, p) in self.ports.iter().enumerate() {
            let cold = self
                .device_of
                .get(&i)
                .and_then(|d| self.request.devices.get(*d))
                .is_some_and(|d| d.cold_plug);
            if p.kind != PortKind::BridgeSlot && !self.is_switch_port(p) && !cold {
                hp_mem = hp_mem.max(p.reservation.mem.size);
                hp_pref = hp_pref.max(p.reservation.pref.size);
            }
        }
        let start = match self.spec.window_rule {
            WindowRule::KernelHotplugSize { start_align } => start_align.max(MEM_GRANULARITY),
            _ => MEM_GRANULARITY,
        };
        let switch_ports: BTreeSet<String> = self.switches.iter().map(|s| s.root_port.to_string()).collect();
        for p in self
            .ports
            .iter_mut()
            .filter(|p| p.kind != PortKind::BridgeSlot && !switch_ports.contains(p.id.as_str()))
        {
            // The kernel gives the port max(what is below, the extra size), aligned only
            // to its minimum when it is the extra size that counts.
            let grow = |w: &mut Window, hp: u64| {
                if hp > w.size {
                    *w = Window { size: hp, align: start };
                }
            };
            grow(&mut p.reservation.mem, hp_mem);
            grow(&mut p.reservation.pref, hp_pref);
            if hp_pref > 0 {
                p.reservation.why.push(format!(
                    "the guest kernel gives every hotplug bridge {} of 32-bit and {} of prefetchable space (pci=hpmmiosize=,hpmmioprefsize=)",
                    human_size(hp_mem),
                    human_size(hp_pref)
                ));
            }
        }
        self.hotplug_totals.hotplug_mem = hp_mem;
        self.hotplug_totals.hotplug_pref = hp_pref;
        self.hotplug_totals.hotplug_buses = self.opts.spare_bus_reserve;
    }

    /// Writes `mem-reserve`, `pref64-reserve`, `io-reserve` and `bus-reserve` on root ports.
    fn write_reserve_props(&mut self) {
        let rule = self.spec.window_rule;
        let reads_props = matches!(rule, WindowRule::ReserveUnaligned { .. } | WindowRule::ReservePowerOfTwo);
        if !reads_props || !self.opts.size_reservations {
            return;
        }
        let downstream_reserve = self.spec.downstream_reserve;
        let bus_numbering = self.spec.bus_numbering;
        for p in self.ports.iter_mut() {
            let carries = p.kind == PortKind::Root || (p.kind == PortKind::Downstream && downstream_reserve);
            let Some(dev) = p.device.as_mut().filter(|_| carries) else { continue };
            let r = &p.reservation;
            dev.props.insert("mem-reserve".into(), PropValue::Int(r.mem.size));
            dev.props.insert("pref64-reserve".into(), PropValue::Int(r.pref.size));
            dev.props.insert("io-reserve".into(), PropValue::Int(r.io.size));
            if r.bus_reserve > 0 && bus_numbering == BusNumbering::FirmwareDepthFirst {
                dev.props.insert("bus-reserve".into(), PropValue::Int(u64::from(r.bus_reserve)));
            }
        }
    }

    /// Placeholder functions for a downstream port: one `ivshmem-plain` per prefetchable
    /// BAR of what the port must hold (at most 8), each backed by an unreserved RAM backend.
    fn placeholder_for(
        &self,
        ids: &mut Ids,
        taken: &BTreeSet<String>,
        port_id: &str,
        need: &Requirement,
    ) -> Result<Placeholder, PlanError> {
        let mut sizes: Vec<u64> = self
            .ports
            .iter()
            .find(|p| p.id.as_str() == port_id)
            .and_then(|p| p.profile.as_ref())
            .map(|prof| {
                prof.resources
                    .iter()
                    .filter(|r| r.window() == pcilibs::requirement::Window::Pref)
                    .map(|r| r.size)
                    .collect()
            })
            .unwrap_or_default();
        if sizes.is_empty() && !need.pref.is_empty() {
            sizes.push(next_pow2(need.pref.size).unwrap_or(need.pref.size));
        }
        if sizes.is_empty() {
            sizes.push(MIB);
        }
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        if sizes.len() > 8 {
            let total: u64 = sizes.iter().skip(7).sum();
            sizes.truncate(7);
            sizes.push(next_pow2(total).unwrap_or(total));
        }
        let base = ids.alloc("ph", taken)?;
        let mem32 = self.spec.mem32_placeholder.clone().filter(|_| need.mem.size > MEM_GRANULARITY);
        let functions = sizes.len() + usize::from(mem32.is_some());
        let multi = functions > 1;
        let mut objects = Vec::new();
        let mut devices = Vec::new();
        let fn_id = |f: usize| QemuId::new(if f == 0 { base.clone() } else { format!("{base}-f{f}") });
        for (f, size) in sizes.iter().enumerate() {
            let mem_id = QemuId::new(format!("{base}-mem{f}"))?;
            objects.push(QemuObject::unbacked_ram(mem_id.clone(), *size));
            let mut d = QemuDevice::new("ivshmem-plain", fn_id(f)?).prop("memdev", mem_id.to_string());
            d.bus = Some(port_id.to_string());
            d.addr = Some(DevFn::new(0, f as u8)?);
            d.multifunction = multi && f == 0;
            devices.push(d);
        }
        if let Some(driver) = mem32 {
            // qxl's RAM BAR (BAR 0) is 32-bit non-prefetchable and `ram_size_mb` large
            // (16 MiB at least); its VRAM BAR is kept at 1 MiB and its ROM BAR off.
            let f = sizes.len();
            let ram_mb = (next_pow2(need.mem.size).unwrap_or(need.mem.size) / MIB).max(16);
            let mut d = QemuDevice::new(driver, fn_id(f)?)
                .prop("ram_size_mb", ram_mb)
                .prop("vram_size_mb", 1u64)
                .prop("vgamem_mb", (ram_mb / 4).max(1))
                .prop("rombar", 0u64);
            d.bus = Some(port_id.to_string());
            d.addr = Some(DevFn::new(0, f as u8)?);
            devices.push(d);
        }
        Ok(Placeholder { objects, devices, present: true })
    }
}

/// What the placeholder's BARs need (ivshmem: 256 B BAR 0 and the memory BAR; qxl: RAM
/// BAR, 1 MiB VRAM BAR, 8 KiB ROM-register BAR and a 32-port I/O BAR).
fn placeholder_requirement(ph: &Placeholder) -> Requirement {
    use pcilibs::bar::BarKind;
    use pcilibs::requirement::Resource;
    let mut res = Vec::new();
    for d in &ph.devices {
        match d.driver.as_str() {
            "ivshmem-plain" => {
                res.push(Resource::bar(BarKind::Mem32, false, 256));
                let size = ph
                    .objects
                    .iter()
                    .find(|o| d.props.get("memdev") == Some(&PropValue::Str(o.id.to_string())))
                    .and_then(|o| o.props.get("size"));
                if let Some(PropValue::Int(size)) = size {
                    res.push(Resource::bar(BarKind::Mem64, true, *size));
                }
            }
            _ => {
                if let Some(PropValue::Int(mb)) = d.props.get("ram_size_mb") {
                    res.push(Resource::bar(BarKind::Mem32, false, mb.saturating_mul(MIB)));
                }
                res.push(Resource::bar(BarKind::Mem32, false, MIB));
                res.push(Resource::bar(BarKind::Mem32, false, 8 << 10));
                res.push(Resource::bar(BarKind::Io, false, 32));
            }
        }
    }
    Requirement::of(&res).unwrap_or_default()
}

/// Assigns bus numbers depth-first per root bus and expander `bus_nr` ranges, and fills in
/// BDFs and paths of ports, switches and bridges.
fn number_buses(
    b: &mut Builder<'_>,
    host_bridges: &mut [HostBridge],
    bridges: &mut [PciBridge],
    per_hb_ports: &[Vec<usize>],
) -> Result<(), PlanError> {
    let kernel = b.spec.bus_numbering == BusNumbering::KernelDepthFirst;
    let mut next: u32 = 0;
    for (hb_index, hb) in host_bridges.iter_mut().enumerate() {
        let root = next;
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
        indices.sort_by_key(|i| b.ports.get(*i).map(|p| p.bdf.devfn));
        // Items on the root bus in devfn order: root ports, and on pcie.0 the PCI bridge.
        let mut entries: Vec<(DevFn, Option<usize>)> =
            indices.iter().filter_map(|i| b.ports.get(*i).map(|p| (p.bdf.devfn, Some(*i)))).collect();
        if hb_index == 0 {
            for br in bridges.iter() {
                entries.push((br.bdf.devfn, None));
            }
        }
        entries.sort_by_key(|e| e.0);
        for (devfn, idx) in entries {
            let sec = next;
            next += 1;
            match idx {
                Some(i) => {
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
                        let up_path = path.join(DevFn { slot: 0, function: 0 });
                        let mut ds: Vec<usize> = (0..b.ports.len())
                            .filter(|j| {
                                b.ports.get(*j).is_some_and(|p| p.switch.is_some() && p.switch == sw_id)
                            })
                            .collect();
                        ds.sort_by_key(|j| b.ports.get(*j).map(|p| p.bdf.devfn));
                        for j in ds {
                            let dsec = next;
                            let reserve = if kernel { u32::from(b.opts.spare_bus_reserve) } else { 0 };
                            next = dsec + 1 + reserve;
                            if let Some(p) = b.ports.get_mut(j) {
                                let dfn = p.bdf.devfn;
                                p.bdf = GuestBdf { segment: 0, bus: up_sec as u8, devfn: dfn };
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
                        p.bdf = GuestBdf { segment: 0, bus: root as u8, devfn };
                        p.path = path;
                        p.secondary_bus = clamp_bus(sec)?;
                        p.subordinate_bus = clamp_bus(sub)?;
                    }
                }
                None => {
                    if let Some(br) = bridges.iter_mut().find(|br| br.bdf.devfn == devfn) {
                        br.secondary_bus = clamp_bus(sec)?;
                        let br_id = br.id.to_string();
                        for p in b
                            .ports
                            .iter_mut()
                            .filter(|p| p.kind == PortKind::BridgeSlot && p.target_bus == br_id)
                        {
                            p.bdf = GuestBdf { segment: 0, bus: 0, devfn };
                            p.path = GuestPciPath { root_bus: None, hops: vec![devfn] };
                            p.secondary_bus = clamp_bus(sec)?;
                            p.subordinate_bus = clamp_bus(sec)?;
                        }
                    }
                }
            }
        }
        hb.last_bus = clamp_bus(next - 1)?;
    }
    Ok(())
}

fn clamp_bus(bus: u32) -> Result<u8, PlanError> {
    u8::try_from(bus).map_err(|_| PlanError::Buses { needed: bus + 1 })
}

/// Packs windows largest alignment first (the order firmware places them in).
fn pack(windows: impl Iterator<Item = Window>) -> Result<WindowRequirement, AddressSpaceError> {
    let mut list: Vec<Window> = windows.filter(|w| w.size > 0).collect();
    list.sort_by_key(|w| std::cmp::Reverse((w.align, w.size)));
    let mut total = WindowRequirement::default();
    for w in list {
        total = total.combine(&w.as_requirement()).ok_or(AddressSpaceError::Overflow)?;
    }
    Ok(total)
}

/// Checks 32-bit hole, I/O space, 64-bit aperture and physical address width.
pub(crate) fn check_address_space(
    plan: &Plan,
    hotplug: &Totals,
) -> Result<(AddressReport, Totals), PlanError> {
    let spec = &plan.platform;
    let top: Vec<&Port> = plan.ports.iter().filter(|p| p.kind == PortKind::Root).collect();
    let bridge_windows =
        plan.bridges.iter().map(|_| Window { size: MEM_GRANULARITY, align: MEM_GRANULARITY });
    let mem = pack(top.iter().map(|p| p.reservation.mem).chain(bridge_windows))?;
    let io: u64 = top.iter().map(|p| p.reservation.io.size).sum();
    let pref = pack(top.iter().map(|p| p.reservation.pref))?;
    if mem.size > spec.mmio32.size {
        return Err(AddressSpaceError::Mmio32 { needed: mem.size, available: spec.mmio32.size }.into());
    }
    if io > spec.io.size {
        return Err(AddressSpaceError::Io { needed: io, available: spec.io.size }.into());
    }
    let ram = plan.options.guest_ram;
    let ram_end = (4 * GIB).saturating_add(spec.ram_above_4g(ram));
    let aperture = if pref.is_empty() && spec.mmio64 == Mmio64Aperture::GrowsAfterRam {
        None
    } else {
        spec.mmio64_range(ram, pref.size, pref.align)
    };
    if let (Mmio64Aperture::Fixed { size, .. }, false) = (spec.mmio64, pref.is_empty()) {
        if pref.size > size {
            return Err(AddressSpaceError::Mmio64Aperture { needed: pref.size, available: size }.into());
        }
    }
    if matches!(spec.mmio64, Mmio64Aperture::None) && !pref.is_empty() {
        return Err(AddressSpaceError::Mmio64Aperture { needed: pref.size, available: 0 }.into());
    }
    let end = aperture.map_or(ram_end, |a| a.end().max(ram_end));
    let needed_bits = bits_for_end(end).max(bits_for_end(ram_end));
    for (have, who) in [(plan.options.guest_phys_bits, "guest CPU"), (plan.options.host_phys_bits, "host")] {
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
        mmio64_needed: pref.size,
        mmio64_aperture: aperture,
        ram_end,
        phys_bits_needed: needed_bits,
        guest_phys_bits: plan.options.guest_phys_bits,
        host_phys_bits: plan.options.host_phys_bits,
    };
    let totals =
        Totals { mmio64_needed: aperture.map_or(0, |a| a.size), phys_bits_needed: needed_bits, ..*hotplug };
    Ok((report, totals))
}

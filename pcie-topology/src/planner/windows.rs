//! Window sizing: reservations, kernel hotplug sizes and switch-port placeholders.

use std::collections::BTreeSet;

use pcilibs::requirement::{Requirement, Resource, IO_GRANULARITY, MEM_GRANULARITY};

use super::Builder;
use crate::error::{AddressSpaceError, PlanError};
use crate::plan::{
    bridge_requirement, describe_requirement, PciBridge, Placeholder, Port, PortKind, Reservation,
};
use crate::platform::{BusNumbering, WindowRule};
use crate::qemu::{DevFn, PropValue, QemuDevice, QemuId, QemuObject};
use crate::request::{DeviceRequest, RequestError};
use crate::reserve::{pack_windows, size_window, WindowReservation};
use crate::units::{human_size, next_pow2, MIB};

/// The rule a port's windows are sized by: how the firmware (or the guest kernel) will
/// give that kind of port its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortSizing {
    /// What the port holds is plugged at boot: firmware sizes the windows from it and
    /// aligns them to its largest BAR.
    BootDevice,
    /// A hotplug port whose windows are reserved for what it must take: a root port's
    /// `*-reserve` properties (a downstream port's, where the platform has them), or the
    /// guest kernel's hotplug sizes (`pci=hpmmiosize=`).
    Reserved,
    /// A switch downstream port without `*-reserve` properties under firmware, which sizes
    /// it from boot-time devices only: a boot-time placeholder gets it its windows.
    Placeholder,
    /// The same without a placeholder (switched off, or nothing needs more than the
    /// minimum): the firmware's minimum windows must hold what it takes.
    FirmwareMinimum,
    /// Reservations switched off: the machine's default windows.
    MachineDefault,
    /// A root port above a switch: it covers its downstream ports' windows.
    AboveSwitch,
    /// A slot of a PCIe-to-PCI bridge: sized with its bridge ([`Builder::size_bridges`]).
    BridgeSlot,
}

impl<'a> Builder<'a> {
    fn is_switch_port(&self, port: &Port) -> bool {
        self.switches.iter().any(|s| s.root_port == port.id)
    }

    /// Which rule sizes `port`, which must hold `need` (plugged at boot when `cold`).
    fn sizing_of(&self, port: &Port, need: &Requirement, cold: bool) -> PortSizing {
        if port.kind == PortKind::BridgeSlot {
            return PortSizing::BridgeSlot;
        }
        if self.is_switch_port(port) {
            return PortSizing::AboveSwitch;
        }
        if cold {
            return PortSizing::BootDevice;
        }
        if !self.opts.size_reservations {
            return PortSizing::MachineDefault;
        }
        let kernel = matches!(self.spec.window_rule, WindowRule::KernelHotplugSize { .. });
        if port.kind == PortKind::Root || self.spec.downstream_reserve || kernel {
            return PortSizing::Reserved;
        }
        // The firmware gives an empty downstream port minimum memory windows and no I/O
        // window: an I/O BAR needs a placeholder as much as a large memory BAR does.
        let at_minimum = need.pref.is_empty() && need.mem.size <= MEM_GRANULARITY && need.io.is_empty();
        if self.opts.switch_placeholders && !at_minimum {
            PortSizing::Placeholder
        } else {
            PortSizing::FirmwareMinimum
        }
    }

    /// What port `i` must hold (its device's or profile's requirement) and whether that is
    /// plugged at boot.
    fn port_need(&self, i: usize) -> Result<(Requirement, bool), PlanError> {
        let profile = self.ports.get(i).and_then(|p| p.profile.as_ref());
        Ok(match (self.device_of.get(&i), profile) {
            (Some(d), _) => {
                let d =
                    self.request.devices.get(*d).ok_or_else(|| PlanError::UnknownDevice(d.to_string()))?;
                (d.requirement()?, d.cold_plug)
            }
            (None, Some(p)) => (p.requirement()?, false),
            (None, None) => (Requirement::default(), false),
        })
    }

    /// Sizes every window: ports that hold a device or a profile by their rule first, then
    /// the kernel rule's uniform sizes, then the root ports above switches from their
    /// downstream ports; last the `*-reserve` properties.
    pub(super) fn size_windows(&mut self) -> Result<(), PlanError> {
        for i in 0..self.ports.len() {
            let Some(port) = self.ports.get(i) else { continue };
            let (need, cold) = self.port_need(i)?;
            let id = port.id.to_string();
            let (res, placeholder) = match self.sizing_of(port, &need, cold) {
                PortSizing::BootDevice => (self.sized(&need, true)?, None),
                PortSizing::Reserved => (self.sized(&need, false)?, None),
                PortSizing::MachineDefault => (self.machine_default(&need), None),
                PortSizing::Placeholder => {
                    let (res, ph) = self.with_placeholder(&id, &need)?;
                    (res, Some(ph))
                }
                PortSizing::FirmwareMinimum => (self.at_firmware_minimum(&id, &need)?, None),
                // Follow from their downstream ports / their bridge.
                PortSizing::AboveSwitch | PortSizing::BridgeSlot => continue,
            };
            let spare_bus_reserve = self.opts.spare_bus_reserve;
            if let Some(p) = self.ports.get_mut(i) {
                p.reservation = Reservation { purpose: std::mem::take(&mut p.reservation.purpose), ..res };
                if p.kind == PortKind::Root && p.profile.is_some() && p.occupant.is_none() {
                    p.reservation.bus_reserve = spare_bus_reserve;
                }
                if placeholder.is_some() {
                    p.placeholder = placeholder;
                }
            }
        }
        let kernel = matches!(self.spec.window_rule, WindowRule::KernelHotplugSize { .. });
        if kernel {
            self.apply_kernel_sizes();
        }
        self.size_switch_root_ports(kernel)?;
        self.write_reserve_props();
        Ok(())
    }

    /// A switch downstream port with a boot-time placeholder: the windows the firmware
    /// gives what is plugged at boot, which must hold `need`.
    fn with_placeholder(
        &mut self,
        port_id: &str,
        need: &Requirement,
    ) -> Result<(Reservation, Placeholder), PlanError> {
        let ph = self.placeholder_for(port_id, need)?;
        let ph_need = placeholder_requirement(&ph)?;
        let mut res = self.sized(&ph_need, true)?;
        res.need = *need;
        if !res.holds(need) {
            let no_mem32 = self.spec.mem32_placeholder.is_none();
            let hint = if no_mem32 && !res.mem.holds(&need.mem) {
                "; this platform has no device whose 32-bit BAR can stand in for the profile's"
            } else if no_mem32 && !res.io.holds(&need.io) {
                "; this platform has no placeholder device with an I/O BAR"
            } else {
                ""
            };
            return Err(PlanError::DownstreamWindow {
                port: port_id.to_string(),
                need: format!(
                    "{} with placeholder windows {}{hint}",
                    describe_requirement(need),
                    describe_requirement(&ph_need)
                ),
            });
        }
        res.why.push(format!(
            "the switch downstream port has no *-reserve properties: a boot-time placeholder ({}) makes firmware size the windows, and is removed before the first hotplug",
            describe_requirement(&ph_need)
        ));
        Ok((res, ph))
    }

    /// A switch downstream port without `*-reserve` properties or placeholder: the empty
    /// port gets the firmware's minimum, which must hold `need`.
    fn at_firmware_minimum(&self, port_id: &str, need: &Requirement) -> Result<Reservation, PlanError> {
        let min = self.min_window();
        // No I/O window at all: firmware sizes an empty downstream port's I/O from nothing.
        if !(min.holds(&need.mem) && min.holds(&need.pref) && need.io.is_empty()) {
            return Err(PlanError::DownstreamWindow {
                port: port_id.to_string(),
                need: describe_requirement(need),
            });
        }
        Ok(Reservation {
            need: *need,
            mem: min,
            pref: min,
            why: vec![format!(
                "no reservation property on a switch downstream port; the firmware's minimum windows ({}) hold this",
                human_size(min.size)
            )],
            ..Reservation::default()
        })
    }

    /// Root ports above switches cover the windows of their downstream ports (under the
    /// kernel rule they are hotplug bridges too, and get the kernel's extra space on top).
    fn size_switch_root_ports(&mut self, kernel: bool) -> Result<(), PlanError> {
        let (hp_mem, hp_pref) = (self.hotplug_totals.hotplug_mem, self.hotplug_totals.hotplug_pref);
        let switches = self.switches.clone();
        for sw in &switches {
            let below: Vec<&Reservation> = self
                .ports
                .iter()
                .filter(|p| p.switch.as_ref() == Some(&sw.id))
                .map(|p| &p.reservation)
                .collect();
            let need = Requirement {
                mem: pack_windows(below.iter().map(|r| r.mem))?,
                pref: pack_windows(below.iter().map(|r| r.pref))?,
                io: pack_windows(below.iter().map(|r| r.io))?,
            };
            let mut res = self.sized(&need, true)?;
            res.why.insert(0, format!("covers the windows of switch {}'s downstream ports", sw.id));
            if kernel {
                res.mem.size = res.mem.size.checked_add(hp_mem).ok_or(AddressSpaceError::Overflow)?;
                res.pref.size = res.pref.size.checked_add(hp_pref).ok_or(AddressSpaceError::Overflow)?;
            }
            if let Some(p) = self.ports.iter_mut().find(|p| p.id == sw.root_port) {
                let bus_reserve = p.reservation.bus_reserve;
                p.reservation = Reservation { purpose: format!("switch {}", sw.id), bus_reserve, ..res };
            }
        }
        Ok(())
    }

    /// Windows of each PCIe-to-PCI bridge and of its slots.
    ///
    /// QEMU 7.2's `pcie-pci-bridge` has no `*-reserve` properties: firmware sizes its
    /// windows from the devices present at boot. With only boot-time devices behind it that
    /// is all they need. With a device hotplugged behind it, the bridge is sure to get only
    /// what an empty bridge gets ([`Builder::empty_bridge_windows`]), and every device
    /// behind it must fit there together, prefetchable BARs counted in the memory window;
    /// anything more is [`PlanError::BridgeWindow`], not a plan that fails in the guest.
    pub(super) fn size_bridges(&mut self, bridges: &mut [PciBridge]) -> Result<(), PlanError> {
        for bridge in bridges.iter_mut() {
            let devices = self.bridge_devices(bridge);
            let slots = if devices.iter().any(|(_, d)| !d.cold_plug) {
                self.size_hotplug_bridge(bridge, &devices)?
            } else {
                self.size_boot_bridge(bridge, &devices)?
            };
            for (i, r) in slots {
                if let Some(p) = self.ports.get_mut(i) {
                    p.reservation = Reservation { purpose: std::mem::take(&mut p.reservation.purpose), ..r };
                }
            }
        }
        Ok(())
    }

    /// The devices behind `bridge`, with the index of the slot each is on.
    fn bridge_devices(&self, bridge: &PciBridge) -> Vec<(usize, &'a DeviceRequest)> {
        let request = self.request;
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PortKind::BridgeSlot && p.target_bus == bridge.id.as_str())
            .filter_map(|(i, _)| self.device_of.get(&i).and_then(|d| request.devices.get(*d)).map(|d| (i, d)))
            .collect()
    }

    /// A bridge with a hotplugged device: everything behind it must fit what an empty
    /// bridge gets. Returns the slots' reservations.
    fn size_hotplug_bridge(
        &self,
        bridge: &mut PciBridge,
        devices: &[(usize, &DeviceRequest)],
    ) -> Result<Vec<(usize, Reservation)>, PlanError> {
        let (mem, io) = self.empty_bridge_windows();
        let names: Vec<String> = devices.iter().map(|(_, d)| d.id.to_string()).collect();
        let names = names.join(", ");
        let need = bridge_requirement(devices.iter().flat_map(|(_, d)| d.resources()))
            .map_err(|source| RequestError::Requirement { device: names.clone(), source })?;
        let available = if mem.size == 0 {
            "no window at all".to_string()
        } else {
            format!("{} of memory, {:#x} of I/O", human_size(mem.size), io.size)
        };
        if !(mem.holds(&need.mem) && io.holds(&need.io)) {
            return Err(PlanError::BridgeWindow {
                bridge: bridge.id.to_string(),
                devices: names,
                need: describe_requirement(&need),
                available,
            });
        }
        bridge.mem = mem;
        bridge.pref = WindowReservation::default();
        bridge.io = io;
        let why = format!(
            "behind PCIe-to-PCI bridge {} (no *-reserve properties) with a device hotplugged there: the firmware gives the bridge what an empty one gets ({available}), shared by every device behind it, prefetchable BARs included",
            bridge.id
        );
        let mut out = Vec::new();
        for (i, d) in devices {
            // The slot's need as the bridge sees it: prefetchable BARs in `mem`.
            let need = bridge_requirement(d.resources())
                .map_err(|source| RequestError::Requirement { device: d.id.to_string(), source })?;
            let r = Reservation {
                purpose: String::new(),
                need,
                mem,
                pref: WindowReservation::default(),
                io,
                bus_reserve: 0,
                why: vec![why.clone()],
            };
            out.push((*i, r));
        }
        Ok(out)
    }

    /// A bridge with boot-time devices only: firmware sizes its windows from them (at
    /// least what an empty bridge gets). Returns the slots' reservations.
    fn size_boot_bridge(
        &self,
        bridge: &mut PciBridge,
        devices: &[(usize, &DeviceRequest)],
    ) -> Result<Vec<(usize, Reservation)>, PlanError> {
        let (floor_mem, floor_io) = self.empty_bridge_windows();
        let all: Vec<Resource> = devices.iter().flat_map(|(_, d)| d.resources().copied()).collect();
        let need = Requirement::of(&all)
            .map_err(|source| RequestError::Requirement { device: bridge.id.to_string(), source })?;
        let r = self.sized(&need, true)?;
        let at_least =
            |w: WindowReservation, floor: WindowReservation| if w.size >= floor.size { w } else { floor };
        bridge.mem = at_least(r.mem, floor_mem);
        bridge.pref = r.pref;
        bridge.io = at_least(r.io, floor_io);
        let mut out = Vec::new();
        for (i, d) in devices {
            let mut r = self.sized(&d.requirement()?, true)?;
            r.why.insert(
                0,
                format!(
                    "behind PCIe-to-PCI bridge {}, plugged at boot: the firmware sizes the bridge's windows from the devices present",
                    bridge.id
                ),
            );
            out.push((*i, r));
        }
        Ok(out)
    }

    /// What firmware gives an empty PCIe-to-PCI bridge (memory, I/O), measured on QEMU 7.2
    /// with `query-pci`: SeaBIOS, OVMF and AAVMF 2 MiB of memory and 4 KiB of I/O (SeaBIOS
    /// also a 2 MiB and OVMF a 512 MiB prefetchable window, AAVMF none, so prefetchable
    /// BARs are counted in the memory window). Linux 6.1 without firmware (aarch64 `virt`
    /// booted with `-kernel`) gives it no window at all: the `pci=hpmmiosize=` extra space
    /// goes to PCIe hotplug ports only.
    pub(super) fn empty_bridge_windows(&self) -> (WindowReservation, WindowReservation) {
        match self.spec.window_rule {
            WindowRule::KernelHotplugSize { .. } | WindowRule::NoWindows => {
                (WindowReservation::default(), WindowReservation::default())
            }
            _ => (self.min_window(), WindowReservation { size: IO_GRANULARITY, align: IO_GRANULARITY }),
        }
    }

    /// The windows an empty port gets when nothing is reserved: the machine's defaults.
    fn machine_default(&self, need: &Requirement) -> Reservation {
        let min = self.min_window();
        Reservation {
            need: *need,
            mem: min,
            pref: min,
            why: vec![format!(
                "no reservation: the firmware gives an empty port its default minimum windows ({})",
                human_size(min.size)
            )],
            ..Reservation::default()
        }
    }

    /// Windows for `need` under the platform's rule: reserved for a hotplug port, or sized
    /// by firmware from what is `present` at boot.
    fn sized(&self, need: &Requirement, present: bool) -> Result<Reservation, PlanError> {
        let rule = self.spec.window_rule;
        let mem = size_window(rule, &need.mem, MEM_GRANULARITY, present)?;
        let pref = size_window(rule, &need.pref, MEM_GRANULARITY, present)?;
        let io = size_window(rule, &need.io, IO_GRANULARITY, present)?;
        let mut why = Vec::new();
        why.push(format!("32-bit window {}: {}", human_size(mem.window.size), mem.why));
        why.push(format!("64-bit prefetchable window {}: {}", human_size(pref.window.size), pref.why));
        if need.io.is_empty() {
            why.push("no I/O window: nothing needs I/O ports, and only about 16 ports can have one".into());
        } else {
            why.push(format!("I/O window {:#x}: {}", io.window.size, io.why));
        }
        Ok(Reservation {
            purpose: String::new(),
            need: *need,
            mem: mem.window,
            pref: pref.window,
            io: if need.io.is_empty() { WindowReservation::default() } else { io.window },
            bus_reserve: 0,
            why,
        })
    }

    /// The windows firmware gives an empty hotplug port by default.
    fn min_window(&self) -> WindowReservation {
        let size = match self.spec.window_rule {
            WindowRule::ReserveUnaligned { start_align }
            | WindowRule::KernelHotplugSize { start_align }
            | WindowRule::ReservePlaced { start_align } => start_align.max(MEM_GRANULARITY),
            _ => 2 * MIB,
        };
        WindowReservation { size, align: size }
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
            // The kernel gives the port max(what is below, the extra size). It aligns the
            // window to the largest BAR below it: an empty port's window only to the
            // minimum, a window holding a boot-time device still to that device's BAR
            // (the extra size does not lower it, and a window aligned only to the minimum
            // could not hold the BAR it was sized for).
            let grow = |w: &mut WindowReservation, hp: u64| {
                if hp > w.size {
                    *w = WindowReservation { size: hp, align: w.align.max(start) };
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
    pub(super) fn write_reserve_props(&mut self) {
        let rule = self.spec.window_rule;
        let reads_props = matches!(
            rule,
            WindowRule::ReserveUnaligned { .. }
                | WindowRule::ReservePowerOfTwo
                | WindowRule::ReservePlaced { .. }
        );
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
    fn placeholder_for(&mut self, port_id: &str, need: &Requirement) -> Result<Placeholder, PlanError> {
        let mut sizes: Vec<u64> = self
            .ports
            .iter()
            .find(|p| p.id.as_str() == port_id)
            .and_then(|p| p.profile.as_ref())
            .map(|prof| {
                prof.resources
                    .iter()
                    .map(|r| r.resource)
                    .filter(|r| r.window() == pcilibs::requirement::Window::Pref)
                    .map(|r| r.size)
                    .collect()
            })
            .unwrap_or_default();
        let overflow = || PlanError::from(AddressSpaceError::Overflow);
        if sizes.is_empty() && !need.pref.is_empty() {
            sizes.push(next_pow2(need.pref.size).ok_or_else(overflow)?);
        }
        if sizes.is_empty() {
            sizes.push(MIB);
        }
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        if sizes.len() > 8 {
            // Functions 7 and up share one BAR of the next power of two above their sum.
            let total = sizes.iter().skip(7).try_fold(0u64, |a, b| a.checked_add(*b)).ok_or_else(overflow)?;
            sizes.truncate(7);
            sizes.push(next_pow2(total).ok_or_else(overflow)?);
        }
        let base = self.id("ph")?.to_string();
        // The 32-bit placeholder (x86's `qxl`) also has an I/O BAR, so it gets the port an
        // I/O window as well.
        let mem32 = self
            .spec
            .mem32_placeholder
            .clone()
            .filter(|_| need.mem.size > MEM_GRANULARITY || !need.io.is_empty());
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
            let ram_mb = (next_pow2(need.mem.size).ok_or_else(overflow)? / MIB).max(16);
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
fn placeholder_requirement(ph: &Placeholder) -> Result<Requirement, PlanError> {
    use pcilibs::bar::BarKind;
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
                    let bytes = mb.checked_mul(MIB).ok_or(AddressSpaceError::Overflow)?;
                    res.push(Resource::bar(BarKind::Mem32, false, bytes));
                }
                res.push(Resource::bar(BarKind::Mem32, false, MIB));
                res.push(Resource::bar(BarKind::Mem32, false, 8 << 10));
                res.push(Resource::bar(BarKind::Io, false, 32));
            }
        }
    }
    Requirement::of(&res).map_err(|source| {
        RequestError::Requirement { device: "switch port placeholder".into(), source }.into()
    })
}

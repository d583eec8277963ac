//! Where devices go: functions without a PCI Express capability on reservable PCIe ports
//! like any other, a PCIe-to-PCI bridge only when a device asks for a conventional bus
//! (and a typed error when what is hotplugged behind it cannot be guaranteed), and host
//! functions renumbered so that every guest device has a function 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use arch_x86_aarch64::{FirmwareGeneration, Virt, Q35};
use pcie_topology::plan::bridge_requirement;
use pcie_topology::qemu::PropValue;
use pcie_topology::request::{FunctionRequest, FunctionResource};
use pcie_topology::units::{GIB, KIB, MIB};
use pcie_topology::{
    plan, Attach, DeviceRequest, HostRef, Mode, PlanError, PlanOptions, PlanRequest, Platform, PortKind,
    QemuId,
};
use pcilibs::bar::{Bar, BarKind};
use pcilibs::bdf::Bdf;
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::requirement::Resource;

fn platforms() -> Vec<Box<dyn Platform>> {
    vec![
        Box::new(Q35::seabios()),
        Box::new(Q35::for_generation(FirmwareGeneration::SeaBiosEndOfSpace, "").unwrap()),
        Box::new(Q35::for_generation(FirmwareGeneration::SeaBiosEndOfSpaceCapped, "").unwrap()),
        Box::new(Q35::ovmf()),
        Box::new(Virt::direct_kernel()),
        Box::new(Virt::uefi()),
    ]
}

/// An `ivshmem-plain` function as QEMU builds it: conventional PCI, no PCIe capability.
fn conventional_ivshmem(id: &str, size: u64) -> DeviceRequest {
    let mut d = DeviceRequest::ivshmem(id, size).unwrap();
    d.functions[0].pcie = false;
    d
}

/// A conventional function with one small BAR (a legacy NIC or sound card).
fn legacy(id: &str, bar: u64) -> DeviceRequest {
    let mut f = FunctionRequest::new(0, "e1000", vec![FunctionResource::bar(0, BarKind::Mem32, false, bar)]);
    f.pcie = false;
    let mut d = DeviceRequest::new(QemuId::new(id).unwrap(), vec![f]);
    d.attach = Attach::PciBridge;
    d
}

fn request(devices: Vec<DeviceRequest>) -> PlanRequest {
    PlanRequest::default().with_devices(devices)
}

#[test]
fn functions_without_pcie_capability_go_on_reservable_root_ports() {
    for platform in platforms() {
        let name = platform.spec().name;
        let plan = plan(platform.as_ref(), &request(vec![conventional_ivshmem("gpu0", 32 * GIB)]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(plan.bridges.is_empty(), "{name}: no PCIe-to-PCI bridge unless asked for");
        let d = plan.device("gpu0").unwrap();
        let port = plan.port(d.port.as_ref().unwrap().as_str()).unwrap();
        assert_eq!(port.kind, PortKind::Root, "{name}");
        assert!(port.reservation.holds(&d.need), "{name}: {:?}", port.reservation);
        assert!(port.reservation.pref.size >= 32 * GIB, "{name}: {:?}", port.reservation.pref);
        let dev = port.device.as_ref().unwrap();
        if name.starts_with("q35") {
            let PropValue::Int(pref) = dev.props["pref64-reserve"] else { panic!("{dev:?}") };
            assert!(pref >= 32 * GIB, "{name}: pref64-reserve {pref:#x}");
        }
        let action = plan.hotplug_action("gpu0").unwrap();
        assert_eq!(action.functions[0].device_add.bus.as_deref(), Some(port.id.as_str()));
    }
}

#[test]
fn functions_without_pcie_capability_go_on_switch_ports_too() {
    let mut a = conventional_ivshmem("a", 16 * GIB);
    let mut b = conventional_ivshmem("b", 16 * GIB);
    a.p2p_group = Some("g".into());
    b.p2p_group = Some("g".into());
    let request = PlanRequest::default().with_mode(Mode::SwitchPort).with_devices(vec![a, b]);
    let plan = plan(&Q35::seabios(), &request).unwrap();
    assert!(plan.bridges.is_empty());
    for id in ["a", "b"] {
        let d = plan.device(id).unwrap();
        let port = plan.port(d.port.as_ref().unwrap().as_str()).unwrap();
        assert_eq!(port.kind, PortKind::Downstream, "{id}");
        assert!(port.reservation.holds(&d.need), "{id}: {:?}", port.reservation);
    }
}

#[test]
fn a_bridge_is_used_only_when_asked_for() {
    // Per device: a PCIe device that asks for a conventional bus gets one.
    let mut asked = DeviceRequest::ivshmem("asked", 64 * KIB).unwrap();
    asked.attach = Attach::PciBridge;
    asked.cold_plug = true;
    let plan =
        plan(&Q35::seabios(), &request(vec![asked, DeviceRequest::ivshmem("other", GIB).unwrap()])).unwrap();
    assert_eq!(plan.bridges.len(), 1);
    assert_eq!(plan.bridges[0].device.driver, "pcie-pci-bridge");
    let slot = plan.port(plan.device("asked").unwrap().port.as_ref().unwrap().as_str()).unwrap();
    assert_eq!(slot.kind, PortKind::BridgeSlot);
    assert_eq!(slot.target_bus, plan.bridges[0].id.as_str());
    let other = plan.port(plan.device("other").unwrap().port.as_ref().unwrap().as_str()).unwrap();
    assert_eq!(other.kind, PortKind::Root);
    // For the whole request: the option puts every conventional device behind the bridge.
    let mut small = conventional_ivshmem("small", 64 * KIB);
    small.cold_plug = true;
    let req = PlanRequest::default()
        .with_devices(vec![small, DeviceRequest::ivshmem("pcie", GIB).unwrap()])
        .with_options({
            let mut o = PlanOptions::default();
            o.conventional_behind_bridge = true;
            o
        });
    let plan = pcie_topology::plan(&Q35::seabios(), &req).unwrap();
    let kind = |id: &str| plan.port(plan.device(id).unwrap().port.as_ref().unwrap().as_str()).unwrap().kind;
    assert_eq!(kind("small"), PortKind::BridgeSlot);
    assert_eq!(kind("pcie"), PortKind::Root);
}

#[test]
fn hotplug_behind_a_bridge_beyond_an_empty_bridge_window_is_a_typed_error() {
    // The nested-vfio failure: a 128 GiB BAR behind the bridge. With the device hotplugged,
    // firmware gives the bridge what an empty one gets, and the BAR cannot be assigned.
    for platform in platforms() {
        let name = platform.spec().name;
        let mut gpu = conventional_ivshmem("gpu0", 128 * GIB);
        gpu.attach = Attach::PciBridge;
        match plan(platform.as_ref(), &request(vec![gpu])) {
            Err(PlanError::BridgeWindow { bridge, devices, need, available }) => {
                assert_eq!(devices, "gpu0", "{name}");
                assert!(!bridge.is_empty() && !need.is_empty() && !available.is_empty());
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // Boot-time devices that are large leave no room for a hotplugged one.
    let mut big = legacy("big", 64 * MIB);
    big.cold_plug = true;
    let e = plan(&Q35::seabios(), &request(vec![big, legacy("late", 4 * KIB)])).unwrap_err();
    assert!(matches!(&e, PlanError::BridgeWindow { devices, .. } if devices == "big, late"), "{e:?}");
    assert!(e.to_string().contains("no *-reserve properties"), "{e}");
}

#[test]
fn small_hotplugged_devices_fit_the_empty_bridge_window() {
    for platform in [Q35::seabios(), Q35::ovmf()] {
        // 1 MiB of prefetchable and 4 KiB + 256 B of memory BARs: counted together in the
        // 2 MiB memory window an empty bridge gets.
        let mut ivshmem = DeviceRequest::ivshmem("ivs", MIB).unwrap();
        ivshmem.attach = Attach::PciBridge;
        let plan = plan(&platform, &request(vec![ivshmem, legacy("nic", 4 * KIB)])).unwrap();
        let bridge = &plan.bridges[0];
        assert_eq!(bridge.mem.size, 2 * MIB);
        assert_eq!(bridge.pref.size, 0, "no prefetchable window is sure to exist");
        let all: Vec<Resource> = ["ivs", "nic"]
            .iter()
            .flat_map(|id| plan.device(id).unwrap().functions[0].bars.clone())
            .map(|b| Resource::bar(b.kind, b.prefetchable, b.size))
            .collect();
        assert!(bridge.mem.holds(&bridge_requirement(&all).unwrap().mem));
        assert!(
            plan.explain()
                .contains("pcibr0 (pcie-pci-bridge at 0000:00:01.0, secondary bus 01): windows mem 2 MiB"),
            "{}",
            plan.explain()
        );
        for id in ["ivs", "nic"] {
            let port = plan.port(plan.device(id).unwrap().port.as_ref().unwrap().as_str()).unwrap();
            assert_eq!(port.kind, PortKind::BridgeSlot);
            assert!(
                port.reservation.why.iter().any(|w| w.contains("empty one")),
                "{:?}",
                port.reservation.why
            );
        }
    }
    // Linux without firmware gives an empty bridge no window at all.
    let e = plan(&Virt::direct_kernel(), &request(vec![legacy("nic", 4 * KIB)])).unwrap_err();
    assert!(
        matches!(&e, PlanError::BridgeWindow { available, .. } if available == "no window at all"),
        "{e:?}"
    );
}

#[test]
fn boot_time_devices_behind_a_bridge_size_it_and_count_in_the_address_space() {
    let mut gpu = conventional_ivshmem("gpu0", 64 * GIB);
    gpu.attach = Attach::PciBridge;
    gpu.cold_plug = true;
    for platform in platforms() {
        let name = platform.spec().name;
        let plan = pcie_topology::plan(platform.as_ref(), &request(vec![gpu.clone()]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bridge = &plan.bridges[0];
        assert!(bridge.pref.size >= 64 * GIB, "{name}: {:?}", bridge.pref);
        assert!(plan.address.mmio64_needed >= 64 * GIB, "{name}: {:?}", plan.address);
        let args = plan.qemu_args().join(" ");
        assert!(args.contains("-device pcie-pci-bridge,id=pcibr0"), "{name}: {args}");
    }
    // What is behind the bridge counts: 64 GiB there does not fit a 36-bit guest.
    let mut req = request(vec![gpu]);
    req.options.guest_phys_bits = Some(36);
    assert!(matches!(plan(&Q35::seabios(), &req), Err(PlanError::AddressSpace(_))));
}

#[test]
fn run_time_placement_behind_a_bridge_respects_its_window() {
    let mut plan = plan(&Q35::seabios(), &request(vec![legacy("a", 4 * KIB), legacy("b", 4 * KIB)])).unwrap();
    plan.release("b").unwrap();
    // The freed slot is the only place for a device that asks for a conventional bus...
    let mut big = DeviceRequest::ivshmem("big", 4 * MIB).unwrap();
    big.attach = Attach::PciBridge;
    assert!(matches!(plan.place(big), Err(PlanError::NoFreePort { .. })), "4 MiB does not fit 2 MiB");
    let action = plan.place(legacy("c", 64 * KIB)).unwrap();
    assert_eq!(action.functions[0].device_add.bus.as_deref(), Some(plan.bridges[0].id.as_str()));
    // ...and a device that does not ask never lands there.
    let free = plan.release("c").unwrap();
    assert!(free.port.is_some());
    let e = plan.place(conventional_ivshmem("conv", 64 * KIB)).unwrap_err();
    assert!(matches!(e, PlanError::NoFreePort { .. }), "{e:?}");
}

/// An nvme-like host function, as sysfs facts describe it.
fn host_function(bdf: &str, group: u32) -> FunctionFacts {
    let mut f = FunctionFacts::new(Bdf::parse(bdf).unwrap(), 0x1b36, 0x0010, 0x010802);
    f.revision = 2;
    f.is_pcie = true;
    f.bars = vec![Bar { index: 0, kind: BarKind::Mem64, prefetchable: false, size: Some(16 * KIB) }];
    f.iommu_group = Some(group);
    f.driver = Some("vfio-pci".into());
    f
}

#[test]
fn a_lone_vf_plans_as_function_0_and_the_plan_keeps_its_host_address() {
    let opts = ResourceOptions::default();
    let vf =
        DeviceRequest::from_facts(QemuId::new("vf").unwrap(), &[host_function("0000:03:00.2", 4)], &opts)
            .unwrap();
    let mut no_pcie = host_function("0000:04:00.0", 5);
    no_pcie.is_pcie = false;
    let ivs = DeviceRequest::from_facts(QemuId::new("ivs").unwrap(), &[no_pcie], &opts).unwrap();
    let plan = plan(&Q35::seabios(), &request(vec![vf, ivs])).unwrap();
    let placed = plan.device("vf").unwrap();
    assert_eq!(placed.host_functions(), [(&HostRef::Pci("0000:03:00.2".parse().unwrap()), 0)]);
    let action = plan.hotplug_action("vf").unwrap();
    assert_eq!(action.functions.len(), 1);
    assert_eq!(action.functions[0].function, 0);
    assert_eq!(action.functions[0].device_add.props["host"], PropValue::Str("0000:03:00.2".into()));
    // The action carries the host function typed too, for the runtime's checks.
    assert_eq!(action.functions[0].host, Some(HostRef::Pci("0000:03:00.2".parse().unwrap())));
    assert_eq!(action.iommu_group, Some(4));
    // The host function without a PCIe capability is on a root port, not behind a bridge.
    let port = plan.port(plan.device("ivs").unwrap().port.as_ref().unwrap().as_str()).unwrap();
    assert_eq!(port.kind, PortKind::Root);
}

/// Channel and vfio-ap devices exist on s390x only: a machine with PCIe ports refuses
/// them when planning and when placing, instead of putting them on a port.
#[test]
fn channel_and_ap_devices_are_refused_where_there_are_ports() {
    let id = || QemuId::new("d0").unwrap();
    let path = "/sys/devices/vfio_ap/matrix/11111111-2222-3333-4444-555555555555";
    for platform in platforms() {
        for d in [DeviceRequest::channel(id(), "virtio-net-ccw", 0), DeviceRequest::vfio_ap(id(), path)] {
            let e = plan(platform.as_ref(), &request(vec![d.clone()])).unwrap_err();
            assert!(matches!(e, PlanError::Unsupported { .. }), "{e}");
            let mut empty = plan(platform.as_ref(), &request(vec![])).unwrap();
            assert!(matches!(empty.place(d), Err(PlanError::Unsupported { .. })));
        }
    }
}

/// Under the guest kernel's rule every hotplug bridge gets the largest spare size; a port
/// holding a boot-time device whose window is smaller grows to it, and Linux still aligns
/// that window to the device's largest BAR. The plan lowered the alignment to 1 MiB, so the
/// 32 GiB BAR it was sized for no longer fit its own window (found by the property tests).
#[test]
fn a_boot_time_device_keeps_its_alignment_under_the_kernel_rule() {
    let mut cold = DeviceRequest::ivshmem("boot0", 32 * GIB).unwrap();
    cold.cold_plug = true;
    let gpu = DeviceRequest::new(
        QemuId::new("gpu0").unwrap(),
        vec![FunctionRequest::new(
            0,
            "vfio-pci",
            vec![
                FunctionResource::bar(0, BarKind::Mem64, true, 2 * MIB),
                FunctionResource::bar(2, BarKind::Mem64, true, 16 * GIB),
            ],
        )],
    );
    for platform in [Virt::direct_kernel(), Virt::uefi()] {
        let p = plan(&platform, &request(vec![cold.clone(), gpu.clone()])).unwrap();
        let d = p.device("boot0").unwrap();
        let port = p.port(d.port.as_ref().unwrap().as_str()).unwrap();
        let pref = port.reservation.pref;
        assert!(pref.size > 32 * GIB, "grown to the kernel's hotplug size: {pref:?}");
        assert_eq!(pref.align, 32 * GIB, "still aligned to the boot-time BAR");
        assert!(port.reservation.holds(&d.need), "{:?}", port.reservation);
    }
}

/// A hotplugged device with an I/O BAR on a switch downstream port (NUMA mode puts a
/// peer-to-peer group behind a switch): firmware gives an empty downstream port no I/O
/// window, so the plan either gets the port one (x86: the placeholder's `qxl` has an I/O
/// BAR) or refuses. Before, q35 SeaBIOS accepted a plan whose port held no I/O.
#[test]
fn an_io_bar_behind_a_switch_downstream_port_gets_an_io_window_or_a_refusal() {
    let f = FunctionRequest::new(0, "vfio-pci", vec![FunctionResource::bar(0, BarKind::Io, false, 64)]);
    let mut d = DeviceRequest::new(QemuId::new("dev2").unwrap(), vec![f]);
    d.p2p_group = Some("g0".into());
    for mode in [Mode::Numa, Mode::SwitchPort] {
        for platform in platforms() {
            let name = platform.spec().name;
            let request = PlanRequest::default().with_mode(mode).with_devices(vec![d.clone()]);
            let plan = match plan(platform.as_ref(), &request) {
                Ok(plan) => plan,
                // q35 has a placeholder with an I/O BAR (`qxl`), under SeaBIOS and OVMF:
                // it must plan it. On virt a typed refusal (no expanders, no placeholder
                // with an I/O BAR) is right.
                Err(e) if !name.starts_with("q35") => {
                    assert!(!e.to_string().is_empty(), "{name} {mode:?}");
                    continue;
                }
                Err(e) => panic!("{name} {mode:?}: {e}"),
            };
            let placed = plan.device("dev2").unwrap();
            let port = plan.port(placed.port.as_ref().unwrap().as_str()).unwrap();
            assert!(port.reservation.holds(&placed.need), "{name} {mode:?}: {:?}", port.reservation);
            assert!(port.reservation.io.size >= 4096, "{name} {mode:?}: {:?}", port.reservation.io);
        }
    }
}

/// A port held for a device the plan did not place is not handed out; `unhold` frees it,
/// and neither touches a port with a placed device.
#[test]
fn held_ports_are_not_handed_out() {
    let mut spares = request(Vec::new());
    spares.spares = vec![pcie_topology::SpareRequest::new(
        pcie_topology::HotplugProfile::parse("16M:mem32,2G:pref64").unwrap(),
        2,
    )];
    let mut plan = plan(&Q35::seabios(), &spares).unwrap();
    let (first, second) = (plan.ports[0].id.clone(), plan.ports[1].id.clone());
    let other = QemuId::new("other").unwrap();
    plan.hold(first.as_str(), other.clone()).unwrap();
    plan.hold(first.as_str(), other.clone()).unwrap();
    let e = plan.hold(first.as_str(), QemuId::new("third").unwrap()).unwrap_err();
    assert!(matches!(e, PlanError::PortTaken { .. }), "{e:?}");
    assert!(matches!(plan.hold("rp9", other.clone()), Err(PlanError::UnknownPort(_))));
    let a = plan.place(DeviceRequest::ivshmem("a", GIB).unwrap()).unwrap();
    assert_eq!(a.port.as_ref(), Some(&second), "the held port is not handed out");
    assert!(matches!(
        plan.place(DeviceRequest::ivshmem("b", GIB).unwrap()),
        Err(PlanError::NoFreePort { .. })
    ));
    assert!(matches!(plan.unhold(second.as_str()), Err(PlanError::PortTaken { .. })));
    assert_eq!(plan.unhold(first.as_str()).unwrap(), Some(other));
    assert_eq!(plan.unhold(first.as_str()).unwrap(), None);
    assert_eq!(plan.place(DeviceRequest::ivshmem("b", GIB).unwrap()).unwrap().port, Some(first));
}

/// Found by the random scenarios (seed 2069, q35 OVMF): in switch-port mode a device
/// placed at run time went to the root port that carries a switch (its `occupant` is
/// empty: the switch is not a device), and QEMU refused the `device_add` ("slot 0
/// function 0 not available for nvme, in use by x3130-upstream"). A port with a switch
/// below it is never free.
#[test]
fn run_time_placement_skips_a_root_port_that_carries_a_switch() {
    for platform in platforms() {
        let name = platform.spec().name;
        // A small device in the group: the switch's root port then has windows as small
        // as the spare port's, and comes first.
        let nvme = |id: &str| {
            let f = FunctionRequest::new(
                0,
                "nvme",
                vec![FunctionResource::bar(0, BarKind::Mem64, false, 16 * KIB)],
            );
            DeviceRequest::new(QemuId::new(id).unwrap(), vec![f])
        };
        let mut grouped = nvme("nvme9");
        grouped.p2p_group = Some("p2p0".into());
        let nic = pcie_topology::HotplugProfile::parse("16K:mem64").unwrap();
        let req = request(vec![grouped])
            .with_mode(Mode::SwitchPort)
            .with_spares(vec![pcie_topology::SpareRequest::new(nic, 1)]);
        let mut plan = plan(platform.as_ref(), &req).unwrap_or_else(|e| panic!("{name}: {e}"));
        let switch_port = plan.switches[0].root_port.clone();
        let action = plan.place(nvme("nvme0")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let port = action.port.unwrap();
        assert_ne!(port, switch_port, "{name}: placed on the port of switch {}", plan.switches[0].id);
        assert_eq!(plan.port(port.as_str()).unwrap().kind, PortKind::Root, "{name}");
    }
}

/// OVMF pads each hotplug-capable switch downstream port's prefetchable window to a 256th
/// of the 64-bit aperture once that is above 32 GiB (the window is the larger of the two):
/// eleven ports holding 1008 GiB and five times 1 GiB need more than the 1 TiB aperture
/// that 512 MiB of padding each would have fitted into. The guest showed it: scenario
/// `regressions/ovmf-switch-padding.toml` (the largest port's window was missing).
#[test]
fn ovmf_apertures_hold_a_256th_per_switch_downstream_port() {
    let sizes = [512, 256, 128, 64, 32, 16, 1, 1, 1, 1, 1];
    let devices: Vec<DeviceRequest> = sizes
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut d = DeviceRequest::ivshmem(&format!("d{i}"), g * GIB).unwrap();
            d.p2p_group = Some("g".into());
            d
        })
        .collect();
    let request = PlanRequest::default().with_mode(Mode::SwitchPort).with_devices(devices);
    let plan = plan(&Q35::ovmf(), &request).unwrap();
    let downstream = plan.ports.iter().filter(|p| p.kind == PortKind::Downstream).count();
    assert_eq!(downstream, sizes.len());
    let aperture = plan.address.mmio64_aperture.unwrap().size;
    let windows: u64 = sizes.iter().map(|g| (g * GIB).max(aperture / 256)).sum();
    assert!(windows <= aperture, "{} GiB of windows in a {} GiB aperture", windows / GIB, aperture / GIB);
}

/// Under SeaBIOS from 1.16.3 on, a plan whose windows would fit the 32-bit hole only at
/// their exact sizes is not given the slack sizes that then no longer fit there: the
/// firmware would put those at the end of a width the plan did not lay out (random seed
/// 6024: a 512 MiB BAR's window inside QEMU's HT hole, "can't assign; no space").
#[test]
fn end_of_space_firmware_gets_a_width_it_trusts_or_windows_that_fit_low() {
    for generation in [FirmwareGeneration::SeaBiosEndOfSpace, FirmwareGeneration::SeaBiosEndOfSpaceCapped] {
        let platform = Q35::for_generation(generation, "").unwrap();
        let devices = vec![
            DeviceRequest::ivshmem("d2", 512 * MIB).unwrap(),
            DeviceRequest::ivshmem("d4", MIB).unwrap(),
        ];
        let p =
            plan(&platform, &PlanRequest::default().with_mode(Mode::RootPort).with_devices(devices)).unwrap();
        let windows: u64 =
            p.ports.iter().map(|port| port.reservation.mem.size + port.reservation.pref.size).sum();
        let low = windows <= p.platform.mmio32.size;
        let trusted = p.address.phys_bits_needed >= pcie_topology::TRUSTED_PHYS_BITS;
        assert!(
            low != trusted,
            "{generation:?}: {} MiB of windows, phys-bits {}",
            windows / MIB,
            p.address.phys_bits_needed
        );
    }
}

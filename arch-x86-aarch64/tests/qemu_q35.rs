//! The q35 plans, started in the real `qemu-system-x86_64` under SeaBIOS and OVMF.
//!
//! The firmware runs (no `-S`, no guest kernel), programs bus numbers and bridge windows,
//! and the test reads them back with `query-pci`: every port where the plan put it, bus
//! numbers as predicted, and every spare port's real window able to take its profile's
//! BARs at their natural alignment — the guarantee the planner makes. Then the plan's
//! hotplug actions are sent as they are and QEMU must accept them and show each function
//! at its predicted address with the expected BAR sizes. Functions without a PCI Express
//! capability go on root ports like any other; a device that asks for a conventional bus
//! goes behind a `pcie-pci-bridge`, whose real windows must hold what the plan counts on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use arch_x86_aarch64::Q35;
use common::{assert_windows_hold, find, require, PciDev, Qemu};
use pcie_topology::plan::{GuestLocation, Port};
use pcie_topology::request::FunctionRequest;
use pcie_topology::units::{GIB, MIB};
use pcie_topology::{
    plan, Attach, DeviceRequest, HotplugProfile, Mode, Plan, PlanRequest, Platform, PortKind, QemuId,
    SpareRequest,
};
use pcilibs::requirement::Resource;
use serde_json::{json, Value};

fn mixed_request() -> PlanRequest {
    let gpu = DeviceRequest::ivshmem("gpu0", 128 * GIB).unwrap();
    let mf_id = QemuId::new("mf0").unwrap();
    let mut mf = DeviceRequest::new(
        mf_id.clone(),
        vec![
            FunctionRequest::ivshmem(0, &mf_id, GIB).unwrap(),
            FunctionRequest::ivshmem(1, &mf_id, GIB).unwrap(),
        ],
    );
    mf.cold_plug = true;
    let mut p0a = DeviceRequest::ivshmem("p0a", 16 * GIB).unwrap();
    p0a.p2p_group = Some("g0".into());
    let mut p0b = DeviceRequest::ivshmem("p0b", 16 * GIB).unwrap();
    p0b.p2p_group = Some("g0".into());
    p0b.cold_plug = true;
    PlanRequest::default().with_mode(Mode::SwitchPort).with_devices(vec![gpu, mf, p0a, p0b]).with_spares(
        vec![
            SpareRequest::new(HotplugProfile::h100(), 2),
            SpareRequest::new(HotplugProfile::h100(), 1).with_p2p_group("g0"),
        ],
    )
}

fn start(plan: &Plan) -> Qemu {
    require("qemu-system-x86_64", "qemu-system-x86");
    let mut args = plan.qemu_args();
    args.extend(["-accel".into(), "tcg".into(), "-m".into(), "512".into()]);
    let bits = plan.address.phys_bits_needed.max(40);
    args.extend(["-cpu".into(), format!("max,phys-bits={bits}")]);
    Qemu::start("qemu-system-x86_64", &args)
}

/// Asserts that the bridge `id` sits at `port`'s planned address with its planned bus
/// numbers; returns its bridge registers.
fn assert_port_placed(devs: &[PciDev], id: &str, port: &Port) -> common::Bridge {
    let got = find(devs, id);
    let b = got.bridge.unwrap();
    assert_eq!(
        (got.bus, got.slot, got.function),
        (port.bdf.bus(), port.bdf.device(), port.bdf.function()),
        "{}",
        port.id
    );
    assert_eq!(
        (b.secondary, b.subordinate),
        (port.secondary_bus, port.subordinate_bus),
        "{} bus numbers",
        port.id
    );
    b
}

/// Firmware programmed every port of the plan.
fn programmed(plan: &Plan) -> impl Fn(&[PciDev]) -> bool + '_ {
    move |devs: &[PciDev]| {
        plan.ports.iter().filter_map(|p| p.device.as_ref()).all(|d| {
            devs.iter().any(|x| {
                x.id == d.id.as_str() && x.bridge.is_some_and(|b| b.secondary != 0 && b.pref.1 > b.pref.0)
            })
        })
    }
}

/// `firmware_enables_bars`: SeaBIOS turns on memory decoding of every device, so
/// `query-pci` shows BAR addresses; OVMF leaves decoding off for devices it has no driver
/// for, and `query-pci` shows them unmapped until the guest OS enables them.
fn check_boot_topology(plan: &Plan, qemu: &Qemu, timeout: Duration, firmware_enables_bars: bool) {
    let peripherals = qemu.peripherals();
    for id in plan.ids_in_use().filter(|id| {
        !plan.devices.iter().any(|d| !d.cold_plug && d.functions.iter().any(|f| f.device.id.as_str() == *id))
    }) {
        let is_object = plan
            .devices
            .iter()
            .flat_map(|d| d.objects.iter())
            .chain(plan.ports.iter().filter_map(|p| p.placeholder.as_ref()).flat_map(|p| p.objects.iter()))
            .any(|o| o.id.as_str() == id);
        if !is_object {
            assert!(peripherals.iter().any(|p| p == id), "{id} not in /machine/peripheral: {peripherals:?}");
        }
    }
    let devs = qemu.wait_pci(timeout, programmed(plan));
    for port in &plan.ports {
        let Some(dev) = &port.device else { continue };
        let b = assert_port_placed(&devs, dev.id.as_str(), port);
        assert_windows_hold(plan, port, b);
    }
    for d in plan.devices.iter().filter(|d| d.cold_plug) {
        for f in &d.functions {
            let got = find(&devs, f.device.id.as_str());
            let bdf = f.location.bdf().unwrap();
            assert_eq!((got.bus, got.slot, got.function), (bdf.bus(), bdf.device(), bdf.function()));
            if firmware_enables_bars {
                assert!(
                    got.regions.iter().all(|r| r.1 >= 0),
                    "{} has unassigned BARs: {:?}",
                    f.device.id,
                    got.regions
                );
            }
        }
    }
}

fn hotplug_all(plan: &Plan, qemu: &Qemu) {
    let mut plugged = Vec::new();
    for action in plan.hotplug_actions().unwrap() {
        if let Some(rm) = &action.remove_placeholder {
            // Without a guest OS the unplug never completes; QEMU must accept the request.
            for id in &rm.device_del {
                qemu.ok("device_del", json!({"id": id.as_str()}));
            }
            continue;
        }
        for o in &action.object_add {
            qemu.ok("object-add", Value::Object(o.to_qmp()));
        }
        for f in &action.functions {
            for c in &f.companions {
                qemu.ok("device_add", Value::Object(c.to_qmp()));
            }
            qemu.ok("device_add", Value::Object(f.device_add.to_qmp()));
        }
        let devs = qemu.pci_devices();
        for f in &action.functions {
            let got = find(&devs, f.id().as_str());
            let GuestLocation::Pci { bdf, .. } = &f.guest else { panic!("not PCI") };
            assert_eq!(
                (got.bus, got.slot, got.function),
                (bdf.bus(), bdf.device(), bdf.function()),
                "{}",
                f.id()
            );
            let mut want: Vec<u64> = f.bars.iter().map(|b| b.size).collect();
            let mut have: Vec<u64> = got.regions.iter().map(|r| r.2).collect();
            want.sort_unstable();
            have.sort_unstable();
            assert_eq!(want, have, "{} BAR sizes", f.id());
        }
        plugged.push(action.device.to_string());
    }
    let peripherals = qemu.peripherals();
    for id in &plugged {
        assert!(peripherals.iter().any(|p| p == id), "{id} missing after hotplug");
    }
}

#[test]
fn seabios_accepts_plan_and_windows_fit() {
    let platform = Q35::seabios();
    let plan = plan(&platform, &mixed_request()).unwrap();
    let qemu = start(&plan);
    check_boot_topology(&plan, &qemu, Duration::from_secs(60), true);
    hotplug_all(&plan, &qemu);
    assert!(qemu.stderr().is_empty() || !qemu.stderr().contains("Error"), "{}", qemu.stderr());
}

/// The plans for the SeaBIOS generation of the tests' own image (read from it: 1.16.3 and
/// 1.17.0 lay the windows out from the end of the address space, and the planner sizes
/// each spare for where its window lands), under that firmware: the mixed request, and
/// four H100 spares whose windows must hold an H100 where the firmware really put them
/// (at the guest kernel's first-fit assignment).
#[test]
fn seabios_generation_of_the_image_accepts_plan_and_windows_fit() {
    let image = common::firmware("/usr/share/seabios/bios-256k.bin");
    require(&image, "seabios");
    let platform = Q35::detect(std::path::Path::new(&image)).unwrap();
    println!("{image}: {}", platform.generation);
    // Root ports only: the stacks' newer QEMU builds may lack `qxl`, which switch
    // placeholders use.
    let mixed = plan(&platform, &mixed_request().with_mode(Mode::RootPort)).unwrap();
    let qemu = start(&mixed);
    check_boot_topology(&mixed, &qemu, Duration::from_secs(60), true);
    hotplug_all(&mixed, &qemu);
    drop(qemu);
    let spares = PlanRequest::default().with_spares(vec![SpareRequest::new(HotplugProfile::h100(), 4)]);
    let plan = plan(&platform, &spares).unwrap();
    let qemu = start(&plan);
    let devs =
        qemu.wait_pci(Duration::from_secs(60), |d| d.iter().filter(|p| p.bridge.is_some()).count() >= 4);
    for port in plan.ports.iter().filter(|p| p.profile.is_some()) {
        let bridge = assert_port_placed(&devs, port.id.as_str(), port);
        assert_windows_hold(&plan, port, bridge);
        println!("{}: pref {:#x?}, reserved {:#x}", port.id, bridge.pref, port.reservation.pref.size);
    }
}

#[test]
fn ovmf_accepts_plan_and_windows_fit() {
    let platform = common::q35_ovmf();
    let plan = plan(&platform, &mixed_request()).unwrap();
    assert_eq!(platform.spec().name, "q35-ovmf");
    assert!(plan.extra.qemu.iter().any(|a| a.starts_with("name=opt/ovmf/X-PciMmio64Mb")), "{:?}", plan.extra);
    let qemu = start(&plan);
    check_boot_topology(&plan, &qemu, Duration::from_secs(240), false);
    hotplug_all(&plan, &qemu);
}

/// `ivshmem-plain` is conventional PCI (no PCI Express capability), as QEMU builds it.
fn conventional_ivshmem(id: &str, size: u64) -> DeviceRequest {
    let mut d = DeviceRequest::ivshmem(id, size).unwrap();
    d.functions[0].pcie = false;
    d
}

/// Conventional devices on root ports (one hotplugged with a 32 GiB BAR, one at boot) and
/// a small device that asks for a conventional bus, hotplugged behind the bridge.
fn conventional_request() -> PlanRequest {
    let mut cold = conventional_ivshmem("conv1", GIB);
    cold.cold_plug = true;
    let mut legacy = conventional_ivshmem("legacy0", MIB);
    legacy.attach = Attach::PciBridge;
    PlanRequest::default().with_devices(vec![conventional_ivshmem("conv0", 32 * GIB), cold, legacy])
}

fn conventional_devices(platform: Q35, timeout: Duration, firmware_enables_bars: bool) {
    let plan = plan(&platform, &conventional_request()).unwrap();
    let kind = |id: &str| plan.port(plan.device(id).unwrap().port.as_ref().unwrap().as_str()).unwrap().kind;
    assert_eq!(
        (kind("conv0"), kind("conv1"), kind("legacy0")),
        (PortKind::Root, PortKind::Root, PortKind::BridgeSlot)
    );
    let qemu = start(&plan);
    // Root ports where planned, their windows holding the conventional devices' BARs.
    check_boot_topology(&plan, &qemu, timeout, firmware_enables_bars);
    // The bridge where planned, and its real memory window at least what the plan counts
    // on for everything behind it (prefetchable BARs included: not every firmware opens a
    // prefetchable window on an empty bridge).
    let devs = qemu.pci_devices();
    let br = &plan.bridges[0];
    let got = find(&devs, br.id.as_str());
    assert_eq!((got.bus, got.slot, got.function), (br.bdf.bus(), br.bdf.device(), br.bdf.function()));
    let b = got.bridge.unwrap();
    assert_eq!(b.secondary, br.secondary_bus);
    let mem = (b.mem.1 + 1).saturating_sub(b.mem.0);
    assert!(
        mem >= br.mem.size,
        "{}: firmware gave a {mem:#x} memory window, the plan counts on {:?}",
        br.id,
        br.mem
    );
    let behind: Vec<Resource> = plan.device("legacy0").unwrap().functions[0]
        .bars
        .iter()
        .map(|bar| Resource::bar(bar.kind, false, bar.size))
        .collect();
    let no_pref = common::Bridge { pref: (0, 0), ..b };
    assert!(no_pref.fits(&behind), "{}: {behind:?} does not fit memory window {:#x?}", br.id, b.mem);
    // QEMU takes each device on its planned port or bridge slot.
    hotplug_all(&plan, &qemu);
}

#[test]
fn seabios_conventional_devices_on_root_ports_and_behind_a_bridge() {
    conventional_devices(Q35::seabios(), Duration::from_secs(60), true);
}

#[test]
fn ovmf_conventional_devices_on_root_ports_and_behind_a_bridge() {
    conventional_devices(common::q35_ovmf(), Duration::from_secs(240), false);
}

#[test]
fn seabios_without_reservations_cannot_fit_a_128g_bar() {
    // The failure the planner prevents: the machine's defaults give an empty root port a
    // 2 MiB prefetchable window, which no 128 GiB BAR fits.
    let mut request = mixed_request();
    request.options.size_reservations = false;
    request.mode = Mode::RootPort;
    request.spares.truncate(1);
    let plan = plan(&Q35::seabios(), &request).unwrap();
    let qemu = start(&plan);
    let devs = qemu.wait_pci(Duration::from_secs(60), programmed(&plan));
    let spare = plan.ports.iter().find(|p| p.profile.is_some()).unwrap();
    let b = find(&devs, spare.id.as_str()).bridge.unwrap();
    let h100: Vec<_> = HotplugProfile::h100().resources.iter().map(|r| r.resource).collect();
    assert!(!b.fits(&h100));
}

#[test]
fn seabios_numa_expanders_number_buses_as_predicted() {
    numa_expanders(Q35::seabios());
}

#[test]
fn ovmf_numa_expanders_number_buses_as_predicted() {
    numa_expanders(common::q35_ovmf());
}

fn numa_expanders(platform: Q35) {
    let mut devices = Vec::new();
    for (i, node) in [0u32, 1, 1].iter().enumerate() {
        let mut d = DeviceRequest::ivshmem(&format!("n{i}"), 4 * GIB).unwrap();
        d.numa_node = Some(*node);
        d.cold_plug = i == 2;
        devices.push(d);
    }
    let mut request = PlanRequest::default().with_mode(Mode::Numa).with_devices(devices).with_spares(vec![
        SpareRequest::new(HotplugProfile::a100(), 1).with_numa_node(0),
        SpareRequest::new(HotplugProfile::nic(), 2),
    ]);
    request.options.spare_bus_reserve = 2;
    let plan = plan(&platform, &request).unwrap();
    assert_eq!(plan.host_bridges.len(), 3);
    let qemu = {
        require("qemu-system-x86_64", "qemu-system-x86");
        let mut args = plan.qemu_args();
        args.extend(["-accel", "tcg", "-m", "512", "-smp", "2"].map(String::from));
        for node in 0..2 {
            args.extend([
                "-object".to_string(),
                format!("memory-backend-ram,id=numa{node},size=256M"),
                "-numa".to_string(),
                format!("node,nodeid={node},cpus={node},memdev=numa{node}"),
            ]);
        }
        args.extend(["-cpu".into(), format!("max,phys-bits={}", plan.address.phys_bits_needed.max(40))]);
        Qemu::start("qemu-system-x86_64", &args)
    };
    let devs = qemu.wait_pci(Duration::from_secs(240), programmed(&plan));
    for port in &plan.ports {
        assert_port_placed(&devs, port.id.as_str(), port);
    }
    // Expander ports carry their root bus in the path; the cold device sits where predicted.
    let cold = plan.device("n2").unwrap();
    let f = &cold.functions[0];
    let got = find(&devs, "n2");
    assert_eq!((got.bus, got.slot), (f.location.bdf().unwrap().bus(), 0));
    assert!(f.location.path().unwrap().root_bus.is_some());
    hotplug_all(&plan, &qemu);
}

//! `DeviceRequest::from_action` on actions of real plans (q35 with SeaBIOS, s390x).

use arch_s390x_ccw::{S390xCcw, S390xDevice};
use arch_x86_aarch64::Q35;
use pcie_topology::plan::{GuestLocation, HotplugAction, Mode, PlanRequest};
use pcie_topology::{DeviceRequest as PlannedDevice, FunctionRequest as PlannedFunction, Plan, QemuId};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;

use super::*;

const GIB: u64 = 1 << 30;

fn plan_q35(mode: Mode, devices: Vec<PlannedDevice>) -> Plan {
    let request = PlanRequest { mode, devices, ..PlanRequest::default() };
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

fn action(plan: &Plan, device: &str) -> HotplugAction {
    plan.hotplug_action(device).unwrap()
}

/// e1000e's BARs (QEMU 7.2): two 128 KiB memory BARs, 32 bytes of I/O, 16 KiB.
fn e1000e(function: u8) -> PlannedFunction {
    let bar = |kind, size| Resource::bar(kind, false, size);
    PlannedFunction::new(
        function,
        "e1000e",
        vec![
            bar(BarKind::Mem32, 128 << 10),
            bar(BarKind::Mem32, 128 << 10),
            bar(BarKind::Io, 32),
            bar(BarKind::Mem32, 16 << 10),
        ],
    )
}

fn pci(f: &FunctionRequest) -> &PciExpectation {
    match &f.expect {
        Expectation::Pci(p) => p,
        other => panic!("{} expected as {other:?}", f.id()),
    }
}

/// Each function's expectation is the plan's place for it, with the plan's BAR sizes.
fn assert_pci_as_planned(request: &DeviceRequest, action: &HotplugAction) {
    for fa in &action.functions {
        let f = request.functions.iter().find(|f| f.id() == fa.id.as_str()).unwrap();
        assert_eq!(f.qdev, fa.device_add);
        let GuestLocation::Pci { bdf, .. } = &fa.guest else { panic!("{} not on PCI", fa.id) };
        let want = pci(f);
        assert_eq!(
            (want.bus, want.slot, want.function),
            (Some(bdf.bus), Some(bdf.devfn.slot), Some(bdf.devfn.function)),
            "{}",
            fa.id
        );
        let sizes: Vec<u64> = fa.bars.iter().map(|b| b.size).collect();
        assert!(!sizes.is_empty(), "{} has BARs in the plan", fa.id);
        assert_eq!(want.bars, sizes.iter().map(|s| BarExpectation::any(*s)).collect::<Vec<_>>());
    }
}

#[test]
fn root_port_device_with_its_memory_backend() {
    let plan = plan_q35(Mode::RootPort, vec![PlannedDevice::ivshmem("gpu0", 32 * GIB).unwrap()]);
    let a = action(&plan, "gpu0");
    let mut r = DeviceRequest::from_action(&a).unwrap();
    assert_eq!(Some(r.port.as_str()), a.port.as_ref().map(QemuId::as_str));
    assert!(plan.port(&r.port).is_some(), "the port exists in the plan");
    assert_eq!(r.functions.len(), 1);
    assert_pci_as_planned(&r, &a);
    assert_eq!(pci(&r.functions[0]).bars, [BarExpectation::any(256), BarExpectation::any(32 * GIB)]);
    // The ivshmem's memory backend, created before the device.
    assert_eq!(r.objects.len(), 1);
    assert_eq!(Some(r.objects[0].arguments()), a.object_add.first().cloned().map(Value::Object));
    assert_eq!(r.functions[0].prop("memdev"), Some(r.objects[0].id.as_str()));
    assert!(r.placeholder.is_none() && r.fds.is_empty());
    assert_eq!(r.prepare().unwrap().order, [0]);
}

#[test]
fn switch_port_with_placeholder() {
    // Two devices of one peer-to-peer group share a switch.
    let gpus = ["gpu0", "gpu1"].map(|id| {
        let mut d = PlannedDevice::ivshmem(id, 32 * GIB).unwrap();
        d.p2p_group = Some("p2p0".into());
        d
    });
    let plan = plan_q35(Mode::SwitchPort, gpus.to_vec());
    let a = action(&plan, "gpu0");
    let rm = a.remove_placeholder.as_ref().expect("the plan puts a placeholder on the downstream port");
    assert!(!rm.device_del.is_empty());
    let mut r = DeviceRequest::from_action(&a).unwrap();
    let port = a.port.as_ref().unwrap();
    assert_eq!(r.port, port.as_str());
    assert_eq!(plan.port(port.as_str()).unwrap().kind, pcie_topology::plan::PortKind::Downstream);
    let ph = r.placeholder.clone().unwrap();
    assert_eq!(ph.devices, rm.device_del.iter().map(ToString::to_string).collect::<Vec<_>>());
    assert_eq!(ph.objects, rm.object_del.iter().map(ToString::to_string).collect::<Vec<_>>());
    assert_pci_as_planned(&r, &a);
    // The engine accepts it (placeholder ids differ from the device's).
    r.prepare().unwrap();
    assert_eq!(r.device_ids().last(), ph.devices.last().map(String::as_str));
}

#[test]
fn multi_function_device_plugs_function_zero_last() {
    let nic = PlannedDevice::new(QemuId::new("nic0").unwrap(), vec![e1000e(0), e1000e(1), e1000e(2)]);
    let plan = plan_q35(Mode::RootPort, vec![nic]);
    let a = action(&plan, "nic0");
    let mut r = DeviceRequest::from_action(&a).unwrap();
    assert_eq!(r.functions.len(), 3);
    assert_pci_as_planned(&r, &a);
    let by_function: Vec<Option<u8>> = r.functions.iter().map(|f| pci(f).function).collect();
    assert_eq!(by_function, [Some(2), Some(1), Some(0)], "the plan's order, function 0 last");
    let order = r.prepare().unwrap().order;
    let plugged: Vec<Option<u8>> = order.iter().map(|&i| pci(&r.functions[i]).function).collect();
    assert_eq!(plugged.last(), Some(&Some(0)), "engine order {plugged:?}");
    assert!(r.functions.iter().all(|f| f.prop("multifunction") == Some("on")));
    let bars = &pci(&r.functions[0]).bars;
    let e1000e = [128 << 10, 128 << 10, 32, 16 << 10].map(BarExpectation::any);
    assert_eq!(bars, &e1000e);
}

#[test]
fn s390x_ccw_and_zpci_with_companions_first() {
    let virtio_bars =
        vec![Resource::bar(BarKind::Mem32, false, 4 << 10), Resource::bar(BarKind::Mem64, true, 16 << 10)];
    let devices = [
        S390xDevice::ccw(QemuId::new("net1").unwrap(), "virtio-net-ccw"),
        S390xDevice::Zpci {
            id: QemuId::new("nic1").unwrap(),
            driver: "virtio-net-pci".into(),
            props: Default::default(),
            host: None,
            resources: virtio_bars,
        },
    ];
    let plan = arch_s390x_ccw::plan(&S390xCcw::default(), &devices, false).unwrap();

    let a = action(&plan, "net1");
    assert!(a.port.is_none());
    let mut ccw = DeviceRequest::from_action(&a).unwrap();
    assert_eq!(ccw.port, "net1", "no port on s390x: the device id");
    assert!(matches!(a.functions[0].guest, GuestLocation::Ccw { .. }));
    assert_eq!(ccw.functions.len(), 1);
    assert_eq!(ccw.functions[0].qdev, a.functions[0].device_add);
    assert_eq!(ccw.functions[0].expect, Expectation::Present);
    assert!(ccw.functions[0].prop("devno").is_some());
    assert_eq!(ccw.prepare().unwrap().order, [0]);

    let a = action(&plan, "nic1");
    let mut zpci = DeviceRequest::from_action(&a).unwrap();
    assert_eq!(zpci.port, "nic1");
    let f = &a.functions[0];
    assert!(matches!(f.guest, GuestLocation::Zpci { .. }));
    assert_eq!(f.companions.len(), 1);
    let drivers: Vec<&str> = zpci.functions.iter().map(FunctionRequest::driver).collect();
    assert_eq!(drivers, ["zpci", "virtio-net-pci"], "the zpci device first");
    assert_eq!(zpci.functions[0].prop("target"), Some("nic1"));
    assert_eq!(zpci.functions[0].qdev, f.companions[0]);
    assert_eq!(zpci.functions[1].qdev, f.device_add);
    // QEMU's address of a zPCI function is not the guest's: present is what is checked.
    assert!(zpci.functions.iter().all(|f| f.expect == Expectation::Present));
    assert_eq!(zpci.prepare().unwrap().order, [0, 1]);
}

#[test]
fn object_without_id_is_an_error() {
    let plan = plan_q35(Mode::RootPort, vec![PlannedDevice::ivshmem("gpu0", GIB).unwrap()]);
    let mut a = action(&plan, "gpu0");
    a.object_add[0].remove("id");
    match DeviceRequest::from_action(&a) {
        Err(RequestError::BadObject { device, object }) => {
            assert_eq!(device, "gpu0");
            assert!(object.contains("memory-backend"), "{object}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rom_is_expected_at_its_index() {
    let b =
        |rom| pcie_topology::plan::ExpectedBar { kind: BarKind::Mem32, prefetchable: false, rom, size: 4096 };
    assert_eq!(BarExpectation::from(&b(true)), BarExpectation::at(BarExpectation::ROM, 4096));
    assert_eq!(BarExpectation::from(&b(false)), BarExpectation::any(4096));
}

//! `PlugRequest::from_action` on actions of real plans (q35 with SeaBIOS, s390x).

use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::Q35;
use pcie_topology::plan::{ExpectedBar, GuestLocation, HotplugAction, Mode, PlanRequest};
use pcie_topology::{DeviceRequest, FunctionRequest, FunctionResource, Plan, QemuId, ResourceRole};
use pcilibs::bar::BarKind;
use pcilibs::facts::ResourceOptions;

use super::*;

const GIB: u64 = 1 << 30;

fn plan_q35(mode: Mode, devices: Vec<DeviceRequest>) -> Plan {
    let request = PlanRequest::default().with_mode(mode).with_devices(devices);
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

fn action(plan: &Plan, device: &str) -> HotplugAction {
    plan.hotplug_action(device).unwrap()
}

/// e1000e's BARs (QEMU 7.2): two 128 KiB memory BARs, 32 bytes of I/O, 16 KiB, at 0–3.
fn e1000e(function: u8) -> FunctionRequest {
    let bar = |index, kind, size| FunctionResource::bar(index, kind, false, size);
    FunctionRequest::new(
        function,
        "e1000e",
        vec![
            bar(0, BarKind::Mem32, 128 << 10),
            bar(1, BarKind::Mem32, 128 << 10),
            bar(2, BarKind::Io, 32),
            bar(3, BarKind::Mem32, 16 << 10),
        ],
    )
}

fn pci(f: &PlugFunction) -> &PciExpectation {
    match &f.expect {
        Expectation::Pci(p) => p,
        other => panic!("{} expected as {other:?}", f.id()),
    }
}

/// Each function's expectation is the plan's place for it, with each of the plan's BARs
/// at its index (these plans know every index).
fn assert_pci_as_planned(request: &PlugRequest, action: &HotplugAction) {
    for fa in &action.functions {
        let f = request.functions.iter().find(|f| f.id() == fa.id()).unwrap();
        assert_eq!(f.qmp_arguments(), fa.device_add.to_qmp());
        let GuestLocation::Pci { bdf, .. } = &fa.guest else { panic!("{} not on PCI", fa.id()) };
        let want = pci(f);
        assert_eq!(
            (want.bus, want.slot, want.function),
            (Some(bdf.bus()), Some(bdf.device()), Some(bdf.function())),
            "{}",
            fa.id()
        );
        assert!(!fa.bars.is_empty(), "{} has BARs in the plan", fa.id());
        let at: Vec<BarExpectation> =
            fa.bars.iter().map(|b| BarExpectation::at(b.index.unwrap(), b.size)).collect();
        assert_eq!(want.bars, at);
    }
}

#[test]
fn root_port_device_with_its_memory_backend() {
    let plan = plan_q35(Mode::RootPort, vec![DeviceRequest::ivshmem("gpu0", 32 * GIB).unwrap()]);
    let a = action(&plan, "gpu0");
    let mut r = PlugRequest::from_action(&a);
    assert_eq!(Some(&r.port), a.port.as_ref());
    assert_eq!(r.device, a.device);
    assert!(plan.port(r.port.as_str()).is_some(), "the port exists in the plan");
    assert_eq!(r.functions.len(), 1);
    assert_pci_as_planned(&r, &a);
    assert_eq!(pci(&r.functions[0]).bars, [BarExpectation::at(0, 256), BarExpectation::at(2, 32 * GIB)]);
    // What the live-window check places: the two BARs with their kinds.
    let needs: Vec<(bool, u64)> = r.functions[0].needs.iter().map(|n| (n.prefetchable, n.size)).collect();
    assert_eq!(needs, [(false, 256), (true, 32 * GIB)]);
    // The ivshmem's memory backend, created before the device.
    assert_eq!(r.objects.len(), 1);
    assert_eq!(r.objects, a.object_add);
    assert_eq!(r.functions[0].device.props["memdev"], PropValue::Str(r.objects[0].id.to_string()));
    assert!(r.placeholder.is_none() && r.fds.is_empty());
    assert_eq!(r.prepare().unwrap().order, [0]);
}

#[test]
fn switch_port_with_placeholder() {
    // Two devices of one peer-to-peer group share a switch.
    let gpus = ["gpu0", "gpu1"].map(|id| {
        let mut d = DeviceRequest::ivshmem(id, 32 * GIB).unwrap();
        d.p2p_group = Some("p2p0".into());
        d
    });
    let plan = plan_q35(Mode::SwitchPort, gpus.to_vec());
    let a = action(&plan, "gpu0");
    let rm = a.remove_placeholder.as_ref().expect("the plan puts a placeholder on the downstream port");
    assert!(!rm.device_del.is_empty());
    let mut r = PlugRequest::from_action(&a);
    let port = a.port.as_ref().unwrap();
    assert_eq!(&r.port, port);
    assert_eq!(plan.port(port.as_str()).unwrap().kind, pcie_topology::plan::PortKind::Downstream);
    let ph = r.placeholder.clone().unwrap();
    assert_eq!(ph.devices, rm.device_del);
    assert_eq!(ph.objects, rm.object_del);
    assert_pci_as_planned(&r, &a);
    // The engine accepts it (placeholder ids differ from the device's).
    r.prepare().unwrap();
    assert_eq!(r.device_ids().last(), ph.devices.last());
}

#[test]
fn multi_function_device_plugs_function_zero_last() {
    let nic = DeviceRequest::new(QemuId::new("nic0").unwrap(), vec![e1000e(0), e1000e(1), e1000e(2)]);
    let plan = plan_q35(Mode::RootPort, vec![nic]);
    let a = action(&plan, "nic0");
    let mut r = PlugRequest::from_action(&a);
    assert_eq!(r.functions.len(), 3);
    assert_pci_as_planned(&r, &a);
    let by_function: Vec<Option<u8>> = r.functions.iter().map(|f| pci(f).function).collect();
    assert_eq!(by_function, [Some(2), Some(1), Some(0)], "the plan's order, function 0 last");
    let order = r.prepare().unwrap().order;
    let plugged: Vec<Option<u8>> = order.iter().map(|&i| pci(&r.functions[i]).function).collect();
    assert_eq!(plugged.last(), Some(&Some(0)), "engine order {plugged:?}");
    assert!(r.functions.iter().all(|f| f.device.multifunction));
    let bars = &pci(&r.functions[0]).bars;
    let e1000e =
        [(0, 128 << 10), (1, 128 << 10), (2, 32), (3, 16 << 10)].map(|(i, size)| BarExpectation::at(i, size));
    assert_eq!(bars, &e1000e);
}

#[test]
fn s390x_ccw_and_zpci_with_companions_first() {
    // virtio-net-pci: MSI-X table at BAR 1, the modern interface at BAR 4.
    let virtio_bars = vec![
        FunctionResource::bar(1, BarKind::Mem32, false, 4 << 10),
        FunctionResource::bar(4, BarKind::Mem64, true, 16 << 10),
    ];
    let devices = vec![
        DeviceRequest::channel(QemuId::new("net1").unwrap(), "virtio-net-ccw", 0),
        DeviceRequest::new(
            QemuId::new("nic1").unwrap(),
            vec![FunctionRequest::new(0, "virtio-net-pci", virtio_bars)],
        ),
    ];
    let request = PlanRequest::default().with_devices(devices);
    let plan = pcie_topology::plan(&S390xCcw::default(), &request).unwrap();

    let a = action(&plan, "net1");
    assert!(a.port.is_none());
    let mut ccw = PlugRequest::from_action(&a);
    assert_eq!(ccw.port.as_str(), "net1", "no port on s390x: the device id");
    assert_eq!(ccw.device, ccw.port);
    assert!(matches!(a.functions[0].guest, GuestLocation::Ccw { .. }));
    assert_eq!(ccw.functions.len(), 1);
    assert_eq!(ccw.functions[0].device, a.functions[0].device_add);
    assert_eq!(ccw.functions[0].expect, Expectation::Present);
    assert!(ccw.functions[0].device.props.contains_key("devno"));
    assert_eq!(ccw.prepare().unwrap().order, [0]);

    let a = action(&plan, "nic1");
    let mut zpci = PlugRequest::from_action(&a);
    assert_eq!(zpci.port.as_str(), "nic1");
    assert_eq!(zpci.device.as_str(), "nic1");
    let f = &a.functions[0];
    assert!(matches!(f.guest, GuestLocation::Zpci { .. }));
    assert_eq!(f.companions.len(), 1);
    let drivers: Vec<&str> = zpci.functions.iter().map(|f| f.device.driver.as_str()).collect();
    assert_eq!(drivers, ["zpci", "virtio-net-pci"], "the zpci device first");
    assert_eq!(zpci.functions[0].device.props["target"], PropValue::Str("nic1".into()));
    assert_eq!(zpci.functions[0].device, f.companions[0]);
    assert_eq!(zpci.functions[1].device, f.device_add);
    // QEMU's address of a zPCI function is not the guest's: present is what is checked.
    // The zpci device is present; its function is in query-pci with the planned BARs at
    // any address (QEMU's address of a zPCI function is not the guest's).
    assert_eq!(zpci.functions[0].expect, Expectation::Present);
    let bars = vec![BarExpectation::at(1, 4 << 10), BarExpectation::at(4, 16 << 10)];
    assert_eq!(zpci.functions[1].expect, Expectation::Pci(PciExpectation::anywhere(bars)));
    let prepared = zpci.prepare().unwrap();
    assert_eq!(prepared.order, [0, 1]);
    // Expected anywhere: no slot of the request, so nothing multi-function about it.
    assert_eq!(prepared.pci, [None, None]);
    assert!(!zpci.functions[1].device.multifunction);
}

/// An action on the iommufd interface: the `iommufd` object before the devices, and the
/// `vfio-pci` functions (only they) pointing at it.
#[test]
fn iommufd_object_and_property_come_with_the_action() {
    let host = |function, bdf: &str| {
        let bar = FunctionResource::bar(0, BarKind::Mem64, false, 16 << 10);
        FunctionRequest::vfio(function, bdf.parse().unwrap(), vec![bar])
    };
    let d = DeviceRequest::new(
        QemuId::new("nvme0").unwrap(),
        vec![host(0, "0000:03:00.0"), host(1, "0000:03:00.1"), e1000e(2)],
    );
    let plan = plan_q35(Mode::RootPort, vec![d]);
    let id = QemuId::new("iommufd-nvme0").unwrap();
    let a = action(&plan, "nvme0").with_iommufd(id.clone(), None);
    let mut r = PlugRequest::from_action(&a);
    assert_eq!(r.objects.len(), 1);
    assert_eq!(
        Value::Object(r.objects[0].to_qmp()),
        serde_json::json!({"qom-type": "iommufd", "id": "iommufd-nvme0"})
    );
    let iommufd: Vec<(&str, Option<&PropValue>)> =
        r.functions.iter().map(|f| (f.device.driver.as_str(), f.device.props.get("iommufd"))).collect();
    let on = PropValue::Str("iommufd-nvme0".into());
    assert_eq!(iommufd, [("e1000e", None), ("vfio-pci", Some(&on)), ("vfio-pci", Some(&on))]);
    // The host functions are typed, and only there: `host=` is made from them.
    let hosts: Vec<Option<String>> =
        r.functions.iter().map(|f| f.host.as_ref().map(|h| format!("{h:?}"))).collect();
    assert_eq!(hosts.iter().filter(|h| h.is_some()).count(), 2, "{hosts:?}");
    assert!(r.functions.iter().all(|f| !f.device.props.contains_key("host")));
    let args: Vec<Option<Value>> =
        r.functions.iter().map(|f| f.qmp_arguments().get("host").cloned()).collect();
    assert_eq!(args, [None, Some("0000:03:00.1".into()), Some("0000:03:00.0".into())]);
    assert_eq!(a.object_del, [id]);
    r.prepare().unwrap();
    // With a descriptor QEMU is given instead of opening /dev/iommu itself.
    let a = action(&plan, "nvme0").with_iommufd(QemuId::new("fd0").unwrap(), Some("iommu-fd"));
    assert_eq!(PlugRequest::from_action(&a).objects[0].props["fd"], PropValue::Str("iommu-fd".into()));
}

#[test]
fn each_entry_is_expected_as_query_pci_shows_it() {
    let b = |index, role| {
        let mut r = FunctionResource::bar(2, BarKind::Mem64, true, 8 * GIB);
        (r.index, r.role) = (index, role);
        ExpectedBar::from(&r)
    };
    let planned = BarExpectation::planned;
    assert_eq!(planned(&b(Some(2), ResourceRole::Bar)), Some(BarExpectation::at(2, 8 * GIB)));
    // A resizable BAR shows its current size, not the maximum the plan made room for.
    let rebar = b(Some(2), ResourceRole::ResizableMax { current: 256 << 20 });
    assert_eq!(planned(&rebar), Some(BarExpectation::at(2, 256 << 20)));
    // VF apertures are the SR-IOV capability's, which QEMU hides: never expected.
    assert_eq!(planned(&b(Some(0), ResourceRole::VfAperture)), None);
    assert_eq!(planned(&b(None, ResourceRole::VfAperture)), None);
    // Without an index (a version 1 plan, a request of bare sizes): any BAR of the size;
    // the ROM has its own index in any case.
    assert_eq!(planned(&b(None, ResourceRole::Bar)), Some(BarExpectation::any(8 * GIB)));
    let mut rom = FunctionResource::rom(4096);
    rom.index = None;
    let rom = ExpectedBar::from(&rom);
    assert_eq!(planned(&rom), Some(BarExpectation::at(BarExpectation::ROM, 4096)));
}

/// A plan made from the facts of a real SR-IOV physical function, with room for its VFs'
/// BARs: QEMU 7.2's `nvme` with `sriov_max_vfs=4`, as a Linux 6.1 guest's sysfs shows it
/// (pcilibs' fixtures).
fn sriov_nvme_plan(opts: &ResourceOptions) -> Plan {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../pcilibs/tests/fixtures/qemu-x86_64/0000:06:00.0");
    let facts = pcilibs::sysfs::SysfsDevice::open_dir(dir)
        .and_then(|d| d.facts())
        .unwrap_or_else(|e| panic!("{dir}: {e} (the workspace's pcilibs fixtures are needed)"));
    assert_eq!(facts.sriov.as_ref().map(|s| s.total_vfs), Some(4));
    let nvme = DeviceRequest::from_facts(QemuId::new("nvme0").unwrap(), &[facts], opts).unwrap();
    let request = PlanRequest::default().with_devices(vec![nvme]);
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

#[test]
fn vf_apertures_are_planned_but_not_expected_and_bars_keep_their_index() {
    let opts = ResourceOptions::all();
    let plan = sriov_nvme_plan(&opts);
    let a = action(&plan, "nvme0");
    // The plan holds room for BAR 0 and for the 4 VFs' BAR 0.
    let roles: Vec<(Option<u8>, ResourceRole, u64)> =
        a.functions[0].bars.iter().map(|b| (b.index, b.role, b.size)).collect();
    assert_eq!(
        roles,
        [(Some(0), ResourceRole::Bar, 16 << 10), (Some(0), ResourceRole::VfAperture, 64 << 10)]
    );
    // query-pci will show BAR 0 of 16 KiB, nothing else: that is all that is expected.
    let r = PlugRequest::from_action(&a);
    assert_eq!(pci(&r.functions[0]).bars, [BarExpectation::at(0, 16 << 10)]);
    assert_eq!(r.functions[0].host, Some(HostRef::Pci(Bdf::parse("0000:06:00.0").unwrap())));
    assert_eq!(r.functions[0].qmp_arguments()["host"], "0000:06:00.0");
    // Nor does the live-window check count the VF aperture: VFs come later, in the guest.
    let needs: Vec<u64> = r.functions[0].needs.iter().map(|n| n.size).collect();
    assert_eq!(needs, [16 << 10]);
}

/// A plan for a guest that renumbers buses (`pci=assign-busses`): a device on a root port
/// is expected below that port at its slot and function, not at the firmware's bus
/// number; behind a switch, below its downstream port. Without the option the same
/// device is expected at its address.
#[test]
fn renumbering_guest_expects_a_place_in_the_tree() {
    let devices = || {
        let mut d = DeviceRequest::ivshmem("gpu0", 2 * GIB).unwrap();
        d.p2p_group = Some("p2p0".into());
        vec![d]
    };
    let mut request = PlanRequest::default().with_mode(Mode::RootPort).with_devices(devices());
    request.options.guest_renumbers_buses = true;
    let plan = pcie_topology::plan(&Q35::seabios(), &request).unwrap();
    let a = action(&plan, "gpu0");
    assert!(a.guest_renumbers_buses);
    let r = PlugRequest::from_action(&a);
    let want = pci(&r.functions[0]);
    assert_eq!(want.parent.as_ref(), a.port.as_ref(), "below the root port");
    assert_eq!((want.bus, want.slot, want.function), (None, Some(0), Some(0)));
    assert_eq!(want.bars, [BarExpectation::at(0, 256), BarExpectation::at(2, 2 * GIB)]);

    let mut request = PlanRequest::default().with_mode(Mode::SwitchPort).with_devices(devices());
    request.options.guest_renumbers_buses = true;
    let plan = pcie_topology::plan(&Q35::seabios(), &request).unwrap();
    let a = action(&plan, "gpu0");
    let r = PlugRequest::from_action(&a);
    let ds = plan.port(a.port.as_ref().unwrap().as_str()).unwrap();
    assert_eq!(ds.kind, pcie_topology::plan::PortKind::Downstream);
    assert_eq!(pci(&r.functions[0]).parent.as_ref(), Some(&ds.id));

    let plain = plan_q35(Mode::RootPort, devices());
    let a = action(&plain, "gpu0");
    let r = PlugRequest::from_action(&a);
    assert_eq!(pci(&r.functions[0]).parent, None);
    assert_pci_as_planned(&r, &a);
}

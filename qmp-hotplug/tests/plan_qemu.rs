//! A `pcie-topology` plan driven through the engine on real QEMU 7.2 (q35, SeaBIOS, no
//! guest OS): QEMU boots with the plan's ports, each hotplug action becomes a request with
//! `PlugRequest::from_action`, and the engine proves in `query-pci` that every function
//! sits where the plan put it with the plan's BAR sizes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use arch_x86_aarch64::Q35;
use common::{names, Hotplug, Qemu};
use pcie_topology::plan::GuestLocation;
use pcie_topology::{
    DeviceRequest, FunctionRequest, FunctionResource, Plan, PlanOptions, PlanRequest, QemuId, ResourceRole,
};
use pcilibs::bar::BarKind;
use pcilibs::facts::ResourceOptions;
use pcilibs::sysfs::SysfsDevice;
use qmp_hotplug::engine::{Engine, EngineError, EngineOptions, UnplugOutcome};
use qmp_hotplug::request::PlugRequest;
use qmp_hotplug::request::{BarExpectation, Expectation};
use qmp_hotplug::state::DeviceState;

/// QEMU's memory in the helper (`-m 128`).
const GUEST_RAM: u64 = 128 << 20;

/// An ivshmem with a 4 GiB BAR and a two-function e1000e, each on its own root port.
fn plan() -> Plan {
    let e1000e = |function| {
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
    };
    let nic = DeviceRequest::new(QemuId::new("nic0").unwrap(), vec![e1000e(0), e1000e(1)]);
    let request = PlanRequest::default()
        .with_devices(vec![DeviceRequest::ivshmem("gpu0", 4 << 30).unwrap(), nic])
        .with_options({
            let mut o = PlanOptions::default();
            o.guest_ram = GUEST_RAM;
            o
        });
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

fn start(plan: &Plan) -> (Qemu, Arc<qmp_hotplug::QmpClient>) {
    start_with(plan, &[])
}

fn start_with(plan: &Plan, extra: &[&str]) -> (Qemu, Arc<qmp_hotplug::QmpClient>) {
    let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    args.extend(plan.device_args());
    args.extend(plan.extra.qemu.iter().cloned());
    if let Some(bits) = plan.cpu_phys_bits() {
        args.extend(["-cpu".into(), format!("max,phys-bits={bits}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Native PCIe hotplug: with no guest OS, device_del completes at once.
    let q = Qemu::q35_with(0, Hotplug::Native, &args);
    let c = q.connect();
    q.wait_firmware(&c, plan.ports.len());
    (q, Arc::new(c))
}

fn opts() -> EngineOptions {
    common::unplug_after(Duration::from_secs(20))
}

#[test]
fn every_action_is_visible_where_planned_and_leaves_again() {
    let plan = plan();
    let (_q, c) = start(&plan);
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    let actions = plan.hotplug_actions().unwrap();
    assert_eq!(actions.len(), 2);
    for action in &actions {
        let request = PlugRequest::from_action(action);
        let port = request.port.to_string();
        let rec = engine.plug(request).unwrap();
        assert_eq!(rec.state, DeviceState::Visible, "{}", action.device);
        for f in &action.functions {
            let GuestLocation::Pci { bdf, .. } = &f.guest else { panic!("{} not on PCI", f.id()) };
            assert_eq!(rec.guest_address(f.id().as_str()), Some(*bdf), "the planned address, typed alike");
        }
        // Unplugged by the id the plan releases it by.
        assert_eq!(engine.unplug(action.device.as_str()).unwrap(), UnplugOutcome::Removed);
        let left = names(&c, "/machine/peripheral");
        assert!(action.functions.iter().all(|f| !left.contains(f.id().as_str())), "{left:?}");
        assert!(engine.is_port_free(&port));
    }
}

#[test]
fn a_bar_size_the_device_does_not_have_rolls_the_plug_back() {
    let plan = plan();
    let (_q, c) = start(&plan);
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    let mut action = plan.hotplug_action("gpu0").unwrap();
    // The plan promises 8 GiB where QEMU gives the device 4 GiB.
    let big = action.functions[0].bars.iter_mut().find(|b| b.size == 4 << 30).unwrap();
    big.size = 8 << 30;
    let request = PlugRequest::from_action(&action);
    let port = request.port.to_string();
    match engine.plug(request) {
        Err(EngineError::PlugFailed { cause, state, .. }) => {
            let cause = cause.to_string();
            assert!(cause.contains("BAR 2 is 0x100000000 bytes, planned 0x200000000"), "{cause}");
            assert_eq!(state, DeviceState::Removed);
        }
        other => panic!("{other:?}"),
    }
    assert!(!names(&c, "/machine/peripheral").contains("gpu0"));
    assert!(!names(&c, "/objects").contains("gpu0-mem0"));
    assert!(engine.is_port_free(&port));
}

/// The nvme physical function of pcilibs' QEMU guest fixtures: QEMU 7.2's `nvme` with
/// `sriov_max_vfs=4` as a Linux 6.1 guest's sysfs shows it, and the `-device` properties
/// it was made with (the fixture README's command line).
const NVME_FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../pcilibs/tests/fixtures/qemu-x86_64/0000:06:00.0");
const NVME_PROPS: [(&str, &str); 7] = [
    ("serial", "fixtures0"),
    ("subsys", "nvmesubsys0"),
    ("sriov_max_vfs", "4"),
    ("sriov_vq_flexible", "8"),
    ("sriov_vi_flexible", "4"),
    ("max_ioqpairs", "10"),
    ("msix_qsize", "5"),
];

#[test]
fn a_plan_with_room_for_sriov_vfs_expects_what_query_pci_shows() {
    let facts = SysfsDevice::open_dir(NVME_FIXTURE)
        .and_then(|d| d.facts())
        .unwrap_or_else(|e| panic!("{NVME_FIXTURE}: {e} (the workspace's pcilibs fixtures are needed)"));
    let everything = ResourceOptions::all();
    let nvme = DeviceRequest::from_facts(QemuId::new("nvme0").unwrap(), &[facts], &everything).unwrap();
    let request = PlanRequest::default().with_devices(vec![nvme]).with_options({
        let mut o = PlanOptions::default();
        o.guest_ram = GUEST_RAM;
        o
    });
    let plan = pcie_topology::plan(&Q35::seabios(), &request).unwrap();
    let action = plan.hotplug_action("nvme0").unwrap();
    assert!(
        action.functions[0].bars.iter().any(|b| b.role == ResourceRole::VfAperture),
        "the plan makes room for the VFs: {:?}",
        action.functions[0].bars
    );
    let mut request = PlugRequest::from_action(&action);
    let Expectation::Pci(want) = &request.functions[0].expect else { panic!("nvme0 expected on PCI") };
    assert_eq!(want.bars, [BarExpectation::at(0, 16 << 10)]);
    // No VFIO device here: QEMU's own nvme model, the device the facts were read from,
    // stands in for `vfio-pci,host=`; the expectations stay the plan's.
    let f = &mut request.functions[0];
    f.host = None;
    f.device.driver = "nvme".into();
    for (k, v) in NVME_PROPS {
        f.device = f.device.clone().prop(k, v);
    }
    let (_q, c) = start_with(&plan, &["-device", "nvme-subsys,id=nvmesubsys0,nqn=fixtures"]);
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    let rec = engine.plug(request).unwrap_or_else(|e| panic!("nvme with SR-IOV as planned: {e}"));
    assert_eq!(rec.state, DeviceState::Visible);
    let GuestLocation::Pci { bdf, .. } = &action.functions[0].guest else { panic!("nvme0 not on PCI") };
    assert_eq!(rec.guest_address("nvme0"), Some(*bdf));
    assert_eq!(engine.unplug("nvme0").unwrap(), UnplugOutcome::Removed);
}

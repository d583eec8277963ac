//! A `pcie-topology` plan driven through the engine on real QEMU 7.2 (q35, SeaBIOS, no
//! guest OS): QEMU boots with the plan's ports, each hotplug action becomes a request with
//! `DeviceRequest::from_action`, and the engine proves in `query-pci` that every function
//! sits where the plan put it with the plan's BAR sizes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use arch_x86_aarch64::Q35;
use common::{names, Hotplug, Qemu};
use pcie_topology::plan::GuestLocation;
use pcie_topology::{
    DeviceRequest as PlannedDevice, FunctionRequest, Plan, PlanOptions, PlanRequest, QemuId,
};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use qmp_hotplug::engine::{Engine, EngineError, EngineOptions, UnplugOutcome};
use qmp_hotplug::request::DeviceRequest;
use qmp_hotplug::state::DeviceState;

/// QEMU's memory in the helper (`-m 128`).
const GUEST_RAM: u64 = 128 << 20;

/// An ivshmem with a 4 GiB BAR and a two-function e1000e, each on its own root port.
fn plan() -> Plan {
    let e1000e = |function| {
        let bar = |kind, size| Resource::bar(kind, false, size);
        FunctionRequest::new(
            function,
            "e1000e",
            vec![
                bar(BarKind::Mem32, 128 << 10),
                bar(BarKind::Mem32, 128 << 10),
                bar(BarKind::Io, 32),
                bar(BarKind::Mem32, 16 << 10),
            ],
        )
    };
    let nic = PlannedDevice::new(QemuId::new("nic0").unwrap(), vec![e1000e(0), e1000e(1)]);
    let request = PlanRequest {
        devices: vec![PlannedDevice::ivshmem("gpu0", 4 << 30).unwrap(), nic],
        options: PlanOptions { guest_ram: GUEST_RAM, ..PlanOptions::default() },
        ..PlanRequest::default()
    };
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

fn start(plan: &Plan) -> (Qemu, Arc<qmp_hotplug::QmpClient>) {
    let mut args = plan.device_args();
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
    EngineOptions { unplug_timeout: Duration::from_secs(20), ..Default::default() }
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
        let request = DeviceRequest::from_action(action).unwrap();
        let port = request.port.clone();
        let rec = engine.plug(request).unwrap();
        assert_eq!(rec.state, DeviceState::Visible, "{}", action.device);
        for f in &action.functions {
            let GuestLocation::Pci { bdf, .. } = &f.guest else { panic!("{} not on PCI", f.id) };
            let got = rec.guest.iter().find(|(id, _)| id == f.id.as_str()).unwrap().1;
            assert_eq!((got.bus, got.slot, got.function), (bdf.bus, bdf.devfn.slot, bdf.devfn.function));
        }
        assert_eq!(engine.unplug(&port).unwrap(), UnplugOutcome::Removed);
        let left = names(&c, "/machine/peripheral");
        assert!(action.functions.iter().all(|f| !left.contains(f.id.as_str())), "{left:?}");
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
    let request = DeviceRequest::from_action(&action).unwrap();
    let port = request.port.clone();
    match engine.plug(request) {
        Err(EngineError::PlugFailed { cause, state, .. }) => {
            let cause = cause.to_string();
            assert!(cause.contains("no BAR of the planned 0x200000000 bytes"), "{cause}");
            assert_eq!(state, DeviceState::Removed);
        }
        other => panic!("{other:?}"),
    }
    assert!(!names(&c, "/machine/peripheral").contains("gpu0"));
    assert!(!names(&c, "/objects").contains("gpu0-mem0"));
    assert!(engine.is_port_free(&port));
}

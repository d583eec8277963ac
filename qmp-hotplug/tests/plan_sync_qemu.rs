//! `Engine::reconcile_plan` on real QEMU 7.2 (q35, SeaBIOS, ACPI hotplug, no guest OS, so
//! that an unplug stays pending): after a failed plug, a pending unplug and a restart the
//! plan and the engine agree on every port, and the plan never hands out a port the
//! engine holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use arch_x86_aarch64::Q35;
use common::{Hotplug, Qemu};
use pcie_topology::{
    DeviceRequest, FunctionRequest, FunctionResource, HotplugAction, HotplugProfile, Plan, PlanOptions,
    PlanRequest, QemuId, SpareRequest,
};
use pcilibs::bar::BarKind;
use qmp_hotplug::engine::{Engine, EngineError, UnplugOutcome};
use qmp_hotplug::request::PlugRequest;
use qmp_hotplug::state::DeviceState;

/// An e1000e called `id`, with QEMU 7.2's memory BARs (its 32 I/O ports are left out:
/// the spare ports are for NICs without I/O, and the engine checks only planned BARs).
fn nic(id: &str) -> DeviceRequest {
    let bar = |index, kind, size| FunctionResource::bar(index, kind, false, size);
    let f = FunctionRequest::new(
        0,
        "e1000e",
        vec![
            bar(0, BarKind::Mem32, 128 << 10),
            bar(1, BarKind::Mem32, 128 << 10),
            bar(3, BarKind::Mem32, 16 << 10),
        ],
    );
    DeviceRequest::new(QemuId::new(id).unwrap(), vec![f])
}

/// One NIC plugged at boot and four spare ports for NICs.
fn plan() -> Plan {
    let mut boot = nic("boot0");
    boot.cold_plug = true;
    let request = PlanRequest::default()
        .with_devices(vec![boot])
        .with_spares(vec![SpareRequest::new(HotplugProfile::nic(), 4)])
        .with_options({
            let mut o = PlanOptions::default();
            o.guest_ram = 128 << 20;
            o
        });
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

/// A port is taken in the plan exactly when the engine holds a device there or the
/// plan's device on it was plugged at boot.
fn assert_agree(plan: &Plan, engine: &Engine) {
    for p in &plan.ports {
        let cold = p.occupant.as_ref().and_then(|o| plan.device(o.as_str())).is_some_and(|d| d.cold_plug);
        let engine_taken = !engine.is_port_free(p.id.as_str());
        assert_eq!(p.occupant.is_some(), engine_taken || cold, "port {}: plan {:?}", p.id, p.occupant);
    }
}

fn port(action: &HotplugAction) -> String {
    action.port.as_ref().unwrap().to_string()
}

#[test]
fn failed_plug_pending_unplug_and_restart_keep_plan_and_engine_in_step() {
    let mut plan = plan();
    let args = plan.device_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let q = Qemu::q35_with(0, Hotplug::Acpi, &args);
    let c = Arc::new(q.connect());
    q.wait_firmware(&c, plan.ports.len());
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let opts = || common::unplug_after(Duration::from_secs(2));
    let (engine, _) = Engine::open(Arc::clone(&c), &journal, opts()).unwrap();
    let sync = engine.reconcile_plan(&mut plan).unwrap();
    assert!(sync.unchanged(), "a fresh plan and engine agree: {sync:?}");
    assert_agree(&plan, &engine);

    // A plug that works.
    let a = plan.place(nic("a")).unwrap();
    engine.plug(PlugRequest::from_action(&a)).unwrap();
    assert!(engine.reconcile_plan(&mut plan).unwrap().unchanged());

    // A plug QEMU refuses: the engine rolls back and frees the port, the plan still has
    // the device there until reconciled.
    let mut b = plan.place(nic("b")).unwrap();
    b.functions[0].device_add = b.functions[0].device_add.clone().prop("x-no-such-property", 1u64);
    match engine.plug(PlugRequest::from_action(&b)) {
        Err(EngineError::PlugFailed { state: DeviceState::Removed, .. }) => {}
        other => panic!("expected a rolled-back plug, got {other:?}"),
    }
    assert!(plan.port(&port(&b)).unwrap().occupant.is_some() && engine.is_port_free(&port(&b)));
    let sync = engine.reconcile_plan(&mut plan).unwrap();
    assert_eq!(sync.released, [b.device.clone()]);
    assert!(plan.device("b").is_none());
    assert_agree(&plan, &engine);

    // An unplug the guest never finishes (no guest OS under ACPI hotplug): the port stays
    // taken in both, and the next placement goes elsewhere.
    assert_eq!(engine.unplug("a").unwrap(), UnplugOutcome::Pending);
    let sync = engine.reconcile_plan(&mut plan).unwrap();
    assert_eq!(sync.pending, std::slice::from_ref(&a.device));
    assert!(sync.unchanged(), "{sync:?}");
    assert!(plan.device("a").is_some());
    assert_agree(&plan, &engine);
    let before_c = plan.to_json().unwrap();
    let c_action = plan.place(nic("c")).unwrap();
    assert_ne!(port(&c_action), port(&a), "the pending unplug's port is not handed out");
    engine.plug(PlugRequest::from_action(&c_action)).unwrap();

    // A restart with the plan file written before `c` was placed, and a device `d` placed
    // in it but never plugged (the runtime stopped between the two): `d` is released, the
    // port the engine holds for `c` is held in the plan, `a`'s unplug is still pending.
    drop(engine);
    let mut restarted = Plan::from_json(&before_c).unwrap();
    let d = restarted.place(nic("d")).unwrap();
    let (engine, _) = Engine::open(Arc::clone(&c), &journal, opts()).unwrap();
    let sync = engine.reconcile_plan(&mut restarted).unwrap();
    assert_eq!(sync.released, std::slice::from_ref(&d.device));
    assert_eq!(sync.held, [(c_action.port.clone().unwrap(), c_action.device.clone())]);
    assert_eq!(sync.pending, std::slice::from_ref(&a.device));
    assert_agree(&restarted, &engine);
    let e = restarted.place(nic("e")).unwrap();
    assert!(![port(&a), port(&c_action)].contains(&port(&e)), "{} is taken", port(&e));
    assert!(engine.reconcile_plan(&mut restarted).unwrap().released.contains(&e.device));

    // A port the plan holds for a device the engine does not have is freed again; a
    // second call changes nothing.
    let free = restarted.ports.iter().find(|p| p.occupant.is_none()).unwrap().id.clone();
    restarted.hold(free.as_str(), QemuId::new("ghost").unwrap()).unwrap();
    assert_eq!(engine.reconcile_plan(&mut restarted).unwrap().unheld, [free]);
    assert!(engine.reconcile_plan(&mut restarted).unwrap().unchanged());
    assert_agree(&restarted, &engine);
}

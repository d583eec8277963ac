//! Model-based test: random plug / unplug / guest-eject / restart sequences run against
//! the engine (with an in-process fake QEMU) and against a reference model; after every
//! step the engine, the fake QEMU and the model must agree. Plus the late-event path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_qemu::FakeQemu;
use proptest::prelude::*;
use qmp_hotplug::engine::{Engine, EngineError, UnplugOutcome};
use qmp_hotplug::request::PlugRequest;
use qmp_hotplug::state::DeviceState;
use qmp_hotplug::{ClientOptions, QmpClient};

const PORTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Plug { port: usize, functions: usize, object: bool },
    Unplug(usize),
    GuestEjects,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PORTS, 1..=3usize, any::<bool>()).prop_map(|(port, functions, object)| Op::Plug { port, functions, object }),
        3 => (0..PORTS).prop_map(Op::Unplug),
        1 => Just(Op::GuestEjects),
        1 => Just(Op::Restart),
    ]
}

/// The reference model of one port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Model {
    Free,
    Visible(BTreeSet<String>),
    Pending(BTreeSet<String>),
}

/// The fake's e1000e expects a 4096-byte BAR 0.
fn request(port: usize, functions: usize, object: bool) -> PlugRequest {
    common::e1000e_slot(port, functions, object, 4096)
}

fn open(fake: &FakeQemu, journal: &std::path::Path) -> Engine {
    let mut opts = ClientOptions::default();
    opts.command_timeout = Duration::from_secs(10);
    let client = Arc::new(QmpClient::connect_unix(&fake.path, opts).unwrap());
    Engine::open(client, journal, common::unplug_after(Duration::from_millis(50))).unwrap().0
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

fn check(engine: &Engine, fake: &FakeQemu, model: &BTreeMap<usize, Model>, objects: &BTreeMap<usize, bool>) {
    let s = fake.state.lock().unwrap();
    let mut want_devices = BTreeSet::new();
    let mut want_objects = BTreeSet::new();
    for port in 0..PORTS {
        let name = format!("rp{port}");
        let state = engine.on_port(&name).map(|d| d.state);
        match model.get(&port).unwrap_or(&Model::Free) {
            Model::Free => assert!(engine.is_port_free(&name), "port {port}: {state:?}"),
            Model::Visible(ids) => {
                assert_eq!(state, Some(DeviceState::Visible), "port {port}");
                want_devices.extend(ids.iter().cloned());
            }
            Model::Pending(ids) => {
                assert_eq!(state, Some(DeviceState::UnplugPending), "port {port}");
                want_devices.extend(ids.iter().cloned());
            }
        }
        if !matches!(model.get(&port), None | Some(Model::Free)) && objects.get(&port) == Some(&true) {
            want_objects.insert(format!("m{port}"));
        }
    }
    let have: BTreeSet<String> = s.devices.keys().cloned().collect();
    assert_eq!(have, want_devices, "QEMU's devices vs the model");
    assert_eq!(s.objects, want_objects, "QEMU's objects vs the model");
}

fn run(ops: &[Op]) {
    let fake = FakeQemu::start(PORTS);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let mut engine = open(&fake, &journal);
    let mut model: BTreeMap<usize, Model> = BTreeMap::new();
    let mut objects: BTreeMap<usize, bool> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Plug { port, functions, object } => {
                let free = matches!(model.get(port), None | Some(Model::Free));
                let result = engine.plug(request(*port, *functions, *object));
                if free {
                    let rec = result.unwrap();
                    assert_eq!(rec.state, DeviceState::Visible);
                    let ids = rec.request.functions.iter().map(|f| f.id().to_string()).collect();
                    model.insert(*port, Model::Visible(ids));
                    objects.insert(*port, *object);
                } else {
                    assert!(matches!(result, Err(EngineError::PortBusy { .. })), "{result:?}");
                }
            }
            Op::Unplug(port) => {
                // By the device's id (function 0's, as the request names it).
                let result = engine.unplug(&format!("p{port}f0"));
                match model.get(port).cloned().unwrap_or(Model::Free) {
                    Model::Free => assert!(matches!(result, Err(EngineError::NoDevice(_))), "{result:?}"),
                    Model::Visible(ids) | Model::Pending(ids) => {
                        assert_eq!(result.unwrap(), UnplugOutcome::Pending);
                        model.insert(*port, Model::Pending(ids));
                    }
                }
            }
            Op::GuestEjects => {
                fake.guest_ejects();
                for m in model.values_mut() {
                    if matches!(m, Model::Pending(_)) {
                        *m = Model::Free;
                    }
                }
                // The late DEVICE_DELETED events finish the removals in the background.
                let done = wait_until(|| {
                    model.iter().all(|(p, m)| *m != Model::Free || engine.is_port_free(&format!("rp{p}")))
                        && fake.state.lock().unwrap().objects.len()
                            == model
                                .iter()
                                .filter(|(p, m)| **m != Model::Free && objects.get(p) == Some(&true))
                                .count()
                });
                assert!(done, "late events did not free the ports");
            }
            Op::Restart => {
                drop(engine);
                engine = open(&fake, &journal);
            }
        }
        check(&engine, &fake, &model, &objects);
    }
    let adds = fake.state.lock().unwrap().adds;
    let plugged: u64 =
        ops.iter().map(|o| if let Op::Plug { functions, .. } = o { *functions as u64 } else { 0 }).sum();
    assert!(adds <= plugged, "more device_adds ({adds}) than functions requested ({plugged})");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..25)) {
        run(&ops);
    }
}

#[test]
fn late_event_completes_a_pending_unplug() {
    let fake = FakeQemu::start(1);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&fake, &dir.path().join("journal"));
    engine.plug(request(0, 2, true)).unwrap();
    assert_eq!(engine.unplug("p0f0").unwrap(), UnplugOutcome::Pending);
    assert!(!engine.is_port_free("rp0"));
    // Only function 0 got a device_del; QEMU takes the whole slot.
    assert_eq!(fake.guest_ejects().len(), 2);
    assert!(wait_until(|| engine.is_port_free("rp0")));
    let rec = engine.device("p0f0").unwrap();
    let last: Vec<DeviceState> = rec.history.iter().rev().take(2).map(|t| t.state).collect();
    assert_eq!(last, [DeviceState::Removed, DeviceState::UnplugPending]);
    assert!(fake.state.lock().unwrap().objects.is_empty(), "object deleted after the late event");
}

#[test]
fn pending_unplug_completed_while_engine_was_down() {
    let fake = FakeQemu::start(1);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake, &journal);
    engine.plug(request(0, 1, true)).unwrap();
    assert_eq!(engine.unplug("p0f0").unwrap(), UnplugOutcome::Pending);
    drop(engine);
    // The guest ejects while nobody listens: the event is lost, qom-list tells.
    fake.guest_ejects();
    let engine = open(&fake, &journal);
    assert!(engine.is_port_free("rp0"));
    assert!(fake.state.lock().unwrap().objects.is_empty());
}

//! Model-based test against real QEMU 7.2 (q35, SeaBIOS, native PCIe hotplug, no guest
//! OS): random plug / unplug / restart sequences run through the engine and through a
//! reference model, and after every step the engine, QEMU (`qom-list`, `query-pci`) and
//! the model must agree. With native hotplug and no guest OS the empty-at-boot slots stay
//! powered off, so QEMU completes every `device_del` at once; the pending path and the
//! guest's late eject are covered by `model.rs` (in-process QEMU) and the crash matrix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{names, Hotplug, Qemu};
use proptest::prelude::*;
use qmp_hotplug::engine::{Engine, EngineError, UnplugOutcome};
use qmp_hotplug::request::PlugRequest;
use qmp_hotplug::state::DeviceState;
use qmp_hotplug::QmpClient;

const PORTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Plug { port: usize, functions: usize, object: bool },
    Unplug(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PORTS, 1..=3usize, any::<bool>()).prop_map(|(port, functions, object)| Op::Plug { port, functions, object }),
        3 => (0..PORTS).prop_map(Op::Unplug),
        1 => Just(Op::Restart),
    ]
}

/// e1000e functions (BAR 0: 128 KiB) on `rp{port}`, with a memory backend object when
/// `object`.
fn request(port: usize, functions: usize, object: bool) -> PlugRequest {
    common::e1000e_slot(port, functions, object, 131072)
}

fn open(client: &Arc<QmpClient>, journal: &std::path::Path) -> Engine {
    Engine::open(Arc::clone(client), journal, common::unplug_after(Duration::from_secs(20))).unwrap().0
}

/// Engine, QEMU and model agree: each port's state, the devices and objects QEMU holds,
/// and the functions `query-pci` shows behind each port.
fn check(engine: &Engine, c: &QmpClient, model: &BTreeMap<usize, (BTreeSet<String>, bool)>) {
    let mut want_devices = BTreeSet::new();
    let mut want_objects = BTreeSet::new();
    for port in 0..PORTS {
        let name = format!("rp{port}");
        match model.get(&port) {
            None => assert!(engine.is_port_free(&name), "port {port}: {:?}", engine.on_port(&name)),
            Some((ids, object)) => {
                assert_eq!(engine.on_port(&name).map(|d| d.state), Some(DeviceState::Visible), "port {port}");
                want_devices.extend(ids.iter().cloned());
                if *object {
                    want_objects.insert(format!("m{port}"));
                }
            }
        }
    }
    let have: BTreeSet<String> =
        names(c, "/machine/peripheral").into_iter().filter(|n| n.starts_with('p')).collect();
    assert_eq!(have, want_devices, "QEMU's devices vs the model");
    let objects: BTreeSet<String> = names(c, "/objects").into_iter().filter(|n| n.starts_with('m')).collect();
    assert_eq!(objects, want_objects, "QEMU's objects vs the model");
    let pci =
        qmp_hotplug::pci::functions(&c.execute_raw("query-pci", None, Duration::from_secs(30)).unwrap());
    let behind: BTreeSet<String> = pci
        .iter()
        .filter(|f| f.address.bus() >= 1 && f.qdev_id.starts_with('p'))
        .map(|f| f.qdev_id.clone())
        .collect();
    assert_eq!(behind, want_devices, "query-pci vs the model");
}

fn run(ops: &[Op]) {
    let q = Qemu::q35(PORTS, Hotplug::Native);
    let c = Arc::new(q.connect());
    q.wait_firmware(&c, PORTS);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let mut engine = open(&c, &journal);
    let mut model: BTreeMap<usize, (BTreeSet<String>, bool)> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Plug { port, functions, object } => {
                let result = engine.plug(request(*port, *functions, *object));
                if model.contains_key(port) {
                    assert!(matches!(result, Err(EngineError::PortBusy { .. })), "{result:?}");
                } else {
                    let rec = result.unwrap();
                    let ids = rec.request.functions.iter().map(|f| f.id().to_string()).collect();
                    model.insert(*port, (ids, *object));
                }
            }
            Op::Unplug(port) => {
                let result = engine.unplug(&format!("p{port}f0"));
                if model.remove(port).is_some() {
                    assert_eq!(result.unwrap(), UnplugOutcome::Removed);
                } else {
                    assert!(matches!(result, Err(EngineError::NoDevice(_))), "{result:?}");
                }
            }
            Op::Restart => {
                drop(engine);
                engine = open(&c, &journal);
            }
        }
        check(&engine, &c, &model);
    }
}

proptest! {
    // Each case boots its own QEMU (about a second under TCG); the sequences are short.
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
    #[test]
    fn engine_matches_model_on_real_qemu(ops in proptest::collection::vec(op(), 1..20)) {
        run(&ops);
    }
}

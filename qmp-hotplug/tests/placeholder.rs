//! Boot-time placeholders: a plug first takes the placeholder off its port (journaled
//! `device_del`, `DEVICE_DELETED` within a deadline, `object-del` of its backends) and adds
//! nothing while the guest has not released the slot; the port then stays taken until a
//! late `DEVICE_DELETED` (or recovery) frees it.
//!
//! Against the in-process fake QEMU (the test plays the guest) and against real QEMU 7.2
//! with no guest OS, where q35's ACPI hotplug never completes the placeholder's removal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_qemu::{FakeDevice, FakeQemu};
use common::qid;
use common::{Hotplug, Qemu};
use qmp_hotplug::journal::{fold, read_file, Record, Step};
use qmp_hotplug::{ClientOptions, DeviceState, Engine, EngineError, EngineOptions, PlugRequest, QmpClient};
use serde_json::json;

/// `gpu0` (with its memory backend) onto `rp0`, after placeholder `ph0` and its backend
/// `ph0-mem` are taken off the port.
fn request_with_placeholder() -> PlugRequest {
    serde_json::from_value(json!({
        "port": "rp0",
        "objects": [{"qom_type": "memory-backend-ram", "id": "gpu0-mem", "props": {"size": 1048576}}],
        "functions": [{"qdev": {"driver": "ivshmem-plain", "id": "gpu0", "bus": "rp0", "memdev": "gpu0-mem"},
                       "expect": {"kind": "pci", "bus": 1, "slot": 0, "function": 0}}],
        "placeholder": {"devices": ["ph0"], "objects": ["ph0-mem"]}
    }))
    .unwrap()
}

/// A fake QEMU whose `rp0` holds placeholder `ph0` (backend `ph0-mem`) from boot.
fn fake_with_placeholder() -> FakeQemu {
    let fake = FakeQemu::start(2);
    {
        let mut s = fake.state.lock().unwrap();
        s.devices.insert("ph0".into(), FakeDevice { bus: 1, slot: 0, function: 0, pending: false });
        s.objects.insert("ph0-mem".into());
    }
    fake
}

fn open(socket: &Path, journal: &Path, placeholder_timeout: Duration) -> Engine {
    let client = Arc::new(QmpClient::connect_unix(socket, ClientOptions::default()).unwrap());
    let mut options = common::unplug_after(Duration::from_millis(300));
    options.placeholder_timeout = placeholder_timeout;
    Engine::open(client, journal, options).unwrap().0
}

/// The QMP steps journaled so far, in order.
fn steps(journal: &Path) -> Vec<Step> {
    let (records, _) = read_file(journal).unwrap();
    records
        .into_iter()
        .filter_map(|r| match r {
            Record::Step { step, .. } => Some(step),
            _ => None,
        })
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A guest that answers the placeholder's `device_del` `after` it is asked: the thread
/// returns what it ejected.
fn guest_answers_placeholder(fake: &Arc<FakeQemu>, after: Duration) -> std::thread::JoinHandle<Vec<String>> {
    let fake = Arc::clone(fake);
    std::thread::spawn(move || {
        wait_until("device_del of the placeholder", || {
            fake.state.lock().unwrap().devices.get("ph0").is_some_and(|d| d.pending)
        });
        std::thread::sleep(after);
        fake.guest_ejects()
    })
}

#[test]
fn placeholder_leaves_before_the_device_comes() {
    let fake = Arc::new(fake_with_placeholder());
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake.path, &journal, Duration::from_secs(20));
    // The guest answers the slot a little later, as a real one does.
    let guest = guest_answers_placeholder(&fake, Duration::from_millis(100));
    let rec = engine.plug(request_with_placeholder()).unwrap();
    assert_eq!(guest.join().unwrap(), vec!["ph0".to_string()]);
    assert_eq!(rec.state, DeviceState::Visible);
    {
        let s = fake.state.lock().unwrap();
        assert!(!s.devices.contains_key("ph0"));
        assert!(s.devices.contains_key("gpu0"));
        assert_eq!(s.objects.iter().cloned().collect::<Vec<_>>(), vec!["gpu0-mem".to_string()]);
        assert_eq!(s.adds, 1);
    }
    // Journaled in the order sent: placeholder out, its backend deleted, then the device in.
    assert_eq!(
        steps(&journal),
        vec![
            Step::DeviceDel { id: "ph0".into() },
            Step::ObjectDel { id: "ph0-mem".into() },
            Step::ObjectAdd { id: "gpu0-mem".into() },
            Step::DeviceAdd { id: "gpu0".into() },
        ]
    );
    // Unplug, then plug again with the same request: the placeholder is gone, so
    // nothing more is asked of it.
    let guest = {
        let fake = Arc::clone(&fake);
        std::thread::spawn(move || {
            wait_until("device_del of gpu0", || {
                fake.state.lock().unwrap().devices.get("gpu0").is_some_and(|d| d.pending)
            });
            fake.guest_ejects()
        })
    };
    assert_eq!(engine.unplug("gpu0").unwrap(), qmp_hotplug::UnplugOutcome::Removed);
    assert_eq!(guest.join().unwrap(), vec!["gpu0".to_string()]);
    let before = steps(&journal).len();
    engine.plug(request_with_placeholder()).unwrap();
    let after = steps(&journal);
    assert!(!after[before..].iter().any(|s| matches!(s, Step::DeviceDel { .. } | Step::ObjectDel { .. })));
}

/// A guest slow to answer ejects the placeholder's slot a second time, after the new
/// device is in it (ACPI hotplug on a loaded host: the device vanished from QEMU and the
/// plug failed after its whole deadline). The engine adds it once more.
#[test]
fn a_late_second_eject_of_the_placeholder_slot_is_survived() {
    let fake = Arc::new(fake_with_placeholder());
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake.path, &journal, Duration::from_secs(20));
    fake.state.lock().unwrap().ejects_after_add = 1;
    let guest = guest_answers_placeholder(&fake, Duration::ZERO);
    let started = Instant::now();
    let rec = engine.plug(request_with_placeholder()).unwrap();
    assert_eq!(guest.join().unwrap(), vec!["ph0".to_string()]);
    assert_eq!(rec.state, DeviceState::Visible);
    assert!(started.elapsed() < Duration::from_secs(5), "no deadline waited out: {:?}", started.elapsed());
    let s = fake.state.lock().unwrap();
    assert!(s.devices.contains_key("gpu0"));
    assert_eq!(s.adds, 2, "added again once");
    let adds = steps(&journal).into_iter().filter(|st| matches!(st, Step::DeviceAdd { .. })).count();
    assert_eq!(adds, 2, "both device_adds journaled");
}

#[test]
fn guest_not_answering_keeps_the_port_until_the_placeholder_is_gone() {
    let fake = fake_with_placeholder();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake.path, &journal, Duration::from_millis(300));
    let err = engine.plug(request_with_placeholder()).unwrap_err();
    match &err {
        EngineError::PlugFailed { cause, state, .. } => {
            assert!(matches!(**cause, EngineError::PlaceholderPending { .. }), "{cause}");
            assert_eq!(*state, DeviceState::UnplugPending);
        }
        other => panic!("expected PlugFailed, got {other}"),
    }
    assert!(err.to_string().contains("ph0"), "{err}");
    {
        let s = fake.state.lock().unwrap();
        assert_eq!(s.adds, 0, "no device_add may go out while the placeholder is there");
        assert!(s.objects.contains("ph0-mem") && !s.objects.contains("gpu0-mem"));
    }
    assert!(!steps(&journal).iter().any(|s| matches!(s, Step::DeviceAdd { .. } | Step::ObjectAdd { .. })));
    assert!(!engine.is_port_free("rp0"));
    assert!(matches!(engine.plug(request_with_placeholder()), Err(EngineError::PortBusy { .. })));

    // The guest releases the slot late: the event frees the port and the backend goes.
    assert_eq!(fake.guest_ejects(), vec!["ph0".to_string()]);
    wait_until("the port to be freed", || engine.is_port_free("rp0"));
    assert!(fake.state.lock().unwrap().objects.is_empty());
    let rec = engine.plug(request_with_placeholder()).unwrap();
    assert_eq!(rec.state, DeviceState::Visible);
    assert_eq!(fake.state.lock().unwrap().adds, 1);
}

#[test]
fn recovery_frees_the_port_once_the_placeholder_left_without_us() {
    let fake = fake_with_placeholder();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake.path, &journal, Duration::from_millis(300));
    assert!(engine.plug(request_with_placeholder()).is_err());
    drop(engine);
    // The event arrives while no engine listens.
    fake.guest_ejects();
    let (records, _) = read_file(&journal).unwrap();
    assert_eq!(fold(&records)["rp0"].device.state, DeviceState::UnplugPending);
    let client = Arc::new(QmpClient::connect_unix(&fake.path, ClientOptions::default()).unwrap());
    let (engine, report) = Engine::open(client, &journal, EngineOptions::default()).unwrap();
    assert_eq!(report.actions.len(), 1, "{report:?}");
    assert_eq!(report.actions[0].after, DeviceState::Removed);
    assert!(engine.is_port_free("rp0"));
    assert!(fake.state.lock().unwrap().objects.is_empty(), "the placeholder's backend is deleted");
}

#[test]
fn placeholder_ids_are_validated_before_anything_is_sent() {
    let fake = fake_with_placeholder();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&fake.path, &dir.path().join("journal"), Duration::from_millis(300));
    let mut r = request_with_placeholder();
    r.placeholder.as_mut().unwrap().devices = vec![qid("gpu0")];
    assert!(matches!(engine.plug(r), Err(EngineError::Request(_))));
    // An id QEMU would refuse cannot even be read into a request.
    let mut text = serde_json::to_value(request_with_placeholder()).unwrap();
    text["placeholder"]["objects"] = json!(["0bad"]);
    let err = serde_json::from_value::<PlugRequest>(text).unwrap_err();
    assert!(err.to_string().contains("0bad"), "{err}");
    let s = fake.state.lock().unwrap();
    assert!(s.devices["ph0"].pending.eq(&false) && s.adds == 0);
}

/// Real QEMU, no guest OS, q35's ACPI hotplug: the placeholder plugged at boot is never
/// released, so the plug must end at the deadline with nothing added and the port held.
#[test]
fn real_qemu_without_guest_adds_nothing() {
    let q = Qemu::q35_with(
        1,
        Hotplug::Acpi,
        &[
            "-object",
            "memory-backend-ram,id=ph0-mem,size=64M,reserve=off",
            "-device",
            "ivshmem-plain,id=ph0,memdev=ph0-mem,bus=rp0",
        ],
    );
    let c = q.connect();
    q.wait_firmware(&c, 1);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let client = Arc::new(c);
    let mut options = common::unplug_after(Duration::from_secs(1));
    options.placeholder_timeout = Duration::from_secs(1);
    let (engine, _) = Engine::open(Arc::clone(&client), &journal, options).unwrap();
    let err = engine.plug(request_with_placeholder()).unwrap_err();
    assert!(
        matches!(&err, EngineError::PlugFailed { cause, state: DeviceState::UnplugPending, .. }
            if matches!(**cause, EngineError::PlaceholderPending { .. })),
        "{err}"
    );
    let peripheral: Vec<String> = client
        .execute(&qapi::qmp::qom_list { path: "/machine/peripheral".into() })
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(peripheral.contains(&"ph0".to_string()) && !peripheral.contains(&"gpu0".to_string()));
    assert!(!steps(&journal).iter().any(|s| matches!(s, Step::DeviceAdd { .. } | Step::ObjectAdd { .. })));
    assert!(!engine.is_port_free("rp0"));
}

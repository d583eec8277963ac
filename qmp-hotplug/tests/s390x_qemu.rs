//! The engine on s390x (`qemu-system-s390x`, paused: no guest runs): CCW devices, zPCI
//! and the vfio-ccw / vfio-ap paths go through the same plug / unplug code as PCI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pcilibs::sysfs::Sysfs;
use qmp_hotplug::engine::{Engine, EngineError, EngineOptions, UnplugOutcome};
use qmp_hotplug::request::PlugRequest;
use qmp_hotplug::state::DeviceState;
use qmp_hotplug::{ClientOptions, QmpClient};
use serde_json::json;

const QEMU_S390X: &str = "qemu-system-s390x";

struct S390 {
    child: Child,
    _dir: tempfile::TempDir,
    client: Arc<QmpClient>,
}

impl Drop for S390 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> S390 {
    common::require(QEMU_S390X, "qemu-system-misc");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let child = Command::new(QEMU_S390X)
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "s390-ccw-virtio,accel=tcg",
            "-m",
            "128",
            "-smp",
            "1",
            "-S",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut opts = ClientOptions::default();
    opts.connect_timeout = Duration::from_secs(30);
    let client = Arc::new(QmpClient::connect_unix(&sock, opts).unwrap());
    S390 { child, _dir: dir, client }
}

fn options(sysfs: Option<&std::path::Path>, unplug_timeout: Duration) -> EngineOptions {
    let mut options = EngineOptions::default();
    options.unplug_timeout = unplug_timeout;
    options.sysfs = sysfs.map_or_else(Sysfs::default, Sysfs::new);
    options
}

#[test]
fn ccw_device_plug_and_unplug() {
    let q = start();
    let dir = tempfile::tempdir().unwrap();
    let opts = options(None, Duration::from_secs(20));
    let (engine, _) = Engine::open(Arc::clone(&q.client), dir.path().join("j"), opts).unwrap();
    let req: PlugRequest = serde_json::from_value(json!({
        "port": "ccw-0.0.0042",
        "device": "net0",
        "functions": [{"qdev": {"driver": "virtio-net-ccw", "id": "net0", "devno": "fe.0.0042"}}]
    }))
    .unwrap();
    assert_eq!(engine.plug(req).unwrap().state, DeviceState::Visible);
    // CCW unplug needs no guest: DEVICE_DELETED comes at once.
    assert_eq!(engine.unplug("net0").unwrap(), UnplugOutcome::Removed);
    assert!(engine.is_port_free("ccw-0.0.0042"));
}

#[test]
fn zpci_function_plugs_with_its_zpci_device_first() {
    let q = start();
    let dir = tempfile::tempdir().unwrap();
    let opts = options(None, Duration::from_secs(1));
    let (engine, _) = Engine::open(Arc::clone(&q.client), dir.path().join("j"), opts).unwrap();
    let req: PlugRequest = serde_json::from_value(json!({
        "port": "zpci-uid-1",
        "device": "vnet1",
        "functions": [
            {"qdev": {"driver": "zpci", "id": "zpci1", "uid": 1, "fid": 1, "target": "vnet1"}},
            {"qdev": {"driver": "virtio-net-pci", "id": "vnet1"},
             "expect": {"kind": "pci", "bus": 0, "slot": 0, "function": 0, "bars": [{"bar": 4, "size": 16384}]}}
        ]
    }))
    .unwrap();
    let rec = engine.plug(req).unwrap();
    assert_eq!(rec.state, DeviceState::Visible);
    // A zPCI function leaves only when the (here paused) guest releases it.
    assert_eq!(engine.unplug("vnet1").unwrap(), UnplugOutcome::Pending);
    assert_eq!(engine.device("vnet1").unwrap().state, DeviceState::UnplugPending);
    assert_eq!(engine.on_port("zpci-uid-1").unwrap().state, DeviceState::UnplugPending);
}

#[test]
fn vfio_ccw_and_vfio_ap_are_checked_then_roll_back_without_host_devices() {
    let q = start();
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys");
    std::fs::create_dir_all(sys.join("bus/mdev/devices/6dfd3ec5-e8b3-4e18-a6fe-57bc9eceb920")).unwrap();
    std::fs::create_dir_all(sys.join("devices/vfio_ap/matrix/4b8a1a4c-8a3b-4a0f-9d4b-1f2e3d4c5b6a")).unwrap();
    let (engine, _) = Engine::open(
        Arc::clone(&q.client),
        dir.path().join("j"),
        options(Some(&sys), Duration::from_secs(20)),
    )
    .unwrap();
    let ccw: PlugRequest = serde_json::from_value(json!({
        "port": "ccw-0.0.1234",
        "functions": [{"qdev": {"driver": "vfio-ccw", "id": "dasd0", "devno": "fe.0.1234",
                                "sysfsdev": "/sys/bus/mdev/devices/6dfd3ec5-e8b3-4e18-a6fe-57bc9eceb920"}}]
    }))
    .unwrap();
    // The mediated device exists in (the test's) sysfs, QEMU then fails on the real one.
    match engine.plug(ccw) {
        Err(EngineError::PlugFailed { state: DeviceState::Removed, .. }) => {}
        other => panic!("{other:?}"),
    }
    let ap: PlugRequest = serde_json::from_value(json!({
        "port": "ap",
        "functions": [{"qdev": {"driver": "vfio-ap", "id": "ap0",
                                "sysfsdev": "/sys/devices/vfio_ap/matrix/00000000-0000-0000-0000-000000000000"}}]
    }))
    .unwrap();
    // A matrix device that does not exist is refused before QEMU sees anything.
    match engine.plug(ap) {
        Err(EngineError::Vfio(e)) => assert!(e.to_string().contains("does not exist"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(engine.on_port("ap").is_none());
}

//! The engine beside a VMM that keeps its own QMP connection, on real QEMU 7.2 (q35,
//! SeaBIOS, native PCIe hotplug, no guest OS): the VMM holds `-qmp`, a second client
//! there gets no greeting, the engine plugs and unplugs on its own monitor
//! (`monitor_args`) and `DEVICE_DELETED` reaches the VMM too; then the VMM hands its
//! negotiated connection over (`QmpClient::from_negotiated_stream`) and the engine works
//! on that one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch_x86_aarch64::Q35;
use common::{Hotplug, Qemu};
use pcie_topology::{
    DeviceRequest, FunctionRequest, FunctionResource, Plan, PlanOptions, PlanRequest, QemuId,
};
use pcilibs::bar::BarKind;
use qmp_hotplug::engine::{Engine, UnplugOutcome};
use qmp_hotplug::request::PlugRequest;
use qmp_hotplug::state::DeviceState;
use qmp_hotplug::{ClientError, ClientOptions, QmpClient};

/// Two e1000e NICs, each for its own root port, plugged at run time.
fn plan() -> Plan {
    let nic = |id: &str| {
        let bar = |index, size| FunctionResource::bar(index, BarKind::Mem32, false, size);
        let f =
            FunctionRequest::new(0, "e1000e", vec![bar(0, 128 << 10), bar(1, 128 << 10), bar(3, 16 << 10)]);
        DeviceRequest::new(QemuId::new(id).unwrap(), vec![f])
    };
    let request = PlanRequest::default().with_devices(vec![nic("nic0"), nic("nic1")]).with_options({
        let mut o = PlanOptions::default();
        o.guest_ram = 128 << 20;
        o
    });
    pcie_topology::plan(&Q35::seabios(), &request).unwrap()
}

/// The VMM's own QMP client, as Kata's runtime keeps one: greeting read, command mode.
struct Vmm {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Vmm {
    fn connect(path: &std::path::Path) -> Vmm {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("VMM cannot connect: {e}"),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut vmm = Vmm { reader: BufReader::new(stream.try_clone().unwrap()), stream };
        assert!(vmm.line().get("QMP").is_some(), "greeting");
        vmm.stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").unwrap();
        assert!(vmm.line().get("return").is_some(), "capabilities accepted");
        vmm
    }

    fn line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Reads until an event named `name` for device `id` arrives.
    fn wait_event(&mut self, name: &str, id: &str) {
        for _ in 0..64 {
            let v = self.line();
            if v["event"] == name && v["data"]["device"] == id {
                return;
            }
        }
        panic!("no {name} for {id} on the VMM's connection");
    }
}

#[test]
fn engine_beside_the_vmm_and_on_a_connection_it_hands_over() {
    let plan = plan();
    let dir = tempfile::tempdir().unwrap();
    let monitor = dir.path().join("hotplug.sock");
    let mut args = plan.device_args();
    args.extend(qmp_hotplug::monitor_args("hotplug", &monitor));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let q = Qemu::q35_with(0, Hotplug::Native, &args);
    let mut vmm = Vmm::connect(&q.qmp);

    // A second client on the VMM's socket waits in the listen queue: no greeting.
    let mut quick = ClientOptions::default();
    quick.connect_timeout = Duration::from_secs(2);
    quick.handshake_timeout = Duration::from_secs(2);
    match QmpClient::connect_unix(&q.qmp, quick) {
        Err(ClientError::Timeout { .. }) => {}
        other => panic!("a second client on the VMM's socket: {other:?}"),
    }

    // The engine on its own monitor.
    let mut options = ClientOptions::default();
    options.connect_timeout = Duration::from_secs(30);
    let own = Arc::new(QmpClient::connect_unix(&monitor, options.clone()).unwrap());
    q.wait_firmware(&own, plan.ports.len());
    let journal = dir.path().join("journal");
    let engine_options = common::unplug_after(Duration::from_secs(20));
    let (engine, _) = Engine::open(Arc::clone(&own), &journal, engine_options.clone()).unwrap();
    let nic0 = plan.hotplug_action("nic0").unwrap();
    assert_eq!(engine.plug(PlugRequest::from_action(&nic0)).unwrap().state, DeviceState::Visible);
    assert_eq!(engine.unplug("nic0").unwrap(), UnplugOutcome::Removed);
    vmm.wait_event("DEVICE_DELETED", "nic0");
    drop(engine);

    // The VMM hands its negotiated connection over and stops using it.
    let handed = QmpClient::from_negotiated_stream(vmm.stream.try_clone().unwrap(), options).unwrap();
    drop(vmm);
    assert_eq!(handed.greeting().version.major, 7, "query-version stands in for the greeting");
    let (engine, _) = Engine::open(Arc::new(handed), &journal, engine_options).unwrap();
    let nic1 = plan.hotplug_action("nic1").unwrap();
    assert_eq!(engine.plug(PlugRequest::from_action(&nic1)).unwrap().state, DeviceState::Visible);
    assert_eq!(engine.unplug("nic1").unwrap(), UnplugOutcome::Removed);
    assert!(engine.is_port_free(nic1.port.as_ref().unwrap().as_str()));
}

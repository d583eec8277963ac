//! Shared test fixtures: real QEMU processes and a fake QMP peer the test controls.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pcie_topology::{DevFn, QemuDevice, QemuId, QemuObject};
use pcilibs::bdf::Bdf;
use qmp_hotplug::client::{ClientOptions, QmpClient};
use qmp_hotplug::{BarExpectation, Expectation, PciExpectation, PlugFunction, PlugRequest};

pub mod fake_qemu;

/// Found on `PATH` (`cargo xtask test` puts the provisioned QEMU there).
pub const QEMU_X86: &str = "qemu-system-x86_64";

/// How root ports take hotplug requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hotplug {
    /// q35's default in QEMU 7.2: ACPI hotplug. With no guest OS, `device_del` never
    /// completes (the unplug-timeout path).
    Acpi,
    /// Native PCIe hotplug. With no guest OS the slot stays powered off and `device_del`
    /// removes the device at once.
    Native,
}

/// A q35 QEMU with SeaBIOS, `ports` pcie-root-ports `rp0`… and QMP on a Unix socket.
/// Killed when dropped.
pub struct Qemu {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub qmp: PathBuf,
}

/// Fails with what to do when a QEMU binary (looked up on `PATH`) or a file is missing.
pub fn require(path: &str, package: &str) {
    let found = if path.contains('/') {
        Path::new(path).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(path).exists()))
    };
    assert!(found, "{path} is missing: run `cargo xtask provision` ({package}) and put its QEMU on PATH");
}

impl Qemu {
    pub fn q35(ports: usize, hotplug: Hotplug) -> Qemu {
        Self::q35_with(ports, hotplug, &[])
    }

    pub fn q35_with(ports: usize, hotplug: Hotplug, extra: &[&str]) -> Qemu {
        require(QEMU_X86, "qemu-system-x86");
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        let mut args: Vec<String> = [
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35,accel=tcg",
            "-m",
            "128",
            "-smp",
            "1",
            "-serial",
            "none",
            "-monitor",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", qmp.display()));
        if hotplug == Hotplug::Native {
            args.push("-global".into());
            args.push("ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into());
        }
        for i in 0..ports {
            args.push("-device".into());
            args.push(format!(
                "pcie-root-port,id=rp{i},chassis={c},slot={c},bus=pcie.0,addr={a:#x}",
                c = i + 1,
                a = i + 2
            ));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(QEMU_X86)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        Qemu { child, dir, qmp }
    }

    pub fn connect(&self) -> QmpClient {
        let mut opts = ClientOptions::default();
        opts.connect_timeout = Duration::from_secs(30);
        QmpClient::connect_unix(&self.qmp, opts).expect("connect to QEMU's QMP socket")
    }

    /// Waits until SeaBIOS has given every root port a secondary bus number, so that
    /// `query-pci` shows hotplugged devices at their guest bus.
    pub fn wait_firmware(&self, client: &QmpClient, ports: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pci = client.execute(&qapi::qmp::query_pci {}).unwrap();
            let programmed = pci
                .iter()
                .flat_map(|b| b.devices.iter())
                .filter_map(|d| d.pci_bridge.as_ref())
                .filter(|br| br.bus.secondary != 0)
                .count();
            if programmed >= ports {
                return;
            }
            assert!(Instant::now() < deadline, "firmware did not number the root ports in 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Names of the QOM children of `path` (e.g. `/machine/peripheral`, `/objects`).
pub fn names(c: &QmpClient, path: &str) -> HashSet<String> {
    c.execute(&qapi::qmp::qom_list { path: path.into() })
        .unwrap()
        .into_iter()
        .filter(|p| p.type_.starts_with("child<"))
        .map(|p| p.name)
        .collect()
}

/// A fake QMP peer: a Unix socket whose other end runs `script`.
pub struct FakePeer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub thread: Option<JoinHandle<()>>,
}

pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// A peer connection with line helpers.
pub struct Peer {
    pub r: BufReader<UnixStream>,
    pub w: UnixStream,
}

impl Peer {
    pub fn send(&mut self, line: &str) {
        let _ = self.w.write_all(line.as_bytes());
        let _ = self.w.write_all(b"\n");
    }

    /// Reads one command; returns (name, id, arguments).
    pub fn recv(&mut self) -> Option<(String, serde_json::Value, serde_json::Value)> {
        let mut line = String::new();
        if self.r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        Some((v["execute"].as_str().unwrap_or_default().to_string(), v["id"].clone(), v["arguments"].clone()))
    }

    pub fn reply(&mut self, id: &serde_json::Value, ret: serde_json::Value) {
        let line = serde_json::json!({"return": ret, "id": id}).to_string();
        self.send(&line);
    }

    /// Greeting plus the `qmp_capabilities` exchange.
    pub fn handshake(&mut self) {
        self.send(GREETING);
        let (name, id, _) = self.recv().expect("qmp_capabilities");
        assert_eq!(name, "qmp_capabilities");
        self.reply(&id, serde_json::json!({}));
    }
}

impl FakePeer {
    pub fn start(script: impl FnOnce(Peer) + Send + 'static) -> FakePeer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let peer = Peer { r: BufReader::new(s.try_clone().unwrap()), w: s };
            script(peer);
        });
        FakePeer { dir, path, thread: Some(thread) }
    }

    pub fn options(timeout: Duration) -> ClientOptions {
        let mut o = ClientOptions::default();
        o.command_timeout = timeout;
        o.handshake_timeout = timeout;
        o.connect_timeout = timeout;
        o
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A QEMU id the test knows to be valid.
pub fn qid(id: impl Into<String>) -> QemuId {
    QemuId::new(id).unwrap()
}

/// `driver` with id `id` on bus `bus` (at `slot.function` when given).
pub fn device(driver: &str, id: &str, bus: &str, addr: Option<(u8, u8)>) -> QemuDevice {
    let mut d = QemuDevice::new(driver, qid(id));
    d.bus = Some(bus.into());
    d.addr = addr.map(|(slot, function)| DevFn::new(slot, function).unwrap());
    d
}

/// Expected in `query-pci` at bus `bus`, slot 0, function `function`, with `bars`.
pub fn at(bus: usize, function: u8, bars: Vec<BarExpectation>) -> Expectation {
    let bdf = Bdf::new(0, u8::try_from(bus).unwrap(), 0, function).unwrap();
    Expectation::Pci(PciExpectation::at(bdf, bars))
}

/// An ivshmem-plain (one 64-bit prefetchable BAR of `mib` MiB, a GPU stand-in) as
/// function 0 and an e1000e as function 1 on root port `rpN` (guest bus N+1); the device
/// is `gpuN`.
pub fn gpu_like(n: usize, mib: u64) -> PlugRequest {
    let port = format!("rp{n}");
    let mem = QemuObject::unbacked_ram(qid(format!("mem{n}")), mib << 20);
    let gpu =
        device("ivshmem-plain", &format!("gpu{n}"), &port, Some((0, 0))).prop("memdev", mem.id.as_str());
    let gpu = PlugFunction::new(gpu).with_expect(at(
        n + 1,
        0,
        vec![BarExpectation::at(0, 256), BarExpectation::at(2, mib << 20)],
    ));
    let nic = PlugFunction::new(device("e1000e", &format!("nic{n}"), &port, Some((0, 1)))).with_expect(at(
        n + 1,
        1,
        vec![],
    ));
    PlugRequest::new(qid(&port), qid(format!("gpu{n}")), vec![gpu, nic]).with_object(mem)
}

/// One `driver` device `id` on root port `rp{port}`, expected at its bus.
pub fn single(port: usize, id: &str, driver: &str) -> PlugRequest {
    let f = PlugFunction::new(device(driver, id, &format!("rp{port}"), None)).with_expect(at(
        port + 1,
        0,
        vec![],
    ));
    PlugRequest::new(qid(format!("rp{port}")), qid(id), vec![f])
}

/// `functions` e1000e functions in one slot of `rp{port}` (ids `p{port}f{f}`, the device
/// `p{port}f0`), each expected with a BAR 0 of `bar0` bytes, with a memory backend object
/// `m{port}` when `object`: the request of the model-based tests.
pub fn e1000e_slot(port: usize, functions: usize, object: bool, bar0: u64) -> PlugRequest {
    let bus = format!("rp{port}");
    let funcs: Vec<PlugFunction> = (0..functions)
        .map(|f| {
            let function = u8::try_from(f).unwrap();
            let d = device("e1000e", &format!("p{port}f{f}"), &bus, Some((0, function)));
            PlugFunction::new(d).with_expect(at(port + 1, function, vec![BarExpectation::at(0, bar0)]))
        })
        .collect();
    let r = PlugRequest::new(qid(&bus), qid(format!("p{port}f0")), funcs);
    if object {
        r.with_object(
            QemuObject::new("memory-backend-ram", qid(format!("m{port}"))).prop("size", 1_048_576u64),
        )
    } else {
        r
    }
}

/// The engine's default settings with an unplug deadline of `unplug`.
pub fn unplug_after(unplug: Duration) -> qmp_hotplug::EngineOptions {
    let mut o = qmp_hotplug::EngineOptions::default();
    o.unplug_timeout = unplug;
    o
}

//! A small QEMU runner and raw-JSON QMP client for acceptance tests: start a real QEMU
//! with a plan's arguments, talk QMP over its Unix socket with a deadline on every read,
//! and read back `query-pci` and `qom-list`.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// A running QEMU, killed on drop.
pub struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
    pub qmp: Qmp,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails with what to install when a QEMU binary or firmware file is missing.
pub fn require(path: &str, package: &str) {
    let found = if path.contains('/') {
        Path::new(path).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(path).exists()))
    };
    assert!(found, "{path} is missing: install it with `apt-get install {package}`");
}

impl Qemu {
    /// Starts `binary` with `args` plus a QMP socket, no display, no default devices.
    pub fn start(binary: &str, args: &[String]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let sock: PathBuf = dir.path().join("qmp.sock");
        let log = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut cmd = Command::new(binary);
        cmd.args(["-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let qmp = loop {
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
                panic!("{binary} exited with {status}: {err}\nargs: {}", args.join(" "));
            }
            if let Ok(q) = Qmp::connect(&sock, Duration::from_secs(10)) {
                break q;
            }
            assert!(Instant::now() < deadline, "{binary}: no QMP socket within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        };
        Qemu { child, dir, qmp }
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

/// A QMP connection (greeting read, capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp { reader: BufReader::new(stream), writer, events: Vec::new() };
        let greeting = q.read()?;
        assert!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
        q.execute("qmp_capabilities", json!({})).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(q)
    }

    fn read(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QMP closed"));
        }
        serde_json::from_str(&line).map_err(|e| std::io::Error::other(format!("bad JSON {line:?}: {e}")))
    }

    /// Runs a command; `Ok(return)` or `Err(error object)`. Events are kept in `events`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        let mut msg = Map::new();
        msg.insert("execute".into(), json!(command));
        if arguments.as_object().is_some_and(|m| !m.is_empty()) {
            msg.insert("arguments".into(), arguments);
        }
        writeln!(self.writer, "{}", Value::Object(msg)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no reply to {command} within 30 s");
            let v = self.read().unwrap_or_else(|e| panic!("reading reply to {command}: {e}"));
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
            self.events.push(v);
        }
    }

    /// `execute` that must succeed.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments.clone())
            .unwrap_or_else(|e| panic!("{command} {arguments} failed: {e}"))
    }

    /// Ids of `/machine/peripheral` children.
    pub fn peripherals(&mut self) -> Vec<String> {
        let list = self.ok("qom-list", json!({"path": "/machine/peripheral"}));
        list.as_array().unwrap().iter().filter_map(|p| p["name"].as_str().map(String::from)).collect()
    }

    /// Every device of `query-pci`, flattened, bridges included.
    pub fn pci_devices(&mut self) -> Vec<PciDev> {
        let r = self.ok("query-pci", json!({}));
        let mut out = Vec::new();
        for bus in r.as_array().unwrap() {
            walk(bus["devices"].as_array().unwrap(), &mut out);
        }
        out
    }

    /// Polls `query-pci` until `ready` holds on two polls in a row that agree (firmware
    /// writes bridge registers one at a time), within `timeout`.
    pub fn wait_pci(&mut self, timeout: Duration, ready: impl Fn(&[PciDev]) -> bool) -> Vec<PciDev> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<String> = None;
        loop {
            let devs = self.pci_devices();
            let snapshot = format!("{devs:?}");
            if ready(&devs) && last.as_deref() == Some(snapshot.as_str()) {
                return devs;
            }
            last = Some(snapshot);
            assert!(Instant::now() < deadline, "query-pci not ready within {timeout:?}: {devs:#?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// One `query-pci` device.
#[derive(Debug, Clone)]
pub struct PciDev {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    pub id: String,
    /// (secondary, subordinate, mem base/limit, pref base/limit) for bridges.
    pub bridge: Option<Bridge>,
    /// (bar index, address, size).
    pub regions: Vec<(u64, i64, u64)>,
}

/// Bridge part of a `query-pci` device.
#[derive(Debug, Clone, Copy)]
pub struct Bridge {
    pub secondary: u8,
    pub subordinate: u8,
    pub mem: (u64, u64),
    pub pref: (u64, u64),
}

fn walk(devs: &[Value], out: &mut Vec<PciDev>) {
    for d in devs {
        let bridge = d.get("pci_bridge").map(|b| {
            // A range is missing while firmware has not programmed it yet.
            let r = |k: &str| {
                (b["bus"][k]["base"].as_u64().unwrap_or(0), b["bus"][k]["limit"].as_u64().unwrap_or(0))
            };
            Bridge {
                secondary: b["bus"]["secondary"].as_u64().unwrap() as u8,
                subordinate: b["bus"]["subordinate"].as_u64().unwrap() as u8,
                mem: r("memory_range"),
                pref: r("prefetchable_range"),
            }
        });
        let regions = d["regions"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["bar"].as_u64().unwrap(),
                            r["address"].as_i64().unwrap_or(-1),
                            r["size"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(PciDev {
            bus: d["bus"].as_u64().unwrap() as u8,
            slot: d["slot"].as_u64().unwrap() as u8,
            function: d["function"].as_u64().unwrap() as u8,
            id: d["qdev_id"].as_str().unwrap_or("").to_string(),
            bridge,
            regions,
        });
        if let Some(children) = d.get("pci_bridge").and_then(|b| b.get("devices")).and_then(Value::as_array) {
            walk(children, out);
        }
    }
}

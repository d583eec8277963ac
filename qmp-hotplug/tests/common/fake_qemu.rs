//! An in-process fake QEMU that speaks enough QMP for the engine: `device_add`,
//! `device_del`, `object-add`/`object-del`, `getfd`/`closefd`, `qom-list`, `query-pci`.
//! Root ports `rp0`… have guest buses 1…; `device_del` leaves a device pending until the
//! test plays the guest with [`FakeQemu::guest_ejects`], which removes it and sends
//! `DEVICE_DELETED` (a late event). Accepts one connection at a time, again and again, so
//! an engine can restart against it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct FakeDevice {
    pub bus: usize,
    pub slot: u8,
    pub function: u8,
    pub pending: bool,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub ports: usize,
    pub devices: BTreeMap<String, FakeDevice>,
    pub objects: BTreeSet<String>,
    pub fds: BTreeSet<String>,
    /// Every device_add ever accepted, to detect doubles.
    pub adds: u64,
    /// `device_del` removes at once and sends `DEVICE_DELETED` (a guest that answers
    /// immediately), instead of leaving the device pending.
    pub auto_eject: bool,
    /// This many `device_add`s from now on are undone at once by the guest (a late
    /// duplicate eject of the slot): the device goes, `DEVICE_DELETED` is sent.
    pub ejects_after_add: u32,
    /// Events to send after the reply being made.
    pub outbox: Vec<Value>,
}

pub struct FakeQemu {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub state: Arc<Mutex<FakeState>>,
    writer: Arc<Mutex<Option<UnixStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeQemu {
    pub fn start(ports: usize) -> FakeQemu {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake-qemu.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let state = Arc::new(Mutex::new(FakeState { ports, ..Default::default() }));
        let writer: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, wr, sp) = (Arc::clone(&state), Arc::clone(&writer), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { return };
                *wr.lock().unwrap() = Some(conn.try_clone().unwrap());
                serve(conn, &st, &wr);
                *wr.lock().unwrap() = None;
            }
        });
        FakeQemu { dir, path, state, writer, stop, thread: Some(thread) }
    }

    /// The guest finishes every pending unplug: devices go, events are sent.
    pub fn guest_ejects(&self) -> Vec<String> {
        let gone: Vec<String> = {
            let mut s = self.state.lock().unwrap();
            let ids: Vec<String> =
                s.devices.iter().filter(|(_, d)| d.pending).map(|(id, _)| id.clone()).collect();
            for id in &ids {
                s.devices.remove(id);
            }
            ids
        };
        for id in &gone {
            send(&self.writer, &event_deleted(id));
        }
        gone
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.writer.lock().unwrap().as_ref() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send(writer: &Mutex<Option<UnixStream>>, v: &Value) {
    if let Some(w) = writer.lock().unwrap().as_mut() {
        let mut line = v.to_string();
        line.push('\n');
        let _ = w.write_all(line.as_bytes());
    }
}

fn event_deleted(id: &str) -> Value {
    json!({"event": "DEVICE_DELETED", "data": {"device": id, "path": format!("/machine/peripheral/{id}")},
           "timestamp": {"seconds": 1, "microseconds": 0}})
}

fn serve(conn: UnixStream, state: &Mutex<FakeState>, writer: &Mutex<Option<UnixStream>>) {
    send(
        writer,
        &json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}, "capabilities": []}}),
    );
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else { return };
        let id = msg["id"].clone();
        let args = msg["arguments"].clone();
        let reply = {
            let mut s = state.lock().unwrap();
            execute(&mut s, msg["execute"].as_str().unwrap_or(""), &args)
        };
        match reply {
            Ok(ret) => send(writer, &json!({"return": ret, "id": id})),
            Err((class, desc)) => send(writer, &json!({"error": {"class": class, "desc": desc}, "id": id})),
        }
        let events = std::mem::take(&mut state.lock().unwrap().outbox);
        for ev in &events {
            send(writer, ev);
        }
    }
}

type Reply = Result<Value, (&'static str, String)>;

fn generic(desc: String) -> Reply {
    Err(("GenericError", desc))
}

fn execute(s: &mut FakeState, cmd: &str, args: &Value) -> Reply {
    let str_arg = |k: &str| args[k].as_str().unwrap_or("").to_string();
    match cmd {
        "qmp_capabilities" => Ok(json!({})),
        "device_add" => {
            let id = str_arg("id");
            if s.devices.contains_key(&id) || id.starts_with("rp") {
                return generic(format!("Duplicate device ID '{id}'"));
            }
            let bus = str_arg("bus");
            let Some(n) =
                bus.strip_prefix("rp").and_then(|n| n.parse::<usize>().ok()).filter(|n| *n < s.ports)
            else {
                return generic(format!("Bus '{bus}' not found"));
            };
            if str_arg("driver") == "bad" {
                return generic("'bad' is not a valid device model name".into());
            }
            let (slot, function) = match args["addr"].as_str() {
                Some(a) => {
                    // `1.2` or `0x1.0x2`, as QEMU reads it.
                    let (x, y) = a.split_once('.').unwrap_or((a, "0"));
                    let hex = |t: &str| u8::from_str_radix(t.trim_start_matches("0x"), 16).unwrap_or(0);
                    (hex(x), hex(y))
                }
                None => (0, 0),
            };
            if s.devices.values().any(|d| d.bus == n + 1 && d.slot == slot && d.function == function) {
                return generic(format!("PCI: slot {slot} function {function} not available"));
            }
            s.adds += 1;
            if s.ejects_after_add > 0 {
                // A guest's late eject of the slot takes the new device at once.
                s.ejects_after_add -= 1;
                s.outbox.push(event_deleted(&id));
                return Ok(json!({}));
            }
            s.devices.insert(id, FakeDevice { bus: n + 1, slot, function, pending: false });
            Ok(json!({}))
        }
        "device_del" => {
            let id = str_arg("id");
            let Some(d) = s.devices.get(&id).cloned() else {
                return Err(("DeviceNotFound", format!("Device '{id}' not found")));
            };
            if d.pending {
                return generic(format!("Device {id} is already in the process of unplug"));
            }
            // Unplugging function 0 takes the whole slot, as QEMU does.
            for other in s.devices.values_mut() {
                if other.bus == d.bus
                    && other.slot == d.slot
                    && (d.function == 0 || other.function == d.function)
                {
                    other.pending = true;
                }
            }
            if s.auto_eject {
                let ids: Vec<String> =
                    s.devices.iter().filter(|(_, d)| d.pending).map(|(id, _)| id.clone()).collect();
                for id in ids {
                    s.devices.remove(&id);
                    s.outbox.push(event_deleted(&id));
                }
            }
            Ok(json!({}))
        }
        "object-add" => {
            let id = str_arg("id");
            if !s.objects.insert(id.clone()) {
                return generic(format!(
                    "attempt to add duplicate property '{id}' to object (type 'container')"
                ));
            }
            Ok(json!({}))
        }
        "object-del" => {
            let id = str_arg("id");
            if s.objects.remove(&id) {
                Ok(json!({}))
            } else {
                generic(format!("object '{id}' not found"))
            }
        }
        "getfd" => {
            s.fds.insert(str_arg("fdname"));
            Ok(json!({}))
        }
        "closefd" => {
            let name = str_arg("fdname");
            if s.fds.remove(&name) {
                Ok(json!({}))
            } else {
                generic(format!("File descriptor named '{name}' not found"))
            }
        }
        "qom-list" => {
            let path = str_arg("path");
            let mut out = vec![json!({"name": "type", "type": "string"})];
            if path == "/machine/peripheral" {
                for n in 0..s.ports {
                    out.push(json!({"name": format!("rp{n}"), "type": "child<pcie-root-port>"}));
                }
                for id in s.devices.keys() {
                    out.push(json!({"name": id, "type": "child<e1000e>"}));
                }
            } else if path == "/objects" {
                for id in &s.objects {
                    out.push(json!({"name": id, "type": "child<memory-backend-ram>"}));
                }
            }
            Ok(Value::Array(out))
        }
        "query-pci" => {
            let ports: Vec<Value> = (0..s.ports)
                .map(|n| {
                    let devs: Vec<Value> = s
                        .devices
                        .iter()
                        .filter(|(_, d)| d.bus == n + 1)
                        .map(|(id, d)| json!({"bus": d.bus, "slot": d.slot, "function": d.function, "qdev_id": id,
                                               "regions": [{"bar": 0, "size": 4096, "address": -1, "type": "memory"}]}))
                        .collect();
                    json!({"bus": 0, "slot": n + 2, "function": 0, "qdev_id": format!("rp{n}"), "regions": [],
                           "pci_bridge": {"bus": {"number": 0, "secondary": n + 1, "subordinate": n + 1}, "devices": devs}})
                })
                .collect();
            Ok(json!([{"bus": 0, "devices": ports}]))
        }
        other => Err(("CommandNotFound", format!("The command {other} has not been found"))),
    }
}

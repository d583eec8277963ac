//! Benchmarks against a real QEMU (q35, native PCIe hotplug, so that `device_del`
//! completes without a guest):
//!
//! 1. engine overhead per hotplug: `Engine::plug` + `Engine::unplug` of one e1000e versus
//!    the same QMP round trips sent by hand (`device_add`, `query-pci`, `qom-list`,
//!    `qom-list`, `device_del`, wait for `DEVICE_DELETED`, `qom-list /objects`), same run;
//! 2. N devices onto N ports, concurrently versus one after another.
//!
//! Prints Markdown tables. `cargo bench -p qmp-hotplug` runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcie_topology::{QemuDevice, QemuId};
use pcilibs::bdf::Bdf;
use qmp_hotplug::engine::{Engine, EngineOptions, UnplugOutcome};
use qmp_hotplug::{ClientOptions, QmpClient};
use qmp_hotplug::{Expectation, PciExpectation, PlugFunction, PlugRequest};
use serde_json::json;

const ROUNDS: usize = 30;
const N: usize = 8;

/// The QEMU process and the directory of its socket (kept until QEMU is gone).
struct Qemu(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(ports: usize) -> (Qemu, Arc<QmpClient>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-display", "none", "-machine", "q35,accel=tcg", "-m", "128", "-smp", "1"])
        .args(["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    for i in 0..ports {
        cmd.arg("-device").arg(format!(
            "pcie-root-port,id=rp{i},chassis={c},slot={c},bus=pcie.0,addr={a:#x}",
            c = i + 1,
            a = i + 2
        ));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut opts = ClientOptions::default();
    opts.connect_timeout = Duration::from_secs(30);
    let c = Arc::new(QmpClient::connect_unix(&sock, opts).unwrap());
    // Wait for SeaBIOS to number the ports.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pci = c.execute_raw("query-pci", None, Duration::from_secs(30)).unwrap();
        let f = qmp_hotplug::pci::functions(&pci);
        if f.iter().filter(|x| x.qdev_id.starts_with("rp")).count() == ports && ports > 0 {
            let numbered = pci.to_string().matches("\"secondary\":0").count() == 0;
            if numbered {
                break;
            }
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    (Qemu(child, dir), c)
}

/// `nic{port}`, an e1000e on `rp{port}`, expected at the port's bus.
fn request(port: usize) -> PlugRequest {
    let id = QemuId::new(format!("nic{port}")).unwrap();
    let mut nic = QemuDevice::new("e1000e", id.clone());
    nic.bus = Some(format!("rp{port}"));
    let bdf = Bdf::new(0, u8::try_from(port + 1).unwrap(), 0, 0).unwrap();
    let f = PlugFunction::new(nic).with_expect(Expectation::Pci(PciExpectation::at(bdf, Vec::new())));
    PlugRequest::new(QemuId::new(format!("rp{port}")).unwrap(), id, vec![f])
}

fn raw_round(c: &QmpClient) -> (Duration, Duration) {
    let t = Duration::from_secs(30);
    let start = Instant::now();
    c.execute_raw("device_add", Some(json!({"driver": "e1000e", "id": "raw0", "bus": "rp0"})), t).unwrap();
    c.execute_raw("query-pci", None, t).unwrap();
    c.execute_raw("qom-list", Some(json!({"path": "/machine/peripheral"})), t).unwrap();
    let plug = start.elapsed();
    let start = Instant::now();
    let events = c.subscribe();
    c.execute_raw("qom-list", Some(json!({"path": "/machine/peripheral"})), t).unwrap();
    c.execute_raw("device_del", Some(json!({"id": "raw0"})), t).unwrap();
    events.wait_for(Instant::now() + t, |e| e.deleted_device_id() == Some("raw0")).unwrap();
    c.execute_raw("qom-list", Some(json!({"path": "/objects"})), t).unwrap();
    (plug, start.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (_q, c) = qemu(N);
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) =
        Engine::open(Arc::clone(&c), dir.path().join("journal"), EngineOptions::default()).unwrap();

    let (mut rp, mut ru, mut ep, mut eu) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let (p, u) = raw_round(&c);
        rp.push(p);
        ru.push(u);
        let t = Instant::now();
        engine.plug(request(0)).unwrap();
        ep.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(engine.unplug("nic0").unwrap(), UnplugOutcome::Removed);
        eu.push(t.elapsed());
    }
    println!("### Engine overhead per hotplug (median of {ROUNDS}, ms)\n");
    println!("| operation | raw QMP round trips | engine | engine − raw |");
    println!("|---|---|---|---|");
    for (name, raw, eng) in [
        ("plug (device_add + query-pci + qom-list)", median(rp), median(ep)),
        ("unplug (qom-list + device_del + DEVICE_DELETED + qom-list)", median(ru), median(eu)),
    ] {
        let diff = eng.as_secs_f64() - raw.as_secs_f64();
        println!("| {name} | {} | {} | {:+.2} |", ms(raw), ms(eng), diff * 1000.0);
    }

    let mut seq = vec![];
    let mut conc = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        for p in 0..N {
            engine.plug(request(p)).unwrap();
        }
        seq.push(t.elapsed());
        for p in 0..N {
            engine.unplug(&format!("nic{p}")).unwrap();
        }
        let t = Instant::now();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..N)
                .map(|p| {
                    let e = &engine;
                    s.spawn(move || e.plug(request(p)).unwrap())
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        });
        conc.push(t.elapsed());
        for p in 0..N {
            engine.unplug(&format!("nic{p}")).unwrap();
        }
    }
    println!("\n### {N} devices onto {N} root ports (median of 5, ms)\n");
    println!("| mode | total | per device |");
    println!("|---|---|---|");
    let n32 = u32::try_from(N).unwrap();
    println!("| one after another | {} | {} |", ms(median(seq.clone())), ms(median(seq) / n32));
    println!("| concurrently ({N} threads) | {} | {} |", ms(median(conc.clone())), ms(median(conc) / n32));
}

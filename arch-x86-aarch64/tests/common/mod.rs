//! Starts a real QEMU with a plan's arguments, speaks QMP to it over its stdio with
//! `qmp-hotplug`'s client (a deadline on every reply), and reads back `query-pci` and
//! `qom-list` in the form the acceptance tests check.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcie_topology::plan::Port;
use pcie_topology::platform::Range;
use pcie_topology::Plan;
use pcilibs::requirement::Resource;
use qmp_hotplug::{ClientOptions, QmpClient};
use serde_json::Value;

/// A running QEMU, killed on drop.
pub struct Qemu {
    child: Child,
    stderr: tempfile::NamedTempFile,
    /// The QMP connection on QEMU's stdin/stdout.
    pub qmp: QmpClient,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails with what to do when a QEMU binary or firmware file is missing.
pub fn require(path: &str, package: &str) {
    let found = if path.contains('/') {
        Path::new(path).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(path).exists()))
    };
    assert!(
        found,
        "{path} is missing: run the tests with `cargo xtask test`, which provisions QEMU and firmware into \
         target/e2e/cache and hands them to the tests (QEMU first on PATH, firmware under ${FIRMWARE_ROOT_ENV}); \
         or install Debian's {package}"
    );
}

/// Where the firmware the tests boot lives: a folder with Debian's firmware layout
/// (`usr/share/ovmf/OVMF.fd`, …). `cargo xtask test` points it at its stack's root;
/// unset, the installed paths are used.
pub const FIRMWARE_ROOT_ENV: &str = "PCIE_HOTPLUG_FIRMWARE_ROOT";

/// The firmware image at the installed path `path` (such as
/// [`arch_x86_aarch64::OVMF_PATH`]), under [`FIRMWARE_ROOT_ENV`] when that is set.
pub fn firmware(path: &str) -> String {
    match std::env::var_os(FIRMWARE_ROOT_ENV).filter(|r| !r.is_empty()) {
        Some(root) => Path::new(&root).join(path.trim_start_matches('/')).display().to_string(),
        None => path.to_string(),
    }
}

/// q35 with the tests' OVMF ([`firmware`]).
pub fn q35_ovmf() -> arch_x86_aarch64::Q35 {
    let path = firmware(arch_x86_aarch64::OVMF_PATH);
    require(&path, "ovmf");
    arch_x86_aarch64::Q35::ovmf_at(path)
}

/// virt with the tests' AAVMF ([`firmware`]).
pub fn virt_uefi() -> arch_x86_aarch64::Virt {
    let path = firmware(arch_x86_aarch64::AAVMF_PATH);
    require(&path, "qemu-efi-aarch64");
    arch_x86_aarch64::Virt::uefi_at(path)
}

impl Qemu {
    /// Starts `binary` with `args` plus QMP on stdio, no display, no default devices. QEMU
    /// must greet within 20 s and answer every command within 10 s.
    pub fn start(binary: &str, args: &[String]) -> Qemu {
        Qemu::try_start(binary, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Qemu::start`], with QEMU's refusal (its exit and stderr) as the error.
    pub fn try_start(binary: &str, args: &[String]) -> Result<Qemu, String> {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(binary)
            .args(["-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none", "-qmp", "stdio"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let (to_qemu, from_qemu) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        let mut options = ClientOptions::default();
        options.handshake_timeout = Duration::from_secs(20);
        options.command_timeout = Duration::from_secs(10);
        match QmpClient::from_pipes(from_qemu, to_qemu, options) {
            Ok(qmp) => Ok(Qemu { child, stderr, qmp }),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                let log = std::fs::read_to_string(stderr.path()).unwrap_or_default();
                Err(format!(
                    "{binary}: no QMP session ({e}), exit {status:?}: {log}\nargs: {}",
                    args.join(" ")
                ))
            }
        }
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// Runs a command (arguments as a JSON object, `{}` for none) that must succeed.
    pub fn ok(&self, command: &str, arguments: Value) -> Value {
        let args = arguments.as_object().is_some_and(|m| !m.is_empty()).then(|| arguments.clone());
        let timeout = self.qmp.options().command_timeout;
        self.qmp.execute_raw(command, args, timeout).unwrap_or_else(|e| panic!("{command} {arguments}: {e}"))
    }

    /// Ids of `/machine/peripheral` children.
    pub fn peripherals(&self) -> Vec<String> {
        let list = self.ok("qom-list", serde_json::json!({"path": "/machine/peripheral"}));
        list.as_array().unwrap().iter().filter_map(|p| p["name"].as_str().map(String::from)).collect()
    }

    /// Every device of `query-pci`, flattened, bridges included.
    pub fn pci_devices(&self) -> Vec<PciDev> {
        let r = self.ok("query-pci", serde_json::json!({}));
        let mut out = Vec::new();
        for bus in r.as_array().unwrap() {
            walk(bus["devices"].as_array().unwrap(), &mut out);
        }
        out
    }

    /// Polls `query-pci` until `ready` holds on two polls in a row that agree (firmware
    /// writes bridge registers one at a time), within `timeout`.
    pub fn wait_pci(&self, timeout: Duration, ready: impl Fn(&[PciDev]) -> bool) -> Vec<PciDev> {
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

/// The `query-pci` device with QEMU id `id`.
pub fn find<'a>(devs: &'a [PciDev], id: &str) -> &'a PciDev {
    devs.iter().find(|d| d.id == id).unwrap_or_else(|| panic!("{id} not in query-pci: {devs:#?}"))
}

/// Asserts that the windows the firmware gave `port` hold what the port is for (its
/// occupant's BARs, or its spare profile) at natural alignment: the planner's guarantee.
pub fn assert_windows_hold(plan: &Plan, port: &Port, bridge: Bridge) {
    let resources: Vec<Resource> = match (&port.profile, &port.occupant) {
        (_, Some(dev)) => plan
            .device(dev.as_str())
            .unwrap()
            .functions
            .iter()
            .flat_map(|f| f.bars.iter())
            .map(|b| Resource::bar(b.kind, b.prefetchable, b.size))
            .collect(),
        (Some(p), None) => p.resources.iter().map(|r| r.resource).collect(),
        (None, None) => return,
    };
    assert!(
        bridge.fits(&resources),
        "{}: firmware windows mem {:#x?} pref {:#x?} cannot hold {resources:?}",
        port.id,
        bridge.mem,
        bridge.pref
    );
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

impl Bridge {
    /// Whether `resources` fit the memory and prefetchable windows (base/limit ranges).
    pub fn fits(&self, resources: &[Resource]) -> bool {
        let window = |r: (u64, u64)| Range::new(r.0, r.1 + 1 - r.0);
        pcie_topology::bars_fit(window(self.mem), window(self.pref), resources)
    }
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

//! `qmp-fit`: does this device fit the guest's ports right now? For operators whose GPU
//! "does not show up": reads the live bridge windows of a running QEMU over QMP (as the
//! guest's firmware or OS programmed them) and checks a device's BARs against every port.
//!
//! ```text
//! qmp-fit --qmp /run/vc/vm/ID/extra-qmp.sock --host 0000:41:00.0
//! qmp-fit --qmp qmp.sock --need h100 --json
//! qmp-fit --qmp qmp.sock --need 16M:mem32,128G:pref64 --port rp3
//! ```
//!
//! Installed with `cargo install --path qmp-hotplug --features cli`. The exit status is 0
//! when an empty port (or the `--port` asked for) takes the device, 1 when none does, 2
//! on errors (a bad command line, QMP unreachable, a host function unreadable).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use pcie_topology::HotplugProfile;
use pcilibs::bdf::Bdf;
use pcilibs::facts::ResourceOptions;
use pcilibs::requirement::Resource;
use pcilibs::sysfs::Sysfs;
use qmp_hotplug::pci::{bridges, window_shortfalls, LiveBridge, LiveWindow};
use qmp_hotplug::{ClientOptions, QmpClient};
use serde_json::{json, Value};

const AFTER_HELP: &str = "\
QMP serves one client at a time, and the VMM (Kata, libvirt) holds its socket: start QEMU
with a second QMP socket for tools (-qmp unix:/run/vm/tools-qmp.sock,server=on,wait=off)
and point --qmp at that one.

Examples:
  qmp-fit --qmp /run/vm/tools-qmp.sock --host 0000:41:00.0 --host 0000:41:00.1
  qmp-fit --qmp qmp.sock --need h100 --json
  qmp-fit --qmp qmp.sock --need 16M:mem32,128G:pref64 --port rp3

Exit status: 0 an empty port (or --port) takes the device, 1 none does, 2 an error.";

/// Checks a device's BARs against the windows a running QEMU's PCI bridges forward right
/// now, as the guest's firmware or OS programmed them: whether a hotplug would leave BARs
/// unassigned ("no space"), and by how much each window falls short.
#[derive(Parser, Debug)]
#[command(name = "qmp-fit", version, after_help = AFTER_HELP)]
#[command(group(ArgGroup::new("device").required(true).args(["host", "need"])))]
struct Args {
    /// QEMU's QMP Unix socket (one no other client holds).
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// A host function whose BARs to place, read from sysfs; repeat for every function of
    /// the device or IOMMU group.
    #[arg(long, value_name = "BDF", value_parser = parse_bdf)]
    host: Vec<Bdf>,
    /// Read the --host functions from this sysfs root instead of /sys (a captured tree).
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    sysfs_root: PathBuf,
    /// Count the SR-IOV VFs' BARs too (the device will enable VFs in the guest).
    #[arg(long)]
    with_vfs: bool,
    /// Instead of --host: a profile (h100, a100, nvswitch, nic) or SIZE:KIND joined with
    /// ',' (KIND mem32, pref32, mem64, pref64 or io), e.g. 16M:mem32,128G:pref64.
    #[arg(long, value_name = "PROFILE")]
    need: Option<String>,
    /// Check this port only (its QEMU id), empty or not.
    #[arg(long, value_name = "ID")]
    port: Option<String>,
    /// How long to wait for QEMU's answers.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    timeout: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_bdf(text: &str) -> Result<Bdf, String> {
    Bdf::parse_any(text)
        .map_err(|e| format!("{e}; give a PCI address as lspci -D shows it, e.g. 0000:41:00.0"))
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("qmp-fit: {e}");
            ExitCode::from(2)
        }
    }
}

/// The device's resources and a name for it.
fn need(args: &Args) -> Result<(String, Vec<Resource>), String> {
    if let Some(text) = &args.need {
        let p = HotplugProfile::parse(text).map_err(|e| {
            format!("--need {text}: {e}; give h100, a100, nvswitch, nic or SIZE:KIND,… (e.g. 16M:mem32,128G:pref64)")
        })?;
        return Ok((p.describe(), p.resources.iter().map(|r| r.resource).collect()));
    }
    let sysfs = Sysfs::new(&args.sysfs_root);
    let opts = ResourceOptions::default().with_sriov_vfs(args.with_vfs).with_rom(true);
    let mut out = Vec::new();
    for bdf in &args.host {
        let facts = sysfs.facts(*bdf).map_err(|e| {
            format!(
                "{bdf}: {e}; is it in {}/bus/pci/devices (lspci -D lists the host's functions)?",
                args.sysfs_root.display()
            )
        })?;
        out.extend(facts.resources(&opts).map_err(|e| format!("{bdf}: {e}"))?);
    }
    let names: Vec<String> = args.host.iter().map(ToString::to_string).collect();
    Ok((names.join(" + "), out))
}

/// The bridges of the running QEMU, as its guest programmed them.
fn live_bridges(args: &Args) -> Result<Vec<LiveBridge>, String> {
    let timeout = Duration::from_secs(args.timeout);
    let mut opts = ClientOptions::default();
    opts.connect_timeout = timeout;
    opts.handshake_timeout = timeout;
    let qmp = args.qmp.display();
    let client = QmpClient::connect_unix(&args.qmp, opts).map_err(|e| {
        format!(
            "{qmp}: {e}; is QEMU running with -qmp unix:{qmp},server=on,wait=off, and is no other client \
             (the VMM) connected to that socket? QMP serves one client at a time: give QEMU a second -qmp \
             socket for tools"
        )
    })?;
    let reply =
        client.execute_raw("query-pci", None, timeout).map_err(|e| format!("query-pci on {qmp}: {e}"))?;
    let all = bridges(&reply);
    if all.is_empty() {
        return Err(format!(
            "QEMU at {qmp} shows no PCI bridge: the machine has no ports to hotplug onto (q35: \
             -device pcie-root-port,...), or it has no PCI bus (s390x)"
        ));
    }
    if all.iter().all(|b| b.secondary == 0) {
        return Err(format!(
            "no bridge of QEMU at {qmp} has a bus number yet: its firmware has not run (QEMU started with \
             -S? send `cont`), so there are no windows to check"
        ));
    }
    match &args.port {
        Some(id) => {
            let known: Vec<&str> = all.iter().map(|b| b.qdev_id.as_str()).filter(|n| !n.is_empty()).collect();
            let one: Vec<LiveBridge> = all.iter().filter(|b| b.qdev_id == *id).cloned().collect();
            if one.is_empty() {
                return Err(format!("--port {id}: no bridge of that id; the ports are {}", known.join(", ")));
            }
            Ok(one)
        }
        None => Ok(all),
    }
}

fn window(w: Option<LiveWindow>) -> String {
    w.map_or_else(|| "-".into(), |w| format!("{:#x}+{:#x}", w.base, w.size()))
}

/// One bridge's row: its windows and the verdict.
fn row(b: &LiveBridge, resources: &[Resource]) -> Value {
    let why = window_shortfalls(b, resources);
    json!({
        "port": b.qdev_id,
        "address": b.address.to_string(),
        "buses": format!("{:02x}-{:02x}", b.secondary, b.subordinate),
        "mem": window(b.mem),
        "pref": window(b.pref),
        "io": window(b.io),
        "empty": b.children.is_empty(),
        "fits": why.is_empty(),
        "why_not": why,
    })
}

fn print_table(what: &str, bars: usize, rows: &[Value], verdict: &str) {
    println!("device: {what} ({bars} BARs)");
    println!(
        "{:<12} {:<13} {:<6} {:<26} {:<30} {:<5} verdict",
        "port", "address", "buses", "mem", "pref", "empty"
    );
    for r in rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let why = r["why_not"].as_array().cloned().unwrap_or_default();
        let why: Vec<&str> = why.iter().filter_map(Value::as_str).collect();
        let row_verdict = if why.is_empty() { "fits".to_string() } else { why.join("; ") };
        let empty = if r["empty"] == true { "yes" } else { "no" };
        println!(
            "{:<12} {:<13} {:<6} {:<26} {:<30} {:<5} {row_verdict}",
            s("port"),
            s("address"),
            s("buses"),
            s("mem"),
            s("pref"),
            empty
        );
    }
    println!("{verdict}");
}

fn run(args: &Args) -> Result<bool, String> {
    let (what, resources) = need(args)?;
    let checked = live_bridges(args)?;
    // With --port the verdict is that port's; otherwise whether any empty port takes it.
    let candidates = checked.iter().filter(|b| args.port.is_some() || b.children.is_empty());
    let ok = candidates.clone().any(|b| window_shortfalls(b, &resources).is_empty());
    let verdict = match (&args.port, ok) {
        (Some(p), true) => format!("port {p} takes it"),
        (Some(p), false) => {
            format!("port {p} does not take it: a hotplug there would leave BARs unassigned (\"no space\")")
        }
        (None, true) => "at least one empty port takes it".to_string(),
        (None, false) if candidates.count() == 0 => {
            "no port is empty: unplug a device, or plan spare ports".into()
        }
        (None, false) => {
            "no empty port takes it: a hotplug would leave BARs unassigned (\"no space\")".into()
        }
    };
    let rows: Vec<Value> = checked.iter().map(|b| row(b, &resources)).collect();
    if args.json {
        let doc =
            json!({"device": what, "bars": resources.len(), "bridges": rows, "fits": ok, "verdict": verdict});
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        print_table(&what, resources.len(), &rows, &verdict);
    }
    Ok(ok)
}

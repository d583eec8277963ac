//! Does this device fit the guest's ports right now? For operators whose GPU "does not
//! show up": reads the live bridge windows of a running QEMU over QMP (as the guest's
//! firmware or OS programmed them) and checks a device's BARs against every port.
//!
//! ```text
//! cargo run -p qmp-hotplug --example fit -- --qmp /run/vc/vm/ID/qmp.sock --host 0000:41:00.0
//! cargo run -p qmp-hotplug --example fit -- --qmp qmp.sock --need h100
//! cargo run -p qmp-hotplug --example fit -- --qmp qmp.sock --need 16M:mem32,128G:pref64
//! ```
//!
//! `--host` (repeatable: every function of the device or IOMMU group) reads the BAR
//! sizes from sysfs (`--sysfs-root` for a captured tree); `--need` takes a profile name
//! (`h100`, `a100`, `nvswitch`, `nic`) or a `SIZE:KIND` list. QMP serves one client at a
//! time: use a second QMP socket (`-qmp unix:…` twice) next to the VMM's own. Exit
//! status 0 when at least one empty port takes the device, 1 when none does, 2 on errors.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pcie_topology::HotplugProfile;
use pcilibs::bdf::Bdf;
use pcilibs::facts::ResourceOptions;
use pcilibs::requirement::Resource;
use pcilibs::sysfs::Sysfs;
use qmp_hotplug::pci::{bridges, window_shortfalls, BridgeWindow, PciBridge};
use qmp_hotplug::{ClientOptions, QmpClient};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Check a device's BARs against a running QEMU's live port windows")]
struct Args {
    /// QEMU's QMP Unix socket.
    #[arg(long)]
    qmp: String,
    /// Host function(s) whose BARs to place (all functions of one device).
    #[arg(long)]
    host: Vec<String>,
    /// Read `--host` functions from this sysfs root instead of /sys.
    #[arg(long, default_value = "/sys")]
    sysfs_root: String,
    /// Include SR-IOV VF BARs (the device will enable VFs in the guest).
    #[arg(long)]
    with_vfs: bool,
    /// Instead of `--host`: a profile (`h100`, `a100`, `nvswitch`, `nic`) or `SIZE:KIND,…`.
    #[arg(long)]
    need: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fit: {e}");
            ExitCode::from(2)
        }
    }
}

/// The device's resources and a name for it.
fn need(args: &Args) -> Result<(String, Vec<Resource>), String> {
    if let Some(text) = &args.need {
        let p = HotplugProfile::parse(text).map_err(|e| e.to_string())?;
        return Ok((p.describe(), p.resources.iter().map(|r| r.resource).collect()));
    }
    if args.host.is_empty() {
        return Err("name the device: --host BDF (repeatable) or --need PROFILE".into());
    }
    let sysfs = Sysfs::new(&args.sysfs_root);
    let opts = ResourceOptions::default().with_sriov_vfs(args.with_vfs).with_rom(true);
    let mut out = Vec::new();
    for text in &args.host {
        let bdf: Bdf = text.parse().map_err(|e| format!("{text}: {e}"))?;
        let facts = sysfs.facts(bdf).map_err(|e| format!("{bdf}: {e}"))?;
        out.extend(facts.resources(&opts).map_err(|e| format!("{bdf}: {e}"))?);
    }
    Ok((args.host.join(" + "), out))
}

fn window(w: Option<BridgeWindow>) -> String {
    w.map_or_else(|| "-".into(), |w| format!("{:#x}+{:#x}", w.base, w.size()))
}

/// One bridge's row: its windows and the verdict.
fn row(b: &PciBridge, resources: &[Resource]) -> Value {
    let why = window_shortfalls(b, resources);
    json!({
        "port": b.qdev_id,
        "address": format!("{:02x}:{:02x}.{}", b.address.bus, b.address.slot, b.address.function),
        "buses": format!("{:02x}-{:02x}", b.secondary, b.subordinate),
        "mem": window(b.mem),
        "pref": window(b.pref),
        "io": window(b.io),
        "empty": b.children.is_empty(),
        "fits": why.is_empty(),
        "why_not": why,
    })
}

fn print_table(what: &str, bars: usize, rows: &[Value], any: bool) {
    println!("device: {what} ({bars} BARs)");
    println!(
        "{:<12} {:<8} {:<6} {:<26} {:<30} {:<5} verdict",
        "port", "address", "buses", "mem", "pref", "empty"
    );
    for r in rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let verdict = if r["fits"] == true {
            "fits".to_string()
        } else {
            let why = r["why_not"].as_array().cloned().unwrap_or_default();
            why.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; ")
        };
        let empty = if r["empty"] == true { "yes" } else { "no" };
        println!(
            "{:<12} {:<8} {:<6} {:<26} {:<30} {:<5} {verdict}",
            s("port"),
            s("address"),
            s("buses"),
            s("mem"),
            s("pref"),
            empty
        );
    }
    if any {
        println!("at least one empty port takes it");
    } else {
        println!("no empty port takes it: a hotplug would leave BARs unassigned (\"no space\")");
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let (what, resources) = need(args)?;
    let opts = ClientOptions { connect_timeout: Duration::from_secs(5), ..ClientOptions::default() };
    let client = QmpClient::connect_unix(&args.qmp, opts).map_err(|e| format!("{}: {e}", args.qmp))?;
    let reply = client.execute_raw("query-pci", None, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let all = bridges(&reply);
    let any = all.iter().any(|b| b.children.is_empty() && window_shortfalls(b, &resources).is_empty());
    let rows: Vec<Value> = all.iter().map(|b| row(b, &resources)).collect();
    if args.json {
        let doc =
            json!({"device": what, "bars": resources.len(), "bridges": rows, "fits_an_empty_port": any});
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        print_table(&what, resources.len(), &rows, any);
    }
    Ok(any)
}

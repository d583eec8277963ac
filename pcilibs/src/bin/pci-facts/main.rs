//! `pci-facts`: what pcilibs knows about PCI functions, listed like `lspci -vv` or as JSON.
//!
//! Reads this host's functions from sysfs, a sysfs-like function directory (`config`,
//! optional `resource`, …), a directory of such directories, or a text file of
//! `lspci -x`/`-xxx`/`-xxxx` dumps. Installed with
//! `cargo install --path pcilibs --features cli` (or `cargo install pcilibs --features cli`).
//!
//! Problems are reported per function; the other functions still print. The exit status is
//! 1 when a PATH could not be read at all or no function was found, 2 for a bad command line.

#![forbid(unsafe_code)]

mod human;
mod json;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use pcilibs::bdf::Bdf;
use pcilibs::decode::Function;
use pcilibs::dump;
use pcilibs::facts::FunctionFacts;
use pcilibs::sysfs::{Sysfs, SysfsDevice, SysfsError};
use serde_json::{json, Value};

/// Most bytes of a dump file: far more than `lspci -xxxx` of any machine (about 13 KiB a
/// function), so a device or a huge file given by mistake is refused, not read forever.
const DUMP_LIMIT: usize = 64 << 20;

/// PCI function facts (BARs and their sizes, capabilities, SR-IOV, IOMMU group, driver,
/// NUMA node) from sysfs or from `lspci -x` dumps.
#[derive(Parser, Debug)]
#[command(name = "pci-facts", version, after_help = AFTER_HELP)]
struct Args {
    /// Print a JSON array, one object per function (the fields of pcilibs' FunctionFacts
    /// plus capabilities, bridge windows and host relations).
    #[arg(long)]
    json: bool,

    /// Read the host's functions from this sysfs root instead of /sys (when no PATH is
    /// given).
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    sysfs_root: PathBuf,

    /// A sysfs-like function directory (with `config`), a directory of them
    /// (`/sys/bus/pci/devices`), or a file of `lspci -x`, `-xxx` or `-xxxx` dumps. Without
    /// PATH every function of this host is listed.
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
}

const AFTER_HELP: &str = "\
Examples:
  pci-facts                          every function of this host (run as root to read
                                     all of each configuration space)
  pci-facts --json /sys/bus/pci/devices/0000:01:00.0
  lspci -xxxx > dump.txt; pci-facts dump.txt";

/// One listed function, or why it could not be listed.
struct Entry {
    bdf: Bdf,
    description: Option<String>,
    from_dump: bool,
    config: Vec<u8>,
    /// Host relations (sysfs only): upstream bridges, IOMMU group members, SR-IOV links.
    host: Option<Value>,
    result: Result<(Function, FunctionFacts), String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut entries = Vec::new();
    let mut failed = false;
    if args.paths.is_empty() {
        if let Err(e) = host_functions(&Sysfs::new(&args.sysfs_root), &mut entries) {
            eprintln!("pci-facts: {e}");
            failed = true;
        }
    }
    for p in &args.paths {
        if let Err(e) = collect(p, &mut entries) {
            eprintln!("pci-facts: {}: {e}", p.display());
            failed = true;
        }
    }
    let out = if args.json { json::render(&entries) } else { human::render(&entries) };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    for e in &entries {
        if let Err(msg) = &e.result {
            eprintln!("pci-facts: {}: {msg}", e.bdf);
        }
    }
    if failed || entries.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Every function of the tree at `sys`.
fn host_functions(sys: &Sysfs, out: &mut Vec<Entry>) -> Result<(), String> {
    let list = sys.functions().map_err(|e| match e {
        SysfsError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => format!(
            "{} does not exist: is sysfs mounted (or --sysfs-root wrong)? \
             Give a dump file or a function directory as PATH instead",
            path.display()
        ),
        other => other.to_string(),
    })?;
    if list.is_empty() {
        return Err(format!("no PCI functions in {}", sys.devices_dir().display()));
    }
    out.extend(list.into_iter().map(|b| from_sysfs(&sys.device(b))));
    Ok(())
}

/// The functions at `path` (see [`Args::paths`]).
fn collect(path: &Path, out: &mut Vec<Entry>) -> Result<(), String> {
    if !path.exists() {
        return Err("no such file or directory; give a sysfs function directory (with `config`), \
                    a directory of them, or a file of `lspci -x` dumps"
            .into());
    }
    if path.is_dir() {
        if path.join("config").exists() {
            let dev = SysfsDevice::open_dir(path).map_err(|e| e.to_string())?;
            out.push(from_sysfs(&dev));
            return Ok(());
        }
        let devices = SysfsDevice::all_in(path).map_err(|e| e.to_string())?;
        if devices.is_empty() {
            return Err("no PCI function directories here (entries named like 0000:01:00.0 \
                        holding a `config` file)"
                .into());
        }
        out.extend(devices.iter().map(from_sysfs));
        return Ok(());
    }
    from_dump(path, out)
}

/// The devices of a dump file.
fn from_dump(path: &Path, out: &mut Vec<Entry>) -> Result<(), String> {
    let bytes = pcilibs::sysfs::read_regular_prefix(path, DUMP_LIMIT + 1).map_err(|e| e.to_string())?;
    if bytes.len() > DUMP_LIMIT {
        return Err(format!("longer than {} MiB, which no lspci dump is", DUMP_LIMIT >> 20));
    }
    let text = String::from_utf8_lossy(&bytes);
    let d = dump::parse(&text);
    for p in &d.problems {
        eprintln!("pci-facts: {}: {p}", path.display());
    }
    if d.devices.is_empty() {
        return Err("no device found in the dump: expected `lspci -x` output, a line starting \
                    with the address (`01:00.0 …`) followed by hex lines (`00: 86 80 …`)"
            .into());
    }
    for dev in d.devices {
        let result = Function::decode(&dev.config)
            .map(|f| {
                let mut facts = FunctionFacts::from_function(dev.bdf, &f, None);
                facts.problems.extend(dev.problems.iter().map(|p| p.to_string()));
                (f, facts)
            })
            .map_err(|e| e.to_string());
        out.push(Entry {
            bdf: dev.bdf,
            description: Some(dev.description),
            from_dump: true,
            config: dev.config,
            host: None,
            result,
        });
    }
    Ok(())
}

fn from_sysfs(dev: &SysfsDevice) -> Entry {
    let config = dev.config().unwrap_or_default();
    let result = Function::decode(&config).map_err(|e| e.to_string()).and_then(|f| {
        let facts = dev.facts().map_err(|e| e.to_string())?;
        Ok((f, facts))
    });
    let host = match (
        dev.upstream_bridges(),
        dev.iommu_group_members(),
        dev.virtual_functions(),
        dev.physical_function(),
    ) {
        (Ok(up), Ok(group), Ok(vfs), Ok(pf)) => json!({
            "upstream_bridges": up,
            "iommu_group_members": group,
            "virtual_functions": vfs,
            "physical_function": pf,
        }),
        (a, b, c, d) => {
            let errs: Vec<String> =
                [a.err(), b.err(), c.err(), d.err()].into_iter().flatten().map(|e| e.to_string()).collect();
            json!({ "host_error": errs.join("; ") })
        }
    };
    Entry { bdf: dev.bdf(), description: None, from_dump: false, config, host: Some(host), result }
}

//! The devices to plan, from the command line: host functions (sysfs or a dump), GPU
//! stand-ins and channel devices.

use std::path::Path;

use pcie_topology::request::RequestError;
use pcie_topology::{DeviceRequest, QemuId};
use pcilibs::bdf::Bdf;
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::sysfs::Sysfs;

use crate::args::{Args, BarSizeArg};

/// How many bytes of a dump are read at most (`lspci -xxxx` of a large host is well below).
const MAX_DUMP_BYTES: u64 = 16 << 20;

/// Every device the command line asks for, in the order given: host devices, stand-ins,
/// channel devices.
pub(crate) fn devices(args: &Args) -> Result<Vec<DeviceRequest>, String> {
    let dump = args.lspci_dump.as_deref().map(read_dump).transpose()?;
    let mut out = Vec::new();
    for (n, host) in args.host.iter().enumerate() {
        let mut functions = Vec::new();
        for bdf in &host.functions {
            functions.push(match (&dump, &args.lspci_dump) {
                (Some(d), Some(path)) => dump_facts(d, path, *bdf, &args.bar_size)?,
                _ => sysfs_facts(&args.sysfs_root, *bdf)?,
            });
        }
        let id = QemuId::new(format!("hostdev{n}")).map_err(|e| e.to_string())?;
        let opts = ResourceOptions::default().with_rom(true);
        let mut d = DeviceRequest::from_facts(id, &functions, &opts).map_err(|e| match e {
            RequestError::UnknownSize { bdf, what } => format!(
                "host function {bdf}: the size of {what} is unknown; a dump has no BAR sizes: give each with --bar-size {bdf}:INDEX=SIZE"
            ),
            other => other.to_string(),
        })?;
        d.p2p_group = host.group.clone();
        d.cold_plug = args.cold;
        out.push(d);
    }
    for s in &args.ivshmem {
        let mut d = DeviceRequest::ivshmem(s.id.as_str(), s.size).map_err(|e| e.to_string())?;
        d.p2p_group = s.group.clone();
        d.cold_plug = args.cold;
        out.push(d);
    }
    for c in &args.ccw {
        let mut d = DeviceRequest::channel(c.id.clone(), &c.driver, 0);
        d.cold_plug = args.cold;
        out.push(d);
    }
    Ok(out)
}

/// A host function's facts from sysfs under `root`.
fn sysfs_facts(root: &Path, bdf: Bdf) -> Result<FunctionFacts, String> {
    Sysfs::new(root).facts(bdf).map_err(|e| {
        format!(
            "{bdf}: cannot read its facts under {}: {e} (is the function there? `lspci -D` lists them; --sysfs-root reads a captured tree, --lspci-dump a dump)",
            root.display()
        )
    })
}

/// An `lspci -xxx` dump, read whole but bounded.
fn read_dump(path: &Path) -> Result<pcilibs::dump::Dump, String> {
    let bad = |e: String| format!("--lspci-dump {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file (give the file `lspci -xxx > FILE` wrote)".into()));
    }
    if meta.len() > MAX_DUMP_BYTES {
        return Err(bad(format!("{} bytes, more than a dump has (at most {MAX_DUMP_BYTES})", meta.len())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    Ok(pcilibs::dump::parse(&text))
}

/// A function's facts from a dump, with the BAR sizes `--bar-size` gives.
fn dump_facts(
    dump: &pcilibs::dump::Dump,
    path: &Path,
    bdf: Bdf,
    sizes: &[BarSizeArg],
) -> Result<FunctionFacts, String> {
    let dev = dump.devices.iter().find(|d| d.bdf == bdf).ok_or_else(|| {
        format!(
            "{bdf} is not in {} (its functions: `grep -E '^[0-9a-f:.]+ ' {}`)",
            path.display(),
            path.display()
        )
    })?;
    let mut facts = FunctionFacts::from_config(bdf, &dev.config, None)
        .map_err(|e| format!("{bdf} in {}: {e}", path.display()))?;
    for s in sizes.iter().filter(|s| s.bdf == bdf) {
        if s.index == 6 {
            facts.rom_size = Some(s.size);
            continue;
        }
        let have: Vec<String> = facts.bars.iter().map(|b| b.index.to_string()).collect();
        let bar = facts.bars.iter_mut().find(|b| b.index == s.index).ok_or_else(|| {
            format!("--bar-size: {bdf} has no BAR {} (its BARs: {})", s.index, have.join(", "))
        })?;
        bar.size = Some(s.size);
    }
    Ok(facts)
}

//! Plans a guest topology and prints why each reservation has its size, the QEMU
//! arguments and the plan JSON.
//!
//! ```text
//! cargo run -p pcie-topology --example plan -- --platform q35-seabios --mode root-port \
//!     --host 0000:01:00.0 --ivshmem gpu0:128G --spare h100:2
//! ```
//!
//! Devices come from host functions read through pcilibs from sysfs (`--host`, several
//! functions or IOMMU-group members joined with `+`, optional `@group` for a
//! peer-to-peer group; `--sysfs-root` for a captured sysfs tree), from `lspci -xxx` dumps
//! (`--lspci-dump FILE --host BDF`; a dump has no BAR sizes, so each BAR's size must be
//! given with `--bar-size BDF:INDEX=SIZE`), or GPU stand-ins (`--ivshmem ID:SIZE[@group]`).
//! Spare ports take a profile name or list (`--spare h100:2`, `--spare 16M:mem32,64G:pref64`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::process::ExitCode;

use arch_s390x_ccw::{S390xCcw, S390xDevice};
use arch_x86_aarch64::{Virt, Q35};
use clap::Parser;
use pcie_topology::physbits::host_phys_bits;
use pcie_topology::units::parse_size;
use pcie_topology::{
    plan, DeviceRequest, HotplugProfile, Mode, Plan, PlanOptions, PlanRequest, Platform, QemuId, SpareRequest,
};
use pcilibs::bdf::Bdf;
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::sysfs::Sysfs;

#[derive(Parser)]
#[command(about = "Plan a QEMU guest's PCIe topology with reservations that fit")]
struct Args {
    /// q35-seabios, q35-ovmf, virt, virt-uefi or s390x.
    #[arg(long, default_value = "q35-seabios")]
    platform: String,
    /// root-port, switch-port or numa.
    #[arg(long, default_value = "root-port")]
    mode: String,
    /// Host functions of one device: BDF[+BDF…][@group].
    #[arg(long)]
    host: Vec<String>,
    /// Read host functions from this sysfs root instead of /sys.
    #[arg(long, default_value = "/sys")]
    sysfs_root: String,
    /// Read `--host` functions from this `lspci -xxx` dump instead of sysfs.
    #[arg(long)]
    lspci_dump: Option<String>,
    /// BAR sizes for dump functions: BDF:INDEX=SIZE.
    #[arg(long)]
    bar_size: Vec<String>,
    /// A GPU stand-in: ID:SIZE[@group] (one 64-bit prefetchable BAR).
    #[arg(long)]
    ivshmem: Vec<String>,
    /// Spare ports: PROFILE[:COUNT] (h100, a100, nvswitch, nic, or SIZE:KIND,…).
    #[arg(long)]
    spare: Vec<String>,
    /// Plug the devices at boot instead of hotplugging them.
    #[arg(long)]
    cold: bool,
    /// Guest RAM.
    #[arg(long, default_value = "2G")]
    ram: String,
    /// Guest CPU phys-bits, when fixed.
    #[arg(long)]
    phys_bits: Option<u8>,
    /// Check against this host's physical address width (KVM or /proc/cpuinfo).
    #[arg(long)]
    check_host: bool,
    /// Pack root ports 8 per slot.
    #[arg(long)]
    pack: bool,
    /// Emit no reservations (the machine's defaults).
    #[arg(long)]
    no_reservations: bool,
    /// Write the plan JSON here instead of printing it.
    #[arg(long)]
    json: Option<String>,
}

fn platform(name: &str) -> Result<Box<dyn Platform>, String> {
    Ok(match name {
        "q35-seabios" | "q35" => Box::new(Q35::seabios()),
        "q35-ovmf" => Box::new(Q35::ovmf()),
        "virt" => Box::new(Virt::direct_kernel()),
        "virt-uefi" => Box::new(Virt::uefi()),
        "s390x" => Box::new(S390xCcw::default()),
        other => return Err(format!("unknown platform `{other}`")),
    })
}

fn split_group(text: &str) -> (&str, Option<String>) {
    match text.split_once('@') {
        Some((a, g)) => (a, Some(g.to_string())),
        None => (text, None),
    }
}

/// Facts for `bdf` from sysfs or the dump (with sizes from `--bar-size`).
fn facts(args: &Args, bdf: Bdf) -> Result<FunctionFacts, String> {
    let Some(path) = &args.lspci_dump else {
        return Sysfs::new(&args.sysfs_root).facts(bdf).map_err(|e| format!("{bdf}: {e}"));
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let dump = pcilibs::dump::parse(&text);
    let dev = dump.devices.iter().find(|d| d.bdf == bdf).ok_or_else(|| format!("{bdf} is not in {path}"))?;
    // A dump has no sizes: every BAR is listed with an unknown size until --bar-size says.
    let mut facts = FunctionFacts::from_config(bdf, &dev.config, None).map_err(|e| e.to_string())?;
    for spec in &args.bar_size {
        let (who, size) =
            spec.split_once('=').ok_or_else(|| format!("--bar-size {spec}: expected BDF:INDEX=SIZE"))?;
        let (b, index) =
            who.rsplit_once(':').ok_or_else(|| format!("--bar-size {spec}: expected BDF:INDEX=SIZE"))?;
        if Bdf::parse_any(b).map_err(|e| e.to_string())? == bdf {
            let index: u8 = index.parse().map_err(|_| format!("--bar-size {spec}: bad index"))?;
            let size = parse_size(size).map_err(|e| e.to_string())?;
            let bar = facts
                .bars
                .iter_mut()
                .find(|b| b.index == index)
                .ok_or_else(|| format!("{bdf} has no BAR {index}"))?;
            bar.size = Some(size);
        }
    }
    Ok(facts)
}

fn devices(args: &Args) -> Result<Vec<DeviceRequest>, String> {
    let mut out = Vec::new();
    for (n, spec) in args.host.iter().enumerate() {
        let (list, group) = split_group(spec);
        let mut functions = Vec::new();
        for b in list.split('+') {
            functions.push(facts(args, Bdf::parse_any(b).map_err(|e| format!("{b}: {e}"))?)?);
        }
        let id = QemuId::new(format!("hostdev{n}")).map_err(|e| e.to_string())?;
        let opts = ResourceOptions::default().with_rom(true);
        let mut d = DeviceRequest::from_facts(id, &functions, &opts).map_err(|e| e.to_string())?;
        d.p2p_group = group;
        d.cold_plug = args.cold;
        out.push(d);
    }
    for spec in &args.ivshmem {
        let (rest, group) = split_group(spec);
        let (id, size) = rest.split_once(':').ok_or_else(|| format!("--ivshmem {spec}: expected ID:SIZE"))?;
        let mut d = DeviceRequest::ivshmem(id, parse_size(size).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        d.p2p_group = group;
        d.cold_plug = args.cold;
        out.push(d);
    }
    Ok(out)
}

fn spares(args: &Args) -> Result<Vec<SpareRequest>, String> {
    args.spare
        .iter()
        .map(|spec| {
            let (rest, group) = split_group(spec);
            let (profile, count) = match rest.rsplit_once(':') {
                Some((p, c)) if c.chars().all(|c| c.is_ascii_digit()) => (p, c.parse().unwrap_or(1)),
                _ => (rest, 1),
            };
            let profile = HotplugProfile::parse(profile).map_err(|e| e.to_string())?;
            Ok(SpareRequest { profile, count, numa_node: None, p2p_group: group })
        })
        .collect()
}

fn s390x_plan(args: &Args) -> Result<Plan, String> {
    let p = S390xCcw::default();
    let mut list = Vec::new();
    for spec in &args.ivshmem {
        let (id, _) = spec.split_once(':').unwrap_or((spec, ""));
        list.push(S390xDevice::Ccw {
            id: QemuId::new(id).map_err(|e| e.to_string())?,
            driver: "virtio-net-ccw".into(),
            props: BTreeMap::new(),
            host: None,
            ssid: 0,
        });
    }
    for (n, bdf) in args.host.iter().enumerate() {
        list.push(S390xDevice::Zpci {
            id: QemuId::new(format!("hostdev{n}")).map_err(|e| e.to_string())?,
            driver: "vfio-pci".into(),
            props: BTreeMap::new(),
            host: Some(pcie_topology::HostRef::Bdf(bdf.clone())),
            resources: Vec::new(),
        });
    }
    arch_s390x_ccw::plan(&p, &list, args.cold).map_err(|e| e.to_string())
}

fn run(args: &Args) -> Result<(), String> {
    let plan = if args.platform == "s390x" {
        s390x_plan(args)?
    } else {
        let mode = match args.mode.as_str() {
            "root-port" => Mode::RootPort,
            "switch-port" => Mode::SwitchPort,
            "numa" => Mode::Numa,
            other => return Err(format!("unknown mode `{other}`")),
        };
        let host_bits = if args.check_host {
            let h = host_phys_bits().map_err(|e| e.to_string())?;
            eprintln!("host physical address width: {} bits (from {:?})", h.bits, h.source);
            Some(h.bits)
        } else {
            None
        };
        let request = PlanRequest {
            mode,
            devices: devices(args)?,
            spares: spares(args)?,
            options: PlanOptions {
                guest_ram: parse_size(&args.ram).map_err(|e| e.to_string())?,
                guest_phys_bits: args.phys_bits,
                host_phys_bits: host_bits,
                pack_root_ports: args.pack,
                size_reservations: !args.no_reservations,
                ..Default::default()
            },
        };
        plan(platform(&args.platform)?.as_ref(), &request).map_err(|e| e.to_string())?
    };
    println!("{}", plan.explain());
    println!("QEMU arguments:");
    let mut qemu = plan.qemu_args();
    if let Some(bits) = plan.cpu_phys_bits() {
        qemu.extend(["-cpu".to_string(), format!("max,phys-bits={bits}")]);
    }
    for pair in qemu.chunks(2) {
        println!("  {}", pair.join(" "));
    }
    for a in plan.hotplug_actions().map_err(|e| e.to_string())? {
        println!("hotplug {} onto {}:", a.device, a.port.as_ref().map_or("(machine bus)", |p| p.as_str()));
        for f in &a.functions {
            let guest = match (f.guest.bdf(), f.guest.path()) {
                (Some(bdf), Some(path)) => format!("guest {bdf}, path {path}"),
                (Some(bdf), None) => format!("guest {bdf}"),
                _ => format!("guest {:?}", f.guest),
            };
            println!("  device_add {}  -> {guest}", serde_json::Value::Object(f.device_add.clone()));
        }
    }
    let json = plan.to_json().map_err(|e| e.to_string())?;
    match &args.json {
        Some(path) => std::fs::write(path, json).map_err(|e| format!("{path}: {e}"))?,
        None => print!("{json}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

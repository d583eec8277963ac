//! The program that runs inside the outer guest (`src/bin/nested-vfio.rs`): binds the
//! passed-through functions to `vfio-pci`, reads them through sysfs and VFIO, judges their
//! IOMMU groups, plans and boots the inner VM, and drives its hotplug. Every finding is a
//! result line on standard output (see [`super::wire`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pcilibs::bdf::Bdf;

use super::inner_vm::{self, InnerVm};
use super::passthrough::{self, Backend, HostFunction};
use super::wire::{InnerConfig, PassDevice, WireRow, TAG};

/// Prints result lines and keeps the verdict.
struct Out {
    begun: Instant,
    all_ok: bool,
    rows: usize,
}

impl Out {
    fn line(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed console must not end the run; the host then sees too few rows.
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }

    fn log(&self, text: &str) {
        self.line(&format!("{TAG} LOG [{:6.1} s] {text}", self.begun.elapsed().as_secs_f64()));
    }

    fn info(&self, key: &str, value: &str) {
        self.line(&format!("{TAG} INFO {key} {value}"));
    }

    fn row(&mut self, row: &WireRow) {
        self.all_ok &= row.ok;
        self.rows += 1;
        self.line(&row.line());
    }
}

/// Entry point: `nested-vfio CONFIG.json`.
pub fn main(args: &[String]) -> ExitCode {
    let mut out = Out { begun: Instant::now(), all_ok: true, rows: 0 };
    let Some(path) = args.get(1) else {
        out.line("usage: nested-vfio CONFIG.json");
        return ExitCode::from(2);
    };
    let cfg: InnerConfig = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            let mut row = WireRow::new("nested-vfio");
            row.fail(format!("config {path}: {e}"));
            out.row(&row);
            return ExitCode::FAILURE;
        }
    };
    // The inner QEMU sits where its data directory is found relative to it.
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("/usr/bin:{path}"));
    run(&cfg, &mut out);
    if out.all_ok && out.rows > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(cfg: &InnerConfig, out: &mut Out) {
    let work = std::env::temp_dir().join("nested-vfio");
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        let mut row = WireRow::new("nested-vfio");
        row.fail(format!("{}: {e}", work.display()));
        out.row(&row);
        return;
    }
    let (units, mut failed) = bind_all(cfg, out);
    let all: Vec<Bdf> = units.iter().flat_map(|u| u.functions.iter().map(|f| f.bdf)).collect();
    let kernel = passthrough::kernel_vfio(&all);
    let backend = kernel.backend();
    out.info("kernel-vfio", &format!("{} ({})", backend.name(), kernel.reason()));
    out.log(&format!("reading through sysfs and VFIO ({})", backend.name()));
    let host = read_all(&units, &backend, out, &mut failed);
    judge_groups(&host, out);
    let devices: Vec<PassDevice> =
        units.iter().map(|u| u.device.clone()).filter(|d| !failed.contains(&d.id)).collect();
    if devices.is_empty() {
        let mut row = WireRow::new("inner plan");
        row.fail("no device could be passed through");
        out.row(&row);
        return;
    }
    out.log("planning the inner VM");
    let plan = match inner_vm::plan_inner(&devices, &host, cfg.memory_mib) {
        Ok(p) => p,
        Err(e) => {
            let mut row = WireRow::new("inner plan");
            row.fail(e);
            out.row(&row);
            return;
        }
    };
    let _ = std::fs::write(work.join("plan.txt"), plan.explain());
    out.row(&plan_row(&plan, &host));
    inner(cfg, &devices, &host, plan, &backend, &kernel, &work, out);
}

/// A bound host function (the planner numbers it in the inner device).
struct Bound {
    bdf: Bdf,
    group: u32,
}

/// One device of the inner VM: a scenario device, or one SR-IOV VF of it.
struct Unit {
    device: PassDevice,
    functions: Vec<Bound>,
}

/// Binds every function to `vfio-pci` (creating SR-IOV VFs first where the device asks for
/// them) and returns the inner VM's devices; what fails gets a row and is left out.
fn bind_all(cfg: &InnerConfig, out: &mut Out) -> (Vec<Unit>, BTreeSet<String>) {
    let mut units = Vec::new();
    let mut failed = BTreeSet::new();
    for d in &cfg.devices {
        let started = Instant::now();
        let result = if d.vfs() > 0 { bind_vfs(d, out) } else { bind_device(d) };
        match result {
            Ok(found) => {
                for u in &found {
                    out.log(&format!(
                        "{}: {} bound to vfio-pci in {} ms",
                        u.device.id,
                        u.functions
                            .iter()
                            .map(|f| format!("{} (group {})", f.bdf, f.group))
                            .collect::<Vec<_>>()
                            .join(", "),
                        started.elapsed().as_millis()
                    ));
                }
                units.extend(found);
            }
            Err(e) => {
                let mut row = WireRow::new(format!("{} bind", d.id));
                row.fail(e);
                out.row(&row);
                failed.insert(d.id.clone());
            }
        }
    }
    (units, failed)
}

fn bind(bdf: Bdf) -> Result<u32, String> {
    passthrough::bind_vfio(bdf, Duration::from_secs(20))
}

/// Every function of the device's slot (with function 0 among them, the planner keeps
/// their numbers).
fn bind_device(d: &PassDevice) -> Result<Vec<Unit>, String> {
    let functions = passthrough::functions_of(d)?
        .into_iter()
        .map(|bdf| Ok(Bound { bdf, group: bind(bdf)? }))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(vec![Unit { device: d.clone(), functions }])
}

/// The PF stays on the outer guest's `nvme` driver and creates the VFs; each VF is an inner
/// device of its own (`<id>-vf<n>`, function 0 there). One row tells what the PF did.
fn bind_vfs(d: &PassDevice, out: &mut Out) -> Result<Vec<Unit>, String> {
    let pf = passthrough::functions_of(d)?.into_iter().next().ok_or("no physical function")?;
    let mut row = WireRow::new(format!("{} sr-iov", d.id));
    row.planned = format!("PF {pf} on nvme, {} VFs", d.vfs());
    let started = Instant::now();
    let vfs = match passthrough::create_vfs(pf, "nvme", d.vfs(), Duration::from_secs(30)) {
        Ok(v) => v,
        Err(e) => {
            row.fail(e.clone());
            out.row(&row);
            return Err(e);
        }
    };
    row.hotplug_ms = Some(started.elapsed().as_millis());
    row.guest = vfs.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    let mut units = Vec::new();
    for (n, vf) in (1u8..).zip(&vfs) {
        let group = bind(*vf)?;
        let mut device = d.clone();
        device.id = format!("{}-vf{n}", d.id);
        device.functions = 1;
        units.push(Unit { device, functions: vec![Bound { bdf: *vf, group }] });
    }
    row.pass(format!(
        "ok: the PF's nvme driver made {} VFs, each in its own IOMMU group, passed through as {}",
        vfs.len(),
        units.iter().map(|u| u.device.id.as_str()).collect::<Vec<_>>().join(", ")
    ));
    out.row(&row);
    Ok(units)
}

/// Reads every bound function both ways; one row per function.
fn read_all(
    units: &[Unit],
    backend: &Backend,
    out: &mut Out,
    failed: &mut BTreeSet<String>,
) -> Vec<HostFunction> {
    let mut host = Vec::new();
    for unit in units {
        let device = &unit.device.id;
        for b in &unit.functions {
            let bdf = b.bdf;
            let mut row = WireRow::new(format!("{device} {bdf} facts"));
            row.planned = "sysfs".into();
            row.guest = format!("vfio {}", backend.name());
            match passthrough::read_function(device, bdf, b.group, backend) {
                Ok(f) => {
                    let diff = passthrough::differences(&f);
                    row.bars_ok = Some(diff.iter().all(|d| !d.starts_with("BARs") && !d.starts_with("ROM")));
                    row.notes.push(format!(
                        "{:04x}:{:04x} class {:06x}; BARs: {}",
                        f.vfio.vendor_id,
                        f.vfio.device_id,
                        f.vfio.class_code,
                        passthrough::describe_bars(&f.vfio)
                    ));
                    row.notes.push(format!("capabilities: {}", f.vfio_caps.describe()));
                    if let Some(s) = &f.sysfs.sriov {
                        row.notes.push(format!(
                            "SR-IOV: {} VFs, VF BARs (sysfs only, VFIO has no VF regions): {}",
                            s.total_vfs,
                            s.vf_bars
                                .iter()
                                .map(|b| format!(
                                    "VF BAR{} {}",
                                    b.index,
                                    b.size.map_or_else(|| "?".into(), pcie_topology::units::human_size)
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    if diff.is_empty() {
                        row.pass(format!(
                            "ok: sysfs and VFIO agree: {}; {} capabilities",
                            passthrough::describe_bars(&f.vfio),
                            f.vfio_caps.standard.len() + f.vfio_caps.extended.len()
                        ));
                    } else {
                        for d in diff {
                            row.fail(d);
                        }
                        row.notes.push(format!("sysfs capabilities: {}", f.sysfs_caps.describe()));
                    }
                    host.push(f);
                }
                Err(e) => {
                    row.fail(e);
                    failed.insert(device.clone());
                }
            }
            out.row(&row);
        }
    }
    host
}

/// One row per IOMMU group: members, all on vfio-pci, viable to VFIO and to the engine.
fn judge_groups(host: &[HostFunction], out: &mut Out) {
    let mut groups: BTreeMap<u32, Vec<&HostFunction>> = BTreeMap::new();
    for f in host {
        groups.entry(f.group).or_default().push(f);
    }
    for (group, functions) in groups {
        let devices: BTreeSet<&str> = functions.iter().map(|f| f.device.as_str()).collect();
        let mut row = WireRow::new(format!("group {group}"));
        let sys = pcilibs::sysfs::Sysfs::default();
        let read = sys.iommu_group(group);
        let members: Vec<String> = match &read {
            Ok(g) => g.members.iter().map(|m| m.name.to_string()).collect(),
            Err(e) => {
                row.fail(e.to_string());
                Vec::new()
            }
        };
        row.planned = members.join(" ");
        let ours: BTreeSet<String> = functions.iter().map(|f| f.bdf.to_string()).collect();
        let foreign: Vec<&String> = members.iter().filter(|m| !ours.contains(*m)).collect();
        if !foreign.is_empty() {
            row.notes.push(format!("members not passed through: {foreign:?}"));
        }
        match sys.viable_group(group) {
            Ok(_) => {
                row.guest = "viable".into();
                row.pass(format!(
                    "ok: {} member(s) of {}, all on vfio-pci; VFIO reported the group viable when opened",
                    members.len(),
                    devices.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            Err(e) => row.fail(e.to_string()),
        }
        out.row(&row);
    }
}

fn plan_row(plan: &pcie_topology::Plan, host: &[HostFunction]) -> WireRow {
    let mut row = WireRow::new("inner plan");
    for f in host.iter().filter(|f| !f.vfio.is_pcie) {
        row.notes.push(format!(
            "{} {} has no PCI Express capability: planned on a root port like any other",
            f.device, f.bdf
        ));
    }
    row.planned = format!("q35 SeaBIOS, {} root ports", plan.ports.len());
    for p in &plan.ports {
        row.notes.push(format!(
            "{} {}: mem {} pref {}{}",
            p.id,
            p.bdf,
            pcie_topology::units::human_size(p.reservation.mem.size),
            pcie_topology::units::human_size(p.reservation.pref.size),
            p.occupant.as_ref().map_or_else(String::new, |o| format!(" for {o}"))
        ));
    }
    if let Some(bits) = plan.cpu_phys_bits() {
        row.notes.push(format!("inner CPU phys-bits {bits}"));
    }
    let ports: Vec<String> = plan
        .ports
        .iter()
        .filter_map(|p| {
            let size = p.reservation.pref.size;
            let pref = if size > 2 << 20 {
                format!(" pref64 {} ({size:#x})", pcie_topology::units::human_size(size))
            } else {
                String::new()
            };
            p.occupant.as_ref().map(|o| format!("{o} on {}{pref}", p.id))
        })
        .collect();
    row.pass(format!("ok: {}", ports.join(", ")));
    row
}

#[allow(clippy::too_many_arguments)]
fn inner(
    cfg: &InnerConfig,
    devices: &[PassDevice],
    host: &[HostFunction],
    plan: pcie_topology::Plan,
    backend: &Backend,
    kernel: &passthrough::KernelVfio,
    work: &Path,
    out: &mut Out,
) {
    out.log("booting the inner guest (TCG inside TCG)");
    let iommufd = *backend == Backend::Iommufd;
    let mut boot_row = WireRow::new("inner guest");
    boot_row.planned = format!("q35 SeaBIOS, {} MiB, kernel {}", cfg.memory_mib, cfg.kernel.release);
    let vm = match InnerVm::start(plan, cfg, host, iommufd, work) {
        Ok(vm) => vm,
        Err(e) => {
            boot_row.fail(e);
            out.row(&boot_row);
            return;
        }
    };
    let boot_ms = vm.guest.boot_time().map(|d| d.as_millis());
    let uptime = vm.guest.state().ready.map(|r| r.uptime);
    out.info("inner-boot-ms", &boot_ms.map_or_else(|| "-".into(), |b| b.to_string()));
    boot_row.guest = "READY".into();
    boot_row.hotplug_ms = boot_ms;
    boot_row.pass(format!(
        "ok: booted to READY in {:.1} s (inner kernel uptime {:.1} s)",
        boot_ms.unwrap_or_default() as f64 / 1000.0,
        uptime.unwrap_or_default()
    ));
    out.row(&boot_row);

    let mut backend_row = WireRow::new("vfio backend");
    backend_row.planned = "iommufd where kernel and QEMU have it".into();
    let qemu_iommufd = vm.qemu_has_iommufd();
    backend_row.guest = backend.name().into();
    match qemu_iommufd {
        Ok(q) => {
            backend_row.pass(format!(
                "ok: {} ({}; QEMU iommufd object {})",
                if iommufd { "iommufd" } else { "legacy container" },
                kernel.reason(),
                if q { "present" } else { "absent" }
            ));
            if iommufd && !q {
                backend_row.fail("the kernel offers iommufd but this QEMU has no iommufd object");
            }
            if cfg.require_iommufd && !iommufd {
                backend_row
                    .fail(format!("the scenario asks for iommufd, the stack offers {}", kernel.reason()));
            }
        }
        Err(e) => backend_row.fail(e),
    }
    out.row(&backend_row);

    let mut plugged = Vec::new();
    for d in devices {
        out.log(&format!("hotplugging {}", d.id));
        let p = vm.plug(d);
        out.log(&format!("{}: {}", d.id, if p.port.is_some() { "plugged" } else { &p.row.result }));
        plugged.push((d, p));
    }
    for (d, p) in &mut plugged {
        out.log(&format!(
            "unplugging {}{}",
            d.id,
            if d.stopped_unplug { " with the inner guest stopped" } else { "" }
        ));
        vm.unplug(p, d.stopped_unplug);
    }
    for (_, p) in &plugged {
        out.row(&p.row);
    }
    if let Some(d) = devices.iter().find(|d| d.functions > 1) {
        if plugged.iter().any(|(pd, p)| pd.id == d.id && p.row.ok) {
            out.log(&format!("rollback of {} with function 0 failing", d.id));
            let row = vm.rollback(d);
            out.row(&row);
        }
    }
    out.log("done");
}

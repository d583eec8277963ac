//! Host side of a `nested-vfio` scenario: builds the program, boots the outer q35 guest
//! with a virtual IOMMU, the scenario's devices on root ports and the inner QEMU in its
//! initramfs, runs the program there and turns its result lines into table rows.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::bundle::{self, Bundle};
use super::wire::{self, InnerConfig, InnerKernel, Line, PassDevice};
use crate::e2e::{Row, RunContext, ScenarioReport};
use crate::scenario::{DeviceKind, Placement, PlugExpect, Reservations, Scenario, UnplugMode, VfioBackend};
use guest_harness::arch::Arch;
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::ubuntu;

type Result<T> = std::result::Result<T, String>;

/// Outer guest RAM: the initramfs (~75 MiB unpacked), the inner QEMU and the inner
/// guest's RAM, which VFIO pins.
pub const OUTER_MEMORY_MIB: u32 = 1024;

/// Inner guest RAM.
pub const INNER_MEMORY_MIB: u32 = 128;

/// How long the inner guest may take to show or drop a device, and a quarter of how long
/// it may take to boot.
pub const GUEST_WAIT_S: u64 = 120;

/// The whole program in the outer guest must finish within this.
pub const PROGRAM_DEADLINE: Duration = Duration::from_secs(1200);

/// Unplug deadline when the scenario gives none (ACPI hotplug completes in 1–2 s inside
/// the inner guest; the stopped-guest unplug waits for all of it).
pub const DEFAULT_UNPLUG_TIMEOUT_S: u64 = 10;

/// Inner guest kernel words: it is a throw-away test guest under two layers of software
/// emulation, so speed wins over hardening (each saves seconds: no retpoline patching, no
/// crypto self-tests, no W+X scan, no LSM set-up, no audit, no clocksource watchdog).
pub const INNER_CMDLINE: [&str; 6] =
    ["mitigations=off", "cryptomgr.notests", "rodata=off", "lsm=lockdown", "audit=0", "tsc=reliable"];

/// Whether QEMU of this version (`10.0.6 (Debian …)`) has the `iommufd` object (8.2+).
pub fn qemu_has_iommufd(version: &str) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (8, 2)
}

/// Checks that the scenario fits this mode and lists its devices with their outer ports.
pub fn pass_devices(scenario: &Scenario) -> Result<Vec<PassDevice>> {
    if scenario.arch != Arch::X86_64 || scenario.firmware() != Firmware::SeaBios {
        return Err("nested-vfio runs on x86_64 with SeaBIOS (q35 and intel-iommu)".into());
    }
    if scenario.spare_ports > 0 || scenario.reservations != Reservations::Planned || scenario.native_hotplug {
        return Err("nested-vfio takes no spare_ports, reservations or native_hotplug".into());
    }
    if scenario.devices.is_empty() {
        return Err("nested-vfio needs at least one [[device]]".into());
    }
    let mut out = Vec::new();
    for (n, d) in scenario.devices.iter().enumerate() {
        let slot = u8::try_from(n + 1).ok().filter(|s| *s < 0x1f).ok_or("too many devices")?;
        let kind = match d.kind {
            DeviceKind::Ivshmem | DeviceKind::Nvme | DeviceKind::E1000e => d.kind.name(),
            other => {
                return Err(format!(
                    "device `{}`: kind `{}` is not passed through here (ivshmem, nvme, e1000e)",
                    d.id,
                    other.name()
                ))
            }
        };
        if d.functions > 1 && !matches!(d.kind, DeviceKind::E1000e | DeviceKind::Nvme) {
            return Err(format!(
                "device `{}`: several functions only for e1000e (one slot) and nvme (PF and VFs)",
                d.id
            ));
        }
        if d.unplug == UnplugMode::GuestHung {
            return Err(format!(
                "device `{}`: nested-vfio has no guest-hung unplug (guest-stopped is its pending case)",
                d.id
            ));
        }
        if d.place != Placement::Planned || d.expect != PlugExpect::Visible {
            return Err(format!("device `{}`: nested-vfio devices are planned and must be visible", d.id));
        }
        out.push(PassDevice {
            id: d.id.clone(),
            kind: kind.into(),
            port_slot: slot,
            functions: d.functions,
            stopped_unplug: d.unplug == UnplugMode::GuestStopped,
        });
    }
    Ok(out)
}

/// `-object`/`-device` arguments of the outer guest's devices, each on its own root port
/// (`nrpN` in slot N of `pcie.0`).
pub fn outer_devices(scenario: &Scenario, devices: &[PassDevice]) -> (Vec<String>, Vec<String>) {
    let mut objects = Vec::new();
    // aw-bits=39 (QEMU 7.2's default; 9.2 made it 48): the inner QEMU maps every BAR it
    // mmaps into the IOMMU for peer-to-peer DMA. gpu0's 128 GiB BAR sits at 512 GiB in the
    // inner guest; with 48 bits the outer kernel accepts that mapping, and Linux 6.12's
    // type1 driver walks a BAR mapping one 4 KiB page at a time (33.5 M steps under TCG,
    // 60-120 s with the inner vCPU stopped in the ioctl). With 39 bits the IOVA is outside
    // the IOMMU's aperture, the kernel refuses it at once and QEMU goes on without
    // peer-to-peer for that BAR, on every stack alike.
    let mut devs = vec!["intel-iommu,intremap=on,caching-mode=on,aw-bits=39".to_string()];
    for (d, spec) in devices.iter().zip(&scenario.devices) {
        let port = format!("nrp{}", d.port_slot);
        devs.push(format!(
            "pcie-root-port,id={port},bus=pcie.0,chassis={0},slot={0},addr={0:02x}.0",
            d.port_slot
        ));
        match spec.kind {
            DeviceKind::Ivshmem => {
                let size = spec.bar_size.map_or(1 << 30, |s| s.0);
                objects.push(format!("memory-backend-ram,id={}-mem,size={size},reserve=off", d.id));
                devs.push(format!("ivshmem-plain,id={0},memdev={0}-mem,bus={port}", d.id));
            }
            DeviceKind::Nvme => {
                // QEMU 7.2 wants a subsystem and flexible queue and interrupt resources for
                // SR-IOV: at least two queues and one interrupt per VF.
                let vfs = d.vfs().max(2);
                devs.push(format!("nvme-subsys,id={}-subsys", d.id));
                devs.push(format!(
                    "nvme,id={0},serial={0},subsys={0}-subsys,sriov_max_vfs={vfs},sriov_vq_flexible={1},sriov_vi_flexible={vfs},bus={port}",
                    d.id,
                    2 * u16::from(vfs)
                ));
            }
            _ => {
                let mf = if d.functions > 1 { ",multifunction=on" } else { "" };
                devs.push(format!("e1000e,id={},bus={port},addr=0.0{mf}", d.id));
                for f in 1..d.functions {
                    devs.push(format!("e1000e,id={}-f{f},bus={port},addr=0.{f}", d.id));
                }
            }
        }
    }
    (objects, devs)
}

/// Builds the program for the outer guest (`cargo build --bin nested-vfio`) and returns
/// the executable.
pub fn build_program() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "-p", "xtask", "--bin", "nested-vfio", "--message-format=json-render-diagnostics"])
        .current_dir(guest_harness::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{cargo} build: {e}"))?;
    if !out.status.success() {
        return Err(format!("building nested-vfio failed ({})", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "nested-vfio")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo build named no nested-vfio executable".into())
}

/// The outer guest: q35, `kernel-irqchip=split`, intel-iommu, the devices, VFIO modules,
/// the inner QEMU and the program in its initramfs.
pub fn outer_spec(scenario: &Scenario, devices: &[PassDevice], files: Bundle) -> GuestSpec {
    let mut spec = GuestSpec::new(Arch::X86_64).firmware(Firmware::SeaBios);
    spec.name = scenario.name.clone();
    spec.machine_opts.push("kernel-irqchip=split".into());
    spec.phys_bits = Some(46);
    spec.memory_mib = OUTER_MEMORY_MIB;
    let (objects, devs) = outer_devices(scenario, devices);
    spec.objects = objects;
    spec.devices = devs;
    spec.cmdline.push("intel_iommu=on".into());
    spec.initramfs.modules = vec!["vfio-pci".into(), "vfio_iommu_type1".into()];
    if devices.iter().any(|d| d.vfs() > 0) {
        // The PF's own driver creates the VFs.
        spec.initramfs.modules.push("nvme".into());
    }
    if scenario.vfio_backend == VfioBackend::Iommufd {
        // /dev/iommu; vfio's cdev nodes need it too.
        spec.initramfs.modules.push("iommufd".into());
    }
    spec.initramfs.files = files.into_files();
    spec.boot_timeout = Duration::from_secs(300);
    spec
}

/// Runs one `nested-vfio` scenario.
pub fn run(scenario: &Scenario, ctx: &RunContext) -> ScenarioReport {
    let mut report = ScenarioReport::new(scenario);
    if let Err(e) = run_checked(scenario, ctx, &mut report) {
        report.error = Some(e);
    }
    report
}

fn progress(ctx: &RunContext, scenario: &Scenario, text: &str) {
    if ctx.progress {
        eprintln!("[{}] {text}", scenario.name);
    }
}

fn run_checked(scenario: &Scenario, ctx: &RunContext, report: &mut ScenarioReport) -> Result<()> {
    let devices = pass_devices(scenario)?;
    let dir = ctx.scenario_dir(scenario).map_err(|e| format!("run folder: {e}"))?;
    let program = bundle::stripped(&build_program()?, &dir);
    let assets = GuestAssets::ensure(&ctx.stack, Arch::X86_64).map_err(|e| e.to_string())?;
    report.set_versions(scenario, &assets);
    let root = ctx.stack.root().map_err(|e| e.to_string())?;
    let iommufd = scenario.vfio_backend == VfioBackend::Iommufd;
    if iommufd && !qemu_has_iommufd(&root.qemu_version) {
        return Err(format!(
            "vfio_backend = \"iommufd\" needs QEMU 8.2 or later inside; stack {} has QEMU {}: run it with --stack trixie or --stack current",
            ctx.stack.name(),
            root.qemu_version
        ));
    }
    // The inner guest always boots the stack's Debian kernel; the outer one needs
    // iommufd for `vfio_backend = "iommufd"` (see guest_harness::ubuntu).
    let outer_assets = if iommufd {
        progress(ctx, scenario, "iommufd: Ubuntu's kernel for the outer guest, the stack's QEMU inside");
        GuestAssets {
            kernel: ubuntu::ubuntu_kernel(&ctx.stack.debs()).map_err(|e| e.to_string())?,
            ..assets.clone()
        }
    } else {
        assets.clone()
    };
    report.kernel = outer_assets.kernel.release.clone();
    report.kernel_version = format!("{} {}", outer_assets.kernel.package, outer_assets.kernel.version);
    let key = format!("{}-{}", assets.kernel.release, assets.kernel.version);
    let cache_dir = ctx.stack.cache_root().join("nested");
    let (kernel_file, kernel_path) = match bundle::uncompressed_kernel(&assets.kernel.image, &cache_dir, &key)
    {
        Ok(elf) => (elf, bundle::KERNEL),
        Err(e) => {
            progress(ctx, scenario, &format!("inner guest boots the compressed kernel (~30 s slower): {e}"));
            (assets.kernel.image.clone(), bundle::KERNEL_BZIMAGE)
        }
    };
    let mut files = Bundle::new();
    let inner_qemu = files.add_stack_qemu(&root)?;
    progress(ctx, scenario, &format!("inner QEMU {} (stack {})", root.qemu_version, ctx.stack.name()));
    let cfg = InnerConfig {
        devices: devices.clone(),
        kernel: InnerKernel {
            image: kernel_path.into(),
            release: assets.kernel.release.clone(),
            package: assets.kernel.package.clone(),
            version: assets.kernel.version.clone(),
        },
        memory_mib: INNER_MEMORY_MIB,
        cmdline: INNER_CMDLINE.iter().map(|w| w.to_string()).collect(),
        unplug_timeout_ms: scenario.unplug_timeout_s.unwrap_or(DEFAULT_UNPLUG_TIMEOUT_S) * 1000,
        guest_wait_s: GUEST_WAIT_S,
        require_iommufd: iommufd,
        qemu: inner_qemu,
        versions: assets.versions.clone(),
    };
    files.add_elf(&program, bundle::PROGRAM)?;
    files.add_file(&kernel_file, kernel_path, 0o644)?;
    files.add_data(bundle::CONFIG, 0o644, serde_json::to_vec_pretty(&cfg).map_err(|e| e.to_string())?);
    progress(
        ctx,
        scenario,
        &format!("outer initramfs: {} extra files, {} MiB", files.len(), files.bytes() >> 20),
    );
    let spec = outer_spec(scenario, &devices, files);
    let guest = Guest::boot(&spec, &outer_assets).map_err(|e| e.to_string())?;
    report.qemu = guest.command_line();
    report.accel = format!("{} (inner tcg)", guest.accel().qemu_name());
    report.boot_ms = guest.boot_time().map(|d| d.as_millis());
    std::fs::write(dir.join("qemu.txt"), format!("{}\n", report.qemu)).map_err(|e| e.to_string())?;

    let started = Instant::now();
    let command = format!("set -o pipefail; {} {} 2>&1 | tee /dev/console", bundle::PROGRAM, bundle::CONFIG);
    let done = AtomicBool::new(false);
    let output = std::thread::scope(|scope| {
        scope.spawn(|| follow_progress(&guest, ctx, scenario, &done));
        let out = guest.exec(&command, Instant::now() + PROGRAM_DEADLINE);
        done.store(true, Ordering::Relaxed);
        out
    })
    .map_err(|e| format!("the program in the outer guest: {e}"))?;
    let ran = started.elapsed();
    std::fs::write(dir.join("output.txt"), output.lines.join("\n") + "\n").map_err(|e| e.to_string())?;

    let mut summary = Row::new("outer guest");
    summary.planned = format!("q35 + intel-iommu, {} device(s)", devices.len());
    summary.guest = report.kernel.clone();
    let mut other = Vec::new();
    for line in &output.lines {
        match wire::parse(line) {
            Line::Row(r) => report.rows.push(r.into()),
            Line::Info { key, value } => summary.notes.push(format!("{key}: {value}")),
            Line::Log(_) => {}
            Line::Other(text) => other.push(text),
        }
    }
    let status = output.status.unwrap_or(-1);
    summary.notes.push(format!("program ran {:.1} s, exit status {status}", ran.as_secs_f64()));
    if status == 0 && !report.rows.is_empty() {
        summary.ok = true;
        summary.result = format!(
            "ok: outer boot {:.1} s, program {:.1} s",
            report.boot_ms.unwrap_or(0) as f64 / 1000.0,
            ran.as_secs_f64()
        );
    } else {
        summary.fail(format!("program exit status {status} with {} rows", report.rows.len()));
        summary.notes.extend(other.iter().rev().take(20).rev().cloned());
    }
    report.rows.insert(0, summary);
    Ok(())
}

/// Prints the program's `NV LOG` lines as they reach the console (the reporter returns
/// its output only when it ends).
fn follow_progress(guest: &Guest, ctx: &RunContext, scenario: &Scenario, done: &AtomicBool) {
    let mut printed: BTreeSet<String> = BTreeSet::new();
    while !done.load(Ordering::Relaxed) {
        for line in guest.state().console_tail {
            let text = match wire::parse(line.trim()) {
                Line::Log(text) => text,
                // The inner guest's boot progress, from the harness running in the outer guest.
                Line::Other(text) if text.starts_with("[inner]") => text,
                _ => continue,
            };
            if printed.insert(text.clone()) {
                progress(ctx, scenario, &text);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn iommufd_needs_qemu_8_2() {
        assert!(!qemu_has_iommufd("7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"));
        assert!(!qemu_has_iommufd("8.1.0"));
        assert!(qemu_has_iommufd("8.2.2"));
        assert!(qemu_has_iommufd("10.0.6 (Debian 1:10.0.6+ds-0+deb13u2)"));
        assert!(qemu_has_iommufd("11.1.3 (Debian 1:11.1.3+ds-2~bpo13+1)"));
        assert!(!qemu_has_iommufd(""));
    }

    fn scenario(devices: &str) -> Scenario {
        let text = format!("name = \"n\"\narch = \"x86_64\"\nmode = \"nested-vfio\"\n{devices}");
        Scenario::parse(&text, Path::new("n.toml")).unwrap()
    }

    const DEVICES: &str = r#"
        [[device]]
        id = "gpu0"
        kind = "ivshmem"
        bar_size = "128G"
        [[device]]
        id = "nvme0"
        kind = "nvme"
        unplug = "guest-stopped"
        [[device]]
        id = "mf0"
        kind = "e1000e"
        functions = 2
        [[device]]
        id = "nvme1"
        kind = "nvme"
        functions = 4
    "#;

    #[test]
    fn outer_devices_each_on_a_root_port_behind_the_iommu() {
        let s = scenario(DEVICES);
        let devices = pass_devices(&s).unwrap();
        assert_eq!(devices.iter().map(|d| d.port_slot).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(devices[1].stopped_unplug);
        assert_eq!(devices.iter().map(|d| d.vfs()).collect::<Vec<_>>(), [0, 0, 0, 3]);
        let (objects, devs) = outer_devices(&s, &devices);
        assert_eq!(objects, ["memory-backend-ram,id=gpu0-mem,size=137438953472,reserve=off"]);
        assert_eq!(devs[0], "intel-iommu,intremap=on,caching-mode=on,aw-bits=39");
        assert!(devs.contains(&"pcie-root-port,id=nrp3,bus=pcie.0,chassis=3,slot=3,addr=03.0".to_string()));
        assert!(devs.iter().any(|d| d.starts_with("nvme,id=nvme0") && d.contains("sriov_max_vfs=2")));
        assert!(devs.iter().any(|d| d.starts_with("nvme,id=nvme1")
            && d.contains("sriov_max_vfs=3,sriov_vq_flexible=6,sriov_vi_flexible=3")));
        assert!(devs.contains(&"e1000e,id=mf0,bus=nrp3,addr=0.0,multifunction=on".to_string()));
        assert!(devs.contains(&"e1000e,id=mf0-f1,bus=nrp3,addr=0.1".to_string()));
        let spec = outer_spec(&s, &devices, Bundle::new());
        assert_eq!(spec.machine_opts, ["kernel-irqchip=split"]);
        assert!(spec.cmdline.contains(&"intel_iommu=on".to_string()));
        assert!(spec.kernel_cmdline().contains("no_timer_check"), "every x86 guest skips the timer check");
        assert!(spec.initramfs.modules.contains(&"nvme".to_string()), "the PF driver makes the VFs");
    }

    #[test]
    fn what_the_mode_refuses() {
        let e = pass_devices(&scenario("[[device]]\nid = \"v\"\nkind = \"virtio-net\"\n")).unwrap_err();
        assert!(e.contains("virtio-net"), "{e}");
        let e = pass_devices(&scenario(
            "[[device]]\nid = \"g\"\nkind = \"ivshmem\"\nbar_size = \"1G\"\nfunctions = 2\n",
        ))
        .unwrap_err();
        assert!(e.contains("e1000e"), "{e}");
        assert!(pass_devices(&scenario("")).is_err());
    }
}

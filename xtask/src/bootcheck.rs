//! The boot check: one lean guest per architecture, booted in parallel, each given one
//! small hotplug and unplug (the harness's `hotplug` steps over `qmp-hotplug`'s
//! client), with a table of what
//! the guests reported. It proves the provisioning, the initramfs, the reporter and the
//! QMP path on every architecture; the planned-topology scenarios build on it.

use serde_json::json;

use guest_harness::arch::Arch;
use guest_harness::deadline;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::hotplug::{self, Expect};
use guest_harness::reporter::GuestState;
use guest_harness::stacks::Stack;
use guest_harness::table::Table;

/// The result for one architecture.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BootCheck {
    /// Guest architecture.
    pub arch: String,
    /// Firmware.
    pub firmware: String,
    /// The stack.
    pub stack: String,
    /// QEMU's version.
    pub qemu_version: String,
    /// The firmware with its version.
    pub firmware_version: String,
    /// Guest kernel package and version.
    pub kernel_version: String,
    /// Accelerator (tcg or kvm).
    pub accel: String,
    /// Guest kernel release.
    pub kernel: String,
    /// From starting QEMU to READY.
    pub boot_ms: Option<u128>,
    /// PCI functions the guest reported at boot.
    pub pci_functions: usize,
    /// Channel devices the guest reported at boot.
    pub ccw_devices: usize,
    /// The devices hotplugged and unplugged, in order.
    pub hotplugs: Vec<Hotplugged>,
    /// `ok`, or what went wrong.
    pub result: String,
    /// Every function the guest reported at boot: address, ids, class, BARs.
    pub functions: Vec<String>,
}

/// One device plugged and unplugged again.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Hotplugged {
    /// What was plugged.
    pub device: String,
    /// From `device_add` to the guest showing it.
    pub plug_ms: Option<u128>,
    /// From `device_del` to the guest no longer showing it.
    pub unplug_ms: Option<u128>,
}

impl BootCheck {
    /// Whether every step passed.
    pub fn ok(&self) -> bool {
        self.result == "ok"
    }
}

/// The guest of the boot check for `arch`: one hotplug-capable root port (x86_64,
/// aarch64); s390x needs none.
pub fn spec(arch: Arch) -> GuestSpec {
    let mut spec = GuestSpec::new(arch);
    spec.name = format!("boot-{arch}");
    if arch != Arch::S390x {
        spec.devices.push("pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1".into());
    }
    spec
}

fn functions(state: &GuestState) -> Vec<String> {
    let mut out: Vec<String> = state
        .pci
        .values()
        .map(|d| {
            let bars: Vec<String> = d.bars().map(|b| format!("{}:{b}", b.index)).collect();
            format!("{} {:04x}:{:04x} class {:06x} {}", d.bdf, d.vendor, d.device, d.class, bars.join(" "))
        })
        .collect();
    out.extend(state.ccw.values().map(|c| format!("ccw {} {} online={}", c.busid, c.cutype, c.online)));
    out
}

fn check_pci(guest: &Guest, row: &mut BootCheck) -> Result<(), String> {
    let qmp = guest.qmp(deadline(10)).map_err(|e| e.to_string())?;
    // virtio-net is modern-only (device 0x1041) on a PCIe port; on s390x's zPCI bus it is
    // transitional (0x1000) up to the s390-ccw-virtio-11.0 machine and modern-only from
    // 11.1 on, so there the id is the one QEMU presents.
    let (args, device) = if guest.arch() == Arch::S390x {
        (json!({"driver": "virtio-net-pci", "id": "net0"}), None)
    } else {
        (json!({"driver": "virtio-net-pci", "id": "net0", "bus": "rp1"}), Some(0x1041))
    };
    let mut done = Hotplugged { device: "virtio-net-pci".into(), ..Hotplugged::default() };
    let result = (|| {
        let plugged =
            hotplug::plug(guest, &qmp, args, Expect { vendor: 0x1af4, device, bars: &[] }, deadline(60))
                .map_err(|e| e.to_string())?;
        done.plug_ms = Some(plugged.seen_after.as_millis());
        if !plugged.bar_problems.is_empty() {
            return Err(plugged.bar_problems.join("; "));
        }
        let unplugged = hotplug::unplug(guest, &qmp, "net0", plugged.device.bdf, deadline(60))
            .map_err(|e| e.to_string())?;
        done.unplug_ms = Some(unplugged.gone_after.as_millis());
        Ok(())
    })();
    row.hotplugs.push(done);
    result
}

fn check_ccw(guest: &Guest, row: &mut BootCheck) -> Result<(), String> {
    let qmp = guest.qmp(deadline(10)).map_err(|e| e.to_string())?;
    let mut done = Hotplugged { device: "virtio-net-ccw fe.0.0042".into(), ..Hotplugged::default() };
    let args = json!({"driver": "virtio-net-ccw", "id": "net1", "devno": "fe.0.0042"});
    let result = (|| {
        let (_, took) =
            hotplug::plug_ccw(guest, &qmp, args, "0.0.0042", deadline(60)).map_err(|e| e.to_string())?;
        done.plug_ms = Some(took.as_millis());
        let gone =
            hotplug::unplug_ccw(guest, &qmp, "net1", "0.0.0042", deadline(60)).map_err(|e| e.to_string())?;
        done.unplug_ms = Some(gone.gone_after.as_millis());
        Ok(())
    })();
    row.hotplugs.push(done);
    result
}

/// Boots and checks one architecture.
pub fn check(arch: Arch, stack: &Stack) -> BootCheck {
    let spec = spec(arch);
    let mut row = BootCheck {
        arch: arch.to_string(),
        firmware: spec.firmware.name().into(),
        stack: stack.name().into(),
        ..BootCheck::default()
    };
    let result = GuestAssets::ensure(stack, arch).map_err(|e| e.to_string()).and_then(|assets| {
        row.kernel = assets.kernel.release.clone();
        row.kernel_version = format!("{} {}", assets.kernel.package, assets.kernel.version);
        row.qemu_version = assets.versions.qemu.clone();
        row.firmware_version = assets.versions.firmware(spec.firmware, arch);
        let guest = Guest::boot(&spec, &assets).map_err(|e| e.to_string())?;
        row.accel = guest.accel().qemu_name().into();
        row.boot_ms = guest.boot_time().map(|d| d.as_millis());
        let state = guest.state();
        row.pci_functions = state.pci.len();
        row.ccw_devices = state.ccw.len();
        row.functions = functions(&state);
        if arch == Arch::S390x {
            check_ccw(&guest, &mut row)?;
        }
        check_pci(&guest, &mut row)
    });
    row.result = match result {
        Ok(()) => "ok".into(),
        Err(e) => e,
    };
    row
}

/// Runs the boot check for `arches` in parallel.
pub fn run(arches: &[Arch], stack: &Stack) -> Vec<BootCheck> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = arches.iter().map(|&arch| scope.spawn(move || check(arch, stack))).collect();
        handles
            .into_iter()
            .zip(arches)
            .map(|(h, arch)| {
                h.join().unwrap_or_else(|_| BootCheck {
                    arch: arch.to_string(),
                    result: "the check panicked".into(),
                    ..BootCheck::default()
                })
            })
            .collect()
    })
}

fn opt_ms(v: Option<u128>) -> String {
    v.map_or_else(|| "-".into(), |ms| ms.to_string())
}

/// The summary table and the table of reported functions.
pub fn render(rows: &[BootCheck]) -> String {
    let mut summary = Table::new([
        "arch",
        "stack",
        "QEMU",
        "firmware",
        "accel",
        "kernel",
        "boot ms",
        "pci",
        "ccw",
        "hotplug",
        "plug ms",
        "unplug ms",
        "result",
    ]);
    let mut devices = Table::new(["arch", "reported at boot"]);
    for r in rows {
        let result = r.result.lines().next().unwrap_or("").to_string();
        let steps: Vec<Option<&Hotplugged>> =
            if r.hotplugs.is_empty() { vec![None] } else { r.hotplugs.iter().map(Some).collect() };
        for (i, step) in steps.iter().enumerate() {
            // Guest columns on its first line only; the result on its last.
            let once = |v: String| if i == 0 { v } else { String::new() };
            summary.row([
                r.arch.clone(),
                once(r.stack.clone()),
                once(r.qemu_version.clone()),
                once(r.firmware_version.clone()),
                once(r.accel.clone()),
                once(r.kernel.clone()),
                once(opt_ms(r.boot_ms)),
                once(r.pci_functions.to_string()),
                once(r.ccw_devices.to_string()),
                step.map_or_else(|| "-".into(), |h| h.device.clone()),
                opt_ms(step.and_then(|h| h.plug_ms)),
                opt_ms(step.and_then(|h| h.unplug_ms)),
                if i + 1 == steps.len() { result.clone() } else { "ok".into() },
            ]);
        }
        for f in &r.functions {
            devices.row([r.arch.clone(), f.clone()]);
        }
    }
    format!(
        "Boot check (provisioning, reporter and QMP on every architecture; the planned-topology scenarios are wired on top of it)\n\n{}\n{}",
        summary.render(),
        devices.render()
    )
}

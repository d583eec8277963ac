//! Field experiments that the end-to-end scenarios build on, runnable one by one
//! (`cargo xtask experiment NAME`). Each prints the QEMU command line, what the guest
//! reported and the measured times, and ends with a verdict line; xtask/README.md
//! ("Field notes") records the results.

use std::time::Duration;

use serde_json::{json, Value};

use guest_harness::arch::Arch;
use guest_harness::deadline;
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::hotplug::{self, Expect, Plugged};
use guest_harness::reporter::GuestState;
use guest_harness::stacks::Stack;
use pcilibs::bdf::Bdf;
use qmp_hotplug::QmpClient;

/// `ivshmem-plain` (Red Hat Inter-VM shared memory) with a 256-byte register BAR 0 and
/// its memory backend as BAR 2, of `size` bytes.
pub fn ivshmem(size: u64) -> [(u8, u64); 2] {
    [(0, 0x100), (2, size)]
}

fn expect_ivshmem(bars: &[(u8, u64)]) -> Expect<'_> {
    Expect { vendor: 0x1af4, device: Some(0x1110), bars }
}

const GIB: u64 = 1 << 30;

/// The experiments, by name.
pub const NAMES: &[&str] = &[
    "root-port-128g",
    "switch-placeholder",
    "switch-no-placeholder",
    "aarch64-hpmmioprefsize",
    "s390x-ccw-zpci",
    "reservation-mixes",
];

/// An experiment could not be run at all (its findings are printed, not returned).
pub type Result<T> = std::result::Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Prints the windows of `bridge` and of the bridges above it.
fn print_windows(state: &GuestState, bridge: Bdf) {
    let Some(dev) = state.pci.get(&bridge) else { return };
    for up in dev.upstream.iter().chain(std::iter::once(&bridge)) {
        if let Some(b) = state.pci.get(up) {
            let windows: Vec<String> = b.windows().map(|w| w.to_string()).collect();
            println!("    window {}: {}", b.bdf, windows.join(" "));
        }
    }
}

fn print_plugged(p: &Plugged) {
    println!("  guest sees {} at {} after {}", p.id, p.device.bdf, ms(p.seen_after));
    for bar in p.device.bars() {
        println!("    BAR {}: {bar}", bar.index);
    }
    if let Some(parent) = p.device.parent() {
        print_windows(&p.state, parent);
    }
    for m in &p.kmsg {
        println!("    kmsg: {m}");
    }
    if p.bar_problems.is_empty() {
        println!("  => every BAR assigned inside the parent's windows");
    } else {
        for problem in &p.bar_problems {
            println!("  => PROBLEM: {problem}");
        }
    }
}

fn boot(spec: &GuestSpec, stack: &Stack) -> Result<Guest> {
    let assets = GuestAssets::ensure(stack, spec.arch).map_err(s)?;
    let guest = Guest::boot(spec, &assets).map_err(s)?;
    println!(
        "stack {}: QEMU {}, {}, kernel {} ({} {})",
        assets.versions.stack,
        assets.versions.qemu,
        assets.versions.firmware(spec.firmware, spec.arch),
        assets.kernel.release,
        assets.kernel.package,
        assets.kernel.version
    );
    println!("$ {}", guest.command_line());
    println!(
        "  booted ({}) in {:.1} s",
        guest.accel().qemu_name(),
        guest.boot_time().unwrap_or_default().as_secs_f64()
    );
    Ok(guest)
}

/// Plugs, reports, unplugs, reports. Returns whether the BARs were fine.
fn plug_unplug(guest: &Guest, qmp: &QmpClient, args: Value, expect: Expect<'_>) -> Result<bool> {
    let id = args.get("id").and_then(Value::as_str).unwrap_or("").to_string();
    println!("  device_add {args}");
    let plugged = hotplug::plug(guest, qmp, args, expect, deadline(60)).map_err(s)?;
    print_plugged(&plugged);
    match hotplug::unplug(guest, qmp, &id, plugged.device.bdf, deadline(30)) {
        Ok(u) => println!(
            "  device_del {id}: DEVICE_DELETED after {}, gone from the guest after {}",
            ms(u.event_after),
            ms(u.gone_after)
        ),
        Err(e) => println!("  device_del {id}: {e}"),
    }
    Ok(plugged.bar_problems.is_empty())
}

/// Plugs (and unplugs) `gpu0`: an ivshmem of `gib` GiB on memory backend `m0`, onto `rp1`.
fn plug_gpu0(guest: &Guest, qmp: &QmpClient, gib: u64) -> Result<bool> {
    let args = json!({"driver": "ivshmem-plain", "id": "gpu0", "memdev": "m0", "bus": "rp1"});
    plug_unplug(guest, qmp, args, expect_ivshmem(&ivshmem(gib * GIB)))
}

/// (a) A 128 GiB BAR hotplugged onto a root port that reserves 256 GiB of 64-bit
/// prefetchable space.
pub fn root_port_128g(stack: &Stack, firmware: Firmware, opts: Options) -> Result<bool> {
    let gib = opts.bar_gib.unwrap_or(128);
    let mut spec = GuestSpec::new(Arch::X86_64).firmware(firmware);
    spec.name = format!("root-port-{gib}g-{}", firmware.name());
    opts.apply(&mut spec);
    spec.phys_bits = Some(46);
    spec.objects.push(format!("memory-backend-ram,id=m0,size={gib}G,reserve=off"));
    let reserve = opts.reserve_gib.unwrap_or(2 * gib);
    spec.devices.push(format!("pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,pref64-reserve={reserve}G"));
    if firmware == Firmware::Ovmf {
        // OVMF's 64-bit aperture must hold the reservation (value in MiB).
        spec.extra_args.extend(["-fw_cfg".into(), "name=opt/ovmf/X-PciMmio64Mb,string=524288".into()]);
    }
    let guest = boot(&spec, stack)?;
    let qmp = guest.qmp(deadline(10)).map_err(s)?;
    plug_gpu0(&guest, &qmp, gib)
}

/// (b) Placeholders: firmware sizes each switch downstream port's window from a boot-time
/// ivshmem of the needed size; the guest's kernel keeps the window after the placeholder
/// leaves, and the real device is plugged into it.
pub fn switch_placeholder(
    stack: &Stack,
    firmware: Firmware,
    placeholder: bool,
    opts: Options,
) -> Result<bool> {
    let gib = opts.bar_gib.unwrap_or(32);
    let mut spec = GuestSpec::new(Arch::X86_64).firmware(firmware);
    spec.name = format!("switch-{}-{}", if placeholder { "placeholder" } else { "plain" }, firmware.name());
    opts.apply(&mut spec);
    spec.phys_bits = Some(46);
    for i in 0..2 {
        spec.objects.push(format!("memory-backend-ram,id=ph{i},size={gib}G,reserve=off"));
        spec.objects.push(format!("memory-backend-ram,id=m{i},size={gib}G,reserve=off"));
    }
    spec.devices.push("pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1".into());
    spec.devices.push("x3130-upstream,id=up1,bus=rp1".into());
    for i in 0..2 {
        spec.devices.push(format!("xio3130-downstream,id=dp{i},bus=up1,chassis={},slot={i}", 10 + i));
        if placeholder {
            spec.devices.push(format!("ivshmem-plain,id=placeholder{i},memdev=ph{i},bus=dp{i}"));
        }
    }
    if firmware == Firmware::Ovmf {
        // Room for both windows at their natural alignment.
        let mib = 8 * gib * 1024;
        spec.extra_args.extend(["-fw_cfg".into(), format!("name=opt/ovmf/X-PciMmio64Mb,string={mib}")]);
    }
    let guest = boot(&spec, stack)?;
    let state = guest.state();
    // TI XIO3130 downstream ports.
    let ports: Vec<Bdf> =
        state.pci.values().filter(|d| d.vendor == 0x104c && d.device == 0x8233).map(|d| d.bdf).collect();
    for port in &ports {
        println!("  at boot:");
        print_windows(&state, *port);
    }
    let qmp = guest.qmp(deadline(10)).map_err(s)?;
    if placeholder {
        for i in 0..2 {
            let id = format!("placeholder{i}");
            let bdf = state
                .find(0x1af4, 0x1110)
                .find(|d| d.parent().is_some_and(|p| ports.get(i) == Some(&p)))
                .map(|d| d.bdf)
                .ok_or("placeholder not found in the guest")?;
            match hotplug::unplug(&guest, &qmp, &id, bdf, deadline(30)) {
                Ok(u) => println!("  device_del {id}: gone after {}", ms(u.gone_after)),
                Err(e) => return Err(format!("device_del {id}: {e}")),
            }
        }
        let after = guest.state();
        println!("  after removing the placeholders:");
        for port in &ports {
            print_windows(&after, *port);
        }
    }
    let mut ok = true;
    for i in 0..2 {
        let args = json!({"driver": "ivshmem-plain", "id": format!("gpu{i}"), "memdev": format!("m{i}"), "bus": format!("dp{i}")});
        println!("  device_add {args}");
        let plugged = hotplug::plug(&guest, &qmp, args, expect_ivshmem(&ivshmem(gib * GIB)), deadline(60))
            .map_err(s)?;
        print_plugged(&plugged);
        ok &= plugged.bar_problems.is_empty();
    }
    Ok(ok)
}

/// (c) aarch64 `virt`, two root ports, a small device on the second, then a large BAR
/// onto the first. Without firmware Linux sizes the windows itself, told by
/// `pci=hpmmioprefsize=`; with UEFI the ports carry `pref64-reserve` instead.
pub fn aarch64_hpmmioprefsize(stack: &Stack, opts: Options) -> Result<bool> {
    let gib = opts.bar_gib.unwrap_or(128);
    let reserve = opts.reserve_gib.unwrap_or(2 * gib);
    let firmware = opts.firmware.unwrap_or(Firmware::None);
    let mut spec = GuestSpec::new(Arch::Aarch64).firmware(firmware);
    spec.name = format!("aarch64-{}", firmware.name());
    spec.objects.push(format!("memory-backend-ram,id=m0,size={gib}G,reserve=off"));
    let port_extra = if firmware == Firmware::Uefi {
        format!(",pref64-reserve={reserve}G")
    } else {
        spec.cmdline.push(format!("pci=hpmmioprefsize={reserve}G,hpmmiosize=64M"));
        String::new()
    };
    for i in 1..=2 {
        spec.devices.push(format!("pcie-root-port,id=rp{i},bus=pcie.0,chassis={i},slot={i}{port_extra}"));
    }
    let guest = boot(&spec, stack)?;
    let qmp = guest.qmp(deadline(10)).map_err(s)?;
    let args = json!({"driver": "virtio-net-pci", "id": "net0", "bus": "rp2"});
    println!("  device_add {args}");
    let expect = Expect { vendor: 0x1af4, device: Some(0x1041), bars: &[] };
    let net = hotplug::plug(&guest, &qmp, args, expect, deadline(60)).map_err(s)?;
    print_plugged(&net);
    plug_gpu0(&guest, &qmp, gib)
}

/// (c) s390x: a virtio-net-ccw device number shows on the ccw bus; virtio-net-pci becomes
/// a zPCI function.
pub fn s390x_ccw_zpci(stack: &Stack) -> Result<bool> {
    let mut spec = GuestSpec::new(Arch::S390x);
    spec.name = "s390x-ccw-zpci".into();
    let guest = boot(&spec, stack)?;
    let qmp = guest.qmp(deadline(10)).map_err(s)?;
    let args = json!({"driver": "virtio-net-ccw", "id": "net0", "devno": "fe.0.0042"});
    println!("  device_add {args}");
    let (ccw, took) = hotplug::plug_ccw(&guest, &qmp, args, "0.0.0042", deadline(30)).map_err(s)?;
    println!("  guest ccw {} cutype {} online={} after {}", ccw.busid, ccw.cutype, ccw.online, ms(took));
    let args = json!({"driver": "virtio-net-pci", "id": "net1"});
    println!("  device_add {args}");
    let plugged =
        hotplug::plug(&guest, &qmp, args, Expect { vendor: 0x1af4, device: None, bars: &[] }, deadline(60))
            .map_err(s)?;
    print_plugged(&plugged);
    if let Some(z) = &plugged.device.zpci {
        println!("  zPCI uid {} fid {}", z.uid, z.fid);
    }
    match hotplug::unplug_ccw(&guest, &qmp, "net0", "0.0.0042", deadline(30)) {
        Ok(u) => println!(
            "  device_del net0: DEVICE_DELETED after {}, gone after {}",
            ms(u.event_after),
            ms(u.gone_after)
        ),
        Err(e) => println!("  device_del net0: {e}"),
    }
    match hotplug::unplug(&guest, &qmp, "net1", plugged.device.bdf, deadline(30)) {
        Ok(u) => println!(
            "  device_del net1: DEVICE_DELETED after {}, gone after {}",
            ms(u.event_after),
            ms(u.gone_after)
        ),
        Err(e) => println!("  device_del net1: {e}"),
    }
    Ok(plugged.bar_problems.is_empty())
}

/// Knobs the experiments take.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Firmware (x86_64: SeaBIOS by default).
    pub firmware: Option<Firmware>,
    /// x86_64: native PCIe hotplug (pciehp) instead of QEMU's default ACPI hotplug.
    pub native_hotplug: bool,
    /// Size of the large BAR in GiB, where the experiment plugs one.
    pub bar_gib: Option<u64>,
    /// Root port `pref64-reserve` in GiB (default: twice the BAR).
    pub reserve_gib: Option<u64>,
    /// Guest RAM in MiB (reservation-mixes).
    pub ram_mib: Option<u32>,
    /// Only the mixes whose name contains this (reservation-mixes).
    pub mix: Option<String>,
}

impl Options {
    fn apply(&self, spec: &mut GuestSpec) {
        if self.native_hotplug && spec.arch == Arch::X86_64 {
            spec.extra_args
                .extend(["-global".into(), "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into()]);
            spec.name.push_str("-native");
        }
    }
}

/// Runs the experiment `name`.
pub fn run(name: &str, opts: Options, stack: &Stack) -> Result<bool> {
    let fw = opts.firmware.unwrap_or(Firmware::SeaBios);
    match name {
        "root-port-128g" => root_port_128g(stack, fw, opts),
        "switch-placeholder" => switch_placeholder(stack, fw, true, opts),
        "switch-no-placeholder" => switch_placeholder(stack, fw, false, opts),
        "aarch64-hpmmioprefsize" => aarch64_hpmmioprefsize(stack, opts),
        "s390x-ccw-zpci" => s390x_ccw_zpci(stack),
        "reservation-mixes" => {
            crate::mixes::run(stack, fw, opts.ram_mib, opts.mix.as_deref(), opts.bar_gib.is_some())
        }
        other => Err(format!("unknown experiment {other:?}; known: {}", NAMES.join(", "))),
    }
}

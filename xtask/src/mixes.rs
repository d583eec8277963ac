//! The reservation table's GPU mixes measured in real guests, for the firmware generation
//! of a stack (`cargo xtask experiment reservation-mixes --stack NAME`).
//!
//! Each mix is planned for the generation read from the stack's SeaBIOS image, the guest
//! boots with the plan, and one stand-in per spare port is hotplugged and left plugged.
//! A GPU's 64-bit BARs (H100-class: 128 GiB + 32 MiB; A100-class: 64 GiB + 32 MiB) are
//! stood in for by a two-function `ivshmem-plain` device: function 0 with the large BAR,
//! function 1 with the 32 MiB one, each with a 256-byte 32-bit register BAR (the GPUs'
//! 16 MiB 32-bit BAR has no stand-in). With `--bar-gib` the stand-in is function 0 alone.
//! Every function must get every BAR inside its port's windows; the line shows
//! reserved ÷ required for the stand-ins.

use serde_json::json;

use arch_x86_aarch64::{detect_firmware, Q35};
use guest_harness::arch::Arch;
use guest_harness::deadline;
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::hotplug::{self, Expect};
use guest_harness::stacks::{Stack, OVMF_FD};
use pcie_topology::units::human_size;
use pcie_topology::{FunctionResource, HotplugProfile, Mode, PlanRequest, PortKind, SpareRequest};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use qmp_hotplug::QmpClient;

/// Where SeaBIOS lies in a stack's root.
const SEABIOS_IMAGE: &str = "usr/share/seabios/bios-256k.bin";

const GIB: u64 = 1 << 30;

/// The second 64-bit BAR of the GPUs (H100 and A100 BAR 3).
const SMALL_BAR: u64 = 32 << 20;

/// The stand-in of a GPU whose large BAR is `gib` GiB, with its 32 MiB BAR when `small`.
fn stand_in(name: &str, gib: u64, small: bool) -> HotplugProfile {
    let mut resources = vec![
        FunctionResource::at(0, Resource::bar(BarKind::Mem32, false, 0x100)),
        FunctionResource::at(2, Resource::bar(BarKind::Mem64, true, gib * GIB)),
    ];
    if small {
        resources.push(FunctionResource::at(0, Resource::bar(BarKind::Mem32, false, 0x100)));
        resources.push(FunctionResource::at(2, Resource::bar(BarKind::Mem64, true, SMALL_BAR)));
    }
    HotplugProfile::new(name, resources)
}

/// The mixes: name, stand-in BAR size in GiB, count.
const MIXES: &[(&str, u64, u32)] = &[
    ("1 × H100", 128, 1),
    ("4 × H100", 128, 4),
    ("8 × H100", 128, 8),
    ("1 × A100", 64, 1),
    ("8 × A100", 64, 8),
];

/// Runs every mix (or only those whose name contains `only`); returns whether every
/// stand-in got its BARs.
pub fn run(
    stack: &Stack,
    firmware: Firmware,
    ram_mib: Option<u32>,
    only: Option<&str>,
    single: bool,
) -> Result<bool, String> {
    let root = stack.root().map_err(|e| e.to_string())?;
    let image = match firmware {
        Firmware::Ovmf => root.file(OVMF_FD),
        _ => root.root.join(SEABIOS_IMAGE),
    };
    let found = detect_firmware(&image).map_err(|e| e.to_string())?;
    let platform = Q35::detect(&image).map_err(|e| e.to_string())?;
    println!(
        "stack {}: {} -> {} {} -> generation {}",
        stack.name(),
        root.qemu_version,
        firmware.name(),
        found.version_string.as_deref().unwrap_or("(no version)"),
        found.generation
    );
    let mut all = true;
    for (name, gib, count) in MIXES.iter().filter(|m| only.map_or(true, |o| m.0.contains(o))) {
        match run_mix(stack, (&platform, firmware), name, (*gib, !single), *count, ram_mib) {
            Ok(ok) => all &= ok,
            Err(e) => {
                println!("| {name} | error: {e} |");
                all = false;
            }
        }
    }
    Ok(all)
}

fn run_mix(
    stack: &Stack,
    (platform, firmware): (&Q35, Firmware),
    name: &str,
    (gib, small): (u64, bool),
    count: u32,
    ram_mib: Option<u32>,
) -> Result<bool, String> {
    let profile = stand_in("standin", gib, small);
    let mut spec = GuestSpec::new(Arch::X86_64).firmware(firmware);
    if let Some(mib) = ram_mib {
        spec.memory_mib = mib;
    }
    let mut request = PlanRequest::default()
        .with_mode(Mode::RootPort)
        .with_spares(vec![SpareRequest::new(profile.clone(), count)]);
    request.options.guest_ram = u64::from(spec.memory_mib) << 20;
    let plan = pcie_topology::plan(platform, &request).map_err(|e| format!("planning: {e}"))?;
    let need = profile.requirement().map_err(|e| e.to_string())?;
    let required = (need.mem.size + need.pref.size) * u64::from(count);
    let ports: Vec<_> = plan.ports.iter().filter(|p| p.kind == PortKind::Root).collect();
    let reserved: u64 = ports.iter().map(|p| p.reservation.mem.size + p.reservation.pref.size).sum();
    spec.name = format!("mix-{}-{count}x{gib}g", platform.generation);
    spec.extra_args.extend(plan.device_args());
    spec.extra_args.extend(plan.extra.qemu.iter().cloned());
    spec.phys_bits = plan.cpu_phys_bits();
    for i in 0..count {
        spec.objects.push(format!("memory-backend-ram,id=m{i},size={gib}G,reserve=off"));
        if small {
            spec.objects.push(format!("memory-backend-ram,id=s{i},size={}M,reserve=off", SMALL_BAR >> 20));
        }
    }
    let assets = GuestAssets::ensure(stack, Arch::X86_64).map_err(|e| e.to_string())?;
    let guest = Guest::boot(&spec, &assets).map_err(|e| e.to_string())?;
    let qmp: QmpClient = guest.qmp(deadline(10)).map_err(|e| e.to_string())?;
    let bars = [(0u8, 0x100u64), (2u8, gib * GIB)];
    let mut problems = Vec::new();
    let mut placed = Vec::new();
    let small_bars = [(0u8, 0x100u64), (2u8, SMALL_BAR)];
    for (i, port) in ports.iter().enumerate() {
        let bus = port.id.as_str();
        if small {
            // Function 1 first: the slot is announced with function 0.
            let f1 = json!({"driver": "ivshmem-plain", "id": format!("gpu{i}f1"), "memdev": format!("s{i}"), "bus": bus, "addr": "0.1"});
            if let Err(e) = qmp.execute_raw("device_add", Some(f1), std::time::Duration::from_secs(10)) {
                problems.push(format!("gpu{i} function 1: {e}"));
                continue;
            }
        }
        let mut args = json!({"driver": "ivshmem-plain", "id": format!("gpu{i}"), "memdev": format!("m{i}"), "bus": bus, "addr": "0.0"});
        if small {
            args["multifunction"] = json!(true);
        }
        let expect = Expect { vendor: 0x1af4, device: Some(0x1110), bars: &bars };
        let p = match hotplug::plug(&guest, &qmp, args, expect, deadline(90)) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("gpu{i}: {e}"));
                continue;
            }
        };
        // The function found first may be either; check both where they are.
        let b = p.device.bdf;
        let state = guest.state();
        if let Some(port) = p.device.parent().and_then(|q| state.pci.get(&q)) {
            let windows: Vec<String> = port.windows().map(|w| w.to_string()).collect();
            println!("  gpu{i} on {} ({}): {}", port.bdf, bus, windows.join(" "));
        }
        for (f, want) in
            [(0u8, &bars[..]), (1u8, &small_bars[..])].into_iter().take(if small { 2 } else { 1 })
        {
            let Ok(bdf) = pcilibs::bdf::Bdf::new(b.domain(), b.bus(), b.device(), f) else { continue };
            problems.extend(state.bar_problems(bdf, want, None).into_iter().map(|x| format!("gpu{i}: {x}")));
            if let Some(bar) = state.pci.get(&bdf).and_then(|d| d.bars().find(|r| r.index == 2)) {
                placed.push(format!("{bdf} {:#x}", bar.start));
            }
        }
    }
    let verdict = if problems.is_empty() {
        format!("all {count} assigned ({})", placed.join(", "))
    } else {
        format!("REFUSED: {}", problems.join("; "))
    };
    println!(
        "| {name} | {} | {} | {:.2}× | phys-bits {} | {} | RAM {} MiB, boot {:.1} s ({}) |",
        human_size(required),
        human_size(reserved),
        reserved as f64 / required as f64,
        plan.address.phys_bits_needed,
        verdict,
        spec.memory_mib,
        guest.boot_time().unwrap_or_default().as_secs_f64(),
        guest.accel().qemu_name()
    );
    println!("  $ {}", guest.command_line());
    Ok(problems.is_empty())
}

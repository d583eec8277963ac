//! Prints the reservation table of BENCHMARKS.md: guest address space reserved ÷ required
//! for GPU mixes, for this planner on each platform, for Kata's removed heuristic and for
//! QEMU's defaults.
//!
//! ```text
//! cargo run -p pcie-topology --example reservation_table
//! ```
//!
//! "Required" is what the devices' BARs need, packed per device (32-bit + 64-bit). A
//! column's "reserved" is the sum of the root-level windows the guest gets (32-bit +
//! 64-bit). Each device gets its own spare root port, hotplugged later.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::indexing_slicing)]

use arch_x86_aarch64::{FirmwareGeneration, Virt, Q35, SEABIOS_BRIDGE_MEM_MIN};
use pcie_topology::units::human_size;
use pcie_topology::{
    plan, HotplugProfile, Mode, PlanRequest, Platform, PortKind, SpareRequest, WindowReservation,
};
use pcilibs::requirement::{Requirement, Window as WindowKind};

struct Mix {
    name: &'static str,
    parts: Vec<(HotplugProfile, u32)>,
}

fn mixes() -> Vec<Mix> {
    vec![
        Mix { name: "1 × H100", parts: vec![(HotplugProfile::h100(), 1)] },
        Mix { name: "4 × H100", parts: vec![(HotplugProfile::h100(), 4)] },
        Mix { name: "8 × H100", parts: vec![(HotplugProfile::h100(), 8)] },
        Mix {
            name: "8 × H100 + 6 NVSwitch",
            parts: vec![(HotplugProfile::h100(), 8), (HotplugProfile::nvswitch(), 6)],
        },
        Mix { name: "1 × A100", parts: vec![(HotplugProfile::a100(), 1)] },
        Mix { name: "8 × A100", parts: vec![(HotplugProfile::a100(), 8)] },
    ]
}

fn required(mix: &Mix) -> u64 {
    mix.parts
        .iter()
        .map(|(p, n)| {
            let r = p.requirement().unwrap();
            (r.mem.size + r.pref.size) * u64::from(*n)
        })
        .sum()
}

/// `256 GiB + 30 MiB`: whole GiB plus the MiB left over.
fn exact(size: u64) -> String {
    let gib = size >> 30;
    let mib = (size >> 20) & 1023;
    if mib == 0 {
        format!("{gib} GiB")
    } else {
        format!("{gib} GiB + {mib} MiB")
    }
}

fn ratio(reserved: u64, required: u64) -> String {
    format!("{:.2}", reserved as f64 / required as f64)
}

/// This planner on `platform`: reserved bytes and whether the plan is accepted.
fn planner(platform: &dyn Platform, mix: &Mix) -> String {
    planner_with_ram(platform, mix, None)
}

/// The plan for a guest with `ram` bytes of RAM (the request's default when `None`).
fn planner_with_ram(platform: &dyn Platform, mix: &Mix, ram: Option<u64>) -> String {
    let mut request = PlanRequest::default()
        .with_mode(Mode::RootPort)
        .with_spares(mix.parts.iter().map(|(p, n)| SpareRequest::new(p.clone(), *n)).collect());
    if let Some(ram) = ram {
        request.options.guest_ram = ram;
    }
    match plan(platform, &request) {
        Ok(p) => {
            let reserved: u64 = p
                .ports
                .iter()
                .filter(|p| p.kind == PortKind::Root)
                .map(|p| p.reservation.mem.size + p.reservation.pref.size)
                .sum();
            format!(
                "{} ({}×), fits, phys-bits {}",
                human_size(reserved),
                ratio(reserved, required(mix)),
                p.address.phys_bits_needed
            )
        }
        Err(e) => format!("cannot fit: {e}"),
    }
}

/// Kata's removed heuristic: every port reserves the next power of two of all GPUs'
/// 64-bit BAR total, and twice the next power of two of their 32-bit total; NVSwitch
/// functions (class 0x0680) were not counted. Checked with SeaBIOS's placement.
fn kata(mix: &Mix) -> String {
    let gpus: Vec<&(HotplugProfile, u32)> = mix.parts.iter().filter(|(p, _)| p.name != "nvswitch").collect();
    let sum = |kind: WindowKind| -> u64 {
        gpus.iter()
            .map(|(p, n)| {
                p.resources
                    .iter()
                    .map(|r| r.resource)
                    .filter(|r| r.window() == kind)
                    .map(|r| r.size)
                    .sum::<u64>()
                    * u64::from(*n)
            })
            .sum()
    };
    let pref = sum(WindowKind::Pref).checked_next_power_of_two().unwrap();
    let mem = 2 * sum(WindowKind::Mem).checked_next_power_of_two().unwrap();
    let ports: u32 = mix.parts.iter().map(|(_, n)| n).sum();
    let reserved = u64::from(ports) * (pref + mem);
    let window = |size| WindowReservation { size, align: SEABIOS_BRIDGE_MEM_MIN };
    let mut problems = Vec::new();
    let mem_total = u64::from(ports) * mem;
    let hole = Q35::seabios().spec().mmio32.size;
    if mem_total > hole {
        problems.push(format!(
            "cannot fit: 32-bit windows {} > hole {}",
            human_size(mem_total),
            human_size(hole)
        ));
    }
    for (p, _) in &mix.parts {
        let need: Requirement = p.requirement().unwrap();
        if !window(mem).holds(&need.mem) || !window(pref).holds(&need.pref) {
            problems.push(format!(
                "{} not guaranteed: needs {} at {} alignment, port has {}",
                p.name,
                exact(need.pref.size + need.pref.align - SEABIOS_BRIDGE_MEM_MIN),
                human_size(SEABIOS_BRIDGE_MEM_MIN),
                human_size(pref)
            ));
        }
    }
    let verdict = if problems.is_empty() { "fits".to_string() } else { problems.join("; ") };
    format!("{} ({}×), {verdict}", human_size(reserved), ratio(reserved, required(mix)))
}

/// QEMU's defaults: no reservation properties; SeaBIOS gives an empty hotplug port
/// 2 MiB windows.
fn defaults(mix: &Mix) -> String {
    let ports: u32 = mix.parts.iter().map(|(_, n)| n).sum();
    let reserved = u64::from(ports) * 2 * SEABIOS_BRIDGE_MEM_MIN;
    let min = WindowReservation { size: SEABIOS_BRIDGE_MEM_MIN, align: SEABIOS_BRIDGE_MEM_MIN };
    let misfits: Vec<&str> = mix
        .parts
        .iter()
        .filter(|(p, _)| {
            let need = p.requirement().unwrap();
            !min.holds(&need.mem) || !min.holds(&need.pref)
        })
        .map(|(p, _)| p.name.as_str())
        .collect();
    format!(
        "{} ({}×), cannot fit: {} need more than the {} windows",
        human_size(reserved),
        ratio(reserved, required(mix)),
        misfits.join(", "),
        human_size(SEABIOS_BRIDGE_MEM_MIN)
    )
}

fn seabios(generation: FirmwareGeneration) -> Q35 {
    Q35::for_generation(generation, "").unwrap()
}

fn main() {
    println!("| mix | required | planner, q35 SeaBIOS ≤ 1.16.2 | planner, SeaBIOS 1.16.3 | planner, SeaBIOS ≥ 1.17.0 | planner, SeaBIOS ≥ 1.17.0, 16 GiB RAM (padded windows) | planner, q35 OVMF | planner, virt (no firmware) | Kata heuristic (SeaBIOS) | QEMU defaults (SeaBIOS) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for mix in mixes() {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mix.name,
            human_size(required(&mix)),
            planner(&Q35::seabios(), &mix),
            planner(&seabios(FirmwareGeneration::SeaBiosEndOfSpace), &mix),
            planner(&seabios(FirmwareGeneration::SeaBiosEndOfSpaceCapped), &mix),
            planner_with_ram(&seabios(FirmwareGeneration::SeaBiosEndOfSpaceCapped), &mix, Some(16 << 30)),
            planner(&Q35::ovmf(), &mix),
            planner(&Virt::direct_kernel(), &mix),
            kata(&mix),
            defaults(&mix)
        );
    }
}

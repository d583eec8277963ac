//! Plans for a machine the VMM shares: its own devices on `pcie.0` and memory hotplug, the
//! way Kata's QEMU command line has them, started in the real `qemu-system-x86_64` under
//! SeaBIOS and OVMF.
//!
//! Kata's VM has `virtio-rng-pci`, `virtio-serial-pci` and `vhost-vsock-pci` on `pcie.0`
//! without `addr=` (here `virtio-balloon-pci` stands in for `vhost-vsock-pci`, which needs
//! the host's `/dev/vhost-vsock`: it takes a slot the same way), a `pci-bridge` at
//! `addr=2` (under OVMF a `pcie-root-port` with `bus-reserve=1` and a `pcie-pci-bridge`
//! behind it, also at `addr=2`), and `-m …,slots=…,maxmem=…`. The firmware runs (no
//! guest), then `query-pci` must show every port and cold-plugged device at the BDF the
//! plan predicts, the VMM's bridge at the bus numbers the plan expects, and every 64-bit
//! window inside the aperture the plan checked. The tests named `…_without_foreign_…`
//! show what the same machine does with a plan that does not know those devices.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use arch_x86_aarch64::Q35;
use common::{find, require, PciDev, Qemu};
use pcie_topology::units::{GIB, MIB};
use pcie_topology::{
    plan, DevFn, DeviceRequest, Foreign, ForeignDevice, HotplugProfile, MemoryHotplug, Plan, PlanRequest,
    Platform, SpareRequest,
};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use serde_json::Value;

/// The VMM's devices as Kata's QEMU command line has them, under SeaBIOS.
fn kata_args_seabios() -> Vec<String> {
    [
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
        "-device",
        "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
        "-device",
        "virtio-serial-pci,id=serial0",
        "-device",
        "virtio-balloon-pci,id=vsock-stand-in",
    ]
    .map(String::from)
    .to_vec()
}

/// The same under OVMF: the bridge behind a root port of its own.
fn kata_args_ovmf() -> Vec<String> {
    [
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
        "-device",
        "pcie-root-port,id=rp-pci-bridge-0,addr=2,chassis=16,slot=0,bus=pcie.0,multifunction=off,bus-reserve=0x1,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
        "-device",
        "pcie-pci-bridge,bus=rp-pci-bridge-0,id=pci-bridge-0",
        "-device",
        "virtio-serial-pci,id=serial0",
        "-device",
        "virtio-balloon-pci,id=vsock-stand-in",
    ]
    .map(String::from)
    .to_vec()
}

/// A virtio device on `pcie.0`: legacy I/O, MSI-X and the modern 64-bit BAR.
fn virtio(id: &str, driver: &str) -> ForeignDevice {
    ForeignDevice::auto(id, driver).with_resources(vec![
        Resource::bar(BarKind::Io, false, 0x40),
        Resource::bar(BarKind::Mem32, false, 4 << 10),
        Resource::bar(BarKind::Mem64, true, 16 << 10),
    ])
}

/// What a bridge's windows take, as the firmware sized them in `query-pci`.
fn bridge_windows(mem: u64, pref: u64) -> Vec<Resource> {
    vec![
        Resource::bar(BarKind::Mem32, false, mem),
        Resource::bar(BarKind::Mem64, true, pref),
        Resource::bar(BarKind::Io, false, 4 << 10),
    ]
}

/// The VMM's devices of [`kata_args_seabios`] / [`kata_args_ovmf`] for the planner.
fn kata_foreign(ovmf: bool) -> Foreign {
    let slot2 = DevFn::new(2, 0).unwrap();
    let bridge = if ovmf {
        // Root port (bus-reserve=1) and the bridge behind it: two bus numbers; OVMF gives
        // the pair 3 MiB of memory and 512 MiB prefetchable.
        ForeignDevice::at("rp-pci-bridge-0", "pcie-root-port", slot2)
            .with_buses(2)
            .with_resources(bridge_windows(4 * MIB, 512 * MIB))
    } else {
        ForeignDevice::at("pci-bridge-0", "pci-bridge", slot2)
            .with_buses(1)
            .with_resources(bridge_windows(2 * MIB, 2 * MIB))
    };
    Foreign::new().with_devices(vec![
        virtio("", "virtio-rng-pci"),
        bridge,
        virtio("serial0", "virtio-serial-pci"),
        virtio("vsock-stand-in", "virtio-balloon-pci"),
    ])
}

/// One cold-plugged device and spare ports: what a Kata VM with one GPU at boot and room
/// for more looks like.
fn request() -> PlanRequest {
    let mut cold = DeviceRequest::ivshmem("cold0", GIB).unwrap();
    cold.cold_plug = true;
    PlanRequest::default()
        .with_devices(vec![cold, DeviceRequest::ivshmem("hot0", 2 * GIB).unwrap()])
        .with_spares(vec![SpareRequest::new(HotplugProfile::nic(), 2)])
}

fn start(plan: &Plan, vmm: &[String], memory: &str) -> Result<Qemu, String> {
    require("qemu-system-x86_64", "qemu-system-x86");
    let mut args = vmm.to_vec();
    args.extend(plan.qemu_args());
    args.extend(["-accel".into(), "tcg".into(), "-m".into(), memory.into()]);
    let bits = plan.cpu_phys_bits().unwrap_or(plan.platform.default_phys_bits);
    args.extend(["-cpu".into(), format!("max,phys-bits={bits}")]);
    Qemu::try_start("qemu-system-x86_64", &args)
}

/// Firmware programmed every port of the plan.
fn programmed(plan: &Plan) -> impl Fn(&[PciDev]) -> bool + '_ {
    move |devs: &[PciDev]| {
        plan.ports
            .iter()
            .filter_map(|p| p.device.as_ref())
            .all(|d| devs.iter().any(|x| x.id == d.id.as_str() && x.bridge.is_some_and(|b| b.secondary != 0)))
    }
}

/// Every place where `query-pci` disagrees with the plan: ports, their bus numbers,
/// cold-plugged functions, the VMM's bridges.
fn disagreements(plan: &Plan, devs: &[PciDev]) -> Vec<String> {
    let mut out = Vec::new();
    for port in plan.ports.iter().filter(|p| p.device.is_some()) {
        let Some(got) = devs.iter().find(|d| d.id == port.id.as_str()) else {
            out.push(format!("{} missing", port.id));
            continue;
        };
        let b = got.bridge.unwrap();
        let want = (
            port.bdf.bus(),
            port.bdf.device(),
            port.bdf.function(),
            port.secondary_bus,
            port.subordinate_bus,
        );
        let have = (got.bus, got.slot, got.function, b.secondary, b.subordinate);
        if want != have {
            out.push(format!("{}: planned bus/slot/fn/sec/sub {want:x?}, firmware {have:x?}", port.id));
        }
    }
    for d in plan.devices.iter().filter(|d| d.cold_plug) {
        for f in &d.functions {
            let bdf = f.location.bdf().unwrap();
            match devs.iter().find(|x| x.id == f.device.id.as_str()) {
                Some(got)
                    if (got.bus, got.slot, got.function) == (bdf.bus(), bdf.device(), bdf.function()) => {}
                got => out.push(format!(
                    "{}: planned {bdf}, firmware {:?}",
                    f.device.id,
                    got.map(|g| (g.bus, g.slot))
                )),
            }
        }
    }
    for f in plan.foreign.iter().filter(|f| f.device.buses > 0) {
        let got = find(devs, &f.device.id);
        let b = got.bridge.unwrap();
        let want = (f.addr.slot(), f.secondary_bus, f.subordinate_bus);
        let have = (got.slot, Some(b.secondary), Some(b.subordinate));
        if want != have {
            out.push(format!("{}: planned slot/sec/sub {want:x?}, firmware {have:x?}", f.device.id));
        }
    }
    out
}

/// Sends the plan's hotplug actions; each function must show where planned.
fn hotplug_all(plan: &Plan, qemu: &Qemu) {
    for action in plan.hotplug_actions().unwrap() {
        for o in &action.object_add {
            qemu.ok("object-add", Value::Object(o.to_qmp()));
        }
        for f in &action.functions {
            qemu.ok("device_add", Value::Object(f.device_add.to_qmp()));
        }
        let devs = qemu.pci_devices();
        for f in &action.functions {
            let got = find(&devs, f.id().as_str());
            let bdf = f.guest.bdf().unwrap();
            assert_eq!(
                (got.bus, got.slot, got.function),
                (bdf.bus(), bdf.device(), bdf.function()),
                "{}",
                f.id()
            );
        }
    }
}

fn around_kata_devices(platform: Q35, ovmf: bool, timeout: Duration) {
    let vmm = if ovmf { kata_args_ovmf() } else { kata_args_seabios() };
    let plan = plan(&platform, &request().with_foreign(kata_foreign(ovmf))).unwrap();
    // rng, the bridge, serial and the stand-in take slots 1 to 4; the plan starts at 5.
    let slots: Vec<u8> = plan.foreign.iter().map(|f| f.addr.slot()).collect();
    assert_eq!(slots, [1, 2, 3, 4]);
    assert!(plan.ports.iter().all(|p| p.bdf.device() >= 5), "{}", plan.explain());
    let qemu = start(&plan, &vmm, "512").unwrap();
    let devs = qemu.wait_pci(timeout, programmed(&plan));
    let wrong = disagreements(&plan, &devs);
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", plan.explain());
    hotplug_all(&plan, &qemu);
}

#[test]
fn seabios_plan_around_kata_devices() {
    around_kata_devices(Q35::seabios(), false, Duration::from_secs(60));
}

#[test]
fn ovmf_plan_around_kata_devices() {
    around_kata_devices(common::q35_ovmf(), true, Duration::from_secs(240));
}

/// The same machine with a plan that knows nothing of the VMM's devices: QEMU refuses the
/// plan's first root port (the random-number device took slot 1 first); moved past the
/// occupied slots by hand, the ports start, but every bus number behind them is one off.
#[test]
fn seabios_without_foreign_devices_the_plan_is_wrong() {
    let vmm = kata_args_seabios();
    let blind = plan(&Q35::seabios(), &request()).unwrap();
    let refused = start(&blind, &vmm, "512").err().expect("QEMU took a root port in a taken slot");
    assert!(refused.contains("in use by virtio-rng-pci"), "{refused}");
    let mut past = request();
    past.options.first_root_slot = 5;
    let blind = plan(&Q35::seabios(), &past).unwrap();
    let qemu = start(&blind, &vmm, "512").unwrap();
    let devs = qemu.wait_pci(Duration::from_secs(60), programmed(&blind));
    let wrong = disagreements(&blind, &devs);
    assert_eq!(wrong.len(), blind.ports.len() + 1, "{wrong:#?}");
}

/// The 64-bit windows lie inside the aperture the plan checked, and the plan asks for the
/// physical address width they need.
fn windows_inside_aperture(plan: &Plan, devs: &[PciDev]) -> Result<(), String> {
    let aperture = plan.address.mmio64_aperture.ok_or("no aperture planned")?;
    let bits = plan.address.phys_bits_needed;
    for port in plan.ports.iter().filter(|p| p.device.is_some()) {
        let b = find(devs, port.id.as_str()).bridge.unwrap();
        let (base, limit) = b.pref;
        // A closed window reads as base 0 (nothing prefetchable behind the port).
        if base == 0 || limit <= base {
            continue;
        }
        if base < aperture.base || limit >= aperture.end() {
            return Err(format!(
                "{}: firmware window {base:#x}..={limit:#x} outside the planned aperture {:#x}..{:#x}",
                port.id,
                aperture.base,
                aperture.end()
            ));
        }
        if limit >= 1u64 << bits {
            return Err(format!(
                "{}: window ends at {limit:#x}, past the {bits} bits the plan asks for",
                port.id
            ));
        }
    }
    Ok(())
}

#[test]
fn seabios_memory_hotplug_moves_the_64bit_windows() {
    // Kata's shape: -m 2G,slots=10,maxmem=64G; firmware starts the 64-bit windows at
    // 0x13_0000_0000, above the device memory region.
    let mut request = request();
    request.options.guest_ram = 2 * GIB;
    let hotplug = Foreign::new().with_memory_hotplug(MemoryHotplug::new(10, 64 * GIB));
    let plan = plan(&Q35::seabios(), &request.clone().with_foreign(hotplug)).unwrap();
    assert_eq!(plan.address.memory_end, Some(0x13_0000_0000));
    assert_eq!(plan.address.phys_bits_needed, 37, "{}", plan.explain());
    let qemu = start(&plan, &[], "2G,slots=10,maxmem=64G").unwrap();
    let devs = qemu.wait_pci(Duration::from_secs(60), programmed(&plan));
    windows_inside_aperture(&plan, &devs).unwrap();
    // The plan that did not know: an aperture at 4 GiB, 34 bits.
    let blind = pcie_topology::plan(&Q35::seabios(), &request).unwrap();
    assert_eq!(blind.address.phys_bits_needed, 34);
    assert!(windows_inside_aperture(&blind, &devs).is_err());
}

#[test]
fn ovmf_memory_hotplug_moves_the_64bit_aperture() {
    // A spare for an H100 asks OVMF for a 512 GiB aperture (256 GiB of windows and more,
    // rounded up to a power of two; more than an eighth of the 40-bit address space, so
    // OVMF places it above memory); with 598 GiB of hotplug memory and 10 slots, memory
    // ends at 612 GiB and the aperture, aligned to its size, starts at 1 TiB instead of
    // 512 GiB.
    let mut request = request();
    request.spares.push(SpareRequest::new(HotplugProfile::h100(), 1));
    request.options.guest_ram = 2 * GIB;
    let hotplug = Foreign::new().with_memory_hotplug(MemoryHotplug::new(10, 600 * GIB));
    let platform = common::q35_ovmf();
    let plan = plan(&platform, &request.clone().with_foreign(hotplug)).unwrap();
    assert_eq!(plan.address.mmio64_aperture.unwrap().base, 1024 * GIB, "{}", plan.explain());
    let qemu = start(&plan, &[], "2G,slots=10,maxmem=600G").unwrap();
    let devs = qemu.wait_pci(Duration::from_secs(240), programmed(&plan));
    windows_inside_aperture(&plan, &devs).unwrap();
    let blind = pcie_topology::plan(&platform, &request).unwrap();
    assert!(windows_inside_aperture(&blind, &devs).is_err());
}

/// Resolves a guest path the way Kata's agent does, on the bus numbers the firmware
/// programmed: a first element of 0x20 or more (with two or more after it) is a root
/// bus, else the walk starts at bus 0; each element is a slot/function on the current bus
/// and, but for the last, a bridge whose secondary bus is the next. Returns the QEMU id of
/// the device at the end.
fn resolve_as_kata_agent(devs: &[PciDev], path: &str) -> Result<String, String> {
    let parsed = pcie_topology::GuestPciPath::from_kata(path).map_err(|e| e.to_string())?;
    let mut bus = parsed.root_bus.unwrap_or(0);
    let last = parsed.hops.len() - 1;
    for (i, hop) in parsed.hops.iter().enumerate() {
        let dev = devs
            .iter()
            .find(|d| (d.bus, d.slot, d.function) == (bus, hop.slot(), hop.function()))
            .ok_or_else(|| format!("{path}: nothing at {bus:02x}:{:02x}.{}", hop.slot(), hop.function()))?;
        if i == last {
            return Ok(dev.id.clone());
        }
        bus = dev.bridge.ok_or_else(|| format!("{path}: {} is not a bridge", dev.id))?.secondary;
    }
    Err(format!("{path}: empty"))
}

fn numa_with_kata_agent_buses(platform: Q35, timeout: Duration) {
    let ovmf = platform.spec().name == "q35-ovmf";
    let mut devices = Vec::new();
    for (i, node) in [0u32, 1, 1].iter().enumerate() {
        let mut d = DeviceRequest::ivshmem(&format!("n{i}"), GIB).unwrap();
        d.numa_node = Some(*node);
        d.cold_plug = i == 2;
        devices.push(d);
    }
    let mut request = PlanRequest::default()
        .with_mode(pcie_topology::Mode::Numa)
        .with_devices(devices)
        .with_spares(vec![SpareRequest::new(HotplugProfile::nic(), 1).with_numa_node(0)])
        .with_foreign(kata_foreign(ovmf));
    request.options.expander_buses = pcie_topology::ExpanderBuses::KataAgent;
    let plan = plan(&platform, &request).unwrap();
    let roots: Vec<u8> = plan.host_bridges.iter().map(|h| h.bus_nr).collect();
    assert_eq!(roots, [0, 0x20, 0x40], "{}", plan.explain());
    let vmm = if ovmf { kata_args_ovmf() } else { kata_args_seabios() };
    let qemu = {
        require("qemu-system-x86_64", "qemu-system-x86");
        let mut args = vmm;
        args.extend(plan.qemu_args());
        args.extend(["-accel", "tcg", "-m", "512", "-smp", "2"].map(String::from));
        for node in 0..2 {
            args.extend([
                "-object".to_string(),
                format!("memory-backend-ram,id=numa{node},size=256M"),
                "-numa".to_string(),
                format!("node,nodeid={node},cpus={node},memdev=numa{node}"),
            ]);
        }
        Qemu::start("qemu-system-x86_64", &args)
    };
    let devs = qemu.wait_pci(timeout, programmed(&plan));
    let wrong = disagreements(&plan, &devs);
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", plan.explain());
    hotplug_all(&plan, &qemu);
    // Every device, cold-plugged or hotplugged, is found from its Kata path.
    let devs = qemu.pci_devices();
    for d in &plan.devices {
        let path = d.functions[0].location.path().unwrap().kata().expect("a path Kata's agent reads");
        assert!(path.starts_with("20/") || path.starts_with("40/"), "{path}");
        assert_eq!(resolve_as_kata_agent(&devs, &path).unwrap(), d.id.as_str(), "{path}");
    }
}

#[test]
fn seabios_numa_paths_as_kata_agent_reads_them() {
    numa_with_kata_agent_buses(Q35::seabios(), Duration::from_secs(60));
}

#[test]
fn ovmf_numa_paths_as_kata_agent_reads_them() {
    numa_with_kata_agent_buses(common::q35_ovmf(), Duration::from_secs(240));
}

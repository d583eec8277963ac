//! The aarch64 `virt` plans, started in the real `qemu-system-aarch64`.
//!
//! Without firmware nothing programs bus numbers before a kernel runs, so the direct-boot
//! test checks what QEMU itself knows (devices, buses, hotplug acceptance) and the kernel
//! arguments; with UEFI the firmware runs and the windows are read back like on q35.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use arch_x86_aarch64::Virt;
use common::{find, require, Qemu};
use pcie_topology::units::GIB;
use pcie_topology::{
    plan, AddressSpaceError, DeviceRequest, HotplugProfile, Mode, Plan, PlanError, PlanRequest, SpareRequest,
};
use serde_json::Value;

fn request(profile: HotplugProfile, spares: u32) -> PlanRequest {
    PlanRequest::default()
        .with_mode(Mode::RootPort)
        .with_devices(vec![DeviceRequest::ivshmem("gpu0", 64 * GIB).unwrap()])
        .with_spares(vec![SpareRequest::new(profile, spares)])
}

fn start(plan: &Plan) -> Qemu {
    require("qemu-system-aarch64", "qemu-system-arm");
    let mut args = plan.qemu_args();
    args.extend(["-accel", "tcg", "-cpu", "max", "-m", "512"].map(String::from));
    Qemu::start("qemu-system-aarch64", &args)
}

fn hotplug(plan: &Plan, qemu: &Qemu) {
    for action in plan.hotplug_actions().unwrap() {
        for o in &action.object_add {
            qemu.ok("object-add", Value::Object(o.to_qmp()));
        }
        for f in &action.functions {
            qemu.ok("device_add", Value::Object(f.device_add.to_qmp()));
        }
    }
    let peripherals = qemu.peripherals();
    for d in &plan.devices {
        assert!(peripherals.iter().any(|p| p == d.id.as_str()), "{} missing: {peripherals:?}", d.id);
    }
}

#[test]
fn direct_kernel_boot_plan_is_accepted() {
    let plan = plan(&Virt::direct_kernel(), &request(HotplugProfile::a100(), 2)).unwrap();
    // Linux sizes the windows: every hotplug bridge gets the largest spare's space.
    assert_eq!(plan.kernel_args().len(), 1);
    assert!(plan.kernel_args()[0].starts_with("pci=hpmmiosize="), "{:?}", plan.kernel_args());
    let qemu = start(&plan);
    let peripherals = qemu.peripherals();
    for p in &plan.ports {
        assert!(peripherals.iter().any(|x| x == p.id.as_str()), "{} missing: {peripherals:?}", p.id);
    }
    // Every root port is on pcie.0 at its planned slot (bus numbers are the kernel's job).
    let devs = qemu.pci_devices();
    for p in &plan.ports {
        let got = find(&devs, p.id.as_str());
        assert_eq!((got.slot, got.function), (p.bdf.device(), p.bdf.function()));
    }
    hotplug(&plan, &qemu);
}

#[test]
fn uefi_plan_boots_numbers_buses_and_takes_hotplugs() {
    // Planned for Linux's rule (every hotplug port gets the largest one's space, steered
    // by kernel arguments), so an A100-class spare next to the 64 GiB device.
    let plan = plan(&common::virt_uefi(), &request(HotplugProfile::a100(), 1)).unwrap();
    assert!(plan.kernel_args().iter().any(|a| a.contains("hpmmioprefsize=")), "{:?}", plan.kernel_args());
    let args = plan.qemu_args().join(" ");
    assert!(!args.contains("-reserve"), "Linux ignores the firmware's reservations: {args}");
    let qemu = start(&plan);
    let devs = qemu.wait_pci(Duration::from_secs(240), |devs| {
        plan.ports
            .iter()
            .all(|p| devs.iter().any(|d| d.id == p.id.as_str() && d.bridge.is_some_and(|b| b.secondary != 0)))
    });
    for p in &plan.ports {
        let b = find(&devs, p.id.as_str()).bridge.unwrap();
        assert_eq!((b.secondary, b.subordinate), (p.secondary_bus, p.subordinate_bus), "{}", p.id);
    }
    hotplug(&plan, &qemu);
}

#[test]
fn direct_kernel_boot_gives_every_hotplug_port_the_same_space() {
    // The kernel rule is uniform: two H100 spares and a hotplug port need 3 x 256 GiB.
    match plan(&Virt::direct_kernel(), &request(HotplugProfile::h100(), 2)) {
        Err(PlanError::AddressSpace(AddressSpaceError::Mmio64Aperture { needed, .. })) => {
            assert!(needed >= 3 * 256 * GIB, "{needed:#x}");
        }
        other => panic!("expected an aperture error, got {other:?}"),
    }
}

#[test]
fn uefi_plan_that_exceeds_the_high_mmio_window_is_refused() {
    // Linux gives the device's port and the H100 spare 256 GiB and more each: > 512 GiB.
    match plan(&Virt::uefi(), &request(HotplugProfile::h100(), 1)) {
        Err(PlanError::AddressSpace(AddressSpaceError::Mmio64Aperture { needed, available })) => {
            assert_eq!(available, 512 * GIB);
            assert!(needed > available);
        }
        other => panic!("expected an aperture error, got {other:?}"),
    }
}

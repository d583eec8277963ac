//! Devices built from this host's real sysfs through pcilibs plan like any other: every
//! BAR the kernel reports becomes an expected BAR of the planned function.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use arch_x86_aarch64::Q35;
use pcie_topology::{plan, DeviceRequest, Mode, PlanRequest, QemuId};
use pcilibs::config::HeaderType;
use pcilibs::facts::ResourceOptions;
use pcilibs::sysfs::Sysfs;

#[test]
fn host_functions_plan_with_their_real_bars() {
    let sysfs = Sysfs::new("/sys");
    let functions = sysfs.functions().expect("/sys/bus/pci/devices must exist: run on a Linux host with PCI");
    let opts = ResourceOptions::default();
    let mut devices = Vec::new();
    for bdf in functions {
        let facts = sysfs.facts(bdf).unwrap();
        if facts.header_type != HeaderType::Normal
            || facts.bars.is_empty()
            || !facts.unknown_sizes(&opts).is_empty()
        {
            continue;
        }
        let id = QemuId::new(format!("host{}", devices.len())).unwrap();
        let d = DeviceRequest::from_facts(id, std::slice::from_ref(&facts), &opts).unwrap();
        assert_eq!(d.functions[0].resources, facts.resources(&opts));
        assert_eq!(d.iommu_group, facts.iommu_group);
        devices.push((d, facts));
    }
    assert!(!devices.is_empty(), "this host shows no PCI endpoint with sized BARs in /sys/bus/pci/devices");
    let request = PlanRequest {
        mode: Mode::RootPort,
        devices: devices.iter().map(|(d, _)| d.clone()).collect(),
        ..Default::default()
    };
    let plan = plan(&Q35::seabios(), &request).unwrap();
    for (d, facts) in &devices {
        let placed = plan.device(d.id.as_str()).unwrap();
        let f = &placed.functions[0];
        assert_eq!(f.device.props["host"], facts.bdf.to_string().as_str().into());
        assert_eq!(f.bars.len(), facts.resources(&opts).len());
        assert!(plan.port(placed.port.as_ref().unwrap().as_str()).unwrap().reservation.holds(&placed.need));
    }
}

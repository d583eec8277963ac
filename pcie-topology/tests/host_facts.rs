//! Devices built from this host's real sysfs through pcilibs plan like any other: every
//! BAR the kernel reports becomes an expected BAR of the planned function, at its index.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use arch_x86_aarch64::Q35;
use pcie_topology::{plan, DeviceRequest, Mode, PlanRequest, QemuId, ResourceRole};
use pcilibs::config::HeaderType;
use pcilibs::facts::ResourceOptions;
use pcilibs::requirement::Resource;
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
        let resources: Vec<Resource> = d.functions[0].resources.iter().map(|r| r.resource).collect();
        assert_eq!(resources, facts.resources(&opts).unwrap());
        // Every resource sits at the index the facts give its BAR, at the BAR's size.
        for r in &d.functions[0].resources {
            assert_eq!(r.role, ResourceRole::Bar, "{}", facts.bdf);
            let bar = facts.bars.iter().find(|b| Some(b.index) == r.index).unwrap();
            assert_eq!(bar.size, Some(r.resource.size), "{} BAR {}", facts.bdf, bar.index);
        }
        assert_eq!(d.iommu_group, facts.iommu_group);
        devices.push((d, facts));
    }
    assert!(!devices.is_empty(), "this host shows no PCI endpoint with sized BARs in /sys/bus/pci/devices");
    let request = PlanRequest::default()
        .with_mode(Mode::RootPort)
        .with_devices(devices.iter().map(|(d, _)| d.clone()).collect());
    let plan = plan(&Q35::seabios(), &request).unwrap();
    for (d, facts) in &devices {
        let placed = plan.device(d.id.as_str()).unwrap();
        let f = &placed.functions[0];
        assert_eq!(f.device.props["host"], facts.bdf.to_string().as_str().into());
        assert_eq!(f.bars.len(), facts.resources(&opts).unwrap().len());
        let planned: Vec<(Option<u8>, Option<u64>)> =
            f.bars.iter().map(|b| (b.index, b.visible_size())).collect();
        let host: Vec<(Option<u8>, Option<u64>)> =
            facts.bars.iter().filter(|b| b.size.is_some()).map(|b| (Some(b.index), b.size)).collect();
        assert_eq!(planned, host, "{}", facts.bdf);
        assert!(plan.port(placed.port.as_ref().unwrap().as_str()).unwrap().reservation.holds(&placed.need));
    }
}

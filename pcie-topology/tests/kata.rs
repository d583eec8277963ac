//! The Kata mapping on q35: Kata's settings to a plan request, ids, agent options.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use arch_x86_aarch64::Q35;
use pcie_topology::kata::{qemu_id, vfio_options, KataConfig, KataError, PortSetting, SWITCH_GROUP};
use pcie_topology::units::{GIB, MIB};
use pcie_topology::{plan, DeviceRequest, FunctionRequest, HostRef, HotplugProfile, Mode, PortKind};
use pcilibs::bdf::Bdf;

/// A 1 GiB GPU stand-in known to Kata as `kata_id`.
fn gpu(kata_id: &str) -> DeviceRequest {
    let id = qemu_id(kata_id).unwrap();
    let f = FunctionRequest::ivshmem(0, &id, GIB).unwrap();
    DeviceRequest::new(id, vec![f]).with_runtime_id(kata_id)
}

fn root_ports(n: u32) -> KataConfig {
    let mut c = KataConfig::default();
    c.pcie_root_port = n;
    c.cold_plug_vfio = PortSetting::RootPort;
    c.hot_plug_vfio = PortSetting::RootPort;
    c
}

#[test]
fn root_ports_count_the_cold_plugged_ones() {
    let c = root_ports(4);
    let r = c.plan_request(vec![gpu("aa01")], Some(HotplugProfile::nic())).unwrap();
    assert_eq!(r.spares[0].count, 3);
    assert!(r.devices[0].cold_plug);
    assert_eq!(r.mode, Mode::RootPort);
    let p = plan(&Q35::seabios(), &r).unwrap();
    assert_eq!(p.ports.len(), 4);
    assert!(matches!(
        c.plan_request(vec![gpu("aa01")], None),
        Err(KataError::NoSpareProfile { count: 3, .. })
    ));
    // Fewer ports than cold-plugged devices: one each, no spare (as Kata does).
    let r = root_ports(0).plan_request(vec![gpu("aa01"), gpu("aa02")], None).unwrap();
    assert!(r.spares.is_empty());
    let mut both = root_ports(1);
    both.pcie_switch_port = 1;
    assert!(matches!(both.plan_request(vec![], None), Err(KataError::BothPortKinds)));
    let mut off = root_ports(1);
    off.cold_plug_vfio = PortSetting::NoPort;
    assert!(matches!(off.plan_request(vec![gpu("a")], None), Err(KataError::ColdPlugOff(1))));
}

#[test]
fn switch_ports_put_everything_behind_one_switch() {
    let mut c = KataConfig::default();
    c.pcie_switch_port = 3;
    c.cold_plug_vfio = PortSetting::SwitchPort;
    c.hot_plug_vfio = PortSetting::SwitchPort;
    let r = c.plan_request(vec![gpu("bb")], Some(HotplugProfile::nic())).unwrap();
    assert_eq!(r.mode, Mode::SwitchPort);
    assert_eq!(r.devices[0].p2p_group.as_deref(), Some(SWITCH_GROUP));
    assert_eq!(r.spares[0].p2p_group.as_deref(), Some(SWITCH_GROUP));
    let p = plan(&Q35::seabios(), &r).unwrap();
    assert_eq!(p.switches.len(), 1);
    assert_eq!(p.ports.iter().filter(|p| p.kind == PortKind::Downstream).count(), 3);
}

#[test]
fn bridge_port_puts_cold_devices_behind_a_bridge() {
    let mut c = KataConfig::default();
    c.cold_plug_vfio = PortSetting::BridgePort;
    let mut small = DeviceRequest::ivshmem("x", MIB).unwrap();
    small.id = qemu_id("cc").unwrap();
    small.functions[0] = FunctionRequest::ivshmem(0, &small.id, MIB).unwrap();
    let r = c.plan_request(vec![small], None).unwrap();
    let p = plan(&Q35::seabios(), &r).unwrap();
    assert_eq!(p.ports[0].kind, PortKind::BridgeSlot);
}

#[test]
fn kata_machine_shape_and_memory() {
    let mut c = root_ports(2);
    c.default_memory = 2048;
    c.default_maxmemory = 64 * 1024;
    c.kernel_params = "pci=realloc pci=nocrs pci=assign-busses".into();
    let r = c.plan_request(vec![gpu("3fa9c2e1b0d4e577")], Some(HotplugProfile::nic())).unwrap();
    assert!(r.options.guest_renumbers_buses);
    let p = plan(&Q35::seabios(), &r).unwrap();
    // rng at 1, pci-bridge-0 at 2, serial at 3, vsock at 4: the plan starts at 5.
    let slots: Vec<u8> = p.foreign.iter().map(|f| f.addr.slot()).collect();
    assert_eq!(slots, [1, 2, 3, 4]);
    assert_eq!(p.ports[0].bdf.device(), 5);
    // pci-bridge-0 takes bus 1: the first root port's devices are on bus 2.
    assert_eq!(p.ports[0].secondary_bus, 2);
    assert_eq!(p.address.memory_end, Some(0x13_0000_0000));
    assert!(p.hotplug_actions().unwrap().iter().all(|a| a.guest_renumbers_buses));
    // Under OVMF the bridge sits behind a root port of its own: two buses.
    let mut u = c.clone();
    u.firmware = "OVMF.fd".into();
    let r = u.plan_request(vec![gpu("3fa9c2e1b0d4e577")], Some(HotplugProfile::nic())).unwrap();
    let p = plan(&Q35::ovmf(), &r).unwrap();
    assert_eq!(p.foreign[1].device.driver, "pcie-root-port");
    assert_eq!(p.ports[0].secondary_bus, 3);
}

#[test]
fn options_name_every_function_of_the_group() {
    let c = root_ports(2);
    let host = |s: &str| Bdf::parse(s).unwrap();
    let mut a = gpu("3fa9c2e1b0d4e577");
    a.functions[0].host = Some(HostRef::Pci(host("0000:41:00.0")));
    a.iommu_group = Some(7);
    let mut b = gpu("77");
    b.functions[0].host = Some(HostRef::Pci(host("0000:41:00.1")));
    b.iommu_group = Some(7);
    let r = c.plan_request(vec![a, b], None).unwrap();
    let p = plan(&Q35::seabios(), &r).unwrap();
    let opts = vfio_options(&p, "3fa9c2e1b0d4e577").unwrap();
    assert_eq!(opts, ["0000:41:00.0=05/00", "0000:41:00.1=06/00"]);
    assert_eq!(opts, vfio_options(&p, "k77").unwrap());
    assert_eq!(p.device_by_runtime_id("77").unwrap().id.as_str(), "k77");
    assert!(matches!(vfio_options(&p, "nope"), Err(KataError::UnknownDevice(_))));
}

#[test]
fn numa_paths_start_at_the_expander_root_bus() {
    let mut c = root_ports(3);
    c.numa = true;
    let mut devs = Vec::new();
    for (i, node) in [0u32, 1].iter().enumerate() {
        let mut d = gpu(&format!("{i}0"));
        d.numa_node = Some(*node);
        d.functions[0].host = Some(HostRef::Pci(Bdf::new(0, 0x41 + i as u8, 0, 0).unwrap()));
        devs.push(d);
    }
    let r = c.plan_request(devs, Some(HotplugProfile::nic())).unwrap();
    let p = plan(&Q35::seabios(), &r).unwrap();
    let buses: Vec<u8> = p.host_bridges.iter().map(|h| h.bus_nr).collect();
    assert_eq!(buses, [0, 0x20, 0x40]);
    assert_eq!(vfio_options(&p, "00").unwrap(), ["0000:41:00.0=20/00/00"]);
    assert_eq!(vfio_options(&p, "10").unwrap(), ["0000:42:00.0=40/00/00"]);
}

/// A kernel-like tree with the two functions of the fixtures' multi-function device
/// (`0000:00:03.0`, `.1`: `virtio-rng-pci`, captured from a QEMU guest) in IOMMU group 7,
/// `/dev/vfio/7`, and an iommufd character device `vfio3` for function 0.
fn vfio_tree() -> (tempfile::TempDir, pcilibs::sysfs::Sysfs) {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pcilibs/tests/fixtures/qemu-x86_64");
    for d in
        ["bus/pci/devices", "kernel/iommu_groups/7/devices", "class/vfio-dev/vfio3", "devices/pci0000:00"]
    {
        std::fs::create_dir_all(sys.join(d)).unwrap();
    }
    std::fs::create_dir_all(dev.join("vfio/devices")).unwrap();
    for f in ["0000:00:03.0", "0000:00:03.1"] {
        let fn_dir = sys.join("devices/pci0000:00").join(f);
        std::fs::create_dir_all(&fn_dir).unwrap();
        for file in ["config", "resource"] {
            std::fs::copy(fixtures.join(f).join(file), fn_dir.join(file)).unwrap();
        }
        std::fs::write(fn_dir.join("class"), "0x00ff00\n").unwrap();
        symlink("../../../kernel/iommu_groups/7", fn_dir.join("iommu_group")).unwrap();
        symlink(format!("../../../devices/pci0000:00/{f}"), sys.join("bus/pci/devices").join(f)).unwrap();
        symlink(
            format!("../../../../devices/pci0000:00/{f}"),
            sys.join("kernel/iommu_groups/7/devices").join(f),
        )
        .unwrap();
    }
    symlink("../../../devices/pci0000:00/0000:00:03.0", sys.join("class/vfio-dev/vfio3/device")).unwrap();
    std::fs::write(dev.join("vfio/7"), "").unwrap();
    std::fs::write(dev.join("vfio/devices/vfio3"), "").unwrap();
    let sysfs = pcilibs::sysfs::Sysfs::new(&sys).with_dev(&dev);
    (dir, sysfs)
}

#[test]
fn vfio_nodes_name_their_host_functions() {
    use pcie_topology::kata::{group_request, host_functions};
    use pcilibs::facts::ResourceOptions;
    let (_dir, sysfs) = vfio_tree();
    let group = sysfs.dev().join("vfio/7");
    let functions: Vec<Bdf> = host_functions(&sysfs, &group).unwrap().iter().map(|f| f.bdf).collect();
    assert_eq!(functions, [Bdf::parse("0000:00:03.0").unwrap(), Bdf::parse("0000:00:03.1").unwrap()]);
    let cdev = sysfs.dev().join("vfio/devices/vfio3");
    let one: Vec<Bdf> = host_functions(&sysfs, &cdev).unwrap().iter().map(|f| f.bdf).collect();
    assert_eq!(one, [Bdf::parse("0000:00:03.0").unwrap()]);
    // The whole group becomes one guest device of two functions, known by its Kata id.
    let request = group_request(&sysfs, "3fa9c2e1b0d4e577", &group, &ResourceOptions::all()).unwrap();
    assert_eq!(request.id.as_str(), "k3fa9c2e1b0d4e577");
    assert_eq!(request.iommu_group, Some(7));
    assert_eq!(request.functions.len(), 2);
    let mut c = root_ports(1);
    c.hot_plug_vfio = PortSetting::NoPort;
    let p = plan(&Q35::seabios(), &c.plan_request(vec![request], None).unwrap()).unwrap();
    assert_eq!(vfio_options(&p, "3fa9c2e1b0d4e577").unwrap(), ["0000:00:03.0=05/00", "0000:00:03.1=05/00.1"]);
    assert!(host_functions(&sysfs, &sysfs.dev().join("vfio/vfio")).is_err());
}

mod properties {
    use super::*;
    use pcie_topology::{DevFn, Foreign, ForeignDevice, PlanError, PlanRequest, SpareRequest};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The VMM's devices: auto-addressed endpoints and bridges pinned to slots 2..6.
    fn foreign() -> impl Strategy<Value = Foreign> {
        (0usize..6, prop::collection::btree_set(2u8..6, 0..3), 1u8..3).prop_map(|(auto, pinned, buses)| {
            let mut d: Vec<ForeignDevice> =
                (0..auto).map(|i| ForeignDevice::auto(&format!("v{i}"), "virtio-rng-pci")).collect();
            for (i, s) in pinned.into_iter().enumerate() {
                d.insert(
                    i.min(d.len()),
                    ForeignDevice::at(&format!("b{i}"), "pci-bridge", DevFn::new(s, 0).unwrap())
                        .with_buses(buses),
                );
            }
            Foreign::new().with_devices(d)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Around any such set the plan never takes a slot or a bus number of the VMM's,
        /// and numbers expanders as Kata's agent reads them.
        #[test]
        fn plans_keep_clear_of_the_vmms_devices(
            f in foreign(),
            spares in 0u32..6,
            nodes in prop::collection::btree_set(0u32..3, 0..3),
            ovmf in any::<bool>(),
        ) {
            let mut devices = Vec::new();
            for (i, n) in nodes.iter().enumerate() {
                let mut d = gpu(&format!("{i}"));
                d.numa_node = Some(*n);
                devices.push(d);
            }
            let numa = !devices.is_empty();
            let mut request = PlanRequest::default()
                .with_mode(if numa { Mode::Numa } else { Mode::RootPort })
                .with_devices(devices)
                .with_spares(vec![SpareRequest::new(HotplugProfile::nic(), spares)])
                .with_foreign(f.clone());
            request.options.expander_buses = pcie_topology::ExpanderBuses::KataAgent;
            let platform = if ovmf { Q35::ovmf() } else { Q35::seabios() };
            let p = match plan(&platform, &request) {
                Ok(p) => p,
                Err(PlanError::Alloc(_) | PlanError::Buses { .. } | PlanError::BusRange { .. }) => return Ok(()),
                Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
            };
            let theirs: BTreeSet<u8> = p.foreign.iter().map(|x| x.addr.slot()).collect();
            prop_assert_eq!(theirs.len(), f.devices.len());
            let ours: Vec<u8> = p.ports.iter().filter(|x| x.host_bridge == "pcie.0" && x.kind == PortKind::Root)
                .map(|x| x.bdf.device())
                .chain(p.host_bridges.iter().filter_map(|h| h.device.as_ref()).filter_map(|d| d.addr).map(|a| a.slot()))
                .collect();
            prop_assert!(ours.iter().all(|s| !theirs.contains(s) && *s != 0 && *s != 0x1f), "{:?} {:?}", ours, theirs);
            // Auto-addressed devices sit in the lowest free slots, as QEMU puts them.
            let pinned: BTreeSet<u8> = f.devices.iter().filter_map(|d| d.addr).map(|a| a.slot()).collect();
            let lowest: Vec<u8> = (1u8..0x1f).filter(|s| !pinned.contains(s)).take(f.devices.iter().filter(|d| d.addr.is_none()).count()).collect();
            let auto: Vec<u8> = p.foreign.iter().filter(|x| x.device.addr.is_none()).map(|x| x.addr.slot()).collect();
            prop_assert_eq!(auto, lowest);
            // Bus ranges of the VMM's bridges and of the plan's ports never overlap.
            let mut ranges: Vec<(u8, u8)> = p.foreign.iter()
                .filter_map(|x| x.secondary_bus.zip(x.subordinate_bus))
                .chain(p.ports.iter().filter(|x| x.kind == PortKind::Root).map(|x| (x.secondary_bus, x.subordinate_bus)))
                .collect();
            ranges.sort_unstable();
            prop_assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0), "{:?}", ranges);
            for h in p.host_bridges.iter().skip(1) {
                prop_assert_eq!(u32::from(h.bus_nr), 0x20 * (h.numa_node.unwrap() + 1));
                prop_assert!(h.last_bus < h.bus_nr.saturating_add(0x20));
            }
            prop_assert!(p.host_bridges[0].last_bus < 0x20);
        }
    }
}

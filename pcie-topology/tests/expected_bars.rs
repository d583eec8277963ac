//! What a plan says the guest will show of each function's resources: BAR index and role
//! from the request through the plan, on a real SR-IOV function (the nvme PF of pcilibs'
//! QEMU guest fixtures) and on stand-ins. (Plan files of older formats: `plan_format.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;

use arch_x86_aarch64::Q35;
use pcie_topology::units::GIB;
use pcie_topology::{plan, DeviceRequest, FunctionResource, Plan, PlanRequest, QemuId, ResourceRole};
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::sysfs::SysfsDevice;

/// The sysfs files of QEMU 7.2's `nvme` with `sriov_max_vfs=4` as a Linux 6.1 guest shows
/// them (see the fixture folder's README): BAR 0 of 16 KiB, VF BAR 0 of 16 KiB per VF.
fn nvme_pf() -> FunctionFacts {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pcilibs/tests/fixtures/qemu-x86_64/0000:06:00.0");
    assert!(
        dir.join("config").is_file(),
        "{} missing: the workspace's pcilibs fixtures are needed",
        dir.display()
    );
    SysfsDevice::open_dir(dir).unwrap().facts().unwrap()
}

fn one_device(d: DeviceRequest) -> Plan {
    plan(&Q35::seabios(), &PlanRequest::default().with_devices(vec![d])).unwrap()
}

#[test]
fn sriov_apertures_are_planned_at_the_vf_bar_index_and_not_expected_in_the_guest() {
    let facts = nvme_pf();
    let sriov = facts.sriov.as_ref().expect("the fixture's nvme has SR-IOV");
    assert_eq!(sriov.total_vfs, 4);
    let opts = ResourceOptions::all();
    let d = DeviceRequest::from_facts(QemuId::new("nvme0").unwrap(), std::slice::from_ref(&facts), &opts)
        .unwrap();
    let p = one_device(d);
    let bars = &p.device("nvme0").unwrap().functions[0].bars;
    // Room for the VFs' BAR 0 (4 × 16 KiB) next to the PF's own BAR 0.
    let planned: Vec<(Option<u8>, ResourceRole, u64)> =
        bars.iter().map(|b| (b.index, b.role, b.size)).collect();
    assert_eq!(
        planned,
        [(Some(0), ResourceRole::Bar, 16 << 10), (Some(0), ResourceRole::VfAperture, 64 << 10)]
    );
    assert!(p.device("nvme0").unwrap().need.mem.size >= 80 << 10);
    // The guest shows the PF's BARs at the facts' indices and sizes, and no aperture.
    let visible: Vec<(u8, u64)> = bars.iter().filter_map(|b| Some((b.index?, b.visible_size()?))).collect();
    let host: Vec<(u8, u64)> = facts.bars.iter().map(|b| (b.index, b.size.unwrap())).collect();
    assert_eq!(visible, host);
    // The hotplug action carries the same entries, and so does the plan file.
    assert_eq!(&p.hotplug_action("nvme0").unwrap().functions[0].bars, bars);
    let json = p.to_json().unwrap();
    assert!(json.contains(r#""role": "vf-aperture""#), "{json}");
    assert_eq!(Plan::from_json(&json).unwrap(), p);
}

#[test]
fn a_resizable_bar_is_planned_at_its_largest_and_expected_at_its_current_size() {
    let mut facts = nvme_pf();
    facts.sriov = None;
    facts.rebar = vec![pcilibs::facts::RebarFacts::new(0, vec![16 << 10, 64 << 20], 16 << 10)];
    let opts = ResourceOptions::default().with_rebar_max(true);
    let d = DeviceRequest::from_facts(QemuId::new("nvme0").unwrap(), &[facts], &opts).unwrap();
    let p = one_device(d);
    let bar = p.device("nvme0").unwrap().functions[0].bars[0];
    assert_eq!(
        (bar.index, bar.size, bar.role),
        (Some(0), 64 << 20, ResourceRole::ResizableMax { current: 16 << 10 })
    );
    assert_eq!(bar.visible_size(), Some(16 << 10));
    // A non-prefetchable BAR: the memory window holds the largest size.
    assert!(p.device("nvme0").unwrap().need.mem.size >= 64 << 20);
}

#[test]
fn ivshmem_stand_in_is_expected_at_bars_0_and_2() {
    let p = one_device(DeviceRequest::ivshmem("gpu0", 4 * GIB).unwrap());
    let bars: Vec<(Option<u8>, Option<u64>)> =
        p.device("gpu0").unwrap().functions[0].bars.iter().map(|b| (b.index, b.visible_size())).collect();
    assert_eq!(bars, [(Some(0), Some(256)), (Some(2), Some(4 * GIB))]);
}

#[test]
fn a_resource_without_index_stays_unknown_through_the_plan() {
    let mut d = DeviceRequest::ivshmem("gpu0", GIB).unwrap();
    let r = &mut d.functions[0].resources[1];
    *r = FunctionResource::from(r.resource);
    let p = one_device(d);
    let bars = &p.device("gpu0").unwrap().functions[0].bars;
    assert_eq!((bars[0].index, bars[1].index), (Some(0), None));
}

//! Sysfs trees: the input is a small archive of files, directories and links (see
//! `pcie_hotplug_fuzz::sysfs_tree`) written into a temporary directory as a sysfs tree,
//! which is enumerated; every function's facts and host relations are read, also
//! through `SysfsDevice::open_dir` on each function directory. Promises checked: no panic; every failure is a typed
//! `SysfsError` with a message; facts that are read serialize and read back, give a
//! requirement or a typed error for every resource selection, and a planner request or
//! a typed error, alone and as a group.
#![no_main]

use std::sync::OnceLock;

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use pcie_hotplug_fuzz::sysfs_tree::{self, Scratch};
use pcie_topology::{DeviceRequest, QemuId};
use pcilibs::facts::{passthrough_functions, requirement_of, FunctionFacts, ResourceOptions};
use pcilibs::sysfs::{Sysfs, SysfsDevice};

/// Most functions read from one tree.
const MAX_READ: usize = 8;

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| Scratch::new().expect("a scratch directory"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(root) = scratch().fresh("sys") else { return };
    let entries = sysfs_tree::parse(data);
    sysfs_tree::write(&root, &entries);
    let sysfs = Sysfs::new(&root);
    let mut all = Vec::new();
    match sysfs.functions() {
        Ok(list) => {
            for bdf in list.into_iter().take(MAX_READ) {
                let dev = sysfs.device(bdf);
                if let Some(f) = read_device(&dev) {
                    all.push(f);
                }
                match sysfs.host_device(bdf) {
                    Ok(h) => {
                        assert_eq!(h.facts.bdf, bdf);
                        let text = serde_json::to_string(&h).expect("host device serializes");
                        let back: pcilibs::sysfs::HostDevice =
                            serde_json::from_str(&text).expect("reads back");
                        assert_eq!(back, h);
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let dirs: Vec<PathBuf> = entries
        .iter()
        .filter_map(|e| match e {
            sysfs_tree::Entry::File(p, _) if p.ends_with("config") => p.parent().map(|d| root.join(d)),
            _ => None,
        })
        .take(MAX_READ)
        .collect();
    for dir in &dirs {
        match SysfsDevice::open_dir(dir) {
            Ok(dev) => {
                let _ = read_device(&dev);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    group(&all);
});

/// Every accessor of one function; the facts when they read.
fn read_device(dev: &SysfsDevice) -> Option<FunctionFacts> {
    let _ = dev.config().map(|c| assert!(c.len() <= 4096, "{} bytes of config read", c.len()));
    let _ = dev.resource();
    let _ = dev.driver();
    let _ = dev.iommu_group();
    let _ = dev.iommu_group_members();
    let _ = dev.numa_node();
    let _ = dev.sriov_totalvfs();
    let _ = dev.sriov_numvfs();
    let _ = dev.virtual_functions();
    let _ = dev.physical_function();
    let _ = dev.upstream_bridges();
    if let Ok(total) = dev.sriov_totalvfs() {
        let _ = dev.sizes(total);
    }
    match dev.facts() {
        Ok(f) => {
            assert_eq!(f.bdf, dev.bdf());
            let text = serde_json::to_string(&f).expect("facts serialize");
            let back: FunctionFacts = serde_json::from_str(&text).expect("facts read back");
            assert_eq!(back, f);
            Some(f)
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

/// The functions read, as one IOMMU group handed to a guest.
fn group(all: &[FunctionFacts]) {
    if all.is_empty() {
        return;
    }
    let kept: Vec<FunctionFacts> = passthrough_functions(all).into_iter().cloned().collect();
    for bits in 0u8..8 {
        let opts = ResourceOptions::default()
            .with_rom(bits & 1 != 0)
            .with_sriov_vfs(bits & 2 != 0)
            .with_rebar_max(bits & 4 != 0);
        if let Err(e) = requirement_of(all.iter(), &opts) {
            assert!(!e.to_string().is_empty());
        }
        for f in all {
            let _ = f.unknown_sizes(&opts);
            let _ = f.requirement(&opts);
        }
        if kept.is_empty() {
            continue;
        }
        match DeviceRequest::from_facts(QemuId::new("grp0").expect("valid id"), &kept, &opts) {
            Ok(d) => assert!(d.validate().is_ok()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

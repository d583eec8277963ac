//! Checks before a VFIO hotplug: the device exists and its IOMMU group is viable.
//!
//! The host functions a request's devices pass through ([`crate::PlugFunction::host`]) are checked through `pcilibs`'s host layer
//! ([`pcilibs::sysfs`]), which reads sysfs and holds the viability rule: every member of
//! the group on a VFIO driver, `pci-stub` or no driver (bridges may keep theirs). A group
//! with a member still on its host driver would make QEMU's open of `/dev/vfio/N` fail,
//! or worse, take a device away from the host: it is refused before `device_add`, with
//! [`crate::EngineError::Vfio`] wrapping the host layer's error.
//!
//! The engine reads the sysfs tree of [`EngineOptions::sysfs`](crate::EngineOptions),
//! `/sys` unless a test points it at a tree of its own.

use std::path::PathBuf;

use pcie_topology::HostRef;
use pcilibs::bdf::Bdf;
use pcilibs::sysfs::{Sysfs, SysfsError};

use crate::request::{Expectation, PciIds, PlugRequest};

/// One check the engine runs before plugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VfioCheck {
    /// `vfio-pci,host=BDF`: the PCI function exists and its group is viable.
    PciHost(Bdf),
    /// `sysfsdev=PATH` (`vfio-pci`, mdev, `vfio-ccw`, `vfio-ap`): the path exists and, if it
    /// has an IOMMU group, that group is viable.
    SysfsDev(PathBuf),
}

impl VfioCheck {
    /// Runs the check against `sysfs`.
    pub(crate) fn run(&self, sysfs: &Sysfs) -> Result<(), SysfsError> {
        match self {
            VfioCheck::PciHost(bdf) => sysfs.check_vfio_function(*bdf).map(drop),
            VfioCheck::SysfsDev(path) => sysfs.check_vfio_device(path).map(drop),
        }
    }
}

/// Expects each `vfio-pci` function of `req` that passes through a host PCI function to
/// show that function's vendor and device ids in `query-pci` (QEMU passes them through),
/// unless the request expects ids already or overrides them (`x-pci-vendor-id`,
/// `x-pci-device-id`). The ids come from the config space as `vfio-pci` presents it
/// (`SysfsDevice::completed_config`: an SR-IOV VF reads 0xffff there, the kernel's
/// `vendor` and `device` files have its ids). A host function whose ids `sysfs` cannot
/// read keeps them unchecked (the VFIO check has found the function itself).
pub(crate) fn expect_host_ids(req: &mut PlugRequest, sysfs: &Sysfs) {
    for f in &mut req.functions {
        let Some(HostRef::Pci(bdf)) = f.host else { continue };
        let overridden =
            ["x-pci-vendor-id", "x-pci-device-id"].iter().any(|k| f.device.props.contains_key(*k));
        let Expectation::Pci(want) = &mut f.expect else { continue };
        if want.ids.is_some() || overridden || f.device.driver != "vfio-pci" {
            continue;
        }
        let Ok(config) = sysfs.device(bdf).completed_config() else { continue };
        if let Some(&[v0, v1, d0, d1]) = config.get(..4) {
            let ids = PciIds::new(u16::from_le_bytes([v0, v1]), u16::from_le_bytes([d0, d1]));
            if ids.vendor != 0xffff {
                want.ids = Some(ids);
            }
        }
    }
}

/// The checks a request needs: one per host function its devices pass through
/// ([`crate::PlugFunction::host`]).
pub(crate) fn checks_for(req: &PlugRequest) -> Vec<VfioCheck> {
    req.functions
        .iter()
        .filter_map(|f| match f.host.as_ref()? {
            HostRef::Pci(bdf) => Some(VfioCheck::PciHost(*bdf)),
            HostRef::Sysfsdev(path) => Some(VfioCheck::SysfsDev(PathBuf::from(path))),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Builds `devices` under a sysfs-like tree: (bdf, group, driver, class).
    fn tree(devices: &[(&str, &str, Option<&str>, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for (bdf, group, driver, class) in devices {
            let dev = r.join("devices/pci0000:00").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("class"), format!("{class}\n")).unwrap();
            let gdir = r.join("kernel/iommu_groups").join(group).join("devices");
            std::fs::create_dir_all(&gdir).unwrap();
            symlink(r.join("kernel/iommu_groups").join(group), dev.join("iommu_group")).unwrap();
            symlink(&dev, gdir.join(bdf)).unwrap();
            if let Some(d) = driver {
                let ddir = r.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).unwrap();
                symlink(&ddir, dev.join("driver")).unwrap();
            }
            std::fs::create_dir_all(r.join("bus/pci/devices")).unwrap();
            symlink(&dev, r.join("bus/pci/devices").join(bdf)).unwrap();
        }
        t
    }

    fn host(text: &str) -> VfioCheck {
        VfioCheck::PciHost(Bdf::parse(text).unwrap())
    }

    #[test]
    fn viable_group_passes() {
        let t = tree(&[
            ("0000:01:00.0", "7", Some("vfio-pci"), "0x030200"),
            ("0000:01:00.1", "7", None, "0x040300"),
            ("0000:00:01.0", "7", Some("pcieport"), "0x060400"),
        ]);
        host("0000:01:00.0").run(&Sysfs::new(t.path())).unwrap();
    }

    #[test]
    fn member_on_host_driver_is_refused() {
        let t = tree(&[
            ("0000:01:00.0", "7", Some("vfio-pci"), "0x030200"),
            ("0000:01:00.1", "7", Some("snd_hda_intel"), "0x040300"),
        ]);
        let err = host("0000:01:00.0").run(&Sysfs::new(t.path())).unwrap_err();
        match err {
            SysfsError::GroupNotViable { group, member, driver } => {
                assert_eq!(
                    (group, member.to_string().as_str(), driver.as_str()),
                    (7, "0000:01:00.1", "snd_hda_intel")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_device_and_sysfsdev_paths() {
        let t = tree(&[("0000:02:00.0", "3", Some("vfio-pci"), "0x020000")]);
        let s = Sysfs::new(t.path());
        assert!(matches!(host("0000:09:00.0").run(&s), Err(SysfsError::NoDevice { .. })));
        VfioCheck::SysfsDev("/sys/bus/pci/devices/0000:02:00.0".into()).run(&s).unwrap();
        // An AP matrix device has no group: existing is enough.
        std::fs::create_dir_all(t.path().join("devices/vfio_ap/matrix/uuid-1")).unwrap();
        VfioCheck::SysfsDev("/sys/devices/vfio_ap/matrix/uuid-1".into()).run(&s).unwrap();
        assert!(VfioCheck::SysfsDev("/sys/devices/vfio_ap/matrix/uuid-2".into()).run(&s).is_err());
    }

    /// A `vfio-pci` function is expected with its host function's ids, read from its
    /// config space (a VF's from `vendor` and `device`); one that overrides its ids, one
    /// that is not VFIO and one whose config space cannot be read keep theirs unchecked.
    #[test]
    fn host_ids_are_expected() {
        let t = tree(&[
            ("0000:01:00.0", "7", Some("vfio-pci"), "0x030200"),
            ("0000:02:00.0", "8", Some("vfio-pci"), "0x030200"),
        ]);
        let mut config = vec![0u8; 64];
        config[..4].copy_from_slice(&[0xde, 0x10, 0x30, 0x23]);
        std::fs::write(t.path().join("devices/pci0000:00/0000:01:00.0/config"), &config).unwrap();
        // An SR-IOV VF: 0xffff in its config space, its ids in `vendor` and `device`.
        let vf = t.path().join("devices/pci0000:00/0000:02:00.0");
        config[..4].copy_from_slice(&[0xff; 4]);
        std::fs::write(vf.join("config"), &config).unwrap();
        std::fs::write(vf.join("vendor"), "0x1b36\n").unwrap();
        std::fs::write(vf.join("device"), "0x0010\n").unwrap();
        let mut r: PlugRequest = serde_json::from_value(serde_json::json!({
            "port": "rp0",
            "functions": [
                {"qdev": {"driver": "vfio-pci", "id": "g0", "host": "01:00.0", "addr": "0.0"},
                 "expect": {"kind": "pci", "slot": 0, "function": 0}},
                {"qdev": {"driver": "vfio-pci", "id": "g1", "host": "02:00.0", "addr": "1.0"},
                 "expect": {"kind": "pci", "slot": 1, "function": 0}},
                {"qdev": {"driver": "vfio-pci", "id": "g2", "host": "01:00.0", "addr": "2.0",
                          "x-pci-vendor-id": 4318},
                 "expect": {"kind": "pci", "slot": 2, "function": 0}},
                {"qdev": {"driver": "virtio-net-pci", "id": "n0", "addr": "3.0"},
                 "expect": {"kind": "pci", "slot": 3, "function": 0}},
                {"qdev": {"driver": "vfio-pci", "id": "g3", "host": "09:00.0", "addr": "4.0"},
                 "expect": {"kind": "pci", "slot": 4, "function": 0}}
            ]
        }))
        .unwrap();
        expect_host_ids(&mut r, &Sysfs::new(t.path()));
        let ids: Vec<Option<PciIds>> = r
            .functions
            .iter()
            .map(|f| match &f.expect {
                Expectation::Pci(p) => p.ids,
                _ => None,
            })
            .collect();
        let vf = Some(PciIds::new(0x1b36, 0x0010));
        assert_eq!(ids, [Some(PciIds::new(0x10de, 0x2330)), vf, None, None, None]);
    }

    #[test]
    fn checks_derive_from_request() {
        let r: PlugRequest = serde_json::from_value(serde_json::json!({
            "port": "rp0",
            "functions": [
                {"qdev": {"driver": "vfio-pci", "id": "g0", "host": "01:00.0"}},
                {"qdev": {"driver": "vfio-ccw", "id": "c0", "sysfsdev": "/sys/bus/mdev/devices/u1"}},
                {"qdev": {"driver": "virtio-net-pci", "id": "n0"}}
            ]
        }))
        .unwrap();
        assert_eq!(
            checks_for(&r),
            vec![host("0000:01:00.0"), VfioCheck::SysfsDev("/sys/bus/mdev/devices/u1".into())]
        );
    }
}

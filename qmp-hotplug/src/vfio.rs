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

use crate::request::PlugRequest;

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

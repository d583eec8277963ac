//! Checks before a VFIO hotplug: the device exists and its IOMMU group is viable.
//!
//! A group is viable when every member is bound to a VFIO driver (`vfio-pci`, a variant
//! driver such as `mlx5_vfio_pci`, `vfio_mdev`), to `pci-stub`, or to no driver; PCI
//! bridges may keep their driver (`pcieport`), as the kernel allows. A group with a member
//! still on its host driver would make QEMU's open of `/dev/vfio/N` fail, or worse, take a
//! device away from the host: it is refused before `device_add`.
//!
//! Everything is read below a sysfs root ([`Sysfs::new`]) that tests point at a directory
//! tree of their own.

use std::path::{Path, PathBuf};

use crate::request::DeviceRequest;

/// Most members read from one IOMMU group.
const MAX_GROUP_MEMBERS: usize = 1024;

/// Errors of the VFIO checks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfioError {
    /// The host device is not there.
    #[error("{0} does not exist")]
    NoDevice(PathBuf),
    /// The device has no IOMMU group (no IOMMU, or not enabled).
    #[error("{0} has no iommu_group: is the IOMMU enabled (intel_iommu=on / amd_iommu=on)?")]
    NoGroup(PathBuf),
    /// A member of the group is bound to a driver that is not VFIO's.
    #[error(
        "IOMMU group {group} is not viable: {device} is bound to {driver}; bind it to vfio-pci or unbind it"
    )]
    GroupNotViable {
        /// The group number.
        group: String,
        /// The member's name.
        device: String,
        /// Its driver.
        driver: String,
    },
    /// The group has more members than this crate reads.
    #[error("IOMMU group {0} has more than {MAX_GROUP_MEMBERS} members")]
    GroupTooLarge(String),
    /// Reading sysfs failed.
    #[error("reading {path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, VfioError>;

/// One check the engine runs before plugging.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VfioCheck {
    /// `vfio-pci,host=BDF`: the PCI device exists and its group is viable.
    PciHost(String),
    /// `sysfsdev=PATH` (`vfio-pci`, mdev, `vfio-ccw`, `vfio-ap`): the path exists and, if it
    /// has an IOMMU group, that group is viable.
    SysfsDev(PathBuf),
}

/// The checks a request needs, derived from its `vfio-*` devices.
pub fn checks_for(req: &DeviceRequest) -> Vec<VfioCheck> {
    let mut out = Vec::new();
    for f in &req.functions {
        if !f.driver().starts_with("vfio") {
            continue;
        }
        if let Some(host) = f.prop("host") {
            out.push(VfioCheck::PciHost(normalize_bdf(host)));
        }
        if let Some(path) = f.prop("sysfsdev") {
            out.push(VfioCheck::SysfsDev(PathBuf::from(path)));
        }
    }
    out
}

/// `01:00.0` → `0000:01:00.0`.
fn normalize_bdf(bdf: &str) -> String {
    if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf.to_owned()
    }
}

/// A sysfs tree (the host's `/sys` or a test's copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs { root: PathBuf::from("/sys") }
    }
}

impl Sysfs {
    /// A sysfs tree rooted at `root` (what the host has at `/sys`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    /// Maps an absolute `/sys/...` path into this tree.
    pub fn path(&self, sys_path: &Path) -> PathBuf {
        let rel = sys_path.strip_prefix("/sys").unwrap_or(sys_path);
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        self.root.join(rel)
    }

    /// Runs one check.
    pub fn run(&self, check: &VfioCheck) -> Result<()> {
        match check {
            VfioCheck::PciHost(bdf) => {
                let dev = self.root.join("bus/pci/devices").join(bdf);
                if !dev.exists() {
                    return Err(VfioError::NoDevice(dev));
                }
                let group = self.group_of(&dev)?.ok_or(VfioError::NoGroup(dev))?;
                self.check_group(&group)
            }
            VfioCheck::SysfsDev(p) => {
                let dev = self.path(p);
                if !dev.exists() {
                    return Err(VfioError::NoDevice(dev));
                }
                match self.group_of(&dev)? {
                    Some(g) => self.check_group(&g),
                    // vfio-ap matrix devices have no group of their own.
                    None => Ok(()),
                }
            }
        }
    }

    /// The IOMMU group of a device directory, if it has one.
    fn group_of(&self, dev: &Path) -> Result<Option<String>> {
        let link = dev.join("iommu_group");
        match std::fs::read_link(&link) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(VfioError::Io { path: link, source }),
        }
    }

    /// Fails unless every member of `group` is VFIO-ready.
    pub fn check_group(&self, group: &str) -> Result<()> {
        let dir = self.root.join("kernel/iommu_groups").join(group).join("devices");
        let entries =
            std::fs::read_dir(&dir).map_err(|source| VfioError::Io { path: dir.clone(), source })?;
        for (n, entry) in entries.enumerate() {
            if n >= MAX_GROUP_MEMBERS {
                return Err(VfioError::GroupTooLarge(group.to_owned()));
            }
            let entry = entry.map_err(|source| VfioError::Io { path: dir.clone(), source })?;
            let member = entry.path();
            let driver = match std::fs::read_link(member.join("driver")) {
                Ok(t) => t.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(VfioError::Io { path: member.join("driver"), source }),
            };
            if driver_allowed(&driver) || is_bridge(&member) {
                continue;
            }
            return Err(VfioError::GroupNotViable {
                group: group.to_owned(),
                device: entry.file_name().to_string_lossy().into_owned(),
                driver,
            });
        }
        Ok(())
    }
}

fn driver_allowed(driver: &str) -> bool {
    driver.contains("vfio") || driver == "pci-stub"
}

/// PCI-to-PCI bridges (class 0x0604) may stay on their driver.
/// Read as a regular file of at most 64 bytes: a FIFO or device planted in a sysfs tree
/// is no bridge, and never blocks or fills memory.
fn is_bridge(dev: &Path) -> bool {
    crate::files::read_small(&dev.join("class"), 64)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|c| c >> 8 == 0x0604)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Builds `devices` under a fake sysfs: (bdf, group, driver, class).
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

    #[test]
    fn viable_group_passes() {
        let t = tree(&[
            ("0000:01:00.0", "7", Some("vfio-pci"), "0x030200"),
            ("0000:01:00.1", "7", None, "0x040300"),
            ("0000:00:01.0", "7", Some("pcieport"), "0x060400"),
        ]);
        let s = Sysfs::new(t.path());
        s.run(&VfioCheck::PciHost("0000:01:00.0".into())).unwrap();
    }

    #[test]
    fn member_on_host_driver_is_refused() {
        let t = tree(&[
            ("0000:01:00.0", "7", Some("vfio-pci"), "0x030200"),
            ("0000:01:00.1", "7", Some("snd_hda_intel"), "0x040300"),
        ]);
        let s = Sysfs::new(t.path());
        let err = s.run(&VfioCheck::PciHost("0000:01:00.0".into())).unwrap_err();
        match err {
            VfioError::GroupNotViable { group, device, driver } => {
                assert_eq!(
                    (group.as_str(), device.as_str(), driver.as_str()),
                    ("7", "0000:01:00.1", "snd_hda_intel")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// A member whose `class` is a FIFO (or `/dev/zero`) is read as no bridge at once.
    #[test]
    fn special_class_file_does_not_block() {
        let t = tree(&[
            ("0000:01:00.0", "7", Some("vfio-pci"), "0x030200"),
            ("0000:00:01.0", "7", Some("pcieport"), "0x060400"),
        ]);
        let class = t.path().join("devices/pci0000:00/0000:00:01.0/class");
        std::fs::remove_file(&class).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &class,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let s = Sysfs::new(t.path());
        let started = std::time::Instant::now();
        let err = s.run(&VfioCheck::PciHost("0000:01:00.0".into())).unwrap_err();
        assert!(matches!(err, VfioError::GroupNotViable { .. }), "{err:?}");
        std::fs::remove_file(&class).unwrap();
        symlink("/dev/zero", &class).unwrap();
        assert!(matches!(
            s.run(&VfioCheck::PciHost("0000:01:00.0".into())),
            Err(VfioError::GroupNotViable { .. })
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn missing_device_and_sysfsdev_paths() {
        let t = tree(&[("0000:02:00.0", "3", Some("vfio-pci"), "0x020000")]);
        let s = Sysfs::new(t.path());
        assert!(matches!(s.run(&VfioCheck::PciHost("0000:09:00.0".into())), Err(VfioError::NoDevice(_))));
        s.run(&VfioCheck::SysfsDev("/sys/bus/pci/devices/0000:02:00.0".into())).unwrap();
        // An AP matrix device has no group: existing is enough.
        std::fs::create_dir_all(t.path().join("devices/vfio_ap/matrix/uuid-1")).unwrap();
        s.run(&VfioCheck::SysfsDev("/sys/devices/vfio_ap/matrix/uuid-1".into())).unwrap();
        assert!(s.run(&VfioCheck::SysfsDev("/sys/devices/vfio_ap/matrix/uuid-2".into())).is_err());
    }

    #[test]
    fn checks_derive_from_request() {
        let r: DeviceRequest = serde_json::from_value(serde_json::json!({
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
            vec![
                VfioCheck::PciHost("0000:01:00.0".into()),
                VfioCheck::SysfsDev("/sys/bus/mdev/devices/u1".into())
            ]
        );
    }
}

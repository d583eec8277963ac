//! VFIO device character devices (the iommufd interface, Linux 6.6+) and `/dev/iommu`.
//!
//! A function bound to `vfio-pci` lists its character device in sysfs as
//! `<function>/vfio-dev/vfio<N>`, and the kernel creates `/dev/vfio/devices/vfio<N>`; the
//! class device `class/vfio-dev/vfio<N>` links back to the function through `device`.
//! Linux 6.1 already lists `vfio-dev/vfio<N>` but creates the node only from 6.6 on, so a
//! function has a character device only when the node exists too.

use std::path::{Path, PathBuf};

use super::{bounded_read_dir, link_name, parse_decimal, Result, Sysfs, SysfsError};
use crate::bdf::Bdf;

/// `vfio<N>`: the name of a VFIO device character device.
fn is_cdev_name(name: &str) -> bool {
    name.strip_prefix("vfio").and_then(parse_decimal).is_some()
}

impl Sysfs {
    /// The iommufd node (`/dev/iommu`) when the kernel has one.
    pub fn iommufd_node(&self) -> Option<PathBuf> {
        Some(self.dev.join("iommu")).filter(|p| p.exists())
    }

    /// The VFIO character device of `bdf` (`/dev/vfio/devices/vfio<N>`), `None` when the
    /// function has none (not bound to a VFIO driver, or a kernel before 6.6).
    pub fn vfio_cdev(&self, bdf: Bdf) -> Result<Option<PathBuf>> {
        let dir = self.device(bdf).path().join("vfio-dev");
        if !dir.exists() {
            return Ok(None);
        }
        let mut found = None;
        for entry in bounded_read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if is_cdev_name(&name) {
                found = Some(name);
                break;
            }
        }
        Ok(found.map(|n| self.dev.join("vfio/devices").join(n)).filter(|p| p.exists()))
    }

    /// The PCI function behind a VFIO character device (`/dev/vfio/devices/vfio<N>`),
    /// through `class/vfio-dev/vfio<N>/device`. A path that is not such a node is
    /// [`SysfsError::NotInTree`]; a character device of no PCI function (a mediated
    /// device) is [`SysfsError::Bdf`].
    pub fn function_of_cdev(&self, cdev: &Path) -> Result<Bdf> {
        let name = cdev
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_cdev_name(n) && cdev.parent() == Some(&self.dev.join("vfio/devices")))
            .ok_or_else(|| SysfsError::NotInTree {
                path: cdev.to_path_buf(),
                expected: "a VFIO character device (/dev/vfio/devices/vfio<N>)",
            })?;
        let link = self.root.join("class/vfio-dev").join(name).join("device");
        let target = link_name(&link)?.ok_or_else(|| SysfsError::NoDevice { path: link.clone() })?;
        Bdf::parse(&target).map_err(|source| SysfsError::Bdf { path: link, source })
    }
}

//! IOMMU groups: their members, whether VFIO can take them, and the VFIO group node.
//!
//! A group is viable, that is VFIO lets a process open `/dev/vfio/<group>` (and QEMU take
//! one of its functions), when every member is bound to a VFIO driver (`vfio-pci`, a
//! variant driver such as `mlx5_vfio_pci`, `vfio_mdev`), to `pci-stub`, or to no driver;
//! PCI-to-PCI bridges may keep their driver (`pcieport`), as the kernel allows. A group
//! with a member still on its host driver makes QEMU's open fail, or worse, takes a device
//! away from the host: runtimes check this before they hot-plug a function.
//!
//! Members are read from `kernel/iommu_groups/<group>/devices`. Besides PCI functions a
//! group can hold mediated devices (named by UUID) and, on some platforms, devices of
//! other buses (`ff100000.dma`); they are [`MemberName::Other`] and are judged by their
//! driver alone.

use std::path::{Component, Path, PathBuf};

use super::{bounded_read_dir, link_name, parse_decimal, read_optional, Result, Sysfs, SysfsError};
use crate::bdf::Bdf;

/// Class code (base and sub class) of a PCI-to-PCI bridge.
const PCI_BRIDGE_CLASS: u32 = 0x0604;

/// The name of an IOMMU group member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum MemberName {
    /// A PCI function.
    Pci(Bdf),
    /// A device of another bus: a mediated device's UUID, a platform device's name.
    Other(String),
}

impl std::fmt::Display for MemberName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberName::Pci(bdf) => bdf.fmt(f),
            MemberName::Other(name) => f.write_str(name),
        }
    }
}

/// One member of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupMember {
    /// Its name in the group's `devices` directory.
    pub name: MemberName,
    /// The driver bound to it.
    pub driver: Option<String>,
    /// It is a PCI-to-PCI bridge (class 0x0604), which may keep its driver.
    pub bridge: bool,
}

impl GroupMember {
    /// Whether this member lets VFIO take the group: no driver, a VFIO driver, `pci-stub`,
    /// or a bridge on any driver.
    pub fn vfio_ready(&self) -> bool {
        match &self.driver {
            None => true,
            Some(d) => d.contains("vfio") || d == "pci-stub" || self.bridge,
        }
    }
}

/// An IOMMU group and its members.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IommuGroup {
    /// The group number (`/dev/vfio/<number>`).
    pub number: u32,
    /// Every member, sorted by name (PCI functions first).
    pub members: Vec<GroupMember>,
}

impl IommuGroup {
    /// The PCI functions of the group, sorted.
    pub fn functions(&self) -> Vec<Bdf> {
        self.members
            .iter()
            .filter_map(|m| match m.name {
                MemberName::Pci(bdf) => Some(bdf),
                MemberName::Other(_) => None,
            })
            .collect()
    }

    /// The first member that keeps VFIO from taking the group, if any.
    pub fn blocker(&self) -> Option<&GroupMember> {
        self.members.iter().find(|m| !m.vfio_ready())
    }

    /// Whether VFIO can take the group (see the module docs).
    pub fn is_viable(&self) -> bool {
        self.blocker().is_none()
    }
}

impl Sysfs {
    /// `kernel/iommu_groups/<group>/devices` below the root.
    fn group_devices_dir(&self, group: u32) -> PathBuf {
        self.root.join("kernel/iommu_groups").join(group.to_string()).join("devices")
    }

    /// IOMMU group `group` with every member's driver. A group that does not exist is
    /// [`SysfsError::Io`] (not found).
    pub fn iommu_group(&self, group: u32) -> Result<IommuGroup> {
        let dir = self.group_devices_dir(group);
        let mut members = Vec::new();
        for entry in bounded_read_dir(&dir)? {
            let entry = entry?;
            let text = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let name = match Bdf::parse(&text) {
                Ok(bdf) => MemberName::Pci(bdf),
                Err(_) => MemberName::Other(text),
            };
            let bridge = matches!(name, MemberName::Pci(_)) && class_of(&path)? >> 8 == PCI_BRIDGE_CLASS;
            members.push(GroupMember { name, driver: link_name(&path.join("driver"))?, bridge });
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(IommuGroup { number: group, members })
    }

    /// IOMMU group `group` when it is viable; otherwise [`SysfsError::GroupNotViable`]
    /// naming the first member on a driver VFIO does not accept.
    pub fn viable_group(&self, group: u32) -> Result<IommuGroup> {
        let g = self.iommu_group(group)?;
        match g.blocker() {
            None => Ok(g),
            Some(m) => Err(SysfsError::GroupNotViable {
                group,
                member: m.name.clone(),
                driver: m.driver.clone().unwrap_or_default(),
            }),
        }
    }

    /// Checks that PCI function `bdf` can be passed through with VFIO: it exists
    /// ([`SysfsError::NoDevice`]), has an IOMMU group ([`SysfsError::NoIommuGroup`]) and
    /// that group is viable ([`SysfsError::GroupNotViable`]). Returns the group.
    pub fn check_vfio_function(&self, bdf: Bdf) -> Result<IommuGroup> {
        let dev = self.device(bdf);
        if !dev.path().exists() {
            return Err(SysfsError::NoDevice { path: dev.path().to_path_buf() });
        }
        let group =
            dev.iommu_group()?.ok_or_else(|| SysfsError::NoIommuGroup { path: dev.path().to_path_buf() })?;
        self.viable_group(group)
    }

    /// Checks a device that VFIO takes by its sysfs path (QEMU's `sysfsdev=`: a PCI
    /// function, a mediated device for `vfio-ccw`, a `vfio-ap` matrix device). `sys_path`
    /// is absolute below `/sys` and is read at the same place below this tree's root. The
    /// device must exist ([`SysfsError::NoDevice`]); when it has an IOMMU group (a `vfio-ap`
    /// matrix device has none), the group must be viable. Returns the group, if any.
    pub fn check_vfio_device(&self, sys_path: &Path) -> Result<Option<IommuGroup>> {
        let dev = self.resolve(sys_path)?;
        if !dev.exists() {
            return Err(SysfsError::NoDevice { path: dev });
        }
        let link = dev.join("iommu_group");
        let Some(name) = link_name(&link)? else { return Ok(None) };
        let group = parse_decimal(&name).ok_or(SysfsError::BadValue { path: link, text: name })?;
        self.viable_group(group).map(Some)
    }

    /// Where `sys_path`, an absolute path below `/sys` (as QEMU and the kernel name
    /// devices), lies in this tree. A path elsewhere, relative, or with `..` is
    /// [`SysfsError::NotInTree`].
    pub fn resolve(&self, sys_path: &Path) -> Result<PathBuf> {
        let outside = || SysfsError::NotInTree {
            path: sys_path.to_path_buf(),
            expected: "an absolute path below /sys",
        };
        let rel = sys_path.strip_prefix("/sys").map_err(|_| outside())?;
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(outside());
        }
        Ok(self.root.join(rel))
    }

    /// The VFIO group node of `group` (`/dev/vfio/<group>`), whether or not it exists.
    pub fn vfio_group_node(&self, group: u32) -> PathBuf {
        self.dev.join("vfio").join(group.to_string())
    }

    /// The IOMMU group behind a VFIO group node (`/dev/vfio/<group>`, as a runtime is
    /// handed it): its number from the node's name, its functions from sysfs. A node
    /// outside `<dev>/vfio` or not named by a number (`/dev/vfio/vfio` is the container)
    /// is [`SysfsError::NotInTree`].
    pub fn group_of_node(&self, node: &Path) -> Result<IommuGroup> {
        let not_group = || SysfsError::NotInTree {
            path: node.to_path_buf(),
            expected: "a VFIO group node (/dev/vfio/<group>)",
        };
        if node.parent() != Some(&self.dev.join("vfio")) {
            return Err(not_group());
        }
        let group =
            node.file_name().and_then(|n| n.to_str()).and_then(parse_decimal).ok_or_else(not_group)?;
        self.iommu_group(group)
    }
}

/// The class code of the PCI function at `dev` (`class`, `0x060400`).
fn class_of(dev: &Path) -> Result<u32> {
    let p = dev.join("class");
    let Some(text) = read_optional(&p)? else { return Ok(0) };
    let t = text.trim();
    let hex = t.strip_prefix("0x").unwrap_or(t);
    Some(hex)
        .filter(|h| (1..=6).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| SysfsError::BadValue { path: p, text: super::cut(t) })
}

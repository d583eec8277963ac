//! BAR sizes and configuration space from a VFIO device (Linux).
//!
//! A device bound to `vfio-pci` exposes one region per BAR (indices 0..=5), one for the
//! expansion ROM (6) and one for configuration space (7). `VFIO_DEVICE_GET_REGION_INFO`
//! gives each region's size: that is the BAR size, and 0 for an unimplemented BAR or the
//! upper half of a 64-bit BAR. VFIO says nothing about SR-IOV VF BARs.
//!
//! The [`VfioDevice`] trait is all the rest of this module needs, so tests and VMMs that
//! already hold a device fd can supply their own. Two openers are provided:
//! [`GroupDevice::open`] (the container/group interface, `/dev/vfio/vfio` + `/dev/vfio/N`)
//! and [`CdevDevice::open`] (the iommufd interface, `/dev/vfio/devices/vfioX` +
//! `/dev/iommu`, Linux 6.6+). Opening a VFIO device resets it, and the group interface
//! claims the whole IOMMU group for this process: do not open devices a VMM is using.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FLAGS_PCI, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ROM_REGION_INDEX,
};

use crate::bdf::Bdf;
use crate::config::PCIE_CONFIG_SIZE;
use crate::facts::{FactsError, FunctionFacts};
use crate::sizing::{BarSizes, SizeSource};

#[allow(unsafe_code)]
mod sys;

/// Errors of VFIO access.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfioError {
    /// A device node could not be opened.
    #[error("{path}: {source}")]
    Open {
        /// The node.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// Which request.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The container speaks another VFIO API version.
    #[error("VFIO API version {0}, expected {VFIO_API_VERSION}")]
    ApiVersion(i32),
    /// The container does not offer the type-1 v2 IOMMU.
    #[error("VFIO container does not support the type1v2 IOMMU")]
    NoType1v2,
    /// Not every device of the group is bound to `vfio-pci` (or to no driver).
    #[error("IOMMU group {0} is not viable: bind all its devices to vfio-pci")]
    GroupNotViable(u32),
    /// The device is not a PCI device.
    #[error("VFIO device is not a PCI device")]
    NotPci,
    /// Reading a region failed.
    #[error("reading VFIO region {index}: {source}")]
    Read {
        /// Region index.
        index: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration space does not decode.
    #[error(transparent)]
    Facts(#[from] FactsError),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, VfioError>;

/// What `VFIO_DEVICE_GET_REGION_INFO` says about one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: not implemented).
    pub size: u64,
    /// Offset of the region in the device file.
    pub offset: u64,
}

impl RegionInfo {
    /// Region `index` as `VFIO_DEVICE_GET_REGION_INFO` describes it: for implementations
    /// of [`VfioDevice`] outside this crate.
    pub const fn new(index: u32, flags: u32, size: u64, offset: u64) -> Self {
        RegionInfo { index, flags, size, offset }
    }
}

/// A VFIO device: region info plus reads at a region offset.
pub trait VfioDevice {
    /// `VFIO_DEVICE_GET_INFO` flags and number of regions.
    fn device_info(&self) -> Result<(u32, u32)>;

    /// `VFIO_DEVICE_GET_REGION_INFO` for `index`.
    fn region_info(&self, index: u32) -> Result<RegionInfo>;

    /// Reads from `region` at `offset`; returns the bytes read.
    fn read_region(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<usize>;
}

/// BAR and ROM sizes from region info (no VF BAR sizes: VFIO has none).
pub fn sizes(dev: &impl VfioDevice) -> Result<BarSizes> {
    check_pci(dev)?;
    let mut s = BarSizes::empty(SizeSource::Vfio);
    for (i, slot) in (0u32..).zip(s.bars.iter_mut()) {
        let r = dev.region_info(i)?;
        *slot = (r.size > 0).then_some(r.size);
    }
    let rom = dev.region_info(VFIO_PCI_ROM_REGION_INDEX)?;
    s.rom = (rom.size > 0).then_some(rom.size);
    Ok(s)
}

/// The configuration space through the config region (as `vfio-pci` presents it: BAR
/// registers and some capabilities are virtualized).
pub fn config(dev: &impl VfioDevice) -> Result<Vec<u8>> {
    check_pci(dev)?;
    let region = dev.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
    let len = usize::try_from(region.size).unwrap_or(PCIE_CONFIG_SIZE).min(PCIE_CONFIG_SIZE);
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let Some(rest) = buf.get_mut(done..) else { break };
        let asked = rest.len();
        let n = dev.read_region(&region, done as u64, rest)?;
        if n == 0 {
            break;
        }
        // A device that claims more than it was asked for read only what fits.
        done += n.min(asked);
    }
    buf.truncate(done);
    Ok(buf)
}

/// Facts of the function behind `dev` (sizes from region info).
pub fn facts(dev: &impl VfioDevice, bdf: Bdf) -> Result<FunctionFacts> {
    let cfg = config(dev)?;
    let s = sizes(dev)?;
    Ok(FunctionFacts::from_config(bdf, &cfg, Some(&s))?)
}

fn check_pci(dev: &impl VfioDevice) -> Result<()> {
    let (flags, _) = dev.device_info()?;
    if flags & VFIO_DEVICE_FLAGS_PCI == 0 {
        return Err(VfioError::NotPci);
    }
    Ok(())
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| VfioError::Open { path: path.to_path_buf(), source })
}

fn ioctl<T>(what: &'static str, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| VfioError::Ioctl { what, source })
}

/// A device file descriptor with the region reads every opener shares.
#[derive(Debug)]
struct DeviceFd(File);

impl DeviceFd {
    fn device_info(&self) -> Result<(u32, u32)> {
        let (flags, regions, _) = ioctl("VFIO_DEVICE_GET_INFO", sys::device_info(&self.0))?;
        Ok((flags, regions))
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let (flags, size, offset) = ioctl("VFIO_DEVICE_GET_REGION_INFO", sys::region_info(&self.0, index))?;
        Ok(RegionInfo { index, flags, size, offset })
    }

    fn read_region(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let left = region.size.saturating_sub(offset);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let Some(buf) = buf.get_mut(..n) else { return Ok(0) };
        let past = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "region offset past 2^64");
        let at = region.offset.checked_add(offset).ok_or_else(past);
        at.and_then(|at| self.0.read_at(buf, at))
            .map_err(|source| VfioError::Read { index: region.index, source })
    }
}

/// A device opened through its IOMMU group (`/dev/vfio/vfio` + `/dev/vfio/<group>`).
#[derive(Debug)]
pub struct GroupDevice {
    _container: File,
    _group: File,
    device: DeviceFd,
}

impl GroupDevice {
    /// Opens `bdf` of IOMMU group `group` below `/dev/vfio`.
    pub fn open(group: u32, bdf: Bdf) -> Result<Self> {
        Self::open_in(Path::new("/dev/vfio"), group, bdf)
    }

    /// Opens `bdf` of IOMMU group `group` below `dev_vfio` (a directory laid out like
    /// `/dev/vfio`).
    pub fn open_in(dev_vfio: &Path, group: u32, bdf: Bdf) -> Result<Self> {
        let container = open_rw(&dev_vfio.join("vfio"))?;
        let version = ioctl("VFIO_GET_API_VERSION", sys::api_version(&container))?;
        if version != VFIO_API_VERSION as i32 {
            return Err(VfioError::ApiVersion(version));
        }
        if !ioctl("VFIO_CHECK_EXTENSION", sys::check_extension(&container, VFIO_TYPE1v2_IOMMU))? {
            return Err(VfioError::NoType1v2);
        }
        let group_file = open_rw(&dev_vfio.join(group.to_string()))?;
        let status = ioctl("VFIO_GROUP_GET_STATUS", sys::group_status(&group_file))?;
        if status & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable(group));
        }
        ioctl("VFIO_GROUP_SET_CONTAINER", sys::group_set_container(&group_file, &container))?;
        ioctl("VFIO_SET_IOMMU", sys::set_iommu(&container, VFIO_TYPE1v2_IOMMU))?;
        let device = ioctl("VFIO_GROUP_GET_DEVICE_FD", sys::group_get_device(&group_file, &bdf.to_string()))?;
        Ok(GroupDevice { _container: container, _group: group_file, device: DeviceFd(device) })
    }
}

/// A device opened through its character device and iommufd (Linux 6.6+).
#[derive(Debug)]
pub struct CdevDevice {
    _iommufd: File,
    device: DeviceFd,
}

impl CdevDevice {
    /// Opens `cdev` (e.g. `/dev/vfio/devices/vfio0`, named in the function's sysfs
    /// `vfio-dev/` directory) and binds it to a new iommufd from `iommu` (`/dev/iommu`).
    pub fn open(cdev: &Path, iommu: &Path) -> Result<Self> {
        let iommufd = open_rw(iommu)?;
        let device = open_rw(cdev)?;
        ioctl("VFIO_DEVICE_BIND_IOMMUFD", sys::bind_iommufd(&device, &iommufd))?;
        Ok(CdevDevice { _iommufd: iommufd, device: DeviceFd(device) })
    }
}

/// Both openers answer through the device fd they hold; their other files only keep the
/// container and group (or the iommufd) alive for as long as the device is open.
macro_rules! answer_through_device_fd {
    ($($opener:ty),+) => {$(
        impl VfioDevice for $opener {
            fn device_info(&self) -> Result<(u32, u32)> {
                self.device.device_info()
            }
            fn region_info(&self, index: u32) -> Result<RegionInfo> {
                self.device.region_info(index)
            }
            fn read_region(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<usize> {
                self.device.read_region(region, offset, buf)
            }
        }
    )+};
}

answer_through_device_fd!(GroupDevice, CdevDevice);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulated::EmulatedConfigSpace;

    /// A device that answers like vfio-pci would for a given config space and sizes.
    struct Fake {
        config: Vec<u8>,
        sizes: [u64; 9],
    }

    impl VfioDevice for Fake {
        fn device_info(&self) -> Result<(u32, u32)> {
            Ok((VFIO_DEVICE_FLAGS_PCI, 9))
        }
        fn region_info(&self, index: u32) -> Result<RegionInfo> {
            let size = self.sizes.get(index as usize).copied().unwrap_or(0);
            Ok(RegionInfo { index, flags: 3, size, offset: u64::from(index) << 40 })
        }
        fn read_region(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<usize> {
            assert_eq!(region.index, VFIO_PCI_CONFIG_REGION_INDEX);
            let start = offset as usize;
            let n = buf.len().min(self.config.len().saturating_sub(start)).min(100);
            buf[..n].copy_from_slice(&self.config[start..start + n]);
            Ok(n)
        }
    }

    #[test]
    fn sizes_and_config_from_regions() {
        let mut e = EmulatedConfigSpace::endpoint(0x10de, 0x2330, 0x030200, 256);
        e.set_bar(0, crate::bar::BarKind::Mem32, false, 16 << 20, 0xfd00_0000).unwrap();
        e.set_bar(1, crate::bar::BarKind::Mem64, true, 64 << 30, 0x80_0000_0000).unwrap();
        let dev =
            Fake { config: e.bytes().to_vec(), sizes: [16 << 20, 64 << 30, 0, 0, 0, 0, 0x8_0000, 256, 0] };
        let f = facts(&dev, Bdf::parse("0000:41:00.0").unwrap()).unwrap();
        assert_eq!(f.size_source, Some(SizeSource::Vfio));
        let sizes: Vec<_> = f.bars.iter().map(|b| (b.index, b.size)).collect();
        assert_eq!(sizes, [(0, Some(16 << 20)), (1, Some(64 << 30))]);
        assert_eq!(f.rom_size, Some(0x8_0000));
        assert_eq!(config(&dev).unwrap().len(), 256, "short reads are continued");
    }

    /// A device that says it read more than it was asked for.
    struct Boastful;

    impl VfioDevice for Boastful {
        fn device_info(&self) -> Result<(u32, u32)> {
            Ok((VFIO_DEVICE_FLAGS_PCI, 9))
        }
        fn region_info(&self, index: u32) -> Result<RegionInfo> {
            Ok(RegionInfo { index, flags: 3, size: u64::MAX, offset: u64::MAX })
        }
        fn read_region(&self, _: &RegionInfo, offset: u64, _: &mut [u8]) -> Result<usize> {
            // A plausible first read, then a count that overflowed the running total.
            Ok(if offset == 0 { 100 } else { usize::MAX })
        }
    }

    #[test]
    fn a_device_that_claims_too_much_gives_at_most_the_config_space() {
        assert_eq!(config(&Boastful).unwrap().len(), PCIE_CONFIG_SIZE);
    }

    #[test]
    fn opening_missing_nodes_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = GroupDevice::open_in(dir.path(), 3, Bdf::default()).unwrap_err();
        assert!(matches!(err, VfioError::Open { .. }), "{err}");
        let err = CdevDevice::open(&dir.path().join("vfio0"), &dir.path().join("iommu")).unwrap_err();
        assert!(matches!(err, VfioError::Open { .. }), "{err}");
    }

    #[test]
    fn ioctl_on_a_plain_file_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["vfio", "3", "vfio0", "iommu"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let err = GroupDevice::open_in(dir.path(), 3, Bdf::default()).unwrap_err();
        assert!(matches!(err, VfioError::Ioctl { what: "VFIO_GET_API_VERSION", .. }), "{err}");
        let err = CdevDevice::open(&dir.path().join("vfio0"), &dir.path().join("iommu")).unwrap_err();
        assert!(matches!(err, VfioError::Ioctl { what: "VFIO_DEVICE_BIND_IOMMUFD", .. }), "{err}");
    }
}

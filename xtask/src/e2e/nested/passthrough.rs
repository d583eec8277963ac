//! In the outer guest: bind the passed-through functions to `vfio-pci`, pick the VFIO
//! interface the kernel offers, and read every function twice — through sysfs and through
//! VFIO (region info and the config region) — to check that both tell the same story.

use std::collections::BTreeSet;
use std::time::Duration;

use pcilibs::bdf::Bdf;
use pcilibs::decode::Function;
use pcilibs::facts::FunctionFacts;
use pcilibs::sysfs::Sysfs;
use pcilibs::vfio::{CdevDevice, GroupDevice, VfioDevice};

use super::wire::PassDevice;

type Result<T> = std::result::Result<T, String>;

/// How a VFIO device is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// iommufd: the device's character device bound to `/dev/iommu` (Linux 6.6+).
    Iommufd,
    /// The legacy container: `/dev/vfio/vfio` plus the group's `/dev/vfio/<group>`.
    Container,
}

impl Backend {
    /// Name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Iommufd => "iommufd",
            Backend::Container => "container",
        }
    }
}

/// What the kernel offers, found at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelVfio {
    /// `/dev/iommu` exists.
    pub iommu_dev: bool,
    /// Every function has a `vfio-dev/vfioN` character device.
    pub cdevs: bool,
}

impl KernelVfio {
    /// The interface to use: iommufd when the kernel has both pieces, else the container.
    pub fn backend(&self) -> Backend {
        if self.iommu_dev && self.cdevs {
            Backend::Iommufd
        } else {
            Backend::Container
        }
    }

    /// Why, in words.
    pub fn reason(&self) -> String {
        format!(
            "/dev/iommu {}, vfio-dev character devices {}",
            if self.iommu_dev { "present" } else { "absent" },
            if self.cdevs { "present" } else { "absent (no /dev/vfio/devices/vfioN)" }
        )
    }
}

/// One passed-through function, read both ways.
#[derive(Clone, Debug)]
pub struct HostFunction {
    /// Id of the inner device it belongs to.
    pub device: String,
    /// Address in the outer guest.
    pub bdf: Bdf,
    /// IOMMU group.
    pub group: u32,
    /// Facts from sysfs (`config`, `resource`, links).
    pub sysfs: FunctionFacts,
    /// Facts from VFIO (region info sizes, config region), with the group filled in.
    pub vfio: FunctionFacts,
    /// Capabilities in sysfs's configuration space.
    pub sysfs_caps: Caps,
    /// Capabilities in VFIO's config region.
    pub vfio_caps: Caps,
}

/// Standard and extended capabilities of a configuration space.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// `(id, offset)` of each standard capability.
    pub standard: BTreeSet<(u8, u8)>,
    /// `(id, version, offset)` of each extended capability.
    pub extended: BTreeSet<(u16, u8, u16)>,
}

impl Caps {
    /// Decodes the capability lists of `config`.
    pub fn of(config: &[u8]) -> Result<Caps> {
        let f = Function::decode(config).map_err(|e| format!("configuration space: {e}"))?;
        Ok(Caps {
            standard: f.capabilities.iter().map(|c| (c.id, c.offset)).collect(),
            extended: f.extended_capabilities.iter().map(|c| (c.id, c.version, c.offset)).collect(),
        })
    }

    /// Names, e.g. `PM@40 MSI-X@50 | AER@100`.
    pub fn describe(&self) -> String {
        let std: Vec<String> =
            self.standard.iter().map(|(id, off)| format!("{}@{off:x}", pcilibs::caps::name(*id))).collect();
        let ext: Vec<String> = self
            .extended
            .iter()
            .map(|(id, v, off)| format!("{}v{v}@{off:x}", pcilibs::ecaps::name(*id)))
            .collect();
        match (std.is_empty(), ext.is_empty()) {
            (true, true) => "none".into(),
            (_, true) => std.join(" "),
            _ => format!("{} | {}", std.join(" "), ext.join(" ")),
        }
    }
}

/// The functions below the outer root port in `slot` of bus 0, sorted: as many as the
/// device has, or only the physical function when its VFs are what is passed through.
pub fn functions_of(device: &PassDevice) -> Result<Vec<Bdf>> {
    let expected = if device.vfs() > 0 { 1 } else { usize::from(device.functions) };
    let port = Bdf::new(0, 0, device.port_slot, 0).map_err(|e| format!("{}: port slot: {e}", device.id))?;
    let out = Sysfs::default().device(port).downstream_functions().map_err(|e| format!("{port}: {e}"))?;
    if out.len() != expected {
        return Err(format!(
            "{}: expected {expected} function(s) below {port}, found {:?}",
            device.id,
            out.iter().map(ToString::to_string).collect::<Vec<_>>()
        ));
    }
    Ok(out)
}

/// Binds `bdf` to `vfio-pci` and waits (up to `wait`) for its group's `/dev/vfio/<group>`.
/// Returns the group.
pub fn bind_vfio(bdf: Bdf, wait: Duration) -> Result<u32> {
    Sysfs::default().bind_vfio(bdf, wait).map_err(|e| e.to_string())
}

/// Creates `count` SR-IOV VFs of `pf` through its host driver (which must implement
/// `sriov_configure`, as `nvme` does) and returns them. The VFs are not probed by any
/// driver (`sriov_drivers_autoprobe` off), so they can go to `vfio-pci` directly. With
/// the PF on its host driver the VFs need no VF token, which QEMU 7.2 cannot pass.
pub fn create_vfs(pf: Bdf, driver: &str, count: u8, wait: Duration) -> Result<Vec<Bdf>> {
    Sysfs::default().create_vfs(pf, driver, u16::from(count), wait).map_err(|e| e.to_string())
}

/// What the kernel offers for the given functions: `/dev/iommu`, and a
/// `/dev/vfio/devices/vfioN` for every function (Linux 6.1 lists `vfio-dev/vfioN` in sysfs
/// but makes the node only from 6.6 on).
pub fn kernel_vfio(functions: &[Bdf]) -> KernelVfio {
    let sys = Sysfs::default();
    KernelVfio {
        iommu_dev: sys.iommufd_node().is_some(),
        cdevs: !functions.is_empty() && functions.iter().all(|b| matches!(sys.vfio_cdev(*b), Ok(Some(_)))),
    }
}

/// Facts and config bytes of one function through VFIO. The device is closed again on
/// return, so the next open of its group (another function, or QEMU) succeeds.
fn read_vfio(backend: &Backend, group: u32, bdf: Bdf) -> Result<(FunctionFacts, Vec<u8>)> {
    fn read(dev: &impl VfioDevice, bdf: Bdf) -> Result<(FunctionFacts, Vec<u8>)> {
        let facts = pcilibs::vfio::facts(dev, bdf).map_err(|e| format!("{bdf}: VFIO facts: {e}"))?;
        let config = pcilibs::vfio::config(dev).map_err(|e| format!("{bdf}: VFIO config region: {e}"))?;
        Ok((facts, config))
    }
    match backend {
        Backend::Container => {
            let dev = GroupDevice::open(group, bdf).map_err(|e| format!("{bdf}: VFIO group {group}: {e}"))?;
            read(&dev, bdf)
        }
        Backend::Iommufd => {
            let sys = Sysfs::default();
            let cdev = sys.vfio_cdev(bdf).map_err(|e| format!("{bdf}: {e}"))?;
            let cdev = cdev.ok_or_else(|| format!("{bdf}: no vfio-dev character device"))?;
            let iommu = sys.iommufd_node().ok_or_else(|| format!("{bdf}: no /dev/iommu"))?;
            let dev = CdevDevice::open(&cdev, &iommu)
                .map_err(|e| format!("{bdf}: VFIO cdev {}: {e}", cdev.display()))?;
            read(&dev, bdf)
        }
    }
}

/// Reads one bound function through sysfs and VFIO; it becomes a function of inner device
/// `device` (numbered by the planner).
pub fn read_function(device: &str, bdf: Bdf, group: u32, backend: &Backend) -> Result<HostFunction> {
    let sysfs = Sysfs::default();
    let sysfs_facts = sysfs.facts(bdf).map_err(|e| format!("{bdf}: sysfs: {e}"))?;
    // A VF's own registers read 0xffff as its IDs; completed, they decode as VFIO shows them.
    let sysfs_config =
        sysfs.device(bdf).completed_config().map_err(|e| format!("{bdf}: sysfs config: {e}"))?;
    let (mut vfio_facts, vfio_config) = read_vfio(backend, group, bdf)?;
    vfio_facts.iommu_group = Some(group);
    Ok(HostFunction {
        device: device.to_string(),
        bdf,
        group,
        sysfs_caps: Caps::of(&sysfs_config)?,
        vfio_caps: Caps::of(&vfio_config)?,
        sysfs: sysfs_facts,
        vfio: vfio_facts,
    })
}

/// A BAR as compared: index, space, prefetchable, size.
type BarKey = (u8, String, bool, Option<u64>);

fn bar_keys(f: &FunctionFacts) -> Vec<BarKey> {
    f.bars.iter().map(|b| (b.index, format!("{:?}", b.kind), b.prefetchable, b.size)).collect()
}

/// `BAR0 256 B mem32, BAR2 128 GiB mem64 pref, ROM 256 KiB`.
pub fn describe_bars(f: &FunctionFacts) -> String {
    let mut parts: Vec<String> = f
        .bars
        .iter()
        .map(|b| {
            let size = b.size.map_or_else(|| "?".into(), pcie_topology::units::human_size);
            let kind = match b.kind {
                pcilibs::bar::BarKind::Io => "io",
                pcilibs::bar::BarKind::Mem32 => "mem32",
                pcilibs::bar::BarKind::Mem64 => "mem64",
                _ => "other",
            };
            format!("BAR{} {size} {kind}{}", b.index, if b.prefetchable { " pref" } else { "" })
        })
        .collect();
    if let Some(rom) = f.rom_size {
        parts.push(format!("ROM {}", pcie_topology::units::human_size(rom)));
    }
    parts.join(", ")
}

/// Where sysfs and VFIO disagree about a function: BARs, ROM, capabilities, SR-IOV.
pub fn differences(f: &HostFunction) -> Vec<String> {
    let mut out = Vec::new();
    let (s, v) = (bar_keys(&f.sysfs), bar_keys(&f.vfio));
    if s != v {
        out.push(format!("BARs: sysfs [{}] vs VFIO [{}]", describe_bars(&f.sysfs), describe_bars(&f.vfio)));
    }
    if f.sysfs.rom_size != f.vfio.rom_size {
        out.push(format!("ROM: sysfs {:?} vs VFIO {:?}", f.sysfs.rom_size, f.vfio.rom_size));
    }
    if (f.sysfs.vendor_id, f.sysfs.device_id, f.sysfs.class_code)
        != (f.vfio.vendor_id, f.vfio.device_id, f.vfio.class_code)
    {
        out.push(format!(
            "ids: sysfs {:04x}:{:04x} class {:06x} vs VFIO {:04x}:{:04x} class {:06x}",
            f.sysfs.vendor_id,
            f.sysfs.device_id,
            f.sysfs.class_code,
            f.vfio.vendor_id,
            f.vfio.device_id,
            f.vfio.class_code
        ));
    }
    let only = |a: &Caps, b: &Caps| Caps {
        standard: a.standard.difference(&b.standard).copied().collect(),
        extended: a.extended.difference(&b.extended).copied().collect(),
    };
    let sysfs_only = only(&f.sysfs_caps, &f.vfio_caps);
    let vfio_only = only(&f.vfio_caps, &f.sysfs_caps);
    if sysfs_only != Caps::default() {
        out.push(format!("capabilities only in sysfs: {}", sysfs_only.describe()));
    }
    if vfio_only != Caps::default() {
        out.push(format!("capabilities only in VFIO: {}", vfio_only.describe()));
    }
    // VFIO has no region for VF BARs: compare what both can know, the VF count and layout.
    let sriov = |facts: &FunctionFacts| {
        facts.sriov.as_ref().map(|s| {
            let bars: Vec<(u8, String, bool)> =
                s.vf_bars.iter().map(|b| (b.index, format!("{:?}", b.kind), b.prefetchable)).collect();
            (s.total_vfs, s.vf_device_id, bars)
        })
    };
    if sriov(&f.sysfs) != sriov(&f.vfio) {
        out.push(format!("SR-IOV: sysfs {:?} vs VFIO {:?}", sriov(&f.sysfs), sriov(&f.vfio)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcilibs::bar::BarKind;
    use pcilibs::emulated::EmulatedConfigSpace;
    use pcilibs::sizing::{BarSizes, SizeSource};

    fn facts(bar2: u64) -> (FunctionFacts, Vec<u8>) {
        let mut e = EmulatedConfigSpace::endpoint(0x1af4, 0x1110, 0x050000, 4096);
        e.set_bar(0, BarKind::Mem32, false, 256, 0xfe80_0000).unwrap();
        e.set_bar(2, BarKind::Mem64, true, bar2, 0x20_0000_0000).unwrap();
        let mut sizes = BarSizes::empty(SizeSource::Vfio);
        sizes.bars[0] = Some(256);
        sizes.bars[2] = Some(bar2);
        let bdf = Bdf::parse("0000:01:00.0").unwrap();
        (FunctionFacts::from_config(bdf, e.bytes(), Some(&sizes)).unwrap(), e.bytes().to_vec())
    }

    fn function(sysfs_bar2: u64, vfio_bar2: u64) -> HostFunction {
        let (s, sc) = facts(sysfs_bar2);
        let (v, vc) = facts(vfio_bar2);
        HostFunction {
            device: "gpu0".into(),
            bdf: s.bdf,
            group: 3,
            sysfs_caps: Caps::of(&sc).unwrap(),
            vfio_caps: Caps::of(&vc).unwrap(),
            sysfs: s,
            vfio: v,
        }
    }

    #[test]
    fn agreeing_sources_have_no_differences() {
        let f = function(128 << 30, 128 << 30);
        assert!(differences(&f).is_empty(), "{:?}", differences(&f));
        assert_eq!(describe_bars(&f.sysfs), "BAR0 256 B mem32, BAR2 128 GiB mem64 pref");
    }

    #[test]
    fn a_size_or_capability_difference_is_named() {
        let mut f = function(128 << 30, 64 << 30);
        f.vfio_caps.standard.insert((0x11, 0x50));
        f.sysfs_caps.extended.insert((0x1, 1, 0x100));
        let d = differences(&f).join("\n");
        assert!(d.contains("BAR2 128 GiB") && d.contains("BAR2 64 GiB"), "{d}");
        assert!(d.contains("only in VFIO: MSI-X@50"), "{d}");
        assert!(d.contains("only in sysfs: ") && d.contains("@100"), "{d}");
    }

    #[test]
    fn iommufd_only_with_both_pieces() {
        let k = KernelVfio { iommu_dev: true, cdevs: false };
        assert_eq!(k.backend(), Backend::Container);
        assert!(k.reason().contains("character devices absent"), "{}", k.reason());
        assert_eq!(KernelVfio { iommu_dev: true, cdevs: true }.backend(), Backend::Iommufd);
    }
}

//! In the outer guest: bind the passed-through functions to `vfio-pci`, pick the VFIO
//! interface the kernel offers, and read every function twice — through sysfs and through
//! VFIO (region info and the config region) — to check that both tell the same story.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// Writes `value` to a sysfs attribute.
fn write_attr(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn driver_of(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("driver")).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn group_of(dev: &Path) -> Result<u32> {
    let link = std::fs::read_link(dev.join("iommu_group"))
        .map_err(|e| format!("{}: no IOMMU group ({e}); is intel_iommu=on in effect?", dev.display()))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{}: unreadable IOMMU group link {}", dev.display(), link.display()))
}

/// The functions below the outer root port in `slot` of bus 0, sorted: as many as the
/// device has, or only the physical function when its VFs are what is passed through.
pub fn functions_of(device: &PassDevice) -> Result<Vec<Bdf>> {
    let expected = if device.vfs() > 0 { 1 } else { usize::from(device.functions) };
    let port = PathBuf::from(format!("/sys/bus/pci/devices/0000:00:{:02x}.0", device.port_slot));
    let entries = std::fs::read_dir(&port).map_err(|e| format!("{}: {e}", port.display()))?;
    let mut out: Vec<Bdf> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| Bdf::parse(n).ok()))
        .collect();
    out.sort();
    if out.len() != expected {
        return Err(format!(
            "{}: expected {expected} function(s) below {}, found {:?}",
            device.id,
            port.display(),
            out.iter().map(ToString::to_string).collect::<Vec<_>>()
        ));
    }
    Ok(out)
}

/// Binds `bdf` to `vfio-pci` through `driver_override` and waits (up to `wait`) for its
/// group's `/dev/vfio/<group>`. Returns the group.
pub fn bind_vfio(bdf: Bdf, wait: Duration) -> Result<u32> {
    let dev = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
    let group = group_of(&dev)?;
    match driver_of(&dev).as_deref() {
        Some("vfio-pci") => {}
        other => {
            if let Some(driver) = other {
                write_attr(&dev.join("driver/unbind"), &bdf.to_string())
                    .map_err(|e| format!("unbinding {bdf} from {driver}: {e}"))?;
            }
            write_attr(&dev.join("driver_override"), "vfio-pci")?;
            write_attr(Path::new("/sys/bus/pci/drivers_probe"), &bdf.to_string())?;
        }
    }
    let node = PathBuf::from(format!("/dev/vfio/{group}"));
    let deadline = Instant::now() + wait;
    loop {
        let bound = driver_of(&dev).as_deref() == Some("vfio-pci");
        if bound && node.exists() {
            return Ok(group);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{bdf}: after {wait:?} driver is {:?} and {} {}",
                driver_of(&dev),
                node.display(),
                if node.exists() { "exists" } else { "is missing" }
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates `count` SR-IOV VFs of `pf` through its host driver (which must implement
/// `sriov_configure`, as `nvme` does) and returns them. The VFs are not probed by any
/// driver (`sriov_drivers_autoprobe` off), so they can go to `vfio-pci` directly. With
/// the PF on its host driver the VFs need no VF token, which QEMU 7.2 cannot pass.
pub fn create_vfs(pf: Bdf, driver: &str, count: u8, wait: Duration) -> Result<Vec<Bdf>> {
    let dev = PathBuf::from(format!("/sys/bus/pci/devices/{pf}"));
    let deadline = Instant::now() + wait;
    while driver_of(&dev).as_deref() != Some(driver) {
        if Instant::now() >= deadline {
            return Err(format!("{pf}: not bound to {driver} after {wait:?} (driver {:?})", driver_of(&dev)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    write_attr(&dev.join("sriov_drivers_autoprobe"), "0")?;
    write_attr(&dev.join("sriov_numvfs"), &count.to_string())?;
    let vfs = Sysfs::default().device(pf).virtual_functions().map_err(|e| format!("{pf}: {e}"))?;
    if vfs.len() != usize::from(count) {
        return Err(format!("{pf}: asked for {count} VFs, sysfs lists {vfs:?}"));
    }
    Ok(vfs)
}

/// What the kernel offers for the given functions.
pub fn kernel_vfio(functions: &[Bdf]) -> KernelVfio {
    KernelVfio {
        iommu_dev: Path::new("/dev/iommu").exists(),
        cdevs: !functions.is_empty() && functions.iter().all(|b| cdev_of(*b).is_some()),
    }
}

/// `/dev/vfio/devices/vfioN` of a function, when the kernel made one. Linux 6.1 already
/// lists `vfio-dev/vfioN` in sysfs but creates the character device only from 6.6 on, so
/// the node itself must exist.
fn cdev_of(bdf: Bdf) -> Option<PathBuf> {
    let dir = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}/vfio-dev"));
    let name = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n.starts_with("vfio").then_some(n)
    })?;
    Some(PathBuf::from("/dev/vfio/devices").join(name)).filter(|p| p.exists())
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
            let cdev = cdev_of(bdf).ok_or_else(|| format!("{bdf}: no vfio-dev character device"))?;
            let dev = CdevDevice::open(&cdev, Path::new("/dev/iommu"))
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
    let mut sysfs_config = sysfs.device(bdf).config().map_err(|e| format!("{bdf}: sysfs config: {e}"))?;
    with_real_ids(&mut sysfs_config, &sysfs_facts);
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

/// An SR-IOV VF's configuration space reads 0xffff as vendor and device ID (the PF's SR-IOV
/// capability holds them); put in the IDs the facts have (sysfs reads them from the kernel's
/// `vendor` and `device` files), as `vfio-pci` does in its config region.
fn with_real_ids(config: &mut [u8], facts: &FunctionFacts) {
    if let Some(ids) = config.get_mut(..4).filter(|ids| *ids == [0xff; 4]) {
        let (v, d) = (facts.vendor_id.to_le_bytes(), facts.device_id.to_le_bytes());
        ids.copy_from_slice(&[v[0], v[1], d[0], d[1]]);
    }
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
    fn a_vf_config_space_gets_its_ids() {
        let (facts, mut config) = facts(1 << 20);
        config[..4].copy_from_slice(&[0xff; 4]);
        assert!(Caps::of(&config).is_err(), "0xffff reads as no function");
        with_real_ids(&mut config, &facts);
        assert_eq!(&config[..4], &[0xf4, 0x1a, 0x10, 0x11]);
        assert!(Caps::of(&config).is_ok());
    }

    #[test]
    fn iommufd_only_with_both_pieces() {
        let k = KernelVfio { iommu_dev: true, cdevs: false };
        assert_eq!(k.backend(), Backend::Container);
        assert!(k.reason().contains("character devices absent"), "{}", k.reason());
        assert_eq!(KernelVfio { iommu_dev: true, cdevs: true }.backend(), Backend::Iommufd);
    }
}

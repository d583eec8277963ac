//! The host layer: PCI functions from a sysfs tree (`/sys` on a host, any directory in
//! tests) and what a VMM needs to hand them to a guest with VFIO.
//!
//! - Enumeration and facts: [`Sysfs::functions`], [`Sysfs::facts`], [`SysfsDevice`].
//! - IOMMU groups and whether VFIO can take them: [`Sysfs::iommu_group`],
//!   [`Sysfs::viable_group`], and the checks a runtime makes before it hot-plugs a
//!   function ([`Sysfs::check_vfio_function`]) or a device named by its sysfs path
//!   ([`Sysfs::check_vfio_device`], QEMU's `sysfsdev=`).
//! - Binding to `vfio-pci` and creating SR-IOV VFs, each with one deadline
//!   ([`Sysfs::bind_vfio`], [`Sysfs::create_vfs`]).
//! - VFIO device nodes: `/dev/vfio/<group>` to its functions ([`Sysfs::group_of_node`]),
//!   a function to its iommufd character device and back ([`Sysfs::vfio_cdev`],
//!   [`Sysfs::function_of_cdev`]), `/dev/iommu` ([`Sysfs::iommufd_node`]).
//!
//! [`Sysfs`] is rooted at a sysfs mount point; functions live in `bus/pci/devices/<bdf>`.
//! Device nodes are looked up below `/dev`, or another directory ([`Sysfs::with_dev`]).
//! Every name taken from the tree (directory entries, link targets) must parse as a strict
//! [`Bdf`] (or a decimal number for IOMMU groups) before it is used in a path, so nothing
//! read from the tree can make this module open a file outside it.
//!
//! A [`SysfsDevice`] can also be opened on any directory laid out like a sysfs function
//! (`config`, optional `resource`, `sriov_totalvfs`, `driver`, `iommu_group`, …); fixtures
//! saved from guests use that.
//!
//! Nothing read from the tree can hang this module or make it use unbounded memory: every
//! file must be a regular file (a FIFO, a device, a socket is [`SysfsError::NotRegularFile`],
//! refused before it is read), every read stops one byte past a limit
//! ([`SysfsError::TooLarge`]: [`CONFIG_LIMIT`] for `config`, [`ATTRIBUTE_LIMIT`] for text
//! attributes), and a directory listing stops past [`ENTRY_LIMIT`] entries. Nothing is
//! skipped without a word either: a `bus/pci/devices` or `iommu_group/devices` entry whose
//! name is not a PCI address is [`SysfsError::Bdf`], not left out of the list.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bar::{Bar, BarKind};
use crate::bdf::{Bdf, BdfError};
use crate::decode::Function;
use crate::facts::{FactsError, FunctionFacts, SriovFacts};
use crate::sizing::{BarSizes, ResourceFile, SizingError};

/// Errors reading sysfs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SysfsError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A name that should be a PCI address is not one.
    #[error("{path}: {source}")]
    Bdf {
        /// Where the name came from.
        path: PathBuf,
        /// Why it is rejected.
        source: BdfError,
    },
    /// A file's content does not parse.
    #[error("{path}: unexpected content {text:?}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// Its content (cut to 64 characters).
        text: String,
    },
    /// The `resource` file does not parse.
    #[error("{path}: {source}")]
    Sizing {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SizingError,
    },
    /// The configuration space does not decode.
    #[error(transparent)]
    Facts(#[from] FactsError),
    /// A file that must be a regular file is something else; it was not read.
    #[error("{path} is {kind}, not a regular file; not reading it")]
    NotRegularFile {
        /// The file.
        path: PathBuf,
        /// What it is (`a FIFO`, `a character device`, …).
        kind: &'static str,
    },
    /// A file is longer than any the kernel writes under its name.
    #[error("{path} is longer than {limit} bytes, which no sysfs file of that name is")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The most bytes read from it.
        limit: usize,
    },
    /// A directory has more entries than any sysfs directory this module lists.
    #[error("{path} has more than {limit} entries")]
    TooManyEntries {
        /// The directory.
        path: PathBuf,
        /// The most entries read.
        limit: usize,
    },
    /// The device is not in the tree.
    #[error("{path} does not exist: no such device on this host")]
    NoDevice {
        /// Where it would be.
        path: PathBuf,
    },
    /// The device has no IOMMU group: the host has no IOMMU, or it is off.
    #[error("{path} has no iommu_group: is the IOMMU on (intel_iommu=on or amd_iommu=on on the kernel command line)?")]
    NoIommuGroup {
        /// The device's directory.
        path: PathBuf,
    },
    /// A member of an IOMMU group is on a driver that keeps VFIO from taking the group.
    #[error(
        "IOMMU group {group} is not viable: {member} is bound to {driver}; bind it to vfio-pci or unbind it"
    )]
    GroupNotViable {
        /// The group.
        group: u32,
        /// The member.
        member: MemberName,
        /// Its driver.
        driver: String,
    },
    /// The kernel refused a value written to an attribute (or the attribute is missing).
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        /// The attribute.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error the write returned.
        source: std::io::Error,
    },
    /// The kernel did not show the result of a change before the deadline.
    #[error("{bdf}: {waiting_for} not done after {waited:?} ({state})")]
    Timeout {
        /// The function.
        bdf: Bdf,
        /// What was waited for.
        waiting_for: &'static str,
        /// How long.
        waited: Duration,
        /// What was seen last.
        state: String,
    },
    /// A path handed in is not one of the kind asked for (a sysfs path outside `/sys`, a
    /// VFIO node outside `/dev/vfio`).
    #[error("{path} is not {expected}")]
    NotInTree {
        /// The path.
        path: PathBuf,
        /// What it should have been.
        expected: &'static str,
    },
}

/// Kernel resource flag of a `resource` line: I/O space.
const IORESOURCE_IO: u64 = 0x100;
/// Kernel resource flag: prefetchable.
const IORESOURCE_PREFETCH: u64 = 0x2000;
/// Kernel resource flag: 64-bit memory.
const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// Most bytes of a `config` file: the 4096 bytes of PCI Express configuration space.
pub const CONFIG_LIMIT: usize = 4096;
/// Most bytes of a sysfs text attribute: one page (the kernel's `sysfs_emit` limit with
/// 4 KiB pages; the attributes read here are far shorter, a `resource` file about 1 KiB).
pub const ATTRIBUTE_LIMIT: usize = 4096;
/// Most entries of a listed directory (`bus/pci/devices`, a function's directory): 2^20,
/// more than the PCI functions of sixteen fully populated segments.
pub const ENTRY_LIMIT: usize = 1 << 20;

mod bind;
mod cdev;
mod files;
mod groups;

pub use files::read_regular_prefix;
pub use groups::{GroupMember, IommuGroup, MemberName};

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, SysfsError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SysfsError + '_ {
    move |source| SysfsError::Io { path: path.to_path_buf(), source }
}

/// A host's PCI functions as sysfs shows them, and the device nodes VFIO makes for them.
///
/// [`Sysfs::default`] is the host's own (`/sys` and `/dev`); tests and tools that read a
/// captured tree root it elsewhere ([`Sysfs::new`], [`Sysfs::with_dev`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
    dev: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/sys")
    }
}

impl Sysfs {
    /// A tree rooted at `root` (the directory that holds `bus/pci/devices`), with device
    /// nodes in `/dev`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into(), dev: PathBuf::from("/dev") }
    }

    /// The same tree with device nodes (`vfio/<group>`, `vfio/devices/vfio<N>`, `iommu`)
    /// in `dev` instead of `/dev`.
    pub fn with_dev(self, dev: impl Into<PathBuf>) -> Self {
        Sysfs { dev: dev.into(), ..self }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of device nodes.
    pub fn dev(&self) -> &Path {
        &self.dev
    }

    /// `bus/pci/devices` below the root.
    pub fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// Every function, sorted. Names may have domains above `ffff` (`10000:e1:00.0`
    /// behind an Intel VMD controller). An entry whose name is not a PCI address is
    /// [`SysfsError::Bdf`]: sysfs has none, and a list that left one out would hide a
    /// function whose name this crate cannot read.
    pub fn functions(&self) -> Result<Vec<Bdf>> {
        bdf_entries(&self.devices_dir())
    }

    /// One function (whether or not it exists; reads will tell).
    pub fn device(&self, bdf: Bdf) -> SysfsDevice {
        SysfsDevice { bdf, path: self.devices_dir().join(bdf.to_string()) }
    }

    /// Facts of one function.
    pub fn facts(&self, bdf: Bdf) -> Result<FunctionFacts> {
        self.device(bdf).facts()
    }

    /// Everything known about one function, including its neighbours on the host.
    pub fn host_device(&self, bdf: Bdf) -> Result<HostDevice> {
        self.device(bdf).host_device()
    }
}

/// The entry names of `dir` as sorted PCI addresses; a name that is not one is
/// [`SysfsError::Bdf`], more than [`ENTRY_LIMIT`] entries [`SysfsError::TooManyEntries`].
fn bdf_entries(dir: &Path) -> Result<Vec<Bdf>> {
    let mut out = Vec::new();
    for entry in bounded_read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let bdf = Bdf::parse(&text).map_err(|source| SysfsError::Bdf { path: entry.path(), source })?;
        out.push(bdf);
    }
    out.sort();
    Ok(out)
}

/// The entries of `dir`, at most [`ENTRY_LIMIT`] of them (one more is an error).
fn bounded_read_dir(dir: &Path) -> Result<impl Iterator<Item = Result<fs::DirEntry>> + '_> {
    let entries = fs::read_dir(dir).map_err(io(dir))?;
    Ok(entries.enumerate().map(move |(n, entry)| {
        if n >= ENTRY_LIMIT {
            return Err(SysfsError::TooManyEntries { path: dir.to_path_buf(), limit: ENTRY_LIMIT });
        }
        entry.map_err(io(dir))
    }))
}

/// A function's sysfs directory, together with the neighbours sysfs links to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct HostDevice {
    /// The function's own facts.
    pub facts: FunctionFacts,
    /// Bridges above the function, from the one nearest the root complex down to the
    /// function's parent (empty for a function on a root bus).
    pub upstream_bridges: Vec<Bdf>,
    /// Every function of the function's IOMMU group (itself included), sorted.
    pub iommu_group_members: Vec<Bdf>,
    /// The function's SR-IOV virtual functions, in VF order.
    pub virtual_functions: Vec<Bdf>,
    /// The physical function, when this is a VF.
    pub physical_function: Option<Bdf>,
}

/// One function directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsDevice {
    bdf: Bdf,
    path: PathBuf,
}

impl SysfsDevice {
    /// Opens any directory laid out like a sysfs function; its name must be the address.
    pub fn open_dir(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let canonical = fs::canonicalize(&path).map_err(io(&path))?;
        let name = canonical.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let bdf = Bdf::parse(name).map_err(|source| SysfsError::Bdf { path: path.clone(), source })?;
        Ok(SysfsDevice { bdf, path })
    }

    /// Every function directory in `dir`, sorted: its entries named by PCI addresses, as
    /// in `bus/pci/devices` or a folder of captured functions. Other entries (a README
    /// next to captured functions) are not functions and are passed over.
    pub fn all_in(dir: &Path) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for entry in bounded_read_dir(dir)? {
            let entry = entry?;
            if let Ok(bdf) = Bdf::parse(&entry.file_name().to_string_lossy()) {
                out.push(SysfsDevice { bdf, path: entry.path() });
            }
        }
        out.sort_by_key(|d| d.bdf);
        Ok(out)
    }

    /// The function's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Configuration space bytes (the kernel gives 64 bytes to non-root readers), at most
    /// [`CONFIG_LIMIT`].
    pub fn config(&self) -> Result<Vec<u8>> {
        let p = self.path.join("config");
        files::read_optional_bytes(&p, CONFIG_LIMIT)?
            .ok_or_else(|| io(&p)(std::io::Error::new(std::io::ErrorKind::NotFound, "no config file")))
    }

    /// The parsed `resource` file, `None` when the file does not exist.
    pub fn resource(&self) -> Result<Option<ResourceFile>> {
        let p = self.path.join("resource");
        let Some(text) = read_optional(&p)? else { return Ok(None) };
        ResourceFile::parse(&text).map(Some).map_err(|source| SysfsError::Sizing { path: p, source })
    }

    /// BAR sizes from the `resource` file (`total_vfs` splits the SR-IOV apertures).
    pub fn sizes(&self, total_vfs: Option<u16>) -> Result<Option<BarSizes>> {
        let Some(file) = self.resource()? else { return Ok(None) };
        BarSizes::from_resource_file(&file, total_vfs)
            .map(Some)
            .map_err(|source| SysfsError::Sizing { path: self.path.join("resource"), source })
    }

    /// Name of the bound driver.
    pub fn driver(&self) -> Result<Option<String>> {
        link_name(&self.path.join("driver"))
    }

    /// IOMMU group number.
    pub fn iommu_group(&self) -> Result<Option<u32>> {
        let p = self.path.join("iommu_group");
        let Some(name) = link_name(&p)? else { return Ok(None) };
        parse_decimal(&name).map(Some).ok_or(SysfsError::BadValue { path: p, text: name })
    }

    /// Every function in the IOMMU group (sorted; empty without a group).
    pub fn iommu_group_members(&self) -> Result<Vec<Bdf>> {
        let dir = self.path.join("iommu_group/devices");
        if !self.path.join("iommu_group").exists() {
            return Ok(Vec::new());
        }
        bdf_entries(&dir)
    }

    /// NUMA node (`None` for -1, "no node", or when the file is absent).
    pub fn numa_node(&self) -> Result<Option<u32>> {
        let p = self.path.join("numa_node");
        let Some(text) = read_optional(&p)? else { return Ok(None) };
        let t = text.trim();
        if t == "-1" {
            return Ok(None);
        }
        parse_decimal(t).map(Some).ok_or(SysfsError::BadValue { path: p, text: cut(t) })
    }

    /// `sriov_totalvfs`, when present.
    pub fn sriov_totalvfs(&self) -> Result<Option<u16>> {
        self.small_number("sriov_totalvfs")
    }

    /// `sriov_numvfs`, when present.
    pub fn sriov_numvfs(&self) -> Result<Option<u16>> {
        self.small_number("sriov_numvfs")
    }

    fn small_number(&self, name: &str) -> Result<Option<u16>> {
        let p = self.path.join(name);
        let Some(text) = read_optional(&p)? else { return Ok(None) };
        let t = text.trim();
        parse_decimal(t)
            .and_then(|v| u16::try_from(v).ok())
            .map(Some)
            .ok_or(SysfsError::BadValue { path: p, text: cut(t) })
    }

    /// A `0x1234` id file (`vendor`, `device`), `None` when absent.
    fn id_file(&self, name: &str) -> Result<Option<u16>> {
        let p = self.path.join(name);
        let Some(text) = read_optional(&p)? else { return Ok(None) };
        let t = text.trim();
        Some(t.strip_prefix("0x").unwrap_or(t))
            .filter(|h| h.len() == 4 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u16::from_str_radix(h, 16).ok())
            .map(Some)
            .ok_or(SysfsError::BadValue { path: p, text: cut(t) })
    }

    /// The VFs (`virtfnN` links), in VF order.
    pub fn virtual_functions(&self) -> Result<Vec<Bdf>> {
        let mut found: Vec<(u32, Bdf)> = Vec::new();
        for entry in bounded_read_dir(&self.path)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(n) = name.to_str().and_then(|n| n.strip_prefix("virtfn")).and_then(parse_decimal) else {
                continue;
            };
            let link = entry.path();
            let target = link_name(&link)?.unwrap_or_default();
            let bdf = Bdf::parse(&target).map_err(|source| SysfsError::Bdf { path: link, source })?;
            found.push((n, bdf));
        }
        found.sort();
        Ok(found.into_iter().map(|(_, b)| b).collect())
    }

    /// The PF (`physfn` link) of a VF.
    pub fn physical_function(&self) -> Result<Option<Bdf>> {
        let p = self.path.join("physfn");
        let Some(name) = link_name(&p)? else { return Ok(None) };
        Bdf::parse(&name).map(Some).map_err(|source| SysfsError::Bdf { path: p, source })
    }

    /// The functions directly below this bridge (on its secondary bus), sorted: the
    /// entries of its directory named by PCI addresses, as the kernel nests them.
    pub fn downstream_functions(&self) -> Result<Vec<Bdf>> {
        let mut out = Vec::new();
        for entry in bounded_read_dir(&self.path)? {
            if let Ok(bdf) = Bdf::parse(&entry?.file_name().to_string_lossy()) {
                out.push(bdf);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Bridges above the function, root first (from the resolved directory path:
    /// `/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0` gives `[0000:00:01.0]`).
    pub fn upstream_bridges(&self) -> Result<Vec<Bdf>> {
        let canonical = fs::canonicalize(&self.path).map_err(io(&self.path))?;
        let mut chain: Vec<Bdf> = canonical
            .ancestors()
            .skip(1)
            .map_while(|a| a.file_name().and_then(|n| n.to_str()).and_then(|n| Bdf::parse(n).ok()))
            .collect();
        chain.reverse();
        Ok(chain)
    }

    /// Configuration space ([`SysfsDevice::config`]) with what an SR-IOV VF's registers
    /// leave out filled in from the kernel's other files, as `vfio-pci` presents it in its
    /// config region: the vendor and device ID (a VF reads 0xffff; the `vendor` and
    /// `device` files have them) and the BAR registers (zero in a VF; from the `resource`
    /// file's addresses and flags). Other functions' bytes are returned as read.
    pub fn completed_config(&self) -> Result<Vec<u8>> {
        let mut config = self.config()?;
        if config.get(..4) == Some(&[0xff, 0xff, 0xff, 0xff]) {
            if let (Some(v), Some(d)) = (self.id_file("vendor")?, self.id_file("device")?) {
                if let Some(ids) = config.get_mut(..4) {
                    let (v, d) = (v.to_le_bytes(), d.to_le_bytes());
                    ids.copy_from_slice(&[v[0], v[1], d[0], d[1]]);
                }
            }
        }
        if self.physical_function()?.is_some() {
            if let Some(resource) = self.resource()? {
                vf_bar_registers(&mut config, &resource);
            }
        }
        Ok(config)
    }

    /// Facts from `config`, `resource` and the host links.
    ///
    /// An SR-IOV VF's configuration space reads 0xffff as vendor and device ID; the
    /// kernel's `vendor` and `device` files have the real ones and are used instead. Its BAR
    /// registers read as zero (the PF's SR-IOV capability describes them), which would
    /// decode as 32-bit BARs; they are filled in from the `resource` file's addresses and
    /// flags, as `vfio-pci` does in its config region.
    pub fn facts(&self) -> Result<FunctionFacts> {
        let config = self.completed_config()?;
        let f = Function::decode(&config).map_err(|source| FactsError::Config { bdf: self.bdf, source })?;
        let total_vfs = match f.sriov() {
            Some(s) => Some(s.total_vfs),
            None => self.sriov_totalvfs()?,
        };
        let sizes = self.sizes(total_vfs)?;
        let mut facts = FunctionFacts::from_function(self.bdf, &f, sizes.as_ref());
        if config.len() <= crate::config::HEADER_SIZE {
            facts.problems.push(format!(
                "only {} bytes of configuration space readable (reading all of it needs root); capabilities unknown",
                config.len()
            ));
        }
        if facts.sriov.is_none() {
            facts.sriov = self.sriov_from_files(sizes.as_ref())?;
        }
        facts.driver = self.driver()?;
        facts.iommu_group = self.iommu_group()?;
        facts.numa_node = self.numa_node()?;
        Ok(facts)
    }

    /// SR-IOV facts from the kernel's `sriov_*` files and the SR-IOV lines of `resource`,
    /// for when the capability itself is unreadable (non-root readers get 64 bytes).
    fn sriov_from_files(&self, sizes: Option<&BarSizes>) -> Result<Option<SriovFacts>> {
        let Some(total_vfs) = self.sriov_totalvfs()? else { return Ok(None) };
        let resource = self.resource()?;
        let mut vf_bars = Vec::new();
        if let (Some(iov), Some(per_vf)) =
            (resource.as_ref().and_then(ResourceFile::iov_entries), sizes.and_then(|s| s.vf_bars))
        {
            for ((index, entry), size) in (0u8..).zip(iov).zip(per_vf) {
                if size.is_none() {
                    continue;
                }
                let kind = if entry.flags & IORESOURCE_IO != 0 {
                    BarKind::Io
                } else if entry.flags & IORESOURCE_MEM_64 != 0 {
                    BarKind::Mem64
                } else {
                    BarKind::Mem32
                };
                let prefetchable = entry.flags & IORESOURCE_PREFETCH != 0;
                vf_bars.push(Bar { index, kind, prefetchable, size });
            }
        }
        Ok(Some(SriovFacts {
            total_vfs,
            num_vfs: self.sriov_numvfs()?.unwrap_or(0),
            initial_vfs: total_vfs,
            first_vf_offset: self.small_number("sriov_offset")?.unwrap_or(0),
            vf_stride: self.small_number("sriov_stride")?.unwrap_or(0),
            vf_device_id: self.id_file("sriov_vf_device")?.unwrap_or(0),
            vf_bars,
        }))
    }

    /// Facts plus upstream bridges, IOMMU group members and SR-IOV relations.
    pub fn host_device(&self) -> Result<HostDevice> {
        Ok(HostDevice {
            facts: self.facts()?,
            upstream_bridges: self.upstream_bridges()?,
            iommu_group_members: self.iommu_group_members()?,
            virtual_functions: self.virtual_functions()?,
            physical_function: self.physical_function()?,
        })
    }
}

/// Writes BAR registers for a VF's BARs that read as zero, from the `resource` file: the
/// address with the I/O, 64-bit and prefetchable bits of the entry's flags (the upper half
/// of a 64-bit BAR in the next register). Entries without a size stay zero.
fn vf_bar_registers(config: &mut [u8], resource: &ResourceFile) {
    const FIRST_BAR: usize = 0x10;
    let mut write = |index: usize, value: u32| {
        let at = FIRST_BAR + 4 * index;
        if let Some(reg) = config.get_mut(at..at + 4) {
            if reg.iter().all(|b| *b == 0) {
                reg.copy_from_slice(&value.to_le_bytes());
            }
        }
    };
    let mut index = 0;
    while index < 6 {
        let Some(entry) = resource.entries.get(index).filter(|e| matches!(e.size(index), Ok(Some(_)))) else {
            index += 1;
            continue;
        };
        let low = entry.start as u32;
        if entry.flags & IORESOURCE_IO != 0 {
            write(index, (low & !0x3) | 0x1);
            index += 1;
            continue;
        }
        let prefetchable = if entry.flags & IORESOURCE_PREFETCH != 0 { 0x8 } else { 0 };
        if entry.flags & IORESOURCE_MEM_64 != 0 && index < 5 {
            write(index, (low & !0xf) | 0x4 | prefetchable);
            write(index + 1, (entry.start >> 32) as u32);
            index += 2;
        } else {
            write(index, (low & !0xf) | prefetchable);
            index += 1;
        }
    }
}

/// A text attribute of at most [`ATTRIBUTE_LIMIT`] bytes, `None` when it does not exist.
fn read_optional(p: &Path) -> Result<Option<String>> {
    files::read_optional_text(p, ATTRIBUTE_LIMIT)
}

/// Last component of a symlink's target, `None` when the link does not exist.
fn link_name(p: &Path) -> Result<Option<String>> {
    match fs::read_link(p) {
        Ok(t) => Ok(t.file_name().and_then(|n| n.to_str()).map(str::to_string)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(p)(e)),
    }
}

fn parse_decimal(t: &str) -> Option<u32> {
    if t.is_empty() || t.len() > 9 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

fn cut(t: &str) -> String {
    t.chars().take(64).collect()
}

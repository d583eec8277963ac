//! BAR sizes, from whichever source has them, behind one type: [`BarSizes`].
//!
//! Registers alone do not tell a BAR's size. Three sources do:
//!
//! * the kernel's sysfs `resource` file ([`BarSizes::from_resource_file`], text parsed here,
//!   the file read by [`crate::sysfs`]);
//! * a VFIO device's region info ([`crate::vfio`], Linux with `std`);
//! * a sizing probe over a mutable configuration space ([`probe::probe`]), which a VMM
//!   can run against any [`probe::ConfigAccess`] implementation, for example
//!   [`crate::emulated::EmulatedConfigSpace`].

use serde::{Deserialize, Serialize};

pub mod probe;

/// Where a set of sizes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SizeSource {
    /// The kernel's sysfs `resource` file.
    Sysfs,
    /// VFIO region info.
    Vfio,
    /// Writing all ones to the BAR registers and reading back the mask.
    Probe,
}

/// Errors reading sizes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizingError {
    /// A line of a `resource` file is not three hex numbers.
    #[error("resource file line {line}: expected three hex numbers")]
    ResourceSyntax {
        /// 1-based line number.
        line: usize,
    },
    /// The `resource` file has fewer than the seven lines of BARs and ROM.
    #[error("resource file has {lines} lines, at least 7 expected")]
    ResourceTooShort {
        /// Lines found.
        lines: usize,
    },
    /// A resource's end lies before its start, or its size is not a power of two.
    #[error("resource {index}: {start:#x}..={end:#x} is not a power-of-two sized range")]
    BadRange {
        /// Resource index.
        index: usize,
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
    },
    /// An SR-IOV resource is not a whole multiple of TotalVFs.
    #[error("SR-IOV resource {index} of {size:#x} bytes does not divide into {total_vfs} VFs")]
    VfSplit {
        /// VF BAR index (0..=5).
        index: usize,
        /// Total aperture size.
        size: u64,
        /// TotalVFs.
        total_vfs: u16,
    },
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, SizingError>;

/// Sizes of a function's BARs, ROM and SR-IOV VF BARs.
///
/// `bars[i]` is the size of the BAR starting in slot `i` (`None`: no BAR there, or the
/// upper half of a 64-bit BAR). `vf_bars` holds *per-VF* sizes and is `None` when the
/// source says nothing about VF BARs (VFIO does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarSizes {
    /// Where the sizes came from.
    pub source: SizeSource,
    /// BAR sizes by slot.
    pub bars: [Option<u64>; 6],
    /// Expansion ROM size.
    pub rom: Option<u64>,
    /// Per-VF sizes of the SR-IOV VF BARs by slot, when the source has them.
    pub vf_bars: Option<[Option<u64>; 6]>,
}

impl BarSizes {
    /// No sizes known yet from `source`.
    pub fn empty(source: SizeSource) -> Self {
        BarSizes { source, bars: [None; 6], rom: None, vf_bars: None }
    }

    /// Sizes from a parsed sysfs `resource` file. `total_vfs` (from the SR-IOV capability)
    /// turns the kernel's whole VF BAR apertures into per-VF sizes.
    pub fn from_resource_file(file: &ResourceFile, total_vfs: Option<u16>) -> Result<Self> {
        let mut s = BarSizes::empty(SizeSource::Sysfs);
        for (slot, entry) in s.bars.iter_mut().zip(file.entries.iter()) {
            *slot = entry.size();
        }
        s.rom = file.entries.get(6).and_then(ResourceEntry::size);
        if let (Some(iov), Some(total)) = (file.iov_entries(), total_vfs) {
            let mut vf = [None; 6];
            for (i, (slot, entry)) in vf.iter_mut().zip(iov.iter()).enumerate() {
                let Some(size) = entry.size() else { continue };
                if total == 0 || size % u64::from(total) != 0 {
                    return Err(SizingError::VfSplit { index: i, size, total_vfs: total });
                }
                *slot = Some(size / u64::from(total));
            }
            s.vf_bars = Some(vf);
        }
        Ok(s)
    }
}

/// Kernel resource flag: I/O space.
pub const IORESOURCE_IO: u64 = 0x100;
/// Kernel resource flag: memory space.
pub const IORESOURCE_MEM: u64 = 0x200;
/// Kernel resource flag: prefetchable.
pub const IORESOURCE_PREFETCH: u64 = 0x2000;
/// Kernel resource flag: 64-bit memory.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// One line of a sysfs `resource` file: `start end flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceEntry {
    /// First address (0 when unassigned).
    pub start: u64,
    /// Last address.
    pub end: u64,
    /// Kernel `IORESOURCE_*` flags.
    pub flags: u64,
}

impl ResourceEntry {
    /// Size of the resource, as the kernel and `lspci` compute it (`None` when empty).
    pub fn size(&self) -> Option<u64> {
        (self.end > self.start).then(|| self.end - self.start + 1)
    }
}

/// A parsed sysfs `resource` file.
///
/// Lines 0..=5 are the BARs, 6 the ROM. What follows depends on the kernel: six SR-IOV
/// lines when it was built with `CONFIG_PCI_IOV`, then four bridge windows for bridges,
/// so 0, 4, 6 or 10 lines follow the ROM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceFile {
    /// The lines in order.
    pub entries: alloc::vec::Vec<ResourceEntry>,
}

impl ResourceFile {
    /// Parses the text of a `resource` file.
    pub fn parse(text: &str) -> Result<Self> {
        let mut entries = alloc::vec::Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut it = line.split_whitespace().map(parse_hex);
            let (Some(Some(start)), Some(Some(end)), Some(Some(flags)), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(SizingError::ResourceSyntax { line: n + 1 });
            };
            entries.push(ResourceEntry { start, end, flags });
            if entries.len() > 64 {
                return Err(SizingError::ResourceSyntax { line: n + 1 });
            }
        }
        if entries.len() < 7 {
            return Err(SizingError::ResourceTooShort { lines: entries.len() });
        }
        Ok(ResourceFile { entries })
    }

    /// The six SR-IOV lines, when the kernel wrote them.
    pub fn iov_entries(&self) -> Option<&[ResourceEntry]> {
        match self.entries.len().checked_sub(7) {
            Some(6 | 10) => self.entries.get(7..13),
            _ => None,
        }
    }

    /// The four bridge window lines, when present.
    pub fn bridge_entries(&self) -> Option<&[ResourceEntry]> {
        match self.entries.len().checked_sub(7) {
            Some(4) => self.entries.get(7..11),
            Some(10) => self.entries.get(13..17),
            _ => None,
        }
    }
}

fn parse_hex(word: &str) -> Option<u64> {
    let digits = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")).unwrap_or(word);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Size of a BAR from the value read back after writing all ones: the lowest set bit of
/// the address bits (`mask` clears the flag bits). `None` when no address bit sticks.
pub fn size_from_mask(readback: u64, mask: u64) -> Option<u64> {
    let v = readback & mask;
    (v != 0).then(|| 1u64 << v.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE0: &str = "0x00000000fe000000 0x00000000fe003fff 0x0000000000040200\n";
    const ZERO: &str = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";

    fn file(lines: &[&str]) -> ResourceFile {
        ResourceFile::parse(&lines.concat()).unwrap()
    }

    #[test]
    fn bars_rom_and_iov() {
        let rom = "0x00000000fe040000 0x00000000fe07ffff 0x0000000000046200\n";
        let iov = "0x0000000800000000 0x0000000800ffffff 0x0000000000140204\n";
        let mut lines = alloc::vec![LINE0, ZERO, ZERO, ZERO, ZERO, ZERO, rom, iov];
        lines.extend([ZERO; 5]);
        let f = file(&lines);
        assert_eq!(f.iov_entries().map(<[_]>::len), Some(6));
        assert_eq!(f.bridge_entries(), None);
        let s = BarSizes::from_resource_file(&f, Some(8)).unwrap();
        assert_eq!(s.bars, [Some(0x4000), None, None, None, None, None]);
        assert_eq!(s.rom, Some(0x40000));
        assert_eq!(s.vf_bars.unwrap()[0], Some(0x20_0000));
        assert!(matches!(
            BarSizes::from_resource_file(&f, Some(3)),
            Err(SizingError::VfSplit { index: 0, total_vfs: 3, .. })
        ));
    }

    #[test]
    fn bridge_lines_and_errors() {
        let f = file(&[ZERO; 11]);
        assert!(f.bridge_entries().is_some());
        assert_eq!(f.iov_entries(), None);
        assert_eq!(ResourceFile::parse(ZERO), Err(SizingError::ResourceTooShort { lines: 1 }));
        assert_eq!(ResourceFile::parse("0x1 0x2\n"), Err(SizingError::ResourceSyntax { line: 1 }));
        assert_eq!(ResourceFile::parse("0x1 0x2 0x3 0x4\n"), Err(SizingError::ResourceSyntax { line: 1 }));
        assert_eq!(ResourceFile::parse("-1 0x2 0x3\n"), Err(SizingError::ResourceSyntax { line: 1 }));
    }

    #[test]
    fn mask_sizes() {
        assert_eq!(size_from_mask(0xffff_f000, 0xffff_fff0), Some(0x1000));
        assert_eq!(size_from_mask(0x0000_ffe1, 0xffff_fffc), Some(0x20));
        assert_eq!(size_from_mask(0xffff_ffe0_0000_000c, !0xf), Some(0x20_0000_0000));
        assert_eq!(size_from_mask(0x0000_000c, !0xf), None);
    }
}

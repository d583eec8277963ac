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
    /// A resource's range is not one the kernel writes: its end lies before its start
    /// (other than the kernel's encoding of an empty, disabled resource), it covers all
    /// 2^64 addresses, or a BAR's or ROM's size is not a power of two.
    #[error("resource {index}: {start:#x}..={end:#x} is not a valid range for it")]
    BadRange {
        /// Resource index (0-based line of the file).
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
#[non_exhaustive]
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
        for (index, slot) in s.bars.iter_mut().enumerate() {
            *slot = file.bar_size(index)?;
        }
        s.rom = file.bar_size(ROM_LINE)?;
        if let (Some(iov), Some(total)) = (file.iov_entries(), total_vfs) {
            let mut vf = [None; 6];
            for (i, (slot, entry)) in vf.iter_mut().zip(iov.iter()).enumerate() {
                let Some(size) = entry.size(FIRST_IOV_LINE + i)? else { continue };
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

/// Kernel resource flag: disabled (Linux 6.15 and later write a disabled bridge window,
/// and a BAR the kernel cannot handle, as the empty range `0..=u64::MAX`).
const IORESOURCE_DISABLED: u64 = 0x1000_0000;
/// Kernel resource flag: no address assigned.
const IORESOURCE_UNSET: u64 = 0x2000_0000;

/// Line of the expansion ROM in a `resource` file.
const ROM_LINE: usize = 6;
/// Line of the first SR-IOV VF BAR in a `resource` file.
const FIRST_IOV_LINE: usize = 7;

/// One line of a sysfs `resource` file: `start end flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResourceEntry {
    /// First address (0 when unassigned).
    pub start: u64,
    /// Last address.
    pub end: u64,
    /// Kernel `IORESOURCE_*` flags (`include/linux/ioport.h`): 0x100 I/O, 0x200 memory,
    /// 0x2000 prefetchable, 0x10_0000 64-bit, 0x1000_0000 disabled, 0x2000_0000 unset.
    pub flags: u64,
}

impl ResourceEntry {
    /// Size of the resource (`None` when empty); `index` is the entry's line in its file
    /// (0-based), for the error.
    ///
    /// The size is `end - start + 1`, computed without wrapping. Empty are the kernel's
    /// unused line (`0 0 0`, or any line whose end equals its start) and the kernel's
    /// encoding of an empty resource, an end one below its start (`0..=u64::MAX` for a
    /// disabled bridge window since Linux 6.15), when the flags say the resource is
    /// disabled or unset (or there are none). That encoding with flags of a live
    /// resource, any other end below the start, and a range of all 2^64 addresses are
    /// [`SizingError::BadRange`]: `lspci` (and the kernel's own `resource_size`) wrap
    /// such a range to size 0, and the resource would silently vanish.
    pub fn size(&self, index: usize) -> Result<Option<u64>> {
        if self.end == self.start {
            return Ok(None);
        }
        if let Some(size) = self.end.checked_sub(self.start).and_then(|d| d.checked_add(1)) {
            return Ok(Some(size));
        }
        let empty_encoding = self.end.wrapping_add(1) == self.start;
        let inactive = self.flags == 0 || self.flags & (IORESOURCE_DISABLED | IORESOURCE_UNSET) != 0;
        if empty_encoding && inactive {
            return Ok(None);
        }
        Err(SizingError::BadRange { index, start: self.start, end: self.end })
    }
}

/// A parsed sysfs `resource` file.
///
/// Lines 0..=5 are the BARs, 6 the ROM. What follows depends on the kernel: six SR-IOV
/// lines when it was built with `CONFIG_PCI_IOV`, then four bridge windows for bridges,
/// so 0, 4, 6 or 10 lines follow the ROM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
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

    /// Size of the BAR (lines 0..=5) or ROM (line 6) at `index`: `None` when the line is
    /// missing or empty, [`SizingError::BadRange`] when it is not a range of a
    /// power-of-two size (see [`ResourceEntry::size`]).
    pub fn bar_size(&self, index: usize) -> Result<Option<u64>> {
        let Some(entry) = self.entries.get(index) else { return Ok(None) };
        let size = entry.size(index)?;
        if size.is_some_and(|s| !s.is_power_of_two()) {
            return Err(SizingError::BadRange { index, start: entry.start, end: entry.end });
        }
        Ok(size)
    }

    /// The six SR-IOV lines, when the kernel wrote them.
    pub fn iov_entries(&self) -> Option<&[ResourceEntry]> {
        match self.entries.len().checked_sub(7) {
            Some(6 | 10) => self.entries.get(FIRST_IOV_LINE..FIRST_IOV_LINE + 6),
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

    /// A line covering all 2^64 addresses with the flags of a live memory BAR: `end -
    /// start + 1` overflowed (a panic in debug builds, size 0 and a vanished BAR in
    /// release builds). It is a typed error now.
    #[test]
    fn a_range_of_all_addresses_is_an_error() {
        let all = "0x0000000000000000 0xffffffffffffffff 0x0000000000040200\n";
        let mut lines = alloc::vec![all];
        lines.extend([ZERO; 6]);
        let f = file(&lines);
        let want = SizingError::BadRange { index: 0, start: 0, end: u64::MAX };
        assert_eq!(f.entries[0].size(0), Err(want.clone()));
        assert_eq!(BarSizes::from_resource_file(&f, None), Err(want));
        // The same as the ROM and as a VF BAR line.
        let mut rom = alloc::vec![ZERO; 6];
        rom.push(all);
        assert!(matches!(
            BarSizes::from_resource_file(&file(&rom), None),
            Err(SizingError::BadRange { index: 6, .. })
        ));
        let mut iov = alloc::vec![ZERO; 7];
        iov.push(all);
        iov.extend([ZERO; 5]);
        assert!(matches!(
            BarSizes::from_resource_file(&file(&iov), Some(4)),
            Err(SizingError::BadRange { index: 7, .. })
        ));
    }

    /// What Linux 6.15 and later write for a disabled bridge window (and a BAR it cannot
    /// handle): the empty range `0..=u64::MAX` flagged disabled and unset. That is an
    /// empty resource, not an error; other ends below the start are errors.
    #[test]
    fn the_kernels_empty_range_is_empty() {
        let disabled = |start: u64| ResourceEntry { start, end: start.wrapping_sub(1), flags: 0x3000_0100 };
        assert_eq!(disabled(0).size(13), Ok(None));
        assert_eq!(disabled(0x1000).size(13), Ok(None));
        let live = ResourceEntry { start: 0x1000, end: 0xfff, flags: 0x40200 };
        assert!(matches!(live.size(0), Err(SizingError::BadRange { index: 0, .. })));
        let backwards = ResourceEntry { start: 0x2000, end: 0xfff, flags: 0x3000_0100 };
        assert!(backwards.size(0).is_err());
        assert_eq!(ResourceEntry { start: 0, end: 0, flags: 0 }.size(0), Ok(None));
        let mut lines = alloc::vec![ZERO; 7];
        lines.extend(["0x0000000000000000 0xffffffffffffffff 0x0000000030000100\n"; 10]);
        let bridge = file(&lines);
        assert_eq!(bridge.bridge_entries().map(<[_]>::len), Some(4));
        assert_eq!(BarSizes::from_resource_file(&bridge, None).unwrap().bars, [None; 6]);
    }

    #[test]
    fn a_bar_of_no_power_of_two_size_is_an_error() {
        let odd = "0x00000000fe000000 0x00000000fe002fff 0x0000000000040200\n";
        let mut lines = alloc::vec![odd];
        lines.extend([ZERO; 6]);
        assert!(matches!(
            BarSizes::from_resource_file(&file(&lines), None),
            Err(SizingError::BadRange { index: 0, start: 0xfe00_0000, end: 0xfe00_2fff })
        ));
    }

    proptest::proptest! {
        /// Any three numbers on any line: a size, nothing, or a typed error; no panic.
        #[test]
        fn any_line_sizes_or_errs(start: u64, end: u64, flags: u64, line in 0usize..17, vfs in 0u16..300) {
            let mut entries = alloc::vec![ResourceEntry { start: 0, end: 0, flags: 0 }; 17];
            entries[line] = ResourceEntry { start, end, flags };
            let f = ResourceFile { entries };
            if let Ok(s) = BarSizes::from_resource_file(&f, Some(vfs)) {
                for size in s.bars.iter().chain([&s.rom]).flatten() {
                    proptest::prop_assert!(size.is_power_of_two());
                }
            }
            if let Ok(Some(size)) = f.entries[line].size(line) {
                proptest::prop_assert_eq!(u128::from(size), u128::from(end) - u128::from(start) + 1);
            }
        }
    }

    #[test]
    fn mask_sizes() {
        assert_eq!(size_from_mask(0xffff_f000, 0xffff_fff0), Some(0x1000));
        assert_eq!(size_from_mask(0x0000_ffe1, 0xffff_fffc), Some(0x20));
        assert_eq!(size_from_mask(0xffff_ffe0_0000_000c, !0xf), Some(0x20_0000_0000));
        assert_eq!(size_from_mask(0x0000_000c, !0xf), None);
    }
}

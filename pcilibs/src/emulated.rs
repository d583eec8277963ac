//! An in-memory configuration space with real write masks.
//!
//! [`EmulatedConfigSpace`] behaves like device hardware towards configuration writes: a
//! write only changes the bits its write mask allows. BAR registers get the mask that
//! makes them decode their size (address bits below the size read as zero, type bits are
//! read-only), so the sizing probe ([`crate::sizing::probe`]) works on it exactly as on a
//! device. VMMs can use it as the backing store of an emulated function; tests use it to
//! check the probe against the kernel's sizes from sysfs.
//!
//! Writable bits: the command register (I/O, memory, bus master, parity, SERR#, INTx
//! disable), BAR and ROM address bits, the ROM enable bit, the SR-IOV control bits (VF
//! enable, migration, VF memory space enable, ARI hierarchy), NumVFs and the VF BAR address
//! bits. Everything else is read-only.

use alloc::vec;
use alloc::vec::Vec;

use crate::bar::BarKind;
use crate::config::{reg, ConfigSpace, HeaderType, PCIE_CONFIG_SIZE, PCI_CONFIG_SIZE};
use crate::decode::Function;
use crate::ecaps::{self, sriov};
use crate::sizing::probe::ConfigAccess;
use crate::sizing::BarSizes;

/// Command register bits a device lets software write.
const COMMAND_WRITABLE: u32 = 0x0547;

/// Errors building an emulated configuration space.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatedError {
    /// A size is zero, not a power of two, or too small or large for its kind.
    #[error("BAR {index}: size {size:#x} is not valid for a {kind:?} BAR")]
    BadSize {
        /// BAR slot.
        index: u8,
        /// Size asked for.
        size: u64,
        /// Kind asked for.
        kind: BarKind,
    },
    /// The slot does not exist, or a 64-bit BAR would not fit.
    #[error("BAR {index} does not exist in this header (or a 64-bit BAR does not fit there)")]
    BadSlot {
        /// BAR slot.
        index: u8,
    },
    /// The header does not decode.
    #[error("header: {0}")]
    Header(#[from] crate::config::ConfigError),
    /// The access is outside the space or not dword aligned.
    #[error("access at {0:#x} is outside the space or not dword aligned")]
    BadOffset(u16),
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, EmulatedError>;

/// Configuration space bytes plus a write mask per byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatedConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
}

impl EmulatedConfigSpace {
    /// Copies `bytes` (padded with zeros to 256 or 4096 bytes) with only the command
    /// register writable; call [`apply_sizes`](Self::apply_sizes) or
    /// [`set_bar`](Self::set_bar) to make BARs sizeable.
    pub fn new(bytes: &[u8]) -> Self {
        let len = if bytes.len() > PCI_CONFIG_SIZE { PCIE_CONFIG_SIZE } else { PCI_CONFIG_SIZE };
        let mut data = vec![0u8; len];
        let n = bytes.len().min(len);
        if let (Some(dst), Some(src)) = (data.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        let mut s = EmulatedConfigSpace { bytes: data, writable: vec![0u8; len] };
        s.set_mask(reg::COMMAND, COMMAND_WRITABLE);
        s
    }

    /// A blank type-0 function of `len` bytes (256 or 4096) with the given ids and class.
    pub fn endpoint(vendor_id: u16, device_id: u16, class_code: u32, len: usize) -> Self {
        let mut s = Self::new(&vec![0u8; len]);
        s.put(reg::VENDOR_ID, u32::from(vendor_id) | (u32::from(device_id) << 16));
        s.put(reg::REVISION_ID, class_code << 8);
        s
    }

    /// Copies `bytes` and makes every BAR, the ROM and the SR-IOV VF BARs that `sizes`
    /// sizes decode that size; BARs without a size become unimplemented (read as zero).
    pub fn with_sizes(bytes: &[u8], sizes: &BarSizes) -> Result<Self> {
        let mut s = Self::new(bytes);
        s.apply_sizes(sizes)?;
        Ok(s)
    }

    /// Applies `sizes` to the BARs as their registers currently describe them.
    pub fn apply_sizes(&mut self, sizes: &BarSizes) -> Result<()> {
        let f = Function::decode(&self.bytes)?;
        let count = f.header.header_type.bar_count();
        for i in 0..count {
            self.clear_bar(reg::BAR0, i);
        }
        for b in &f.bars.bars {
            if let Some(size) = sizes.bars.get(usize::from(b.index)).copied().flatten() {
                self.define_bar(reg::BAR0, count, b.index, b.kind, b.prefetchable, size, b.address)?;
            }
        }
        if let Some(off) = f.header.header_type.rom_register() {
            let addr = f.rom.map_or(0, |r| r.address);
            self.define_rom(off, sizes.rom, addr)?;
        }
        let sriov_at = ecaps::find(ConfigSpace::new(&self.bytes), ecaps::id::SRIOV);
        if let (Some(at), Some(sr), Some(vf)) = (sriov_at, f.sriov(), sizes.vf_bars) {
            let base = usize::from(at) + sriov::reg::VF_BAR0;
            self.set_mask(usize::from(at) + sriov::reg::CONTROL, 0x1f);
            self.set_mask(usize::from(at) + sriov::reg::NUM_VFS, 0xffff);
            for i in 0..6 {
                self.clear_bar(base, i);
            }
            for b in &sr.vf_bars.bars {
                if let Some(size) = vf.get(usize::from(b.index)).copied().flatten() {
                    self.define_bar(base, 6, b.index, b.kind, b.prefetchable, size, b.address)?;
                }
            }
        }
        Ok(())
    }

    /// Defines BAR `index` of the header as `kind`/`prefetchable` of `size` bytes at
    /// `address` (low bits below the size are dropped).
    pub fn set_bar(
        &mut self,
        index: u8,
        kind: BarKind,
        prefetchable: bool,
        size: u64,
        address: u64,
    ) -> Result<()> {
        let ht = HeaderType::from_register(self.bytes.get(reg::HEADER_TYPE).copied().unwrap_or(0));
        self.define_bar(reg::BAR0, ht.bar_count(), index, kind, prefetchable, size, address)
    }

    /// Defines the expansion ROM as `size` bytes (or none) at `address`.
    pub fn set_rom(&mut self, size: Option<u64>, address: u32) -> Result<()> {
        let ht = HeaderType::from_register(self.bytes.get(reg::HEADER_TYPE).copied().unwrap_or(0));
        let off = ht.rom_register().ok_or(EmulatedError::BadSlot { index: 6 })?;
        self.define_rom(off, size, address)
    }

    /// The current bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    #[allow(clippy::too_many_arguments)]
    fn define_bar(
        &mut self,
        base: usize,
        count: u8,
        index: u8,
        kind: BarKind,
        prefetchable: bool,
        size: u64,
        address: u64,
    ) -> Result<()> {
        let bad = || EmulatedError::BadSize { index, size, kind };
        let slots = if kind == BarKind::Mem64 { 2 } else { 1 };
        if index.checked_add(slots).map_or(true, |end| end > count) {
            return Err(EmulatedError::BadSlot { index });
        }
        if !size.is_power_of_two() {
            return Err(bad());
        }
        let off = base + usize::from(index) * 4;
        let keep = !(size - 1);
        match kind {
            BarKind::Io => {
                // The specification caps I/O BARs at 256 bytes, but devices (and QEMU's
                // models) have larger ones; the I/O space itself is 64 KiB.
                if !(4..=1 << 16).contains(&size) {
                    return Err(bad());
                }
                self.put(off, ((address as u32) & keep as u32 & !3) | 1);
                self.set_mask(off, keep as u32 & 0xffff_fffc);
            }
            BarKind::Mem32 => {
                if !(16..=1 << 31).contains(&size) {
                    return Err(bad());
                }
                let flags = if prefetchable { 8 } else { 0 };
                self.put(off, ((address as u32) & keep as u32 & !0xf) | flags);
                self.set_mask(off, keep as u32 & 0xffff_fff0);
            }
            BarKind::Mem64 => {
                if size < 16 {
                    return Err(bad());
                }
                let flags = 4 | if prefetchable { 8 } else { 0 };
                let a = address & keep & !0xf;
                self.put(off, (a as u32) | flags);
                self.put(off + 4, (a >> 32) as u32);
                self.set_mask(off, keep as u32 & 0xffff_fff0);
                self.set_mask(off + 4, (keep >> 32) as u32);
            }
        }
        Ok(())
    }

    fn define_rom(&mut self, off: usize, size: Option<u64>, address: u32) -> Result<()> {
        match size {
            None => {
                self.put(off, 0);
                self.set_mask(off, 0);
            }
            Some(size) => {
                if !size.is_power_of_two() || !(2048..=1 << 31).contains(&size) {
                    return Err(EmulatedError::BadSize { index: 6, size, kind: BarKind::Mem32 });
                }
                let keep = !(size as u32 - 1) & 0xffff_f800;
                self.put(off, address & keep);
                self.set_mask(off, keep | 1);
            }
        }
        Ok(())
    }

    fn clear_bar(&mut self, base: usize, index: u8) {
        let off = base + usize::from(index) * 4;
        self.put(off, 0);
        self.set_mask(off, 0);
    }

    fn put(&mut self, off: usize, value: u32) {
        if let Some(dst) = self.bytes.get_mut(off..off + 4) {
            dst.copy_from_slice(&value.to_le_bytes());
        }
    }

    fn set_mask(&mut self, off: usize, mask: u32) {
        if let Some(dst) = self.writable.get_mut(off..off + 4) {
            dst.copy_from_slice(&mask.to_le_bytes());
        }
    }

    fn range(&self, offset: u16) -> Result<core::ops::Range<usize>> {
        let o = usize::from(offset);
        if o % 4 != 0 || o + 4 > self.bytes.len() {
            return Err(EmulatedError::BadOffset(offset));
        }
        Ok(o..o + 4)
    }
}

impl ConfigAccess for EmulatedConfigSpace {
    type Error = EmulatedError;

    fn config_size(&self) -> usize {
        self.bytes.len()
    }

    fn read_u32(&mut self, offset: u16) -> Result<u32> {
        let r = self.range(offset)?;
        ConfigSpace::new(&self.bytes).u32(r.start).ok_or(EmulatedError::BadOffset(offset))
    }

    fn write_u32(&mut self, offset: u16, value: u32) -> Result<()> {
        let r = self.range(offset)?;
        let (Some(data), Some(mask)) = (self.bytes.get_mut(r.clone()), self.writable.get(r)) else {
            return Err(EmulatedError::BadOffset(offset));
        };
        for ((d, m), v) in data.iter_mut().zip(mask).zip(value.to_le_bytes()) {
            *d = (*d & !m) | (v & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::probe::probe;
    use crate::sizing::SizeSource;

    #[test]
    fn probe_reads_back_what_was_defined() {
        let mut e = EmulatedConfigSpace::endpoint(0x1af4, 0x1041, 0x020000, 256);
        e.set_bar(0, BarKind::Io, false, 32, 0xc040).unwrap();
        e.set_bar(1, BarKind::Mem32, false, 4096, 0xfebf_1000).unwrap();
        e.set_bar(4, BarKind::Mem64, true, 16 << 30, 0x40_0000_0000).unwrap();
        e.set_rom(Some(256 << 10), 0xfeb8_0000).unwrap();
        e.write_u32(4, 3).unwrap();
        let before = e.bytes().to_vec();
        let s = probe(&mut e).unwrap();
        assert_eq!(s.source, SizeSource::Probe);
        assert_eq!(s.bars, [Some(32), Some(4096), None, None, Some(16 << 30), None]);
        assert_eq!(s.rom, Some(256 << 10));
        assert_eq!(s.vf_bars, None);
        assert_eq!(e.bytes(), &before[..], "probe must restore every register");
    }

    #[test]
    fn read_only_bits_stay() {
        let mut e = EmulatedConfigSpace::endpoint(0x8086, 0x10d3, 0x020000, 256);
        e.write_u32(0, 0xffff_ffff).unwrap();
        assert_eq!(e.read_u32(0).unwrap(), 0x10d3_8086);
        assert!(e.write_u32(2, 0).is_err());
        assert!(e.read_u32(256).is_err());
        assert!(e.set_bar(5, BarKind::Mem64, false, 4096, 0).is_err());
        assert!(e.set_bar(0, BarKind::Mem32, false, 3000, 0).is_err());
    }
}

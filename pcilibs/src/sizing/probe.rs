//! The BAR sizing probe: write all ones, read back the mask, restore.
//!
//! This is what firmware and the kernel do at enumeration. The probe
//!
//! 1. reads the whole configuration space and decodes it (header type, BAR kinds, the
//!    SR-IOV capability);
//! 2. clears I/O and memory decoding in the command register (so the device never answers
//!    at the transient all-ones address);
//! 3. for each BAR (both halves of a 64-bit one), writes all ones, reads back and restores
//!    the original value; the size is the lowest address bit that stuck;
//! 4. sizes the expansion ROM the same way (keeping its enable bit clear);
//! 5. for SR-IOV, clears VF memory space enable and sizes the six VF BARs;
//! 6. restores the SR-IOV control and the command register, also when an access failed
//!    half-way (the first error is returned after the restore attempts).
//!
//! Never run it on a device that is in use by a driver: while it runs the device does not
//! decode its BARs.

use alloc::vec::Vec;

use super::{size_from_mask, BarSizes, SizeSource};
use crate::bar::{BarKind, BarRegisters};
use crate::config::{reg, ConfigError, PCI_CONFIG_SIZE};
use crate::decode::Function;
use crate::ecaps::sriov;

/// A configuration space that can be read and written 32 bits at a time.
///
/// Offsets are dword aligned. A write of the dword at 0x04 carries the command register in
/// its low half and zeros in the status half (status bits are read-only or write-one-to-
/// clear, so zeros leave them alone); the probe relies on that for registers shared with
/// status halves (command/status, SR-IOV control/status).
pub trait ConfigAccess {
    /// Error of one access.
    type Error;

    /// Number of bytes of configuration space (256 or 4096).
    fn config_size(&self) -> usize;

    /// Reads the dword at `offset`.
    fn read_u32(&mut self, offset: u16) -> Result<u32, Self::Error>;

    /// Writes the dword at `offset`.
    fn write_u32(&mut self, offset: u16, value: u32) -> Result<(), Self::Error>;
}

/// Errors of the probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError<E> {
    /// A configuration access failed.
    #[error("configuration access at {offset:#x} failed")]
    Access {
        /// Offset accessed.
        offset: u16,
        /// The accessor's error.
        source: E,
    },
    /// The header does not decode.
    #[error("header: {0}")]
    Header(ConfigError),
    /// The accessor reports a configuration space size that is not 256..=4096 bytes.
    #[error("configuration space size {0} is not within 256..=4096")]
    BadConfigSize(usize),
}

struct Probe<'a, C: ConfigAccess> {
    dev: &'a mut C,
}

impl<C: ConfigAccess> Probe<'_, C> {
    fn read(&mut self, offset: usize) -> Result<u32, ProbeError<C::Error>> {
        let offset = offset as u16;
        self.dev.read_u32(offset).map_err(|source| ProbeError::Access { offset, source })
    }

    fn write(&mut self, offset: usize, value: u32) -> Result<(), ProbeError<C::Error>> {
        let offset = offset as u16;
        self.dev.write_u32(offset, value).map_err(|source| ProbeError::Access { offset, source })
    }

    /// Writes `ones`, reads back, restores `orig`; returns the read-back value.
    fn mask(&mut self, offset: usize, orig: u32, ones: u32) -> Result<u32, ProbeError<C::Error>> {
        self.write(offset, ones)?;
        let got = self.read(offset);
        let restored = self.write(offset, orig);
        let got = got?;
        restored?;
        Ok(got)
    }

    fn bars(&mut self, base: usize, regs: &BarRegisters) -> Result<[Option<u64>; 6], ProbeError<C::Error>> {
        let mut out = [None; 6];
        for b in &regs.bars {
            let off = base + usize::from(b.index) * 4;
            let size = match b.kind {
                BarKind::Io => size_from_mask(u64::from(self.mask(off, b.raw, u32::MAX)?), 0xffff_fffc),
                BarKind::Mem64 => {
                    let hi_orig = (b.address >> 32) as u32;
                    let lo = self.mask(off, b.raw, u32::MAX)?;
                    let hi = self.mask(off + 4, hi_orig, u32::MAX)?;
                    size_from_mask((u64::from(hi) << 32) | u64::from(lo), !0xf)
                }
                _ => size_from_mask(u64::from(self.mask(off, b.raw, u32::MAX)?), 0xffff_fff0),
            };
            if let Some(slot) = out.get_mut(usize::from(b.index)) {
                *slot = size;
            }
        }
        Ok(out)
    }
}

/// Sizes every BAR, the ROM and the SR-IOV VF BARs of `dev` (see the module docs).
pub fn probe<C: ConfigAccess>(dev: &mut C) -> Result<BarSizes, ProbeError<C::Error>> {
    let size = dev.config_size();
    if !(PCI_CONFIG_SIZE..=crate::config::PCIE_CONFIG_SIZE).contains(&size) {
        return Err(ProbeError::BadConfigSize(size));
    }
    let mut p = Probe { dev };
    let mut bytes = Vec::with_capacity(size);
    for off in (0..size & !3).step_by(4) {
        bytes.extend_from_slice(&p.read(off)?.to_le_bytes());
    }
    let f = Function::decode(&bytes).map_err(ProbeError::Header)?;
    let cmd = u32::from(f.header.command.bits());
    p.write(reg::COMMAND, cmd & !3)?;
    let sized = size_all(&mut p, &f);
    let restored = p.write(reg::COMMAND, cmd);
    let sizes = sized?;
    restored?;
    Ok(sizes)
}

fn size_all<C: ConfigAccess>(p: &mut Probe<'_, C>, f: &Function) -> Result<BarSizes, ProbeError<C::Error>> {
    let mut sizes = BarSizes::empty(SizeSource::Probe);
    sizes.bars = p.bars(reg::BAR0, &f.bars)?;
    if let (Some(rom), Some(off)) = (f.rom, f.header.header_type.rom_register()) {
        sizes.rom = size_from_mask(u64::from(p.mask(off, rom.raw, 0xffff_f800)?), 0xffff_f800);
    }
    let sriov_at = f.extended_capabilities.iter().find(|c| c.id == crate::ecaps::id::SRIOV);
    if let (Some(cap), Some(sr)) = (sriov_at, f.sriov()) {
        let ctl_off = usize::from(cap.offset) + sriov::reg::CONTROL;
        let ctl = u32::from(sr.control);
        p.write(ctl_off, ctl & !u32::from(sriov::reg::CONTROL_VF_MSE))?;
        let vf = p.bars(usize::from(cap.offset) + sriov::reg::VF_BAR0, &sr.vf_bars);
        let restored = p.write(ctl_off, ctl);
        sizes.vf_bars = Some(vf?);
        restored?;
    }
    Ok(sizes)
}

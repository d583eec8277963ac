//! Single Root I/O Virtualization (extended capability 0x0010).

use serde::{Deserialize, Serialize};

use super::{Regs, Result};
use crate::bar::{decode_block, BarRegisters};
use crate::bdf::Bdf;

/// Register offsets inside the SR-IOV capability.
pub(crate) mod reg {
    /// SR-IOV capabilities (32 bits).
    pub(crate) const CAPABILITIES: usize = 0x04;
    /// SR-IOV control (16 bits).
    pub(crate) const CONTROL: usize = 0x08;
    /// SR-IOV status (16 bits).
    pub(crate) const STATUS: usize = 0x0a;
    /// InitialVFs.
    pub(crate) const INITIAL_VFS: usize = 0x0c;
    /// TotalVFs.
    pub(crate) const TOTAL_VFS: usize = 0x0e;
    /// NumVFs.
    pub(crate) const NUM_VFS: usize = 0x10;
    /// Function dependency link (8 bits).
    pub(crate) const FUNCTION_DEPENDENCY_LINK: usize = 0x12;
    /// First VF offset.
    pub(crate) const FIRST_VF_OFFSET: usize = 0x14;
    /// VF stride.
    pub(crate) const VF_STRIDE: usize = 0x16;
    /// VF device ID.
    pub(crate) const VF_DEVICE_ID: usize = 0x1a;
    /// Supported page sizes.
    pub(crate) const SUPPORTED_PAGE_SIZES: usize = 0x1c;
    /// System page size.
    pub(crate) const SYSTEM_PAGE_SIZE: usize = 0x20;
    /// First VF BAR.
    pub(crate) const VF_BAR0: usize = 0x24;
    /// Control bit: VF enable.
    pub(crate) const CONTROL_VF_ENABLE: u16 = 1 << 0;
    /// Control bit: VF memory space enable.
    pub(crate) const CONTROL_VF_MSE: u16 = 1 << 3;
}

/// Decoded SR-IOV capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Sriov {
    /// SR-IOV capabilities register.
    pub capabilities: u32,
    /// SR-IOV control register.
    pub control: u16,
    /// SR-IOV status register.
    pub status: u16,
    /// InitialVFs.
    pub initial_vfs: u16,
    /// TotalVFs: the most VFs the function can have.
    pub total_vfs: u16,
    /// NumVFs: the VFs currently configured.
    pub num_vfs: u16,
    /// Function dependency link.
    pub function_dependency_link: u8,
    /// Routing-ID offset of the first VF from the PF.
    pub first_vf_offset: u16,
    /// Routing-ID distance between VFs.
    pub vf_stride: u16,
    /// Device ID of the VFs.
    pub vf_device_id: u16,
    /// Supported page sizes (bit n: 4 KiB << n).
    pub supported_page_sizes: u32,
    /// System page size (bit n: 4 KiB << n); VF BARs are aligned to it.
    pub system_page_size: u32,
    /// VF BAR registers (the same layout as a type-0 header's six BARs).
    #[serde(skip)]
    pub vf_bars: BarRegisters,
}

impl Sriov {
    /// Whether VFs are enabled.
    pub fn vfs_enabled(&self) -> bool {
        self.control & reg::CONTROL_VF_ENABLE != 0
    }

    /// Address of VF `n` (0-based) of the PF at `pf`, or `None` when it would leave the
    /// bus range (or `n` is not below TotalVFs).
    pub fn vf_bdf(&self, pf: Bdf, n: u16) -> Option<Bdf> {
        if n >= self.total_vfs {
            return None;
        }
        let pf_rid = (u64::from(pf.bus()) << 8) | u64::from(pf.devfn());
        let rid = pf_rid + u64::from(self.first_vf_offset) + u64::from(n) * u64::from(self.vf_stride);
        let bus = u8::try_from(rid >> 8).ok()?;
        Bdf::new(pf.domain(), bus, ((rid >> 3) & 0x1f) as u8, (rid & 7) as u8).ok()
    }

    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let base = r.offset() + reg::VF_BAR0;
        // All six VF BAR registers must be present before decoding them.
        r.u32(reg::VF_BAR0 + 20)?;
        Ok(Sriov {
            capabilities: r.u32(reg::CAPABILITIES)?,
            control: r.u16(reg::CONTROL)?,
            status: r.u16(reg::STATUS)?,
            initial_vfs: r.u16(reg::INITIAL_VFS)?,
            total_vfs: r.u16(reg::TOTAL_VFS)?,
            num_vfs: r.u16(reg::NUM_VFS)?,
            function_dependency_link: r.u8(reg::FUNCTION_DEPENDENCY_LINK)?,
            first_vf_offset: r.u16(reg::FIRST_VF_OFFSET)?,
            vf_stride: r.u16(reg::VF_STRIDE)?,
            vf_device_id: r.u16(reg::VF_DEVICE_ID)?,
            supported_page_sizes: r.u32(reg::SUPPORTED_PAGE_SIZES)?,
            system_page_size: r.u32(reg::SYSTEM_PAGE_SIZE)?,
            vf_bars: decode_block(r.config(), base, 6),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn sriov(total: u16, offset: u16, stride: u16) -> Sriov {
        Sriov {
            capabilities: 0,
            control: 0,
            status: 0,
            initial_vfs: total,
            total_vfs: total,
            num_vfs: 0,
            function_dependency_link: 0,
            first_vf_offset: offset,
            vf_stride: stride,
            vf_device_id: 0x10ca,
            supported_page_sizes: 0x553,
            system_page_size: 1,
            vf_bars: BarRegisters::default(),
        }
    }

    #[test]
    fn vf_addresses_follow_offset_and_stride() {
        let pf = Bdf::parse("0000:01:00.0").unwrap();
        let s = sriov(8, 384, 2);
        assert_eq!(s.vf_bdf(pf, 0).unwrap().to_string(), "0000:02:10.0");
        assert_eq!(s.vf_bdf(pf, 7).unwrap().to_string(), "0000:02:11.6");
        assert_eq!(s.vf_bdf(pf, 8), None);
        let huge = sriov(u16::MAX, u16::MAX, u16::MAX);
        assert_eq!(huge.vf_bdf(Bdf::new(0, 0xff, 0x1f, 7).unwrap(), u16::MAX - 1), None);
    }
}

//! One call that decodes everything the configuration space bytes say about a function.

use alloc::vec::Vec;

use crate::bar::{decode_header_bars, decode_rom, BarError, BarRegisters, RomRegister};
use crate::caps::{self, Cap, CapError, Capability};
use crate::config::{ConfigError, ConfigSpace, Header};
use crate::ecaps::{self, EcapError, ExtCap, ExtCapability};

/// A problem found while decoding; the rest of the function still decodes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A BAR register does not decode.
    #[error(transparent)]
    Bar(#[from] BarError),
    /// The standard capability list is broken, or one capability is.
    #[error(transparent)]
    Cap(#[from] CapError),
    /// The extended capability list is broken, or one capability is.
    #[error(transparent)]
    Ecap(#[from] EcapError),
}

/// Everything decoded from one function's configuration space bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Function {
    /// Number of bytes decoded from (64, 256, 4096, …).
    pub config_len: usize,
    /// Common header.
    pub header: Header,
    /// BAR registers (addresses and kinds; sizes come from a [`crate::sizing`] source).
    pub bars: BarRegisters,
    /// Expansion ROM register.
    pub rom: Option<RomRegister>,
    /// Standard capabilities in list order.
    pub capabilities: Vec<Cap>,
    /// Extended capabilities in list order.
    pub extended_capabilities: Vec<ExtCap>,
    /// Problems found (broken lists, bad BARs, truncated capabilities).
    pub problems: Vec<DecodeError>,
}

impl Function {
    /// Decodes `bytes` (any length; at least the 64-byte header is needed).
    pub fn decode(bytes: &[u8]) -> Result<Function, ConfigError> {
        let cs = ConfigSpace::new(bytes);
        let header = Header::parse(bytes)?;
        let bars = decode_header_bars(cs, &header);
        let mut problems: Vec<DecodeError> = bars.errors.iter().cloned().map(DecodeError::Bar).collect();
        let walk = caps::walk(cs, &header);
        if let Some(e) = walk.error {
            problems.push(e.into());
        }
        let mut capabilities = Vec::with_capacity(walk.entries.len());
        let mut has_extended_space = false;
        for entry in walk.entries {
            let cap = caps::decode(cs, &header, entry);
            has_extended_space |= matches!(cap.id, caps::id::PCI_EXPRESS | caps::id::PCI_X);
            if let Err(e) = &cap.decoded {
                problems.push(e.clone().into());
            }
            capabilities.push(cap);
        }
        let ewalk = ecaps::walk_if_present(cs, has_extended_space);
        if let Some(e) = ewalk.error {
            problems.push(e.into());
        }
        let mut extended_capabilities = Vec::with_capacity(ewalk.entries.len());
        for entry in ewalk.entries {
            let cap = ecaps::decode(cs, entry);
            if let Err(e) = &cap.decoded {
                problems.push(e.clone().into());
            }
            if let Ok(ExtCapability::Sriov(s)) = &cap.decoded {
                problems.extend(s.vf_bars.errors.iter().cloned().map(DecodeError::Bar));
            }
            extended_capabilities.push(cap);
        }
        Ok(Function {
            config_len: bytes.len(),
            rom: decode_rom(cs, &header),
            header,
            bars,
            capabilities,
            extended_capabilities,
            problems,
        })
    }

    /// The first decoded standard capability matching `f`.
    pub fn find_capability<T>(&self, f: impl Fn(&Capability) -> Option<T>) -> Option<T> {
        self.capabilities.iter().find_map(|c| c.decoded.as_ref().ok().and_then(&f))
    }

    /// The first decoded extended capability matching `f`.
    pub fn find_extended<T>(&self, f: impl Fn(&ExtCapability) -> Option<T>) -> Option<T> {
        self.extended_capabilities.iter().find_map(|c| c.decoded.as_ref().ok().and_then(&f))
    }

    /// The PCI Express capability, if any.
    pub fn pcie(&self) -> Option<&caps::pcie::PciExpress> {
        self.capabilities.iter().find_map(|c| match &c.decoded {
            Ok(Capability::PciExpress(p)) => Some(p),
            _ => None,
        })
    }

    /// Whether the function has a PCI Express capability.
    pub fn is_pcie(&self) -> bool {
        self.capabilities.iter().any(|c| c.id == caps::id::PCI_EXPRESS)
    }

    /// The SR-IOV capability, if any.
    pub fn sriov(&self) -> Option<&ecaps::sriov::Sriov> {
        self.extended_capabilities.iter().find_map(|c| match &c.decoded {
            Ok(ExtCapability::Sriov(s)) => Some(s),
            _ => None,
        })
    }

    /// The Resizable BAR capability, if any.
    pub fn rebar(&self) -> Option<&ecaps::rebar::Rebar> {
        self.extended_capabilities.iter().find_map(|c| match &c.decoded {
            Ok(ExtCapability::Rebar(r)) => Some(r),
            _ => None,
        })
    }

    /// QEMU's resource reservation hints, if this is a QEMU bridge that has them.
    pub fn qemu_resource_reserve(&self) -> Option<caps::vendor::QemuResourceReserve> {
        self.find_capability(|c| match c {
            Capability::Vendor(caps::vendor::VendorSpecific::QemuResourceReserve(r)) => Some(*r),
            _ => None,
        })
    }
}

//! The configuration-space header: ids, class, command/status, header type, bridge fields.
//!
//! [`ConfigSpace`] wraps the bytes of one function's configuration space (64, 256 or
//! 4096 bytes, or any other length: reads past the end yield `None`, never a panic) and
//! [`Header`] is the decoded common header of type 0 (endpoint), 1 (PCI-to-PCI bridge) or
//! 2 (CardBus bridge).

use bitflags::bitflags;
use serde::{Deserialize, Serialize};

/// Size of the common header every function has.
pub const HEADER_SIZE: usize = 64;
/// Size of the conventional PCI configuration space.
pub const PCI_CONFIG_SIZE: usize = 256;
/// Size of the PCI Express (extended) configuration space.
pub const PCIE_CONFIG_SIZE: usize = 4096;

/// Register offsets of the common header.
pub(crate) mod reg {
    /// Vendor ID (16 bits).
    pub(crate) const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub(crate) const DEVICE_ID: usize = 0x02;
    /// Command register (16 bits).
    pub(crate) const COMMAND: usize = 0x04;
    /// Status register (16 bits).
    pub(crate) const STATUS: usize = 0x06;
    /// Revision ID.
    pub(crate) const REVISION_ID: usize = 0x08;
    /// Programming interface byte of the class code.
    pub(crate) const PROG_IF: usize = 0x09;
    /// Sub-class byte of the class code.
    pub(crate) const SUB_CLASS: usize = 0x0a;
    /// Base class byte of the class code.
    pub(crate) const BASE_CLASS: usize = 0x0b;
    /// Cache line size.
    pub(crate) const CACHE_LINE_SIZE: usize = 0x0c;
    /// Latency timer.
    pub(crate) const LATENCY_TIMER: usize = 0x0d;
    /// Header type (bit 7: multi-function).
    pub(crate) const HEADER_TYPE: usize = 0x0e;
    /// Built-in self test.
    pub(crate) const BIST: usize = 0x0f;
    /// First Base Address Register.
    pub(crate) const BAR0: usize = 0x10;
    /// Type 0: subsystem vendor ID.
    pub(crate) const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Type 0: subsystem ID.
    pub(crate) const SUBSYSTEM_ID: usize = 0x2e;
    /// Type 0: expansion ROM base address.
    pub(crate) const ROM_ADDRESS: usize = 0x30;
    /// Types 0 and 1: capabilities pointer.
    pub(crate) const CAPABILITIES_POINTER: usize = 0x34;
    /// Type 2: capabilities pointer.
    pub(crate) const CARDBUS_CAPABILITIES_POINTER: usize = 0x14;
    /// Type 2: subsystem vendor ID.
    pub(crate) const CARDBUS_SUBSYSTEM_VENDOR_ID: usize = 0x40;
    /// Type 2: subsystem ID.
    pub(crate) const CARDBUS_SUBSYSTEM_ID: usize = 0x42;
    /// Interrupt line.
    pub(crate) const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (0: none, 1..=4: INTA..INTD).
    pub(crate) const INTERRUPT_PIN: usize = 0x3d;
    /// Type 1: primary bus number.
    pub(crate) const PRIMARY_BUS: usize = 0x18;
    /// Type 1: secondary bus number.
    pub(crate) const SECONDARY_BUS: usize = 0x19;
    /// Type 1: subordinate bus number.
    pub(crate) const SUBORDINATE_BUS: usize = 0x1a;
    /// Type 1: I/O base (low byte).
    pub(crate) const IO_BASE: usize = 0x1c;
    /// Type 1: I/O limit (low byte).
    pub(crate) const IO_LIMIT: usize = 0x1d;
    /// Type 1: secondary status.
    pub(crate) const SECONDARY_STATUS: usize = 0x1e;
    /// Type 1: memory base.
    pub(crate) const MEMORY_BASE: usize = 0x20;
    /// Type 1: memory limit.
    pub(crate) const MEMORY_LIMIT: usize = 0x22;
    /// Type 1: prefetchable memory base.
    pub(crate) const PREF_MEMORY_BASE: usize = 0x24;
    /// Type 1: prefetchable memory limit.
    pub(crate) const PREF_MEMORY_LIMIT: usize = 0x26;
    /// Type 1: prefetchable base, upper 32 bits.
    pub(crate) const PREF_BASE_UPPER32: usize = 0x28;
    /// Type 1: prefetchable limit, upper 32 bits.
    pub(crate) const PREF_LIMIT_UPPER32: usize = 0x2c;
    /// Type 1: I/O base, upper 16 bits.
    pub(crate) const IO_BASE_UPPER16: usize = 0x30;
    /// Type 1: I/O limit, upper 16 bits.
    pub(crate) const IO_LIMIT_UPPER16: usize = 0x32;
    /// Type 1: expansion ROM base address.
    pub(crate) const BRIDGE_ROM_ADDRESS: usize = 0x38;
    /// Type 1: bridge control.
    pub(crate) const BRIDGE_CONTROL: usize = 0x3e;
}

/// Errors reading the header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Fewer than the 64 bytes of the common header.
    #[error("configuration space is {len} bytes, the header needs 64")]
    TooShort {
        /// Bytes available.
        len: usize,
    },
    /// Vendor ID reads as 0xffff: no function answers at this address.
    #[error("vendor ID is 0xffff: no function present")]
    NoFunction,
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, ConfigError>;

/// Read-only view of one function's configuration space bytes (little endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace<'a> {
    bytes: &'a [u8],
}

impl<'a> ConfigSpace<'a> {
    /// Wraps `bytes`; any length is accepted, reads past the end give `None`.
    pub fn new(bytes: &'a [u8]) -> Self {
        ConfigSpace { bytes }
    }

    /// The wrapped bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of bytes available.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when no byte is available.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether `len` bytes at `offset` are available.
    pub fn has(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.bytes.len())
    }

    /// Byte at `offset`.
    pub fn u8(&self, offset: usize) -> Option<u8> {
        self.bytes.get(offset).copied()
    }

    /// Little-endian 16-bit value at `offset`.
    pub fn u16(&self, offset: usize) -> Option<u16> {
        let b = self.bytes.get(offset..offset.checked_add(2)?)?;
        Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
    }

    /// Little-endian 32-bit value at `offset`.
    pub fn u32(&self, offset: usize) -> Option<u32> {
        let b = self.bytes.get(offset..offset.checked_add(4)?)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Some(u32::from_le_bytes(a))
    }

    /// Little-endian 64-bit value at `offset`.
    pub fn u64(&self, offset: usize) -> Option<u64> {
        let lo = self.u32(offset)?;
        let hi = self.u32(offset.checked_add(4)?)?;
        Some((u64::from(hi) << 32) | u64::from(lo))
    }

    /// Decodes the common header.
    pub fn header(&self) -> Result<Header> {
        Header::parse(self.bytes)
    }
}

/// Layout of the header (register 0x0e, bits 6:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HeaderType {
    /// Type 0: an endpoint (six BARs).
    Normal,
    /// Type 1: a PCI-to-PCI bridge (two BARs, bus numbers, windows).
    Bridge,
    /// Type 2: a CardBus bridge.
    CardBus,
    /// A reserved layout value.
    Other(u8),
}

impl HeaderType {
    /// Decodes bits 6:0 of the header-type register.
    pub fn from_register(value: u8) -> Self {
        match value & 0x7f {
            0 => HeaderType::Normal,
            1 => HeaderType::Bridge,
            2 => HeaderType::CardBus,
            v => HeaderType::Other(v),
        }
    }

    /// The numeric layout value (0, 1, 2, …).
    pub fn value(&self) -> u8 {
        match self {
            HeaderType::Normal => 0,
            HeaderType::Bridge => 1,
            HeaderType::CardBus => 2,
            HeaderType::Other(v) => *v,
        }
    }

    /// How many BAR slots this layout has (6, 2, 1 or 0).
    pub fn bar_count(&self) -> u8 {
        match self {
            HeaderType::Normal => 6,
            HeaderType::Bridge => 2,
            HeaderType::CardBus => 1,
            HeaderType::Other(_) => 0,
        }
    }

    /// Offset of the expansion ROM register, if this layout has one.
    pub fn rom_register(&self) -> Option<usize> {
        match self {
            HeaderType::Normal => Some(reg::ROM_ADDRESS),
            HeaderType::Bridge => Some(reg::BRIDGE_ROM_ADDRESS),
            _ => None,
        }
    }

    /// Offset of the capabilities pointer, if this layout has one.
    pub fn capabilities_pointer_register(&self) -> Option<usize> {
        match self {
            HeaderType::Normal | HeaderType::Bridge => Some(reg::CAPABILITIES_POINTER),
            HeaderType::CardBus => Some(reg::CARDBUS_CAPABILITIES_POINTER),
            HeaderType::Other(_) => None,
        }
    }
}

bitflags! {
    /// The command register (0x04).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct Command: u16 {
        /// Responds to I/O space accesses.
        const IO_SPACE = 1 << 0;
        /// Responds to memory space accesses.
        const MEMORY_SPACE = 1 << 1;
        /// May master the bus (DMA).
        const BUS_MASTER = 1 << 2;
        /// Monitors special cycles.
        const SPECIAL_CYCLES = 1 << 3;
        /// Memory write and invalidate enable.
        const MEMORY_WRITE_INVALIDATE = 1 << 4;
        /// VGA palette snooping.
        const VGA_PALETTE_SNOOP = 1 << 5;
        /// Parity error response.
        const PARITY_ERROR_RESPONSE = 1 << 6;
        /// IDSEL stepping (legacy).
        const STEPPING = 1 << 7;
        /// SERR# enable.
        const SERR = 1 << 8;
        /// Fast back-to-back enable.
        const FAST_BACK_TO_BACK = 1 << 9;
        /// INTx emulation disabled.
        const INTX_DISABLE = 1 << 10;
    }
}

bitflags! {
    /// The status register (0x06).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct Status: u16 {
        /// Immediate readiness.
        const IMMEDIATE_READINESS = 1 << 0;
        /// INTx interrupt pending.
        const INTERRUPT = 1 << 3;
        /// A capability list is present at the capabilities pointer.
        const CAPABILITIES_LIST = 1 << 4;
        /// 66 MHz capable.
        const MHZ_66 = 1 << 5;
        /// Fast back-to-back capable.
        const FAST_BACK_TO_BACK = 1 << 7;
        /// Master data parity error.
        const MASTER_DATA_PARITY_ERROR = 1 << 8;
        /// DEVSEL timing, low bit.
        const DEVSEL_0 = 1 << 9;
        /// DEVSEL timing, high bit.
        const DEVSEL_1 = 1 << 10;
        /// Signaled target abort.
        const SIGNALED_TARGET_ABORT = 1 << 11;
        /// Received target abort.
        const RECEIVED_TARGET_ABORT = 1 << 12;
        /// Received master abort.
        const RECEIVED_MASTER_ABORT = 1 << 13;
        /// Signaled system error.
        const SIGNALED_SYSTEM_ERROR = 1 << 14;
        /// Detected parity error.
        const DETECTED_PARITY_ERROR = 1 << 15;
    }
}

bitflags! {
    /// The bridge control register (type 1, 0x3e).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct BridgeControl: u16 {
        /// Parity error response on the secondary interface.
        const PARITY_ERROR_RESPONSE = 1 << 0;
        /// Forwards SERR# from secondary to primary.
        const SERR = 1 << 1;
        /// ISA enable (blocks ISA aliases of the I/O window).
        const ISA = 1 << 2;
        /// VGA enable (forwards legacy VGA ranges).
        const VGA = 1 << 3;
        /// VGA 16-bit decode.
        const VGA_16BIT = 1 << 4;
        /// Master abort mode.
        const MASTER_ABORT = 1 << 5;
        /// Secondary bus reset.
        const SECONDARY_BUS_RESET = 1 << 6;
        /// Fast back-to-back on the secondary interface.
        const FAST_BACK_TO_BACK = 1 << 7;
        /// Primary discard timeout.
        const PRIMARY_DISCARD_TIMEOUT = 1 << 8;
        /// Secondary discard timeout.
        const SECONDARY_DISCARD_TIMEOUT = 1 << 9;
        /// Discard timer status.
        const DISCARD_TIMER_STATUS = 1 << 10;
        /// Discard timer SERR# enable.
        const DISCARD_TIMER_SERR = 1 << 11;
    }
}

/// The 24-bit class code: base class, sub-class, programming interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClassCode {
    /// Base class (e.g. 0x03 display, 0x06 bridge).
    pub base: u8,
    /// Sub-class.
    pub sub: u8,
    /// Programming interface.
    pub prog_if: u8,
}

impl ClassCode {
    /// Class code of a PCI-to-PCI bridge (base class and sub-class, 16 bits).
    pub const PCI_BRIDGE: u16 = 0x0604;
    /// Class code of a host bridge.
    pub const HOST_BRIDGE: u16 = 0x0600;
    /// Class code of a semi-transparent PCI-to-PCI bridge.
    pub const SEMI_TRANSPARENT_BRIDGE: u16 = 0x0609;
    /// "Other bridge": NVIDIA NVSwitch functions use this class.
    pub const OTHER_BRIDGE: u16 = 0x0680;
    /// 3D controller (many data-centre GPUs).
    pub const DISPLAY_3D: u16 = 0x0302;

    /// From the 24-bit value `0xBBSSPP`.
    pub fn from_u32(value: u32) -> Self {
        ClassCode { base: (value >> 16) as u8, sub: (value >> 8) as u8, prog_if: value as u8 }
    }

    /// The 24-bit value `0xBBSSPP`.
    pub fn as_u32(&self) -> u32 {
        (u32::from(self.base) << 16) | (u32::from(self.sub) << 8) | u32::from(self.prog_if)
    }

    /// Base class and sub-class as `0xBBSS`.
    pub fn class_and_sub(&self) -> u16 {
        (u16::from(self.base) << 8) | u16::from(self.sub)
    }
}

/// An inclusive address range forwarded by a bridge window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AddressRange {
    /// First address.
    pub base: u64,
    /// Last address (inclusive).
    pub limit: u64,
}

impl AddressRange {
    /// Number of bytes in the range (`None` for the full 64-bit space, which cannot be counted).
    pub fn size(&self) -> Option<u64> {
        self.limit.checked_sub(self.base)?.checked_add(1)
    }
}

/// Bus numbers and forwarding windows of a type-1 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BridgeInfo {
    /// Bus number on the upstream side.
    pub primary_bus: u8,
    /// Bus number directly below the bridge.
    pub secondary_bus: u8,
    /// Highest bus number below the bridge.
    pub subordinate_bus: u8,
    /// Whether the I/O window decodes 32-bit addresses.
    pub io_32bit: bool,
    /// I/O window; `None` when disabled (base above limit).
    pub io_window: Option<AddressRange>,
    /// Non-prefetchable memory window; `None` when disabled.
    pub memory_window: Option<AddressRange>,
    /// Whether the prefetchable window decodes 64-bit addresses.
    pub prefetchable_64bit: bool,
    /// Prefetchable memory window; `None` when disabled.
    pub prefetchable_window: Option<AddressRange>,
    /// Secondary status register.
    pub secondary_status: u16,
    /// Bridge control register.
    pub control: BridgeControl,
}

impl BridgeInfo {
    /// Decodes the bridge fields of a type-1 header (needs the 64-byte header).
    pub fn parse(cs: &ConfigSpace<'_>) -> Option<BridgeInfo> {
        let io_base = cs.u8(reg::IO_BASE)?;
        let io_limit = cs.u8(reg::IO_LIMIT)?;
        let io_32bit = io_base & 0x0f == 0x01;
        let (io_hi_base, io_hi_limit) =
            if io_32bit { (cs.u16(reg::IO_BASE_UPPER16)?, cs.u16(reg::IO_LIMIT_UPPER16)?) } else { (0, 0) };
        let io = range(
            (u64::from(io_hi_base) << 16) | (u64::from(io_base & 0xf0) << 8),
            (u64::from(io_hi_limit) << 16) | (u64::from(io_limit & 0xf0) << 8) | 0xfff,
        );
        let mem = range(
            u64::from(cs.u16(reg::MEMORY_BASE)? & 0xfff0) << 16,
            (u64::from(cs.u16(reg::MEMORY_LIMIT)? & 0xfff0) << 16) | 0xf_ffff,
        );
        let pref_base = cs.u16(reg::PREF_MEMORY_BASE)?;
        let pref_limit = cs.u16(reg::PREF_MEMORY_LIMIT)?;
        let prefetchable_64bit = pref_base & 0x0f == 0x01;
        let (pf_hi_base, pf_hi_limit) = if prefetchable_64bit {
            (cs.u32(reg::PREF_BASE_UPPER32)?, cs.u32(reg::PREF_LIMIT_UPPER32)?)
        } else {
            (0, 0)
        };
        let pref = range(
            (u64::from(pf_hi_base) << 32) | (u64::from(pref_base & 0xfff0) << 16),
            (u64::from(pf_hi_limit) << 32) | (u64::from(pref_limit & 0xfff0) << 16) | 0xf_ffff,
        );
        Some(BridgeInfo {
            primary_bus: cs.u8(reg::PRIMARY_BUS)?,
            secondary_bus: cs.u8(reg::SECONDARY_BUS)?,
            subordinate_bus: cs.u8(reg::SUBORDINATE_BUS)?,
            io_32bit,
            io_window: io,
            memory_window: mem,
            prefetchable_64bit,
            prefetchable_window: pref,
            secondary_status: cs.u16(reg::SECONDARY_STATUS)?,
            control: BridgeControl::from_bits_retain(cs.u16(reg::BRIDGE_CONTROL)?),
        })
    }
}

fn range(base: u64, limit: u64) -> Option<AddressRange> {
    (base <= limit).then_some(AddressRange { base, limit })
}

/// The decoded common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Header {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Command register.
    pub command: Command,
    /// Status register.
    pub status: Status,
    /// Revision ID.
    pub revision: u8,
    /// Class code.
    pub class: ClassCode,
    /// Cache line size register.
    pub cache_line_size: u8,
    /// Latency timer.
    pub latency_timer: u8,
    /// Header layout.
    pub header_type: HeaderType,
    /// Header-type bit 7: the device has more functions than function 0.
    pub multifunction: bool,
    /// BIST register.
    pub bist: u8,
    /// Subsystem vendor ID (type 0 and 2 headers; type 1 carries it in a capability).
    pub subsystem_vendor_id: Option<u16>,
    /// Subsystem ID (see `subsystem_vendor_id`).
    pub subsystem_id: Option<u16>,
    /// Raw capabilities pointer (before masking the low bits); `None` when the layout has none.
    pub capabilities_pointer: Option<u8>,
    /// Interrupt line register.
    pub interrupt_line: u8,
    /// Interrupt pin: 0 none, 1..=4 INTA#..INTD#.
    pub interrupt_pin: u8,
    /// Bus numbers and windows (type 1 only).
    pub bridge: Option<BridgeInfo>,
}

impl Header {
    /// Decodes the header from at least 64 bytes.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let cs = ConfigSpace::new(bytes);
        let too_short = || ConfigError::TooShort { len: bytes.len() };
        if bytes.len() < HEADER_SIZE {
            return Err(too_short());
        }
        let vendor_id = cs.u16(reg::VENDOR_ID).ok_or_else(too_short)?;
        if vendor_id == 0xffff {
            return Err(ConfigError::NoFunction);
        }
        let ht = cs.u8(reg::HEADER_TYPE).ok_or_else(too_short)?;
        let header_type = HeaderType::from_register(ht);
        let (subsystem_vendor_id, subsystem_id) = match header_type {
            HeaderType::Normal => (cs.u16(reg::SUBSYSTEM_VENDOR_ID), cs.u16(reg::SUBSYSTEM_ID)),
            HeaderType::CardBus => {
                (cs.u16(reg::CARDBUS_SUBSYSTEM_VENDOR_ID), cs.u16(reg::CARDBUS_SUBSYSTEM_ID))
            }
            _ => (None, None),
        };
        let bridge = if header_type == HeaderType::Bridge { BridgeInfo::parse(&cs) } else { None };
        Ok(Header {
            vendor_id,
            device_id: cs.u16(reg::DEVICE_ID).ok_or_else(too_short)?,
            command: Command::from_bits_retain(cs.u16(reg::COMMAND).ok_or_else(too_short)?),
            status: Status::from_bits_retain(cs.u16(reg::STATUS).ok_or_else(too_short)?),
            revision: cs.u8(reg::REVISION_ID).ok_or_else(too_short)?,
            class: ClassCode {
                base: cs.u8(reg::BASE_CLASS).ok_or_else(too_short)?,
                sub: cs.u8(reg::SUB_CLASS).ok_or_else(too_short)?,
                prog_if: cs.u8(reg::PROG_IF).ok_or_else(too_short)?,
            },
            cache_line_size: cs.u8(reg::CACHE_LINE_SIZE).ok_or_else(too_short)?,
            latency_timer: cs.u8(reg::LATENCY_TIMER).ok_or_else(too_short)?,
            header_type,
            multifunction: ht & 0x80 != 0,
            bist: cs.u8(reg::BIST).ok_or_else(too_short)?,
            subsystem_vendor_id,
            subsystem_id,
            capabilities_pointer: header_type.capabilities_pointer_register().and_then(|r| cs.u8(r)),
            interrupt_line: cs.u8(reg::INTERRUPT_LINE).ok_or_else(too_short)?,
            interrupt_pin: cs.u8(reg::INTERRUPT_PIN).ok_or_else(too_short)?,
            bridge,
        })
    }

    /// Whether the status register announces a capability list.
    pub fn has_capabilities(&self) -> bool {
        self.status.contains(Status::CAPABILITIES_LIST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge_bytes() -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&[0x36, 0x1b, 0x0c, 0x00]);
        b[0x06] = 0x10;
        b[0x0a] = 0x04;
        b[0x0b] = 0x06;
        b[0x0e] = 0x81;
        b[0x18..0x1b].copy_from_slice(&[0, 1, 3]);
        b[0x1c] = 0x11; // 32-bit I/O, base 0x1000
        b[0x1d] = 0x21; // limit 0x2fff
        b[0x20..0x24].copy_from_slice(&[0x00, 0xfe, 0x10, 0xfe]); // fe000000..fe1fffff
        b[0x24..0x28].copy_from_slice(&[0x01, 0x00, 0xf1, 0xff]); // 64-bit pref
        b[0x28..0x2c].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x3e] = 0x18;
        b
    }

    #[test]
    fn decodes_bridge_windows() {
        let h = Header::parse(&bridge_bytes()).unwrap();
        assert_eq!(h.header_type, HeaderType::Bridge);
        assert!(h.multifunction);
        assert_eq!(h.class.class_and_sub(), ClassCode::PCI_BRIDGE);
        let br = h.bridge.unwrap();
        assert_eq!((br.primary_bus, br.secondary_bus, br.subordinate_bus), (0, 1, 3));
        assert_eq!(br.io_window, Some(AddressRange { base: 0x1000, limit: 0x2fff }));
        assert_eq!(br.memory_window.unwrap().size(), Some(2 << 20));
        let pref = br.prefetchable_window.unwrap();
        assert_eq!(pref.base, 0x80_0000_0000);
        assert_eq!(pref.limit, 0x80_ffff_ffff);
        assert!(br.control.contains(BridgeControl::VGA | BridgeControl::VGA_16BIT));
        assert!(h.has_capabilities());
        assert_eq!(h.subsystem_id, None);
    }

    #[test]
    fn empty_windows_are_none_and_short_input_is_an_error() {
        let mut b = bridge_bytes();
        b[0x20..0x24].copy_from_slice(&[0xf0, 0xff, 0x00, 0x00]);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.bridge.unwrap().memory_window, None);
        assert_eq!(Header::parse(&b[..63]), Err(ConfigError::TooShort { len: 63 }));
        assert_eq!(Header::parse(&[0xff; 64]), Err(ConfigError::NoFunction));
    }
}

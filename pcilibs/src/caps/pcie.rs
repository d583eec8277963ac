//! PCI Express capability (ID 0x10): port type, device, link and slot capabilities.

use serde::{Deserialize, Serialize};

use super::{Regs, Result};

/// Device/port type (PCIe capabilities register, bits 7:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PortType {
    /// PCI Express endpoint.
    Endpoint,
    /// Legacy PCI Express endpoint.
    LegacyEndpoint,
    /// Root port of a root complex.
    RootPort,
    /// Upstream port of a switch.
    SwitchUpstream,
    /// Downstream port of a switch.
    SwitchDownstream,
    /// PCI Express to PCI/PCI-X bridge.
    PcieToPciBridge,
    /// PCI/PCI-X to PCI Express bridge.
    PciToPcieBridge,
    /// Root complex integrated endpoint.
    RootComplexIntegratedEndpoint,
    /// Root complex event collector.
    RootComplexEventCollector,
    /// A reserved encoding.
    Other(u8),
}

impl PortType {
    /// Decodes the 4-bit field.
    pub fn from_field(v: u8) -> Self {
        match v & 0xf {
            0x0 => PortType::Endpoint,
            0x1 => PortType::LegacyEndpoint,
            0x4 => PortType::RootPort,
            0x5 => PortType::SwitchUpstream,
            0x6 => PortType::SwitchDownstream,
            0x7 => PortType::PcieToPciBridge,
            0x8 => PortType::PciToPcieBridge,
            0x9 => PortType::RootComplexIntegratedEndpoint,
            0xa => PortType::RootComplexEventCollector,
            v => PortType::Other(v),
        }
    }

    /// Whether a port of this type sits below a link and can have a slot
    /// (root ports and switch downstream ports).
    pub fn is_downstream_port(&self) -> bool {
        matches!(self, PortType::RootPort | PortType::SwitchDownstream)
    }

    /// Whether the link registers are meaningful for this type.
    pub fn has_link(&self) -> bool {
        !matches!(
            self,
            PortType::RootComplexIntegratedEndpoint
                | PortType::RootComplexEventCollector
                | PortType::Other(_)
        )
    }

    /// A short human description, as `lspci` words it.
    pub fn description(&self) -> &'static str {
        match self {
            PortType::Endpoint => "Endpoint",
            PortType::LegacyEndpoint => "Legacy Endpoint",
            PortType::RootPort => "Root Port",
            PortType::SwitchUpstream => "Upstream Port",
            PortType::SwitchDownstream => "Downstream Port",
            PortType::PcieToPciBridge => "PCI-Express to PCI/PCI-X Bridge",
            PortType::PciToPcieBridge => "PCI/PCI-X to PCI-Express Bridge",
            PortType::RootComplexIntegratedEndpoint => "Root Complex Integrated Endpoint",
            PortType::RootComplexEventCollector => "Root Complex Event Collector",
            PortType::Other(_) => "Unknown type",
        }
    }
}

/// Device capabilities (DevCap) fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceCapabilities {
    /// Maximum payload size supported, bytes (128 … 4096).
    pub max_payload: u16,
    /// Function-level reset capable.
    pub flr: bool,
    /// Extended (8-bit) tag field supported.
    pub extended_tag: bool,
    /// Raw DevCap register.
    pub raw: u32,
}

/// Link capabilities and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Link {
    /// Max link speed encoding (1 = 2.5 GT/s, 2 = 5, 3 = 8, 4 = 16, 5 = 32, 6 = 64).
    pub max_speed: u8,
    /// Max link width (lanes).
    pub max_width: u8,
    /// ASPM support field (bits 11:10).
    pub aspm_support: u8,
    /// Port number.
    pub port_number: u8,
    /// Data-link-layer link-active reporting capable (needed for hotplug surprise detection).
    pub dll_active_reporting: bool,
    /// Surprise-down error reporting capable.
    pub surprise_down_reporting: bool,
    /// Current link speed encoding.
    pub speed: u8,
    /// Negotiated link width.
    pub width: u8,
    /// Supported link speeds vector from LinkCap2 (bit 0 = 2.5 GT/s …), 0 if absent.
    pub supported_speeds: u8,
}

/// Slot capabilities (root ports and downstream ports with a slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Slot {
    /// Attention button present.
    pub attention_button: bool,
    /// Power controller present.
    pub power_controller: bool,
    /// MRL sensor present.
    pub mrl_sensor: bool,
    /// Attention indicator present.
    pub attention_indicator: bool,
    /// Power indicator present.
    pub power_indicator: bool,
    /// Device may be removed without notice.
    pub hotplug_surprise: bool,
    /// The slot supports hotplug.
    pub hotplug_capable: bool,
    /// Slot power limit value (bits 14:7).
    pub power_limit_value: u8,
    /// Slot power limit scale (bits 16:15).
    pub power_limit_scale: u8,
    /// Electromechanical interlock present.
    pub electromechanical_interlock: bool,
    /// No command-completed support.
    pub no_command_completed: bool,
    /// Physical slot number.
    pub physical_slot: u16,
    /// Slot control register.
    pub control: u16,
    /// Slot status register.
    pub status: u16,
}

impl Slot {
    /// Whether a device is present in the slot (presence detect state).
    pub fn presence_detected(&self) -> bool {
        self.status & (1 << 6) != 0
    }
}

/// Decoded PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PciExpress {
    /// Capability version (1 or 2).
    pub version: u8,
    /// Device/port type.
    pub port_type: PortType,
    /// Slot implemented (meaningful for downstream ports).
    pub slot_implemented: bool,
    /// MSI/MSI-X vector used for this capability's interrupts.
    pub interrupt_message: u8,
    /// Device capabilities.
    pub device: DeviceCapabilities,
    /// Link registers, when the type has a link and the bytes are there.
    pub link: Option<Link>,
    /// Slot registers, when a slot is implemented.
    pub slot: Option<Slot>,
}

impl PciExpress {
    pub(crate) fn decode(r: &Regs<'_>) -> Result<Self> {
        let caps = r.u16(2)?;
        let port_type = PortType::from_field((caps >> 4) as u8);
        let version = (caps & 0xf) as u8;
        let slot_implemented = caps & (1 << 8) != 0;
        let devcap = r.u32(4)?;
        let device = DeviceCapabilities {
            max_payload: 128u16 << (devcap & 7).min(5),
            flr: devcap & (1 << 28) != 0,
            extended_tag: devcap & (1 << 5) != 0,
            raw: devcap,
        };
        let link = if port_type.has_link() { Some(Self::link(r, version)?) } else { None };
        let slot =
            if slot_implemented && port_type.is_downstream_port() { Some(Self::slot(r)?) } else { None };
        Ok(PciExpress {
            version,
            port_type,
            slot_implemented,
            interrupt_message: ((caps >> 9) & 0x1f) as u8,
            device,
            link,
            slot,
        })
    }

    fn link(r: &Regs<'_>, version: u8) -> Result<Link> {
        let cap = r.u32(0x0c)?;
        let status = r.u16(0x12)?;
        // LinkCap2 exists from version 2 on; a 256-byte dump always has it.
        let supported_speeds =
            if version >= 2 { r.u32(0x2c).map(|v| ((v >> 1) & 0x7f) as u8).unwrap_or(0) } else { 0 };
        Ok(Link {
            max_speed: (cap & 0xf) as u8,
            max_width: ((cap >> 4) & 0x3f) as u8,
            aspm_support: ((cap >> 10) & 3) as u8,
            port_number: (cap >> 24) as u8,
            dll_active_reporting: cap & (1 << 20) != 0,
            surprise_down_reporting: cap & (1 << 19) != 0,
            speed: (status & 0xf) as u8,
            width: ((status >> 4) & 0x3f) as u8,
            supported_speeds,
        })
    }

    fn slot(r: &Regs<'_>) -> Result<Slot> {
        let cap = r.u32(0x14)?;
        let bit = |n: u32| cap & (1 << n) != 0;
        Ok(Slot {
            attention_button: bit(0),
            power_controller: bit(1),
            mrl_sensor: bit(2),
            attention_indicator: bit(3),
            power_indicator: bit(4),
            hotplug_surprise: bit(5),
            hotplug_capable: bit(6),
            power_limit_value: (cap >> 7) as u8,
            power_limit_scale: ((cap >> 15) & 3) as u8,
            electromechanical_interlock: bit(17),
            no_command_completed: bit(18),
            physical_slot: (cap >> 19) as u16,
            control: r.u16(0x18)?,
            status: r.u16(0x1a)?,
        })
    }
}

/// Text for a link speed encoding, e.g. `"8GT/s"`.
pub fn speed_name(encoding: u8) -> &'static str {
    match encoding {
        1 => "2.5GT/s",
        2 => "5GT/s",
        3 => "8GT/s",
        4 => "16GT/s",
        5 => "32GT/s",
        6 => "64GT/s",
        _ => "unknown",
    }
}

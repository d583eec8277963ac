//! A device's life on one port, as explicit states with a recorded history.

use serde::{Deserialize, Serialize};

use crate::request::DeviceRequest;

/// Where a device stands.
///
/// ```text
/// planned → adding → added → visible → removing → removed
///              │        │                  │
///              └────────┴──► failed ──► removing (rollback)
///                                          └──► unplug-pending ──(late DEVICE_DELETED)──► removed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DeviceState {
    /// Admitted and journaled; nothing sent to QEMU yet.
    Planned,
    /// Objects, descriptors and devices are being added.
    Adding,
    /// QEMU accepted every `device_add`.
    Added,
    /// Found where planned (`query-pci` bus/slot/function, BAR sizes) or present.
    Visible,
    /// `device_del` sent (or about to be); waiting for `DEVICE_DELETED`.
    Removing,
    /// The unplug deadline passed without `DEVICE_DELETED`; the port stays taken and a
    /// late event finishes the removal.
    UnplugPending,
    /// Gone from QEMU with its objects; the port is free.
    Removed,
    /// A plug step failed; a rollback follows.
    Failed,
}

impl DeviceState {
    /// True when the port is free in this state.
    pub fn port_free(self) -> bool {
        self == DeviceState::Removed
    }

    /// True for states in which no operation is under way.
    pub fn settled(self) -> bool {
        matches!(self, DeviceState::Visible | DeviceState::UnplugPending | DeviceState::Removed)
    }
}

/// One recorded state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The new state.
    pub state: DeviceState,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Why (error text, recovery action, ...); may be empty.
    pub note: String,
}

/// Guest address of a PCI function as `query-pci` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAddress {
    /// Bus number.
    pub bus: u8,
    /// Slot.
    pub slot: u8,
    /// Function.
    pub function: u8,
}

/// The engine's record of the device on one port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The request as validated (with `multifunction=on` filled in).
    pub request: DeviceRequest,
    /// The current state.
    pub state: DeviceState,
    /// Every transition since the plug began, oldest first.
    pub history: Vec<Transition>,
    /// Guest addresses of PCI functions by device id, once visible.
    #[serde(default)]
    pub guest: Vec<(String, GuestAddress)>,
}

impl DeviceRecord {
    /// The port.
    pub fn port(&self) -> &str {
        &self.request.port
    }

    /// True when a plug attempt failed since the last `Planned`.
    pub(crate) fn failed_since_plan(&self) -> bool {
        self.history
            .iter()
            .rev()
            .take_while(|t| t.state != DeviceState::Planned)
            .any(|t| t.state == DeviceState::Failed)
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

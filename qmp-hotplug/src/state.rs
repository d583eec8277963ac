//! A device's life on one port, as explicit states with a recorded history.

use pcie_topology::QemuId;
use pcilibs::bdf::Bdf;
use serde::{Deserialize, Deserializer, Serialize};

use crate::request::PlugRequest;

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
#[non_exhaustive]
pub struct Transition {
    /// The new state.
    pub state: DeviceState,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Why (error text, recovery action, ...); may be empty.
    pub note: String,
}

/// Most transitions a [`DeviceRecord`] keeps (the oldest go first): a device whose
/// unplug is refused again and again must not grow its record, and with it every journal
/// snapshot, without bound. An operation takes a handful, so the current one is whole.
pub const MAX_HISTORY: usize = 64;

/// Longest [`Transition::note`] kept, in bytes (an error from QEMU can be as long as a
/// QMP message; the journal record that carries the note must stay small).
pub const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to [`MAX_NOTE_BYTES`] at a character boundary, marked with `…` when cut.
pub(crate) fn bounded_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_owned();
    }
    let mut end = MAX_NOTE_BYTES.saturating_sub('…'.len_utf8());
    while !note.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    let mut cut = note.get(..end).unwrap_or_default().to_owned();
    cut.push('…');
    cut
}

/// Guest addresses of PCI functions by device id, as `query-pci` reported them (domain
/// 0: QEMU's `query-pci` has no other).
pub(crate) type GuestAddresses = Vec<(QemuId, Bdf)>;

/// The engine's record of the device on one port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceRecord {
    /// The request as validated (with `multifunction=on` filled in).
    pub request: PlugRequest,
    /// The current state.
    pub state: DeviceState,
    /// The transitions since the plug began, oldest first (the last [`MAX_HISTORY`]).
    pub history: Vec<Transition>,
    /// Guest addresses of PCI functions by device id, once visible, as `query-pci`
    /// reported them (domain 0: QEMU's `query-pci` has no other).
    #[serde(default, deserialize_with = "guest_addresses")]
    pub guest: Vec<(QemuId, Bdf)>,
}

/// A guest address as journals have it: the address text, or (journals written before
/// addresses were `pcilibs::Bdf`) its bus, slot and function.
#[derive(Deserialize)]
#[serde(untagged)]
enum AddressWire {
    Text(Bdf),
    Parts { bus: u8, slot: u8, function: u8 },
}

/// Reads [`GuestAddresses`] in either form of [`AddressWire`].
pub(crate) fn guest_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<GuestAddresses, D::Error> {
    let wire: Vec<(QemuId, AddressWire)> = Vec::deserialize(d)?;
    wire.into_iter()
        .map(|(id, a)| {
            let bdf = match a {
                AddressWire::Text(bdf) => bdf,
                AddressWire::Parts { bus, slot, function } => {
                    Bdf::new(0, bus, slot, function).map_err(serde::de::Error::custom)?
                }
            };
            Ok((id, bdf))
        })
        .collect()
}

impl DeviceRecord {
    /// A record of `request` in `state`, with no history and no guest addresses yet.
    pub(crate) fn new(request: PlugRequest, state: DeviceState) -> Self {
        DeviceRecord { request, state, history: Vec::new(), guest: Vec::new() }
    }

    /// The port.
    pub fn port(&self) -> &QemuId {
        &self.request.port
    }

    /// The device's id (what [`crate::Engine::unplug`] takes).
    pub fn device(&self) -> &QemuId {
        &self.request.device
    }

    /// The guest address `query-pci` reported for function `id`, once visible.
    pub fn guest_address(&self, id: &str) -> Option<Bdf> {
        self.guest.iter().find(|(f, _)| f.as_str() == id).map(|(_, bdf)| *bdf)
    }

    /// Appends `t` to the history, keeping the last [`MAX_HISTORY`] transitions.
    pub(crate) fn push_history(&mut self, t: Transition) {
        self.history.push(t);
        let excess = self.history.len().saturating_sub(MAX_HISTORY);
        if excess > 0 {
            self.history.drain(..excess);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_and_history_are_bounded() {
        let long = "é".repeat(MAX_NOTE_BYTES);
        let cut = bounded_note(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES && cut.ends_with('…'));
        assert_eq!(bounded_note("short"), "short");
        let request: PlugRequest = serde_json::from_value(
            serde_json::json!({"port": "rp0", "functions": [{"qdev": {"driver": "e1000e", "id": "n"}}]}),
        )
        .unwrap();
        let mut d = DeviceRecord::new(request, DeviceState::Visible);
        for n in 0..1000 {
            d.push_history(Transition { state: DeviceState::Visible, at_unix_ms: n, note: String::new() });
        }
        assert_eq!(d.history.len(), MAX_HISTORY);
        assert_eq!(d.history.last().map(|t| t.at_unix_ms), Some(999));
    }

    /// Guest addresses read in the text form and in the form of earlier journals.
    #[test]
    fn guest_addresses_in_both_forms() {
        let read = |guest: serde_json::Value| {
            let v = serde_json::json!({
                "request": {"port": "rp0", "functions": [{"qdev": {"driver": "e1000e", "id": "n"}}]},
                "state": "visible", "history": [], "guest": guest});
            serde_json::from_value::<DeviceRecord>(v).map(|r| r.guest)
        };
        let want = vec![(QemuId::new("n").unwrap(), Bdf::new(0, 1, 0, 2).unwrap())];
        assert_eq!(read(serde_json::json!([["n", {"bus": 1, "slot": 0, "function": 2}]])).unwrap(), want);
        assert_eq!(read(serde_json::json!([["n", "0000:01:00.2"]])).unwrap(), want);
        assert!(read(serde_json::json!([["n", {"bus": 1, "slot": 40, "function": 2}]])).is_err());
        let rec = DeviceRecord {
            guest: want,
            ..DeviceRecord::new(
                serde_json::from_value(serde_json::json!(
            {"port": "rp0", "functions": [{"qdev": {"driver": "e1000e", "id": "n"}}]}))
                .unwrap(),
                DeviceState::Visible,
            )
        };
        let text = serde_json::to_value(&rec).unwrap();
        assert_eq!(text["guest"], serde_json::json!([["n", "0000:01:00.2"]]));
        assert_eq!(rec.guest_address("n"), Some(Bdf::new(0, 1, 0, 2).unwrap()));
    }
}

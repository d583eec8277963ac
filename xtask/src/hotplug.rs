//! Hotplug and unplug steps measured against what the guest reports, for experiments and
//! the boot checks. Uses the harness's raw QMP client; the end-to-end runs drive QEMU
//! through the `qmp-hotplug` crate instead and keep only the guest-side checks.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{Guest, GuestError};
use crate::qmp::{self, Qmp, QmpError};
use crate::reporter::{Bdf, CcwDevice, GuestState, PciDevice};

/// A hotplug or unplug step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HotplugError {
    /// QMP refused or timed out.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The guest did not get there in time, or QEMU died.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// QEMU holds the device but `query-pci` does not show it as a function of the vendor.
    #[error("QEMU accepted {id} but query-pci shows {found} for it, not a function of vendor {vendor:04x}")]
    NotPresented {
        /// The QEMU id.
        id: String,
        /// The vendor expected.
        vendor: u16,
        /// What `query-pci` shows for it (`vendor:device` or `nothing`).
        found: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, HotplugError>;

/// What the guest showed after a `device_add`.
#[derive(Clone, Debug)]
pub struct Plugged {
    /// The QMP id.
    pub id: String,
    /// The function the guest found.
    pub device: PciDevice,
    /// From `device_add` to the first guest snapshot that showed the function.
    pub seen_after: Duration,
    /// BARs that are unassigned or outside the parent's windows (empty: all good).
    pub bar_problems: Vec<String>,
    /// Kernel messages about the function or its parent since the `device_add`.
    pub kmsg: Vec<String>,
    /// The guest state at the end of the step.
    pub state: GuestState,
}

/// What happened after a `device_del`.
#[derive(Clone, Debug)]
pub struct Unplugged {
    /// From `device_del` to `DEVICE_DELETED`.
    pub event_after: Duration,
    /// From `device_del` to the first guest snapshot without the function.
    pub gone_after: Duration,
}

/// Time to let the guest's kernel messages about a new function arrive after it shows up.
const SETTLE: Duration = Duration::from_millis(600);

/// What to look for in the guest after a `device_add`.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// Vendor id of the new function.
    pub vendor: u16,
    /// Device id of the new function; `None`: the one QEMU presents for it (`query-pci`
    /// right after the `device_add`), for devices whose id depends on the machine
    /// version (virtio on s390x's zPCI bus, see [`crate::e2e::models::Model::zpci_devices`]).
    pub device: Option<u16>,
    /// BARs (index, size) that must be assigned.
    pub bars: &'a [(u8, u64)],
}

/// `device_add` with `args` (which must carry `id`), then waits until the guest shows a
/// new function as `expect` describes, and checks its BARs.
pub fn plug(
    guest: &Guest,
    qmp: &mut Qmp,
    args: Value,
    expect: Expect<'_>,
    deadline: Instant,
) -> Result<Plugged> {
    let Expect { vendor, device, bars: expected_bars } = expect;
    let id = args.get("id").and_then(Value::as_str).unwrap_or("").to_string();
    let before: BTreeSet<Bdf> = guest.state().pci.keys().copied().collect();
    let kmsg_before = guest.state().kmsg.len();
    let sent = Instant::now();
    qmp.execute("device_add", args, deadline)?;
    let device = match device {
        Some(device) => device,
        None => presented_device(qmp, &id, vendor, deadline)?,
    };
    let what = format!("{id} ({vendor:04x}:{device:04x}) in the guest");
    let (bdf, seen) = guest.wait_map(&what, deadline, |s| {
        let new = s.find(vendor, device).find(|d| !before.contains(&d.bdf))?;
        Some((new.bdf, s.snapshot_at.unwrap_or_else(Instant::now)))
    })?;
    std::thread::sleep(SETTLE);
    let state = guest.state();
    let Some(found) = state.pci.get(&bdf).cloned() else {
        return Err(GuestError::Timeout {
            guest: guest.name().to_string(),
            what: format!("{id} to stay present"),
            waited: sent.elapsed(),
            diagnostics: String::new(),
        }
        .into());
    };
    let parent = found.parent().map(|p| p.to_string());
    let kmsg = state
        .kmsg
        .iter()
        .skip(kmsg_before)
        .filter(|m| m.text.contains(&bdf.to_string()) || parent.as_ref().is_some_and(|p| m.text.contains(p)))
        .map(|m| m.text.clone())
        .collect();
    Ok(Plugged {
        id,
        bar_problems: state.bar_problems(bdf, expected_bars, Some(sent)),
        device: found,
        seen_after: seen.saturating_duration_since(sent),
        kmsg,
        state,
    })
}

/// The device id QEMU presents for the function `id` of `vendor` (`query-pci`).
fn presented_device(qmp: &mut Qmp, id: &str, vendor: u16, deadline: Instant) -> Result<u16> {
    let reply = qmp.execute("query-pci", json!({}), deadline)?;
    match query_pci_ids(&reply, id) {
        Some((v, device)) if v == vendor => Ok(device),
        other => Err(HotplugError::NotPresented {
            id: id.to_string(),
            vendor,
            found: other.map_or_else(|| "nothing".into(), |(v, d)| format!("{v:04x}:{d:04x}")),
        }),
    }
}

/// The vendor and device id `query-pci` shows for the function with QEMU id `qdev_id`, on
/// any bus (behind bridges too; s390x's zPCI bus included).
pub fn query_pci_ids(reply: &Value, qdev_id: &str) -> Option<(u16, u16)> {
    fn walk(devices: &[Value], qdev_id: &str) -> Option<(u16, u16)> {
        devices.iter().find_map(|d| {
            if d.get("qdev_id").and_then(Value::as_str) == Some(qdev_id) {
                let id = |k: &str| d.get("id")?.get(k)?.as_u64().and_then(|v| u16::try_from(v).ok());
                return Some((id("vendor")?, id("device")?));
            }
            let below = d.get("pci_bridge")?.get("devices")?.as_array()?;
            walk(below, qdev_id)
        })
    }
    reply.as_array()?.iter().find_map(|bus| walk(bus.get("devices")?.as_array()?, qdev_id))
}

/// `device_del id`, then waits for `DEVICE_DELETED` and for the guest to drop `bdf`.
pub fn unplug(guest: &Guest, qmp: &mut Qmp, id: &str, bdf: Bdf, deadline: Instant) -> Result<Unplugged> {
    let sent = Instant::now();
    qmp.execute("device_del", json!({ "id": id }), deadline)?;
    qmp.wait_event(&format!("DEVICE_DELETED for {id}"), deadline, |e| qmp::is_device_deleted(e, id))?;
    let event_after = sent.elapsed();
    let gone = guest.wait_map(&format!("{bdf} to leave the guest"), deadline, |s| {
        (!s.pci.contains_key(&bdf)).then(|| s.snapshot_at.unwrap_or_else(Instant::now))
    })?;
    Ok(Unplugged { event_after, gone_after: gone.saturating_duration_since(sent) })
}

/// `device_add` of a channel device (`args` carries `id` and `devno`), then waits until
/// the guest's ccw bus shows `busid`. Returns the device and the time it took.
pub fn plug_ccw(
    guest: &Guest,
    qmp: &mut Qmp,
    args: Value,
    busid: &str,
    deadline: Instant,
) -> Result<(CcwDevice, Duration)> {
    let sent = Instant::now();
    qmp.execute("device_add", args, deadline)?;
    let dev = guest.wait_map(&format!("{busid} on the ccw bus"), deadline, |s| s.ccw.get(busid).cloned())?;
    Ok((dev, sent.elapsed()))
}

/// `device_del id` of a channel device, then waits for `DEVICE_DELETED` and for the guest
/// to drop `busid`.
pub fn unplug_ccw(
    guest: &Guest,
    qmp: &mut Qmp,
    id: &str,
    busid: &str,
    deadline: Instant,
) -> Result<Unplugged> {
    let sent = Instant::now();
    qmp.execute("device_del", json!({ "id": id }), deadline)?;
    qmp.wait_event(&format!("DEVICE_DELETED for {id}"), deadline, |e| qmp::is_device_deleted(e, id))?;
    let event_after = sent.elapsed();
    guest.wait_for(&format!("{busid} to leave the guest"), deadline, |s| !s.ccw.contains_key(busid))?;
    Ok(Unplugged { event_after, gone_after: sent.elapsed() })
}

/// The guest's function whose parent bridge is `bridge` (first one, by address).
pub fn child_of(state: &GuestState, bridge: Bdf) -> Option<&PciDevice> {
    state.pci.values().find(|d| d.parent() == Some(bridge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pci_ids_finds_a_function_on_any_bus() {
        // QEMU 11.1's query-pci on s390x (the zPCI bus), and a q35 function behind a port.
        let zpci = serde_json::json!([{"bus": 0, "devices": [{"bus": 0, "slot": 0, "function": 0,
            "qdev_id": "znic0", "id": {"vendor": 6900, "device": 4161}, "regions": []}]}]);
        assert_eq!(query_pci_ids(&zpci, "znic0"), Some((0x1af4, 0x1041)));
        assert_eq!(query_pci_ids(&zpci, "other"), None);
        let q35 = serde_json::json!([{"bus": 0, "devices": [{"qdev_id": "rp0", "id": {"vendor": 6966, "device": 12},
            "pci_bridge": {"devices": [{"qdev_id": "nic0", "id": {"vendor": 32902, "device": 4307}}]}}]}]);
        assert_eq!(query_pci_ids(&q35, "nic0"), Some((0x8086, 0x10d3)));
        assert_eq!(query_pci_ids(&serde_json::json!({"error": 1}), "nic0"), None);
    }
}

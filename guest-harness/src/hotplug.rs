//! Hotplug and unplug steps measured against what the guest reports, for experiments and
//! the boot checks: plain `device_add` / `device_del` through `qmp-hotplug`'s
//! [`QmpClient`]. The end-to-end runs plug through that crate's engine instead and keep
//! only the guest-side checks.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use qmp_hotplug::{ClientError, EventStream, QmpClient};
use serde_json::{json, Value};

use crate::guest::{Guest, GuestError};
use crate::reporter::{CcwDevice, GuestState, PciDevice};
use pcilibs::bdf::Bdf;

/// A hotplug or unplug step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HotplugError {
    /// QMP refused or timed out.
    #[error(transparent)]
    Qmp(#[from] ClientError),
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
    /// version (virtio on s390x's zPCI bus).
    pub device: Option<u16>,
    /// BARs (index, size) that must be assigned.
    pub bars: &'a [(u8, u64)],
}

/// `device_add` with `args` (which must carry `id`), then waits until the guest shows a
/// new function as `expect` describes, and checks its BARs.
pub fn plug(
    guest: &Guest,
    qmp: &QmpClient,
    args: Value,
    expect: Expect<'_>,
    deadline: Instant,
) -> Result<Plugged> {
    let Expect { vendor, device, bars: expected_bars } = expect;
    let id = args.get("id").and_then(Value::as_str).unwrap_or("").to_string();
    let before: BTreeSet<Bdf> = guest.state().pci.keys().copied().collect();
    let kmsg_before = guest.state().kmsg.len();
    let sent = Instant::now();
    execute(qmp, "device_add", args, deadline)?;
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
fn presented_device(qmp: &QmpClient, id: &str, vendor: u16, deadline: Instant) -> Result<u16> {
    let reply = execute(qmp, "query-pci", json!({}), deadline)?;
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
pub fn unplug(guest: &Guest, qmp: &QmpClient, id: &str, bdf: Bdf, deadline: Instant) -> Result<Unplugged> {
    let sent = Instant::now();
    let events = qmp.subscribe();
    execute(qmp, "device_del", json!({ "id": id }), deadline)?;
    wait_deleted(&events, id, deadline)?;
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
    qmp: &QmpClient,
    args: Value,
    busid: &str,
    deadline: Instant,
) -> Result<(CcwDevice, Duration)> {
    let sent = Instant::now();
    execute(qmp, "device_add", args, deadline)?;
    let dev = guest.wait_map(&format!("{busid} on the ccw bus"), deadline, |s| s.ccw.get(busid).cloned())?;
    Ok((dev, sent.elapsed()))
}

/// `device_del id` of a channel device, then waits for `DEVICE_DELETED` and for the guest
/// to drop `busid`.
pub fn unplug_ccw(
    guest: &Guest,
    qmp: &QmpClient,
    id: &str,
    busid: &str,
    deadline: Instant,
) -> Result<Unplugged> {
    let sent = Instant::now();
    let events = qmp.subscribe();
    execute(qmp, "device_del", json!({ "id": id }), deadline)?;
    wait_deleted(&events, id, deadline)?;
    let event_after = sent.elapsed();
    guest.wait_for(&format!("{busid} to leave the guest"), deadline, |s| !s.ccw.contains_key(busid))?;
    Ok(Unplugged { event_after, gone_after: sent.elapsed() })
}

/// Runs `command` with `args` and waits for its reply until `deadline`.
fn execute(qmp: &QmpClient, command: &str, args: Value, deadline: Instant) -> Result<Value> {
    Ok(qmp.execute_raw(command, Some(args), deadline.saturating_duration_since(Instant::now()))?)
}

/// Waits until `deadline` for `DEVICE_DELETED` of `id` on `events` (subscribed before the
/// `device_del`, so the event cannot slip past).
fn wait_deleted(events: &EventStream, id: &str, deadline: Instant) -> Result<()> {
    match events.wait_for(deadline, |e| e.deleted_device_id() == Some(id)) {
        Ok(_) => Ok(()),
        Err(ClientError::Timeout { after, .. }) => {
            Err(ClientError::Timeout { what: format!("DEVICE_DELETED for {id}"), after }.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The guest's function whose parent bridge is `bridge` (first one, by address).
pub fn child_of(state: &GuestState, bridge: Bdf) -> Option<&PciDevice> {
    state.pci.values().find(|d| d.parent() == Some(bridge))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, \
                            \"package\": \"\"}, \"capabilities\": []}}\r\n";

    /// A scripted QEMU: each command read gets the next reply, with `ID` standing for the
    /// command's id. Returns when the client hangs up.
    fn peer(listener: UnixListener, replies: Vec<&'static str>) {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        s.write_all(GREETING.as_bytes()).unwrap();
        let mut line = String::new();
        for reply in replies {
            line.clear();
            r.read_line(&mut line).unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].to_string();
            s.write_all(reply.replace("ID", &id).as_bytes()).unwrap();
        }
        line.clear();
        let _ = r.read_line(&mut line);
    }

    /// QEMU's refusal keeps its words; an unplug waits for its own `DEVICE_DELETED` (not
    /// another device's, even one that came first) and times out naming the event.
    #[test]
    fn refusals_and_device_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let replies = vec![
            "{\"return\": {}, \"id\": ID}\r\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": ID}\r\n",
            "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"other\"}}\r\n\
             {\"return\": {}, \"id\": ID}\r\n\
             {\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"d1\"}}\r\n",
        ];
        let peer = std::thread::spawn(move || peer(listener, replies));
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = QmpClient::connect_unix(&path, qmp_hotplug::ClientOptions::default()).unwrap();
        let err = execute(&qmp, "device_add", json!({"driver": "x"}), deadline).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let events = qmp.subscribe();
        execute(&qmp, "device_del", json!({"id": "d1"}), deadline).unwrap();
        wait_deleted(&events, "d1", deadline).unwrap();
        let short = Instant::now() + Duration::from_millis(100);
        let err = wait_deleted(&events, "d2", short).unwrap_err();
        assert!(err.to_string().contains("DEVICE_DELETED for d2"), "{err}");
        drop(qmp);
        peer.join().unwrap();
    }

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

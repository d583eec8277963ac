//! Reading `query-pci` leniently and checking a function against its expectation.
//!
//! The engine reads the reply as raw JSON with only the members it needs, so that QEMU
//! versions whose `query-pci` differs from the `qapi` crate's schema still work.

use serde::Deserialize;
use serde_json::Value;

use crate::request::PciExpectation;
use crate::state::GuestAddress;

/// Deepest bridge nesting walked (PCIe allows far fewer levels in practice).
const MAX_DEPTH: usize = 32;
/// Most functions read from one reply.
const MAX_FUNCTIONS: usize = 65_536;

/// A PCI function as `query-pci` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// The device's QEMU id (empty for devices without one).
    pub qdev_id: String,
    /// Where the guest sees it.
    pub address: GuestAddress,
    /// (BAR index, size) of every region QEMU reports.
    pub bars: Vec<(u8, u64)>,
}

#[derive(Deserialize)]
struct Bus {
    #[serde(default)]
    devices: Vec<Device>,
}

#[derive(Deserialize)]
struct Device {
    #[serde(default)]
    bus: i64,
    #[serde(default)]
    slot: i64,
    #[serde(default)]
    function: i64,
    #[serde(default)]
    qdev_id: String,
    #[serde(default)]
    regions: Vec<Region>,
    #[serde(default)]
    pci_bridge: Option<Bridge>,
}

#[derive(Deserialize)]
struct Region {
    #[serde(default)]
    bar: i64,
    #[serde(default)]
    size: i64,
}

#[derive(Deserialize)]
struct Bridge {
    #[serde(default)]
    devices: Vec<Device>,
}

/// Flattens a `query-pci` reply into its functions. Unreadable parts are skipped.
pub fn functions(reply: &Value) -> Vec<PciFunction> {
    let buses: Vec<Bus> = serde_json::from_value(reply.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for b in &buses {
        walk(&b.devices, 0, &mut out);
    }
    out
}

fn walk(devices: &[Device], depth: usize, out: &mut Vec<PciFunction>) {
    if depth > MAX_DEPTH {
        return;
    }
    for d in devices {
        if out.len() >= MAX_FUNCTIONS {
            return;
        }
        let byte = |v: i64| u8::try_from(v).unwrap_or(u8::MAX);
        out.push(PciFunction {
            qdev_id: d.qdev_id.clone(),
            address: GuestAddress { bus: byte(d.bus), slot: byte(d.slot), function: byte(d.function) },
            bars: d.regions.iter().map(|r| (byte(r.bar), u64::try_from(r.size).unwrap_or(0))).collect(),
        });
        if let Some(br) = &d.pci_bridge {
            walk(&br.devices, depth + 1, out);
        }
    }
}

/// Checks one function against its expectation; `Err` says what differs.
pub fn check(f: &PciFunction, want: &PciExpectation) -> Result<(), String> {
    let a = f.address;
    let mismatch = |what: &str, got: u8, want: u8| format!("{what} is {got:#x}, planned {want:#x}");
    if let Some(bus) = want.bus.filter(|b| *b != a.bus) {
        return Err(mismatch("bus", a.bus, bus));
    }
    if let Some(slot) = want.slot.filter(|s| *s != a.slot) {
        return Err(mismatch("slot", a.slot, slot));
    }
    if let Some(func) = want.function.filter(|x| *x != a.function) {
        return Err(mismatch("function", a.function, func));
    }
    for bar in &want.bars {
        match f.bars.iter().find(|(i, _)| *i == bar.bar) {
            Some((_, size)) if *size == bar.size => {}
            Some((_, size)) => {
                return Err(format!("BAR {} is {size:#x} bytes, planned {:#x}", bar.bar, bar.size))
            }
            None => return Err(format!("BAR {} is missing, planned {:#x} bytes", bar.bar, bar.size)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::BarExpectation;

    /// Shape of QEMU 7.2's reply with a root port holding one device (trimmed).
    const REPLY: &str = r#"[{"bus": 0, "devices": [
        {"bus": 0, "slot": 2, "function": 0, "qdev_id": "rp0", "regions": [],
         "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1}, "devices": [
            {"bus": 1, "slot": 0, "function": 0, "qdev_id": "n0",
             "regions": [{"bar": 1, "size": 4096, "address": -1, "type": "memory"},
                         {"bar": 4, "size": 16384, "address": -1, "type": "memory"}]}]}}]}]"#;

    #[test]
    fn walks_bridges_and_checks() {
        let v: Value = serde_json::from_str(REPLY).unwrap();
        let fs = functions(&v);
        assert_eq!(fs.len(), 2);
        let n0 = fs.iter().find(|f| f.qdev_id == "n0").unwrap();
        assert_eq!(n0.address, GuestAddress { bus: 1, slot: 0, function: 0 });
        let mut want = PciExpectation {
            bus: Some(1),
            slot: Some(0),
            function: Some(0),
            bars: vec![BarExpectation { bar: 4, size: 16384 }],
        };
        assert_eq!(check(n0, &want), Ok(()));
        want.bus = Some(2);
        assert!(check(n0, &want).unwrap_err().contains("bus"));
        want.bus = None;
        want.bars = vec![BarExpectation { bar: 4, size: 1 << 30 }];
        assert!(check(n0, &want).unwrap_err().contains("BAR 4"));
        want.bars = vec![BarExpectation { bar: 2, size: 4096 }];
        assert!(check(n0, &want).unwrap_err().contains("missing"));
    }

    #[test]
    fn garbage_reply_gives_nothing() {
        assert!(functions(&serde_json::json!({"not": "a list"})).is_empty());
    }
}

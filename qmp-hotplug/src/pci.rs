//! Reading `query-pci` leniently and checking a function against its expectation.
//!
//! The engine reads the reply as raw JSON with only the members it needs, so that QEMU
//! versions whose `query-pci` differs from the `qapi` crate's schema still work.

use serde::Deserialize;
use serde_json::Value;

use crate::request::{BarExpectation, PciExpectation};
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
    check_bars(&f.bars, &want.bars)
}

/// BARs named by index must have their size; each BAR expected by size alone must match a
/// different one of BARs 0–5 that no indexed expectation names. Matching by equal size,
/// taking the first free BAR of that size is as good as any other choice.
fn check_bars(have: &[(u8, u64)], want: &[BarExpectation]) -> Result<(), String> {
    let mut taken: Vec<u8> = Vec::new();
    for (index, size) in want.iter().filter_map(|b| Some((b.bar?, b.size))) {
        match have.iter().find(|(i, _)| *i == index) {
            Some((_, got)) if *got == size => taken.push(index),
            Some((_, got)) => return Err(format!("BAR {index} is {got:#x} bytes, planned {size:#x}")),
            None => return Err(format!("BAR {index} is missing, planned {size:#x} bytes")),
        }
    }
    for size in want.iter().filter(|b| b.bar.is_none()).map(|b| b.size) {
        let free =
            have.iter().find(|(i, got)| *i < BarExpectation::ROM && *got == size && !taken.contains(i));
        match free {
            Some((i, _)) => taken.push(*i),
            None => {
                let sizes: Vec<String> = have.iter().map(|(i, got)| format!("{i}: {got:#x}")).collect();
                return Err(format!(
                    "no BAR of the planned {size:#x} bytes left (BARs {})",
                    if sizes.is_empty() { "none".to_owned() } else { sizes.join(", ") }
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            bars: vec![BarExpectation::at(4, 16384)],
        };
        assert_eq!(check(n0, &want), Ok(()));
        want.bus = Some(2);
        assert!(check(n0, &want).unwrap_err().contains("bus"));
        want.bus = None;
        want.bars = vec![BarExpectation::at(4, 1 << 30)];
        assert!(check(n0, &want).unwrap_err().contains("BAR 4"));
        want.bars = vec![BarExpectation::at(2, 4096)];
        assert!(check(n0, &want).unwrap_err().contains("missing"));
    }

    #[test]
    fn bars_by_size_each_take_a_different_bar() {
        // e1000e as QEMU 7.2 shows it: two 128 KiB BARs, I/O, 16 KiB, and its ROM.
        let have = [(0, 128 << 10), (1, 128 << 10), (2, 32), (3, 16 << 10), (6, 256 << 10)];
        let any = BarExpectation::any;
        let plan = [any(128 << 10), any(128 << 10), any(32), any(16 << 10)];
        assert_eq!(check_bars(&have, &plan), Ok(()));
        // A third 128 KiB BAR is not there, even though two are.
        let three = [any(128 << 10), any(128 << 10), any(128 << 10)];
        assert!(check_bars(&have, &three).unwrap_err().contains("0x20000"));
        // A BAR named by index is not also counted for a size-only expectation.
        let named = [BarExpectation::at(1, 128 << 10), any(128 << 10), any(128 << 10)];
        assert!(check_bars(&have, &named).is_err());
        // The ROM does not stand in for a BAR of its size, and is found by its index.
        assert!(check_bars(&have, &[any(256 << 10)]).is_err());
        assert_eq!(check_bars(&have, &[BarExpectation::at(BarExpectation::ROM, 256 << 10)]), Ok(()));
        assert!(check_bars(&[], &[any(4096)]).unwrap_err().contains("BARs none"));
    }

    #[test]
    fn index_is_optional_in_json() {
        let old: BarExpectation = serde_json::from_str(r#"{"bar": 4, "size": 16384}"#).unwrap();
        assert_eq!(old, BarExpectation::at(4, 16384));
        let by_size: BarExpectation = serde_json::from_str(r#"{"size": 16384}"#).unwrap();
        assert_eq!(by_size, BarExpectation::any(16384));
        assert_eq!(serde_json::to_string(&by_size).unwrap(), r#"{"size":16384}"#);
    }

    #[test]
    fn garbage_reply_gives_nothing() {
        assert!(functions(&serde_json::json!({"not": "a list"})).is_empty());
    }
}

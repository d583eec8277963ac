//! Reading `query-pci` leniently, checking a function against its expectation, and
//! checking whether a device's BARs fit the windows a bridge forwards right now.
//!
//! The engine reads the reply as raw JSON with only the members it needs, so that QEMU
//! versions whose `query-pci` differs from the `qapi` crate's schema still work.
//!
//! # Live windows
//!
//! For every bridge `query-pci` gives the windows as QEMU decodes them from the bridge's
//! registers, that is as the guest's firmware or OS programmed them ([`bridges`]).
//! [`window_shortfalls`] places a device's BARs into them the way a guest does: each BAR
//! at its natural alignment, largest alignment first (optimal for power-of-two BARs),
//! 64-bit prefetchable BARs in the prefetchable window (in the memory window when the
//! bridge has none), other memory BARs and ROMs in the memory window, I/O BARs in the I/O
//! window. When a window cannot hold them it says by how much. A guest that resizes
//! windows at hotplug (Linux with `pci=realloc`, or booted without firmware) may still
//! make room; under firmware that keeps its windows (SeaBIOS, OVMF) the verdict is final.

use serde::Deserialize;
use serde_json::Value;

use pcilibs::bdf::Bdf;
use pcilibs::requirement::{Resource, Window};

use crate::request::{BarExpectation, PciExpectation};

/// Deepest bridge nesting walked (PCIe allows far fewer levels in practice).
const MAX_DEPTH: usize = 32;
/// Most functions read from one reply.
const MAX_FUNCTIONS: usize = 65_536;

/// A PCI function as `query-pci` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PciFunction {
    /// The device's QEMU id (empty for devices without one).
    pub qdev_id: String,
    /// Where the guest sees it (domain 0: `query-pci` has no other).
    pub address: Bdf,
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
    #[serde(default)]
    bus: Option<BusInfo>,
}

#[derive(Deserialize)]
struct BusInfo {
    #[serde(default)]
    secondary: i64,
    #[serde(default)]
    subordinate: i64,
    #[serde(default)]
    io_range: Option<Range>,
    #[serde(default)]
    memory_range: Option<Range>,
    #[serde(default)]
    prefetchable_range: Option<Range>,
}

#[derive(Deserialize)]
struct Range {
    #[serde(default)]
    base: i64,
    #[serde(default)]
    limit: i64,
}

impl Range {
    /// The window, or `None` when it is closed (limit below base, as QEMU reports a
    /// disabled window).
    fn window(&self) -> Option<LiveWindow> {
        let (base, limit) = (u64::try_from(self.base).ok()?, u64::try_from(self.limit).ok()?);
        (limit >= base).then_some(LiveWindow { base, limit })
    }
}

/// An address range a bridge forwards right now, as the guest programmed it:
/// `base..=limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveWindow {
    /// First address.
    pub base: u64,
    /// Last address.
    pub limit: u64,
}

impl LiveWindow {
    /// The window `base..=limit`.
    pub fn new(base: u64, limit: u64) -> Self {
        LiveWindow { base, limit }
    }

    /// Bytes in the window.
    pub fn size(&self) -> u64 {
        self.limit.saturating_sub(self.base).saturating_add(1)
    }
}

/// A PCI bridge (root port, switch port, PCI bridge, expander) as `query-pci` shows it,
/// with the windows it forwards right now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveBridge {
    /// The bridge's QEMU id (empty for bridges without one).
    pub qdev_id: String,
    /// Where the guest sees the bridge itself (domain 0).
    pub address: Bdf,
    /// Its secondary bus number.
    pub secondary: u8,
    /// Its subordinate bus number.
    pub subordinate: u8,
    /// I/O window, `None` when closed.
    pub io: Option<LiveWindow>,
    /// Memory window (non-prefetchable, below 4 GiB), `None` when closed.
    pub mem: Option<LiveWindow>,
    /// Prefetchable memory window, `None` when closed.
    pub pref: Option<LiveWindow>,
    /// Ids of the devices directly on its secondary bus (empty strings for devices
    /// without an id).
    pub children: Vec<String>,
}

/// Every bridge in a `query-pci` reply. Unreadable parts (a bridge at an address no PCI
/// function can have) are skipped.
pub fn bridges(reply: &Value) -> Vec<LiveBridge> {
    let mut out = Vec::new();
    visit(reply, &mut |d| {
        if let (Some(br), Some(address)) = (&d.pci_bridge, d.address()) {
            let info = br.bus.as_ref();
            let window = |r: Option<&Range>| r.and_then(Range::window);
            out.push(LiveBridge {
                qdev_id: d.qdev_id.clone(),
                address,
                secondary: info.map_or(0, |i| byte(i.secondary)),
                subordinate: info.map_or(0, |i| byte(i.subordinate)),
                io: window(info.and_then(|i| i.io_range.as_ref())),
                mem: window(info.and_then(|i| i.memory_range.as_ref())),
                pref: window(info.and_then(|i| i.prefetchable_range.as_ref())),
                children: br.devices.iter().map(|c| c.qdev_id.clone()).collect(),
            });
        }
        out.len() < MAX_FUNCTIONS
    });
    out
}

/// What keeps `need` (a device's BARs and ROM, all functions) out of `bridge`'s live
/// windows, one line per window that cannot hold its share; empty when everything fits.
/// The placement rule is in the module docs.
pub fn window_shortfalls(bridge: &LiveBridge, need: &[Resource]) -> Vec<String> {
    let mut out = Vec::new();
    let pref_home = if bridge.pref.is_some() { Window::Pref } else { Window::Mem };
    for (window, name, live) in
        [(Window::Io, "io", bridge.io), (Window::Mem, "mem", bridge.mem), (Window::Pref, "pref", bridge.pref)]
    {
        let share: Vec<&Resource> = need
            .iter()
            .filter(|r| match r.window() {
                Window::Pref => pref_home == window,
                w => w == window,
            })
            .collect();
        if share.is_empty() {
            continue;
        }
        // Sizes come from the caller: two BARs of 2^63 bytes must not wrap the total.
        let total = share.iter().fold(0u128, |t, r| t.saturating_add(u128::from(r.size)));
        let Some(live) = live else {
            out.push(format!("{name}: the window is closed, the device needs {}", bytes(total)));
            continue;
        };
        if let Some(short) = pack(live, &share) {
            out.push(format!(
                "{name}: the window is {} at {:#x}; the device's {} BAR(s) of {} at natural alignment end {} past it",
                bytes(live.size()),
                live.base,
                share.len(),
                bytes(total),
                bytes(short)
            ));
        }
    }
    out
}

/// Places `share` into `window` largest alignment first; `None` when it fits, else how
/// many bytes past the window's end the last BAR would reach.
fn pack(window: LiveWindow, share: &[&Resource]) -> Option<u128> {
    let mut sorted: Vec<&&Resource> = share.iter().collect();
    sorted.sort_by(|a, b| b.align.max(1).cmp(&a.align.max(1)).then(b.size.cmp(&a.size)));
    let mut next = u128::from(window.base);
    for r in sorted {
        let align = u128::from(r.align.max(1));
        next = next.div_ceil(align).saturating_mul(align).saturating_add(u128::from(r.size));
    }
    let end = u128::from(window.limit).saturating_add(1);
    (next > end).then(|| next.saturating_sub(end))
}

/// `128 GiB`, `2 MiB`, `256 B`: the largest binary unit that divides the value.
fn bytes(n: impl Into<u128>) -> String {
    let n: u128 = n.into();
    for (unit, shift) in [("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}

/// Flattens a `query-pci` reply into its functions. Unreadable parts (a function at an
/// address no PCI function can have) are skipped.
pub fn functions(reply: &Value) -> Vec<PciFunction> {
    let mut out = Vec::new();
    visit(reply, &mut |d| {
        if let Some(address) = d.address() {
            out.push(PciFunction {
                qdev_id: d.qdev_id.clone(),
                address,
                bars: d.regions.iter().map(|r| (byte(r.bar), u64::try_from(r.size).unwrap_or(0))).collect(),
            });
        }
        out.len() < MAX_FUNCTIONS
    });
    out
}

/// A `query-pci` number as a byte; out-of-range values become 0xff.
fn byte(v: i64) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}

impl Device {
    /// Its address, `None` when a number is out of range.
    fn address(&self) -> Option<Bdf> {
        let part = |v: i64| u8::try_from(v).ok();
        Bdf::new(0, part(self.bus)?, part(self.slot)?, part(self.function)?).ok()
    }
}

/// Calls `f` on every device of the reply, depth first, at most [`MAX_DEPTH`] bridges deep,
/// until `f` returns `false`.
fn visit(reply: &Value, f: &mut dyn FnMut(&Device) -> bool) {
    let buses: Vec<Bus> = serde_json::from_value(reply.clone()).unwrap_or_default();
    for b in &buses {
        if !visit_devices(&b.devices, 0, f) {
            return;
        }
    }
}

fn visit_devices(devices: &[Device], depth: usize, f: &mut dyn FnMut(&Device) -> bool) -> bool {
    if depth > MAX_DEPTH {
        return true;
    }
    for d in devices {
        if !f(d) {
            return false;
        }
        if let Some(br) = &d.pci_bridge {
            if !visit_devices(&br.devices, depth + 1, f) {
                return false;
            }
        }
    }
    true
}

/// Checks one function against its expectation; `Err` says what differs.
pub fn check(f: &PciFunction, want: &PciExpectation) -> Result<(), String> {
    let a = f.address;
    let mismatch = |what: &str, got: u8, want: u8| format!("{what} is {got:#x}, planned {want:#x}");
    if let Some(bus) = want.bus.filter(|b| *b != a.bus()) {
        return Err(mismatch("bus", a.bus(), bus));
    }
    if let Some(slot) = want.slot.filter(|s| *s != a.device()) {
        return Err(mismatch("slot", a.device(), slot));
    }
    if let Some(func) = want.function.filter(|x| *x != a.function()) {
        return Err(mismatch("function", a.function(), func));
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
    use proptest::prelude::*;

    /// `query-pci`-shaped JSON with arbitrary numbers, nested bridges and missing or
    /// mistyped members.
    fn device() -> impl Strategy<Value = Value> {
        let num = prop_oneof![any::<i64>().prop_map(Value::from), Just(Value::Null), Just(Value::from("x"))];
        let range = (num.clone(), num.clone()).prop_map(|(b, l)| serde_json::json!({"base": b, "limit": l}));
        let leaf = (num.clone(), num.clone(), num.clone(), "[a-z0-9]{0,4}", proptest::collection::vec((num.clone(), num.clone()), 0..4))
            .prop_map(|(bus, slot, function, id, regions)| {
                let regions: Vec<Value> = regions.into_iter().map(|(bar, size)| serde_json::json!({"bar": bar, "size": size})).collect();
                serde_json::json!({"bus": bus, "slot": slot, "function": function, "qdev_id": id, "regions": regions})
            });
        leaf.prop_recursive(40, 80, 3, move |inner| {
            (inner.clone(), proptest::collection::vec(inner, 0..3), range.clone(), range.clone(), range.clone(), num.clone())
                .prop_map(|(mut d, children, io, mem, pref, secondary)| {
                    d["pci_bridge"] = serde_json::json!({
                        "bus": {"secondary": secondary, "subordinate": 1, "io_range": io, "memory_range": mem, "prefetchable_range": pref},
                        "devices": children,
                    });
                    d
                })
        })
    }

    fn resource() -> impl Strategy<Value = Resource> {
        (0u8..3, any::<bool>(), any::<bool>(), 0u32..64).prop_map(|(k, prefetchable, rom, shift)| Resource {
            kind: [BarKind::Io, BarKind::Mem32, BarKind::Mem64][usize::from(k)],
            prefetchable,
            rom,
            size: 1u64 << shift,
            align: 1u64 << shift,
        })
    }

    /// A chain of 100 nested bridges is read down to the depth bound and no further.
    #[test]
    fn nesting_is_bounded() {
        let mut d = serde_json::json!({"bus": 0, "slot": 0, "function": 0, "qdev_id": "leaf"});
        for n in 0..100 {
            d = serde_json::json!({"bus": 0, "slot": 1, "function": 0, "qdev_id": format!("b{n}"),
                                   "pci_bridge": {"bus": {"secondary": 1}, "devices": [d]}});
        }
        let reply = serde_json::json!([{"bus": 0, "devices": [d]}]);
        assert_eq!(functions(&reply).len(), MAX_DEPTH + 1);
        assert_eq!(bridges(&reply).len(), MAX_DEPTH + 1);
    }

    proptest! {
        /// Any reply shape reads without a panic, bounded in depth; every bridge found is
        /// checked against any device without a panic either.
        #[test]
        fn any_reply_reads_and_checks(devices in proptest::collection::vec(device(), 0..4), need in proptest::collection::vec(resource(), 0..6)) {
            let reply = serde_json::json!([{"bus": 0, "devices": devices}]);
            let fs = functions(&reply);
            let bs = bridges(&reply);
            prop_assert!(bs.len() <= fs.len());
            for b in &bs {
                let _ = window_shortfalls(b, &need);
            }
        }
    }

    use pcilibs::bar::BarKind;

    fn bridge_reply(pref: (i64, i64)) -> Value {
        serde_json::json!([{"bus": 0, "devices": [{
            "bus": 0, "slot": 2, "function": 0, "qdev_id": "rp0", "regions": [],
            "pci_bridge": {
                "bus": {"number": 0, "secondary": 1, "subordinate": 1,
                        "io_range": {"base": 4096, "limit": 4095},
                        "memory_range": {"base": 0xfe00_0000_i64, "limit": 0xfe1f_ffff_i64},
                        "prefetchable_range": {"base": pref.0, "limit": pref.1}},
                "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": "nic0", "regions": []}]
            }
        }]}])
    }

    #[test]
    fn bridges_read_windows_and_children() {
        let b = &bridges(&bridge_reply((0x40_0000_0000, 0x7f_ffff_ffff)))[0];
        assert_eq!((b.qdev_id.as_str(), b.secondary, b.subordinate), ("rp0", 1, 1));
        assert_eq!(b.io, None, "limit below base is a closed window");
        assert_eq!(b.mem.map(|w| w.size()), Some(2 << 20));
        assert_eq!(b.pref.map(|w| w.size()), Some(256 << 30));
        assert_eq!(b.children, ["nic0"]);
        assert!(bridges(&serde_json::json!({"not": "a list"})).is_empty());
        assert!(bridges(&serde_json::json!([{"devices": [{"pci_bridge": {}}]}])).len() == 1);
    }

    #[test]
    fn shortfalls_follow_natural_alignment() {
        // 256 GiB window starting 2 MiB past a 128 GiB boundary: one 128 GiB BAR fits
        // (at the next boundary), two do not.
        let base = (128_i64 << 30) + (2 << 20);
        let b = &bridges(&bridge_reply((base, base + (256 << 30) - 1)))[0];
        let big = Resource::bar(BarKind::Mem64, true, 128 << 30);
        assert!(window_shortfalls(b, &[big]).is_empty());
        let why = window_shortfalls(b, &[big, big]);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("pref:") && why[0].contains("end 131070 MiB past it"), "{why:?}");
        // No prefetchable window: 64-bit prefetchable BARs go to the memory window.
        let closed = &bridges(&bridge_reply((1, 0)))[0];
        let small = Resource::bar(BarKind::Mem64, true, 1 << 20);
        assert!(window_shortfalls(closed, &[small, small]).is_empty());
        let why = window_shortfalls(closed, &[small, small, small]);
        assert!(why.len() == 1 && why[0].starts_with("mem:"), "{why:?}");
        // An I/O BAR with the I/O window closed.
        let io = Resource::bar(BarKind::Io, false, 32);
        assert_eq!(window_shortfalls(closed, &[io]), ["io: the window is closed, the device needs 32 B"]);
        // A bogus window from a caller never panics.
        let odd = LiveBridge { mem: Some(LiveWindow::new(10, 5)), ..closed.clone() };
        assert_eq!(odd.mem.map(|w| w.size()), Some(1));
        let _ = window_shortfalls(&odd, &[small]);
    }

    /// Sizes from a caller that add past 2^64 (two BARs of 2^63 bytes, with the window
    /// closed or open) are reported, never wrapped or a panic.
    #[test]
    fn huge_needs_do_not_overflow() {
        let huge = Resource::bar(BarKind::Mem64, true, 1 << 63);
        let closed = &bridges(&bridge_reply((1, 0)))[0];
        let why = window_shortfalls(closed, &[huge, huge]);
        assert_eq!(why.len(), 1);
        assert!(why[0].starts_with("mem:") && why[0].contains("2 BAR(s) of 16 EiB"), "{why:?}");
        let open = &bridges(&bridge_reply((1 << 32, (1 << 40) - 1)))[0];
        let why = window_shortfalls(open, &[huge, huge, huge]);
        assert!(why.len() == 1 && why[0].starts_with("pref:") && why[0].contains("of 24 EiB"), "{why:?}");
    }

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
        assert_eq!(n0.address, Bdf::new(0, 1, 0, 0).unwrap());
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

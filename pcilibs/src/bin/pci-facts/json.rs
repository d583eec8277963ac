//! `--json`: one object per function, the fields of `pcilibs::facts::FunctionFacts` plus what the
//! decoder and sysfs add. The conformance checks read `bdf`, `bars`, `capabilities`,
//! `extended_capabilities` and `sriov`; keep those as they are.

use pcilibs::bar::BarKind;
use pcilibs::caps;
use pcilibs::decode::Function;
use pcilibs::ecaps;
use serde_json::{json, Value};

use super::Entry;

/// Offset of BAR 0 in configuration space.
const BAR0: usize = 0x10;

/// The entries as a pretty-printed JSON array.
pub(crate) fn render(entries: &[Entry]) -> String {
    let list: Vec<Value> = entries.iter().map(to_json).collect();
    let mut out = serde_json::to_string_pretty(&list).unwrap_or_else(|e| format!("\"{e}\""));
    out.push('\n');
    out
}

fn to_json(e: &Entry) -> Value {
    let (f, facts) = match &e.result {
        Ok(v) => v,
        Err(msg) => return json!({ "bdf": e.bdf, "error": msg }),
    };
    let mut v = serde_json::to_value(facts).unwrap_or_else(|_| json!({ "bdf": e.bdf }));
    let caps: Vec<Value> = f
        .capabilities
        .iter()
        .map(|c| json!({ "id": c.id, "offset": c.offset, "name": caps::name(c.id) }))
        .collect();
    let ecaps: Vec<Value> = f
        .extended_capabilities
        .iter()
        .map(|c| json!({ "id": c.id, "offset": c.offset, "version": c.version, "name": ecaps::name(c.id) }))
        .collect();
    if let Some(obj) = v.as_object_mut() {
        if e.from_dump {
            if let Some(Value::Array(bars)) = obj.get_mut("bars") {
                bars.extend(lspci_upper_halves(f, &e.config));
            }
        }
        if let Some(Value::Object(host)) = &e.host {
            obj.extend(host.clone());
        }
        obj.insert("capabilities".into(), Value::Array(caps));
        obj.insert("extended_capabilities".into(), Value::Array(ecaps));
        obj.insert("config_bytes".into(), json!(f.config_len));
        obj.insert("source".into(), json!(if e.from_dump { "dump" } else { "sysfs" }));
        if let Some(d) = &e.description {
            obj.insert("description".into(), json!(d));
        }
        if let Some(br) = &f.header.bridge {
            obj.insert("bridge".into(), serde_json::to_value(br).unwrap_or(Value::Null));
        }
        if let Some(r) = f.qemu_resource_reserve() {
            obj.insert("qemu_resource_reserve".into(), serde_json::to_value(r).unwrap_or(Value::Null));
        }
        if let Some(p) = f.pcie() {
            obj.insert("pcie".into(), serde_json::to_value(p).unwrap_or(Value::Null));
        }
    }
    v
}

/// `lspci` (3.9) reading a dump shows the upper register of a 64-bit BAR as a region of
/// its own when it is not zero, decoding its bits as if it were a BAR. Those regions are
/// listed too, marked with `lspci_upper_half_of` (the slot of the real BAR), so the output
/// can be compared with `lspci -F`; they are not BARs.
fn lspci_upper_halves(f: &Function, config: &[u8]) -> Vec<Value> {
    let cs = pcilibs::config::ConfigSpace::new(config);
    let mut out = Vec::new();
    for b in f.bars.bars.iter().filter(|b| b.kind == BarKind::Mem64) {
        let upper = b.index + 1;
        let Some(raw) = cs.u32(BAR0 + usize::from(upper) * 4) else { continue };
        if raw == 0 || raw == u32::MAX {
            continue;
        }
        let (kind, prefetchable) = if raw & 1 == 1 {
            ("io", false)
        } else {
            (if (raw >> 1) & 3 == 2 { "mem64" } else { "mem32" }, raw & 8 != 0)
        };
        out.push(json!({
            "index": upper,
            "kind": kind,
            "prefetchable": prefetchable,
            "size": null,
            "lspci_upper_half_of": b.index,
        }));
    }
    out
}

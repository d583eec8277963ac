//! Plan file versions: what each version changed, and how an older file is brought up
//! to the current form before it is read.
//!
//! - Version 1: the first.
//! - Version 2: every expected BAR (and each resource of a spare port's profile) carries
//!   its BAR index and role. A version 1 file reads as BARs of unknown index that are all
//!   BARs, which serde's defaults give without any rewriting.
//! - Version 3: guest addresses are `pcilibs` addresses in their text form
//!   (`"bdf": "0000:02:00.0"`, where version 2 wrote
//!   `{"segment": 0, "bus": 2, "devfn": {"slot": 0, "function": 0}}`), and a host
//!   function is `{"pci": "0000:01:00.0"}` (version 2: `{"bdf": "0000:01:00.0"}`, any
//!   text). The platform says how devices get their addresses (`addressing`); an s390x
//!   plan of an older version gets the zPCI addressing the s390x crate used (first device
//!   number 0x100), any other the PCIe ports it had. [`upgrade`] rewrites those members
//!   of an older file; everything else reads as it is.

use pcilibs::bdf::Bdf;
use serde_json::{Map, Value};

use crate::error::PlanError;

/// Format version of [`crate::Plan`]; bumped on any incompatible change (see the module
/// docs for what each version changed).
pub const PLAN_VERSION: u32 = 3;

/// Oldest format version [`crate::Plan::from_json`] still reads.
pub const PLAN_VERSION_OLDEST: u32 = 1;

/// Rewrites the members of a plan of version `found` (older than [`PLAN_VERSION`]) that
/// changed form, so that it reads as the current version.
pub(crate) fn upgrade(plan: &mut Value, found: u32) -> Result<(), PlanError> {
    if found < 3 {
        addresses_as_text(plan)?;
        s390x_addressing(plan);
    }
    Ok(())
}

/// Version 3: the platform says how devices get addresses; before, an s390x plan was
/// made by the s390x crate's own planner, with its first device number 0x100.
fn s390x_addressing(plan: &mut Value) {
    let Some(spec) = plan.get_mut("platform").and_then(Value::as_object_mut) else { return };
    if spec.get("arch").and_then(Value::as_str) == Some("s390x") && !spec.contains_key("addressing") {
        spec.insert("addressing".into(), serde_json::json!({"kind": "zpci", "first_devno": 0x100}));
    }
}

/// Version 3: guest addresses and host functions as `pcilibs` address text.
fn addresses_as_text(plan: &mut Value) -> Result<(), PlanError> {
    for list in ["ports", "bridges"] {
        for item in members(plan.get_mut(list)) {
            if let Some(bdf) = item.get_mut("bdf") {
                *bdf = struct_bdf_as_text(bdf)?;
            }
        }
    }
    for device in members(plan.get_mut("devices")) {
        for function in members(device.get_mut("functions")) {
            if let Some(bdf) = function.get_mut("location").and_then(|l| l.get_mut("bdf")) {
                *bdf = struct_bdf_as_text(bdf)?;
            }
            if let Some(host) = function.get_mut("host") {
                upgrade_host_ref(host)?;
            }
        }
    }
    Ok(())
}

/// The objects of an array member; nothing when it is missing or not an array of objects
/// (serde then says what is wrong).
fn members(v: Option<&mut Value>) -> impl Iterator<Item = &mut Map<String, Value>> {
    v.and_then(Value::as_array_mut).into_iter().flat_map(|a| a.iter_mut()).filter_map(Value::as_object_mut)
}

/// `{"segment": s, "bus": b, "devfn": {"slot": d, "function": f}}` as `"ssss:bb:dd.f"`.
fn struct_bdf_as_text(v: &Value) -> Result<Value, PlanError> {
    let bad = || PlanError::Json(format!("a version 2 guest address is not segment, bus and devfn: {v}"));
    let num = |v: Option<&Value>| v.and_then(Value::as_u64).ok_or_else(bad);
    let devfn = v.get("devfn").ok_or_else(bad)?;
    let domain = u32::try_from(num(v.get("segment"))?).map_err(|_| bad())?;
    let bus = u8::try_from(num(v.get("bus"))?).map_err(|_| bad())?;
    let slot = u8::try_from(num(devfn.get("slot"))?).map_err(|_| bad())?;
    let function = u8::try_from(num(devfn.get("function"))?).map_err(|_| bad())?;
    let bdf = Bdf::new(domain, bus, slot, function).map_err(|e| PlanError::Json(e.to_string()))?;
    Ok(Value::String(bdf.to_string()))
}

/// `{"bdf": "text"}` as `{"pci": "dddd:bb:dd.f"}`: the text is read as a full or short
/// (`bb:dd.f`) address, as version 2 accepted any; a sysfs path stays as it is.
fn upgrade_host_ref(host: &mut Value) -> Result<(), PlanError> {
    let Some(map) = host.as_object_mut() else { return Ok(()) };
    let Some(text) = map.remove("bdf") else { return Ok(()) };
    let bad = || PlanError::Json(format!("a version 2 host function is not a PCI address: {text}"));
    let bdf = text.as_str().ok_or_else(bad).and_then(|t| Bdf::parse_any(t).map_err(|_| bad()))?;
    map.insert("pci".into(), Value::String(bdf.to_string()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_2_addresses_become_text() {
        let mut plan = json!({
            "ports": [{"bdf": {"segment": 0, "bus": 1, "devfn": {"slot": 2, "function": 3}}}],
            "bridges": [{"bdf": {"segment": 0, "bus": 0, "devfn": {"slot": 4, "function": 0}}}],
            "devices": [{"functions": [
                {"location": {"bus": "pci", "bdf": {"segment": 0, "bus": 5, "devfn": {"slot": 0, "function": 1}},
                              "path": "02/00.1"},
                 "host": {"bdf": "01:00.1"}},
                {"location": {"bus": "ccw", "busid": "0.0.0100"}, "host": {"sysfsdev": "/sys/x"}},
                {"location": {"bus": "zpci", "uid": 1, "fid": 0,
                              "bdf": {"segment": 1, "bus": 0, "devfn": {"slot": 0, "function": 0}}}}
            ]}]
        });
        upgrade(&mut plan, 2).unwrap();
        assert_eq!(plan["ports"][0]["bdf"], "0000:01:02.3");
        assert_eq!(plan["bridges"][0]["bdf"], "0000:00:04.0");
        let f = &plan["devices"][0]["functions"];
        assert_eq!(f[0]["location"]["bdf"], "0000:05:00.1");
        assert_eq!(f[0]["host"], json!({"pci": "0000:01:00.1"}));
        assert_eq!(f[1]["host"], json!({"sysfsdev": "/sys/x"}));
        assert_eq!(f[2]["location"]["bdf"], "0001:00:00.0");
    }

    #[test]
    fn broken_version_2_addresses_are_errors() {
        for bad in [
            json!({"ports": [{"bdf": {"segment": 0, "bus": 1, "devfn": {"slot": 40, "function": 0}}}]}),
            json!({"ports": [{"bdf": {"segment": 0, "bus": 256, "devfn": {"slot": 0, "function": 0}}}]}),
            json!({"ports": [{"bdf": "0000:00:01.0"}]}),
            json!({"devices": [{"functions": [{"host": {"bdf": "../../etc"}}]}]}),
        ] {
            let mut v = bad.clone();
            assert!(matches!(upgrade(&mut v, 2), Err(PlanError::Json(_))), "{bad}");
        }
    }
}

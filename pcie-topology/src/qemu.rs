//! QEMU device and object descriptions: command-line arguments and QMP argument objects.
//!
//! One [`QemuDevice`] renders both as `-device driver,id=…,bus=…` (boot time) and as the
//! argument object of QMP `device_add` (hotplug), so both paths name the same properties.

use std::collections::BTreeMap;
use std::fmt;

use pcilibs::bdf::Bdf;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// Errors about QEMU names and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum QemuError {
    /// A QEMU id must match `[A-Za-z][A-Za-z0-9._-]*`.
    #[error("`{0}` is not a valid QEMU id (must match [A-Za-z][A-Za-z0-9._-]*)")]
    BadId(String),
    /// Slot above 31 or function above 7.
    #[error("PCI address {slot:#x}.{function} is out of range (slot 0..=0x1f, function 0..=7)")]
    BadDevFn {
        /// Requested slot.
        slot: u8,
        /// Requested function.
        function: u8,
    },
}

/// A validated QEMU id (`[A-Za-z][A-Za-z0-9._-]*`), the name QMP and `bus=` use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QemuId(String);

impl QemuId {
    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, QemuError> {
        let id = id.into();
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if first_ok && rest_ok {
            Ok(QemuId(id))
        } else {
            Err(QemuError::BadId(id))
        }
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QemuId {
    type Error = QemuError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        QemuId::new(s)
    }
}

impl From<QemuId> for String {
    fn from(id: QemuId) -> String {
        id.0
    }
}

impl fmt::Display for QemuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device/function number on one bus (`addr=0x2.0x1`). Built by [`DevFn::new`] only
/// (JSON included), so no `DevFn` holds slot 40 or function 9.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "DevFnFields")]
pub struct DevFn {
    slot: u8,
    function: u8,
}

/// A [`DevFn`] as JSON has it, before [`DevFn::new`] checks it.
#[derive(Deserialize)]
struct DevFnFields {
    slot: u8,
    function: u8,
}

impl TryFrom<DevFnFields> for DevFn {
    type Error = QemuError;
    fn try_from(f: DevFnFields) -> Result<Self, QemuError> {
        DevFn::new(f.slot, f.function)
    }
}

impl From<Bdf> for DevFn {
    /// The slot and function of a PCI address.
    fn from(bdf: Bdf) -> Self {
        DevFn { slot: bdf.device(), function: bdf.function() }
    }
}

impl DevFn {
    /// A checked slot/function pair.
    pub fn new(slot: u8, function: u8) -> Result<Self, QemuError> {
        if slot > 0x1f || function > 7 {
            return Err(QemuError::BadDevFn { slot, function });
        }
        Ok(DevFn { slot, function })
    }

    /// Slot (device number), 0..=0x1f.
    pub fn slot(self) -> u8 {
        self.slot
    }

    /// Function, 0..=7.
    pub fn function(self) -> u8 {
        self.function
    }

    /// The function at this slot and function on bus `bus` of PCI domain `domain`.
    pub fn on_bus(self, domain: u32, bus: u8) -> Bdf {
        // Both ranges were checked by `DevFn::new`, which checks what `Bdf::new` does.
        Bdf::new(domain, bus, self.slot, self.function).unwrap_or_default()
    }

    /// The 8-bit devfn (`slot << 3 | function`).
    pub fn raw(self) -> u8 {
        (self.slot << 3) | (self.function & 7)
    }

    /// QEMU's `addr` text: `0x2.0x1` (function 0 written as `0x2.0x0`).
    pub fn qemu_addr(self) -> String {
        format!("{:#x}.{:#x}", self.slot, self.function)
    }
}

/// A property value of a device or object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum PropValue {
    /// A boolean (`on`/`off` on the command line).
    Bool(bool),
    /// An unsigned number (sizes in bytes, chassis, slot, bus numbers).
    Int(u64),
    /// A negative number (`bootindex=-1`); JSON's non-negative numbers read as
    /// [`PropValue::Int`].
    Signed(i64),
    /// Text.
    Str(String),
}

impl PropValue {
    fn cli(&self) -> String {
        match self {
            PropValue::Bool(true) => "on".into(),
            PropValue::Bool(false) => "off".into(),
            PropValue::Int(n) => n.to_string(),
            PropValue::Signed(n) => n.to_string(),
            PropValue::Str(s) => s.replace(',', ",,"),
        }
    }

    /// The value in QMP arguments.
    pub fn to_qmp(&self) -> Value {
        match self {
            PropValue::Bool(b) => Value::Bool(*b),
            PropValue::Int(n) => Value::from(*n),
            PropValue::Signed(n) => Value::from(*n),
            PropValue::Str(s) => Value::String(s.clone()),
        }
    }
}

impl From<&str> for PropValue {
    fn from(s: &str) -> Self {
        PropValue::Str(s.to_string())
    }
}
impl From<String> for PropValue {
    fn from(s: String) -> Self {
        PropValue::Str(s)
    }
}
impl From<u64> for PropValue {
    fn from(n: u64) -> Self {
        PropValue::Int(n)
    }
}
impl From<i64> for PropValue {
    /// A non-negative value is a [`PropValue::Int`], so that each number has one form.
    fn from(n: i64) -> Self {
        u64::try_from(n).map_or(PropValue::Signed(n), PropValue::Int)
    }
}
impl From<bool> for PropValue {
    fn from(b: bool) -> Self {
        PropValue::Bool(b)
    }
}

/// One `-device` / `device_add`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QemuDevice {
    /// QEMU driver (`pcie-root-port`, `vfio-pci`, …).
    pub driver: String,
    /// Device id.
    pub id: QemuId,
    /// Parent bus id (`pcie.0`, a port id); `None` where the machine picks it (s390x ccw, ap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// Address on the parent bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<DevFn>,
    /// `multifunction=on` (set on function 0 of a multi-function device).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multifunction: bool,
    /// Other properties, sorted by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub props: BTreeMap<String, PropValue>,
}

impl QemuDevice {
    /// A device with no bus, address or properties yet.
    pub fn new(driver: impl Into<String>, id: QemuId) -> Self {
        QemuDevice {
            driver: driver.into(),
            id,
            bus: None,
            addr: None,
            multifunction: false,
            props: BTreeMap::new(),
        }
    }

    /// Adds or replaces a property.
    pub fn prop(mut self, key: &str, value: impl Into<PropValue>) -> Self {
        self.props.insert(key.to_string(), value.into());
        self
    }

    /// The `-device` value: `driver,id=…,bus=…,addr=…,multifunction=on,key=value…`.
    pub fn to_arg(&self) -> String {
        let mut out = format!("{},id={}", self.driver, self.id);
        if let Some(bus) = &self.bus {
            out.push_str(&format!(",bus={}", bus.replace(',', ",,")));
        }
        if let Some(addr) = self.addr {
            out.push_str(&format!(",addr={}", addr.qemu_addr()));
        }
        if self.multifunction {
            out.push_str(",multifunction=on");
        }
        for (k, v) in &self.props {
            out.push_str(&format!(",{k}={}", v.cli()));
        }
        out
    }

    /// The QMP `device_add` argument object (`driver`, `id`, `bus`, `addr`, `multifunction`, properties).
    pub fn to_qmp(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("driver".into(), Value::String(self.driver.clone()));
        m.insert("id".into(), Value::String(self.id.to_string()));
        if let Some(bus) = &self.bus {
            m.insert("bus".into(), Value::String(bus.clone()));
        }
        if let Some(addr) = self.addr {
            m.insert("addr".into(), Value::String(addr.qemu_addr()));
        }
        if self.multifunction {
            m.insert("multifunction".into(), Value::Bool(true));
        }
        for (k, v) in &self.props {
            m.insert(k.clone(), v.to_qmp());
        }
        m
    }
}

/// One `-object` / `object-add` (memory backends for stand-in and placeholder devices, iommufd).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QemuObject {
    /// QOM type (`memory-backend-ram`, `iommufd`).
    pub qom_type: String,
    /// Object id.
    pub id: QemuId,
    /// Properties, sorted by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub props: BTreeMap<String, PropValue>,
}

impl QemuObject {
    /// An object with no properties yet.
    pub fn new(qom_type: impl Into<String>, id: QemuId) -> Self {
        QemuObject { qom_type: qom_type.into(), id, props: BTreeMap::new() }
    }

    /// Adds or replaces a property.
    pub fn prop(mut self, key: &str, value: impl Into<PropValue>) -> Self {
        self.props.insert(key.to_string(), value.into());
        self
    }

    /// A RAM backend that reserves no host memory: a large BAR that costs nothing.
    pub fn unbacked_ram(id: QemuId, size: u64) -> Self {
        QemuObject::new("memory-backend-ram", id).prop("size", size).prop("reserve", false)
    }

    /// The `-object` value.
    pub fn to_arg(&self) -> String {
        let mut out = format!("{},id={}", self.qom_type, self.id);
        for (k, v) in &self.props {
            out.push_str(&format!(",{k}={}", v.cli()));
        }
        out
    }

    /// The QMP `object-add` argument object (`qom-type`, `id`, properties).
    pub fn to_qmp(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("qom-type".into(), Value::String(self.qom_type.clone()));
        m.insert("id".into(), Value::String(self.id.to_string()));
        for (k, v) in &self.props {
            m.insert(k.clone(), v.to_qmp());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(QemuId::new("rp0").is_ok());
        assert!(QemuId::new("gpu-0.fn_1").is_ok());
        assert!(QemuId::new("0rp").is_err());
        assert!(QemuId::new("").is_err());
        assert!(QemuId::new("a,b").is_err());
        assert!(serde_json::from_str::<QemuId>("\"9x\"").is_err());
    }

    #[test]
    fn renders_cli_and_qmp() {
        let mut d = QemuDevice::new("pcie-root-port", QemuId::new("rp1").unwrap())
            .prop("chassis", 1u64)
            .prop("pref64-reserve", 256u64 << 30)
            .prop("romfile", "/a,b");
        d.bus = Some("pcie.0".into());
        d.addr = Some(DevFn::new(2, 1).unwrap());
        d.multifunction = true;
        assert_eq!(
            d.to_arg(),
            "pcie-root-port,id=rp1,bus=pcie.0,addr=0x2.0x1,multifunction=on,chassis=1,pref64-reserve=274877906944,romfile=/a,,b"
        );
        let q = d.to_qmp();
        assert_eq!(q["addr"], "0x2.0x1");
        assert_eq!(q["multifunction"], true);
        assert_eq!(q["chassis"], 1);
        assert!(DevFn::new(32, 0).is_err());
    }

    /// Negative numbers read and render; non-negative ones are always `Int`.
    #[test]
    fn signed_values() {
        assert_eq!(serde_json::from_str::<PropValue>("-1").unwrap(), PropValue::Signed(-1));
        assert_eq!(serde_json::from_str::<PropValue>("7").unwrap(), PropValue::Int(7));
        assert_eq!(PropValue::from(-1i64).to_qmp(), serde_json::json!(-1));
        assert_eq!(PropValue::from(3i64), PropValue::Int(3));
        let d = QemuDevice::new("virtio-blk-pci", QemuId::new("d0").unwrap()).prop("bootindex", -1i64);
        assert_eq!(d.to_arg(), "virtio-blk-pci,id=d0,bootindex=-1");
    }

    /// A plan file's devfn is checked when read: `raw()` of slot 40 shifted bits out.
    #[test]
    fn devfns_read_from_json_are_checked() {
        let ok: DevFn = serde_json::from_str(r#"{"slot":31,"function":7}"#).unwrap();
        assert_eq!(ok.raw(), 0xff);
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"slot":31,"function":7}"#);
        for bad in
            [r#"{"slot":32,"function":0}"#, r#"{"slot":0,"function":8}"#, r#"{"slot":255,"function":255}"#]
        {
            assert!(serde_json::from_str::<DevFn>(bad).is_err(), "{bad}");
        }
    }
}

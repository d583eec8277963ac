//! s390x for the `pcie-topology` planner: channel devices, vfio-ap and zPCI.
//!
//! s390x guests have no PCIe ports, so nothing here sizes windows. What must not collide
//! is addresses:
//!
//! - **CCW device numbers** `fe.<ssid>.<devno>` (subchannel set 0–3, device number
//!   0x0000–0xffff each) for `virtio-*-ccw` and `vfio-ccw` devices; the guest sees them on
//!   its ccw bus as `0.<ssid>.<devno>`. Numbers come from a free set per subchannel set
//!   and are reused once freed.
//! - **zPCI** functions (`vfio-pci`, `virtio-*-pci`): each gets a `zpci` device with a
//!   `uid` (1–0xffff) and `fid` from free sets and `target=` naming the PCI device; the
//!   guest's PCI domain is the uid (`0001:00:00.0` for uid 1).
//! - **vfio-ap** matrix devices have no guest address.
//!
//! [`plan`] builds a [`pcie_topology::Plan`] with these devices; [`place`] and
//! [`pcie_topology::Plan::release`] add and remove devices at run time, rebuilding the
//! free sets from the plan, so a number freed in the middle is handed out again.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use pcie_topology::alloc::FreeSet;
use pcie_topology::plan::{
    AddressReport, ExpectedBar, GuestLocation, PlacedDevice, PlacedFunction, PLAN_VERSION,
};
use pcie_topology::platform::{
    Arch, BusNumbering, ExtraArgs, Mmio64Aperture, Platform, PlatformSpec, Range, Totals, WindowRule,
};
use pcie_topology::qemu::{DevFn, PropValue};
use pcie_topology::request::RequestError;
use pcie_topology::{
    FunctionResource, GuestBdf, HostRef, HotplugAction, Mode, Plan, PlanError, PlanOptions, QemuDevice,
    QemuId,
};
use pcilibs::requirement::Requirement;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The channel subsystem QEMU's virtual devices live in (`fe`).
pub const VIRTUAL_CSSID: u8 = 0xfe;

/// Errors specific to s390x addresses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CcwError {
    /// A device number text is not `fe.<ssid>.<devno>` with ssid 0–3.
    #[error("`{0}` is not a CCW device number (fe.<0-3>.<0000-ffff>)")]
    BadDevno(String),
}

/// A CCW device number `fe.<ssid>.<devno>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Devno {
    /// Subchannel set, 0–3.
    pub ssid: u8,
    /// Device number.
    pub devno: u16,
}

impl Devno {
    /// QEMU's `devno=` form: `fe.0.0042`.
    pub fn qemu(&self) -> String {
        format!("{VIRTUAL_CSSID:x}.{}.{:04x}", self.ssid, self.devno)
    }

    /// The guest's ccw bus id: `0.0.0042`.
    pub fn guest_busid(&self) -> String {
        format!("0.{}.{:04x}", self.ssid, self.devno)
    }

    /// Parses `fe.<ssid>.<devno>`.
    pub fn parse(text: &str) -> Result<Devno, CcwError> {
        let bad = || CcwError::BadDevno(text.to_string());
        let mut parts = text.split('.');
        let (Some(css), Some(ssid), Some(devno), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if u8::from_str_radix(css, 16).map_err(|_| bad())? != VIRTUAL_CSSID {
            return Err(bad());
        }
        let ssid: u8 = ssid.parse().map_err(|_| bad())?;
        if ssid > 3 {
            return Err(bad());
        }
        Ok(Devno { ssid, devno: u16::from_str_radix(devno, 16).map_err(|_| bad())? })
    }
}

/// What to place on an s390x guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum S390xDevice {
    /// A channel device: `virtio-*-ccw` (driver and properties given) or `vfio-ccw`
    /// (`sysfsdev` in `host`).
    Ccw {
        /// QEMU id.
        id: QemuId,
        /// Driver (`virtio-net-ccw`, `virtio-blk-ccw`, `vfio-ccw`).
        driver: String,
        /// Other properties.
        #[serde(default)]
        props: BTreeMap<String, PropValue>,
        /// Host subchannel for `vfio-ccw`.
        #[serde(default)]
        host: Option<HostRef>,
        /// Subchannel set to allocate the device number in.
        #[serde(default)]
        ssid: u8,
    },
    /// A PCI function exposed through zPCI (`vfio-pci` or `virtio-*-pci`).
    Zpci {
        /// QEMU id of the PCI device.
        id: QemuId,
        /// Driver.
        driver: String,
        /// Other properties (e.g. `host`).
        #[serde(default)]
        props: BTreeMap<String, PropValue>,
        /// Host function for `vfio-pci`.
        #[serde(default)]
        host: Option<HostRef>,
        /// BARs, reported back as the function's expected BARs (with their indices where
        /// given: [`FunctionResource::bar`], [`FunctionResource::of_facts`]).
        #[serde(default)]
        resources: Vec<FunctionResource>,
    },
    /// A `vfio-ap` mediated matrix device.
    Ap {
        /// QEMU id.
        id: QemuId,
        /// Its sysfs path (`/sys/devices/vfio_ap/matrix/<uuid>`).
        sysfsdev: String,
    },
}

impl S390xDevice {
    /// A channel device of `driver` (e.g. `virtio-net-ccw`) with no other properties, its
    /// device number allocated in subchannel set 0.
    pub fn ccw(id: QemuId, driver: impl Into<String>) -> Self {
        S390xDevice::Ccw { id, driver: driver.into(), props: BTreeMap::new(), host: None, ssid: 0 }
    }

    /// A zPCI function of `driver` (e.g. `virtio-net-pci`) with no other properties, no
    /// host function and no expected BARs.
    pub fn zpci(id: QemuId, driver: impl Into<String>) -> Self {
        S390xDevice::Zpci {
            id,
            driver: driver.into(),
            props: BTreeMap::new(),
            host: None,
            resources: Vec::new(),
        }
    }

    fn id(&self) -> &QemuId {
        match self {
            S390xDevice::Ccw { id, .. } | S390xDevice::Zpci { id, .. } | S390xDevice::Ap { id, .. } => id,
        }
    }
}

/// Options of the s390x planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct S390xOptions {
    /// Lowest device number handed out (lower numbers are left to devices QEMU numbers
    /// itself, such as a boot disk without `devno`).
    pub first_devno: u16,
}

impl Default for S390xOptions {
    fn default() -> Self {
        S390xOptions { first_devno: 0x0100 }
    }
}

/// The `s390-ccw-virtio` machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct S390xCcw {
    /// Allocation options.
    pub options: S390xOptions,
}

impl Platform for S390xCcw {
    fn spec(&self) -> PlatformSpec {
        PlatformSpec {
            name: "s390x-ccw".to_string(),
            arch: Arch::S390x,
            machine: "s390-ccw-virtio".to_string(),
            firmware_args: Vec::new(),
            root_bus: String::new(),
            root_port: None,
            switch_upstream: None,
            switch_downstream: None,
            downstream_reserve: false,
            expander: None,
            pci_bridge: None,
            reserved_root_slots: Vec::new(),
            window_rule: WindowRule::NoWindows,
            bus_numbering: BusNumbering::None,
            mmio32: Range::default(),
            io: Range::default(),
            mmio64: Mmio64Aperture::None,
            mem32_placeholder: None,
            default_phys_bits: 64,
            low_ram_limit: u64::MAX,
        }
    }

    fn extra_args(&self, _totals: &Totals) -> ExtraArgs {
        ExtraArgs::default()
    }
}

/// Free sets rebuilt from a plan: device numbers per subchannel set, zPCI uids and fids;
/// and the QEMU ids the plan uses. Built once per [`plan`] or [`place`] call and kept up
/// to date while devices are added (rebuilding it per device made planning n devices
/// quadratic).
struct Numbers {
    devnos: Vec<FreeSet>,
    uids: FreeSet,
    fids: FreeSet,
    ids: BTreeSet<String>,
}

impl Numbers {
    fn of(plan: &Plan, options: &S390xOptions) -> Result<Numbers, PlanError> {
        let mut n = Numbers {
            devnos: (0..4)
                .map(|s| FreeSet::new(&format!("device number in subchannel set {s}"), 0, 0xffff))
                .collect(),
            uids: FreeSet::new("zPCI uid", 1, 0xffff),
            fids: FreeSet::new("zPCI fid", 0, u32::MAX - 1),
            ids: plan.ids_in_use().map(str::to_string).collect(),
        };
        for d in &plan.devices {
            for f in &d.functions {
                for dev in std::iter::once(&f.device).chain(f.companions.iter()) {
                    if let Some(PropValue::Str(t)) = dev.props.get("devno") {
                        if let Ok(dn) = Devno::parse(t) {
                            if let Some(set) = n.devnos.get_mut(usize::from(dn.ssid)) {
                                set.take(u32::from(dn.devno))?;
                            }
                        }
                    }
                    if let Some(PropValue::Int(uid)) = dev.props.get("uid") {
                        n.uids.take(u32::try_from(*uid).unwrap_or(u32::MAX))?;
                    }
                    if let Some(PropValue::Int(fid)) = dev.props.get("fid") {
                        n.fids.take(u32::try_from(*fid).unwrap_or(u32::MAX))?;
                    }
                }
            }
        }
        let _ = options;
        Ok(n)
    }
}

/// An empty s390x plan.
pub fn empty_plan(platform: &S390xCcw) -> Plan {
    Plan {
        version: PLAN_VERSION,
        platform: platform.spec(),
        mode: Mode::RootPort,
        options: PlanOptions::default(),
        host_bridges: Vec::new(),
        switches: Vec::new(),
        bridges: Vec::new(),
        ports: Vec::new(),
        devices: Vec::new(),
        address: AddressReport { phys_bits_needed: 0, ..AddressReport::default() },
        extra: ExtraArgs::default(),
    }
}

/// Plans `devices` (all plugged at boot when `cold_plug`, else kept for hotplug).
pub fn plan(platform: &S390xCcw, devices: &[S390xDevice], cold_plug: bool) -> Result<Plan, PlanError> {
    let mut plan = empty_plan(platform);
    let mut numbers = Numbers::of(&plan, &platform.options)?;
    for d in devices {
        add(&mut plan, platform, &mut numbers, d.clone(), cold_plug)?;
    }
    Ok(plan)
}

/// Adds a device to a plan at run time and returns its hotplug action.
pub fn place(plan: &mut Plan, platform: &S390xCcw, device: S390xDevice) -> Result<HotplugAction, PlanError> {
    let id = device.id().to_string();
    let mut numbers = Numbers::of(plan, &platform.options)?;
    add(plan, platform, &mut numbers, device, false)?;
    plan.hotplug_action(&id)
}

fn add(
    plan: &mut Plan,
    platform: &S390xCcw,
    numbers: &mut Numbers,
    device: S390xDevice,
    cold_plug: bool,
) -> Result<(), PlanError> {
    let id = device.id().clone();
    let zpci_id = format!("zpci-{id}");
    if numbers.ids.contains(id.as_str()) || numbers.ids.contains(&zpci_id) {
        return Err(PlanError::DuplicateId(id.to_string()));
    }
    let (function, need) = match device {
        S390xDevice::Ccw { id, driver, props, host, ssid } => {
            let set = numbers
                .devnos
                .get_mut(usize::from(ssid.min(3)))
                .ok_or(PlanError::UnknownDevice(id.to_string()))?;
            let devno = Devno {
                ssid: ssid.min(3),
                devno: set.alloc_from(u32::from(platform.options.first_devno))? as u16,
            };
            let mut dev = QemuDevice::new(driver, id);
            dev.props = props;
            if let Some(HostRef::Sysfsdev(path)) = &host {
                dev = dev.prop("sysfsdev", path.clone());
            }
            dev = dev.prop("devno", devno.qemu());
            let location = GuestLocation::Ccw { busid: devno.guest_busid() };
            (
                PlacedFunction {
                    function: 0,
                    device: dev,
                    companions: Vec::new(),
                    location,
                    bars: Vec::new(),
                    host,
                },
                Requirement::default(),
            )
        }
        S390xDevice::Zpci { id, driver, props, host, resources } => {
            let uid = numbers.uids.alloc()? as u16;
            let fid = numbers.fids.alloc()?;
            let mut dev = QemuDevice::new(driver, id.clone());
            dev.props = props;
            if let Some(HostRef::Bdf(bdf)) = &host {
                dev = dev.prop("host", bdf.clone());
            }
            let zpci = QemuDevice::new("zpci", QemuId::new(format!("zpci-{id}"))?)
                .prop("uid", u64::from(uid))
                .prop("fid", u64::from(fid))
                .prop("target", id.to_string());
            let bdf = GuestBdf { segment: uid, bus: 0, devfn: DevFn::new(0, 0)? };
            let need = Requirement::of(resources.iter().map(|r| &r.resource))
                .map_err(|source| RequestError::Requirement { device: id.to_string(), source })?;
            let location = GuestLocation::Zpci { uid, fid, bdf };
            let bars = resources.iter().map(ExpectedBar::from).collect();
            (PlacedFunction { function: 0, device: dev, companions: vec![zpci], location, bars, host }, need)
        }
        S390xDevice::Ap { id, sysfsdev } => {
            let dev = QemuDevice::new("vfio-ap", id).prop("sysfsdev", sysfsdev.clone());
            let host = Some(HostRef::Sysfsdev(sysfsdev));
            (
                PlacedFunction {
                    function: 0,
                    device: dev,
                    companions: Vec::new(),
                    location: GuestLocation::Ap,
                    bars: Vec::new(),
                    host,
                },
                Requirement::default(),
            )
        }
    };
    numbers.ids.extend(
        std::iter::once(&function.device).chain(function.companions.iter()).map(|d| d.id.to_string()),
    );
    plan.devices.push(PlacedDevice {
        id,
        port: None,
        cold_plug,
        iommu_group: None,
        p2p_group: None,
        objects: Vec::new(),
        functions: vec![function],
        need,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(id: &str) -> S390xDevice {
        S390xDevice::ccw(QemuId::new(id).unwrap(), "virtio-net-ccw")
    }

    #[test]
    fn devnos_are_reused() {
        let p = S390xCcw::default();
        let mut plan = plan(&p, &[net("n0"), net("n1"), net("n2")], false).unwrap();
        let devno =
            |plan: &Plan, id: &str| plan.device(id).unwrap().functions[0].device.props["devno"].clone();
        assert_eq!(devno(&plan, "n1"), PropValue::Str("fe.0.0101".into()));
        plan.release("n1").unwrap();
        let a = place(&mut plan, &p, net("n3")).unwrap();
        assert_eq!(a.functions[0].device_add["devno"], "fe.0.0101");
        assert_eq!(a.functions[0].guest, GuestLocation::Ccw { busid: "0.0.0101".into() });
        assert!(matches!(place(&mut plan, &p, net("n3")), Err(PlanError::DuplicateId(_))));
    }

    #[test]
    fn zpci_gets_uid_fid_and_domain() {
        let p = S390xCcw::default();
        let d = S390xDevice::zpci(QemuId::new("nic0").unwrap(), "virtio-net-pci");
        let mut plan = plan(&p, &[], false).unwrap();
        let a = place(&mut plan, &p, d).unwrap();
        let f = &a.functions[0];
        assert_eq!(f.companions[0]["driver"], "zpci");
        assert_eq!(f.companions[0]["uid"], 1);
        assert_eq!(f.companions[0]["target"], "nic0");
        assert_eq!(f.guest.bdf().unwrap().to_string(), "0001:00:00.0");
        assert_eq!(a.unplug.iter().map(QemuId::as_str).collect::<Vec<_>>(), ["nic0", "zpci-nic0"]);
    }

    #[test]
    fn devno_text() {
        assert_eq!(Devno::parse("fe.0.0042").unwrap(), Devno { ssid: 0, devno: 0x42 });
        assert!(Devno::parse("fe.4.0042").is_err());
        assert!(Devno::parse("0.0.0042").is_err());
        assert_eq!(Devno { ssid: 1, devno: 0xbeef }.guest_busid(), "0.1.beef");
    }
}

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! Addresses on a machine without a PCI topology ([`Addressing::Zpci`], s390x): nothing
//! sizes windows, what must not collide is numbers.
//!
//! - **Channel devices** ([`Attach::Channel`]: `virtio-*-ccw`, `vfio-ccw`) get a CCW
//!   device number `fe.<ssid>.<devno>` (`devno=`) from a free set per subchannel set,
//!   from the platform's first device number up; the guest sees them on its ccw bus as
//!   `0.<ssid>.<devno>`.
//! - **PCI functions** ([`Attach::Port`]: `vfio-pci`, `virtio-*-pci`) each get a `zpci`
//!   companion device `zpci-<id>` with a `uid` (1–0xffff) and a `fid` from free sets and
//!   `target=` naming the function; the guest's PCI domain is the uid (`0001:00:00.0`).
//! - **vfio-ap** devices ([`Attach::Ap`]) have no guest address.
//!
//! The free sets are rebuilt from the plan on each call, so a number freed by
//! [`crate::Plan::release`] is handed out again; within one call they are kept up to date
//! while devices are added (rebuilding them per device made n devices quadratic).
//!
//! [`Addressing::Zpci`]: crate::platform::Addressing::Zpci

use std::collections::BTreeSet;

use pcilibs::requirement::Requirement;

use crate::alloc::FreeSet;
use crate::error::PlanError;
use crate::format::PLAN_VERSION;
use crate::plan::{
    request_ids, AddressReport, ExpectedBar, GuestLocation, Mode, PlacedDevice, PlacedFunction, Plan,
    PlanRequest,
};
use crate::platform::{ExtraArgs, PlatformSpec};
use crate::qemu::{DevFn, QemuDevice, QemuId};
use crate::request::{Attach, DeviceRequest, RequestError};

/// The channel subsystem QEMU's virtual devices live in (`fe`).
const VIRTUAL_CSSID: u8 = 0xfe;

/// Highest subchannel set id.
const MAX_SSID: u8 = 3;

/// A CCW device number `fe.<ssid>.<devno>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Devno {
    ssid: u8,
    devno: u16,
}

impl Devno {
    /// QEMU's `devno=` form: `fe.0.0042`.
    fn qemu(self) -> String {
        format!("{VIRTUAL_CSSID:x}.{}.{:04x}", self.ssid, self.devno)
    }

    /// The guest's ccw bus id: `0.0.0042`.
    fn guest_busid(self) -> String {
        format!("0.{}.{:04x}", self.ssid, self.devno)
    }

    /// Reads a guest bus id `0.<ssid>.<devno>` back (as [`Devno::guest_busid`] writes it).
    fn parse_busid(text: &str) -> Option<Devno> {
        let mut parts = text.split('.');
        let (Some("0"), Some(ssid), Some(devno), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let ssid: u8 = ssid.parse().ok().filter(|s| *s <= MAX_SSID)?;
        Some(Devno { ssid, devno: u16::from_str_radix(devno, 16).ok()? })
    }
}

/// Free sets rebuilt from a plan: device numbers per subchannel set, zPCI uids and fids,
/// and the QEMU ids the plan uses.
struct Numbers {
    first_devno: u16,
    devnos: Vec<FreeSet>,
    uids: FreeSet,
    fids: FreeSet,
    ids: BTreeSet<String>,
}

impl Numbers {
    fn of(plan: &Plan, first_devno: u16) -> Result<Numbers, PlanError> {
        let mut n = Numbers {
            first_devno,
            devnos: (0..=MAX_SSID)
                .map(|s| FreeSet::new(&format!("device number in subchannel set {s}"), 0, 0xffff))
                .collect(),
            uids: FreeSet::new("zPCI uid", 1, 0xffff),
            fids: FreeSet::new("zPCI fid", 0, u32::MAX - 1),
            ids: plan.ids_in_use().map(str::to_string).collect(),
        };
        for f in plan.devices.iter().flat_map(|d| d.functions.iter()) {
            match &f.location {
                GuestLocation::Ccw { busid } => {
                    let Some(dn) = Devno::parse_busid(busid) else {
                        return Err(PlanError::Json(format!(
                            "`{busid}` is not a ccw bus id (0.<0-3>.<devno>)"
                        )));
                    };
                    if let Some(set) = n.devnos.get_mut(usize::from(dn.ssid)) {
                        set.take(u32::from(dn.devno))?;
                    }
                }
                GuestLocation::Zpci { uid, fid, .. } => {
                    n.uids.take(u32::from(*uid))?;
                    n.fids.take(*fid)?;
                }
                _ => {}
            }
        }
        Ok(n)
    }
}

/// Refuses what a machine without a PCI topology cannot do, before anything is built.
fn check_request(spec: &PlatformSpec, request: &PlanRequest) -> Result<(), PlanError> {
    let unsupported =
        |what: &str| PlanError::Unsupported { platform: spec.name.clone(), what: what.to_string() };
    if !request.spares.is_empty() {
        return Err(unsupported("spare ports (it has no ports: place devices at run time instead)"));
    }
    if request.mode == Mode::Numa {
        return Err(unsupported("pxb-pcie expanders (NUMA mode)"));
    }
    if request.mode == Mode::SwitchPort && request.devices.iter().any(|d| d.p2p_group.is_some()) {
        return Err(unsupported("PCIe switches"));
    }
    Ok(())
}

/// An s390x plan of `request`'s devices.
pub(super) fn plan(spec: PlatformSpec, request: &PlanRequest, first_devno: u16) -> Result<Plan, PlanError> {
    check_request(&spec, request)?;
    let mut plan = Plan {
        version: PLAN_VERSION,
        platform: spec,
        mode: request.mode,
        options: request.options.clone(),
        host_bridges: Vec::new(),
        switches: Vec::new(),
        bridges: Vec::new(),
        ports: Vec::new(),
        devices: Vec::new(),
        address: AddressReport::default(),
        extra: ExtraArgs::default(),
        foreign: Vec::new(),
        memory_hotplug: request.foreign.memory_hotplug,
    };
    let mut numbers = Numbers::of(&plan, first_devno)?;
    for d in &request.devices {
        add(&mut plan, &mut numbers, d)?;
    }
    Ok(plan)
}

/// Adds `request` to an s390x plan at run time.
pub(crate) fn place(plan: &mut Plan, request: &DeviceRequest, first_devno: u16) -> Result<(), PlanError> {
    let mut numbers = Numbers::of(plan, first_devno)?;
    add(plan, &mut numbers, request)
}

/// The QEMU id of the `zpci` device of PCI function `id`.
fn zpci_id(id: &QemuId) -> Result<QemuId, PlanError> {
    Ok(QemuId::new(format!("zpci-{id}"))?)
}

fn add(plan: &mut Plan, numbers: &mut Numbers, request: &DeviceRequest) -> Result<(), PlanError> {
    request.validate()?;
    let [f] = request.functions.as_slice() else {
        return Err(PlanError::Unsupported {
            platform: plan.platform.name.clone(),
            what: format!(
                "multi-function devices (`{}`: each function is a device of its own here)",
                request.id
            ),
        });
    };
    let mut ids: Vec<String> = request_ids(request).collect();
    if request.attach == Attach::Port {
        ids.push(zpci_id(&request.id)?.to_string());
    }
    if let Some(id) = ids.iter().find(|id| numbers.ids.contains(id.as_str())) {
        return Err(PlanError::DuplicateId(id.clone()));
    }
    let mut device = QemuDevice::new(f.driver.clone(), request.id.clone());
    device.props = f.props.clone();
    let no_bars = |what: &str| {
        if f.resources.is_empty() {
            Ok(())
        } else {
            Err(RequestError::Functions {
                device: request.id.to_string(),
                why: format!("{what} has no BARs, but resources were given"),
            })
        }
    };
    let (companions, location) = match request.attach {
        Attach::Channel { ssid } => {
            no_bars("a channel device")?;
            let set = numbers
                .devnos
                .get_mut(usize::from(ssid))
                .ok_or(RequestError::Ssid { device: request.id.to_string(), ssid })?;
            let devno = Devno { ssid, devno: set.alloc_from(u32::from(numbers.first_devno))? as u16 };
            device = device.prop("devno", devno.qemu());
            (Vec::new(), GuestLocation::Ccw { busid: devno.guest_busid() })
        }
        Attach::Port => {
            let uid = numbers.uids.alloc()? as u16;
            let fid = numbers.fids.alloc()?;
            let zpci = QemuDevice::new("zpci", zpci_id(&request.id)?)
                .prop("uid", u64::from(uid))
                .prop("fid", u64::from(fid))
                .prop("target", request.id.to_string());
            let bdf = DevFn::default().on_bus(u32::from(uid), 0);
            (vec![zpci], GuestLocation::Zpci { uid, fid, bdf })
        }
        Attach::Ap => {
            no_bars("a vfio-ap device")?;
            (Vec::new(), GuestLocation::Ap)
        }
        Attach::PciBridge => {
            return Err(PlanError::Unsupported {
                platform: plan.platform.name.clone(),
                what: "PCIe-to-PCI bridges".into(),
            })
        }
    };
    numbers.ids.extend(ids);
    let need = if request.attach == Attach::Port { request.requirement()? } else { Requirement::default() };
    plan.devices.push(PlacedDevice {
        id: request.id.clone(),
        port: None,
        cold_plug: request.cold_plug,
        iommu_group: request.iommu_group,
        p2p_group: request.p2p_group.clone(),
        objects: f.objects.clone(),
        functions: vec![PlacedFunction {
            function: 0,
            device,
            companions,
            location,
            bars: f.resources.iter().map(ExpectedBar::from).collect(),
            host: f.host.clone(),
        }],
        need,
        runtime_id: request.runtime_id.clone(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devno_text() {
        let d = Devno { ssid: 1, devno: 0xbeef };
        assert_eq!(d.qemu(), "fe.1.beef");
        assert_eq!(d.guest_busid(), "0.1.beef");
        assert_eq!(Devno::parse_busid("0.1.beef"), Some(d));
        for bad in ["0.4.0042", "1.0.0042", "0.0", "0.0.0042.1", "0.0.x"] {
            assert_eq!(Devno::parse_busid(bad), None, "{bad}");
        }
    }
}

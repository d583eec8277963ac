//! s390x for the `pcie-topology` planner: channel devices, vfio-ap and zPCI.
//!
//! s390x guests have no PCIe ports, so nothing sizes windows. What must not collide is
//! addresses, and [`S390xCcw`] says how they are handed out
//! ([`Addressing::Zpci`]); the planner is the same as on every other machine:
//! [`pcie_topology::plan()`] and [`pcie_topology::Plan::place`] /
//! [`pcie_topology::Plan::release`].
//!
//! - **CCW device numbers** `fe.<ssid>.<devno>` (subchannel set 0–3, device number
//!   0x0000–0xffff each) for `virtio-*-ccw` and `vfio-ccw` devices
//!   ([`DeviceRequest::channel`](pcie_topology::DeviceRequest::channel)); the guest sees
//!   them on its ccw bus as `0.<ssid>.<devno>`. Numbers come from a free set per
//!   subchannel set and are reused once freed.
//! - **zPCI** functions (`vfio-pci`, `virtio-*-pci`: any single-function device request):
//!   each gets a `zpci` device with a `uid` (1–0xffff) and `fid` from free sets and
//!   `target=` naming the PCI device; the guest's PCI domain is the uid (`0001:00:00.0`
//!   for uid 1).
//! - **vfio-ap** matrix devices
//!   ([`DeviceRequest::vfio_ap`](pcie_topology::DeviceRequest::vfio_ap)) have no guest
//!   address.

#![forbid(unsafe_code)]

use pcie_topology::platform::{Addressing, Arch, ExtraArgs, Platform, PlatformSpec, Totals};
use serde::{Deserialize, Serialize};

/// Options of the s390x machine's address allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
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

impl S390xOptions {
    /// Device numbers handed out from `first_devno` up.
    pub fn first_devno(first_devno: u16) -> Self {
        S390xOptions { first_devno }
    }
}

/// The `s390-ccw-virtio` machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct S390xCcw {
    /// Allocation options.
    pub options: S390xOptions,
}

impl S390xCcw {
    /// The machine with device numbers handed out as `options` say.
    pub fn with_options(options: S390xOptions) -> Self {
        S390xCcw { options }
    }
}

impl Platform for S390xCcw {
    fn spec(&self) -> PlatformSpec {
        // No PCI ports, bridges or windows: PlatformSpec::new's empty machine.
        let mut spec = PlatformSpec::new("s390x-ccw", Arch::S390x, "s390-ccw-virtio");
        spec.default_phys_bits = 64;
        spec.addressing = Addressing::Zpci { first_devno: self.options.first_devno };
        spec
    }

    fn extra_args(&self, _totals: &Totals) -> ExtraArgs {
        ExtraArgs::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcie_topology::plan::GuestLocation;
    use pcie_topology::qemu::PropValue;
    use pcie_topology::request::FunctionResource;
    use pcie_topology::{
        plan, DeviceRequest, HotplugProfile, Mode, PlanError, PlanRequest, QemuId, SpareRequest,
    };
    use pcilibs::bar::BarKind;

    fn id(text: &str) -> QemuId {
        QemuId::new(text).unwrap()
    }

    fn net(name: &str) -> DeviceRequest {
        DeviceRequest::channel(id(name), "virtio-net-ccw", 0)
    }

    fn request(devices: Vec<DeviceRequest>) -> PlanRequest {
        PlanRequest::default().with_devices(devices)
    }

    #[test]
    fn devnos_are_reused() {
        let p = S390xCcw::default();
        let mut plan = plan(&p, &request(vec![net("n0"), net("n1"), net("n2")])).unwrap();
        let devno = |plan: &pcie_topology::Plan, id: &str| {
            plan.device(id).unwrap().functions[0].device.props["devno"].clone()
        };
        assert_eq!(devno(&plan, "n1"), PropValue::Str("fe.0.0101".into()));
        plan.release("n1").unwrap();
        let a = plan.place(net("n3")).unwrap();
        assert_eq!(a.functions[0].device_add.props["devno"], PropValue::Str("fe.0.0101".into()));
        assert_eq!(a.functions[0].guest, GuestLocation::Ccw { busid: "0.0.0101".into() });
        assert!(matches!(plan.place(net("n3")), Err(PlanError::DuplicateId(_))));
        // Another subchannel set, another free set; from the platform's first number.
        let p = S390xCcw::with_options(S390xOptions::first_devno(0x42));
        let mut plan = pcie_topology::plan(&p, &request(vec![net("n0")])).unwrap();
        let a = plan.place(DeviceRequest::channel(id("n1"), "virtio-blk-ccw", 2)).unwrap();
        assert_eq!(a.functions[0].guest, GuestLocation::Ccw { busid: "0.2.0042".into() });
        assert_eq!(devno(&plan, "n0"), PropValue::Str("fe.0.0042".into()));
        let e = plan.place(DeviceRequest::channel(id("n2"), "virtio-blk-ccw", 4)).unwrap_err();
        assert!(e.to_string().contains("subchannel set 4"), "{e}");
    }

    #[test]
    fn zpci_gets_uid_fid_and_domain() {
        let p = S390xCcw::default();
        let mut plan = plan(&p, &request(vec![])).unwrap();
        let bar = FunctionResource::bar(0, BarKind::Mem64, false, 16 << 10);
        let nic = DeviceRequest::new(
            id("nic0"),
            vec![pcie_topology::FunctionRequest::new(0, "virtio-net-pci", vec![bar])],
        );
        let a = plan.place(nic).unwrap();
        let f = &a.functions[0];
        let zpci = f.companions[0].to_qmp();
        assert_eq!(zpci["driver"], "zpci");
        assert_eq!(zpci["uid"], 1);
        assert_eq!(zpci["target"], "nic0");
        assert_eq!(f.guest.bdf().unwrap().to_string(), "0001:00:00.0");
        assert_eq!(f.bars.len(), 1);
        assert_eq!(a.unplug.iter().map(QemuId::as_str).collect::<Vec<_>>(), ["nic0", "zpci-nic0"]);
        assert_eq!(a.port_or_device().as_str(), "nic0");
        // The companion's id is taken too.
        let clash = DeviceRequest::channel(id("zpci-nic0"), "virtio-net-ccw", 0);
        assert!(matches!(plan.place(clash), Err(PlanError::DuplicateId(_))));
    }

    #[test]
    fn vfio_ap_has_no_address() {
        let mut plan = plan(&S390xCcw::default(), &request(vec![])).unwrap();
        let path = "/sys/devices/vfio_ap/matrix/11111111-2222-3333-4444-555555555555";
        let a = plan.place(DeviceRequest::vfio_ap(id("ap0"), path)).unwrap();
        assert_eq!(a.functions[0].guest, GuestLocation::Ap);
        assert_eq!(a.functions[0].device_add.to_arg(), format!("vfio-ap,id=ap0,sysfsdev={path}"));
    }

    /// What has no meaning without ports is refused, not ignored.
    #[test]
    fn what_needs_ports_is_refused() {
        let p = S390xCcw::default();
        let spares = PlanRequest::default().with_spares(vec![SpareRequest::new(HotplugProfile::nic(), 1)]);
        let numa = PlanRequest::default().with_mode(Mode::Numa);
        for r in [spares, numa] {
            assert!(matches!(plan(&p, &r), Err(PlanError::Unsupported { .. })), "{r:?}");
        }
        let two = DeviceRequest::new(
            id("mf"),
            vec![
                pcie_topology::FunctionRequest::new(0, "virtio-net-pci", vec![]),
                pcie_topology::FunctionRequest::new(1, "virtio-net-pci", vec![]),
            ],
        );
        let e = plan(&p, &request(vec![two])).unwrap_err();
        assert!(e.to_string().contains("multi-function"), "{e}");
    }
}

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! The s390x plans, started in the real `qemu-system-s390x` and checked over QMP:
//! boot-time and hotplugged channel devices carry their planned device numbers, zPCI
//! functions their uid/fid and target.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use arch_s390x_ccw::S390xCcw;
use common::Qemu;
use pcie_topology::plan::GuestLocation;
use pcie_topology::{plan, DeviceRequest, FunctionRequest, PlanRequest, QemuId};
use serde_json::{json, Value};

fn ccw(id: &str) -> DeviceRequest {
    DeviceRequest::channel(QemuId::new(id).unwrap(), "virtio-net-ccw", 0)
}

fn zpci(id: &str) -> DeviceRequest {
    DeviceRequest::new(QemuId::new(id).unwrap(), vec![FunctionRequest::new(0, "virtio-net-pci", vec![])])
}

#[test]
fn ccw_and_zpci_plan_is_accepted_and_hotplugs() {
    let platform = S390xCcw::default();
    let devices = [ccw("net0"), zpci("nic0")].map(|mut d| {
        d.cold_plug = true;
        d
    });
    let mut plan = plan(&platform, &PlanRequest::default().with_devices(devices.to_vec())).unwrap();
    let mut args = plan.qemu_args();
    args.extend(["-S", "-m", "256", "-accel", "tcg"].map(String::from));
    let qemu = Qemu::start(&args);
    let peripherals = qemu.peripherals();
    for id in ["net0", "nic0", "zpci-nic0"] {
        assert!(peripherals.iter().any(|p| p == id), "{id} missing: {peripherals:?}");
    }
    assert_eq!(qemu.qom_get("net0", "devno"), json!("fe.0.0100"));
    assert_eq!(qemu.qom_get("zpci-nic0", "uid"), json!(1));
    assert_eq!(qemu.qom_get("zpci-nic0", "target"), json!("nic0"));

    for device in [ccw("net1"), zpci("nic1")] {
        let action = plan.place(device).unwrap();
        for f in &action.functions {
            for c in &f.companions {
                qemu.ok("device_add", Value::Object(c.to_qmp()));
            }
            qemu.ok("device_add", Value::Object(f.device_add.to_qmp()));
            match &f.guest {
                GuestLocation::Ccw { busid } => {
                    assert_eq!(busid, "0.0.0101");
                    assert_eq!(qemu.qom_get(f.id().as_str(), "devno"), json!("fe.0.0101"));
                }
                GuestLocation::Zpci { uid, fid, bdf } => {
                    assert_eq!((*uid, *fid), (2, 1));
                    assert_eq!(bdf.to_string(), "0002:00:00.0");
                    assert_eq!(qemu.qom_get(&format!("zpci-{}", f.id()), "fid"), json!(1));
                }
                other => panic!("unexpected location {other:?}"),
            }
        }
    }
    // A device number QEMU already holds is refused, so the plan's numbers are the real ones.
    let clash = json!({"driver": "virtio-net-ccw", "id": "dup", "devno": "fe.0.0100"});
    let err = qemu.execute("device_add", clash).unwrap_err();
    assert!(err.qmp_error().is_some(), "not QEMU's refusal: {err}");
}

//! Plan files: any text given to `Plan::from_json`, as a VMM reads its plan back after a
//! restart, and every method a VMM then calls on the plan. Promises checked: no panic; a
//! refused file is a typed error with a message; a plan that reads writes back as JSON
//! that reads as the same plan; boot arguments, explanations, hotplug actions (and the
//! engine's requests made from them), run-time placement and release end in a value or
//! a typed error, and a released device leaves its port free.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcie_topology::platform::Arch;
use pcie_topology::{DeviceRequest, FunctionRequest, HotplugProfile, Plan, QemuId};

/// Most devices placed on one plan (placement is linear in the ports).
const MAX_PLACED: usize = 4;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut plan = match Plan::from_json(text) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    round_trip(&plan);
    let _ = plan.qemu_args();
    let _ = plan.device_args();
    let _ = plan.kernel_args();
    let _ = plan.cpu_phys_bits();
    let _ = plan.explain();
    if let Err(e) = plan.window_layout() {
        assert!(!e.to_string().is_empty());
    }
    let _ = plan.ids_in_use().count();
    for d in plan.devices.iter().take(64) {
        match plan.hotplug_action(d.id.as_str()) {
            Ok(action) => {
                let request = qmp_hotplug::PlugRequest::from_action(&action);
                assert_eq!(&request.port, action.port_or_device());
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    if let Err(e) = plan.hotplug_actions() {
        assert!(!e.to_string().is_empty());
    }
    place_and_release(&mut plan);
});

/// Written back, the plan reads as itself.
fn round_trip(plan: &Plan) {
    let json = plan.to_json().expect("a plan that reads also writes");
    let again =
        Plan::from_json(&json).unwrap_or_else(|e| panic!("a written plan does not read back: {e}\n{json}"));
    assert_eq!(&again, plan);
}

/// Devices for the spare ports' profiles (and a plain one) placed, then released.
fn place_and_release(plan: &mut Plan) {
    let mut requests: Vec<DeviceRequest> = plan
        .ports
        .iter()
        .filter_map(|p| p.profile.as_ref())
        .take(MAX_PLACED - 1)
        .enumerate()
        .filter_map(|(i, prof)| profile_device(i, prof))
        .collect();
    requests.extend(DeviceRequest::ivshmem("fuzzhot9", 1 << 21).ok());
    if plan.platform.arch == Arch::S390x {
        requests
            .extend(QemuId::new("fuzzccw8").ok().map(|id| DeviceRequest::channel(id, "virtio-net-ccw", 0)));
    }
    for request in requests {
        let id = request.id.to_string();
        match plan.place(request) {
            Ok(action) => {
                let _ = qmp_hotplug::PlugRequest::from_action(&action);
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                continue;
            }
        }
        let placed = plan.release(&id).unwrap_or_else(|e| panic!("{id}: placed but not released: {e}"));
        if let Some(port) = placed.port.as_ref().and_then(|p| plan.port(p.as_str())) {
            assert!(port.occupant.as_ref().is_none_or(|o| o.as_str() != id), "{id} still on {}", port.id);
        }
    }
}

/// A single-function device with a profile's resources.
fn profile_device(i: usize, profile: &HotplugProfile) -> Option<DeviceRequest> {
    let id = QemuId::new(format!("fuzzhot{i}")).ok()?;
    let f = FunctionRequest::new(0, "vfio-pci", profile.resources.clone());
    Some(DeviceRequest::new(id, vec![f]))
}

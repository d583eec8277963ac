//! Plan requests on every platform: q35 with SeaBIOS and OVMF, aarch64 `virt` with and
//! without UEFI, and s390x (through `pcie_topology::plan` and through the s390x
//! planner). The request is the input as JSON when it starts with `{` (seeds are real
//! requests), otherwise built from the bytes (`pcie_hotplug_fuzz::plan_input`).
//! Promises checked: no panic; a refused request is a typed error with a message; an
//! accepted plan keeps every promise of `pcie_hotplug_fuzz::checks` and is the same plan
//! when planned again; a device placed at run time and released leaves the plan as it was.
#![no_main]

use arbitrary::Unstructured;
use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::{Virt, Q35};
use libfuzzer_sys::fuzz_target;
use pcie_hotplug_fuzz::{checks, plan_input};
use pcie_topology::{plan, DeviceRequest, Plan, PlanError, PlanRequest, Platform};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let request = if data.first() == Some(&b'{') {
        match serde_json::from_slice::<PlanRequest>(data) {
            Ok(r) => r,
            Err(_) => return,
        }
    } else {
        match plan_input::plan_request(&mut u) {
            Ok(r) => r,
            Err(_) => return,
        }
    };
    if show() {
        eprintln!("{}", serde_json::to_string(&request).unwrap_or_default());
    }
    if over_spare_limit(&request) {
        return;
    }
    let platforms: [Box<dyn Platform>; 5] = [
        Box::new(Q35::seabios()),
        Box::new(Q35::ovmf()),
        Box::new(Virt::direct_kernel()),
        Box::new(Virt::uefi()),
        Box::new(S390xCcw::default()),
    ];
    for platform in &platforms {
        if show() {
            eprintln!("platform {}", platform.spec().name);
        }
        match plan(platform.as_ref(), &request) {
            Ok(p) => {
                checks::accepted_plan(&p, &request.devices);
                let again = plan(platform.as_ref(), &request).expect("the same request plans again");
                assert_eq!(again, p, "planning is not deterministic");
                place_and_release(p, &request.devices, &mut u);
            }
            Err(e) => refused(&e),
        }
    }
    s390x(&mut u);
});

/// Whether to print the decoded input as JSON (`FUZZ_SHOW=1`, when replaying a finding;
/// the JSON is an input of this target too).
fn show() -> bool {
    std::env::var_os("FUZZ_SHOW").is_some()
}

/// Whether the request asks for more spare ports than `FUZZ_MAX_SPARES` (unset: no
/// limit). Huge spare counts run out of memory before the planner's capacity checks;
/// while that is so, a run with a limit explores everything else.
fn over_spare_limit(request: &PlanRequest) -> bool {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| std::env::var("FUZZ_MAX_SPARES").ok().and_then(|v| v.parse().ok()));
    limit.is_some_and(|l| request.spares.iter().map(|s| u64::from(s.count)).sum::<u64>() > l)
}

/// A refusal says what is wrong.
fn refused(e: &PlanError) {
    assert!(!e.to_string().is_empty());
}

/// One more device placed at run time, then released: the plan is as before.
fn place_and_release(mut p: Plan, requested: &[DeviceRequest], u: &mut Unstructured<'_>) {
    let Ok(mut device) = plan_input::device(u, 90) else { return };
    device.id = pcie_topology::QemuId::new("hot90").expect("valid id");
    device.cold_plug = false;
    let before = p.clone();
    let mut all = requested.to_vec();
    all.push(device.clone());
    match p.place(device) {
        Ok(action) => {
            let _ = qmp_hotplug::PlugRequest::from_action(&action);
            checks::accepted_plan(&p, &all);
            p.release("hot90").expect("a placed device is released");
            for (a, b) in p.ports.iter().zip(&before.ports) {
                assert_eq!(a.occupant, b.occupant, "port {} after place and release", a.id);
            }
            assert_eq!(p.devices, before.devices);
        }
        Err(e) => {
            refused(&e);
            assert_eq!(p, before, "a refused placement changed the plan");
        }
    }
    let _ = DeviceRequest::ivshmem("hot91", 1 << 30).map(|d| p.place(d));
}

/// s390x through the same planner: channel devices, zPCI functions and AP devices, at
/// boot or for hotplug, then one placed at run time.
fn s390x(u: &mut Unstructured<'_>) {
    let platform = S390xCcw::default();
    let Ok(n) = u.int_in_range(0usize..=12) else { return };
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        match plan_input::s390x_device(u, i) {
            Ok(d) => devices.push(d),
            Err(_) => break,
        }
    }
    let cold = u.arbitrary().unwrap_or(false);
    for d in &mut devices {
        d.cold_plug = cold;
    }
    let request = PlanRequest::default().with_devices(devices);
    match plan(&platform, &request) {
        Ok(mut p) => {
            checks::accepted_plan(&p, &request.devices);
            if let Ok(mut d) = plan_input::s390x_device(u, 50) {
                d.cold_plug = false;
                let mut all = request.devices.clone();
                all.push(d.clone());
                match p.place(d) {
                    Ok(action) => {
                        let _ = qmp_hotplug::PlugRequest::from_action(&action);
                        checks::accepted_plan(&p, &all);
                    }
                    Err(e) => refused(&e),
                }
            }
        }
        Err(e) => refused(&e),
    }
}

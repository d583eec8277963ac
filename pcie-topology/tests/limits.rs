//! Requests at and past what any platform can address or hold: sizes up to 2^64 bytes,
//! counts up to `u32::MAX`, hundreds of thousands of devices. Every one plans or fails
//! with a typed error, quickly and without a panic; a plan that is accepted keeps every
//! size and address inside [`MAX_PHYS_BITS`] bits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::{Virt, Q35};
use pcie_topology::qemu::PropValue;
use pcie_topology::request::{FunctionRequest, FunctionResource, RequestError};
use pcie_topology::units::{GIB, MAX_PHYS_BITS};
use pcie_topology::{
    plan, AddressSpaceError, DeviceRequest, HotplugProfile, Mode, Plan, PlanError, PlanRequest, Platform,
    QemuId, SpareRequest,
};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use proptest::prelude::*;

fn platforms() -> Vec<Box<dyn Platform>> {
    vec![
        Box::new(Q35::seabios()),
        Box::new(Q35::ovmf()),
        Box::new(Virt::direct_kernel()),
        Box::new(Virt::uefi()),
    ]
}

/// A device `id` with one function holding `resources`.
fn device(id: &str, resources: Vec<Resource>, cold_plug: bool) -> DeviceRequest {
    let resources = resources.into_iter().map(FunctionResource::from).collect();
    let mut d =
        DeviceRequest::new(QemuId::new(id).unwrap(), vec![FunctionRequest::new(0, "vfio-pci", resources)]);
    d.cold_plug = cold_plug;
    d
}

/// Plans on another thread, so that a panic fails the test with a message instead of
/// tearing it down, and a plan that runs too long fails it too.
fn plan_within(
    seconds: u64,
    platform: Box<dyn Platform + Send>,
    request: PlanRequest,
) -> Result<Plan, PlanError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            plan(platform.as_ref(), &request)
        })));
    });
    match rx.recv_timeout(Duration::from_secs(seconds)) {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => panic!("plan() panicked"),
        Err(_) => panic!("plan() did not return within {seconds} s"),
    }
}

/// Every size and address of an accepted plan stays inside the widest physical address
/// space a platform has, and a plan that needs 64-bit MMIO has an aperture for it.
fn check_bounded(p: &Plan) {
    let limit = 1u64 << MAX_PHYS_BITS;
    let a = &p.address;
    assert!(a.phys_bits_needed <= MAX_PHYS_BITS, "{a:?}");
    assert!(a.mmio32_needed <= a.mmio32_available && a.io_needed <= a.io_available, "{a:?}");
    assert!(a.ram_end <= limit && a.mmio64_needed <= limit, "{a:?}");
    if a.mmio64_needed > 0 {
        let aperture = a.mmio64_aperture.expect("64-bit windows need an aperture");
        assert!(aperture.base.checked_add(aperture.size).is_some_and(|end| end <= limit), "{aperture:?}");
    }
    for port in &p.ports {
        let r = &port.reservation;
        for w in [r.mem, r.pref, r.io] {
            assert!(w.size <= limit, "{}: window {w:?}", port.id);
        }
        for (name, value) in port.device.iter().flat_map(|d| d.props.iter()) {
            if let PropValue::Int(v) = value {
                assert!(*v <= limit, "{}: {name}={v}", port.id);
            }
        }
    }
}

/// Two cold-plugged devices with 2^63-byte I/O BARs: the I/O total `.sum()` overflowed
/// (a panic in debug builds; in release builds a plan with `io_needed = 0`).
#[test]
fn two_io_bars_of_2_pow_63_bytes_are_refused() {
    let request = PlanRequest::default().with_devices(vec![
        device("io0", vec![Resource::bar(BarKind::Io, false, 1 << 63)], true),
        device("io1", vec![Resource::bar(BarKind::Io, false, 1 << 63)], true),
    ]);
    let e = plan_within(30, Box::new(Q35::seabios()), request).expect_err("2^64 I/O ports do not exist");
    assert!(!e.to_string().is_empty());
}

/// One 2^63-byte BAR on q35: the plan was accepted with no 64-bit aperture, phys-bits 32
/// and "64-bit MMIO: none needed", while the port asked `pref64-reserve=18446744073707454464`.
#[test]
fn a_bar_of_2_pow_63_bytes_is_refused() {
    for platform in [Q35::seabios(), Q35::ovmf()] {
        for cold in [false, true] {
            let request = PlanRequest::default().with_devices(vec![device(
                "gpu0",
                vec![Resource::bar(BarKind::Mem64, true, 1 << 63)],
                cold,
            )]);
            let got = plan_within(30, Box::new(platform.clone()), request);
            let e = got.map(|p| p.explain()).expect_err("no platform addresses 2^63 bytes of MMIO");
            assert!(!e.to_string().is_empty());
        }
    }
}

/// The bound itself: a BAR larger than 2^MAX_PHYS_BITS bytes is refused before planning,
/// naming the device; one that fits the bound plans where the platform has room.
#[test]
fn sizes_past_the_widest_address_space_are_request_errors() {
    let too_big = 1u64 << (MAX_PHYS_BITS + 1);
    let request = PlanRequest::default().with_devices(vec![device(
        "gpu0",
        vec![Resource::bar(BarKind::Mem64, true, too_big)],
        false,
    )]);
    match plan(&Q35::seabios(), &request) {
        Err(PlanError::Request(RequestError::TooLarge { device, size, limit })) => {
            assert_eq!((device.as_str(), size, limit), ("gpu0", too_big, 1 << MAX_PHYS_BITS));
        }
        other => panic!("{other:?}"),
    }
    let profile = HotplugProfile::parse("8192T:pref64").unwrap_err();
    assert!(profile.to_string().contains("8192T"), "{profile}");
    let request = PlanRequest::default().with_devices(vec![device(
        "gpu0",
        vec![Resource::bar(BarKind::Mem64, true, 256 * GIB)],
        false,
    )]);
    let p = plan(&Q35::seabios(), &request).unwrap();
    check_bounded(&p);
}

/// `count = u32::MAX` spares: the planner allocated one entry per spare before any
/// capacity check and the process aborted on allocation. A PCI segment has 256 bus
/// numbers and every port takes one: the request is refused before anything is built.
#[test]
fn u32_max_spares_are_refused_before_allocating() {
    for mode in [Mode::RootPort, Mode::SwitchPort, Mode::Numa] {
        for p2p_group in [None, Some("g".to_string())] {
            let request = PlanRequest::default().with_mode(mode).with_spares(vec![
                SpareRequest::new(HotplugProfile::nic(), u32::MAX),
                SpareRequest::new(HotplugProfile::nic(), u32::MAX).with_numa_node(1),
            ]);
            let mut request = request;
            if let Some(last) = request.spares.last_mut() {
                last.p2p_group = p2p_group;
            }
            let start = Instant::now();
            let e = plan_within(30, Box::new(Q35::seabios()), request).expect_err("2^33 ports do not fit");
            assert!(matches!(e, PlanError::Buses { .. }), "{e}");
            assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        }
    }
}

/// 10^5 devices, each in its own peer-to-peer group: grouping them was quadratic (33.8 s
/// before the typed error). Now the capacity check refuses them at once, and grouping
/// itself is a map lookup per device.
#[test]
fn a_hundred_thousand_p2p_groups_are_refused_quickly() {
    let devices: Vec<DeviceRequest> = (0..100_000)
        .map(|i| {
            let mut d = device(&format!("d{i}"), vec![Resource::bar(BarKind::Mem64, true, 1 << 20)], false);
            d.p2p_group = Some(format!("g{i}"));
            d
        })
        .collect();
    for mode in [Mode::SwitchPort, Mode::RootPort] {
        let request = PlanRequest::default().with_mode(mode).with_devices(devices.clone());
        let start = Instant::now();
        let e = plan_within(60, Box::new(Q35::seabios()), request).expect_err("10^5 ports do not fit");
        assert!(matches!(e, PlanError::Buses { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    }
}

/// The largest switch layouts that do fit still plan: many groups of a few devices.
#[test]
fn many_small_p2p_groups_still_plan() {
    let devices: Vec<DeviceRequest> = (0..48)
        .map(|i| {
            let mut d = device(&format!("d{i}"), vec![Resource::bar(BarKind::Mem64, true, 1 << 20)], false);
            d.p2p_group = Some(format!("g{}", i % 16));
            d
        })
        .collect();
    let request = PlanRequest::default().with_mode(Mode::SwitchPort).with_devices(devices);
    let p = plan(&Q35::seabios(), &request).unwrap();
    assert_eq!(p.switches.len(), 16);
    check_bounded(&p);
}

/// s390x: a zPCI function whose BARs overflow 64 bits was planned with an empty
/// requirement (the error was swallowed); planning many channel devices rebuilt every
/// free set once per device (quadratic).
#[test]
fn s390x_refuses_overflowing_bars_and_plans_many_devices_quickly() {
    let huge = FunctionResource::from(Resource::bar(BarKind::Mem64, true, 1 << 63));
    let zpci = DeviceRequest::new(
        QemuId::new("gpu0").unwrap(),
        vec![FunctionRequest::new(0, "vfio-pci", vec![huge, huge])],
    );
    let e = plan(&S390xCcw::default(), &PlanRequest::default().with_devices(vec![zpci])).unwrap_err();
    assert!(matches!(e, PlanError::Request(_)), "{e}");
    let many: Vec<DeviceRequest> = (0..20_000)
        .map(|i| DeviceRequest::channel(QemuId::new(format!("n{i}")).unwrap(), "virtio-net-ccw", 0))
        .collect();
    let start = Instant::now();
    let p = plan(&S390xCcw::default(), &PlanRequest::default().with_devices(many)).unwrap();
    assert_eq!(p.devices.len(), 20_000);
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

fn kind() -> impl Strategy<Value = (BarKind, bool)> {
    prop_oneof![
        Just((BarKind::Io, false)),
        Just((BarKind::Mem32, false)),
        Just((BarKind::Mem32, true)),
        Just((BarKind::Mem64, false)),
        Just((BarKind::Mem64, true)),
    ]
}

/// Any size: powers of two up to 2^63 (most of them huge), and any 64-bit number.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![4 => (30u32..64).prop_map(|s| 1u64 << s), 1 => (0u32..30).prop_map(|s| 1u64 << s), 1 => any::<u64>()]
}

fn huge_request() -> impl Strategy<Value = (usize, PlanRequest)> {
    let resource = (kind(), size()).prop_map(|((k, p), s)| Resource::bar(k, p, s));
    let dev = (prop::collection::vec(resource, 1..4), any::<bool>(), prop::option::of(0u8..3));
    let spare = (
        prop::collection::vec((kind(), size()), 1..3),
        prop_oneof![6 => 0u32..4, 1 => Just(u32::MAX), 1 => any::<u32>()],
    );
    (
        0usize..4,
        0u8..3,
        prop::collection::vec(dev, 0..4),
        prop::collection::vec(spare, 0..2),
        prop::option::weighted(0.3, any::<u64>()),
    )
        .prop_map(|(platform, mode, devices, spares, ram)| {
            let devices = devices
                .into_iter()
                .enumerate()
                .map(|(i, (resources, cold, group))| {
                    let mut d = device(&format!("dev{i}"), resources, cold);
                    d.p2p_group = group.map(|g| format!("g{g}"));
                    d
                })
                .collect();
            let spares = spares
                .into_iter()
                .map(|(resources, count)| {
                    SpareRequest::new(
                        HotplugProfile::new(
                            "huge",
                            resources.into_iter().map(|((k, p), s)| Resource::bar(k, p, s).into()).collect(),
                        ),
                        count,
                    )
                })
                .collect();
            let mut request = PlanRequest::default()
                .with_mode([Mode::RootPort, Mode::SwitchPort, Mode::Numa][usize::from(mode)])
                .with_devices(devices)
                .with_spares(spares);
            if let Some(ram) = ram {
                request.options.guest_ram = ram;
            }
            (platform, request)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random huge sizes, counts and RAM never panic: the plan is accepted with every size
    /// and address inside the bound, or refused with a typed error.
    #[test]
    fn huge_sizes_plan_or_fail_typed((platform, request) in huge_request()) {
        let platforms = platforms();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan(platforms[platform].as_ref(), &request)));
        let result = result.map_err(|_| TestCaseError::fail("plan() panicked"))?;
        match result {
            Ok(p) => check_bounded(&p),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Placing a random device of huge BARs at run time onto a plan with spares never
    /// panics either.
    #[test]
    fn huge_devices_place_or_fail_typed(resources in prop::collection::vec((kind(), size()), 1..4), platform in 0usize..4) {
        let platforms = platforms();
        let request = PlanRequest::default().with_spares(vec![SpareRequest::new(HotplugProfile::h100(), 1)]);
        let mut p = plan(platforms[platform].as_ref(), &request).unwrap();
        let d = device("late", resources.into_iter().map(|((k, pf), s)| Resource::bar(k, pf, s)).collect(), false);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || p.place(d).map(|_| p)));
        let result = result.map_err(|_| TestCaseError::fail("place() panicked"))?;
        if let Ok(p) = result {
            check_bounded(&p);
        }
    }
}

/// What the bound means in the errors: RAM past it is a physical-address-width error
/// naming the architecture, not a saturated sum.
#[test]
fn ram_past_the_bound_is_a_phys_bits_error() {
    let mut request = PlanRequest::default().with_spares(vec![SpareRequest::new(HotplugProfile::nic(), 1)]);
    request.options.guest_ram = u64::MAX;
    for platform in platforms() {
        let e = plan(platform.as_ref(), &request).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::AddressSpace(AddressSpaceError::PhysBits { .. } | AddressSpaceError::Overflow)
            ),
            "{}: {e}",
            platform.spec().name
        );
    }
}

/// Found by the `plan_request` fuzz target (reproducer `end-of-space-needed-over-region`):
/// under SeaBIOS from 1.16.3 on the windows are laid out end to end where the plan says,
/// and the report gave the packed-by-alignment sum (383 GiB for three A100 spares) as
/// what is needed next to a 320 GiB aperture that holds them. The report's need is now
/// the region the windows take, never more than the aperture.
#[test]
fn end_of_space_report_needs_no_more_than_its_aperture() {
    use arch_x86_aarch64::FirmwareGeneration;
    let a100 = pcie_topology::HotplugProfile::parse("16M:mem32,64G:pref64,32M:pref64").unwrap();
    for generation in [FirmwareGeneration::SeaBiosEndOfSpace, FirmwareGeneration::SeaBiosEndOfSpaceCapped] {
        for count in 1..=4 {
            let platform = Q35::for_generation(generation, "").unwrap();
            let request = PlanRequest::default()
                .with_spares(vec![pcie_topology::SpareRequest::new(a100.clone(), count)]);
            let plan = pcie_topology::plan(&platform, &request).unwrap();
            let a = &plan.address;
            let aperture = a.mmio64_aperture.unwrap();
            assert!(a.mmio64_needed <= aperture.size, "{generation:?} x{count}: {a:?}");
            let windows: u64 = plan.ports.iter().map(|p| p.reservation.pref.size).sum();
            assert!(a.mmio64_needed >= windows, "{generation:?} x{count}: {a:?}");
        }
    }
}

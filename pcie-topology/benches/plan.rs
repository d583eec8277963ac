//! Planning time for large topologies: spare ports spread over 4 `pxb-pcie` expanders.
//!
//! 256 ports over 4 expanders cannot exist in one PCI segment (256 bus numbers, and the
//! 4 expander roots and `pcie.0` take 5 of them), so the planner answers with a typed
//! error; the bench times that answer too, next to the largest plan that fits (251 ports).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use arch_x86_aarch64::Q35;
use criterion::{criterion_group, criterion_main, Criterion};
use pcie_topology::{
    plan, DeviceRequest, HotplugProfile, Mode, PlanError, PlanOptions, PlanRequest, SpareRequest,
};

fn request(ports: u32) -> PlanRequest {
    let per_node = ports / 4;
    PlanRequest::default()
        .with_mode(Mode::Numa)
        .with_spares(
            (0..4)
                .map(|node| {
                    SpareRequest::new(HotplugProfile::nic(), per_node + u32::from(node < ports % 4))
                        .with_numa_node(node)
                })
                .collect(),
        )
        .with_options({
            let mut o = PlanOptions::default();
            o.pack_root_ports = true;
            o
        })
}

fn bench(c: &mut Criterion) {
    let q35 = Q35::seabios();
    let fits = request(251);
    let p = plan(&q35, &fits).expect("251 ports over 4 expanders fit one segment");
    assert_eq!(p.ports.len(), 251);
    let too_many = request(256);
    assert!(matches!(plan(&q35, &too_many), Err(PlanError::Buses { .. })));

    c.bench_function("plan 251 ports over 4 pxb-pcie (q35, SeaBIOS)", |b| {
        b.iter(|| plan(&q35, black_box(&fits)).unwrap())
    });
    c.bench_function("plan 256 ports over 4 pxb-pcie: typed error", |b| {
        b.iter(|| plan(&q35, black_box(&too_many)).unwrap_err())
    });
    c.bench_function("serialize the 251-port plan to JSON", |b| b.iter(|| black_box(&p).to_json().unwrap()));
    let mut live = p.clone();
    c.bench_function("place + release one device on the 251-port plan", |b| {
        b.iter(|| {
            live.place(DeviceRequest::ivshmem("bench0", 64 << 10).unwrap()).unwrap();
            live.release("bench0").unwrap();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

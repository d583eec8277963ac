//! Decoding speed of one function's 4 KiB configuration space.
//!
//! Input: the AMD Fiji dump from pciutils' test data (`../shared/conformance`), which has
//! 4 standard and 8 extended capabilities including Resizable BAR, ATS, PRI and PASID.

// Bench code: a missing input file ends the run with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use pcilibs::bdf::Bdf;
use pcilibs::caps;
use pcilibs::config::{ConfigSpace, Header};
use pcilibs::decode::Function;
use pcilibs::dump;
use pcilibs::ecaps;
use pcilibs::facts::FunctionFacts;

fn fiji() -> Vec<u8> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/pciutils/dumps/cap-rebar");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!("{}: {e} (the pciutils dumps live in ../shared/conformance)", p.display())
    });
    let config = dump::parse(&text).devices.remove(0).config;
    assert_eq!(config.len(), 4096);
    config
}

fn bench(c: &mut Criterion) {
    let config = fiji();
    c.bench_function("header + capability walks (4 KiB)", |b| {
        b.iter(|| {
            let bytes = black_box(&config[..]);
            let cs = ConfigSpace::new(bytes);
            let h = Header::parse(bytes).unwrap();
            let std_caps = caps::walk(cs, &h);
            let ext = ecaps::walk(cs);
            (h, std_caps, ext)
        })
    });
    c.bench_function("full decode (4 KiB)", |b| b.iter(|| Function::decode(black_box(&config[..])).unwrap()));
    c.bench_function("full decode + FunctionFacts (4 KiB)", |b| {
        b.iter(|| FunctionFacts::from_config(Bdf::default(), black_box(&config[..]), None).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

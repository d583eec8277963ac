//! Decoding speed of one function's 4 KiB configuration space.
//!
//! Input: the AMD Fiji dump from pciutils' test data (`../shared/conformance`), which has
//! 4 standard and 8 extended capabilities including Resizable BAR, ATS, PRI and PASID.
//!
//! Baseline in the same run: the `pci_types` crate (rust-osdev) decoding the same bytes
//! through its config-access trait: ids, header type, class and the standard capability
//! list (it has no extended-capability walk), against pcilibs parsing the whole header
//! (every field, BARs and bridge windows included) and walking the standard list.

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

/// `pci_types`' access trait over an in-memory config space (reads only).
struct Bytes<'a>(&'a [u8]);

impl pci_types::ConfigRegionAccess for Bytes<'_> {
    unsafe fn read(&self, _address: pci_types::PciAddress, offset: u16) -> u32 {
        let o = usize::from(offset);
        self.0.get(o..o + 4).and_then(|b| b.try_into().ok()).map_or(u32::MAX, u32::from_le_bytes)
    }

    unsafe fn write(&self, _address: pci_types::PciAddress, _offset: u16, _value: u32) {}
}

/// The part both crates decode: ids, header type, class, standard capabilities.
fn baseline(c: &mut Criterion, config: &[u8]) {
    let mut g = c.benchmark_group("ids + class + standard capabilities (4 KiB)");
    g.bench_function("pcilibs", |b| {
        b.iter(|| {
            let bytes = black_box(config);
            let h = Header::parse(bytes).unwrap();
            let caps: Vec<_> = caps::walk(ConfigSpace::new(bytes), &h).entries;
            (h.vendor_id, h.class, caps.len())
        })
    });
    g.bench_function("pci_types 0.10 (baseline)", |b| {
        b.iter(|| {
            let access = Bytes(black_box(config));
            let header = pci_types::PciHeader::new(pci_types::PciAddress::new(0, 0, 0, 0));
            let ids = header.id(&access);
            let class = header.revision_and_class(&access);
            let endpoint = pci_types::EndpointHeader::from_header(header, &access).unwrap();
            let caps = endpoint.capabilities(&access).count();
            (ids, class, caps)
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let config = fiji();
    baseline(c, &config);
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

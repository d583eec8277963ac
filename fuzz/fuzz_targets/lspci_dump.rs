//! `lspci -x` dumps: any text parses (never fails, problems collected per line).
//! Promises checked: no panic; no device holds more than 4096 bytes; every problem names
//! a line of the text; each device, written back as a dump, parses to the same address
//! and bytes; its bytes decode to facts that carry no sizes, so a planner request from
//! them is refused with a typed error whenever a BAR is needed.
#![no_main]

use std::fmt::Write;

use libfuzzer_sys::fuzz_target;
use pcie_topology::{DeviceRequest, QemuId};
use pcilibs::config::PCIE_CONFIG_SIZE;
use pcilibs::dump::{self, DumpDevice, DumpError};
use pcilibs::facts::{FunctionFacts, ResourceOptions};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = dump::parse(&text);
    let lines = text.lines().count();
    for p in parsed.problems.iter().chain(parsed.devices.iter().flat_map(|d| d.problems.iter())) {
        assert!((1..=lines).contains(&line_of(p)), "{p} names no line of {lines}");
        assert!(!p.to_string().is_empty());
    }
    for dev in &parsed.devices {
        assert!(dev.config.len() <= PCIE_CONFIG_SIZE, "{} bytes", dev.config.len());
        round_trip(dev);
        facts(dev);
    }
});

fn line_of(p: &DumpError) -> usize {
    match p {
        DumpError::BadAddress { line, .. }
        | DumpError::Malformed { line }
        | DumpError::OffsetTooLarge { line }
        | DumpError::Orphan { line }
        | DumpError::Duplicate { line, .. } => *line,
        _ => 0,
    }
}

/// The device written back in `lspci -x` form parses to the same address and bytes.
fn round_trip(dev: &DumpDevice) {
    let mut out = format!("{} fuzz device\n", dev.bdf);
    for (row, chunk) in dev.config.chunks(16).enumerate() {
        let _ = write!(out, "{:03x}:", row * 16);
        for b in chunk {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
    }
    let again = dump::parse(&out);
    assert!(again.problems.is_empty(), "{:?}", again.problems);
    match again.devices.as_slice() {
        [d] => {
            assert_eq!(d.bdf, dev.bdf);
            assert_eq!(d.config, dev.config);
            assert!(d.problems.is_empty(), "{:?}", d.problems);
        }
        other => panic!("{} devices read back from one: {out}", other.len()),
    }
}

/// Dumps carry no sizes: facts decode, and a BAR the planner needs is an unknown size.
fn facts(dev: &DumpDevice) {
    let Ok(f) = FunctionFacts::from_config(dev.bdf, &dev.config, None) else { return };
    assert!(f.size_source.is_none());
    let opts = ResourceOptions::default();
    let id = QemuId::new("dump0").expect("valid id");
    match DeviceRequest::from_facts(id, std::slice::from_ref(&f), &opts) {
        Ok(d) => assert!(f.bars.is_empty(), "a request with sizes from a dump: {d:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

//! The library's decoding of pciutils' own test dumps against what pciutils' `lspci -vvv`
//! (3.9.0) decoded from them (`../shared/conformance/pciutils/oracle.json`).

mod common;

use pcilibs::bar::BarKind;
use pcilibs::config::ConfigSpace;
use pcilibs::decode::Function;
use pcilibs::dump;
use pcilibs::ecaps;

fn kind_name(k: BarKind) -> &'static str {
    match k {
        BarKind::Io => "io",
        BarKind::Mem32 => "mem32",
        _ => "mem64",
    }
}

#[test]
fn every_dump_device_matches_pciutils() {
    let oracle = common::oracle();
    let mut devices = 0;
    let mut upper_halves = Vec::new();
    for (file, devs) in oracle.as_object().unwrap() {
        let d = dump::parse(&common::dump_text(file));
        assert!(d.problems.is_empty(), "{file}: {:?}", d.problems);
        for (bdf, want) in devs.as_object().unwrap() {
            devices += 1;
            let dev = d
                .devices
                .iter()
                .find(|x| x.bdf.to_string().ends_with(bdf.as_str()))
                .unwrap_or_else(|| panic!("{file} {bdf}: not parsed"));
            assert!(dev.problems.is_empty(), "{file} {bdf}: {:?}", dev.problems);
            let f = Function::decode(&dev.config).unwrap_or_else(|e| panic!("{file} {bdf}: {e}"));
            let caps: Vec<u64> = f.capabilities.iter().map(|c| u64::from(c.offset)).collect();
            let want_caps: Vec<u64> =
                want["caps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(caps, want_caps, "{file} {bdf}: capability offsets");
            let ecaps: Vec<u64> = f.extended_capabilities.iter().map(|c| u64::from(c.offset)).collect();
            let want_ecaps: Vec<u64> =
                want["ext_caps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(ecaps, want_ecaps, "{file} {bdf}: extended capability offsets");
            for r in want["regions"].as_array().unwrap() {
                let index = r["index"].as_u64().unwrap() as u8;
                match f.bars.get(index) {
                    Some(b) => {
                        assert_eq!(kind_name(b.kind), r["kind"], "{file} {bdf}: BAR {index} kind");
                        assert_eq!(b.prefetchable, r["prefetchable"], "{file} {bdf}: BAR {index} prefetch");
                    }
                    None => {
                        // lspci lists the non-zero upper register of a 64-bit BAR as a region
                        // of its own when reading a dump; that is the only allowed difference.
                        let lower = index.checked_sub(1).and_then(|i| f.bars.get(i));
                        assert!(
                            lower.is_some_and(|b| b.kind == BarKind::Mem64),
                            "{file} {bdf}: region {index} missing and not the upper half of a 64-bit BAR"
                        );
                        upper_halves.push(format!("{file} {bdf} {index}"));
                    }
                }
            }
        }
    }
    assert_eq!(devices, 172);
    assert_eq!(upper_halves.len(), 8, "{upper_halves:?}");
}

#[test]
fn broken_ecaps_is_not_walked_and_a_forced_walk_ends() {
    let d = dump::parse(&common::dump_text("broken-ecaps"));
    let dev = &d.devices[0];
    assert_eq!(dev.config.len(), 4096);
    let f = Function::decode(&dev.config).unwrap();
    assert!(!f.is_pcie());
    assert!(f.extended_capabilities.is_empty());
    // Its extended space mirrors the first 256 bytes; walking it anyway must end.
    let w = ecaps::walk(ConfigSpace::new(&dev.config));
    assert!(w.entries.len() <= ecaps::MAX_EXT_CAPABILITIES);
    assert!(w.error.is_some() || !w.entries.is_empty());
}

#[test]
fn short_dumps_decode_what_they_have() {
    // A 64-byte `lspci -x` dump: header only; capabilities beyond it are truncation errors.
    let d = dump::parse(&common::dump_text("cap-rebar"));
    let full = &d.devices[0].config;
    let f = Function::decode(&full[..64]).unwrap();
    assert_eq!(f.bars.bars.len(), 4);
    assert!(f.capabilities.is_empty());
    assert_eq!(f.problems.len(), 1, "{:?}", f.problems);
    let f = Function::decode(&full[..256]).unwrap();
    assert_eq!(f.capabilities.len(), 4);
    assert!(f.extended_capabilities.is_empty());
    let rebar = Function::decode(full).unwrap();
    let entries = &rebar.rebar().unwrap().entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].bar, 0);
    assert_eq!(entries[0].current_size, 256 << 20);
    assert_eq!(entries[0].max_size(), Some(4 << 30));
}

//! Configuration space decoding: any bytes (a 64-byte header, 256 or 4096 bytes, or any
//! length) decode without a panic. Promises checked: the capability walks stay inside
//! the bytes, on dword boundaries, bounded in count and loop-free; the facts decoded
//! serialize and read back; the sizing probe over an emulated copy of the bytes
//! returns sizes or a typed error; every resource selection gives a requirement or a
//! typed error; a planner request from the facts is built or refused with a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcie_topology::{DeviceRequest, QemuId};
use pcilibs::bar::{decode_register, BarKind};
use pcilibs::bdf::Bdf;
use pcilibs::caps;
use pcilibs::config::{BridgeInfo, ConfigError, ConfigSpace, Header, HEADER_SIZE, PCIE_CONFIG_SIZE};
use pcilibs::decode::Function;
use pcilibs::ecaps;
use pcilibs::emulated::EmulatedConfigSpace;
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::sizing::probe::probe;

fuzz_target!(|data: &[u8]| {
    let bytes = data.get(..data.len().min(PCIE_CONFIG_SIZE + 16)).unwrap_or_default();
    walks(bytes);
    let facts = match Function::decode(bytes) {
        Ok(f) => FunctionFacts::from_function(Bdf::default(), &f, None),
        Err(ConfigError::TooShort { len }) => {
            assert!(len < HEADER_SIZE && len == bytes.len());
            return;
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    serde_round_trip(&facts);
    selections(&facts);
    emulated_probe(bytes);
    registers(bytes);
});

/// The capability walks: bounded, inside the bytes, aligned, no offset twice.
fn walks(bytes: &[u8]) {
    let cs = ConfigSpace::new(bytes);
    let ext = ecaps::walk(cs);
    assert!(ext.entries.len() <= ecaps::MAX_EXT_CAPABILITIES);
    let mut offsets: Vec<u16> = ext.entries.iter().map(|e| e.offset).collect();
    for o in &offsets {
        assert!(
            usize::from(*o) + 4 <= bytes.len() && o % 4 == 0 && *o >= 0x100,
            "extended capability at {o:#x}"
        );
    }
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), ext.entries.len(), "an extended capability listed twice");
    let Ok(header) = Header::parse(bytes) else { return };
    let walk = caps::walk(cs, &header);
    assert!(walk.entries.len() <= caps::MAX_CAPABILITIES);
    for e in &walk.entries {
        let o = usize::from(e.offset);
        assert!(o + 2 <= bytes.len() && o % 4 == 0 && o >= HEADER_SIZE, "capability at {o:#x}");
        let c = caps::decode(cs, &header, *e);
        let _ = caps::name(c.id);
    }
    for e in &ext.entries {
        let c = ecaps::decode(cs, *e);
        let _ = ecaps::name(c.id);
    }
    let _ = BridgeInfo::parse(&cs);
    let _ = header.has_capabilities();
}

/// Facts serialize to JSON and read back as the same facts.
fn serde_round_trip(facts: &FunctionFacts) {
    let text = serde_json::to_string(facts).expect("facts serialize");
    let back: FunctionFacts = serde_json::from_str(&text).expect("serialized facts read back");
    assert_eq!(&back, facts);
}

/// Every resource selection: a requirement or a typed error, and the planner's request.
fn selections(facts: &FunctionFacts) {
    for bits in 0u8..8 {
        let opts = ResourceOptions::default()
            .with_rom(bits & 1 != 0)
            .with_sriov_vfs(bits & 2 != 0)
            .with_rebar_max(bits & 4 != 0);
        match facts.resources(&opts) {
            Ok(resources) => {
                for r in &resources {
                    assert!(r.size > 0, "a resource of size 0: {r:?}");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        match facts.requirement(&opts) {
            Ok(_) => {}
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let id = QemuId::new("dev0").expect("valid id");
        match DeviceRequest::from_facts(id, std::slice::from_ref(facts), &opts) {
            Ok(d) => assert!(d.validate().is_ok()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

/// The sizing probe on an emulated copy of the bytes, then the facts with those sizes.
fn emulated_probe(bytes: &[u8]) {
    let mut emu = EmulatedConfigSpace::new(bytes);
    match probe(&mut emu) {
        Ok(sizes) => {
            for s in sizes.bars.iter().chain([&sizes.rom]).flatten() {
                assert!(s.is_power_of_two(), "probed size {s:#x}");
            }
            if let Ok(facts) = FunctionFacts::from_config(Bdf::default(), emu.bytes(), Some(&sizes)) {
                selections(&facts);
            }
            if let Ok(again) = EmulatedConfigSpace::with_sizes(bytes, &sizes) {
                let _ = again.bytes();
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Single BAR registers, as the decoder reads them, from the header's six dwords.
fn registers(bytes: &[u8]) {
    let dword = |i: usize| -> u32 {
        let at = 0x10 + 4 * i;
        bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
    };
    for i in 0..6u8 {
        let raw = dword(usize::from(i));
        let upper = (i < 5).then(|| dword(usize::from(i) + 1));
        if let Ok(r) = decode_register(i, raw, upper, i == 5) {
            if r.kind == BarKind::Mem64 {
                assert!(i < 5, "a 64-bit BAR in the last slot");
            }
            let _ = r.with_size(Some(4096));
        }
    }
}

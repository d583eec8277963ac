//! pcilibs against the QEMU x86_64 guest fixtures (`tests/fixtures/qemu-x86_64`, made by
//! `cargo xtask fixtures`; see the README there).
//!
//! * decoded BAR and SR-IOV VF BAR sizes equal the guest kernel's (`expected.json`, from
//!   the kernel's `resource` lines), capability ids and offsets equal pciutils';
//! * the sizing probe on an emulated configuration space carrying the kernel's sizes gives
//!   the kernel's sizes back (every BAR, ROM and VF BAR);
//! * the sizing probe run against the same QEMU device models (the fixture's command
//!   line, QEMU paused, the test numbering buses the way SeaBIOS did) gives the guest
//!   kernel's BAR and ROM sizes, function by function;
//! * QEMU's resource reservation capability decodes to the root ports' `*-reserve`
//!   properties on that command line.

// Host access (sysfs) needs the `std` feature.
#![cfg(feature = "std")]
// Test code: failures panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::qemu::{PortIo, Qemu};
use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::decode::Function;
use pcilibs::emulated::EmulatedConfigSpace;
use pcilibs::sizing::probe::probe;
use pcilibs::sysfs::SysfsDevice;
use serde_json::Value;

fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qemu-x86_64");
    assert!(
        dir.join("expected.json").is_file(),
        "{} missing: regenerate it with `cargo xtask fixtures`",
        dir.display()
    );
    dir
}

fn expected() -> BTreeMap<Bdf, Value> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let v: BTreeMap<String, Value> = serde_json::from_str(&text).unwrap();
    v.into_iter().map(|(k, v)| (Bdf::parse(&k).unwrap(), v)).collect()
}

fn device(bdf: Bdf) -> SysfsDevice {
    SysfsDevice::open_dir(fixtures().join(bdf.to_string())).unwrap()
}

fn kind_name(k: BarKind) -> &'static str {
    match k {
        BarKind::Io => "io",
        BarKind::Mem32 => "mem32",
        _ => "mem64",
    }
}

/// The `-device`/`-object`/`-blockdev`/`-audiodev` arguments of the README's command line.
fn readme_devices() -> Vec<String> {
    let readme = std::fs::read_to_string(fixtures().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.trim_start().starts_with("qemu-system-x86_64 "))
        .expect("README has the QEMU command line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::new();
    for pair in words.windows(2) {
        if ["-device", "-object", "-blockdev", "-audiodev"].contains(&pair[0]) {
            out.extend([pair[0].to_string(), pair[1].to_string()]);
        }
    }
    assert!(out.len() > 20, "too few devices in the README command line");
    out
}

#[test]
fn decoded_sizes_and_capabilities_equal_the_kernel_and_lspci() {
    let want = expected();
    assert_eq!(want.len(), 29);
    let mut sizes_checked = 0;
    for (bdf, w) in &want {
        let f = device(*bdf).facts().unwrap();
        assert!(f.problems.is_empty(), "{bdf}: {:?}", f.problems);
        assert_eq!(format!("{:04x}", f.vendor_id), w["vendor"].as_str().unwrap(), "{bdf}");
        assert_eq!(format!("{:04x}", f.device_id), w["device"].as_str().unwrap(), "{bdf}");
        let got: BTreeMap<String, (String, bool, u64)> = f
            .bars
            .iter()
            .map(|b| (b.index.to_string(), (kind_name(b.kind).to_string(), b.prefetchable, b.size.unwrap())))
            .collect();
        let exp: BTreeMap<String, (String, bool, u64)> = w["bars"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(i, b)| {
                let t = (
                    b["kind"].as_str().unwrap().to_string(),
                    b["prefetchable"].as_bool().unwrap(),
                    b["size"].as_u64().unwrap(),
                );
                (i.clone(), t)
            })
            .collect();
        assert_eq!(got, exp, "{bdf}: BARs vs kernel");
        sizes_checked += exp.len();
        for (i, b) in w["sriov_bars"].as_object().unwrap() {
            let s = f.sriov.as_ref().unwrap_or_else(|| panic!("{bdf}: no SR-IOV decoded"));
            let vf = s.vf_bars.iter().find(|v| v.index.to_string() == *i).unwrap();
            assert_eq!(
                vf.size.unwrap() * u64::from(s.total_vfs),
                b["size"].as_u64().unwrap(),
                "{bdf} VF BAR {i}"
            );
            sizes_checked += 1;
        }
        let config = device(*bdf).config().unwrap();
        assert_eq!(config.len() as u64, w["config_size"].as_u64().unwrap());
        let d = Function::decode(&config).unwrap();
        let caps: Vec<(u64, u64)> = d.capabilities.iter().map(|c| (c.offset.into(), c.id.into())).collect();
        let exp_caps: Vec<(u64, u64)> = w["caps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["offset"].as_u64().unwrap(), c["id"].as_u64().unwrap()))
            .collect();
        assert_eq!(caps, exp_caps, "{bdf}: capabilities vs lspci");
        let ecaps: Vec<(u64, u64, u64)> = d
            .extended_capabilities
            .iter()
            .map(|c| (c.offset.into(), c.id.into(), c.version.into()))
            .collect();
        let exp_ecaps: Vec<(u64, u64, u64)> = w["ext_caps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (c["offset"].as_u64().unwrap(), c["id"].as_u64().unwrap(), c["version"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(ecaps, exp_ecaps, "{bdf}: extended capabilities vs lspci");
    }
    assert!(sizes_checked >= 40, "only {sizes_checked} sizes compared");
}

#[test]
fn probe_on_emulated_config_gives_the_kernel_sizes() {
    let mut with_rom = 0;
    let mut with_vfs = 0;
    for bdf in expected().keys() {
        let dev = device(*bdf);
        let config = dev.config().unwrap();
        let total = Function::decode(&config).unwrap().sriov().map(|s| s.total_vfs);
        let kernel = dev.sizes(total).unwrap().unwrap();
        let mut emu = EmulatedConfigSpace::with_sizes(&config, &kernel).unwrap();
        let probed = probe(&mut emu).unwrap();
        assert_eq!(probed.bars, kernel.bars, "{bdf}");
        assert_eq!(probed.rom, kernel.rom, "{bdf}");
        assert_eq!(probed.vf_bars, kernel.vf_bars, "{bdf}");
        with_rom += usize::from(kernel.rom.is_some());
        with_vfs += usize::from(kernel.vf_bars.is_some_and(|v| v.iter().any(Option::is_some)));
    }
    assert!(with_rom >= 1 && with_vfs == 1, "ROMs {with_rom}, SR-IOV PFs {with_vfs}");
}

#[test]
fn probe_on_the_same_qemu_devices_gives_the_kernel_sizes() {
    let args = readme_devices();
    let extra_roots: Vec<u8> = args
        .iter()
        .filter(|a| a.starts_with("pxb-pcie,"))
        .filter_map(|a| a.split(',').find_map(|kv| kv.strip_prefix("bus_nr=")))
        .map(|n| n.parse().unwrap())
        .collect();
    let mut q = Qemu::start(&args);
    let mut found = q.firmware(&extra_roots);
    found.sort();
    let want = expected();
    assert_eq!(found, want.keys().copied().collect::<Vec<_>>(), "same functions at the same addresses");
    let mut compared = 0;
    for bdf in found {
        let dev = device(bdf);
        let guest_config = dev.config().unwrap();
        let qemu_config = q.ecam(bdf);
        assert_eq!(qemu_config[..4], guest_config[..4], "{bdf}: same vendor/device");
        assert_eq!(qemu_config[8..12], guest_config[8..12], "{bdf}: same class and revision");
        let kernel = dev.sizes(None).unwrap().unwrap();
        let probed = probe(&mut PortIo { q: &mut q, bdf }).unwrap();
        assert_eq!(probed.bars, kernel.bars, "{bdf}: probe on QEMU vs guest kernel");
        assert_eq!(probed.rom, kernel.rom, "{bdf}: ROM probe on QEMU vs guest kernel");
        compared += kernel.bars.iter().filter(|s| s.is_some()).count() + usize::from(kernel.rom.is_some());
    }
    assert!(compared >= 40, "only {compared} sizes compared");
}

fn size_value(text: &str) -> u64 {
    let (num, mult) = match text.as_bytes().last() {
        Some(b'K') => (&text[..text.len() - 1], 1 << 10),
        Some(b'M') => (&text[..text.len() - 1], 1 << 20),
        Some(b'G') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    num.parse::<u64>().unwrap() * mult
}

#[test]
fn root_port_reservations_decode_to_the_command_line() {
    let mut checked = 0;
    for dev in
        readme_devices().iter().filter(|a| a.starts_with("pcie-root-port,") && a.contains("bus=pcie.0"))
    {
        let props: BTreeMap<&str, &str> =
            dev.split(',').skip(1).filter_map(|kv| kv.split_once('=')).collect();
        let (slot, func) = props["addr"].split_once('.').unwrap();
        let bdf = Bdf::new(0, 0, u8::from_str_radix(slot, 16).unwrap(), func.parse().unwrap()).unwrap();
        let f = Function::decode(&device(bdf).config().unwrap()).unwrap();
        let p = f.pcie().unwrap();
        let slot_caps = p.slot.expect("root ports have a slot");
        assert!(slot_caps.hotplug_capable, "{bdf}: QEMU root ports are hotplug capable by default");
        assert_eq!(u32::from(slot_caps.physical_slot), props["slot"].parse::<u32>().unwrap(), "{bdf}");
        let get = |k: &str| props.get(k).map(|v| size_value(v));
        let r = f.qemu_resource_reserve();
        if ["bus-reserve", "io-reserve", "mem-reserve", "pref32-reserve", "pref64-reserve"]
            .iter()
            .all(|k| !props.contains_key(k))
        {
            continue;
        }
        let r = r.unwrap_or_else(|| panic!("{bdf}: reservation capability missing"));
        assert_eq!(r.bus.map(u64::from), get("bus-reserve"), "{bdf} bus");
        assert_eq!(r.mem.map(u64::from), get("mem-reserve"), "{bdf} mem");
        assert_eq!(r.pref32.map(u64::from), get("pref32-reserve"), "{bdf} pref32");
        assert_eq!(r.pref64, get("pref64-reserve"), "{bdf} pref64");
        if let Some(io) = get("io-reserve") {
            assert_eq!(r.io, Some(io), "{bdf} io");
        }
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} reserving root ports");
}

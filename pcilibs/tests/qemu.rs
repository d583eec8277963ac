//! pcilibs against real QEMU device models (qemu-system-x86_64, q35, no guest).
//!
//! QEMU is started paused (`-S`) with many emulated devices. The test acts as firmware
//! through the monitor: it reaches configuration space with port I/O on 0xcf8/0xcfc
//! (`o`/`i` commands, the first 256 bytes, readable and writable) and through the ECAM
//! window it enables at 0xb0000000 (`xp`, all 4096 bytes, read-only), and programs bridge
//! bus numbers so every bus is reachable. Then:
//!
//! * the sizing probe, run through port I/O on the real device models, must give the
//!   sizes QEMU itself registered for every BAR and ROM (`query-pci`);
//! * the decoded capability offsets must equal what the installed `lspci` (pciutils)
//!   decodes from the same bytes written as an `lspci -xxxx` dump;
//! * QEMU's resource reservation capability must decode to the `*-reserve` properties
//!   given on the command line, and hotplug-capable slots must show as such.

// Test code: failures panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::qemu::{PortIo, Qemu};

use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::caps::pcie::PortType;
use pcilibs::decode::Function;
use pcilibs::sizing::probe::probe;
use serde_json::{json, Value};

const DEVICES: &[&str] = &[
    "virtio-net-pci",
    "e1000e",
    "nvme-subsys,id=subsys0",
    "nvme,serial=sriov0,subsys=subsys0,sriov_max_vfs=4,sriov_vq_flexible=8,sriov_vi_flexible=4,msix_qsize=8,max_ioqpairs=12",
    "qemu-xhci",
    "VGA",
    "ivshmem-plain,memdev=gpumem",
    "pcie-root-port,id=rp1,chassis=1,bus-reserve=3,io-reserve=8K,mem-reserve=32M,pref64-reserve=1G",
    "virtio-net-pci,bus=rp1",
    "pcie-root-port,id=rp2,chassis=2",
    "x3130-upstream,id=up,bus=rp2",
    "xio3130-downstream,id=dn1,bus=up,chassis=3,slot=1",
    "e1000e,bus=dn1",
    "xio3130-downstream,id=dn2,bus=up,chassis=4,slot=2",
    "pcie-root-port,id=rp3,chassis=5,hotplug=off",
    "pcie-pci-bridge,id=pb,bus=rp3",
    "e1000,bus=pb,addr=1",
    "rtl8139,bus=pb,addr=2",
    "pxb-pcie,id=pxb,bus_nr=128,bus=pcie.0",
    "pcie-root-port,id=rp4,bus=pxb,chassis=6,addr=0",
    "virtio-rng-pci,bus=rp4",
];

/// One query-pci region: (size, is_io, prefetch, mem64).
type Region = (u64, bool, bool, bool);
/// query-pci regions by function and BAR index (6 = ROM).
type Regions = BTreeMap<Bdf, BTreeMap<u8, Region>>;

fn qemu_regions(q: &mut Qemu) -> Regions {
    fn walk(devs: &Value, out: &mut Regions) {
        for d in devs.as_array().unwrap() {
            let b = Bdf::new(
                0,
                d["bus"].as_u64().unwrap() as u8,
                d["slot"].as_u64().unwrap() as u8,
                d["function"].as_u64().unwrap() as u8,
            )
            .unwrap();
            let mut regions = BTreeMap::new();
            for r in d["regions"].as_array().unwrap() {
                regions.insert(
                    r["bar"].as_u64().unwrap() as u8,
                    (
                        r["size"].as_u64().unwrap(),
                        r["type"] == "io",
                        r["prefetch"].as_bool().unwrap_or(false),
                        r["mem_type_64"].as_bool().unwrap_or(false),
                    ),
                );
            }
            out.insert(b, regions);
            if let Some(below) = d.get("pci_bridge").and_then(|p| p.get("devices")) {
                walk(below, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for bus in q.cmd("query-pci", json!({})).as_array().unwrap() {
        walk(&bus["devices"], &mut out);
    }
    out
}

/// `lspci -F` over a dump of `configs`: bdf → (standard offsets, extended offsets).
fn lspci_offsets(configs: &[(Bdf, Vec<u8>)], dir: &Path) -> BTreeMap<Bdf, (Vec<u16>, Vec<u16>)> {
    let mut text = String::new();
    for (b, c) in configs {
        text += &format!("{b} dump\n");
        for (i, chunk) in c.chunks(16).enumerate() {
            let bytes: Vec<String> = chunk.iter().map(|x| format!("{x:02x}")).collect();
            text += &format!("{:03x}: {}\n", i * 16, bytes.join(" "));
        }
        text += "\n";
    }
    let file = dir.join("dump.txt");
    std::fs::write(&file, text).unwrap();
    let out = Command::new("lspci")
        .arg("-F")
        .arg(&file)
        .arg("-vvv")
        .output()
        .unwrap_or_else(|e| panic!("cannot run lspci: {e}; install pciutils (apt-get install pciutils)"));
    assert!(out.status.success(), "lspci: {}", String::from_utf8_lossy(&out.stderr));
    let mut map = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        if !line.starts_with('\t') && !line.is_empty() {
            current = Some(Bdf::parse_any(line.split(' ').next().unwrap()).unwrap());
            map.insert(current.unwrap(), (Vec::new(), Vec::new()));
        } else if let Some(rest) = line.trim_start().strip_prefix("Capabilities: [") {
            let off = rest.split([']', ' ']).next().unwrap();
            let v = u16::from_str_radix(off, 16).unwrap();
            let e = map.get_mut(&current.unwrap()).unwrap();
            if v >= 0x100 {
                e.1.push(v);
            } else {
                e.0.push(v);
            }
        }
    }
    map
}

#[test]
fn qemu_devices_probe_decode_and_match_qemu_and_lspci() {
    let mut args: Vec<&str> = vec!["-object", "memory-backend-ram,id=gpumem,size=64G,reserve=off"];
    for d in DEVICES {
        args.extend(["-device", d]);
    }
    let mut q = Qemu::start(&args);
    let functions = q.firmware(&[0x80]);
    assert!(functions.len() >= 22, "found only {functions:?}");
    let regions = qemu_regions(&mut q);
    let mut configs = Vec::new();
    let mut probed = 0;
    for &b in &functions {
        let config = q.ecam(b);
        let f = Function::decode(&config).unwrap();
        assert!(f.problems.is_empty(), "{b}: {:?}", f.problems);
        let qemu = regions.get(&b).unwrap_or_else(|| panic!("{b} not in query-pci"));
        let sizes = probe(&mut PortIo { q: &mut q, bdf: b }).unwrap();
        assert_eq!(q.ecam(b)[..64], config[..64], "{b}: probe did not restore the header");
        for (i, size) in sizes.bars.iter().enumerate() {
            let want = qemu.get(&(i as u8));
            assert_eq!(*size, want.map(|w| w.0), "{b}: BAR {i} probe size vs QEMU");
            if let (Some(&(_, io, pref, mem64)), Some(reg)) = (want, f.bars.get(i as u8)) {
                let kind = if io {
                    BarKind::Io
                } else if mem64 {
                    BarKind::Mem64
                } else {
                    BarKind::Mem32
                };
                assert_eq!((reg.kind, reg.prefetchable), (kind, pref), "{b}: BAR {i} kind");
            }
        }
        assert_eq!(sizes.rom, qemu.get(&6).map(|w| w.0), "{b}: ROM probe size vs QEMU");
        probed += qemu.len();
        configs.push((b, config));
    }
    assert!(probed >= 30, "only {probed} regions compared");

    let dir = tempfile::tempdir().unwrap();
    let lspci = lspci_offsets(&configs, dir.path());
    for (b, config) in &configs {
        let f = Function::decode(config).unwrap();
        let caps: Vec<u16> = f.capabilities.iter().map(|c| u16::from(c.offset)).collect();
        let ecaps: Vec<u16> = f.extended_capabilities.iter().map(|c| c.offset).collect();
        assert_eq!(lspci[b], (caps, ecaps), "{b}: capability offsets vs lspci");
    }

    let decoded: BTreeMap<Bdf, Function> =
        configs.iter().map(|(b, c)| (*b, Function::decode(c).unwrap())).collect();
    // The nvme with SR-IOV.
    let (nvme_bdf, nvme) = decoded.iter().find(|(_, f)| f.sriov().is_some()).expect("nvme PF with SR-IOV");
    let sr = nvme.sriov().unwrap();
    assert_eq!(sr.total_vfs, 4);
    assert_eq!(sr.vf_device_id, nvme.header.device_id);
    assert!(!sr.vf_bars.bars.is_empty() && sr.vf_bars.errors.is_empty());
    let vf0 = sr.vf_bdf(*nvme_bdf, 0).unwrap();
    assert_eq!(vf0.bus(), nvme_bdf.bus());
    // Root port rp1 with reservations; ports with hotplug.
    let reserves: Vec<_> = decoded.values().filter_map(|f| f.qemu_resource_reserve()).collect();
    let rp1 = reserves.iter().find(|r| r.pref64.is_some()).expect("rp1 reservation");
    assert_eq!(rp1.bus, Some(3));
    assert_eq!(rp1.io, Some(8 << 10));
    assert_eq!(rp1.mem, Some(32 << 20));
    assert_eq!(rp1.pref64, Some(1 << 30));
    assert_eq!(rp1.pref32, None);
    let slots: Vec<(PortType, bool)> = decoded
        .values()
        .filter_map(|f| f.pcie().and_then(|p| p.slot.map(|s| (p.port_type, s.hotplug_capable))))
        .collect();
    assert!(slots.contains(&(PortType::RootPort, true)), "{slots:?}");
    assert!(slots.contains(&(PortType::RootPort, false)), "rp3 has hotplug=off: {slots:?}");
    assert!(slots.contains(&(PortType::SwitchDownstream, true)), "{slots:?}");
    // The 64 GiB ivshmem BAR.
    assert!(regions.values().any(|r| r.get(&2).is_some_and(|w| w.0 == 64 << 30 && w.3)));
    // Conventional devices behind the PCIe-to-PCI bridge have no PCIe capability.
    let conventional =
        decoded.values().filter(|f| f.header.vendor_id == 0x10ec || f.header.device_id == 0x100e);
    assert!(conventional.clone().count() >= 2 && conventional.into_iter().all(|f| !f.is_pcie()));
}

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
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::caps::pcie::PortType;
use pcilibs::decode::Function;
use pcilibs::sizing::probe::{probe, ConfigAccess};
use serde_json::{json, Value};

const QEMU: &str = "qemu-system-x86_64";
const ECAM_BASE: u64 = 0xb000_0000;

struct Qemu {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    _dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn start(devices: &[&str]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-M",
            "q35",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-m",
            "256",
            "-cpu",
            "max,phys-bits=46",
        ])
        .arg("-object")
        .arg("memory-backend-ram,id=gpumem,size=64G,reserve=off")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for d in devices {
            cmd.arg("-device").arg(d);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {QEMU}: {e}; install it (Debian: apt-get install qemu-system-x86)")
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("{QEMU} exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "{QEMU} did not open its QMP socket within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut q = Qemu { child, reader: BufReader::new(stream), writer, _dir: dir };
        q.line(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read (20 s deadline)");
        assert!(!l.is_empty(), "QMP connection closed");
        serde_json::from_str(&l).unwrap()
    }

    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = json!({ "execute": execute, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{execute}: {v}");
        }
    }

    fn hmp(&mut self, line: &str) -> String {
        self.cmd("human-monitor-command", json!({ "command-line": line })).as_str().unwrap().to_string()
    }

    fn cf8(&mut self, b: Bdf, offset: u16) {
        let addr = 0x8000_0000u32
            | (u32::from(b.bus) << 16)
            | (u32::from(b.device) << 11)
            | (u32::from(b.function) << 8)
            | u32::from(offset & 0xfc);
        let out = self.hmp(&format!("o /w 0xcf8 {addr:#x}"));
        assert!(out.is_empty(), "port write: {out}");
    }

    fn read32(&mut self, b: Bdf, offset: u16) -> u32 {
        self.cf8(b, offset);
        let out = self.hmp("i /w 0xcfc");
        let hex = out.trim().rsplit("0x").next().unwrap();
        u32::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("port read: {out:?}"))
    }

    fn write32(&mut self, b: Bdf, offset: u16, value: u32) {
        self.cf8(b, offset);
        let out = self.hmp(&format!("o /w 0xcfc {value:#x}"));
        assert!(out.is_empty(), "port write: {out}");
    }

    /// All 4096 bytes through ECAM (read-only path).
    fn ecam(&mut self, b: Bdf) -> Vec<u8> {
        let base = ECAM_BASE | (u64::from(b.bus) << 20) | (u64::from(b.devfn()) << 12);
        let out = self.hmp(&format!("xp /1024wx {base:#x}"));
        let mut bytes = Vec::with_capacity(4096);
        for line in out.lines() {
            let (_, words) = line.split_once(':').unwrap();
            for w in words.split_whitespace() {
                let v = u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap();
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        assert_eq!(bytes.len(), 4096, "{out}");
        bytes
    }

    /// Enables ECAM (q35 PCIEXBAR at 0xb0000000, 256 buses) and numbers every bridge.
    fn firmware(&mut self) -> Vec<Bdf> {
        let host = Bdf::default();
        self.write32(host, 0x64, 0);
        self.write32(host, 0x60, (ECAM_BASE as u32) | 1);
        let mut found = Vec::new();
        let mut next = 0u8;
        self.scan(0, &mut next, &mut found);
        // pxb-pcie root bus, numbered on the command line.
        next = next.max(0x80);
        self.scan(0x80, &mut next, &mut found);
        found
    }

    fn scan(&mut self, bus: u8, next: &mut u8, found: &mut Vec<Bdf>) {
        for dev in 0..32 {
            for func in 0..8 {
                let b = Bdf::new(0, bus, dev, func).unwrap();
                if self.read32(b, 0) & 0xffff == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                found.push(b);
                let hdr = (self.read32(b, 0x0c) >> 16) as u8;
                if hdr & 0x7f == 1 {
                    *next += 1;
                    let secondary = *next;
                    let old = self.read32(b, 0x18);
                    let with = |sub: u8| {
                        (old & 0xff00_0000)
                            | (u32::from(sub) << 16)
                            | (u32::from(secondary) << 8)
                            | u32::from(bus)
                    };
                    self.write32(b, 0x18, with(0xff));
                    self.scan(secondary, next, found);
                    self.write32(b, 0x18, with(*next));
                }
                if func == 0 && hdr & 0x80 == 0 {
                    break;
                }
            }
        }
    }
}

/// Configuration access to one function through port I/O (first 256 bytes).
struct PortIo<'a> {
    q: &'a mut Qemu,
    bdf: Bdf,
}

impl ConfigAccess for PortIo<'_> {
    type Error = String;
    fn config_size(&self) -> usize {
        256
    }
    fn read_u32(&mut self, offset: u16) -> Result<u32, String> {
        Ok(self.q.read32(self.bdf, offset))
    }
    fn write_u32(&mut self, offset: u16, value: u32) -> Result<(), String> {
        self.q.write32(self.bdf, offset, value);
        Ok(())
    }
}

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
    let mut q = Qemu::start(DEVICES);
    let functions = q.firmware();
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
    assert_eq!(vf0.bus, nvme_bdf.bus);
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

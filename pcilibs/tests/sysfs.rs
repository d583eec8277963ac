//! Sysfs enumeration over trees built in a temporary directory from pciutils' dumps, laid
//! out like the kernel's (`devices/pci0000:00/…`, `bus/pci/devices` links, drivers, IOMMU
//! groups, SR-IOV links), plus the host's own `/sys` compared with `lspci`.

// Host access (sysfs) needs the `std` feature.
#![cfg(feature = "std")]
// Test code: failures panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::caps::pcie::PortType;
use pcilibs::decode::Function;
use pcilibs::dump;
use pcilibs::emulated::EmulatedConfigSpace;
use pcilibs::facts::{passthrough_functions, requirement_of, ResourceOptions};
use pcilibs::sizing::probe::probe;
use pcilibs::sizing::{BarSizes, SizeSource};
use pcilibs::sysfs::{MemberName, Sysfs, SysfsDevice, SysfsError};

fn config_of(file: &str, bdf: &str) -> Vec<u8> {
    let d = dump::parse(&common::dump_text(file));
    d.devices.into_iter().find(|x| x.bdf.to_string().ends_with(bdf)).unwrap().config
}

/// Sizes a test chooses for a config: each BAR as large as its address alignment allows
/// (at most 16 MiB, I/O at most 256), so the tree stays consistent with the registers.
fn choose_sizes(config: &[u8]) -> BarSizes {
    let f = Function::decode(config).unwrap();
    let pick = |addr: u64, kind: BarKind| {
        let cap = if kind == BarKind::Io { 256 } else { 16 << 20 };
        let align = if addr == 0 { cap } else { 1u64 << addr.trailing_zeros() };
        align.min(cap)
    };
    let mut s = BarSizes::empty(SizeSource::Sysfs);
    for b in f.bars.bars.iter().filter(|b| !b.looks_unused()) {
        s.bars[b.index as usize] = Some(pick(b.address, b.kind));
    }
    if f.rom.is_some_and(|r| r.raw != 0) {
        s.rom = Some(pick(u64::from(f.rom.unwrap().address), BarKind::Mem32).max(2048));
    }
    if let Some(sr) = f.sriov() {
        let mut vf = [None; 6];
        for b in sr.vf_bars.bars.iter().filter(|b| !b.looks_unused()) {
            vf[b.index as usize] = Some(pick(b.address, b.kind).max(4096));
        }
        s.vf_bars = Some(vf);
    }
    s
}

/// The text of a sysfs `resource` file for `config` with `sizes` (17 lines: BARs, ROM,
/// SR-IOV, bridge windows — the layout of a kernel with CONFIG_PCI_IOV).
fn resource_text(config: &[u8], sizes: &BarSizes) -> String {
    let f = Function::decode(config).unwrap();
    let line = |start: u64, size: Option<u64>, flags: u64| match size {
        Some(s) => format!("0x{start:016x} 0x{:016x} 0x{flags:016x}\n", start + s - 1),
        None => format!("0x{:016x} 0x{:016x} 0x{:016x}\n", 0, 0, 0),
    };
    let flags = |kind: BarKind, pref: bool| match kind {
        BarKind::Io => 0x101,
        BarKind::Mem64 => 0x0014_0200 | if pref { 0x2000 } else { 0 },
        _ => 0x0004_0200 | if pref { 0x2000 } else { 0 },
    };
    let mut text = String::new();
    for i in 0..6u8 {
        let b = f.bars.get(i);
        let size = sizes.bars[i as usize];
        text += &line(b.map_or(0, |b| b.address), size, b.map_or(0, |b| flags(b.kind, b.prefetchable)));
    }
    text += &line(u64::from(f.rom.map_or(0, |r| r.address)), sizes.rom, 0x4_6200);
    let total = f.sriov().map_or(0, |s| u64::from(s.total_vfs));
    for i in 0..6u8 {
        let reg = f.sriov().and_then(|s| s.vf_bars.get(i).copied());
        let size = sizes.vf_bars.and_then(|v| v[i as usize]).map(|s| s * total);
        text += &line(reg.map_or(0, |b| b.address), size, reg.map_or(0, |b| flags(b.kind, b.prefetchable)));
    }
    for _ in 0..4 {
        text += &line(0, None, 0);
    }
    text
}

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        let t = Tree { dir: tempfile::tempdir().unwrap() };
        for d in
            ["bus/pci/devices", "bus/pci/drivers/vfio-pci", "bus/pci/drivers/pcieport", "kernel/iommu_groups"]
        {
            std::fs::create_dir_all(t.root().join(d)).unwrap();
        }
        t
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a function at `devices/pci0000:00/<chain…>/<bdf>` and returns its directory.
    fn add(&self, chain: &[&str], bdf: &str, config: &[u8], sizes: Option<&BarSizes>) -> PathBuf {
        let mut rel = PathBuf::from("devices/pci0000:00");
        for c in chain {
            rel.push(c);
        }
        rel.push(bdf);
        let dir = self.root().join(&rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config"), config).unwrap();
        // The kernel's `class` attribute: the three class code bytes at 0x09..0x0c.
        let class = u32::from_le_bytes([config[9], config[10], config[11], 0]);
        std::fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
        if let Some(s) = sizes {
            std::fs::write(dir.join("resource"), resource_text(config, s)).unwrap();
        }
        symlink(Path::new("../../..").join(&rel), self.root().join("bus/pci/devices").join(bdf)).unwrap();
        dir
    }

    /// `<dir>/<name>` → a link to `<root>/<target>`, relative like the kernel's.
    fn link(&self, dir: &Path, name: &str, target: &str) {
        let depth = dir.strip_prefix(self.root()).unwrap().components().count();
        let up: PathBuf = std::iter::repeat("..").take(depth).collect();
        symlink(up.join(target), dir.join(name)).unwrap();
    }

    fn group(&self, n: u32, members: &[(&str, &Path)]) {
        let g = self.root().join(format!("kernel/iommu_groups/{n}/devices"));
        std::fs::create_dir_all(&g).unwrap();
        for (bdf, dir) in members {
            let rel = dir.strip_prefix(self.root()).unwrap();
            symlink(Path::new("../../../..").join(rel), g.join(bdf)).unwrap();
            self.link(dir, "iommu_group", &format!("kernel/iommu_groups/{n}"));
        }
    }
}

/// A tree: root port 00:1c.0 → endpoint 02:00.0 (SR-IOV PF, two VFs) + 02:00.1 (audio-like)
/// + 02:00.2 (class 0x0680), all in IOMMU group 7 with the port.
fn build() -> (Tree, Vec<(Bdf, BarSizes)>) {
    let t = Tree::new();
    let port_cfg = config_of("bridge-ctl-vga16", "00:1c.0");
    let pf_cfg = config_of("cap-pcie-2", "01:00.0");
    let gpu_cfg = config_of("cap-rebar", "09:00.0");
    let mut nvswitch_cfg = gpu_cfg.clone();
    nvswitch_cfg[0x0a] = 0x80; // class 0x0680: "other bridge", as NVSwitch reports
    nvswitch_cfg[0x0b] = 0x06;
    let mut sized = Vec::new();
    let port_sizes = choose_sizes(&port_cfg);
    let port = t.add(&[], "0000:00:1c.0", &port_cfg, Some(&port_sizes));
    sized.push((Bdf::parse("0000:00:1c.0").unwrap(), port_sizes));
    let mut members = vec![("0000:00:1c.0", port.clone())];
    t.link(&port, "driver", "bus/pci/drivers/pcieport");
    for (bdf, cfg) in [("0000:02:00.0", &pf_cfg), ("0000:02:00.1", &gpu_cfg), ("0000:02:00.2", &nvswitch_cfg)]
    {
        let sizes = choose_sizes(cfg);
        let dir = t.add(&["0000:00:1c.0"], bdf, cfg, Some(&sizes));
        t.link(&dir, "driver", "bus/pci/drivers/vfio-pci");
        std::fs::write(dir.join("numa_node"), "1\n").unwrap();
        sized.push((Bdf::parse(bdf).unwrap(), sizes));
        members.push((bdf, dir));
    }
    let pf = members[1].1.clone();
    std::fs::write(pf.join("sriov_totalvfs"), "8\n").unwrap();
    std::fs::write(pf.join("sriov_numvfs"), "2\n").unwrap();
    // VFs 0 and 10 (numeric, not lexical, order), with physfn links back.
    for (n, bdf) in [(10, "0000:02:01.2"), (0, "0000:02:00.4")] {
        // A VF's vendor and device ID read as 0xffff; sysfs has the real ones.
        let mut vf_cfg = vec![0u8; 256];
        vf_cfg[..4].copy_from_slice(&[0xff; 4]);
        let dir = t.add(&["0000:00:1c.0"], bdf, &vf_cfg, None);
        std::fs::write(dir.join("vendor"), "0x8086\n").unwrap();
        std::fs::write(dir.join("device"), "0x10ed\n").unwrap();
        t.link(&pf, &format!("virtfn{n}"), &dir.strip_prefix(t.root()).unwrap().display().to_string());
        t.link(&dir, "physfn", &pf.strip_prefix(t.root()).unwrap().display().to_string());
    }
    let refs: Vec<(&str, &Path)> = members.iter().map(|(b, d)| (*b, d.as_path())).collect();
    t.group(7, &refs);
    (t, sized)
}

#[test]
fn enumerates_a_kernel_like_tree() {
    let (t, sized) = build();
    let sys = Sysfs::new(t.root());
    let list: Vec<String> = sys.functions().unwrap().iter().map(Bdf::to_string).collect();
    assert_eq!(
        list,
        ["0000:00:1c.0", "0000:02:00.0", "0000:02:00.1", "0000:02:00.2", "0000:02:00.4", "0000:02:01.2"]
    );

    let pf_bdf = Bdf::parse("0000:02:00.0").unwrap();
    let host = sys.host_device(pf_bdf).unwrap();
    let f = &host.facts;
    assert_eq!(f.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(f.iommu_group, Some(7));
    assert_eq!(f.numa_node, Some(1));
    assert!(f.is_pcie);
    assert_eq!(f.port_type, Some(PortType::Endpoint));
    assert_eq!(host.upstream_bridges, [Bdf::parse("0000:00:1c.0").unwrap()]);
    assert_eq!(host.iommu_group_members.len(), 4);
    let vfs: Vec<String> = host.virtual_functions.iter().map(Bdf::to_string).collect();
    assert_eq!(vfs, ["0000:02:00.4", "0000:02:01.2"]);
    assert_eq!(host.physical_function, None);
    let vf = sys.device(Bdf::parse("0000:02:01.2").unwrap());
    assert_eq!(vf.physical_function().unwrap(), Some(pf_bdf));
    assert!(vf.resource().unwrap().is_none(), "no resource file: no sizes");
    let vf_facts = vf.facts().unwrap();
    assert_eq!((vf_facts.vendor_id, vf_facts.device_id), (0x8086, 0x10ed));
    assert_eq!(vf_facts.size_source, None);
    assert_eq!(sys.device(Bdf::parse("0000:00:1c.0").unwrap()).upstream_bridges().unwrap(), []);

    // Sizes read back from the resource file are the ones the tree was built with.
    for (bdf, want) in &sized {
        let f = sys.facts(*bdf).unwrap();
        assert_eq!(f.size_source, Some(SizeSource::Sysfs));
        for b in &f.bars {
            assert_eq!(b.size, want.bars[b.index as usize], "{bdf} BAR {}", b.index);
        }
        assert_eq!(f.rom_size, want.rom, "{bdf} ROM");
        if let Some(sr) = &f.sriov {
            assert_eq!(sr.total_vfs, 8);
            for b in &sr.vf_bars {
                assert_eq!(b.size, want.vf_bars.unwrap()[b.index as usize], "{bdf} VF BAR {}", b.index);
            }
        }
    }
}

#[test]
fn probe_on_emulated_config_equals_sysfs() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    let mut compared = 0;
    for bdf in sys.functions().unwrap() {
        let dev = sys.device(bdf);
        let config = dev.config().unwrap();
        let total = Function::decode(&config).ok().and_then(|f| f.sriov().map(|s| s.total_vfs));
        let Some(from_sysfs) = dev.sizes(total).unwrap() else { continue };
        let mut emu = EmulatedConfigSpace::with_sizes(&config, &from_sysfs).unwrap();
        let before = emu.bytes().to_vec();
        let probed = probe(&mut emu).unwrap();
        assert_eq!(probed.bars, from_sysfs.bars, "{bdf}");
        assert_eq!(probed.rom, from_sysfs.rom, "{bdf}");
        assert_eq!(probed.vf_bars, from_sysfs.vf_bars, "{bdf}");
        assert_eq!(emu.bytes(), &before[..], "{bdf}: probe restores every register");
        compared += 1;
    }
    assert_eq!(compared, 4);
    // The endpoints really have BARs and VF BARs of the chosen sizes.
    let pf = sys.facts(Bdf::parse("0000:02:00.0").unwrap()).unwrap();
    assert!(!pf.bars.is_empty() && pf.bars.iter().all(|b| b.size.is_some()));
    assert!(pf.sriov.unwrap().vf_bars.iter().any(|b| b.size.is_some()));
}

#[test]
fn group_companions_and_requirement() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    let members = sys.device(Bdf::parse("0000:02:00.0").unwrap()).iommu_group_members().unwrap();
    let facts: Vec<_> = members.iter().map(|b| sys.facts(*b).unwrap()).collect();
    let kept: Vec<String> = passthrough_functions(&facts).iter().map(|f| f.bdf.to_string()).collect();
    assert_eq!(kept, ["0000:02:00.0", "0000:02:00.1", "0000:02:00.2"], "the root port goes, 0x0680 stays");
    let chosen: Vec<_> = passthrough_functions(&facts).into_iter().cloned().collect();
    let plain = requirement_of(&chosen, &ResourceOptions::default()).unwrap();
    let all = ResourceOptions::all();
    let full = requirement_of(&chosen, &all).unwrap();
    assert!(full.pref.size > plain.pref.size, "VF BARs and ReBAR maxima add to the 64-bit window");
    // cap-rebar's BAR 0 can grow to 4 GiB; the 64-bit window must align to it.
    assert_eq!(full.pref.align, 4 << 30);
}

#[test]
fn a_non_root_reader_gets_sriov_facts_from_the_sriov_files() {
    let (t, sized) = build();
    let sys = Sysfs::new(t.root());
    let pf_bdf = Bdf::parse("0000:02:00.0").unwrap();
    let full = sys.facts(pf_bdf).unwrap();
    // What a non-root reader sees: the 64-byte header only, plus the kernel's files.
    let pf = sys.device(pf_bdf);
    let config = std::fs::read(pf.path().join("config")).unwrap();
    std::fs::write(pf.path().join("config"), &config[..64]).unwrap();
    std::fs::write(pf.path().join("sriov_offset"), "384\n").unwrap();
    std::fs::write(pf.path().join("sriov_stride"), "2\n").unwrap();
    std::fs::write(pf.path().join("sriov_vf_device"), "10ca\n").unwrap();
    let f = sys.facts(pf_bdf).unwrap();
    assert!(f.problems.iter().any(|p| p.contains("needs root")), "{:?}", f.problems);
    assert_eq!(f.bars, full.bars, "BARs are in the header");
    let (want, got) = (full.sriov.unwrap(), f.sriov.unwrap());
    assert_eq!((got.total_vfs, got.num_vfs, got.vf_device_id), (8, 2, want.vf_device_id));
    assert_eq!((got.first_vf_offset, got.vf_stride), (want.first_vf_offset, want.vf_stride));
    assert_eq!(got.vf_bars, want.vf_bars, "VF BAR kinds from resource flags, sizes per VF");
    assert!(sized.iter().any(|(b, s)| *b == pf_bdf && s.vf_bars.is_some()));
}

#[test]
fn nothing_read_from_the_tree_leaves_it() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    let pf = sys.device(Bdf::parse("0000:02:00.0").unwrap());
    assert!(pf.path().starts_with(sys.devices_dir()));
    // A virtfn link whose target is not a PCI address is an error, not a path.
    symlink("../../../../../etc", pf.path().join("virtfn3")).unwrap();
    assert!(matches!(pf.virtual_functions(), Err(SysfsError::Bdf { .. })));
    // An IOMMU group link whose name is not a number is an error.
    let gpu = sys.device(Bdf::parse("0000:02:00.1").unwrap());
    std::fs::remove_file(gpu.path().join("iommu_group")).unwrap();
    symlink("../../../../kernel/iommu_groups/7x", gpu.path().join("iommu_group")).unwrap();
    assert!(matches!(gpu.iommu_group(), Err(SysfsError::BadValue { .. })));
    // A directory that is not named by an address cannot be opened as a function.
    let odd = t.root().join("not-a-function");
    std::fs::create_dir(&odd).unwrap();
    assert!(matches!(SysfsDevice::open_dir(&odd), Err(SysfsError::Bdf { .. })));
    // Broken files are errors.
    std::fs::write(pf.path().join("numa_node"), "one\n").unwrap();
    assert!(matches!(pf.numa_node(), Err(SysfsError::BadValue { .. })));
    std::fs::write(pf.path().join("resource"), "0x0 0x1\n").unwrap();
    assert!(matches!(pf.facts(), Err(SysfsError::Sizing { .. })));
}

/// `lspci -D -vv` of this host: bdf → region index → size in bytes.
fn lspci_sizes() -> std::collections::BTreeMap<Bdf, Vec<(u8, u64)>> {
    let out = Command::new("lspci")
        .args(["-D", "-vv"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run lspci: {e}; install pciutils (apt-get install pciutils)"));
    assert!(out.status.success());
    let mut map = std::collections::BTreeMap::new();
    let mut cur = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.starts_with('\t') && !line.is_empty() {
            cur = Bdf::parse(line.split(' ').next().unwrap()).ok();
            map.insert(cur.unwrap(), Vec::new());
        } else if let (Some(rest), Some(b)) = (line.trim().strip_prefix("Region "), cur) {
            let idx: u8 = rest.split(':').next().unwrap().parse().unwrap();
            if let Some(sz) = rest.split("[size=").nth(1) {
                let sz = sz.split(']').next().unwrap();
                let (num, unit) = sz.split_at(sz.find(|c: char| !c.is_ascii_digit()).unwrap_or(sz.len()));
                let mult = match unit {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    "T" => 1 << 40,
                    u => panic!("unit {u}"),
                };
                map.get_mut(&b).unwrap().push((idx, num.parse::<u64>().unwrap() * mult));
            }
        }
    }
    map
}

#[test]
fn host_sysfs_agrees_with_lspci() {
    let sys = Sysfs::default();
    assert!(
        sys.devices_dir().is_dir(),
        "{} missing: this test needs a Linux host with sysfs mounted",
        sys.devices_dir().display()
    );
    let list = sys.functions().unwrap();
    assert!(!list.is_empty(), "no PCI functions on this host");
    let want = lspci_sizes();
    for bdf in list {
        let f = sys.facts(bdf).unwrap();
        let got: Vec<(u8, u64)> = f.bars.iter().filter_map(|b| b.size.map(|s| (b.index, s))).collect();
        assert_eq!(got, want[&bdf], "{bdf}: BAR sizes vs lspci");
        let host = sys.host_device(bdf).unwrap();
        if let Some(g) = f.iommu_group {
            assert!(host.iommu_group_members.contains(&bdf), "{bdf} not in its own group {g}");
            let group = sys.iommu_group(g).unwrap();
            assert_eq!(group.functions(), host.iommu_group_members, "{bdf}: group {g} read two ways");
            let member = group.members.iter().find(|m| m.name == MemberName::Pci(bdf)).unwrap();
            assert_eq!(member.driver, f.driver, "{bdf}: driver read two ways");
        }
        // A function with an iommufd character device maps back to itself.
        if let Some(cdev) = sys.vfio_cdev(bdf).unwrap() {
            assert_eq!(sys.function_of_cdev(&cdev).unwrap(), bdf, "{}", cdev.display());
        }
    }
}

/// A VF's BAR registers read as zero; the facts take each BAR's type from the `resource`
/// file. Seen on a real kernel: an nvme VF (QEMU 7.2, Linux 6.1) has a 64-bit BAR 0 that
/// `vfio-pci` reports as such, while the zero register decoded as a 32-bit BAR.
#[test]
fn a_vf_bar_type_comes_from_the_resource_flags() {
    let (t, _) = build();
    let vf = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.4");
    let line = |start: u64, size: u64, flags: u64| {
        format!("0x{start:016x} 0x{:016x} 0x{flags:016x}\n", start + size - 1)
    };
    let zero = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
    let mut text = line(0x38_0000_4000, 0x4000, 0x0014_2204); // 64-bit prefetchable BAR 0
    text += zero; // its upper half
    text += &line(0xfe60_0000, 0x1000, 0x0004_0200); // 32-bit BAR 2
    text += &line(0x1000, 0x20, 0x0004_0101); // I/O BAR 3
    text += &zero.repeat(13);
    std::fs::write(vf.join("resource"), text).unwrap();
    let facts = Sysfs::new(t.root()).facts(Bdf::parse("0000:02:00.4").unwrap()).unwrap();
    let bars: Vec<_> = facts.bars.iter().map(|b| (b.index, b.kind, b.prefetchable, b.size)).collect();
    assert_eq!(
        bars,
        [
            (0, BarKind::Mem64, true, Some(0x4000)),
            (2, BarKind::Mem32, false, Some(0x1000)),
            (3, BarKind::Io, false, Some(0x20)),
        ]
    );
    assert_eq!((facts.vendor_id, facts.device_id), (0x8086, 0x10ed));
    // A PF keeps what its own registers say.
    let pf = Sysfs::new(t.root()).facts(Bdf::parse("0000:02:00.0").unwrap()).unwrap();
    assert!(pf.bars.iter().all(|b| b.size.is_some()));
}

/// Runs `f` on a thread and gives its result, or fails the test when it has not finished
/// within `seconds` (a read that blocks for good would otherwise hang the test run).
fn within<T: Send + 'static>(seconds: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(seconds))
        .unwrap_or_else(|_| panic!("did not finish within {seconds} s"))
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo (coreutils)");
    assert!(st.success());
}

/// A `config` that is a FIFO: opening it for reading blocked until a writer came, for
/// good. It is refused before it is read.
#[test]
fn a_fifo_config_is_refused_not_waited_on() {
    let (t, _) = build();
    let dev = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.1");
    mkfifo(&dev.join("config"));
    let root = t.root().to_path_buf();
    let got = within(10, move || Sysfs::new(root).facts(Bdf::parse("0000:02:00.1").unwrap()).map(|_| ()));
    let e = got.expect_err("a FIFO is not configuration space");
    assert!(e.to_string().contains("FIFO"), "{e}");
}

/// The same for `resource`, read for the BAR sizes.
#[test]
fn a_fifo_resource_is_refused_not_waited_on() {
    let (t, _) = build();
    let dev = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.1");
    mkfifo(&dev.join("resource"));
    let root = t.root().to_path_buf();
    let got = within(10, move || Sysfs::new(root).facts(Bdf::parse("0000:02:00.1").unwrap()).map(|_| ()));
    let e = got.expect_err("a FIFO is not a resource file");
    assert!(e.to_string().contains("FIFO"), "{e}");
}

/// `numa_node` linked to `/dev/zero`: it was read until memory ran out. A character
/// device is refused before it is read.
#[test]
fn numa_node_linked_to_dev_zero_is_refused() {
    let (t, _) = build();
    let dev = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.1");
    std::fs::remove_file(dev.join("numa_node")).unwrap();
    symlink("/dev/zero", dev.join("numa_node")).unwrap();
    let root = t.root().to_path_buf();
    let got = within(10, move || Sysfs::new(root).facts(Bdf::parse("0000:02:00.1").unwrap()).map(|_| ()));
    let e = got.expect_err("/dev/zero is not a sysfs attribute");
    assert!(e.to_string().contains("character device"), "{e}");
}

/// A 1 GiB sparse `resource` file: it was read whole (1 GiB of memory, a minute). The
/// read stops one byte past the limit of a sysfs attribute.
#[test]
fn a_huge_resource_file_is_refused_after_a_bounded_read() {
    let (t, _) = build();
    let dev = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.1");
    let f = std::fs::OpenOptions::new().write(true).truncate(true).open(dev.join("resource")).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let root = t.root().to_path_buf();
    let start = std::time::Instant::now();
    let got = within(20, move || Sysfs::new(root).facts(Bdf::parse("0000:02:00.1").unwrap()).map(|_| ()));
    let e = got.expect_err("no resource file is 1 GiB");
    assert!(e.to_string().contains("longer than"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "took {:?}", start.elapsed());
}

/// The typed errors behind the messages above, and a `config` longer than 4096 bytes.
#[test]
fn special_and_oversized_files_are_typed_errors() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    let dev = sys.device(Bdf::parse("0000:02:00.1").unwrap());
    mkfifo(&dev.path().join("sriov_numvfs"));
    assert!(matches!(
        dev.sriov_numvfs(),
        Err(SysfsError::NotRegularFile { kind: "a FIFO", ref path }) if path.ends_with("sriov_numvfs")
    ));
    std::fs::create_dir(dev.path().join("sriov_totalvfs")).unwrap();
    assert!(matches!(dev.sriov_totalvfs(), Err(SysfsError::NotRegularFile { kind: "a directory", .. })));
    let mut big = dev.config().unwrap();
    big.resize(4097, 0);
    std::fs::write(dev.path().join("config"), &big).unwrap();
    assert!(matches!(dev.config(), Err(SysfsError::TooLarge { limit: 4096, .. })));
    big.truncate(4096);
    std::fs::write(dev.path().join("config"), &big).unwrap();
    assert_eq!(dev.config().unwrap().len(), 4096);
    // What sysfs holds for real is read as before: regular files through symlinks.
    let cpuinfo = pcilibs::sysfs::read_regular_prefix(Path::new("/proc/cpuinfo"), 100).unwrap();
    assert!(!cpuinfo.is_empty() && cpuinfo.len() <= 100);
    assert!(matches!(
        pcilibs::sysfs::read_regular_prefix(Path::new("/dev/null"), 100),
        Err(SysfsError::NotRegularFile { kind: "a character device", .. })
    ));
}

/// A sysfs `resource` line covering all 2^64 addresses with a memory BAR's flags:
/// `Sysfs::facts` panicked "attempt to add with overflow" (debug builds) or dropped the
/// BAR (release builds). It is a typed error naming the file.
#[test]
fn a_resource_line_of_all_addresses_is_a_typed_error() {
    let (t, _) = build();
    let dev = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.1");
    let mut text = String::from("0x0 0xffffffffffffffff 0x40200\n");
    text += &"0x0 0x0 0x0\n".repeat(16);
    std::fs::write(dev.join("resource"), text).unwrap();
    let root = t.root().to_path_buf();
    let got =
        std::thread::spawn(move || Sysfs::new(root).facts(Bdf::parse("0000:02:00.1").unwrap()).map(|_| ()))
            .join()
            .expect("no panic");
    let e = got.expect_err("a BAR of 2^64 bytes does not exist");
    assert!(e.to_string().contains("resource"), "{e}");
    let sys = Sysfs::new(t.root());
    let sized = sys.device(Bdf::parse("0000:02:00.1").unwrap()).sizes(None);
    assert!(matches!(sized, Err(SysfsError::Sizing { .. })), "{sized:?}");
}

/// An Intel VMD controller's functions live in domains from 0x10000, named with five
/// digits (`10000:e1:00.0`, below `pci10000:e0`): `Sysfs::functions` dropped them
/// without a word. They are listed and read like any other.
#[test]
fn functions_behind_vmd_are_listed() {
    let (t, _) = build();
    let cfg = config_of("cap-pcie-2", "01:00.0");
    let bridge_cfg = config_of("bridge-ctl-vga16", "00:1c.0");
    let vmd = t.add(&[], "0000:00:0e.0", &cfg, None);
    let _port = t.add(&["0000:00:0e.0", "pci10000:e0"], "10000:e0:06.0", &bridge_cfg, None);
    let nvme = t.add(&["0000:00:0e.0", "pci10000:e0", "10000:e0:06.0"], "10000:e1:00.0", &cfg, None);
    assert!(vmd.is_dir() && nvme.is_dir());
    let sys = Sysfs::new(t.root());
    let list: Vec<String> = sys.functions().unwrap().iter().map(Bdf::to_string).collect();
    assert!(list.contains(&"10000:e1:00.0".to_string()), "{list:?}");
    assert_eq!(list.last().map(String::as_str), Some("10000:e1:00.0"), "sorted by domain first");
    let bdf = Bdf::parse("10000:e1:00.0").unwrap();
    let host = sys.host_device(bdf).unwrap();
    assert_eq!(host.facts.bdf, bdf);
    assert_eq!(host.upstream_bridges, [Bdf::parse("10000:e0:06.0").unwrap()]);
    assert_eq!(serde_json::to_value(&host.facts).unwrap()["bdf"], "10000:e1:00.0");
}

/// Nothing is left out of a listing without a word: an entry of `bus/pci/devices` (or of
/// an IOMMU group) whose name is not a PCI address is an error naming it.
#[test]
fn names_that_are_not_addresses_are_errors_not_skipped() {
    for odd in ["0000:00:1c.0x", "..hidden", "01000:00:00.0", "pci0000:00"] {
        let (t, _) = build();
        std::fs::create_dir(t.root().join("bus/pci/devices").join(odd)).unwrap();
        let e = Sysfs::new(t.root()).functions().unwrap_err();
        assert!(matches!(&e, SysfsError::Bdf { path, .. } if path.ends_with(odd)), "{odd}: {e}");
        assert!(e.to_string().contains(odd), "{e}");
    }
    let (t, _) = build();
    std::fs::create_dir(t.root().join("kernel/iommu_groups/7/devices/ff100000.dma")).unwrap();
    let sys = Sysfs::new(t.root());
    let members = sys.device(Bdf::parse("0000:02:00.0").unwrap()).iommu_group_members();
    assert!(matches!(members, Err(SysfsError::Bdf { .. })), "{members:?}");
}

fn bdf(text: &str) -> Bdf {
    Bdf::parse(text).unwrap()
}

/// Points `dir/driver` at `bus/pci/drivers/<driver>` (made when missing), replacing any
/// link there, as a probe does.
fn set_driver(t: &Tree, dir: &Path, driver: Option<&str>) {
    let _ = std::fs::remove_file(dir.join("driver"));
    if let Some(d) = driver {
        std::fs::create_dir_all(t.root().join("bus/pci/drivers").join(d)).unwrap();
        t.link(dir, "driver", &format!("bus/pci/drivers/{d}"));
    }
}

/// Group 7 of the tree: the root port (a bridge on `pcieport`) and three functions on
/// `vfio-pci`. Viable; a member on a host driver makes it not viable and is named; an
/// unbound member is fine.
#[test]
fn iommu_group_members_drivers_and_viability() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    let g = sys.iommu_group(7).unwrap();
    let names: Vec<String> = g.members.iter().map(|m| m.name.to_string()).collect();
    assert_eq!(names, ["0000:00:1c.0", "0000:02:00.0", "0000:02:00.1", "0000:02:00.2"]);
    assert!(g.members[0].bridge && g.members[0].driver.as_deref() == Some("pcieport"));
    assert!(g.members[1..].iter().all(|m| !m.bridge && m.driver.as_deref() == Some("vfio-pci")));
    assert!(g.is_viable());
    assert_eq!(g.functions().len(), 4);
    assert_eq!(sys.viable_group(7).unwrap(), g);

    let audio = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.1");
    set_driver(&t, &audio, Some("snd_hda_intel"));
    let e = sys.viable_group(7).unwrap_err();
    match &e {
        SysfsError::GroupNotViable { group: 7, member: MemberName::Pci(b), driver } => {
            assert_eq!((b.to_string().as_str(), driver.as_str()), ("0000:02:00.1", "snd_hda_intel"));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("bind it to vfio-pci"), "{e}");
    assert!(!sys.iommu_group(7).unwrap().is_viable());
    set_driver(&t, &audio, None);
    assert!(sys.viable_group(7).is_ok(), "a member on no driver does not block");
    set_driver(&t, &audio, Some("pci-stub"));
    assert!(sys.viable_group(7).is_ok(), "pci-stub does not block");
}

/// A group holding a mediated device (named by UUID) and a platform device: both are
/// members under their own names, judged by their driver.
#[test]
fn non_pci_group_members_are_named_and_judged_by_driver() {
    let (t, _) = build();
    let mdev = t.root().join("devices/vfio_ccw/6dfd3ec5-e8b3-4e18-a6fe-57bc9eceb920");
    let dma = t.root().join("devices/platform/ff100000.dma");
    for d in [&mdev, &dma] {
        std::fs::create_dir_all(d).unwrap();
    }
    t.group(9, &[("6dfd3ec5-e8b3-4e18-a6fe-57bc9eceb920", &mdev), ("ff100000.dma", &dma)]);
    set_driver(&t, &mdev, Some("vfio_ccw_mdev"));
    set_driver(&t, &dma, Some("pl330"));
    let sys = Sysfs::new(t.root());
    let g = sys.iommu_group(9).unwrap();
    assert!(g.functions().is_empty());
    assert_eq!(g.members.len(), 2);
    let e = sys.viable_group(9).unwrap_err();
    assert!(e.to_string().contains("ff100000.dma is bound to pl330"), "{e}");
    set_driver(&t, &dma, None);
    let path = Path::new("/sys/devices/vfio_ccw/6dfd3ec5-e8b3-4e18-a6fe-57bc9eceb920");
    assert_eq!(sys.check_vfio_device(path).unwrap().map(|g| g.number), Some(9));
}

/// The checks a runtime makes before it hot-plugs a function: it exists, it has a group,
/// the group is viable; and by sysfs path (`sysfsdev=`), where a matrix device has no
/// group. Paths outside `/sys` are refused before anything is read.
#[test]
fn vfio_checks_by_address_and_by_sysfs_path() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    assert_eq!(sys.check_vfio_function(bdf("0000:02:00.0")).unwrap().number, 7);
    let e = sys.check_vfio_function(bdf("0000:09:00.0")).unwrap_err();
    assert!(matches!(e, SysfsError::NoDevice { .. }) && e.to_string().contains("does not exist"), "{e}");
    let vf = sys.check_vfio_function(bdf("0000:02:01.2")).unwrap_err();
    assert!(
        matches!(vf, SysfsError::NoIommuGroup { .. }) && vf.to_string().contains("intel_iommu=on"),
        "{vf}"
    );

    let by_path = sys.check_vfio_device(Path::new("/sys/bus/pci/devices/0000:02:00.0")).unwrap();
    assert_eq!(by_path.map(|g| g.number), Some(7));
    let matrix = t.root().join("devices/vfio_ap/matrix/4b8a1a4c-8a3b-4a0f-9d4b-1f2e3d4c5b6a");
    std::fs::create_dir_all(&matrix).unwrap();
    let ap = Path::new("/sys/devices/vfio_ap/matrix/4b8a1a4c-8a3b-4a0f-9d4b-1f2e3d4c5b6a");
    assert_eq!(sys.check_vfio_device(ap).unwrap(), None, "a matrix device has no group");
    let gone = Path::new("/sys/devices/vfio_ap/matrix/00000000-0000-0000-0000-000000000000");
    assert!(matches!(sys.check_vfio_device(gone), Err(SysfsError::NoDevice { .. })));
    for outside in ["/etc/passwd", "sys/bus", "/sys/../etc", "/sys/bus/../../etc"] {
        let e = sys.check_vfio_device(Path::new(outside)).unwrap_err();
        assert!(matches!(e, SysfsError::NotInTree { .. }), "{outside}: {e}");
    }
}

/// A member's `class` that is a FIFO or `/dev/zero`: refused as not a regular file,
/// without blocking or reading without end.
#[test]
fn a_special_class_file_in_a_group_is_refused_not_read() {
    let (t, _) = build();
    let class = t.root().join("devices/pci0000:00/0000:00:1c.0/class");
    mkfifo(&class);
    let root = t.root().to_path_buf();
    let e = within(10, move || Sysfs::new(root).viable_group(7).map(|_| ())).unwrap_err();
    assert!(matches!(e, SysfsError::NotRegularFile { kind: "a FIFO", .. }), "{e}");
    std::fs::remove_file(&class).unwrap();
    symlink("/dev/zero", &class).unwrap();
    let root = t.root().to_path_buf();
    let e = within(10, move || Sysfs::new(root).viable_group(7).map(|_| ())).unwrap_err();
    assert!(matches!(e, SysfsError::NotRegularFile { kind: "a character device", .. }), "{e}");
}

/// `/dev/vfio/<group>` gives the group's functions; the container node and paths elsewhere
/// are not group nodes.
#[test]
fn a_group_node_gives_the_group_functions() {
    let (t, _) = build();
    let dev = tempfile::tempdir().unwrap();
    let sys = Sysfs::new(t.root()).with_dev(dev.path());
    assert_eq!(sys.vfio_group_node(7), dev.path().join("vfio/7"));
    let g = sys.group_of_node(&dev.path().join("vfio/7")).unwrap();
    assert_eq!(
        g.functions(),
        [bdf("0000:00:1c.0"), bdf("0000:02:00.0"), bdf("0000:02:00.1"), bdf("0000:02:00.2")]
    );
    for bad in [dev.path().join("vfio/vfio"), dev.path().join("vfio/7x"), PathBuf::from("/tmp/7")] {
        assert!(matches!(sys.group_of_node(&bad), Err(SysfsError::NotInTree { .. })), "{}", bad.display());
    }
    assert!(matches!(sys.group_of_node(&dev.path().join("vfio/8")), Err(SysfsError::Io { .. })));
}

/// The iommufd character device of a function and back: found through `vfio-dev/vfio<N>`
/// only when the node exists (Linux 6.1 lists it in sysfs without making the node), and
/// mapped back through `class/vfio-dev/vfio<N>/device`.
#[test]
fn cdev_to_function_and_back() {
    let (t, _) = build();
    let dev = tempfile::tempdir().unwrap();
    let sys = Sysfs::new(t.root()).with_dev(dev.path());
    let f = bdf("0000:02:00.0");
    let fdir = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.0");
    assert_eq!(sys.vfio_cdev(f).unwrap(), None, "no vfio-dev directory");
    std::fs::create_dir_all(fdir.join("vfio-dev/vfio3")).unwrap();
    std::fs::create_dir_all(t.root().join("class/vfio-dev")).unwrap();
    t.link(
        &t.root().join("class/vfio-dev"),
        "vfio3",
        "devices/pci0000:00/0000:00:1c.0/0000:02:00.0/vfio-dev/vfio3",
    );
    t.link(&fdir.join("vfio-dev/vfio3"), "device", "devices/pci0000:00/0000:00:1c.0/0000:02:00.0");
    assert_eq!(sys.vfio_cdev(f).unwrap(), None, "listed in sysfs but no node (Linux 6.1)");
    std::fs::create_dir_all(dev.path().join("vfio/devices")).unwrap();
    std::fs::write(dev.path().join("vfio/devices/vfio3"), b"").unwrap();
    let node = sys.vfio_cdev(f).unwrap().unwrap();
    assert_eq!(node, dev.path().join("vfio/devices/vfio3"));
    assert_eq!(sys.function_of_cdev(&node).unwrap(), f);
    assert_eq!(sys.iommufd_node(), None);
    std::fs::write(dev.path().join("iommu"), b"").unwrap();
    assert_eq!(sys.iommufd_node(), Some(dev.path().join("iommu")));
    for bad in [dev.path().join("vfio/devices/vfiox"), dev.path().join("vfio/7"), PathBuf::from("/dev/null")]
    {
        assert!(matches!(sys.function_of_cdev(&bad), Err(SysfsError::NotInTree { .. })), "{}", bad.display());
    }
    let missing = sys.function_of_cdev(&dev.path().join("vfio/devices/vfio4")).unwrap_err();
    assert!(matches!(missing, SysfsError::NoDevice { .. }), "{missing}");
}

/// The functions below a bridge and a VF's configuration space as `vfio-pci` shows it.
#[test]
fn downstream_functions_and_completed_config() {
    let (t, _) = build();
    let sys = Sysfs::new(t.root());
    let below: Vec<String> =
        sys.device(bdf("0000:00:1c.0")).downstream_functions().unwrap().iter().map(Bdf::to_string).collect();
    assert_eq!(below, ["0000:02:00.0", "0000:02:00.1", "0000:02:00.2", "0000:02:00.4", "0000:02:01.2"]);
    assert!(sys.device(bdf("0000:02:00.1")).downstream_functions().unwrap().is_empty());
    let vf = sys.device(bdf("0000:02:00.4"));
    assert_eq!(&vf.config().unwrap()[..4], &[0xff; 4]);
    assert_eq!(&vf.completed_config().unwrap()[..4], &[0x86, 0x80, 0xed, 0x10]);
    let pf = sys.device(bdf("0000:02:00.0"));
    assert_eq!(pf.completed_config().unwrap(), pf.config().unwrap(), "a PF is returned as read");
}

/// What the kernel does on the writes `bind_vfio` and `create_vfs` make, played in a
/// temporary tree: the kernel cannot be involved without taking a device of this machine
/// away from it, so a thread acts as the PCI core and vfio-pci would, a little later each
/// time. The real thing runs in the `nested-vfio` end-to-end scenarios (`cargo xtask e2e`),
/// where the same calls bind emulated devices inside a guest.
struct FakeKernel {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKernel {
    fn start(root: PathBuf, dev: PathBuf, step: impl Fn(&Path, &Path) + Send + 'static) -> FakeKernel {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                step(&root, &dev);
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
        });
        FakeKernel { stop, thread: Some(thread) }
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A function of the tree on `e1000e`, with the attributes the kernel has for it.
fn on_e1000e(t: &Tree) -> PathBuf {
    let fdir = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.2");
    set_driver(t, &fdir, Some("e1000e"));
    for attr in ["bus/pci/drivers/e1000e/unbind", "bus/pci/drivers/vfio-pci/unbind", "bus/pci/drivers_probe"]
    {
        std::fs::write(t.root().join(attr), b"").unwrap();
    }
    std::fs::write(fdir.join("driver_override"), b"(null)\n").unwrap();
    fdir
}

/// Unbinding from the old driver, `driver_override`, `drivers_probe`, then the wait for
/// the driver and the group node; a function already on vfio-pci is not touched.
#[test]
fn bind_vfio_unbinds_overrides_probes_and_waits_for_the_node() {
    let (t, _) = build();
    let dev = tempfile::tempdir().unwrap();
    let fdir = on_e1000e(&t);
    let kernel = FakeKernel::start(t.root().to_path_buf(), dev.path().to_path_buf(), {
        let fdir = fdir.clone();
        move |root, dev| {
            let unbind = root.join("bus/pci/drivers/e1000e/unbind");
            if read(&unbind) == "0000:02:00.2" && fdir.join("driver").exists() {
                std::fs::remove_file(fdir.join("driver")).unwrap();
            }
            let probed = read(&root.join("bus/pci/drivers_probe")) == "0000:02:00.2";
            if probed && read(&fdir.join("driver_override")) == "vfio-pci" && !fdir.join("driver").exists() {
                symlink("../../../../bus/pci/drivers/vfio-pci", fdir.join("driver")).unwrap();
                std::fs::create_dir_all(dev.join("vfio")).unwrap();
                std::fs::write(dev.join("vfio/7"), b"").unwrap();
            }
        }
    });
    let sys = Sysfs::new(t.root()).with_dev(dev.path());
    let started = std::time::Instant::now();
    assert_eq!(sys.bind_vfio(bdf("0000:02:00.2"), std::time::Duration::from_secs(20)).unwrap(), 7);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    drop(kernel);
    assert_eq!(sys.device(bdf("0000:02:00.2")).driver().unwrap().as_deref(), Some("vfio-pci"));
    assert_eq!(read(&t.root().join("bus/pci/drivers/e1000e/unbind")), "0000:02:00.2");

    // Bound already: nothing is written (the probe file would now hold the other address).
    std::fs::write(t.root().join("bus/pci/drivers_probe"), b"").unwrap();
    assert_eq!(sys.bind_vfio(bdf("0000:02:00.0"), std::time::Duration::ZERO).unwrap(), 7);
    assert_eq!(read(&t.root().join("bus/pci/drivers_probe")), "");
}

/// A kernel that never binds: the call ends at its deadline and says what it saw.
#[test]
fn bind_vfio_ends_at_its_deadline() {
    let (t, _) = build();
    let dev = tempfile::tempdir().unwrap();
    on_e1000e(&t);
    let sys = Sysfs::new(t.root()).with_dev(dev.path());
    let started = std::time::Instant::now();
    let e = sys.bind_vfio(bdf("0000:02:00.2"), std::time::Duration::from_millis(300)).unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(300) && took < std::time::Duration::from_secs(3),
        "{took:?}"
    );
    match &e {
        SysfsError::Timeout { bdf: b, state, .. } => {
            assert_eq!(b.to_string(), "0000:02:00.2");
            assert!(state.contains("vfio/7 missing"), "{state}");
        }
        other => panic!("{other:?}"),
    }
    // What the call wrote stays for the kernel to act on, as `echo` would have left it.
    assert_eq!(read(&t.root().join("bus/pci/drivers_probe")), "0000:02:00.2");
}

/// Writes go only to attributes that exist and are regular files: a missing
/// `driver_override` is a write error naming it, a FIFO in its place is refused without
/// blocking, and nothing outside the tree is created.
#[test]
fn bind_vfio_writes_only_existing_regular_attributes() {
    let (t, _) = build();
    let fdir = on_e1000e(&t);
    std::fs::remove_file(fdir.join("driver_override")).unwrap();
    let sys = Sysfs::new(t.root());
    let e = sys.bind_vfio(bdf("0000:02:00.2"), std::time::Duration::from_secs(1)).unwrap_err();
    assert!(
        matches!(&e, SysfsError::Write { path, value, .. } if path.ends_with("driver_override") && value == "vfio-pci"),
        "{e}"
    );
    assert!(!fdir.join("driver_override").exists(), "not created");
    mkfifo(&fdir.join("driver_override"));
    set_driver(&t, &fdir, None);
    let root = t.root().to_path_buf();
    let e = within(10, move || {
        Sysfs::new(root).bind_vfio(bdf("0000:02:00.2"), std::time::Duration::from_secs(1))
    })
    .unwrap_err();
    assert!(matches!(e, SysfsError::NotRegularFile { kind: "a FIFO", .. }), "{e}");
    let e = sys.bind_vfio(bdf("0000:09:00.0"), std::time::Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, SysfsError::NoDevice { .. }), "{e}");
    let e = sys.bind_vfio(bdf("0000:02:01.2"), std::time::Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, SysfsError::NoIommuGroup { .. }), "{e}");
}

/// `create_vfs` waits for the PF's driver, turns VF autoprobe off, asks for the VFs and
/// waits until sysfs lists them; a driver that never comes ends at the deadline.
#[test]
fn create_vfs_waits_for_the_driver_and_the_vfs() {
    let (t, _) = build();
    let pf = t.root().join("devices/pci0000:00/0000:00:1c.0/0000:02:00.0");
    set_driver(&t, &pf, None);
    // The tree's PF already has VFs 0 and 10; start from none.
    for n in [0, 10] {
        std::fs::remove_file(pf.join(format!("virtfn{n}"))).unwrap();
    }
    std::fs::write(pf.join("sriov_drivers_autoprobe"), b"1\n").unwrap();
    std::fs::write(pf.join("sriov_numvfs"), b"0\n").unwrap();
    let sys = Sysfs::new(t.root());
    let e =
        sys.create_vfs(bdf("0000:02:00.0"), "nvme", 2, std::time::Duration::from_millis(200)).unwrap_err();
    assert!(e.to_string().contains("expected nvme"), "{e}");

    let tree = t.root().to_path_buf();
    let kernel = FakeKernel::start(tree.clone(), tree.clone(), {
        let pf = pf.clone();
        move |root, _| {
            if !pf.join("driver").exists() {
                symlink("../../../../bus/pci/drivers/nvme", pf.join("driver")).unwrap();
                std::fs::create_dir_all(root.join("bus/pci/drivers/nvme")).unwrap();
            } else if read(&pf.join("sriov_numvfs")) == "2" && !pf.join("virtfn1").exists() {
                assert_eq!(read(&pf.join("sriov_drivers_autoprobe")), "0", "autoprobe off before the VFs");
                // The VFs of the tree, linked again (VF 1 first: sysfs order is not VF order).
                symlink("../0000:02:01.2", pf.join("virtfn1")).unwrap();
                symlink("../0000:02:00.4", pf.join("virtfn0")).unwrap();
            }
        }
    });
    let vfs = sys.create_vfs(bdf("0000:02:00.0"), "nvme", 2, std::time::Duration::from_secs(20)).unwrap();
    drop(kernel);
    assert_eq!(vfs, [bdf("0000:02:00.4"), bdf("0000:02:01.2")]);
}

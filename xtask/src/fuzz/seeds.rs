//! `cargo xtask fuzz --make-seeds`: the seed corpora of `fuzz/corpus/`, made from the
//! project's real inputs.
//!
//! - `config_space`: the `config` files of `pcilibs`' QEMU guest fixtures and every
//!   configuration space of the conformance dumps (`../shared/conformance`, when present).
//! - `lspci_dump`: those configuration spaces written as `lspci -x` dumps by this module
//!   (the bytes only, with a description of its own).
//! - `sysfs_tree`: the fixtures as sysfs trees (the archive format of
//!   `fuzz/src/sysfs_tree.rs`), alone with driver, IOMMU group and NUMA node, and several
//!   functions together under a root port as on a host.
//! - `plan_request`: requests like the end-to-end scenarios', as JSON.
//! - `plan_file`: the planner's plans for them on every platform.
//! - `journal_file`: the journal of a real engine (a q35 QEMU without a guest, native PCIe
//!   hotplug) copied after every record it wrote while plugging and unplugging, and once
//!   compacted.
//! - `qmp_input`: what that QEMU sent to a second QMP monitor, as scripts for the fake
//!   peer: the greeting, the replies to the commands the target sends, events between.
//!
//! The candidates are written to `target/fuzz/seeds/<target>/`, then libFuzzer's merge
//! keeps in `fuzz/corpus/<target>/` the smallest set with the same coverage.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::{Virt, Q35};
use pcie_topology::{
    Attach, DeviceRequest, FunctionRequest, FunctionResource, HotplugProfile, Mode, PlanOptions, PlanRequest,
    Platform, QemuId, ResourceRole, SpareRequest,
};
use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::requirement::Resource;
use qmp_hotplug::journal::HookPoint;
use qmp_hotplug::{ClientOptions, Engine, EngineOptions, QmpClient};
use serde_json::Value;

use super::{Layout, Run, Target};

/// Largest seed kept (libFuzzer's `-max_len` of the biggest targets).
const MAX_SEED: usize = 64 * 1024;

/// QEMU of the journal and transcript seeds (looked up on the stack's `PATH`).
const QEMU: &str = "qemu-system-x86_64";

/// Writes the candidates of every target in `targets`, then merges them into
/// `fuzz/corpus/<target>/` (which is emptied first).
pub fn make(layout: &Layout, targets: &[Target], env: &[(String, String)]) -> Result<(), String> {
    let staging = layout.work.join("seeds");
    let _ = fs::remove_dir_all(&staging);
    let root = guest_harness::workspace_root();
    let mut candidates: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    let wanted = |name: &str| targets.iter().any(|t| t.name == name);
    let spaces = config_spaces(&root)?;
    if wanted("config_space") {
        candidates.insert("config_space", spaces.iter().map(|(n, _, c)| (n.clone(), c.clone())).collect());
    }
    if wanted("lspci_dump") {
        candidates.insert("lspci_dump", dumps(&spaces));
    }
    if wanted("sysfs_tree") {
        candidates.insert("sysfs_tree", sysfs_trees(&root)?);
    }
    let requests = requests()?;
    if wanted("plan_request") {
        let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, r) in &requests {
            seeds.push((name.clone(), serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?));
        }
        // The bytes path of the target (requests built from raw bytes) starts from these.
        seeds.push(("bytes-zero".into(), vec![0u8; 256]));
        seeds.push(("bytes-count".into(), (0u8..=255).collect()));
        candidates.insert("plan_request", seeds);
    }
    if wanted("plan_file") {
        candidates.insert("plan_file", plans(&requests)?);
    }
    if wanted("journal_file") || wanted("qmp_input") {
        let (journals, transcripts) = qemu_session(&layout.work.join("seed-qemu"), env)?;
        if wanted("journal_file") {
            candidates.insert("journal_file", journals);
        }
        if wanted("qmp_input") {
            candidates.insert("qmp_input", transcripts);
        }
    }
    for t in targets {
        let list = candidates.remove(t.name).unwrap_or_default();
        let dir = staging.join(t.name);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut written = 0;
        for (name, bytes) in list.iter().filter(|(_, b)| b.len() <= MAX_SEED) {
            fs::write(dir.join(name), bytes).map_err(|e| format!("{name}: {e}"))?;
            written += 1;
        }
        let seeds = layout.seeds(t.name);
        let _ = fs::remove_dir_all(&seeds);
        fs::create_dir_all(&seeds).map_err(|e| format!("{}: {e}", seeds.display()))?;
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let run = Run { bin: &layout.binary(t.name), target: t, artifacts: scratch.path() };
        run.libfuzzer(&["-merge=1"], &[&seeds, &dir], Duration::from_secs(1200))?;
        let kept = fs::read_dir(&seeds).map(Iterator::count).unwrap_or(0);
        eprintln!("fuzz: {}: {written} candidates, {kept} kept in {}", t.name, seeds.display());
    }
    Ok(())
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// `(seed name, address, bytes)` of every configuration space: the QEMU fixtures, then
/// the conformance dumps (each distinct space once).
fn config_spaces(root: &Path) -> Result<Vec<(String, Bdf, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let fixtures = root.join("pcilibs/tests/fixtures/qemu-x86_64");
    for dir in sorted_dirs(&fixtures)? {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Ok(bdf) = Bdf::parse(&name) else { continue };
        let config = fs::read(dir.join("config")).map_err(io(&dir))?;
        if seen.insert(config.clone()) {
            out.push((format!("qemu-{}", name.replace(':', "_")), bdf, config));
        }
    }
    let dumps = root.join("../shared/conformance/pciutils/dumps");
    if !dumps.is_dir() {
        eprintln!("fuzz: {} not found; configuration spaces from the QEMU fixtures only", dumps.display());
        return Ok(out);
    }
    let mut files: Vec<PathBuf> =
        fs::read_dir(&dumps).map_err(io(&dumps))?.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let text = fs::read_to_string(&f).map_err(io(&f))?;
        let stem = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for d in pcilibs::dump::parse(&text).devices {
            if seen.insert(d.config.clone()) {
                out.push((format!("dump-{stem}-{}", d.bdf.to_string().replace(':', "_")), d.bdf, d.config));
            }
        }
    }
    Ok(out)
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}

/// One device in `lspci -x` form: the address line, then 16 bytes a line.
fn dump_text(bdf: Bdf, config: &[u8], short: bool) -> String {
    let addr = bdf.to_string();
    let addr = if short { addr.get(5..).unwrap_or(&addr).to_string() } else { addr };
    let mut out = format!("{addr} Device from the fuzz seeds\n");
    for (row, chunk) in config.chunks(16).enumerate() {
        let _ = write!(out, "{:02x}:", row * 16);
        for b in chunk {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Dumps of up to six devices each, in the short and the long address form.
fn dumps(spaces: &[(String, Bdf, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    spaces
        .chunks(6)
        .enumerate()
        .map(|(i, chunk)| {
            let text: String = chunk.iter().map(|(_, bdf, c)| dump_text(*bdf, c, i % 2 == 0)).collect();
            (format!("dump-{i:03}"), text.into_bytes())
        })
        .collect()
}

/// Archive entries (see `fuzz/src/sysfs_tree.rs`).
#[derive(Default)]
struct Archive(Vec<u8>);

impl Archive {
    fn file(&mut self, path: &str, content: &[u8]) {
        self.0.extend_from_slice(format!("@@ file {path} {}\n", content.len()).as_bytes());
        self.0.extend_from_slice(content);
        self.0.push(b'\n');
    }

    fn link(&mut self, path: &str, target: &str) {
        self.0.extend_from_slice(format!("@@ link {path} {target}\n").as_bytes());
    }

    fn dir(&mut self, path: &str) {
        self.0.extend_from_slice(format!("@@ dir {path}\n").as_bytes());
    }

    /// The files of a fixture function directory below `at`.
    fn function(&mut self, fixture: &Path, at: &str) -> Result<(), String> {
        let mut files: Vec<PathBuf> =
            fs::read_dir(fixture).map_err(io(fixture))?.filter_map(Result::ok).map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.file(&format!("{at}/{name}"), &fs::read(&f).map_err(io(&f))?);
        }
        Ok(())
    }
}

/// Each fixture as a host's function (driver, IOMMU group, NUMA node), and groups of
/// them below a root port.
fn sysfs_trees(root: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let fixtures = root.join("pcilibs/tests/fixtures/qemu-x86_64");
    let dirs = sorted_dirs(&fixtures)?;
    let mut out = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let at = format!("bus/pci/devices/{name}");
        let mut a = Archive::default();
        a.function(dir, &at)?;
        a.file(&format!("{at}/numa_node"), if i % 3 == 0 { b"-1\n" } else { b"0\n" });
        a.link(&format!("{at}/driver"), "../../../bus/pci/drivers/vfio-pci");
        a.dir(&format!("kernel/iommu_groups/{i}/devices"));
        a.link(&format!("kernel/iommu_groups/{i}/devices/{name}"), &format!("../../../../{at}"));
        a.link(&format!("{at}/iommu_group"), &format!("../../../kernel/iommu_groups/{i}"));
        out.push((format!("fixture-{}", name.replace(':', "_")), a.0));
    }
    // Host-shaped: functions below root port 0000:00:02.0, linked from bus/pci/devices,
    // one IOMMU group; the SR-IOV fixture with a VF link to the next function.
    for (g, group) in dirs.chunks(3).enumerate() {
        let mut a = Archive::default();
        let port = "devices/pci0000:00/0000:00:02.0";
        a.dir(port);
        a.link("bus/pci/devices/0000:00:02.0", &format!("../../../{port}"));
        let names: Vec<String> = group
            .iter()
            .map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        for (dir, name) in group.iter().zip(&names) {
            let at = format!("{port}/{name}");
            a.function(dir, &at)?;
            a.link(&format!("bus/pci/devices/{name}"), &format!("../../../{at}"));
            a.link(&format!("{at}/iommu_group"), "../../../../kernel/iommu_groups/7");
            a.link(&format!("kernel/iommu_groups/7/devices/{name}"), &format!("../../../../{at}"));
        }
        if let [first, second, ..] = names.as_slice() {
            a.link(&format!("{port}/{first}/virtfn0"), &format!("../{second}"));
            a.link(&format!("{port}/{second}/physfn"), &format!("../{first}"));
        }
        out.push((format!("host-group-{g}"), a.0));
    }
    Ok(out)
}

fn id(text: &str) -> Result<QemuId, String> {
    QemuId::new(text).map_err(|e| e.to_string())
}

/// A GPU stand-in: `ivshmem-plain` with a `size`-byte prefetchable BAR.
fn gpu(name: &str, size: u64) -> Result<DeviceRequest, String> {
    DeviceRequest::ivshmem(name, size).map_err(|e| e.to_string())
}

/// An `e1000e` (128 KiB + 128 KiB + 16 KiB memory BARs, 32 I/O ports).
fn nic(name: &str, cold: bool) -> Result<DeviceRequest, String> {
    let f = FunctionRequest::new(
        0,
        "e1000e",
        vec![
            FunctionResource::bar(0, BarKind::Mem32, false, 128 << 10),
            FunctionResource::bar(1, BarKind::Mem32, false, 128 << 10),
            FunctionResource::bar(2, BarKind::Io, false, 32),
            FunctionResource::bar(3, BarKind::Mem32, false, 16 << 10),
        ],
    );
    let mut d = DeviceRequest::new(id(name)?, vec![f]);
    d.cold_plug = cold;
    Ok(d)
}

/// A passed-through host device: a GPU function with ROM, SR-IOV VF aperture and a
/// resizable BAR, and its audio function.
fn host_gpu(name: &str, bus: u8) -> Result<DeviceRequest, String> {
    let bdf = |f: u8| Bdf::new(0, bus, 0, f).map_err(|e| e.to_string());
    let mut rebar = FunctionResource::at(1, Resource::bar(BarKind::Mem64, true, 64 << 30));
    rebar.role = ResourceRole::ResizableMax { current: 256 << 20 };
    let vf = Resource { kind: BarKind::Mem64, prefetchable: true, rom: false, size: 8 << 30, align: 1 << 30 };
    let mut aperture = FunctionResource::at(1, vf);
    aperture.role = ResourceRole::VfAperture;
    let mut f0 = FunctionRequest::vfio(
        0,
        bdf(0)?,
        vec![
            FunctionResource::bar(0, BarKind::Mem32, false, 16 << 20),
            rebar,
            FunctionResource::bar(3, BarKind::Mem64, true, 32 << 20),
            FunctionResource::rom(512 << 10),
            aperture,
        ],
    );
    f0.class = Some(0x03_0200);
    let mut f1 =
        FunctionRequest::vfio(1, bdf(1)?, vec![FunctionResource::bar(0, BarKind::Mem32, false, 16 << 10)]);
    f1.class = Some(0x04_0300);
    let mut d = DeviceRequest::new(id(name)?, vec![f0, f1]);
    d.iommu_group = Some(u32::from(bus));
    Ok(d)
}

/// Requests like the end-to-end scenarios' (every mode, spares, groups, NUMA nodes, a
/// conventional device behind a bridge).
fn requests() -> Result<Vec<(String, PlanRequest)>, String> {
    let request = |mode: Mode,
                   devices: Vec<DeviceRequest>,
                   spares: Vec<SpareRequest>,
                   options: PlanOptions| {
        PlanRequest::default().with_mode(mode).with_devices(devices).with_spares(spares).with_options(options)
    };
    let options = |f: &dyn Fn(&mut PlanOptions)| {
        let mut o = PlanOptions::default();
        f(&mut o);
        o
    };
    let mut out = Vec::new();
    out.push((
        "root-port".to_string(),
        request(
            Mode::RootPort,
            vec![gpu("gpu0", 8 << 30)?, gpu("gpu1", 64 << 30)?, nic("nic0", true)?],
            vec![SpareRequest::new(HotplugProfile::h100(), 2)],
            PlanOptions::default(),
        ),
    ));
    let mut group = Vec::new();
    for i in 0..4 {
        let mut d = gpu(&format!("gpu{i}"), 16 << 30)?;
        d.p2p_group = Some("g0".into());
        group.push(d);
    }
    out.push((
        "switch".to_string(),
        request(
            Mode::SwitchPort,
            group,
            vec![SpareRequest::new(HotplugProfile::nic(), 1).with_p2p_group("g0")],
            PlanOptions::default(),
        ),
    ));
    let mut numa = Vec::new();
    for (i, node) in [0u32, 1, 1].iter().enumerate() {
        let mut d = gpu(&format!("gpu{i}"), 4 << 30)?;
        d.numa_node = Some(*node);
        numa.push(d);
    }
    out.push((
        "numa".to_string(),
        request(
            Mode::Numa,
            numa,
            vec![SpareRequest::new(HotplugProfile::a100(), 1).with_numa_node(1)],
            options(&|o| o.guest_ram = 4 << 30),
        ),
    ));
    let mut legacy = nic("legacy0", false)?;
    legacy.attach = Attach::PciBridge;
    for f in &mut legacy.functions {
        f.pcie = false;
    }
    let custom = HotplugProfile::parse("16M:mem32,128G:pref64,32M:pref64").map_err(|e| e.to_string())?;
    out.push((
        "multifunction".to_string(),
        request(
            Mode::RootPort,
            vec![host_gpu("hgpu0", 0x3b)?, legacy, host_gpu("hgpu1", 0x5e)?],
            vec![SpareRequest::new(custom, 1)],
            options(&|o| {
                o.pack_root_ports = true;
                o.spare_bus_reserve = 1;
            }),
        ),
    ));
    out.push((
        "spares-only".to_string(),
        request(
            Mode::RootPort,
            Vec::new(),
            vec![
                SpareRequest::new(HotplugProfile::nvswitch(), 2),
                SpareRequest::new(HotplugProfile::nic(), 3),
            ],
            options(&|o| {
                o.guest_phys_bits = Some(46);
                o.host_phys_bits = Some(46);
            }),
        ),
    ));
    out.push((
        "defaults-only".to_string(),
        request(
            Mode::RootPort,
            vec![gpu("gpu0", 2 << 30)?],
            Vec::new(),
            options(&|o| {
                o.size_reservations = false;
                o.switch_placeholders = false;
            }),
        ),
    ));
    // s390x: a channel device, a zPCI function with a BAR and an AP matrix device.
    let mut zpci = DeviceRequest::new(
        id("nic1")?,
        vec![FunctionRequest::vfio(
            0,
            Bdf::new(0, 0, 0, 0).map_err(|e| e.to_string())?,
            vec![FunctionResource::bar(0, BarKind::Mem64, true, 1 << 20)],
        )],
    );
    zpci.attach = Attach::Port;
    let s390x = vec![
        DeviceRequest::channel(id("net0")?, "virtio-net-ccw", 0),
        zpci,
        DeviceRequest::vfio_ap(id("ap0")?, "/sys/devices/vfio_ap/matrix/0001"),
    ];
    out.push(("s390x".to_string(), request(Mode::RootPort, s390x, Vec::new(), PlanOptions::default())));
    Ok(out)
}

/// The plans of every request on every platform that accepts it (s390x included).
fn plans(requests: &[(String, PlanRequest)]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let platforms: [(&str, Box<dyn Platform>); 5] = [
        ("q35-seabios", Box::new(Q35::seabios())),
        ("q35-ovmf", Box::new(Q35::ovmf())),
        ("virt", Box::new(Virt::direct_kernel())),
        ("virt-uefi", Box::new(Virt::uefi())),
        ("s390x", Box::new(S390xCcw::default())),
    ];
    let mut out = Vec::new();
    for (name, request) in requests {
        for (pname, platform) in &platforms {
            if let Ok(plan) = pcie_topology::plan(platform.as_ref(), request) {
                out.push((
                    format!("{name}-{pname}"),
                    plan.to_json().map_err(|e| e.to_string())?.into_bytes(),
                ));
            }
        }
    }
    Ok(out)
}

/// A QEMU started for the seeds, killed when dropped.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw QMP connection whose every line is kept: what the fuzz target's peer replays.
struct Transcript {
    stream: UnixStream,
    buf: Vec<u8>,
    segments: Vec<Vec<u8>>,
}

impl Transcript {
    /// Connects and reads the greeting (segment 0).
    fn connect(path: &Path, deadline: Instant) -> Result<Transcript, String> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("{}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut t = Transcript { stream, buf: Vec::new(), segments: Vec::new() };
        let greeting = t.line(deadline)?;
        t.segments.push(greeting);
        Ok(t)
    }

    /// The next line, newline included.
    fn line(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                return Ok(self.buf.drain(..=nl).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("QEMU's QMP monitor did not answer in time".into());
            }
            self.stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("QEMU closed its QMP monitor".into()),
                Ok(n) => self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends command `id` and keeps everything up to its reply as one segment.
    fn command(
        &mut self,
        id: u64,
        execute: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut msg = serde_json::json!({ "execute": execute, "id": id });
        if let (Some(a), Some(obj)) = (arguments, msg.as_object_mut()) {
            obj.insert("arguments".into(), a);
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.stream.write_all(&line).map_err(|e| e.to_string())?;
        let mut segment = Vec::new();
        loop {
            let l = self.line(deadline)?;
            segment.extend_from_slice(&l);
            let v: Value = serde_json::from_slice(&l).unwrap_or(Value::Null);
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                break;
            }
        }
        self.segments.push(segment);
        Ok(())
    }

    /// Waits for an event named `name`; the lines read go to the next segment.
    fn wait_event(&mut self, name: &str, deadline: Instant) -> Result<Vec<u8>, String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line(deadline)?;
            lines.extend_from_slice(&l);
            let v: Value = serde_json::from_slice(&l).unwrap_or(Value::Null);
            if v.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(lines);
            }
        }
    }

    /// The fuzz target's session after the handshake: `query-pci` (2), `closefd` (3),
    /// `qom-list` (4); `early` lines go before the `query-pci` reply.
    fn session(mut self, early: Vec<u8>, deadline: Instant) -> Result<Vec<u8>, String> {
        self.command(2, "query-pci", None, deadline)?;
        if let Some(s) = self.segments.last_mut() {
            s.splice(0..0, early);
        }
        self.command(3, "closefd", Some(serde_json::json!({ "fdname": "fuzzfd" })), deadline)?;
        self.command(4, "qom-list", Some(serde_json::json!({ "path": "/machine/peripheral" })), deadline)?;
        Ok(self.segments.join(&0u8))
    }
}

/// A q35 QEMU (SeaBIOS, native PCIe hotplug, no guest) with a planned topology: the
/// engine plugs two devices and unplugs them; the journal is copied after every record
/// and a second monitor's traffic is recorded. Returns (journals, transcripts).
#[allow(clippy::type_complexity)]
fn qemu_session(
    dir: &Path,
    env: &[(String, String)],
) -> Result<(Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>), String> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut gpu0 = gpu("gpu0", 64 << 20)?;
    let mut second = nic("gpu0-f1", false)?.functions;
    if let Some(f) = second.first_mut() {
        f.function = 1;
    }
    gpu0.functions.extend(second);
    let mut options = PlanOptions::default();
    options.guest_ram = 256 << 20;
    let request = PlanRequest::default()
        .with_devices(vec![gpu0, nic("nic0", false)?])
        .with_spares(vec![SpareRequest::new(HotplugProfile::nic(), 1)])
        .with_options(options);
    let plan =
        pcie_topology::plan(&Q35::seabios(), &request).map_err(|e| format!("planning the seed QEMU: {e}"))?;
    let qmp = dir.join("qmp.sock");
    let raw = dir.join("raw.sock");
    let mut args: Vec<String> =
        ["-nodefaults", "-display", "none", "-accel", "tcg", "-m", "256", "-smp", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(["-serial", "none", "-monitor", "none", "-global"].map(String::from));
    args.push("ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into());
    for sock in [&qmp, &raw] {
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", sock.display()));
    }
    args.extend(plan.qemu_args());
    let child = Command::new(QEMU)
        .args(&args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start {QEMU} (run `cargo xtask provision` and put QEMU on PATH): {e}")
        })?;
    let _qemu = Qemu { child };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut options = ClientOptions::default();
    options.connect_timeout = Duration::from_secs(30);
    let client = Arc::new(QmpClient::connect_unix(&qmp, options).map_err(|e| e.to_string())?);
    wait_for_firmware(&client, plan.ports.len(), deadline)?;
    let mut transcripts = Vec::new();
    let boot = Transcript::connect(&raw, deadline)?;
    let mut boot = boot;
    boot.command(1, "qmp_capabilities", None, deadline)?;
    transcripts.push(("qmp-boot".to_string(), boot.session(Vec::new(), deadline)?));

    let journal = dir.join("vm.journal");
    let copies = dir.join("journals");
    fs::create_dir_all(&copies).map_err(io(&copies))?;
    let (src, dst) = (journal.clone(), copies.clone());
    let hook: qmp_hotplug::journal::JournalHook = Arc::new(move |point, n| {
        if point == HookPoint::Durable {
            let _ = fs::copy(&src, dst.join(format!("record-{n:03}")));
        }
    });
    let mut engine_options = EngineOptions::default();
    engine_options.journal_hook = Some(hook);
    let (engine, _) =
        Engine::open(Arc::clone(&client), &journal, engine_options.clone()).map_err(|e| e.to_string())?;
    let mut devices = Vec::new();
    for action in plan.hotplug_actions().map_err(|e| e.to_string())? {
        let request = qmp_hotplug::PlugRequest::from_action(&action);
        devices.push(request.device.to_string());
        engine.plug(request).map_err(|e| format!("seed QEMU plug: {e}"))?;
    }
    let mut plugged = Transcript::connect(&raw, deadline)?;
    plugged.command(1, "qmp_capabilities", None, deadline)?;
    let mut events = Vec::new();
    if let Some(device) = devices.first() {
        engine.unplug(device).map_err(|e| format!("seed QEMU unplug: {e}"))?;
        events = plugged.wait_event("DEVICE_DELETED", deadline)?;
    }
    transcripts.push(("qmp-unplug".to_string(), plugged.session(events, deadline)?));
    drop(engine);
    // Opening again compacts: one snapshot per device left.
    let (engine, _) =
        Engine::open(Arc::clone(&client), &journal, EngineOptions::default()).map_err(|e| e.to_string())?;
    drop(engine);
    let mut journals = Vec::new();
    let mut names: Vec<PathBuf> =
        fs::read_dir(&copies).map_err(io(&copies))?.filter_map(Result::ok).map(|e| e.path()).collect();
    names.sort();
    for f in names {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = fs::read(&f).map_err(io(&f))?;
        // Also cut in the middle of the last record, as a process killed inside `write`.
        let torn = bytes.get(..bytes.len().saturating_sub(17)).unwrap_or_default().to_vec();
        journals.push((format!("journal-{name}"), bytes));
        journals.push((format!("journal-{name}-torn"), torn));
    }
    journals.push(("journal-compacted".to_string(), fs::read(&journal).map_err(io(&journal))?));
    Ok((journals, transcripts))
}

/// Waits until the firmware has numbered the buses of `ports` root ports, so that
/// `query-pci` shows plugged devices at their planned bus.
fn wait_for_firmware(client: &QmpClient, ports: usize, deadline: Instant) -> Result<(), String> {
    loop {
        let reply =
            client.execute_raw("query-pci", None, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let numbered = qmp_hotplug::pci::bridges(&reply).iter().filter(|b| b.secondary != 0).count();
        if numbered >= ports {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("the firmware numbered {numbered} of {ports} root ports in time"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

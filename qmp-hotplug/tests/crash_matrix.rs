//! Crash-recovery matrix against real QEMU.
//!
//! For each scenario the engine runs in a child process (this same binary, in child mode)
//! with one fault at one point, for every point the scenario passes:
//!
//! - killed (SIGKILL) right after journal record N becomes durable (before the step it
//!   announces is sent), and right before record N is written (after the step the
//!   previous record announced was executed by QEMU);
//! - a torn record N: killed after it was durable, then the file is cut inside it (every
//!   cut offset is read back in-process; one per case is recovered against QEMU);
//! - a flipped byte in record N (every byte read back in-process; one per case against
//!   QEMU);
//! - a full disk at record N: the child's file-size limit (`RLIMIT_FSIZE`, `SIGXFSZ`
//!   ignored) lets a few bytes of record N out and fails the write, and stays (the
//!   process goes on with a full disk) or is lifted at the next write (room again);
//! - in a scenario that compacts before every record: killed after compaction N wrote
//!   its temporary file, and right after it replaced the journal.
//!
//! A new engine then opens the journal against the same QEMU and recovers. Every case
//! must converge: each device is either visible with all functions exactly once, or gone
//! with no function, object or port left behind, or pending unplug with its port still
//! held; a second recovery changes nothing; and the port is usable afterwards. Prints the
//! matrix as Markdown (recorded in RELIABILITY.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{gpu_like, names, qid, single, unplug_after, Hotplug, Qemu};
use qmp_hotplug::engine::{Engine, EngineOptions, UnplugOutcome};
use qmp_hotplug::journal::{HookPoint, Record};
use qmp_hotplug::request::{PlaceholderRequest, PlugRequest};
use qmp_hotplug::state::DeviceState;
use qmp_hotplug::QmpClient;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Plug a two-function device with a memory backend object (native hotplug).
    PlugMultifunction,
    /// Plug it, then unplug it; the unplug completes (native hotplug, no guest).
    PlugUnplug,
    /// Plug one function, then unplug it; no guest answers (ACPI hotplug): pending.
    UnplugTimeout,
    /// Plug a device whose function 0 QEMU refuses; the engine rolls back.
    FailedPlugRollback,
    /// Plug a two-function device onto a port that holds a placeholder (`ph0` with its
    /// backend `ph0-mem`): the engine removes both first (native hotplug).
    PlaceholderSwap,
    /// [`Scenario::PlugUnplug`] with the journal compacted before every record.
    PlugUnplugCompacting,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario::PlugMultifunction,
    Scenario::PlugUnplug,
    Scenario::UnplugTimeout,
    Scenario::FailedPlugRollback,
    Scenario::PlaceholderSwap,
    Scenario::PlugUnplugCompacting,
];

/// The placeholder of [`Scenario::PlaceholderSwap`].
const PLACEHOLDER: &str = "ph0";
const PLACEHOLDER_MEM: &str = "ph0-mem";

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::PlugMultifunction => "plug-multifunction",
            Scenario::PlugUnplug => "plug-then-unplug",
            Scenario::UnplugTimeout => "unplug-timeout",
            Scenario::FailedPlugRollback => "failed-plug-rollback",
            Scenario::PlaceholderSwap => "placeholder-swap",
            Scenario::PlugUnplugCompacting => "plug-then-unplug-compacting",
        }
    }

    fn from_name(s: &str) -> Scenario {
        SCENARIOS.into_iter().find(|x| x.name() == s).expect("scenario name")
    }

    fn hotplug(self) -> Hotplug {
        match self {
            Scenario::UnplugTimeout => Hotplug::Acpi,
            _ => Hotplug::Native,
        }
    }

    fn request(self) -> PlugRequest {
        match self {
            Scenario::PlugMultifunction | Scenario::PlugUnplug | Scenario::PlugUnplugCompacting => {
                gpu_like(0, 16)
            }
            Scenario::UnplugTimeout => single(0, "nic0", "e1000e"),
            Scenario::FailedPlugRollback => {
                let mut r = gpu_like(0, 16);
                r.functions[0].device.driver = "no-such-device-model".into();
                r
            }
            Scenario::PlaceholderSwap => gpu_like(0, 16).with_placeholder(PlaceholderRequest::new(
                vec![qid(PLACEHOLDER)],
                vec![qid(PLACEHOLDER_MEM)],
            )),
        }
    }

    /// What QEMU holds before the engine starts. The placeholder is `device_add`ed, not
    /// given on the command line: its slot then stays powered off (no guest powers it
    /// on), so its `device_del` completes at once, as a guest's would. A slot populated at
    /// boot is powered on and, with no guest OS, would never let it go.
    fn setup(self, c: &QmpClient) {
        if let Scenario::PlaceholderSwap = self {
            let t = Duration::from_secs(30);
            c.execute_raw(
                "object-add",
                Some(json!({"qom-type": "memory-backend-ram", "id": PLACEHOLDER_MEM, "size": 1 << 20, "reserve": false})),
                t,
            )
            .unwrap();
            c.execute_raw(
                "device_add",
                Some(json!({"driver": "ivshmem-plain", "id": PLACEHOLDER, "memdev": PLACEHOLDER_MEM, "bus": "rp0", "addr": "0.0"})),
                t,
            )
            .unwrap();
        }
    }

    /// Runs the scenario's operations (in the child). `strict`: each must end as it does
    /// without faults; else (a full disk) each may fail, with a typed error.
    fn run(self, engine: &Engine, strict: bool) {
        let request = self.request();
        let device = request.device.to_string();
        let plugged = engine.plug(request);
        let unplug = match self {
            Scenario::PlugUnplug | Scenario::PlugUnplugCompacting => Some(UnplugOutcome::Removed),
            Scenario::UnplugTimeout => Some(UnplugOutcome::Pending),
            _ => None,
        };
        let unplugged = unplug.map(|want| (want, engine.unplug(&device)));
        if !strict {
            eprintln!("plug: {:?}; unplug: {:?}", plugged.as_ref().err(), unplugged.as_ref().map(|u| &u.1));
            return;
        }
        match self {
            Scenario::FailedPlugRollback => assert!(plugged.is_err()),
            _ => drop(plugged.unwrap()),
        }
        if let Some((want, got)) = unplugged {
            assert_eq!(got.unwrap(), want);
        }
    }
}

/// Short where the deadline is the point (no guest under ACPI hotplug), generous where a
/// removal must complete so that a slow machine cannot turn it into a timeout.
fn options(s: Scenario) -> EngineOptions {
    let unplug_timeout = match s.hotplug() {
        Hotplug::Acpi => Duration::from_secs(1),
        Hotplug::Native => Duration::from_secs(20),
    };
    let journal_compact_bytes = match s {
        Scenario::PlugUnplugCompacting => 0,
        _ => qmp_hotplug::journal::DEFAULT_COMPACT_BYTES,
    };
    let mut options = unplug_after(unplug_timeout);
    options.journal_compact_bytes = journal_compact_bytes;
    options
}

/// The fault a case injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Killed right after record k is durable.
    AfterDurable,
    /// Killed right before record k is written.
    BeforeWrite,
    /// Killed after record k is durable, then the file is cut inside record k.
    Torn,
    /// Killed after record k is durable, then one byte of record k is flipped.
    Flipped,
    /// The disk is full from record k on: a few bytes of it go out, the write fails.
    DiskFull,
    /// The disk is full for record k only: the next write finds room.
    DiskFullOnce,
    /// Killed after compaction k wrote its temporary file, before the rename.
    CompactWritten,
    /// Killed right after compaction k replaced the journal.
    Compacted,
}

const FAULTS: [Fault; 8] = [
    Fault::AfterDurable,
    Fault::BeforeWrite,
    Fault::Torn,
    Fault::Flipped,
    Fault::DiskFull,
    Fault::DiskFullOnce,
    Fault::CompactWritten,
    Fault::Compacted,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::AfterDurable => "after-durable",
            Fault::BeforeWrite => "before-write",
            Fault::Torn => "torn",
            Fault::Flipped => "flipped",
            Fault::DiskFull => "disk-full",
            Fault::DiskFullOnce => "disk-full-once",
            Fault::CompactWritten => "compact-written",
            Fault::Compacted => "compacted",
        }
    }

    /// What the child does: killed at a hook point, or writes to a full disk.
    fn in_child(self) -> Fault {
        match self {
            Fault::Torn | Fault::Flipped => Fault::AfterDurable,
            other => other,
        }
    }

    /// Whether the case counts compactions (else records).
    fn per_compaction(self) -> bool {
        matches!(self, Fault::CompactWritten | Fault::Compacted)
    }

    fn kill_point(self) -> Option<HookPoint> {
        match self {
            Fault::AfterDurable => Some(HookPoint::Durable),
            Fault::BeforeWrite => Some(HookPoint::BeforeWrite),
            Fault::CompactWritten => Some(HookPoint::CompactWritten),
            Fault::Compacted => Some(HookPoint::Compacted),
            _ => None,
        }
    }
}

/// The file-size limit of the full-disk cases: record k may put `1 + (37 k mod 50)`
/// bytes out (always less than the shortest record line) before its write fails.
fn full_disk_hook(journal: String, k: u64, once: bool) -> qmp_hotplug::journal::JournalHook {
    // SAFETY: setting a signal's disposition to "ignore" has no memory-safety
    // preconditions; this child has no handler of its own. With SIGXFSZ ignored a write
    // past the file-size limit fails with EFBIG, as one on a full disk fails with ENOSPC.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let tries = AtomicU64::new(0);
    Arc::new(move |point, n| {
        if point != HookPoint::BeforeWrite || n != k {
            return;
        }
        let hard = rustix::process::getrlimit(rustix::process::Resource::Fsize).maximum;
        let limit = match tries.fetch_add(1, Ordering::SeqCst) {
            0 => Some(std::fs::metadata(&journal).unwrap().len() + 1 + (37 * k) % 50),
            _ if once => hard,
            _ => return,
        };
        rustix::process::setrlimit(
            rustix::process::Resource::Fsize,
            rustix::process::Rlimit { current: limit, maximum: hard },
        )
        .unwrap();
    })
}

/// Child mode: run one scenario with `fault` at `at` (0: none) and report how many
/// records and compactions it made.
fn child(scenario: &str, socket: &str, journal: &str, fault: &str, at: u64) {
    let fault = FAULTS.into_iter().find(|f| f.name() == fault).expect("fault name");
    let records = Arc::new(AtomicU64::new(0));
    let compactions = Arc::new(AtomicU64::new(0));
    let fault_hook = match fault {
        Fault::DiskFull | Fault::DiskFullOnce if at > 0 => {
            Some(full_disk_hook(journal.to_owned(), at, fault == Fault::DiskFullOnce))
        }
        _ => None,
    };
    let (r, c) = (Arc::clone(&records), Arc::clone(&compactions));
    let hook: qmp_hotplug::journal::JournalHook = Arc::new(move |p, n| {
        if let Some(h) = &fault_hook {
            h(p, n);
        }
        match p {
            HookPoint::Durable => r.store(n, Ordering::SeqCst),
            HookPoint::Compacted => c.store(n, Ordering::SeqCst),
            _ => {}
        }
        if Some(p) == fault.kill_point() && n == at {
            let me = rustix::process::getpid();
            let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    let client = Arc::new(QmpClient::connect_unix(socket, Default::default()).unwrap());
    let mut opts = options(Scenario::from_name(scenario));
    opts.journal_hook = Some(hook);
    let (engine, _) = Engine::open(client, journal, opts).unwrap();
    let strict = !matches!(fault, Fault::DiskFull | Fault::DiskFullOnce);
    Scenario::from_name(scenario).run(&engine, strict);
    drop(engine);
    println!("RECORDS {}", records.load(Ordering::SeqCst));
    println!("COMPACTIONS {}", compactions.load(Ordering::SeqCst));
}

fn run_child(s: Scenario, q: &Qemu, journal: &Path, fault: Fault, at: u64) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .env("QMP_CRASH_CHILD", s.name())
        .env("QMP_CRASH_FAULT", fault.in_child().name())
        .env("QMP_CRASH_SOCKET", &q.qmp)
        .env("QMP_CRASH_JOURNAL", journal)
        .env("QMP_CRASH_AT", at.to_string())
        .output()
        .unwrap()
}

struct Row {
    scenario: &'static str,
    fault: Fault,
    k: u64,
    /// What was done to the file (torn and flipped cases).
    damage: String,
    last_record: String,
    before: String,
    after: DeviceState,
    action: String,
    ok: Result<(), String>,
}

/// The journal's last complete record, shortened to its kind and subject.
fn last_record(journal: &Path) -> String {
    let Ok((records, _)) = qmp_hotplug::journal::read_file(journal) else { return "(unreadable)".into() };
    let Some(rec) = records.last() else { return "(none)".into() };
    let v = serde_json::to_value(rec).unwrap_or_default();
    match rec {
        Record::Begin { .. } => format!("begin {}", v["op"].as_str().unwrap_or("?")),
        Record::Step { .. } => format!(
            "step {} {}",
            v["step"].as_str().unwrap_or("?"),
            v["id"].as_str().or(v["fdname"].as_str()).unwrap_or("")
        ),
        Record::State { .. } => format!("state {}", v["state"].as_str().unwrap_or("?")),
        Record::Snapshot { device, op, .. } => {
            let op = op.map(|o| format!(", {} under way", serde_json::to_value(o).unwrap_or_default()));
            format!("snapshot {:?}{}", device.state, op.unwrap_or_default().replace('"', ""))
        }
        _ => "?".into(),
    }
}

/// Where the journal's last line starts, and its length with the newline.
fn last_line(bytes: &[u8]) -> (usize, usize) {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    (start, bytes.len() - start)
}

/// Tears record k (the last line): every cut inside it, and every byte of it flipped,
/// must read back as the records before it (checked here, without QEMU); the journal
/// is then left cut (or flipped) at one offset that varies with k, for recovery against
/// QEMU. Returns what was done.
fn tear(journal: &Path, fault: Fault, k: u64) -> Result<String, String> {
    let bytes = std::fs::read(journal).map_err(|e| e.to_string())?;
    let (start, len) = last_line(&bytes);
    let whole = qmp_hotplug::journal::read_bytes(&bytes).map_err(|e| e.to_string())?.records;
    let before = whole.get(..whole.len().saturating_sub(1)).unwrap_or_default();
    let check = |b: &[u8], what: &str| -> Result<(), String> {
        let back = qmp_hotplug::journal::read_bytes(b).map_err(|e| format!("{what}: {e}"))?;
        if back.records != before || back.valid_len != start as u64 {
            return Err(format!(
                "{what}: read back {} records, valid to {}",
                back.records.len(),
                back.valid_len
            ));
        }
        Ok(())
    };
    let pick = usize::try_from(k * 7919).unwrap() % len;
    let mut out = bytes.clone();
    let what = match fault {
        Fault::Torn => {
            for cut in start..bytes.len() {
                check(&bytes[..cut], &format!("cut at {cut}"))?;
            }
            out.truncate(start + pick);
            format!("cut after {pick} of {len} B ({len} cuts read back)")
        }
        _ => {
            for at in start..bytes.len() {
                for mask in [0x01u8, 0x10, 0x80, 0xff] {
                    let mut b = bytes.clone();
                    b[at] ^= mask;
                    check(&b, &format!("byte {at} ^ {mask:#x}"))?;
                }
            }
            out[start + pick] ^= 0x20;
            format!("byte {pick} of {len} ^ 0x20 ({} flips read back)", 4 * len)
        }
    };
    std::fs::write(journal, out).map_err(|e| e.to_string())?;
    Ok(what)
}

/// Checks that QEMU and the recovered engine agree and nothing leaked or doubled.
fn check_converged(s: Scenario, c: &Arc<QmpClient>, engine: &Engine) -> Result<DeviceState, String> {
    let req = s.request();
    let state = engine.on_port("rp0").map_or(DeviceState::Removed, |d| d.state);
    let peripherals = names(c, "/machine/peripheral");
    let objects = names(c, "/objects");
    let fids: Vec<&str> = req.functions.iter().map(|f| f.id().as_str()).collect();
    let here = fids.iter().filter(|id| peripherals.contains(**id)).count();
    // Whatever QEMU has on the port's bus must be ours: nothing stray, nothing twice.
    let pci =
        qmp_hotplug::pci::functions(&c.execute_raw("query-pci", None, Duration::from_secs(30)).unwrap());
    let on_bus: Vec<&str> = pci.iter().filter(|f| f.address.bus() == 1).map(|f| f.qdev_id.as_str()).collect();
    let distinct: HashSet<&str> = on_bus.iter().copied().collect();
    let ours = |id: &&str| fids.contains(id) || *id == PLACEHOLDER;
    if distinct.len() != on_bus.len() || !on_bus.iter().all(ours) {
        return Err(format!("bus 1 holds {on_bus:?}"));
    }
    // A placeholder and a device never share the port, and a placeholder that left took
    // its backend along.
    let placeholder_here = peripherals.contains(PLACEHOLDER);
    if placeholder_here && here > 0 {
        return Err(format!("placeholder and {here} function(s) on the port at once"));
    }
    if !placeholder_here && objects.contains(PLACEHOLDER_MEM) && state == DeviceState::Visible {
        return Err("placeholder gone but its backend left behind".into());
    }
    match state {
        DeviceState::Visible => {
            if placeholder_here || (req.placeholder.is_some() && objects.contains(PLACEHOLDER_MEM)) {
                return Err("visible but the placeholder (or its backend) is still there".into());
            }
            if here != fids.len() {
                return Err(format!("visible but only {here} of {} functions in QEMU", fids.len()));
            }
            if req.objects.iter().any(|o| !objects.contains(o.id.as_str())) {
                return Err("visible but an object is missing".into());
            }
        }
        DeviceState::Removed => {
            if here != 0 || req.objects.iter().any(|o| objects.contains(o.id.as_str())) {
                return Err(format!("removed but QEMU still has {here} functions / objects"));
            }
            if !engine.is_port_free("rp0") {
                return Err("removed but port held".into());
            }
        }
        DeviceState::UnplugPending => {
            if here == 0 {
                return Err("pending although QEMU has nothing left".into());
            }
            if engine.is_port_free("rp0") {
                return Err("pending but port free".into());
            }
        }
        other => return Err(format!("not converged: {other:?}")),
    }
    Ok(state)
}

/// The recovered engine can go on: unplug what is visible, plug again what is gone.
fn check_usable(s: Scenario, engine: &Engine, state: DeviceState) -> Result<(), String> {
    match (state, s) {
        (DeviceState::Visible, _) => {
            let want =
                if s.hotplug() == Hotplug::Native { UnplugOutcome::Removed } else { UnplugOutcome::Pending };
            let got = engine.unplug(s.request().device.as_str()).map_err(|e| e.to_string())?;
            (got == want).then_some(()).ok_or(format!("unplug after recovery: {got:?}"))
        }
        (DeviceState::Removed, Scenario::FailedPlugRollback) => {
            engine.plug(gpu_like(0, 16)).map(drop).map_err(|e| format!("port not reusable: {e}"))
        }
        (DeviceState::Removed, _) => {
            engine.plug(s.request()).map(drop).map_err(|e| format!("port not reusable: {e}"))
        }
        _ => Ok(()),
    }
}

fn case(s: Scenario, fault: Fault, k: u64) -> Row {
    let q = Qemu::q35(1, s.hotplug());
    let c = Arc::new(q.connect());
    q.wait_firmware(&c, 1);
    s.setup(&c);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    // The child needs the QMP socket to itself.
    drop(Arc::try_unwrap(c).ok());
    let out = run_child(s, &q, &journal, fault, k);
    let killed = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9);
    let mut row = Row {
        scenario: s.name(),
        fault,
        k,
        damage: String::new(),
        last_record: last_record(&journal),
        before: String::new(),
        after: DeviceState::Removed,
        action: String::new(),
        ok: Ok(()),
    };
    let expected = if fault.kill_point().is_some() || fault.in_child() == Fault::AfterDurable {
        killed
    } else {
        out.status.success()
    };
    if !expected {
        row.ok = Err(format!("child ended {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
        return row;
    }
    if matches!(fault, Fault::Torn | Fault::Flipped) {
        match tear(&journal, fault, k) {
            Ok(what) => row.damage = what,
            Err(e) => {
                row.ok = Err(e);
                return row;
            }
        }
    }
    let c = Arc::new(q.connect());
    let (engine, report) = match Engine::open(Arc::clone(&c), &journal, options(s)) {
        Ok(x) => x,
        Err(e) => {
            row.ok = Err(format!("recovery failed: {e}"));
            return row;
        }
    };
    if let Some(a) = report.actions.first() {
        row.before = format!("{:?}", a.before);
        row.action = a.action.clone();
    } else {
        row.before = "(nothing journaled)".into();
        row.action = "none".into();
    }
    if let Some(t) = report.journal.torn_tail {
        row.before.push_str(&format!("; {} B torn tail cut", t.len));
    }
    row.ok = check_converged(s, &c, &engine).and_then(|state| {
        row.after = state;
        drop(engine);
        // Recovering again is idempotent: nothing to do, same state.
        let (engine, again) =
            Engine::open(Arc::clone(&c), &journal, options(s)).map_err(|e| e.to_string())?;
        if again.had_interrupted() {
            return Err(format!("second recovery acted: {again:?}"));
        }
        if again.journal.torn_tail.is_some() || !again.journal.damaged.is_empty() {
            return Err(format!("second open found damage: {:?}", again.journal));
        }
        if check_converged(s, &c, &engine)? != state {
            return Err("second recovery changed the state".into());
        }
        check_usable(s, &engine, state)
    });
    row
}

fn main() {
    if let Ok(s) = std::env::var("QMP_CRASH_CHILD") {
        let socket = std::env::var("QMP_CRASH_SOCKET").unwrap();
        let journal = std::env::var("QMP_CRASH_JOURNAL").unwrap();
        let fault = std::env::var("QMP_CRASH_FAULT").unwrap();
        let at: u64 = std::env::var("QMP_CRASH_AT").unwrap().parse().unwrap();
        child(&s, &socket, &journal, &fault, at);
        return;
    }
    // `cargo test` passes filters and flags; this harness runs everything unless asked
    // only to list.
    if std::env::args().any(|a| a == "--list") {
        println!("crash_matrix: test");
        return;
    }
    let mut rows = Vec::new();
    for s in SCENARIOS {
        let q = Qemu::q35(1, s.hotplug());
        let c = q.connect();
        q.wait_firmware(&c, 1);
        s.setup(&c);
        drop(c);
        let dir = tempfile::tempdir().unwrap();
        let out = run_child(s, &q, &dir.path().join("journal"), Fault::AfterDurable, 0);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} without crash failed: {}",
            s.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let count = |what: &str| -> u64 {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(what))
                .and_then(|n| n.trim().parse().ok())
                .expect("child reports its counts")
        };
        let (records, compactions) = (count("RECORDS "), count("COMPACTIONS "));
        drop(q);
        for fault in FAULTS {
            let total = if fault.per_compaction() { compactions } else { records };
            // Only the compacting scenario compacts while running (compaction 1 is the
            // one on open, before any record).
            if fault.per_compaction() && s != Scenario::PlugUnplugCompacting {
                continue;
            }
            for k in 1..=total {
                let row = case(s, fault, k);
                eprintln!("{} {} k={} {:?}", row.scenario, fault.name(), row.k, row.ok);
                rows.push(row);
            }
        }
    }
    println!("| scenario | fault | record | damage | last durable record | journal state | recovery | converged to | result |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:?} | {} |",
            r.scenario,
            r.fault.name(),
            r.k,
            if r.damage.is_empty() { "-" } else { &r.damage },
            r.last_record,
            r.before,
            r.action,
            r.after,
            match &r.ok {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAIL: {e}"),
            }
        );
    }
    let failed = rows.iter().filter(|r| r.ok.is_err()).count();
    let mut per_fault: Vec<String> = Vec::new();
    for f in FAULTS {
        let n = rows.iter().filter(|r| r.fault == f).count();
        if n > 0 {
            per_fault.push(format!("{} {n}", f.name()));
        }
    }
    println!("\ncrash matrix: {} passed, {} failed ({})", rows.len() - failed, failed, per_fault.join(", "));
    if failed > 0 || rows.is_empty() {
        std::process::exit(1);
    }
}

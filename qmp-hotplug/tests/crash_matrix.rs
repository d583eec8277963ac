//! Crash-recovery matrix against real QEMU.
//!
//! For each scenario the engine runs in a child process (this same binary, in child mode)
//! that kills itself with SIGKILL at one point, for every point the scenario passes:
//! right after journal record N becomes durable (before the step it announces is sent),
//! and right before record N is written (after the step the previous record announced
//! was executed by QEMU). A new engine then opens the journal against the same QEMU and
//! recovers. Every case must converge: each device is either visible with all functions
//! exactly once, or gone with no function, object or port left behind, or pending unplug
//! with its port still held; a second recovery changes nothing; and the port is usable
//! afterwards. Prints the matrix as Markdown (recorded in RELIABILITY.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{gpu_like, names, single, Hotplug, Qemu};
use qmp_hotplug::engine::{Engine, EngineOptions, UnplugOutcome};
use qmp_hotplug::journal::HookPoint;
use qmp_hotplug::request::{DeviceRequest, PlaceholderRequest};
use qmp_hotplug::state::DeviceState;
use qmp_hotplug::QmpClient;
use serde_json::json;

#[derive(Clone, Copy, Debug)]
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
}

const SCENARIOS: [Scenario; 5] = [
    Scenario::PlugMultifunction,
    Scenario::PlugUnplug,
    Scenario::UnplugTimeout,
    Scenario::FailedPlugRollback,
    Scenario::PlaceholderSwap,
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

    fn request(self) -> DeviceRequest {
        match self {
            Scenario::PlugMultifunction | Scenario::PlugUnplug => gpu_like(0, 16),
            Scenario::UnplugTimeout => single(0, "nic0", "e1000e"),
            Scenario::FailedPlugRollback => {
                let mut r = gpu_like(0, 16);
                r.functions[0].qdev.insert("driver".into(), json!("no-such-device-model"));
                r
            }
            Scenario::PlaceholderSwap => {
                let mut r = gpu_like(0, 16);
                r.placeholder = Some(PlaceholderRequest {
                    devices: vec![PLACEHOLDER.into()],
                    objects: vec![PLACEHOLDER_MEM.into()],
                });
                r
            }
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

    /// Runs the scenario's operations (in the child).
    fn run(self, engine: &Engine) {
        match self {
            Scenario::PlugMultifunction => {
                engine.plug(self.request()).unwrap();
            }
            Scenario::PlugUnplug => {
                engine.plug(self.request()).unwrap();
                assert_eq!(engine.unplug("rp0").unwrap(), UnplugOutcome::Removed);
            }
            Scenario::UnplugTimeout => {
                engine.plug(self.request()).unwrap();
                assert_eq!(engine.unplug("rp0").unwrap(), UnplugOutcome::Pending);
            }
            Scenario::FailedPlugRollback => {
                assert!(engine.plug(self.request()).is_err());
            }
            Scenario::PlaceholderSwap => {
                engine.plug(self.request()).unwrap();
            }
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
    EngineOptions { unplug_timeout, ..Default::default() }
}

/// Where the child dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// Right after record k is durable.
    AfterDurable,
    /// Right before record k is written.
    BeforeWrite,
}

impl Kill {
    fn name(self) -> &'static str {
        match self {
            Kill::AfterDurable => "after-durable",
            Kill::BeforeWrite => "before-write",
        }
    }

    fn point(self) -> HookPoint {
        match self {
            Kill::AfterDurable => HookPoint::Durable,
            Kill::BeforeWrite => HookPoint::BeforeWrite,
        }
    }
}

/// Child mode: run one scenario, SIGKILL self at (`kill`, `crash_at`); 0 never.
fn child(scenario: &str, socket: &str, journal: &str, kill: &str, crash_at: u64) {
    let kill =
        [Kill::AfterDurable, Kill::BeforeWrite].into_iter().find(|k| k.name() == kill).expect("kill mode");
    let point = kill.point();
    let hook: qmp_hotplug::journal::JournalHook = Arc::new(move |p, n| {
        if p == point && n == crash_at {
            let me = rustix::process::getpid();
            let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    let client = Arc::new(QmpClient::connect_unix(socket, Default::default()).unwrap());
    let opts = EngineOptions { journal_hook: Some(hook), ..options(Scenario::from_name(scenario)) };
    let (engine, _) = Engine::open(client, journal, opts).unwrap();
    Scenario::from_name(scenario).run(&engine);
    drop(engine);
    let (_, records) = qmp_hotplug::journal::Journal::open(journal, None).unwrap();
    // Compaction on open happened before the scenario: count what the scenario wrote.
    println!("RECORDS {}", records.len());
}

fn run_child(s: Scenario, q: &Qemu, journal: &Path, kill: Kill, crash_after: u64) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .env("QMP_CRASH_CHILD", s.name())
        .env("QMP_CRASH_KILL", kill.name())
        .env("QMP_CRASH_SOCKET", &q.qmp)
        .env("QMP_CRASH_JOURNAL", journal)
        .env("QMP_CRASH_AFTER", crash_after.to_string())
        .output()
        .unwrap()
}

struct Row {
    scenario: &'static str,
    kill: Kill,
    k: u64,
    last_record: String,
    before: String,
    after: DeviceState,
    action: String,
    ok: Result<(), String>,
}

/// The journal's last record, shortened to its kind and subject.
fn last_record(journal: &Path) -> String {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let Some(line) = text.lines().last() else { return "(none)".into() };
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    match v["record"].as_str().unwrap_or("?") {
        "begin" => format!("begin {}", v["op"].as_str().unwrap_or("?")),
        "step" => format!(
            "step {} {}",
            v["step"].as_str().unwrap_or("?"),
            v["id"].as_str().or(v["fdname"].as_str()).unwrap_or("")
        ),
        "state" => format!("state {}", v["state"].as_str().unwrap_or("?")),
        other => other.to_string(),
    }
}

/// Checks that QEMU and the recovered engine agree and nothing leaked or doubled.
fn check_converged(s: Scenario, c: &Arc<QmpClient>, engine: &Engine) -> Result<DeviceState, String> {
    let req = s.request();
    let state = engine.device("rp0").map_or(DeviceState::Removed, |d| d.state);
    let peripherals = names(c, "/machine/peripheral");
    let objects = names(c, "/objects");
    let fids: Vec<&str> = req.functions.iter().map(|f| f.id()).collect();
    let here = fids.iter().filter(|id| peripherals.contains(**id)).count();
    // Whatever QEMU has on the port's bus must be ours: nothing stray, nothing twice.
    let pci =
        qmp_hotplug::pci::functions(&c.execute_raw("query-pci", None, Duration::from_secs(30)).unwrap());
    let on_bus: Vec<&str> = pci.iter().filter(|f| f.address.bus == 1).map(|f| f.qdev_id.as_str()).collect();
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
            if req.objects.iter().any(|o| !objects.contains(&o.id)) {
                return Err("visible but an object is missing".into());
            }
        }
        DeviceState::Removed => {
            if here != 0 || req.objects.iter().any(|o| objects.contains(&o.id)) {
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
            let got = engine.unplug("rp0").map_err(|e| e.to_string())?;
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

fn case(s: Scenario, kill: Kill, k: u64) -> Row {
    let q = Qemu::q35(1, s.hotplug());
    let c = Arc::new(q.connect());
    q.wait_firmware(&c, 1);
    s.setup(&c);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    // The child needs the QMP socket to itself.
    drop(Arc::try_unwrap(c).ok());
    let out = run_child(s, &q, &journal, kill, k);
    let killed = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9);
    let mut row = Row {
        scenario: s.name(),
        kill,
        k,
        last_record: last_record(&journal),
        before: String::new(),
        after: DeviceState::Removed,
        action: String::new(),
        ok: Ok(()),
    };
    if !killed {
        row.ok =
            Err(format!("child was not killed: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr)));
        return row;
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
    row.ok = check_converged(s, &c, &engine).and_then(|state| {
        row.after = state;
        drop(engine);
        // Recovering again is idempotent: nothing to do, same state.
        let (engine, again) =
            Engine::open(Arc::clone(&c), &journal, options(s)).map_err(|e| e.to_string())?;
        if again.had_interrupted() {
            return Err(format!("second recovery acted: {again:?}"));
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
        let kill = std::env::var("QMP_CRASH_KILL").unwrap();
        let after: u64 = std::env::var("QMP_CRASH_AFTER").unwrap().parse().unwrap();
        child(&s, &socket, &journal, &kill, after);
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
        let out = run_child(s, &q, &dir.path().join("journal"), Kill::AfterDurable, 0);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} without crash failed: {}",
            s.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let total: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RECORDS "))
            .and_then(|n| n.parse().ok())
            .expect("child reports its record count");
        drop(q);
        for kill in [Kill::AfterDurable, Kill::BeforeWrite] {
            for k in 1..=total {
                let row = case(s, kill, k);
                eprintln!("{} {} k={} {:?}", row.scenario, kill.name(), row.k, row.ok);
                rows.push(row);
            }
        }
    }
    println!("| scenario | killed | record | last durable record | journal state | recovery | converged to | result |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:?} | {} |",
            r.scenario,
            r.kill.name(),
            r.k,
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
    println!("\ncrash matrix: {} passed, {} failed", rows.len() - failed, failed);
    if failed > 0 || rows.is_empty() {
        std::process::exit(1);
    }
}

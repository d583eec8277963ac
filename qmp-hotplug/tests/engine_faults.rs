//! Faults around the engine that must end in typed errors and lose nothing: a full disk
//! under the journal, requests the journal could not read back, files that would block,
//! deadlines too long to represent, and a journal that must not grow with the number of
//! operations. Against the in-process fake QEMU (`common::fake_qemu`), so that thousands
//! of operations take seconds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::fake_qemu::FakeQemu;
use qmp_hotplug::client::{ClientOptions, QmpClient};
use qmp_hotplug::engine::{Engine, EngineError, EngineOptions, UnplugOutcome};
use qmp_hotplug::journal::HookPoint;
use qmp_hotplug::request::{PlugRequest, PlugRequestError, MAX_REQUEST_BYTES};
use qmp_hotplug::state::DeviceState;

/// One e1000e on `rp{port}` (the device `p{port}f0`) with its 4 KiB BAR 0 (what the fake
/// reports).
fn request(port: usize) -> PlugRequest {
    common::e1000e_slot(port, 1, false, 4096)
}

fn client(fake: &FakeQemu, options: ClientOptions) -> Arc<QmpClient> {
    Arc::new(QmpClient::connect_unix(&fake.path, options).unwrap())
}

fn open(fake: &FakeQemu, journal: &Path, options: EngineOptions) -> Engine {
    let mut options_c = ClientOptions::default();
    options_c.command_timeout = Duration::from_secs(10);
    let c = client(fake, options_c);
    Engine::open(c, journal, options).unwrap().0
}

fn state(engine: &Engine, port: &str) -> Option<DeviceState> {
    engine.on_port(port).map(|d| d.state)
}

/// Runs `f` on a thread and waits at most `limit` for it: a call that hangs fails the
/// test instead of hanging it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the call did not return in time")
}

/// The child of [`a_failed_append_then_a_plug_keeps_every_device`]: its journal file may
/// not grow past the end of record 4 (the plug's `device-add` step on `rp2`) at the first
/// try, as on a full disk; at the second try the disk has room again.
fn full_disk_child(socket: &str, journal: &str) {
    // SAFETY: setting a signal's disposition to "ignore" has no memory-safety
    // preconditions; the child is single-purpose and has no handler of its own. With
    // SIGXFSZ ignored a write past the file-size limit fails with EFBIG instead of
    // killing the process, as a full disk fails it with ENOSPC.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let path = journal.to_owned();
    let tries = Arc::new(AtomicU32::new(0));
    let hook: qmp_hotplug::journal::JournalHook = Arc::new(move |point, n| {
        if point != HookPoint::BeforeWrite || n != 4 {
            return;
        }
        let hard = rustix::process::getrlimit(rustix::process::Resource::Fsize).maximum;
        let limit = match tries.fetch_add(1, Ordering::SeqCst) {
            // Room for 10 bytes of the record: it is torn, then the write fails.
            0 => Some(std::fs::metadata(&path).unwrap().len() + 10),
            _ => hard,
        };
        rustix::process::setrlimit(
            rustix::process::Resource::Fsize,
            rustix::process::Rlimit { current: limit, maximum: hard },
        )
        .unwrap();
    });
    let c = Arc::new(QmpClient::connect_unix(socket, ClientOptions::default()).unwrap());
    let mut options = EngineOptions::default();
    options.journal_hook = Some(hook);
    let (engine, _) = Engine::open(c, journal, options).unwrap();
    let err = engine.plug(request(2)).unwrap_err();
    assert!(matches!(&err, EngineError::PlugFailed { state: DeviceState::Removed, .. }), "{err}");
    assert!(err.to_string().contains("journal"), "{err}");
    // The disk has room again: the next plug goes through.
    engine.plug(request(2)).unwrap();
}

/// A failed append (the file-size limit standing in for a full disk), then a successful
/// plug: the journal still opens and every device is recovered. The torn record used
/// to stay in the file, the next record was appended to it, and `Engine::open` failed for
/// good ("line 8: expected `,`"), losing the devices on the other ports.
#[test]
fn a_failed_append_then_a_plug_keeps_every_device() {
    if let (Ok(socket), Ok(journal)) = (std::env::var("FULL_DISK_SOCKET"), std::env::var("FULL_DISK_JOURNAL"))
    {
        full_disk_child(&socket, &journal);
        return;
    }
    let fake = FakeQemu::start(3);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    {
        let engine = open(&fake, &journal, EngineOptions::default());
        engine.plug(request(0)).unwrap();
        engine.plug(request(1)).unwrap();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_failed_append_then_a_plug_keeps_every_device", "--nocapture"])
        .env("FULL_DISK_SOCKET", &fake.path)
        .env("FULL_DISK_JOURNAL", &journal)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let engine = open(&fake, &journal, EngineOptions::default());
    for port in ["rp0", "rp1", "rp2"] {
        assert_eq!(state(&engine, port), Some(DeviceState::Visible), "{port}");
    }
    let devices: Vec<String> = fake.state.lock().unwrap().devices.keys().cloned().collect();
    assert_eq!(devices, ["p0f0", "p1f0", "p2f0"]);
}

/// A request the journal could not read back never reaches QEMU or the journal, and the
/// engine opens again afterwards with the other device. A `device_add` property nested
/// 130 levels deep (QEMU takes it) used to be plugged, and `Engine::open` then failed
/// with "recursion limit exceeded", losing both devices; a request cannot hold one now
/// (properties are booleans, numbers and text: such JSON is refused when read), and one
/// too large for a journal record is refused before anything is journaled or sent.
#[test]
fn a_request_the_journal_could_not_read_back_is_refused() {
    let fake = FakeQemu::start(2);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake, &journal, EngineOptions::default());
    engine.plug(request(0)).unwrap();
    let mut deep = serde_json::json!(1);
    for _ in 0..130 {
        deep = serde_json::json!({ "x": deep });
    }
    let mut text = serde_json::to_value(request(1)).unwrap();
    text["functions"][0]["qdev"]["x-deep"] = deep;
    let err = serde_json::from_value::<PlugRequest>(text).unwrap_err();
    assert!(err.to_string().contains("x-deep"), "{err}");
    let mut r = request(1);
    r.functions[0].device = r.functions[0].device.clone().prop("x-big", "x".repeat(MAX_REQUEST_BYTES));
    let err = engine.plug(r).unwrap_err();
    assert!(matches!(err, EngineError::Request(PlugRequestError::TooLarge { .. })), "{err}");
    assert_eq!(fake.state.lock().unwrap().adds, 1);
    assert!(engine.is_port_free("rp1"));
    drop(engine);
    let engine = open(&fake, &journal, EngineOptions::default());
    assert_eq!(state(&engine, "rp0"), Some(DeviceState::Visible));
}

/// A request's descriptor path that is a FIFO is refused at once, before the port lock
/// is taken or anything journaled; the port takes a device right after. `open(2)` on it
/// used to block for good, holding the port's lock.
#[test]
fn a_fifo_to_pass_is_refused_without_blocking() {
    let fake = FakeQemu::start(1);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let engine = Arc::new(open(&fake, &dir.path().join("journal"), EngineOptions::default()));
    for writable in [false, true] {
        let r = request(0).with_fd_path("f", fifo.clone(), writable);
        let e = Arc::clone(&engine);
        let err = within(Duration::from_secs(10), move || e.plug(r)).unwrap_err();
        assert!(matches!(&err, EngineError::SpecialFile { kind: qmp_hotplug::FileKind::Fifo, .. }), "{err}");
    }
    let e = Arc::clone(&engine);
    within(Duration::from_secs(10), move || e.plug(request(0))).unwrap();
    assert!(fake.state.lock().unwrap().fds.is_empty());
}

/// `Duration::MAX` as every deadline: connecting, the handshake, commands, the unplug
/// wait. It saturates (no practical limit) instead of panicking with "overflow when
/// adding duration to instant".
#[test]
fn duration_max_deadlines_saturate() {
    let fake = FakeQemu::start(1);
    fake.state.lock().unwrap().auto_eject = true;
    let dir = tempfile::tempdir().unwrap();
    let mut client_options = ClientOptions::default();
    client_options.command_timeout = Duration::MAX;
    client_options.handshake_timeout = Duration::MAX;
    client_options.connect_timeout = Duration::MAX;
    let c = client(&fake, client_options);
    c.execute_raw("qom-list", Some(serde_json::json!({"path": "/objects"})), Duration::MAX).unwrap();
    let mut options = EngineOptions::default();
    options.unplug_timeout = Duration::MAX;
    options.visible_timeout = Duration::MAX;
    options.placeholder_timeout = Duration::MAX;
    options.busy_retry = Duration::MAX;
    let (engine, _) = Engine::open(c, dir.path().join("journal"), options).unwrap();
    engine.plug(request(0)).unwrap();
    assert_eq!(engine.unplug("p0f0").unwrap(), UnplugOutcome::Removed);
}

/// Many plug/unplug cycles on one port while a device stays on another, with the
/// default options: the journal is compacted while running and stays near 1 MiB, and a
/// restart recovers the other device. It used to grow by ~1.1 KB a cycle until a restart
/// refused it ("larger than 256 MiB") and the device was lost.
#[test]
fn a_running_engine_compacts_its_journal() {
    let fake = FakeQemu::start(2);
    fake.state.lock().unwrap().auto_eject = true;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let engine = open(&fake, &journal, EngineOptions::default());
    engine.plug(request(1)).unwrap();
    let started = Instant::now();
    let mut largest = 0;
    let cycles = 1500;
    for _ in 0..cycles {
        engine.plug(request(0)).unwrap();
        assert_eq!(engine.unplug("p0f0").unwrap(), UnplugOutcome::Removed);
        largest = largest.max(std::fs::metadata(&journal).unwrap().len());
    }
    eprintln!("{cycles} cycles in {:?}, journal at most {largest} bytes", started.elapsed());
    assert!(largest < (1 << 20) + (64 << 10), "journal grew to {largest} bytes");
    drop(engine);
    let engine = open(&fake, &journal, EngineOptions::default());
    assert_eq!(state(&engine, "rp1"), Some(DeviceState::Visible));
    assert!(engine.is_port_free("rp0"));
}

/// The child of [`a_held_descriptor_is_not_passed_again_after_a_restart`]: plugs
/// `request(0)` with a descriptor it opened itself, and kills itself at journal record
/// `at` (`durable`: right after it is durable; else right before it is written).
fn held_fd_child(socket: &str, journal: &str, at: u64, durable: bool) {
    let point = if durable { HookPoint::Durable } else { HookPoint::BeforeWrite };
    let hook: qmp_hotplug::journal::JournalHook = Arc::new(move |p, n| {
        if p == point && n == at {
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
            std::thread::sleep(Duration::from_secs(60));
        }
    });
    let c = Arc::new(QmpClient::connect_unix(socket, ClientOptions::default()).unwrap());
    let mut options = EngineOptions::default();
    options.journal_hook = Some(hook);
    let (engine, _) = Engine::open(c, journal, options).unwrap();
    let fd = std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let _ = engine.plug(request(0).with_fd("held0", fd));
    panic!("the hook did not end the process");
}

/// A plug with a descriptor its caller held, cut off by the death of that process. The
/// journal names the descriptor only, so a restarted engine cannot pass it again: where
/// the device was still to be added, recovery rolls the plug back (`DescriptorGone`);
/// where every device was added already (QEMU holds its copy), it finishes the plug.
#[test]
fn a_held_descriptor_is_not_passed_again_after_a_restart() {
    if let (Ok(socket), Ok(journal), Ok(at)) =
        (std::env::var("HELD_FD_SOCKET"), std::env::var("HELD_FD_JOURNAL"), std::env::var("HELD_FD_AT"))
    {
        let (n, point) = at.split_once(':').unwrap();
        held_fd_child(&socket, &journal, n.parse().unwrap(), point == "durable");
        return;
    }
    // Records of the plug: begin, planned, adding, get-fd (4), device-add (5), added (6).
    for (at, want, reason) in [
        ("4:durable", DeviceState::Removed, "descriptor held0"),
        ("6:before", DeviceState::Visible, "finished plug (1 of 1 devices were there)"),
    ] {
        let fake = FakeQemu::start(1);
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "a_held_descriptor_is_not_passed_again_after_a_restart", "--nocapture"])
            .env("HELD_FD_SOCKET", &fake.path)
            .env("HELD_FD_JOURNAL", &journal)
            .env("HELD_FD_AT", at)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{at}: the child was to die");
        let text = std::fs::read_to_string(&journal).unwrap();
        assert!(text.contains(r#"{"fdname":"held0","held":true}"#), "{text}");
        let c = client(&fake, ClientOptions::default());
        let (engine, report) = Engine::open(c, &journal, EngineOptions::default()).unwrap();
        assert_eq!(report.actions.len(), 1, "{report:?}");
        assert_eq!(report.actions[0].after, want, "{at}: {report:?}");
        assert!(report.actions[0].action.contains(reason), "{at}: {report:?}");
        assert_eq!(state(&engine, "rp0"), Some(want));
        let fake_devices = fake.state.lock().unwrap().devices.len();
        assert_eq!(fake_devices, usize::from(want == DeviceState::Visible), "{at}");
    }
}

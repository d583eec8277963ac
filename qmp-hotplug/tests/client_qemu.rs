//! The QMP client against real QEMU 7.2 processes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Hotplug, Qemu, QEMU_X86};
use qmp_hotplug::client::{ClientError, ClientOptions, CloseReason, QmpClient};
use serde_json::json;

#[test]
fn greeting_typed_and_raw_commands() {
    let q = Qemu::q35(1, Hotplug::Acpi);
    let c = q.connect();
    assert_eq!((c.greeting().version.major, c.greeting().version.minor), (7, 2));
    q.wait_firmware(&c, 1);
    // The qapi crate's generated types fit QEMU 7.2's query-pci and qom-list.
    let pci = c.execute(&qapi::qmp::query_pci {}).unwrap();
    assert!(pci.iter().any(|b| b.devices.iter().any(|d| d.qdev_id == "rp0")));
    let peripherals = c.execute(&qapi::qmp::qom_list { path: "/machine/peripheral".into() }).unwrap();
    assert!(peripherals.iter().any(|p| p.name == "rp0"));
    // The raw path: a command name QEMU does not know gives its error class back.
    let err = c.execute_raw("x-no-such-command", None, Duration::from_secs(30)).unwrap_err();
    assert_eq!(err.qmp_error().map(|e| e.0), Some("CommandNotFound"));
}

#[test]
fn stdio_pipes() {
    common::require(QEMU_X86, "qemu-system-x86");
    let mut child = Command::new(QEMU_X86)
        .args(["-nodefaults", "-display", "none", "-machine", "q35,accel=tcg", "-m", "128"])
        .args(["-smp", "1", "-qmp", "stdio", "-S"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let inp = child.stdin.take().unwrap();
    let c = QmpClient::from_pipes(out, inp, ClientOptions::default()).unwrap();
    let status = c.execute(&qapi::qmp::query_status {}).unwrap();
    assert!(!status.running);
    // No descriptor passing over pipes: a typed error, not a silent drop.
    let null = File::open("/dev/null").unwrap();
    let err = c.getfd("nope", null.as_fd()).unwrap_err();
    assert!(matches!(err, ClientError::Send(_)), "{err:?}");
    c.execute_raw("quit", None, Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.closed().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.closed(), Some(CloseReason::Eof));
    child.wait().unwrap();
}

#[test]
fn getfd_and_add_fd_pass_descriptors() {
    let q = Qemu::q35(0, Hotplug::Acpi);
    let c = q.connect();
    let null = File::open("/dev/null").unwrap();
    c.getfd("testfd", null.as_fd()).unwrap();
    // QEMU holds it now: closing by name works once, and the second time it is gone.
    c.closefd("testfd").unwrap();
    let err = c.closefd("testfd").unwrap_err();
    assert_eq!(err.qmp_error().map(|e| e.0), Some("GenericError"));

    let info = c.add_fd(null.as_fd(), None, Some("opaque-text")).unwrap();
    let sets = c.execute_raw("query-fdsets", None, Duration::from_secs(30)).unwrap();
    let set = sets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fdset-id"] == json!(info.fdset_id))
        .expect("the fd set QEMU reported");
    assert_eq!(set["fds"][0]["fd"], json!(info.fd));
    assert_eq!(set["fds"][0]["opaque"], "opaque-text");
}

#[test]
fn events_between_replies_reach_every_subscriber() {
    let q = Qemu::q35(1, Hotplug::Native);
    let c = q.connect();
    q.wait_firmware(&c, 1);
    let a = c.subscribe();
    let b = c.subscribe();
    c.execute_raw(
        "device_add",
        Some(json!({"driver": "e1000e", "id": "n0", "bus": "rp0"})),
        Duration::from_secs(30),
    )
    .unwrap();
    c.execute(&qapi::qmp::device_del { id: "n0".into() }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in [&a, &b] {
        let e = s.wait_for(deadline, |e| e.deleted_device_id() == Some("n0")).unwrap();
        assert!(matches!(e.typed(), Some(qapi::qmp::Event::DEVICE_DELETED { .. })));
    }
}

#[test]
fn qemu_killed_mid_wait_ends_in_typed_error() {
    let mut q = Qemu::q35(0, Hotplug::Acpi);
    let c = q.connect();
    let events = c.subscribe();
    q.kill();
    let err = events.recv_timeout(Duration::from_secs(30)).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");
    let err = c.execute_raw("query-status", None, Duration::from_secs(5)).unwrap_err();
    assert!(err.is_connection_lost(), "{err:?}");
}

/// QEMU serves one QMP client at a time; later connections wait in the socket's listen
/// backlog, and once that is full a blocking `connect(2)` waits in the kernel. With QEMU
/// busy with one client and its backlog full, `connect_unix` must end at its
/// `connect_timeout` with a typed error (it used to block past 20 s with 2 s).
#[test]
fn a_busy_qmp_socket_ends_at_the_connect_deadline() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let q = Qemu::q35(1, Hotplug::Acpi);
    let first = q.connect();
    let addr = SocketAddrUnix::new(&q.qmp).unwrap();
    let mut held = Vec::new();
    loop {
        let s =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::NONBLOCK, None)
                .unwrap();
        match rustix::net::connect(&s, &addr) {
            Ok(()) => held.push(s),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(held.len() < 1000, "QEMU's backlog never filled");
    }
    let path = q.qmp.clone();
    let mut options = ClientOptions::default();
    options.connect_timeout = Duration::from_secs(1);
    options.handshake_timeout = Duration::from_secs(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(QmpClient::connect_unix(&path, options).map(drop));
    });
    let err = rx.recv_timeout(Duration::from_secs(15)).expect("connect_unix did not return").unwrap_err();
    assert!(matches!(err, ClientError::ConnectTimeout { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The client QEMU serves is not disturbed.
    first.execute(&qapi::qmp::query_status {}).unwrap();
    drop(held);
}

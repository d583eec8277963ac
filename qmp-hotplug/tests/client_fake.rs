//! Fault tests of the QMP client against a fake peer whose every byte the test controls.
//! Each case must end in a typed error (or the right result) within its deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{FakePeer, GREETING};
use qmp_hotplug::client::{ClientError, CloseReason, QmpClient};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(5);

fn connect(peer: &FakePeer) -> Result<QmpClient, ClientError> {
    QmpClient::connect_unix(&peer.path, FakePeer::options(DEADLINE))
}

#[test]
fn malformed_json_closes_with_typed_error() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let _ = p.recv();
        p.send(r#"{"return": {}, "id": 2"#);
        p.send("this is not json");
    });
    let c = connect(&peer).unwrap();
    let err = c.execute_raw("query-status", None, DEADLINE).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::MalformedJson { .. })), "{err:?}");
    assert!(c.closed().is_some());
    // Once closed, further commands fail at once with the same reason.
    let again = c.execute_raw("query-status", None, DEADLINE).unwrap_err();
    assert!(matches!(again, ClientError::Closed(CloseReason::MalformedJson { .. })));
}

#[test]
fn sixteen_mib_line_is_rejected() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let _ = p.recv();
        let chunk = vec![b'a'; 1 << 20];
        let _ = p.w.write_all(b"{\"return\": \"");
        for _ in 0..16 {
            if p.w.write_all(&chunk).is_err() {
                return; // the client hung up, as it should
            }
        }
        let _ = p.w.write_all(b"\"}\n");
    });
    let c = connect(&peer).unwrap();
    let limit = c.options().max_message_bytes;
    assert!(limit < 16 << 20);
    let err = c.execute_raw("query-status", None, Duration::from_secs(30)).unwrap_err();
    assert!(
        matches!(err, ClientError::Closed(CloseReason::MessageTooLarge { limit: l }) if l == limit),
        "{err:?}"
    );
    drop(c);
}

#[test]
fn unknown_event_is_delivered_not_fatal() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let (_, id, _) = p.recv().unwrap();
        p.send(r#"{"event": "X_EVENT_FROM_THE_FUTURE", "data": {"answer": 42}, "timestamp": {"seconds": 1, "microseconds": 5}}"#);
        p.send(r#"{"event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/machine/peripheral/d0"}, "timestamp": {"seconds": 1, "microseconds": 6}}"#);
        p.reply(&id, json!({"status": "running", "running": true}));
        let _ = p.recv();
    });
    let c = connect(&peer).unwrap();
    let a = c.subscribe();
    let b = c.subscribe();
    let ret = c.execute_raw("query-status", None, DEADLINE).unwrap();
    assert_eq!(ret["status"], "running");
    for s in [&a, &b] {
        let e = s.recv_timeout(DEADLINE).unwrap();
        assert_eq!(e.name, "X_EVENT_FROM_THE_FUTURE");
        assert_eq!(e.data["answer"], 42);
        assert!(e.typed().is_none());
        let e = s.recv_timeout(DEADLINE).unwrap();
        assert_eq!(e.deleted_device_id(), Some("d0"));
        assert!(e.typed().is_some());
    }
    assert!(c.closed().is_none());
}

#[test]
fn replies_out_of_order_reach_their_callers() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let (n1, id1, _) = p.recv().unwrap();
        let (n2, id2, _) = p.recv().unwrap();
        // Answer the second first, each with its own command's name.
        p.reply(&id2, json!({"for": n2}));
        p.reply(&id1, json!({"for": n1}));
        // A reply for an id nobody waits for is counted, not fatal.
        p.reply(&json!(9999), json!({}));
        let (_, id3, _) = p.recv().unwrap();
        p.reply(&id3, json!({"for": "last"}));
    });
    let c = std::sync::Arc::new(connect(&peer).unwrap());
    let c2 = std::sync::Arc::clone(&c);
    let first = std::thread::spawn(move || c2.execute_raw("cmd-a", None, DEADLINE));
    // Make sure cmd-a is written first so the peer reads a then b.
    std::thread::sleep(Duration::from_millis(100));
    let second = c.execute_raw("cmd-b", None, DEADLINE).unwrap();
    let first = first.join().unwrap().unwrap();
    assert_eq!(first["for"], "cmd-a");
    assert_eq!(second["for"], "cmd-b");
    let last = c.execute_raw("cmd-c", None, DEADLINE).unwrap();
    assert_eq!(last["for"], "last");
    assert_eq!(c.stray_replies(), 1);
}

#[test]
fn silent_peer_times_out_in_handshake() {
    let peer = FakePeer::start(|p| {
        // Say nothing; wait until the client hangs up.
        let mut buf = [0u8; 16];
        let _ = std::io::Read::read(&mut &p.w, &mut buf);
    });
    let t = Instant::now();
    let err = QmpClient::connect_unix(&peer.path, FakePeer::options(Duration::from_millis(500))).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn silent_peer_times_out_a_command() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let _ = p.recv();
        let _ = p.recv(); // returns when the client hangs up
    });
    let c = connect(&peer).unwrap();
    let err = c.execute_raw("query-status", None, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    // The connection itself is still fine after a timeout.
    assert!(c.closed().is_none());
}

#[test]
fn eof_during_handshake_is_an_error_not_a_panic() {
    let peer = FakePeer::start(drop);
    let err = connect(&peer).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");

    let peer = FakePeer::start(|mut p| {
        p.send(GREETING);
        let _ = p.recv();
    });
    let err = connect(&peer).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");
}

/// QEMU can write an event (`RESUME` as the guest starts) to a client that connected while
/// it was starting, before its greeting. The client skips such events, a bounded number.
#[test]
fn events_before_the_greeting_are_skipped() {
    const RESUME: &str =
        r#"{"timestamp": {"seconds": 1796523452, "microseconds": 255112}, "event": "RESUME"}"#;
    let peer = FakePeer::start(|mut p| {
        p.send(RESUME);
        p.send(RESUME);
        p.handshake();
        let (_, id, _) = p.recv().unwrap();
        p.reply(&id, json!({"status": "running", "running": true}));
        let _ = p.recv();
    });
    let c = connect(&peer).unwrap();
    assert_eq!(c.execute_raw("query-status", None, DEADLINE).unwrap()["status"], "running");

    // A peer that sends nothing but events is not a QMP server: a typed error, not a wait.
    let peer = FakePeer::start(|mut p| {
        for _ in 0..1000 {
            p.send(RESUME);
        }
        let _ = p.recv();
    });
    let err = connect(&peer).unwrap_err();
    assert!(matches!(err, ClientError::Greeting(_)), "{err:?}");
}

#[test]
fn bad_greeting_is_typed() {
    let peer = FakePeer::start(|mut p| p.send(r#"{"hello": "world"}"#));
    let err = connect(&peer).unwrap_err();
    assert!(matches!(err, ClientError::Greeting(_)), "{err:?}");
}

#[test]
fn error_reply_keeps_class_and_desc() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let (_, id, _) = p.recv().unwrap();
        p.send(
            &json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": id})
                .to_string(),
        );
        let _ = p.recv();
    });
    let c = connect(&peer).unwrap();
    let err = c.execute(&qapi::qmp::device_del { id: "x".into() }).unwrap_err();
    assert_eq!(err.qmp_error(), Some(("DeviceNotFound", "Device 'x' not found")));
}

#[test]
fn eof_wakes_waiters_and_subscribers() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let _ = p.recv();
        // Hang up with the command unanswered.
    });
    let c = connect(&peer).unwrap();
    let events = c.subscribe();
    // No practical deadline (it saturates): the end of the stream is what wakes them.
    let err = c.execute_raw("query-status", None, Duration::MAX).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");
    let err = events.recv_timeout(Duration::MAX).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");
}

/// QEMU's QMP monitor reads its socket one byte at a time and stops reading while a
/// command runs, so the newline after a command can still sit unread in QEMU's socket
/// when the reply has already arrived. If QEMU dies then, Linux ends the client's side of
/// the Unix socket with ECONNRESET instead of a plain end of stream. Either way QEMU is
/// gone: the client must say so the same way.
#[test]
fn peer_closing_with_unread_data_is_end_of_stream() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        // Wait until the client's command has arrived, read none of it, and hang up.
        let mut fds = [rustix::event::PollFd::new(p.r.get_ref(), rustix::event::PollFlags::IN)];
        let timeout = rustix::event::Timespec { tv_sec: 5, tv_nsec: 0 };
        assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
        drop(p);
    });
    let c = connect(&peer).unwrap();
    let events = c.subscribe();
    let err = c.execute_raw("query-status", None, DEADLINE).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");
    assert!(err.is_connection_lost());
    let err = events.recv_timeout(DEADLINE).unwrap_err();
    assert!(matches!(err, ClientError::Closed(CloseReason::Eof)), "{err:?}");
}

/// A stream nobody reads holds at most `event_queue_capacity` events and counts the rest;
/// once read, it has room again; the connection stays up throughout.
#[test]
fn an_unread_event_stream_is_bounded() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let (_, id, _) = p.recv().unwrap();
        for n in 0..25 {
            p.send(&format!(
                r#"{{"event": "X_TICK", "data": {{"n": {n}}}, "timestamp": {{"seconds": 1, "microseconds": 0}}}}"#
            ));
        }
        p.reply(&id, json!({}));
        let (_, id, _) = p.recv().unwrap();
        p.send(r#"{"event": "X_LATE", "data": {}, "timestamp": {"seconds": 2, "microseconds": 0}}"#);
        p.reply(&id, json!({}));
        let _ = p.recv();
    });
    let mut opts = FakePeer::options(DEADLINE);
    opts.event_queue_capacity = 10;
    let c = QmpClient::connect_unix(&peer.path, opts).unwrap();
    let idle = c.subscribe();
    c.execute_raw("query-status", None, DEADLINE).unwrap();
    let queued: Vec<u64> =
        std::iter::from_fn(|| idle.try_recv()).map(|e| e.data["n"].as_u64().unwrap()).collect();
    assert_eq!(queued, (0..10).collect::<Vec<u64>>(), "the first 10 are kept");
    assert_eq!(idle.dropped(), 15);
    c.execute_raw("query-status", None, DEADLINE).unwrap();
    assert_eq!(idle.recv_timeout(DEADLINE).unwrap().name, "X_LATE");
    assert_eq!(idle.dropped(), 15);
    assert!(c.closed().is_none());
}

/// Runs `f` on a thread and waits at most `limit`: a call that hangs fails the test
/// instead of hanging it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the call did not return in time")
}

/// QEMU serves one QMP client at a time and leaves later ones in its listen backlog.
/// Once that is full, a blocking `connect(2)` waits in the kernel with no deadline; the
/// client's must end at `connect_timeout` with a typed error (it used to block past 20 s
/// with a 2 s timeout).
#[test]
fn a_full_listen_backlog_ends_at_the_connect_deadline() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sock");
    let addr = SocketAddrUnix::new(&path).unwrap();
    let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&listener, &addr).unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    // Connections nobody accepts, until the backlog is full.
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
        assert!(held.len() < 1000, "the backlog never filled");
    }
    let options = FakePeer::options(Duration::from_millis(500));
    let t = Instant::now();
    let err = within(Duration::from_secs(10), move || QmpClient::connect_unix(&path, options).map(drop))
        .unwrap_err();
    assert!(matches!(err, ClientError::ConnectTimeout { .. }), "{err:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(500) && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    drop(held);
}

/// A peer that takes 256 KiB every 1.5 s and a 4 MiB command with a 2 s deadline: the
/// command ends at its deadline (it took 26 s when each `send` had a deadline of its
/// own), and since part of it went out, the connection is closed rather than left with
/// half a command in QEMU's buffer.
#[test]
fn a_slow_reader_does_not_stretch_a_command_deadline() {
    let peer = FakePeer::start(|mut p| {
        p.handshake();
        let mut chunk = vec![0u8; 256 << 10];
        loop {
            std::thread::sleep(Duration::from_millis(1500));
            let mut got = 0;
            while got < chunk.len() {
                match std::io::Read::read(&mut p.r, &mut chunk[got..]) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
        }
    });
    let c = QmpClient::connect_unix(&peer.path, FakePeer::options(Duration::from_secs(2))).unwrap();
    let blob = "x".repeat(4 << 20);
    let t = Instant::now();
    let err = c.execute_raw("x-big", Some(json!({ "blob": blob })), Duration::from_secs(2)).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(err, ClientError::Send(qmp_hotplug::client::TransportError::WriteTimeout { sent, .. }) if sent > 0),
        "{err:?}"
    );
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    assert!(matches!(c.closed(), Some(CloseReason::Io(_))), "{:?}", c.closed());
    assert!(matches!(c.execute_raw("query-status", None, DEADLINE), Err(ClientError::Closed(_))));
}

/// Large events to a stream nobody reads: it holds at most `event_queue_bytes` of them
/// and counts the rest in events and bytes. Counting events alone (4096) let each 7 MiB
/// event of small numbers take ~100 MiB of parsed JSON until the process ran out of
/// memory.
#[test]
fn an_unread_stream_is_bounded_in_bytes() {
    const EVENTS: usize = 6;
    let body = "0,".repeat(3_500_000) + "0";
    let line = format!(
        r#"{{"event": "X_BIG", "data": {{"blob": [{body}]}}, "timestamp": {{"seconds": 1, "microseconds": 0}}}}"#
    );
    // Queued as sent, without the newline.
    let size = line.len() as u64;
    let peer = FakePeer::start(move |mut p| {
        p.handshake();
        let (_, id, _) = p.recv().unwrap();
        for _ in 0..EVENTS {
            p.send(&line);
        }
        p.reply(&id, json!({}));
        let _ = p.recv();
    });
    let c = QmpClient::connect_unix(&peer.path, FakePeer::options(Duration::from_secs(30))).unwrap();
    let idle = c.subscribe();
    c.execute_raw("query-status", None, Duration::from_secs(30)).unwrap();
    let cap = c.options().event_queue_bytes;
    assert!(idle.queued_bytes() <= cap, "{} queued", idle.queued_bytes());
    let kept = cap / size as usize;
    assert_eq!(idle.dropped(), (EVENTS - kept) as u64);
    assert_eq!(idle.dropped_bytes(), (EVENTS - kept) as u64 * size);
    for _ in 0..kept {
        let e = idle.try_recv().unwrap();
        assert_eq!(e.data["blob"].as_array().map(Vec::len), Some(3_500_001));
    }
    assert!(idle.try_recv().is_none());
    assert!(c.closed().is_none());
}

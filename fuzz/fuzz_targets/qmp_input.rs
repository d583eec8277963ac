//! What QEMU sends: the input is a script for a fake QEMU on the other end of a socket
//! pair (`pcie_hotplug_fuzz::qmp_peer`: segments cut at NUL bytes, one per turn), so the
//! greeting, the replies to the client's commands and events between them all come from
//! the input. The client connects (`QmpClient::from_stream`), runs `query-pci`,
//! `closefd` (a typed command) and `qom-list`, and reads its events.
//! Promises checked: no panic; every failure is a typed `ClientError` with a message;
//! every call returns within its deadline (plus scheduling slack) whatever the peer
//! sends; an event stream holds at most its capacity; `query-pci` replies of any shape
//! read and go through the fit check without a panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pcie_hotplug_fuzz::{ignore_sigpipe, qmp_peer};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use qmp_hotplug::client::ClientError;
use qmp_hotplug::{pci, BarExpectation, ClientOptions, EventStream, PciExpectation, QmpClient};
use serde_json::json;

/// Deadline of the handshake and of each command: short, so that a script without the
/// reply a command waits for costs little.
const DEADLINE: Duration = Duration::from_millis(10);

/// What a call may take beyond its deadline on a loaded machine.
const SLACK: Duration = Duration::from_secs(2);

/// Events one stream holds.
const QUEUE: usize = 8;

fuzz_target!(init: ignore_sigpipe(), |data: &[u8]| {
    let Ok((stream, peer)) = qmp_peer::start(qmp_peer::segments(data)) else { return };
    let mut options = ClientOptions::default();
    options.command_timeout = DEADLINE;
    options.handshake_timeout = DEADLINE;
    options.connect_timeout = DEADLINE;
    options.max_message_bytes = 64 * 1024;
    options.event_queue_capacity = QUEUE;
    options.event_queue_bytes = 256 * 1024;
    let begun = Instant::now();
    match QmpClient::from_stream(stream, options) {
        Ok(client) => {
            within(begun, "handshake");
            session(&client);
        }
        Err(e) => {
            within(begun, "failed handshake");
            typed(&e);
        }
    }
    let _ = peer.join();
});

fn within(begun: Instant, what: &str) {
    let took = begun.elapsed();
    assert!(took <= DEADLINE + SLACK, "{what} took {took:?} with a {DEADLINE:?} deadline");
}

fn typed(e: &ClientError) {
    assert!(!e.to_string().is_empty());
    let _ = e.qmp_error();
    let _ = e.is_connection_lost();
}

fn session(client: &QmpClient) {
    let events = client.subscribe();
    let _ = client.greeting();
    let begun = Instant::now();
    match client.execute_raw("query-pci", None, DEADLINE) {
        Ok(reply) => query_pci(&reply),
        Err(e) => typed(&e),
    }
    within(begun, "query-pci");
    drain(&events);
    let begun = Instant::now();
    if let Err(e) = client.closefd("fuzzfd") {
        typed(&e);
    }
    within(begun, "closefd");
    let begun = Instant::now();
    match client.execute_raw("qom-list", Some(json!({ "path": "/machine/peripheral" })), DEADLINE) {
        Ok(_) => {}
        Err(e) => typed(&e),
    }
    within(begun, "qom-list");
    drain(&events);
    let _ = client.closed();
    let _ = client.stray_replies();
}

/// Reads what the stream holds now: never more than its capacity.
fn drain(events: &EventStream) {
    let mut n = 0;
    while let Some(ev) = events.try_recv() {
        n += 1;
        assert!(n <= QUEUE, "an event stream of capacity {QUEUE} held {n}");
        let _ = ev.typed();
        let _ = ev.deleted_device_id();
    }
    let _ = events.dropped();
}

/// A `query-pci` reply of any shape: functions, bridges and the fit check.
fn query_pci(reply: &serde_json::Value) {
    let need = [
        Resource::bar(BarKind::Mem32, false, 16 << 20),
        Resource::bar(BarKind::Mem64, true, 1 << 37),
        Resource::bar(BarKind::Io, false, 256),
    ];
    for b in pci::bridges(reply) {
        let _ = pci::window_shortfalls(&b, &need);
    }
    for f in pci::functions(reply) {
        let want = PciExpectation::at(
            f.address,
            f.bars.iter().map(|(i, size)| BarExpectation::at(*i, *size)).collect(),
        );
        let _ = pci::check(&f, &want);
    }
}

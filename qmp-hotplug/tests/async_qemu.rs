//! `AsyncEngine` (feature `tokio`) against real QEMU 7.2 (q35, SeaBIOS, no guest OS).
//! `cargo xtask test` runs the tests with `--all-features`.

#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{gpu_like, single, Hotplug, Qemu};
use qmp_hotplug::async_engine::{AsyncEngine, AsyncError};
use qmp_hotplug::engine::{EngineError, UnplugOutcome};
use qmp_hotplug::state::DeviceState;

fn qemu(ports: usize, mode: Hotplug) -> (Qemu, Arc<qmp_hotplug::QmpClient>) {
    let q = Qemu::q35(ports, mode);
    let c = q.connect();
    q.wait_firmware(&c, ports);
    (q, Arc::new(c))
}

/// Two ports plugged at once from async code, a busy port refused, both unplugged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugs_and_unplugs_from_async_code() {
    let (_q, c) = qemu(2, Hotplug::Native);
    let dir = tempfile::tempdir().unwrap();
    let options = common::unplug_after(Duration::from_secs(20));
    let (engine, report) = AsyncEngine::open(c, dir.path().join("journal"), options).await.unwrap();
    assert!(!report.had_interrupted());
    let (a, b) = tokio::join!(engine.plug(gpu_like(0, 16)), engine.plug(gpu_like(1, 16)));
    assert_eq!((a.unwrap().state, b.unwrap().state), (DeviceState::Visible, DeviceState::Visible));
    match engine.plug(gpu_like(0, 16)).await {
        Err(AsyncError::Engine(EngineError::PortBusy { .. })) => {}
        other => panic!("{other:?}"),
    }
    let (a, b) = tokio::join!(engine.unplug("gpu0"), engine.unplug("gpu1"));
    assert_eq!((a.unwrap(), b.unwrap()), (UnplugOutcome::Removed, UnplugOutcome::Removed));
    assert!(engine.engine().is_port_free("rp0") && engine.engine().is_port_free("rp1"));
}

/// An unplug that waits out its deadline (ACPI hotplug, no guest) does not stall a
/// single-threaded executor: another task keeps running meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn a_waiting_unplug_does_not_block_the_executor() {
    let (_q, c) = qemu(1, Hotplug::Acpi);
    let dir = tempfile::tempdir().unwrap();
    let options = common::unplug_after(Duration::from_secs(1));
    let (engine, _) = AsyncEngine::open(c, dir.path().join("journal"), options).await.unwrap();
    engine.plug(single(0, "nic0", "e1000e")).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let (done, ticks) = (Arc::clone(&done), Arc::clone(&ticks));
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    assert_eq!(engine.unplug("nic0").await.unwrap(), UnplugOutcome::Pending);
    done.store(true, Ordering::Relaxed);
    ticker.await.unwrap();
    assert!(
        ticks.load(Ordering::Relaxed) > 100,
        "the other task ran {} times",
        ticks.load(Ordering::Relaxed)
    );
    assert!(!engine.engine().is_port_free("rp0"), "pending keeps the port");
}

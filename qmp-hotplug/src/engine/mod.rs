//! The hotplug engine: drives devices through explicit states, journals every step before
//! it is sent, rolls back partial plugs, bounds every unplug wait, and recovers after a
//! restart (see below).
//!
//! Concurrency: operations on different ports run in parallel (QMP commands are matched by
//! id, so they interleave safely); operations on one port are serialized by a per-port
//! lock; the device table is only changed under its mutex, together with the journal
//! record that announces the change.
//!
//! # Recovery
//!
//! [`Engine::open`] recovers after a restart: every device the journal records is
//! reconciled with what QEMU has, and every interrupted operation is finished or rolled
//! back.
//!
//! | journal says                         | QEMU has            | recovery does                           |
//! |--------------------------------------|---------------------|-----------------------------------------|
//! | plug under way, no failure yet       | any subset          | adds what is missing (function 0 last), checks visibility → `visible`; if that fails, rolls back |
//! | plug failed, rollback under way      | any subset          | finishes the rollback                   |
//! | unplug under way                     | some functions      | `device_del` again, waits → `removed` or `unplug-pending` |
//! | unplug under way / `unplug-pending`  | none                | deletes objects and descriptors → `removed` |
//! | `unplug-pending`                     | some                | stays pending (no second `device_del`)  |
//! | `visible`                            | all                 | nothing                                  |
//! | `visible`                            | none                | `removed` (gone behind the engine's back) |
//! | `visible`                            | some                | rolls the rest back                      |
//!
//! QEMU refuses a second device with the same id, and recovery only adds what
//! `qom-list` does not show, so no device is ever there twice; a port is freed only
//! once QEMU no longer has any of its devices. A plug still to add a device that needs a
//! descriptor the dead process held ([`PlugRequest::with_fd`]) cannot be finished: it is
//! rolled back ([`EngineError::DescriptorGone`]).

mod plan_sync;
mod recovery;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{ClientError, EventStream, QmpClient};
use crate::deadline;
use crate::files::{self, Access, FileKind};
use crate::journal::{self, Journal, JournalError, JournalHook, OpKind, Record, Step};
use crate::pci;
use crate::request::{Expectation, PlugRequest, PlugRequestError, Prepared, SlotKey, VisibilityCheck};
use crate::state::{bounded_note, now_ms, Checks, DeviceRecord, DeviceState, GuestAddresses, Transition};
use crate::vfio;
use pcie_topology::QemuId;
use pcilibs::sysfs::{Sysfs, SysfsError};

pub use plan_sync::PlanSync;
pub use recovery::{RecoveryAction, RecoveryReport};

/// Port locks kept before those nobody holds are dropped.
const MAX_IDLE_PORT_LOCKS: usize = 1024;

/// Why a function is not visible when QEMU itself no longer has it.
const NOT_IN_QEMU: &str = "not in /machine/peripheral";

/// Whether `e` says QEMU no longer has a function it had created.
fn vanished(e: &EngineError) -> bool {
    matches!(e, EngineError::NotVisible { reason, .. } if reason == NOT_IN_QEMU)
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The request is invalid; nothing was sent.
    #[error(transparent)]
    Request(#[from] PlugRequestError),
    /// A VFIO pre-check failed (the host device is missing, has no IOMMU group, or its
    /// group is not viable); nothing was sent.
    #[error(transparent)]
    Vfio(#[from] SysfsError),
    /// The journal could not be written or read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A QMP command failed or the connection is gone.
    #[error(transparent)]
    Qmp(#[from] ClientError),
    /// The port already holds a device.
    #[error("port {port} is taken (device state {state:?})")]
    PortBusy {
        /// The port.
        port: String,
        /// The state of the device on it.
        state: DeviceState,
    },
    /// The engine holds no device of that id (none plugged, or removed already).
    #[error("no device {0} is plugged")]
    NoDevice(String),
    /// An id of the request belongs to a device on another port.
    #[error("id {id} is already used on port {port}")]
    IdInUse {
        /// The id.
        id: String,
        /// The port holding it.
        port: String,
    },
    /// A file to pass could not be opened.
    #[error("cannot open {path}: {source}")]
    OpenFd {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A descriptor the request's caller held is gone: the request was read back from the
    /// journal after a restart, and a device that needs it was not added yet (see
    /// [`crate::request::FdRequest`]). Recovery rolls such a plug back.
    #[error("descriptor {fdname} was held by the process that asked for the plug and is gone with it")]
    DescriptorGone {
        /// The descriptor's name.
        fdname: String,
    },
    /// A file to pass is a FIFO, a socket or a directory: only regular files and devices
    /// are passed. Found before anything was journaled or sent, without blocking.
    #[error("cannot pass {path}: it is a {kind}, not a regular file or a device")]
    SpecialFile {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: FileKind,
    },
    /// QEMU accepted the device but it is not where or as planned.
    #[error("device {id} not as planned: {reason}")]
    NotVisible {
        /// The device id.
        id: String,
        /// What differs.
        reason: String,
    },
    /// A plug failed; what was added was rolled back (`state` says how far).
    #[error("plug on port {port} failed ({cause}); after rollback the device is {state:?}")]
    PlugFailed {
        /// The port.
        port: String,
        /// What failed.
        cause: Box<EngineError>,
        /// `Removed` (port free again) or `UnplugPending` (waiting for the guest).
        state: DeviceState,
    },
    /// The port's live windows cannot hold the device's BARs
    /// ([`EngineOptions::check_live_windows`]); nothing was sent.
    #[error("the device does not fit port {port}'s live windows: {}; nothing was sent", shortfalls.join("; "))]
    WontFit {
        /// The port.
        port: String,
        /// One line per window that falls short, with by how much.
        shortfalls: Vec<String>,
    },
    /// A boot-time placeholder on the port was not removed in time: the guest has not
    /// released the slot. Nothing of the request was added.
    #[error("placeholder {devices:?} on port {port} still present after {waited:?}: the guest has not released the slot; nothing was added")]
    PlaceholderPending {
        /// The port.
        port: String,
        /// Placeholder devices still waiting for `DEVICE_DELETED`.
        devices: Vec<String>,
        /// How long was waited.
        waited: Duration,
    },
    /// The guest kept the slot busy (power indicator blinking) past the retry budget.
    #[error("guest kept port {port} busy for {after:?}; the device stays plugged")]
    GuestBusy {
        /// The port.
        port: String,
        /// How long was retried.
        after: Duration,
    },
    /// The plan cannot be put in step with the engine ([`Engine::reconcile_plan`]): the
    /// engine holds a port the plan does not have, or one the plan gives a device plugged
    /// at boot.
    #[error("plan and engine: {0}")]
    Plan(#[from] pcie_topology::PlanError),
}

impl EngineError {
    /// True when the failure came from losing the QMP connection.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            EngineError::Qmp(e) => e.is_connection_lost(),
            EngineError::PlugFailed { cause, .. } => cause.is_connection_lost(),
            _ => false,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, EngineError>;

/// How an unplug ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnplugOutcome {
    /// `DEVICE_DELETED` arrived for every function; objects and descriptors are released
    /// and the port is free.
    Removed,
    /// The deadline passed first: the device is `UnplugPending`, the port stays taken, and
    /// a late `DEVICE_DELETED` finishes the removal.
    Pending,
}

/// Engine settings: [`EngineOptions::default`], then change the fields that differ.
#[derive(Clone)]
#[non_exhaustive]
pub struct EngineOptions {
    /// How long an unplug waits for `DEVICE_DELETED` (libvirt's 5 s by default).
    pub unplug_timeout: Duration,
    /// How long a plugged device may take to show up as planned.
    pub visible_timeout: Duration,
    /// How long a plug waits for a boot-time placeholder's `DEVICE_DELETED` before it
    /// gives up with [`EngineError::PlaceholderPending`] (native PCIe hotplug takes
    /// 5–6 s: the attention button's abort window).
    pub placeholder_timeout: Duration,
    /// How long `device_del` is retried while the guest is busy with the slot.
    pub busy_retry: Duration,
    /// Where sysfs is read for the VFIO checks (`pcilibs`'s host layer).
    pub sysfs: Sysfs,
    /// Called after each journal record is durable (observability, fault injection).
    pub journal_hook: Option<JournalHook>,
    /// Compact the journal while running once it has grown by this many bytes since the
    /// last compaction ([`journal::DEFAULT_COMPACT_BYTES`], 1 MiB): the journal's size
    /// follows the devices plugged now, not the operations ever made.
    pub journal_compact_bytes: u64,
    /// Before anything is sent, check the functions' `needs` against the port's live
    /// windows (`query-pci`, [`crate::pci::window_shortfalls`]) and refuse a device that
    /// cannot fit with [`EngineError::WontFit`]. Right where the firmware's windows are
    /// final (x86 SeaBIOS and OVMF with a Linux guest); off by default, because a guest
    /// that resizes windows at hotplug (aarch64) can still make room.
    pub check_live_windows: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            unplug_timeout: Duration::from_secs(5),
            visible_timeout: Duration::from_secs(10),
            placeholder_timeout: Duration::from_secs(15),
            busy_retry: Duration::from_secs(10),
            sysfs: Sysfs::default(),
            journal_hook: None,
            journal_compact_bytes: journal::DEFAULT_COMPACT_BYTES,
            check_live_windows: false,
        }
    }
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("unplug_timeout", &self.unplug_timeout)
            .field("visible_timeout", &self.visible_timeout)
            .field("placeholder_timeout", &self.placeholder_timeout)
            .field("busy_retry", &self.busy_retry)
            .field("sysfs", &self.sysfs)
            .field("journal_hook", &self.journal_hook.is_some())
            .field("journal_compact_bytes", &self.journal_compact_bytes)
            .field("check_live_windows", &self.check_live_windows)
            .finish()
    }
}

#[derive(Debug, Default)]
struct Table {
    devices: BTreeMap<String, DeviceRecord>,
    /// Device ids for which `DEVICE_DELETED` arrived (seen by the watcher).
    gone: HashSet<String>,
}

#[derive(Debug)]
struct Inner {
    client: Arc<QmpClient>,
    journal: Mutex<Journal>,
    table: Mutex<Table>,
    port_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    options: EngineOptions,
}

/// The hotplug engine for one QEMU. Share it between threads by reference or `Arc`.
#[derive(Debug)]
pub struct Engine {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

/// Where a plugged device's functions were found, and how.
#[derive(Default)]
struct Found {
    guest: GuestAddresses,
    checks: Checks,
}

impl Found {
    /// The note of the `visible` transition: how each function was found.
    fn note(&self) -> String {
        let parts: Vec<String> = self.checks.iter().map(|(id, c)| format!("{id}: {c}")).collect();
        format!("found {}", parts.join("; "))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the journal at `journal` (creating it when absent), reconciles every device it
    /// records with what QEMU has (`qom-list /machine/peripheral`, `/objects`, `query-pci`),
    /// finishes or rolls back every interrupted operation, and returns the engine with a
    /// report of what recovery did. A fresh journal gives an empty report.
    pub fn open(
        client: Arc<QmpClient>,
        journal: impl AsRef<Path>,
        options: EngineOptions,
    ) -> Result<(Engine, RecoveryReport)> {
        let (mut journal, _) = Journal::open(journal, options.journal_hook.clone())?;
        journal.set_compact_bytes(options.journal_compact_bytes);
        let logs = journal.ports().clone();
        let read = journal.read_report().clone();
        let table = Table {
            devices: logs.iter().map(|(p, l)| (p.clone(), l.device.clone())).collect(),
            gone: HashSet::new(),
        };
        let inner = Arc::new(Inner {
            client,
            journal: Mutex::new(journal),
            table: Mutex::new(table),
            port_locks: Mutex::new(HashMap::new()),
            options,
        });
        // Subscribe before reconciling so no DEVICE_DELETED falls between the two.
        let events = inner.client.subscribe();
        let mut report = recovery::recover(&inner, &logs)?;
        report.journal = read;
        lock(&inner.journal).compact()?;
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(&inner);
        let thread_stop = Arc::clone(&stop);
        let watcher = std::thread::Builder::new()
            .name("hotplug-watcher".into())
            .spawn(move || watch(&weak, &events, &thread_stop))
            .map_err(|e| EngineError::Qmp(ClientError::Setup(e)))?;
        Ok((Engine { inner, stop, watcher: Some(watcher) }, report))
    }

    /// Plugs a device onto its port: VFIO checks, `getfd`s, `object-add`s, every function
    /// (function 0 of a multi-function slot last), then waits until each is where planned.
    /// On any failure the steps already taken are rolled back and
    /// [`EngineError::PlugFailed`] says whether the port is free again. Descriptors the
    /// caller held ([`PlugRequest::with_fd`]) are closed when the plug returns (QEMU keeps
    /// its own copy).
    pub fn plug(&self, request: PlugRequest) -> Result<DeviceRecord> {
        self.inner.plug(request)
    }

    /// Unplugs the device `device` (its id, [`PlugRequest::device`]: the id a plan's
    /// [`pcie_topology::Plan::release`] takes): `device_del` (retried with backoff while
    /// the guest is busy), waits up to `unplug_timeout` for `DEVICE_DELETED`, then deletes
    /// objects and descriptors and frees its port. A timeout leaves the device
    /// `UnplugPending`.
    pub fn unplug(&self, device: &str) -> Result<UnplugOutcome> {
        let port = self.inner.port_of(device).ok_or_else(|| EngineError::NoDevice(device.to_owned()))?;
        self.inner.unplug(&port, device)
    }

    /// The record of device `id`: the one plugged now, else the latest removed one
    /// (removed ones until compaction).
    pub fn device(&self, id: &str) -> Option<DeviceRecord> {
        let t = lock(&self.inner.table);
        let mine = t.devices.values().filter(|d| d.device().as_str() == id);
        let latest = |d: &&DeviceRecord| (!d.state.port_free(), d.history.last().map(|t| t.at_unix_ms));
        mine.max_by_key(latest).cloned()
    }

    /// The record of the device on `port` (including a removed one until compaction).
    pub fn on_port(&self, port: &str) -> Option<DeviceRecord> {
        lock(&self.inner.table).devices.get(port).cloned()
    }

    /// Every device record, by port.
    pub fn devices(&self) -> Vec<DeviceRecord> {
        lock(&self.inner.table).devices.values().cloned().collect()
    }

    /// True when no device holds `port`.
    pub fn is_port_free(&self, port: &str) -> bool {
        lock(&self.inner.table).devices.get(port).map_or(true, |d| d.state.port_free())
    }

    /// Asks QEMU which `UnplugPending` devices are gone and finishes their removal;
    /// returns the ids of the devices removed (their ports are free). (A watcher thread
    /// does this on each `DEVICE_DELETED`; this covers events lost with a connection.)
    pub fn complete_pending(&self) -> Result<Vec<QemuId>> {
        let pending: Vec<String> = lock(&self.inner.table)
            .devices
            .values()
            .filter(|d| d.state == DeviceState::UnplugPending)
            .map(|d| d.port().to_string())
            .collect();
        let present = self.inner.peripheral_ids()?;
        let mut freed = Vec::new();
        for port in pending {
            let port_lock = self.inner.port_lock(&port);
            let _g = lock(&port_lock);
            let Some(rec) = self.on_port(&port) else { continue };
            if rec.state == DeviceState::UnplugPending
                && rec.request.device_ids().all(|id| !present.contains(id.as_str()))
            {
                self.inner.complete_removal(&rec.request)?;
                freed.push(rec.request.device.clone());
            }
        }
        Ok(freed)
    }

    /// The QMP client the engine drives.
    pub fn client(&self) -> &Arc<QmpClient> {
        &self.inner.client
    }

    /// Where the journal lives.
    pub fn journal_path(&self) -> PathBuf {
        lock(&self.inner.journal).path().to_owned()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            // The watcher wakes every 100 ms; it returns nothing of interest.
            let _ = w.join();
        }
    }
}

/// Follows `DEVICE_DELETED` events: records gone ids and finishes pending unplugs.
fn watch(inner: &Weak<Inner>, events: &EventStream, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let ev = match events.recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => ev,
            Err(ClientError::Timeout { .. }) => continue,
            Err(_) => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        let Some(id) = ev.deleted_device_id() else { continue };
        let port = {
            let mut t = lock(&inner.table);
            // Only ids of devices the engine holds: others' deletions are none of its
            // business, and remembering them would grow the set without bound.
            let Some(owner) = t
                .devices
                .values()
                .find(|d| !d.state.port_free() && d.request.device_ids().any(|d| d.as_str() == id))
                .map(|d| (d.port().to_string(), d.state))
            else {
                continue;
            };
            t.gone.insert(id.to_owned());
            (owner.1 == DeviceState::UnplugPending).then_some(owner.0)
        };
        if let Some(port) = port {
            // Errors here leave the device pending; complete_pending or recovery retries.
            let _ = inner.try_complete_pending(&port);
        }
    }
}

/// Result of asking for a device's removal.
enum Removal {
    Gone,
    Pending,
}

impl Inner {
    /// The port of the device `device` plugged now.
    fn port_of(&self, device: &str) -> Option<String> {
        let t = lock(&self.table);
        let mut live = t.devices.values().filter(|d| !d.state.port_free());
        live.find(|d| d.device().as_str() == device).map(|d| d.port().to_string())
    }

    fn port_lock(&self, port: &str) -> Arc<Mutex<()>> {
        let mut locks = lock(&self.port_locks);
        // Requests naming ever new ports (most of them refused) must not leave a lock
        // behind each: one nobody holds can go, and is made again when needed.
        if locks.len() >= MAX_IDLE_PORT_LOCKS {
            locks.retain(|_, m| Arc::strong_count(m) > 1);
        }
        Arc::clone(locks.entry(port.to_owned()).or_default())
    }

    fn step(&self, port: &str, step: Step) -> Result<()> {
        lock(&self.journal).append(&Record::Step { port: port.to_owned(), step })?;
        Ok(())
    }

    fn record(&self, rec: &Record) -> Result<()> {
        lock(&self.journal).append(rec)?;
        Ok(())
    }

    /// Journals and applies a state change.
    fn transition(&self, port: &str, state: DeviceState, note: &str, guest: GuestAddresses) -> Result<()> {
        self.transition_found(port, state, note, Found { guest, checks: Vec::new() })
    }

    /// [`Inner::transition`] with how the functions were found.
    fn transition_found(&self, port: &str, state: DeviceState, note: &str, found: Found) -> Result<()> {
        let mut t = lock(&self.table);
        let transition = Transition { state, at_unix_ms: now_ms(), note: bounded_note(note) };
        lock(&self.journal).append(&Record::State {
            port: port.to_owned(),
            transition: transition.clone(),
            guest: found.guest.clone(),
            checks: found.checks.clone(),
        })?;
        if let Some(d) = t.devices.get_mut(port) {
            d.state = state;
            d.push_history(transition);
            if !found.guest.is_empty() {
                d.guest = found.guest;
            }
            if !found.checks.is_empty() {
                d.checks = found.checks;
            }
        }
        Ok(())
    }

    fn plug(&self, mut request: PlugRequest) -> Result<DeviceRecord> {
        let prepared = request.prepare()?;
        for check in vfio::checks_for(&request) {
            check.run(&self.options.sysfs)?;
        }
        vfio::expect_host_ids(&mut request, &self.options.sysfs);
        // Before the port lock and the journal: a file that cannot be passed is refused
        // with nothing held, nothing journaled. Held descriptors leave the request here, so
        // that no record keeps them open.
        let fds = open_fds(&mut request)?;
        let port = request.port.to_string();
        let port_lock = self.port_lock(&port);
        let _g = lock(&port_lock);
        if self.options.check_live_windows {
            self.check_live_windows(&request)?;
        }
        self.admit(&request)?;
        let deadline = deadline::after(self.options.visible_timeout);
        let result = self
            .add_all(&request, &prepared, &HashSet::new(), &fds)
            .and_then(|()| self.await_visible(&request, deadline))
            .or_else(|cause| self.readd_after_late_eject(&request, &prepared, &fds, cause, deadline));
        self.settle_plug(&request, &prepared, result)
    }

    /// A guest slow to answer the placeholder's removal can be asked twice (ACPI
    /// hotplug): its second eject of the slot then takes the device just added, and QEMU
    /// removes it (seen on a loaded host, QEMU 11.1 and Linux 7.3). A device QEMU no
    /// longer has, after a plug that took a placeholder off, is added once more within the
    /// same deadline; any other failure stands.
    fn readd_after_late_eject(
        &self,
        request: &PlugRequest,
        prepared: &Prepared,
        fds: &[Arc<OwnedFd>],
        cause: EngineError,
        deadline: Instant,
    ) -> Result<Found> {
        if request.placeholder.is_none() || !vanished(&cause) || Instant::now() >= deadline {
            return Err(cause);
        }
        let mut present = self.peripheral_ids()?;
        present.extend(self.qom_children("/objects")?);
        self.add_all(request, prepared, &present, fds)?;
        self.await_visible(request, deadline)
    }

    /// [`EngineOptions::check_live_windows`]: the functions' `needs` against the live
    /// windows of the port's bridge. A port that `query-pci` shows as no bridge (s390x
    /// device ids, `pcie.0`) has nothing to check.
    fn check_live_windows(&self, request: &PlugRequest) -> Result<()> {
        let needs: Vec<_> = request.functions.iter().flat_map(|f| f.needs.iter().copied()).collect();
        if needs.is_empty() {
            return Ok(());
        }
        let reply = self.client.execute_raw("query-pci", None, self.client.options().command_timeout)?;
        let port = request.port.as_str();
        let Some(bridge) = crate::pci::bridges(&reply).into_iter().find(|b| b.qdev_id == port) else {
            return Ok(());
        };
        let shortfalls = crate::pci::window_shortfalls(&bridge, &needs);
        if shortfalls.is_empty() {
            Ok(())
        } else {
            Err(EngineError::WontFit { port: port.to_owned(), shortfalls })
        }
    }

    /// Records the plug's outcome: visible, or failed and rolled back.
    fn settle_plug(
        &self,
        request: &PlugRequest,
        prepared: &Prepared,
        result: Result<Found>,
    ) -> Result<DeviceRecord> {
        let port = request.port.as_str();
        match result {
            Ok(found) => {
                let note = found.note();
                self.transition_found(port, DeviceState::Visible, &note, found)?;
                lock(&self.table)
                    .devices
                    .get(port)
                    .cloned()
                    .ok_or_else(|| EngineError::NoDevice(request.device.to_string()))
            }
            // Without QEMU nothing can be rolled back now; recovery will finish the job.
            Err(e) if e.is_connection_lost() => Err(e),
            Err(cause) => {
                self.transition(port, DeviceState::Failed, &cause.to_string(), Vec::new())?;
                let state = self.rollback(request, prepared)?;
                Err(EngineError::PlugFailed { port: port.to_owned(), cause: Box::new(cause), state })
            }
        }
    }

    /// Admits a request: the port must be free and its ids unused; journals the intent.
    fn admit(&self, request: &PlugRequest) -> Result<()> {
        let port = request.port.to_string();
        let mut t = lock(&self.table);
        if let Some(d) = t.devices.get(&port).filter(|d| !d.state.port_free()) {
            return Err(EngineError::PortBusy { port, state: d.state });
        }
        let ids: HashSet<&QemuId> = request.ids().collect();
        for d in t.devices.values().filter(|d| !d.state.port_free()) {
            if let Some(id) = d.request.ids().find(|id| ids.contains(id)) {
                return Err(EngineError::IdInUse { id: id.to_string(), port: d.port().to_string() });
            }
        }
        let planned = Transition { state: DeviceState::Planned, at_unix_ms: now_ms(), note: String::new() };
        {
            let mut j = lock(&self.journal);
            j.append(&Record::Begin {
                port: port.clone(),
                op: OpKind::Plug,
                request: Some(Box::new(request.clone())),
            })?;
            j.append(&Record::State {
                port: port.clone(),
                transition: planned.clone(),
                guest: Vec::new(),
                checks: Vec::new(),
            })?;
        }
        for id in &ids {
            t.gone.remove(id.as_str());
        }
        let mut record = DeviceRecord::new(request.clone(), DeviceState::Planned);
        record.push_history(planned);
        t.devices.insert(port, record);
        Ok(())
    }

    /// Sends descriptors (`fds`, from `request.fds` by [`open_fds`]; none needed when
    /// every device is in `present` already), objects and devices that are not in
    /// `present`, in plug order.
    fn add_all(
        &self,
        request: &PlugRequest,
        prepared: &Prepared,
        present: &HashSet<String>,
        fds: &[Arc<OwnedFd>],
    ) -> Result<()> {
        let port = request.port.as_str();
        self.transition(port, DeviceState::Adding, "", Vec::new())?;
        self.remove_placeholder(request)?;
        if missing_device(request, present) {
            for (fd, file) in request.fds.iter().zip(fds) {
                self.step(port, Step::GetFd { fdname: fd.fdname.clone() })?;
                self.client.getfd(&fd.fdname, file.as_fd())?;
            }
        }
        for obj in request.objects.iter().filter(|o| !present.contains(o.id.as_str())) {
            self.step(port, Step::ObjectAdd { id: obj.id.to_string() })?;
            self.cmd("object-add", Value::Object(obj.to_qmp()))?;
        }
        for f in prepared.order.iter().filter_map(|i| request.functions.get(*i)) {
            if present.contains(f.id().as_str()) {
                continue;
            }
            self.step(port, Step::DeviceAdd { id: f.id().to_string() })?;
            self.cmd("device_add", Value::Object(f.qmp_arguments()))?;
        }
        self.transition(port, DeviceState::Added, "", Vec::new())
    }

    fn cmd(&self, name: &str, args: Value) -> Result<Value> {
        let timeout = self.client.options().command_timeout;
        Ok(self.client.execute_raw(name, Some(args), timeout)?)
    }

    /// Ids under `/machine/peripheral` (devices with an id).
    fn peripheral_ids(&self) -> Result<HashSet<String>> {
        self.qom_children("/machine/peripheral")
    }

    fn qom_children(&self, path: &str) -> Result<HashSet<String>> {
        let list = self.client.execute(&qapi::qmp::qom_list { path: path.into() })?;
        Ok(list.into_iter().filter(|p| p.type_.starts_with("child<")).map(|p| p.name).collect())
    }

    /// Polls until every function meets its expectation or `deadline` passes. A function
    /// QEMU does not have ends the wait at once: `device_add` had created it, so something
    /// removed it, and it will not come back by waiting.
    pub(super) fn await_visible(&self, request: &PlugRequest, deadline: Instant) -> Result<Found> {
        loop {
            match self.check_visible(request) {
                Ok(guest) => return Ok(guest),
                Err(e @ EngineError::NotVisible { .. }) if vanished(&e) || Instant::now() >= deadline => {
                    return Err(e)
                }
                Err(EngineError::NotVisible { .. }) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e),
            }
        }
    }

    fn check_visible(&self, request: &PlugRequest) -> Result<Found> {
        let needs_pci = request.functions.iter().any(|f| matches!(f.expect, Expectation::Pci(_)));
        let functions = if needs_pci {
            pci::functions(&self.client.execute_raw(
                "query-pci",
                None,
                self.client.options().command_timeout,
            )?)
        } else {
            Vec::new()
        };
        let present = self.peripheral_ids()?;
        let mut out = Found::default();
        for f in &request.functions {
            let id = f.id().as_str();
            if !present.contains(id) {
                return Err(EngineError::NotVisible { id: id.into(), reason: NOT_IN_QEMU.into() });
            }
            let check = match &f.expect {
                Expectation::Pci(want) => {
                    let found = functions.iter().find(|p| p.qdev_id == id).ok_or_else(|| {
                        EngineError::NotVisible { id: id.into(), reason: "not in query-pci".into() }
                    })?;
                    let check = pci::check(found, want)
                        .map_err(|reason| EngineError::NotVisible { id: id.into(), reason })?;
                    out.guest.push((f.id().clone(), found.address));
                    check
                }
                _ => VisibilityCheck::Present,
            };
            out.checks.push((f.id().clone(), check));
        }
        Ok(out)
    }

    /// Undoes a failed plug. Returns the state reached.
    fn rollback(&self, request: &PlugRequest, prepared: &Prepared) -> Result<DeviceState> {
        let port = request.port.as_str();
        self.transition(port, DeviceState::Removing, "rollback", Vec::new())?;
        match self.remove_devices(request, prepared)? {
            Removal::Gone => {
                self.complete_removal(request)?;
                Ok(DeviceState::Removed)
            }
            Removal::Pending => {
                self.transition(
                    port,
                    DeviceState::UnplugPending,
                    "rollback waits for the guest",
                    Vec::new(),
                )?;
                Ok(self.try_complete_locked(request)?)
            }
        }
    }

    fn unplug(&self, port: &str, device: &str) -> Result<UnplugOutcome> {
        let port_lock = self.port_lock(port);
        let _g = lock(&port_lock);
        // Looked up again under the port's lock: the device may have gone meanwhile.
        let rec = lock(&self.table)
            .devices
            .get(port)
            .filter(|d| !d.state.port_free() && d.device().as_str() == device)
            .cloned()
            .ok_or_else(|| EngineError::NoDevice(device.to_owned()))?;
        let mut request = rec.request.clone();
        let prepared = request.prepare()?;
        self.record(&Record::Begin { port: port.to_owned(), op: OpKind::Unplug, request: None })?;
        self.transition(port, DeviceState::Removing, "", Vec::new())?;
        match self.remove_devices(&request, &prepared) {
            Ok(Removal::Gone) => {
                self.complete_removal(&request)?;
                Ok(UnplugOutcome::Removed)
            }
            Ok(Removal::Pending) => {
                let note = format!("no DEVICE_DELETED within {:?}", self.options.unplug_timeout);
                self.transition(port, DeviceState::UnplugPending, &note, Vec::new())?;
                match self.try_complete_locked(&request)? {
                    DeviceState::Removed => Ok(UnplugOutcome::Removed),
                    _ => Ok(UnplugOutcome::Pending),
                }
            }
            Err(e) if e.is_connection_lost() => Err(e),
            Err(e) => {
                // device_del was refused: the device stays where it was.
                let back = if rec.state == DeviceState::Removing { DeviceState::Visible } else { rec.state };
                self.transition(port, back, &format!("unplug refused: {e}"), Vec::new())?;
                Err(e)
            }
        }
    }

    /// Sends `device_del` for what is present and waits for `DEVICE_DELETED`.
    fn remove_devices(&self, request: &PlugRequest, prepared: &Prepared) -> Result<Removal> {
        let present = self.peripheral_ids()?;
        let mut waiting: HashSet<String> = HashSet::new();
        {
            // What QEMU does not have is gone: a late event then only has to cover the rest.
            let mut t = lock(&self.table);
            for id in request.device_ids().map(QemuId::as_str) {
                if present.contains(id) {
                    waiting.insert(id.to_owned());
                } else {
                    t.gone.insert(id.to_owned());
                }
            }
        }
        if waiting.is_empty() {
            return Ok(Removal::Gone);
        }
        let events = self.client.subscribe();
        for id in deletion_targets(request, prepared, &waiting) {
            self.step(request.port.as_str(), Step::DeviceDel { id: id.clone() })?;
            if self.device_del(request.port.as_str(), &id)? {
                waiting.remove(&id);
            }
        }
        let until = deadline::after(self.options.unplug_timeout);
        self.await_deleted(&events, &mut waiting, until)?;
        Ok(if waiting.is_empty() { Removal::Gone } else { Removal::Pending })
    }

    /// Takes a request's boot-time placeholder off its port: `device_del` of what QEMU
    /// still has, `DEVICE_DELETED` within `placeholder_timeout`, then `object-del` of its
    /// backends. Idempotent, so recovery can run it again.
    fn remove_placeholder(&self, request: &PlugRequest) -> Result<()> {
        let Some(ph) = &request.placeholder else { return Ok(()) };
        let port = request.port.as_str();
        let present = self.peripheral_ids()?;
        let here: Vec<&str> =
            ph.devices.iter().map(QemuId::as_str).filter(|id| present.contains(*id)).collect();
        let mut waiting: HashSet<String> = here.iter().map(|id| (*id).to_owned()).collect();
        if !waiting.is_empty() {
            let started = Instant::now();
            let events = self.client.subscribe();
            for id in here {
                self.step(port, Step::DeviceDel { id: id.to_owned() })?;
                if self.device_del(port, id)? {
                    waiting.remove(id);
                }
            }
            let until = deadline::from(started, self.options.placeholder_timeout);
            self.await_deleted(&events, &mut waiting, until)?;
            if !waiting.is_empty() {
                let mut devices: Vec<String> = waiting.into_iter().collect();
                devices.sort();
                return Err(EngineError::PlaceholderPending {
                    port: port.to_owned(),
                    devices,
                    waited: started.elapsed(),
                });
            }
        }
        let objects = self.qom_children("/objects")?;
        for id in ph.objects.iter().map(QemuId::as_str).filter(|o| objects.contains(*o)) {
            self.step(port, Step::ObjectDel { id: id.to_owned() })?;
            self.cmd("object-del", serde_json::json!({ "id": id }))?;
        }
        Ok(())
    }

    /// Waits until `DEVICE_DELETED` (seen here or by the watcher) covers every id in
    /// `waiting` or `deadline` passes; then asks QEMU about the rest, since an event may
    /// have been missed. What is left in `waiting` is still present.
    fn await_deleted(
        &self,
        events: &EventStream,
        waiting: &mut HashSet<String>,
        deadline: Instant,
    ) -> Result<()> {
        while !waiting.is_empty() {
            {
                let t = lock(&self.table);
                waiting.retain(|id| !t.gone.contains(id));
            }
            if waiting.is_empty() || Instant::now() >= deadline {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            match events.recv_timeout(left) {
                Ok(ev) => {
                    if let Some(id) = ev.deleted_device_id() {
                        if waiting.remove(id) {
                            lock(&self.table).gone.insert(id.to_owned());
                        }
                    }
                }
                Err(ClientError::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !waiting.is_empty() {
            // An event may have been missed; QEMU's own list is the truth.
            let present = self.peripheral_ids()?;
            let mut t = lock(&self.table);
            waiting.retain(|id| {
                let here = present.contains(id);
                if !here {
                    t.gone.insert(id.clone());
                }
                here
            });
        }
        Ok(())
    }

    /// One `device_del` with the retries QEMU's answers call for. `Ok(true)`: already gone.
    fn device_del(&self, port: &str, id: &str) -> Result<bool> {
        let started = Instant::now();
        let until = deadline::from(started, self.options.busy_retry);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.client.execute(&qapi::qmp::device_del { id: id.into() }) {
                Ok(_) => return Ok(false),
                Err(e) => match classify_del_error(&e) {
                    DelError::AlreadyUnplugging => return Ok(false),
                    DelError::NotFound => return Ok(true),
                    DelError::Busy if Instant::now() < until => {
                        std::thread::sleep(backoff.min(until.saturating_duration_since(Instant::now())));
                        backoff = backoff.saturating_mul(2).min(Duration::from_secs(1));
                    }
                    DelError::Busy => {
                        return Err(EngineError::GuestBusy {
                            port: port.to_owned(),
                            after: started.elapsed(),
                        })
                    }
                    DelError::Other => return Err(e.into()),
                },
            }
        }
    }

    /// Deletes objects and descriptors of a removed device and frees its port.
    fn complete_removal(&self, request: &PlugRequest) -> Result<()> {
        let port = request.port.as_str();
        let objects = self.qom_children("/objects")?;
        // The request's objects (newest first), then those of a placeholder that left only
        // now (its plug gave up waiting).
        let placeholder_objects = request.placeholder.iter().flat_map(|p| p.objects.iter());
        let ids = request.objects.iter().rev().map(|o| &o.id).chain(placeholder_objects);
        for id in ids.map(QemuId::as_str).filter(|id| objects.contains(*id)) {
            self.step(port, Step::ObjectDel { id: id.to_owned() })?;
            self.cmd("object-del", serde_json::json!({ "id": id }))?;
        }
        for fd in request.fds.iter().rev() {
            self.step(port, Step::CloseFd { fdname: fd.fdname.clone() })?;
            // A device that took the descriptor by name has consumed it: "not found" is fine.
            if let Err(e) = self.client.closefd(&fd.fdname) {
                if e.is_connection_lost() {
                    return Err(e.into());
                }
            }
        }
        self.transition(port, DeviceState::Removed, "", Vec::new())?;
        let mut t = lock(&self.table);
        for id in request.device_ids() {
            t.gone.remove(id.as_str());
        }
        Ok(())
    }

    /// With the port lock held: finishes an `UnplugPending` device whose functions are all
    /// known gone. Returns the resulting state.
    fn try_complete_locked(&self, request: &PlugRequest) -> Result<DeviceState> {
        let all_gone = {
            let t = lock(&self.table);
            request.device_ids().all(|id| t.gone.contains(id.as_str()))
        };
        if all_gone {
            self.complete_removal(request)?;
            return Ok(DeviceState::Removed);
        }
        Ok(DeviceState::UnplugPending)
    }

    fn try_complete_pending(&self, port: &str) -> Result<()> {
        let port_lock = self.port_lock(port);
        let _g = lock(&port_lock);
        let rec = lock(&self.table).devices.get(port).cloned();
        if let Some(rec) = rec.filter(|r| r.state == DeviceState::UnplugPending) {
            self.try_complete_locked(&rec.request)?;
        }
        Ok(())
    }
}

/// The descriptors a request passes to QEMU, in the order of `request.fds`: held ones
/// are taken out of the request; files are opened without blocking: regular files and
/// devices (`/dev/iommu`, a VFIO cdev, a disk) are taken, a FIFO, socket or directory is
/// [`EngineError::SpecialFile`]. A held descriptor that is gone (the request was read
/// back from the journal) is [`EngineError::DescriptorGone`].
fn open_fds(request: &mut PlugRequest) -> Result<Vec<Arc<OwnedFd>>> {
    request
        .fds
        .iter_mut()
        .map(|fd| {
            let Some(path) = fd.path().map(Path::to_path_buf) else {
                return fd
                    .take_held()
                    .ok_or_else(|| EngineError::DescriptorGone { fdname: fd.fdname.clone() });
            };
            let access = Access { write: fd.writable(), ..Access::READ };
            let allowed = [FileKind::Regular, FileKind::CharDevice, FileKind::BlockDevice];
            match files::open(&path, access, &allowed) {
                Ok(file) => Ok(Arc::new(OwnedFd::from(file))),
                Err(files::OpenError::Kind(kind)) => Err(EngineError::SpecialFile { path, kind }),
                Err(files::OpenError::Io(source)) => Err(EngineError::OpenFd { path, source }),
            }
        })
        .collect()
}

/// Whether a device of `request` is not in `present` (then its descriptors are needed).
fn missing_device(request: &PlugRequest, present: &HashSet<String>) -> bool {
    request.functions.iter().any(|f| !present.contains(f.id().as_str()))
}

/// Which devices get a `device_del`: in reverse plug order (then a placeholder still
/// present), and for a multi-function slot
/// whose function 0 is present only function 0 (QEMU then removes the whole slot; asking
/// again for the other functions would press the slot's attention button twice, which
/// Linux takes as "cancel").
fn deletion_targets(request: &PlugRequest, prepared: &Prepared, present: &HashSet<String>) -> Vec<String> {
    let zero_present: HashSet<&SlotKey> = prepared
        .pci
        .iter()
        .zip(&request.functions)
        .filter_map(|(p, f)| match p {
            Some((slot, 0)) if present.contains(f.id().as_str()) => Some(slot),
            _ => None,
        })
        .collect();
    prepared
        .order
        .iter()
        .rev()
        .filter_map(|i| {
            let id = request.functions.get(*i)?.id().as_str();
            if !present.contains(id) {
                return None;
            }
            match prepared.pci.get(*i).and_then(Option::as_ref) {
                Some((slot, func)) if *func != 0 && zero_present.contains(slot) => None,
                _ => Some(id.to_owned()),
            }
        })
        .chain(
            // A placeholder whose removal a failed plug left pending ("already in the
            // process of unplug" counts as accepted).
            request
                .placeholder
                .iter()
                .flat_map(|p| p.devices.iter())
                .map(QemuId::to_string)
                .filter(|id| present.contains(id)),
        )
        .collect()
}

enum DelError {
    AlreadyUnplugging,
    Busy,
    NotFound,
    Other,
}

/// Reads QEMU's `device_del` refusals.
fn classify_del_error(e: &ClientError) -> DelError {
    match e.qmp_error() {
        Some(("DeviceNotFound", _)) => DelError::NotFound,
        Some((_, desc)) if desc.contains("already in the process of unplug") => DelError::AlreadyUnplugging,
        Some((_, desc)) if desc.contains("guest is busy") => DelError::Busy,
        _ => DelError::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qerr(class: &str, desc: &str) -> ClientError {
        ClientError::Qmp { command: "device_del".into(), class: class.into(), desc: desc.into() }
    }

    #[test]
    fn del_errors_are_classified() {
        assert!(matches!(
            classify_del_error(&qerr("GenericError", "Device gpu0 is already in the process of unplug")),
            DelError::AlreadyUnplugging
        ));
        assert!(matches!(
            classify_del_error(&qerr(
                "GenericError",
                "Hot-unplug failed: guest is busy (power indicator blinking)"
            )),
            DelError::Busy
        ));
        assert!(matches!(
            classify_del_error(&qerr("DeviceNotFound", "Device 'x' not found")),
            DelError::NotFound
        ));
        assert!(matches!(
            classify_del_error(&qerr("GenericError", "Bus 'pcie.0' does not support hotplugging")),
            DelError::Other
        ));
    }

    #[test]
    fn only_function_zero_is_deleted_when_present() {
        let mut r: PlugRequest = serde_json::from_value(serde_json::json!({
            "port": "rp0",
            "functions": [
                {"qdev": {"driver": "e1000e", "id": "f0", "bus": "rp0", "addr": "0.0"}},
                {"qdev": {"driver": "e1000e", "id": "f1", "bus": "rp0", "addr": "0.1"}},
                {"qdev": {"driver": "zpci", "id": "z"}}
            ]
        }))
        .unwrap();
        let p = r.prepare().unwrap();
        let all: HashSet<String> = ["f0", "f1", "z"].iter().map(|s| s.to_string()).collect();
        assert_eq!(deletion_targets(&r, &p, &all), vec!["f0".to_string(), "z".to_string()]);
        let partial: HashSet<String> = ["f1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(deletion_targets(&r, &p, &partial), vec!["f1".to_string()]);
    }
}

//! A QMP client and a PCIe / VFIO hotplug engine for QEMU that never hangs, never leaks a
//! port, and survives a restart of the process that drives it.
//!
//! * [`client`]: a blocking QMP client (Unix socket or `-qmp stdio` pipes) with a reader
//!   thread that matches replies to commands by id, fans events out to any number of
//!   [`EventStream`]s, bounds every wait and every message, and passes descriptors
//!   (`getfd`, `add-fd`). Typed commands come from the `qapi` crate; a raw JSON path
//!   covers what its schema does not know.
//! * [`engine`]: plugs a [`PlugRequest`] (all functions of a slot or IOMMU group, the
//!   objects and descriptors they need) through explicit [`DeviceState`]s, checks the
//!   host functions it passes through first (they exist, their IOMMU groups are viable,
//!   through `pcilibs`'s host layer), proves the result with `query-pci`, rolls back
//!   partial plugs, bounds unplug waits (`unplug-pending` on timeout, finished by a late
//!   `DEVICE_DELETED`), takes a boot-time placeholder off the port before a plug
//!   ([`request::PlaceholderRequest`]), and journals every step so that [`Engine::open`]
//!   can finish or roll back whatever a dead process left. A device is unplugged by its id
//!   ([`Engine::unplug`]), as a plan releases it.
//! * [`request`]: what to plug, typed: `pcie-topology`'s [`QemuDevice`](pcie_topology::QemuDevice)s
//!   and [`QemuObject`](pcie_topology::QemuObject)s, host functions as
//!   [`HostRef`](pcie_topology::HostRef)s, descriptors by path or held by the caller.
//!   JSON is made only for QMP and the journal.
//! * [`pci`]: `query-pci` read leniently; the windows each bridge forwards right now
//!   ([`pci::LiveBridge`]) and whether a device's BARs fit them.
//! * [`journal`]: reading the engine's crash-safe journal (framed, checksummed records)
//!   for tools: [`journal::read_file`], [`journal::fold`].
//!
//! A `pcie-topology` plan's hotplug actions become requests with
//! [`PlugRequest::from_action`]; any other planner builds them with [`PlugRequest::new`]
//! and [`PlugFunction::new`], or fills in their serde form.
//!
//! The operator tool `qmp-fit` (feature `cli`) checks a device's BARs against a running
//! QEMU's live port windows: `cargo install --path qmp-hotplug --features cli`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use qmp_hotplug::{ClientOptions, Engine, EngineOptions, PlugRequest, QmpClient, UnplugOutcome};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The plan the VM was booted with (`pcie_topology::plan`, kept as JSON).
//! let plan = pcie_topology::Plan::from_json(&std::fs::read_to_string("/run/vm/plan.json")?)?;
//! let client = Arc::new(QmpClient::connect_unix("/run/vm/qmp.sock", ClientOptions::default())?);
//! // Opening the journal recovers whatever a previous process left half done.
//! let (engine, report) = Engine::open(client, "/run/vm/hotplug.journal", EngineOptions::default())?;
//! println!("recovery: {report:?}");
//!
//! let action = plan.hotplug_action("gpu0")?;
//! let record = engine.plug(PlugRequest::from_action(&action))?; // visible where planned, or rolled back
//! println!("{:?} at {:?}", record.state, record.guest);
//!
//! // Unplugged by the device's id, the id the plan releases it by.
//! match engine.unplug("gpu0")? {
//!     UnplugOutcome::Removed => println!("gone, port free"),
//!     UnplugOutcome::Pending => println!("guest has not released it yet; port stays taken"),
//!     _ => {}
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

#[cfg(feature = "tokio")]
pub mod async_engine;
pub mod client;
mod deadline;
pub mod engine;
mod event_queue;
mod files;
pub mod journal;
pub mod monitor;
pub mod pci;
pub mod request;
pub mod state;
mod transport;
mod vfio;

pub use client::{ClientError, ClientOptions, Event, EventStream, QmpClient};
pub use engine::{Engine, EngineError, EngineOptions, RecoveryAction, RecoveryReport, UnplugOutcome};
pub use files::FileKind;
pub use monitor::monitor_args;
pub use request::{
    BarExpectation, Expectation, FdRequest, PciExpectation, PlaceholderRequest, PlugFunction, PlugRequest,
    PlugRequestError,
};
pub use state::{DeviceRecord, DeviceState, Transition};

/// The README's examples, compiled (and run where they need no QEMU) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme_doctests {}

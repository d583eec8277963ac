//! A QMP client and a PCIe / VFIO hotplug engine for QEMU that never hangs, never leaks a
//! port, and survives a restart of the process that drives it.
//!
//! * [`client`]: a blocking QMP client (Unix socket or `-qmp stdio` pipes) with a reader
//!   thread that matches replies to commands by id, fans events out to any number of
//!   [`EventStream`]s, bounds every wait and every message, and passes descriptors
//!   (`getfd`, `add-fd`). Typed commands come from the `qapi` crate; a raw JSON path
//!   covers what its schema does not know.
//! * [`engine`]: plugs a [`DeviceRequest`] (all functions of a slot or IOMMU group, the
//!   objects and descriptors they need) through explicit [`DeviceState`]s, proves the
//!   result with `query-pci`, rolls back partial plugs, bounds unplug waits
//!   (`unplug-pending` on timeout, finished by a late `DEVICE_DELETED`), takes a boot-time
//!   placeholder off the port before a plug ([`request::PlaceholderRequest`]), and journals every
//!   step so that [`Engine::open`] can finish or roll back whatever a dead process left.
//! * [`journal`]: the crash-safe journal (framed, checksummed records; compaction while
//!   running); [`journal::read_bytes`] reads one from bytes.
//! * [`vfio`]: IOMMU-group viability and device checks before a VFIO hotplug.
//! * [`files`]: files named by callers are opened without blocking and read with a bound;
//!   special files are refused.
//!
//! A `pcie-topology` plan's hotplug actions become requests with
//! [`DeviceRequest::from_action`]; any other planner fills the serde-able request in.
//!
//! ```no_run
//! use std::sync::Arc;
//! use qmp_hotplug::{ClientOptions, DeviceRequest, Engine, EngineOptions, QmpClient, UnplugOutcome};
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
//! let request = DeviceRequest::from_action(&action);
//! let port = request.port.clone();
//! let record = engine.plug(request)?; // visible where planned, or rolled back
//! println!("{:?} at {:?}", record.state, record.guest);
//!
//! match engine.unplug(&port)? {
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
pub mod files;
pub mod journal;
pub mod monitor;
pub mod pci;
pub mod request;
pub mod state;
pub mod transport;
pub mod vfio;

pub use client::{ClientError, ClientOptions, Event, EventStream, QmpClient};
pub use engine::{Engine, EngineError, EngineOptions, RecoveryReport, UnplugOutcome};
pub use monitor::monitor_args;
pub use request::{
    BarExpectation, DeviceRequest, Expectation, FdRequest, FunctionRequest, ObjectRequest, PciExpectation,
    PlaceholderRequest,
};
pub use state::{DeviceRecord, DeviceState, GuestAddress, Transition};

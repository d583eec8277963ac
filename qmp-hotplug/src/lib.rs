//! QMP client and PCIe/VFIO hotplug engine for QEMU (work in progress docs).

pub mod client;
pub mod engine;
pub mod journal;
pub mod pci;
pub mod request;
pub mod state;
pub mod transport;
pub mod vfio;

pub use client::{ClientError, ClientOptions, Event, EventStream, QmpClient};
pub use engine::{Engine, EngineError, EngineOptions, RecoveryReport, UnplugOutcome};
pub use request::{
    BarExpectation, DeviceRequest, Expectation, FdRequest, FunctionRequest, ObjectRequest, PciExpectation,
};
pub use state::{DeviceRecord, DeviceState, GuestAddress, Transition};

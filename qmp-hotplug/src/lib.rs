//! QMP client and hotplug engine (work in progress).

pub mod client;
pub mod transport;

//! Project automation for the pcie-hotplug workspace: the test suite, the end-to-end
//! scenarios in real QEMU guests, the nested VFIO runs, the fuzz runs, the field
//! experiments and the fixture generator. Booting and following the guests is the
//! `guest-harness` crate's.

pub mod bootcheck;
pub mod e2e;
pub mod experiments;
pub mod fixtures;
pub mod fuzz;
pub mod scenario;
pub mod tasks;

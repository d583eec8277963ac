//! PCI and PCIe device facts for virtual machine monitors.
//!
//! The byte-parsing core works without `std` (disable the default `std` feature).
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod bar;
pub mod requirement;

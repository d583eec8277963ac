#![doc = include_str!("../README.md")]
#![cfg_attr(not(feature = "std"), no_std)]
// The only `unsafe` code is the VFIO ioctls in `vfio::sys` (feature `vfio`), allowed there.
#![deny(unsafe_code)]

extern crate alloc;

pub mod bar;
pub mod bdf;
pub mod caps;
pub mod config;
pub mod decode;
pub mod dump;
pub mod ecaps;
pub mod emulated;
pub mod facts;
pub mod requirement;
pub mod sizing;
#[cfg(feature = "std")]
pub mod sysfs;
#[cfg(all(feature = "vfio", target_os = "linux"))]
pub mod vfio;

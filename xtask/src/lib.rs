//! Project automation for the pcie-hotplug workspace: host provisioning, guest kernels
//! and initramfs, booting QEMU guests that report their PCI devices, the test suite, the
//! end-to-end runs, the fuzz runs and the fixture generator.
//!
//! The pieces the end-to-end runs build on:
//! - [`provision::ensure_host_packages`], [`kernels::ensure_kernel`],
//!   [`kernels::ensure_busybox`]: what a fresh machine needs, cached.
//! - [`guest::GuestSpec`] → [`guest::Guest::boot`]: a QEMU guest with the reporter.
//! - [`reporter::GuestState`]: what the guest reported; [`guest::Guest::wait_for`].

pub mod accel;
pub mod arch;
pub mod bootcheck;
pub mod command;
pub mod cpio;
pub mod debs;
pub mod e2e;
pub mod experiments;
pub mod fixtures;
pub mod fuzz;
pub mod guest;
pub mod hotplug;
pub mod initramfs;
pub mod kernels;
pub mod lspci;
pub mod nested;
pub mod provision;
pub mod qmp;
pub mod reporter;
pub mod scenario;
pub mod stacks;
pub mod table;
pub mod tasks;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The instant `secs` seconds from now: every wait in the harness has one.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// The workspace root (the folder holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where end-to-end runs keep their files: `<workspace>/target/e2e`.
pub fn e2e_dir() -> PathBuf {
    workspace_root().join("target").join("e2e")
}

/// The download cache of guest kernels and busybox: `<workspace>/target/e2e/cache`.
pub fn cache() -> debs::DebCache {
    debs::DebCache::new(e2e_dir().join("cache"))
}

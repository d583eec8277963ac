//! A harness for booting real QEMU guests from Debian's archive: software stacks (QEMU,
//! firmware and guest kernels, unpacked into the cache, never installed on the host),
//! guest initramfs, booting QEMU guests that report their PCI devices, and hotplug
//! steps measured against what the guest reports.
//!
//! The pieces:
//! - [`stacks::Stack`] and [`provision::provision`]: what a fresh machine needs, per
//!   stack, cached under `target/e2e/cache`.
//! - [`guest::GuestSpec`] → [`guest::Guest::boot`]: a QEMU guest with the reporter.
//! - [`reporter::GuestState`]: what the guest reported; [`guest::Guest::wait_for`].

#![forbid(unsafe_code)]

pub mod accel;
pub mod arch;
pub mod command;
pub mod cpio;
pub mod debroot;
pub mod debs;
pub mod firmware;
pub mod guest;
pub mod hotplug;
pub mod initramfs;
pub mod kernels;
pub mod launcher;
pub mod lspci;
pub mod provision;
pub mod reporter;
pub mod stacks;
pub mod table;
pub mod ubuntu;

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

/// Where downloads, unpacked packages and stack roots are kept:
/// `<workspace>/target/e2e/cache`.
pub fn cache_dir() -> PathBuf {
    e2e_dir().join("cache")
}

/// The stack called `name`, in the project's cache.
pub fn stack(name: &str) -> Result<stacks::Stack, stacks::StackError> {
    stacks::Stack::named(name, cache_dir())
}

/// The stack to use when none is named: `$XTASK_STACK` (which `cargo xtask test` sets
/// for the tests it runs), else [`stacks::DEFAULT_STACK`].
pub fn default_stack() -> Result<stacks::Stack, stacks::StackError> {
    stack(&stacks::Stack::default_name())
}

//! Helpers shared by the fuzz targets in `fuzz_targets/`: input builders, the scripted QMP
//! peer, the sysfs tree builder and the checks every accepted plan must pass.
//!
//! Each target states the promise it checks: no panic, a typed error for bad input, and
//! bounded time and memory (the runs use libFuzzer's `-timeout` and `-rss_limit_mb`).

pub mod checks;
pub mod plan_input;
pub mod qmp_peer;
pub mod sysfs_tree;

/// Makes a write to a closed socket or pipe an `EPIPE` error instead of killing the
/// process, as the Rust runtime does for every Rust `main` (libFuzzer's `main` is C++).
pub fn ignore_sigpipe() {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code; it only changes the
    // disposition of SIGPIPE for this process, before any thread uses sockets.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

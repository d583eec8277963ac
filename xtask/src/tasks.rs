//! The developer commands: provisioning, the test suite, the benchmarks.

use std::process::Command;
use std::time::Instant;

use crate::arch::Arch;
use crate::command;
use crate::debs::DebCache;
use crate::guest::GuestAssets;
use crate::provision::{self, HostPackages};

/// Installs missing host packages and fetches the guest kernel and busybox of every
/// architecture into the cache. A provisioned machine returns in well under a second.
pub fn provision_all(cache: &DebCache) -> Result<(), String> {
    let begun = Instant::now();
    match provision::ensure_host_packages().map_err(|e| e.to_string())? {
        HostPackages::Present => {}
        HostPackages::Installed(p) => eprintln!("provision: installed {}", p.join(" ")),
    }
    for arch in Arch::ALL {
        let assets = GuestAssets::ensure(cache, arch).map_err(|e| e.to_string())?;
        eprintln!(
            "provision: {arch}: kernel {} ({} {})",
            assets.kernel.release, assets.kernel.package, assets.kernel.version
        );
    }
    eprintln!("provision: done in {:.1} s", begun.elapsed().as_secs_f64());
    Ok(())
}

fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    command::run_visible(Command::new(cargo).args(args).current_dir(crate::workspace_root()))
        .map_err(|e| e.to_string())
}

/// `cargo xtask test`: provisioning (QEMU-based tests need QEMU, firmware and guest
/// kernels), format check, clippy with warnings denied, every test, doc tests.
pub fn test(cache: &DebCache) -> Result<(), String> {
    provision_all(cache)?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace", "--all-targets"])?;
    cargo(&["test", "--workspace", "--doc"])?;
    Ok(())
}

/// `cargo xtask bench`: the criterion benchmarks of every crate (extra arguments go to
/// the benchmark binaries, e.g. a name filter or `--quick`).
pub fn bench(extra: &[String]) -> Result<(), String> {
    // Bench targets only: the libraries' unit-test harness would reject criterion's flags.
    let mut args = vec!["bench", "--workspace", "--bench", "*"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(&args)
}

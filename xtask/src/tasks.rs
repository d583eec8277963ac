//! The developer commands: provisioning, the test suite, the benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::arch::Arch;
use crate::command;
use crate::debs::DebCache;
use crate::e2e::{self, RunContext};
use crate::guest::GuestAssets;
use crate::provision::{self, HostPackages};
use crate::scenario::{self, Scenario};

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
/// kernels), format check, clippy with warnings denied, every test, doc tests, the
/// default end-to-end scenario set, then a short run of every fuzz target
/// ([`crate::fuzz::SMOKE_SECONDS`] each; last, so that its findings do not hide the
/// end-to-end results).
pub fn test(cache: &DebCache) -> Result<(), String> {
    let begun = Instant::now();
    provision_all(cache)?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    // Every feature on (qmp-hotplug's `tokio`), so its code and tests are checked too.
    cargo(&["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace", "--all-targets", "--all-features"])?;
    cargo(&["test", "--workspace", "--doc", "--all-features"])?;
    let tests_done = begun.elapsed();
    e2e(cache, &[], &[], None, 2)?;
    let e2e_done = begun.elapsed();
    crate::fuzz::run(&crate::fuzz::Options {
        seconds: crate::fuzz::SMOKE_SECONDS,
        targets: Vec::new(),
        merge: false,
        json: None,
    })?;
    eprintln!(
        "test: tests {:.0} s, end-to-end {:.0} s, fuzzing {:.0} s, total {:.0} s",
        tests_done.as_secs_f64(),
        (e2e_done - tests_done).as_secs_f64(),
        (begun.elapsed() - e2e_done).as_secs_f64(),
        begun.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Loads the scenarios named (the default set when none), keeps those of `arches` (all
/// when empty).
pub fn load_scenarios(files: &[PathBuf], arches: &[Arch]) -> Result<Vec<Scenario>, String> {
    let files = if files.is_empty() {
        scenario::default_files().map_err(|e| format!("{}: {e}", scenario::default_dir().display()))?
    } else {
        files.iter().map(|f| scenario::resolve(f)).collect()
    };
    let mut out = Vec::new();
    for f in files {
        let s = Scenario::load(&f).map_err(|e| e.to_string())?;
        if arches.is_empty() || arches.contains(&s.arch) {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err("no scenario to run (check --scenario and --arch)".into());
    }
    Ok(out)
}

/// `cargo xtask e2e`: provisioning, then the scenarios, `jobs` guests at a time; prints
/// the table (and writes it as JSON); fails unless every scenario passed.
pub fn e2e(
    cache: &DebCache,
    files: &[PathBuf],
    arches: &[Arch],
    json: Option<&Path>,
    jobs: usize,
) -> Result<(), String> {
    let scenarios = load_scenarios(files, arches)?;
    provision_all(cache)?;
    let begun = Instant::now();
    let names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
    eprintln!("e2e: {} scenarios, {jobs} guests at a time: {}", scenarios.len(), names.join(", "));
    let ctx = RunContext { cache: cache.clone(), ..RunContext::new() };
    let reports = e2e::run_all(&scenarios, &ctx, jobs);
    println!("{}", e2e::render(&reports));
    eprintln!("e2e: {:.1} s", begun.elapsed().as_secs_f64());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let failed: Vec<&str> = reports.iter().filter(|r| !r.ok()).map(|r| r.scenario.as_str()).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("e2e: {} of {} scenarios failed: {}", failed.len(), reports.len(), failed.join(", ")))
    }
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

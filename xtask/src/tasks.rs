//! The developer commands: provisioning, the test suite, the benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::e2e::random::{self as rnd, Verdict};
use crate::e2e::{self, RunContext};
use crate::scenario::{self, Scenario};
use guest_harness::arch::Arch;
use guest_harness::command;
use guest_harness::provision::{self, Provisioned};
use guest_harness::stacks::{self, Stack};

/// Provisions `stack`'s root and the guest assets of `arches`, printing what it got.
/// Fails when the root fails; an architecture that fails is printed with what to do and
/// fails only that architecture's guests later.
pub fn provision_stack(stack: &Stack, arches: &[Arch], update: bool) -> Result<Provisioned, String> {
    provision::check_host_tools().map_err(|e| e.to_string())?;
    let done = provision::provision(stack, arches, update).map_err(|e| e.to_string())?;
    for line in done.summary() {
        eprintln!("provision: {line}");
    }
    eprintln!("provision: stack {} done in {:.1} s", stack.name(), done.took.as_secs_f64());
    Ok(done)
}

/// `cargo xtask provision`: the stack's root and every architecture's guest assets, and
/// wrapper scripts for its QEMU, `lspci` and `busybox` (printed with the environment that
/// makes tests find them); fails when any piece failed.
pub fn provision_all(stack: &Stack, update: bool) -> Result<(), String> {
    let done = provision_stack(stack, &Arch::ALL, update)?;
    let (root, bin) = stack.write_wrappers().map_err(|e| e.to_string())?;
    eprintln!(
        "provision: to run the crates' tests on stack {} without xtask:\n    export PATH={}:$PATH {}={}",
        stack.name(),
        bin.display(),
        stacks::FIRMWARE_ROOT_ENV,
        root.root.display()
    );
    let failed = done.failed();
    if failed.is_empty() {
        Ok(())
    } else {
        let names: Vec<String> = failed.iter().map(|(a, _)| a.to_string()).collect();
        Err(format!("stack {}: {} could not be provisioned (see above)", stack.name(), names.join(", ")))
    }
}

/// The environment that makes the stack's programs and firmware the ones tests find:
/// its wrapper scripts first on `PATH`, [`stacks::FIRMWARE_ROOT_ENV`] at its root and
/// [`stacks::STACK_ENV`] naming it.
pub fn stack_env(stack: &Stack) -> Result<Vec<(String, String)>, String> {
    let (root, bin) = stack.write_wrappers().map_err(|e| e.to_string())?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .map_err(|e| format!("PATH: {e}"))?;
    Ok(vec![
        ("PATH".into(), joined.to_string_lossy().into_owned()),
        (stacks::FIRMWARE_ROOT_ENV.into(), root.root.display().to_string()),
        (stacks::STACK_ENV.into(), stack.name().into()),
    ])
}

fn cargo(args: &[&str], env: &[(String, String)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(guest_harness::workspace_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    command::run_visible(&mut cmd).map_err(|e| e.to_string())
}

/// `cargo xtask test`: provisioning of `stack` (and of `more`), format check, clippy
/// with warnings denied, every test and doc test with the stack's QEMU and firmware
/// ([`stack_env`]), the default end-to-end set on `stack` and on each of `more`, then a
/// short run of every fuzz target ([`crate::fuzz::SMOKE_SECONDS`] each; after the
/// end-to-end runs, and its failure reported with theirs, so that neither hides the
/// other).
pub fn test(stack: &Stack, more: &[Stack]) -> Result<(), String> {
    let begun = Instant::now();
    provision_stack(stack, &Arch::ALL, false)?;
    for other in more {
        provision_stack(other, &Arch::ALL, false)?;
    }
    let env = stack_env(stack)?;
    cargo(&["fmt", "--all", "--", "--check"], &env)?;
    // Every feature on (qmp-hotplug's `tokio`), so its code and tests are checked too.
    cargo(&["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"], &env)?;
    cargo(&["test", "--workspace", "--all-targets", "--all-features"], &env)?;
    cargo(&["test", "--workspace", "--doc", "--all-features"], &env)?;
    let tests_done = begun.elapsed();
    let mut timings = Vec::new();
    let mut failures = Vec::new();
    for s in std::iter::once(stack).chain(more) {
        let started = Instant::now();
        if let Err(e) = e2e(s, &[], &[], None, 2) {
            failures.push(e);
        }
        timings.push(format!("end-to-end on {} {:.0} s", s.name(), started.elapsed().as_secs_f64()));
    }
    let started = Instant::now();
    if let Err(e) = regressions(stack, 2) {
        failures.push(e);
    }
    // A few random scenarios with a seed of their own each run (printed), within a budget.
    let opts = RandomOptions {
        count: RANDOM_IN_TEST,
        seed: clock_seed(),
        jobs: 2,
        shrink_runs: 4,
        budget: Some(RANDOM_BUDGET),
        json: None,
    };
    if let Err(e) = random(stack, &opts) {
        failures.push(e);
    }
    timings.push(format!("regressions and random scenarios {:.0} s", started.elapsed().as_secs_f64()));
    let started = Instant::now();
    let fuzz = crate::fuzz::Options {
        seconds: crate::fuzz::SMOKE_SECONDS,
        targets: Vec::new(),
        merge: false,
        json: None,
    };
    if let Err(e) = crate::fuzz::run(&fuzz) {
        failures.push(e);
    }
    timings.push(format!("fuzzing {:.0} s", started.elapsed().as_secs_f64()));
    eprintln!(
        "test: provisioning and tests {:.0} s, {}, total {:.0} s",
        tests_done.as_secs_f64(),
        timings.join(", "),
        begun.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Random scenarios `cargo xtask test` runs.
pub const RANDOM_IN_TEST: u32 = 3;

/// No random scenario of `cargo xtask test` starts after this long.
pub const RANDOM_BUDGET: Duration = Duration::from_secs(180);

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

/// `cargo xtask e2e`: provisioning of `stack` for the scenarios' architectures, then the
/// scenarios, `jobs` guests at a time; prints the table (and writes it as JSON); fails
/// unless every scenario passed. An architecture whose kernel cannot be provisioned fails
/// its own scenarios only.
pub fn e2e(
    stack: &Stack,
    files: &[PathBuf],
    arches: &[Arch],
    json: Option<&Path>,
    jobs: usize,
) -> Result<(), String> {
    let scenarios = load_scenarios(files, arches)?;
    let mut needed: Vec<Arch> = scenarios.iter().map(|s| s.arch).collect();
    needed.sort();
    needed.dedup();
    provision_stack(stack, &needed, false)?;
    let begun = Instant::now();
    let names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
    eprintln!(
        "e2e: stack {}: {} scenarios, {jobs} guests at a time: {}",
        stack.name(),
        scenarios.len(),
        names.join(", ")
    );
    let ctx = RunContext::new(stack.clone());
    let reports = e2e::run_all(&scenarios, &ctx, jobs);
    println!("{}", e2e::render(&reports));
    eprintln!("e2e: stack {}: {:.1} s", stack.name(), begun.elapsed().as_secs_f64());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let failed: Vec<&str> = reports.iter().filter(|r| !r.ok()).map(|r| r.scenario.as_str()).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "e2e on stack {}: {} of {} scenarios failed: {}",
            stack.name(),
            failed.len(),
            reports.len(),
            failed.join(", ")
        ))
    }
}

/// `cargo xtask bench`: the criterion benchmarks of every crate, with `stack`'s QEMU
/// (extra arguments go to the benchmark binaries, e.g. a name filter or `--quick`).
pub fn bench(stack: &Stack, extra: &[String]) -> Result<(), String> {
    let env = stack_env(stack)?;
    // Bench targets only: the libraries' unit-test harness would reject criterion's flags.
    let mut args = vec!["bench", "--workspace", "--bench", "*"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(&args, &env)
}

/// What `cargo xtask e2e --random` runs.
#[derive(Clone, Debug)]
pub struct RandomOptions {
    /// Scenarios to generate.
    pub count: u32,
    /// Seed of the first; the others take the next seeds.
    pub seed: u64,
    /// Guests at a time.
    pub jobs: usize,
    /// Guest runs at most to shrink each failure (0: neither shrink nor write a file).
    pub shrink_runs: usize,
    /// Start no scenario after this long.
    pub budget: Option<Duration>,
    /// Also write the verdicts as JSON here.
    pub json: Option<PathBuf>,
}

/// A seed from the clock (nanoseconds since the epoch), for runs that must differ.
pub fn clock_seed() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_nanos() % u128::from(u64::MAX)).unwrap_or(0)
}

/// `cargo xtask e2e --random N --seed S`: generates scenarios of seeds S, S+1, …, checks
/// each ([`rnd::check_one`]), prints the verdicts and the counts per platform, shrinks each
/// failure into `xtask/scenarios/regressions/`; fails when any scenario failed.
pub fn random(stack: &Stack, opts: &RandomOptions) -> Result<(), String> {
    let seeds: Vec<u64> = (0..u64::from(opts.count)).map(|i| opts.seed.wrapping_add(i)).collect();
    let scenarios: Vec<Scenario> = seeds.iter().map(|&s| rnd::generate(s)).collect();
    eprintln!(
        "e2e --random: {} scenarios from seed {} (again: cargo xtask e2e --random {} --seed {})",
        opts.count, opts.seed, opts.count, opts.seed
    );
    provision_stack(stack, &[Arch::X86_64, Arch::Aarch64], false)?;
    let mut ctx = RunContext::new(stack.clone());
    ctx.unplug = false;
    let begun = Instant::now();
    let checked = rnd::run_checked(&scenarios, &ctx, opts.jobs, opts.budget.map(|b| begun + b));
    let mut t = guest_harness::table::Table::new(["scenario", "platform", "mode", "devices", "s", "verdict"]);
    for c in &checked {
        let Some(s) = scenarios.iter().find(|s| s.name == c.scenario) else { continue };
        let verdict = match &c.verdict {
            Verdict::Passed => "passed".to_string(),
            Verdict::Refused(why) => format!("refused before boot: {why}"),
            Verdict::Failed(why) => format!("FAILED: {}", why.lines().next().unwrap_or("")),
        };
        let wall = c.report.as_ref().map_or(0.0, |r| r.wall_ms as f64 / 1000.0);
        t.row([
            c.scenario.clone(),
            c.platform.clone(),
            s.mode.name().into(),
            describe(s),
            format!("{wall:.0}"),
            verdict,
        ]);
    }
    let failed: Vec<&rnd::Checked> = checked.iter().filter(|c| !c.verdict.ok()).collect();
    let reports: Vec<e2e::ScenarioReport> = failed.iter().filter_map(|c| c.report.clone()).collect();
    if !reports.is_empty() {
        println!("{}", e2e::render(&reports));
    }
    println!("{}", t.render());
    println!("{}", rnd::counts(&checked).render());
    println!(
        "{} of {} random scenarios ran in {:.0} s (seeds {}..={}), {} failed",
        checked.len(),
        opts.count,
        begun.elapsed().as_secs_f64(),
        opts.seed,
        seeds.last().copied().unwrap_or(opts.seed),
        failed.len()
    );
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&checked).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let mut kept = Vec::new();
    for c in &failed {
        let (Some(s), Verdict::Failed(why)) = (scenarios.iter().find(|s| s.name == c.scenario), &c.verdict)
        else {
            continue;
        };
        if opts.shrink_runs == 0 {
            continue;
        }
        let seed = seeds.iter().copied().find(|&x| rnd::name(x) == s.name).unwrap_or(opts.seed);
        let limits = rnd::ShrinkLimits { runs: opts.shrink_runs, time: Duration::from_secs(1800) };
        let (small, why) = rnd::shrink(s, why, &ctx, opts.jobs, limits);
        let path = rnd::write_regression(&rnd::regressions_dir(), &small, seed, &why)?;
        eprintln!("e2e --random: {} shrunk to {} ({})", s.name, path.display(), describe(&small));
        kept.push(path.display().to_string());
    }
    if failed.is_empty() {
        Ok(())
    } else {
        let names: Vec<&str> = failed.iter().map(|c| c.scenario.as_str()).collect();
        Err(format!(
            "{} of {} random scenarios failed: {}{}",
            failed.len(),
            checked.len(),
            names.join(", "),
            if kept.is_empty() { String::new() } else { format!("; kept as {}", kept.join(", ")) }
        ))
    }
}

/// The devices of a scenario in a few words: `ivshmem(64G) e1000e×2 spare:nvme no-fit:ivshmem(1T)`.
fn describe(s: &Scenario) -> String {
    let mut parts: Vec<String> = s
        .devices
        .iter()
        .map(|d| {
            let mut t = d.kind.name().to_string();
            if let Some(b) = d.bar_size {
                t.push_str(&format!("({b})"));
            }
            if d.functions > 1 {
                t.push_str(&format!("x{}", d.functions));
            }
            if d.expect == scenario::PlugExpect::NoFit {
                t = format!("no-fit:{t}");
            } else if d.place == scenario::Placement::Spare {
                t = format!("spare:{t}");
            }
            if let Some(g) = &d.group {
                t.push_str(&format!("@{g}"));
            }
            if let Some(n) = d.numa_node {
                t.push_str(&format!("#n{n}"));
            }
            t
        })
        .collect();
    if s.spare_ports > 0 {
        parts.push(format!("+{} spare ports", s.spare_ports));
    }
    parts.join(" ")
}

/// The regression scenarios (`xtask/scenarios/regressions/`) under the random rule
/// (refused before boot or passing in the guest); fails when any fails.
pub fn regressions(stack: &Stack, jobs: usize) -> Result<(), String> {
    let files = rnd::regression_files().map_err(|e| format!("{}: {e}", rnd::regressions_dir().display()))?;
    if files.is_empty() {
        return Ok(());
    }
    let scenarios: Vec<Scenario> =
        files.iter().map(|f| Scenario::load(f)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    provision_stack(stack, &[Arch::X86_64, Arch::Aarch64], false)?;
    let ctx = RunContext::new(stack.clone());
    let checked = rnd::run_checked(&scenarios, &ctx, jobs, None);
    let failed: Vec<String> = checked
        .iter()
        .filter_map(|c| match &c.verdict {
            Verdict::Failed(why) => Some(format!("{}: {}", c.scenario, why.lines().next().unwrap_or(""))),
            _ => None,
        })
        .collect();
    eprintln!("regressions: {} scenarios, {} failed", checked.len(), failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("regression scenarios failed:\n{}", failed.join("\n")))
    }
}

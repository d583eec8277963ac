//! `cargo xtask fuzz`: the libFuzzer targets in `fuzz/`, each run for a bounded time.
//!
//! `cargo-fuzz` is installed into `target/fuzz/tools` when missing (never globally), the
//! targets are built once (`cargo fuzz build`, no sanitizer: the fuzzed code has no
//! `unsafe`, and debug assertions with overflow checks stay on), then each target runs
//! alone, one process at a time, in libFuzzer's fork mode so that one finding does not end
//! the run: every crash, timeout and out-of-memory input is kept as an artifact and the
//! fuzzing goes on until the time is up. Inputs run with a per-input deadline
//! (`-timeout`) and a memory bound (`-rss_limit_mb`).
//!
//! Corpora: `fuzz/corpus/<target>` (in the repository, read only here) and
//! `target/fuzz/corpus/<target>` (what the runs found, kept between runs). The inputs of
//! faults found before, `fuzz/reproducers/<target>`, are replayed one by one: each must
//! pass. After the run
//! every corpus input is replayed once to find the slowest, and the coverage of both
//! corpora is measured before and after. Findings go to
//! `target/fuzz/artifacts/<target>/<run>/`, the libFuzzer log to `target/fuzz/logs/`.

pub mod report;
pub mod seeds;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_harness::command;
use report::{Finding, TargetReport};

/// Version of `cargo-fuzz` installed when missing.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Per-input deadline in seconds (`-timeout`).
pub const INPUT_TIMEOUT_S: u64 = 10;

/// Memory bound of a fuzzing process in MiB (`-rss_limit_mb`).
pub const RSS_LIMIT_MB: u64 = 512;

/// Default fuzzing time per target.
pub const DEFAULT_SECONDS: u64 = 60;

/// Fuzzing time per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 15;

/// One fuzz target and the longest input it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Name (the binary in `fuzz/fuzz_targets/`).
    pub name: &'static str,
    /// `-max_len`: the largest input libFuzzer makes for it.
    pub max_len: usize,
}

/// Every target, in the order they run.
pub const TARGETS: [Target; 7] = [
    Target { name: "config_space", max_len: 4200 },
    Target { name: "sysfs_tree", max_len: 32 * 1024 },
    Target { name: "lspci_dump", max_len: 64 * 1024 },
    Target { name: "plan_file", max_len: 64 * 1024 },
    Target { name: "plan_request", max_len: 16 * 1024 },
    Target { name: "journal_file", max_len: 32 * 1024 },
    Target { name: "qmp_input", max_len: 16 * 1024 },
];

/// What `cargo xtask fuzz` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Fuzzing time per target.
    pub seconds: u64,
    /// Targets to run (all when empty).
    pub targets: Vec<String>,
    /// Add the inputs of the run's corpus that reach new coverage to `fuzz/corpus`.
    pub merge: bool,
    /// Also write the reports as JSON here.
    pub json: Option<PathBuf>,
}

/// The folders the runs use.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `fuzz/` of the workspace.
    pub fuzz: PathBuf,
    /// `target/fuzz/`.
    pub work: PathBuf,
}

impl Layout {
    /// The layout of the workspace at `root`.
    pub fn new(root: &Path) -> Layout {
        Layout { fuzz: root.join("fuzz"), work: root.join("target").join("fuzz") }
    }

    /// The installed `cargo-fuzz`.
    pub fn cargo_fuzz(&self) -> PathBuf {
        self.work.join("tools").join("bin").join("cargo-fuzz")
    }

    /// Cargo's target folder of the fuzz build.
    pub fn build_dir(&self) -> PathBuf {
        self.work.join("build")
    }

    /// The built binary of `target`.
    pub fn binary(&self, target: &str) -> PathBuf {
        self.build_dir().join(host_triple()).join("release").join(target)
    }

    /// The repository's corpus of `target`.
    pub fn seeds(&self, target: &str) -> PathBuf {
        self.fuzz.join("corpus").join(target)
    }

    /// The corpus runs add to.
    pub fn corpus(&self, target: &str) -> PathBuf {
        self.work.join("corpus").join(target)
    }
}

/// The host's target triple (the fuzz build's `--target`).
pub fn host_triple() -> String {
    format!("{}-unknown-{}-gnu", std::env::consts::ARCH, std::env::consts::OS)
}

/// `cargo xtask fuzz`: install, build, run every selected target, report; fails when any
/// target found a crash, a timeout or an out-of-memory input.
pub fn run(opts: &Options) -> Result<(), String> {
    let targets = select(&opts.targets)?;
    let layout = Layout::new(&guest_harness::workspace_root());
    let begun = Instant::now();
    ensure_cargo_fuzz(&layout)?;
    build(&layout)?;
    eprintln!("fuzz: tools and build ready in {:.0} s", begun.elapsed().as_secs_f64());
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()).to_string();
    let mut reports = Vec::new();
    for t in &targets {
        let r = fuzz_target(&layout, t, opts.seconds, &run_id)?;
        eprintln!("{}", report::render(std::slice::from_ref(&r)));
        if opts.merge {
            merge(&layout, t)?;
        }
        reports.push(r);
    }
    println!("{}", report::render(&reports));
    println!("{}", report::render_findings(&reports));
    eprintln!("fuzz: {:.0} s in all", begun.elapsed().as_secs_f64());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let bad: Vec<String> = reports.iter().filter(|r| !r.clean()).map(|r| r.target.clone()).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz: findings in {} (reproducers above)", bad.join(", ")))
    }
}

/// `cargo xtask fuzz --make-seeds`: installs and builds as [`run`] does, then writes the
/// seed corpora of `targets` (all when empty) with QEMU found through `env` (the stack's
/// `PATH`); see [`seeds`].
pub fn make_seeds(targets: &[String], env: &[(String, String)]) -> Result<(), String> {
    let targets = select(targets)?;
    let layout = Layout::new(&guest_harness::workspace_root());
    ensure_cargo_fuzz(&layout)?;
    build(&layout)?;
    seeds::make(&layout, &targets, env)
}

/// The targets named (all when none); an unknown name is an error.
pub fn select(names: &[String]) -> Result<Vec<Target>, String> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|n| {
            TARGETS.iter().copied().find(|t| t.name == n.as_str()).ok_or_else(|| {
                let all: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
                format!("unknown fuzz target {n:?} (targets: {})", all.join(", "))
            })
        })
        .collect()
}

/// Installs `cargo-fuzz` into `target/fuzz/tools` unless that version is there.
pub fn ensure_cargo_fuzz(layout: &Layout) -> Result<(), String> {
    let bin = layout.cargo_fuzz();
    if let Ok(v) = command::output(Command::new(&bin).arg("--version")) {
        if v.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
            return Ok(());
        }
    }
    let begun = Instant::now();
    let root = layout.work.join("tools");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    command::run_visible(
        Command::new(cargo)
            .args(["install", "--locked", "--version", CARGO_FUZZ_VERSION, "--root"])
            .arg(&root)
            .arg("cargo-fuzz"),
    )
    .map_err(|e| e.to_string())?;
    eprintln!("fuzz: cargo-fuzz {CARGO_FUZZ_VERSION} installed in {:.0} s", begun.elapsed().as_secs_f64());
    Ok(())
}

/// Builds every target (release, debug assertions and overflow checks on, no sanitizer).
pub fn build(layout: &Layout) -> Result<(), String> {
    command::run_visible(
        Command::new(layout.cargo_fuzz())
            .args(["build", "--sanitizer", "none", "--target", &host_triple(), "--target-dir"])
            .arg(layout.build_dir())
            .current_dir(&layout.fuzz),
    )
    .map_err(|e| e.to_string())
}

/// libFuzzer flags every run of `target` gets; an input that fails is written to
/// `artifacts`. The target's dictionary (`fuzz/dicts/<target>.dict`: tokens of its input
/// format and boundary values) is used when there is one.
fn common_flags(target: &Target, artifacts: &Path) -> Vec<String> {
    let mut flags = vec![
        format!("-max_len={}", target.max_len),
        format!("-timeout={INPUT_TIMEOUT_S}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        format!("-artifact_prefix={}/", artifacts.display()),
    ];
    let dict = Layout::new(&guest_harness::workspace_root())
        .fuzz
        .join("dicts")
        .join(format!("{}.dict", target.name));
    if dict.is_file() {
        flags.push(format!("-dict={}", dict.display()));
    }
    flags
}

/// Fuzzes one target for `seconds` and measures what it did.
fn fuzz_target(layout: &Layout, target: &Target, seconds: u64, run_id: &str) -> Result<TargetReport, String> {
    let name = target.name;
    let corpus = layout.corpus(name);
    let seeds = layout.seeds(name);
    let artifacts = layout.work.join("artifacts").join(name).join(run_id);
    let logs = layout.work.join("logs");
    for d in [&corpus, &seeds, &artifacts, &logs] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let bin = layout.binary(name);
    let run = Run { bin: &bin, target, artifacts: &artifacts };
    let before =
        report::coverage(&run.libfuzzer(&["-runs=0"], &[&corpus, &seeds], Duration::from_secs(600))?);
    eprintln!("fuzz: {name}: {seconds} s from {} inputs", before.corpus);
    let log = logs.join(format!("{name}-{run_id}.log"));
    let mut flags = vec![
        "-fork=1".to_string(),
        "-ignore_crashes=1".to_string(),
        "-ignore_timeouts=1".to_string(),
        "-ignore_ooms=1".to_string(),
        format!("-max_total_time={seconds}"),
    ];
    flags.extend(common_flags(target, &artifacts));
    let mut cmd = Command::new(&bin);
    cmd.args(&flags).arg(&corpus).arg(&seeds);
    // libFuzzer stops by itself; the deadline covers its wrapping up and a stuck child.
    let begun = Instant::now();
    let status = run_logged(&mut cmd, &log, Duration::from_secs(seconds + 180))?;
    let fuzzed = begun.elapsed();
    let text = fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let stats = report::fork_stats(&text);
    let slowest = run.slowest(&[&corpus, &seeds])?;
    let after =
        report::coverage(&run.libfuzzer(&["-runs=0"], &[&corpus, &seeds], Duration::from_secs(600))?);
    let mut findings = run.reproducers(&layout.fuzz.join("reproducers").join(name))?;
    findings.extend(run.findings()?);
    Ok(TargetReport {
        target: name.to_string(),
        seconds: fuzzed.as_secs(),
        runs: stats.runs,
        execs_per_second: stats.runs.checked_div(fuzzed.as_secs().max(1)).unwrap_or(0),
        coverage_before: before,
        coverage_after: after,
        counted: stats.counts,
        slowest_ms: slowest.0,
        slowest_input: slowest.1,
        findings,
        log,
        exit: status,
    })
}

/// One target's binary and where its failing inputs go.
struct Run<'a> {
    bin: &'a Path,
    target: &'a Target,
    artifacts: &'a Path,
}

impl Run<'_> {
    /// Runs the binary with `flags` on `args` (corpus folders or inputs) and returns
    /// everything it printed.
    fn libfuzzer(&self, flags: &[&str], args: &[&Path], limit: Duration) -> Result<String, String> {
        let mut cmd = Command::new(self.bin);
        cmd.args(common_flags(self.target, self.artifacts)).args(flags).args(args);
        let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        run_logged(&mut cmd, log.path(), limit)?;
        fs::read_to_string(log.path()).map_err(|e| e.to_string())
    }

    /// Runs every input of `dirs` once, then the five slowest three times more each, and
    /// returns the slowest by its best time (milliseconds, file): a single time on a
    /// shared machine says more about the machine than about the input.
    fn slowest(&self, dirs: &[&Path]) -> Result<(u64, Option<PathBuf>), String> {
        let mut times: Vec<(u64, PathBuf)> = Vec::new();
        for chunk in files(dirs).chunks(400) {
            let inputs: Vec<&Path> = chunk.iter().map(PathBuf::as_path).collect();
            times.extend(report::executed(&self.libfuzzer(&[], &inputs, Duration::from_secs(600))?));
        }
        times.sort_by_key(|t| std::cmp::Reverse(t.0));
        let mut slowest: (u64, Option<PathBuf>) = (0, None);
        for (first, file) in times.into_iter().take(5) {
            let mut best = first;
            for _ in 0..3 {
                let text = self.libfuzzer(&[], &[&file], Duration::from_secs(600))?;
                best = report::executed(&text).iter().map(|(ms, _)| *ms).fold(best, u64::min);
            }
            if slowest.1.is_none() || best > slowest.0 {
                slowest = (best, Some(file));
            }
        }
        Ok(slowest)
    }

    /// Each artifact replayed alone: what it is and where it fails.
    fn findings(&self) -> Result<Vec<Finding>, String> {
        let mut out = Vec::new();
        for file in files(&[self.artifacts]) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let kind = name.rsplit_once('-').map_or(name, |(k, _)| k).to_string();
            let what = self.replay(&file)?.unwrap_or_else(|| "passes when replayed alone".to_string());
            out.push(Finding { kind, what, input: file });
        }
        Ok(out)
    }

    /// The inputs of `dir` (`fuzz/reproducers/<target>`: inputs of faults found before)
    /// that still fail, each replayed alone.
    fn reproducers(&self, dir: &Path) -> Result<Vec<Finding>, String> {
        let mut out = Vec::new();
        for file in files(&[dir]) {
            if let Some(what) = self.replay(&file)? {
                out.push(Finding { kind: "reproducer".to_string(), what, input: file });
            }
        }
        Ok(out)
    }

    /// Runs one input alone; `Some(why)` when it fails.
    fn replay(&self, input: &Path) -> Result<Option<String>, String> {
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let replay = Run { artifacts: scratch.path(), ..*self };
        let limit = Duration::from_secs(INPUT_TIMEOUT_S * 3);
        Ok(match replay.libfuzzer(&[], &[input], limit) {
            Ok(text) => report::failure(&text),
            Err(e) => Some(e),
        })
    }
}

/// Runs `cmd` niced, stdout and stderr to `log`, killed at `limit`; returns its exit
/// status in words.
fn run_logged(cmd: &mut Command, log: &Path, limit: Duration) -> Result<String, String> {
    let out = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let line = command::line(cmd);
    // Niced: the machine is shared, and the fuzzer would take a whole core.
    let mut niced = Command::new("nice");
    niced.args(["-n", "10"]).arg(cmd.get_program()).args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        niced.current_dir(dir);
    }
    let mut child = niced
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run `{line}`: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status.to_string());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`{line}` still running after {} s; killed (log: {})",
                limit.as_secs(),
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every file of `dirs`, sorted.
fn files(dirs: &[&Path]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Largest input `--merge` copies into the repository.
const MERGE_MAX_INPUT: u64 = 4096;

/// Adds to `fuzz/corpus/<target>` the inputs of the run's corpus (those of at most
/// [`MERGE_MAX_INPUT`] bytes) that reach code edges the repository's corpus does not:
/// libFuzzer's set-cover merge on edges alone (no hit counts, no comparison features),
/// which keeps the repository's corpora small.
fn merge(layout: &Layout, target: &Target) -> Result<(), String> {
    let seeds = layout.seeds(target.name);
    let small = tempfile::tempdir().map_err(|e| e.to_string())?;
    for f in files(&[&layout.corpus(target.name)]) {
        let fits = fs::metadata(&f).is_ok_and(|m| m.len() <= MERGE_MAX_INPUT);
        if let (true, Some(name)) = (fits, f.file_name()) {
            fs::copy(&f, small.path().join(name)).map_err(|e| format!("{}: {e}", f.display()))?;
        }
    }
    let before = files(&[&seeds]).len();
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let run = Run { bin: &layout.binary(target.name), target, artifacts: scratch.path() };
    let flags = ["-set_cover_merge=1", "-use_counters=0", "-use_cmp=0"];
    run.libfuzzer(&flags, &[&seeds, small.path()], Duration::from_secs(1200))?;
    let added = files(&[&seeds]).len().saturating_sub(before);
    eprintln!("fuzz: {}: {added} inputs added to {}", target.name, seeds.display());
    Ok(())
}

//! Random topologies against real firmware: `cargo xtask e2e --random N --seed S`.
//!
//! [`generate`] turns a seed into a valid scenario (platform and firmware, mode, 1–8
//! devices of every PCI kind, BAR sizes from 4 KiB to 256 GiB, multi-function devices,
//! devices placed on spare ports at run time, peer-to-peer groups, NUMA nodes); the same
//! seed always gives the same scenario. [`run_checked`] holds each scenario to one rule:
//! the planner either refuses it before anything boots (a typed error from `plan`), or
//! the guest boots, every planned port has at least its planned windows, and every BAR
//! of every function lands inside its port's window ([`super::planned`] checks the
//! devices). A failure is shrunk ([`shrink`]: fewer devices, fewer functions, smaller
//! BARs, fewer spare ports, while it still fails the same way) and written as a scenario
//! file into `xtask/scenarios/regressions/` ([`write_regression`]), which `cargo xtask
//! test` runs from then on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{planned, Row, RunContext, ScenarioReport};
use crate::scenario::{DeviceKind, DeviceSpec, Mode, Placement, PlugExpect, Scenario, Size};
use guest_harness::arch::Arch;
use guest_harness::firmware::Firmware;
use guest_harness::guest::GuestSpec;
use guest_harness::table::Table;

/// The platforms random scenarios run on, one after the other by seed.
pub const PLATFORMS: [(Arch, Firmware); 4] = [
    (Arch::X86_64, Firmware::SeaBios),
    (Arch::X86_64, Firmware::Ovmf),
    (Arch::Aarch64, Firmware::None),
    (Arch::Aarch64, Firmware::Uefi),
];

/// Smallest and largest BAR a random ivshmem device gets (4 KiB and 256 GiB).
const BAR_SHIFTS: std::ops::RangeInclusive<u32> = 12..=38;

/// The PCI device kinds a random scenario draws from.
const KINDS: [DeviceKind; 5] =
    [DeviceKind::Ivshmem, DeviceKind::VirtioNet, DeviceKind::VirtioBlk, DeviceKind::Nvme, DeviceKind::E1000e];

/// The name of the scenario of `seed` (it names the seed, so the scenario can be made again).
pub fn name(seed: u64) -> String {
    format!("random-{seed}")
}

/// The scenario of `seed`: valid by construction ([`Scenario::validate`] passes), the
/// platform `PLATFORMS[seed % 4]`, everything else drawn from the seed.
pub fn generate(seed: u64) -> Scenario {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (arch, firmware) = PLATFORMS[(seed % PLATFORMS.len() as u64) as usize];
    let modes: &[Mode] = if arch == Arch::X86_64 {
        &[Mode::RootPort, Mode::RootPort, Mode::SwitchPort, Mode::Numa]
    } else {
        &[Mode::RootPort, Mode::RootPort, Mode::SwitchPort]
    };
    let mode = modes[rng.usize(..modes.len())];
    let numa_nodes = if mode == Mode::Numa { rng.u32(2..=4) } else { 0 };
    // Mostly few devices (the guests share two cores), up to 8.
    let count = 1 + rng.u32(..8).min(rng.u32(..8));
    let mut devices = Vec::new();
    for i in 0..count {
        let kind = KINDS[rng.usize(..KINDS.len())];
        let bar_size = (kind == DeviceKind::Ivshmem).then(|| Size(1u64 << rng.u32(BAR_SHIFTS)));
        let functions = if rng.u8(..4) == 0 { rng.u8(2..=8) } else { 1 };
        let place = if rng.u8(..4) == 0 { Placement::Spare } else { Placement::Planned };
        let planned = place == Placement::Planned;
        let group = (planned && mode != Mode::Numa && rng.bool()).then(|| format!("p2p{}", rng.u8(..2)));
        let numa_node = (planned && mode == Mode::Numa && rng.u8(..5) > 0).then(|| rng.u32(..numa_nodes));
        devices.push(device(format!("d{i}"), kind, bar_size, functions, place, group, numa_node));
    }
    let on_spares = devices.iter().filter(|d| d.place == Placement::Spare).count() as u32;
    let spare_profile = spare_profile(&devices, &mut rng);
    // Room for every device placed at run time, and now and then empty spare ports too
    // (their windows must exist all the same).
    let empty_spares = if on_spares > 0 {
        rng.u32(..=2)
    } else if rng.u8(..3) == 0 {
        rng.u32(1..=2)
    } else {
        0
    };
    let spare_ports = on_spares + empty_spares;
    if spare_ports > 0 && rng.u8(..5) == 0 {
        // One device that fits no port: placing it must fail before any device_add.
        let size = no_fit_size(&devices, spare_profile.as_deref());
        let mut d = device(
            format!("d{count}"),
            DeviceKind::Ivshmem,
            Some(Size(size)),
            1,
            Placement::Spare,
            None,
            None,
        );
        d.expect = PlugExpect::NoFit;
        let at = rng.usize(..=devices.len());
        devices.insert(at, d);
    }
    Scenario {
        name: name(seed),
        arch,
        firmware: Some(firmware),
        mode,
        spare_ports,
        spare_profile: if spare_ports > 0 { spare_profile } else { None },
        reservations: crate::scenario::Reservations::Planned,
        native_hotplug: arch == Arch::X86_64 && mode != Mode::Numa && rng.u8(..5) == 0,
        unplug_timeout_s: None,
        numa_nodes,
        vfio_backend: crate::scenario::VfioBackend::Auto,
        kata: None,
        devices,
        source: PathBuf::from(format!("{}.toml", name(seed))),
    }
}

fn device(
    id: String,
    kind: DeviceKind,
    bar_size: Option<Size>,
    functions: u8,
    place: Placement,
    group: Option<String>,
    numa_node: Option<u32>,
) -> DeviceSpec {
    DeviceSpec {
        id,
        kind,
        bar_size,
        functions,
        numa_node,
        group,
        place,
        expect: PlugExpect::Visible,
        unplug: crate::scenario::UnplugMode::Normal,
        cold: false,
    }
}

/// Every resource of every function of `d`, as `SIZE:KIND` items of a spare profile.
fn profile_items(d: &DeviceSpec) -> Vec<String> {
    let m = super::models::model(d.kind, d.bar_size.map(|b| b.0));
    let mut out = Vec::new();
    for _ in 0..d.functions {
        for b in &m.bars {
            let kind = match (b.kind, b.prefetchable) {
                (pcilibs::bar::BarKind::Io, _) => "io",
                (pcilibs::bar::BarKind::Mem32, false) => "mem32",
                (pcilibs::bar::BarKind::Mem32, true) => "pref32",
                (_, false) => "mem64",
                (_, true) => "pref64",
            };
            out.push(format!("{}:{kind}", pcie_topology::units::fmt_size(b.size)));
        }
    }
    out
}

/// The spare ports' profile: every resource of every device placed on a spare (each of
/// them fits a port made for all of them), else one of the named profiles.
fn spare_profile(devices: &[DeviceSpec], rng: &mut fastrand::Rng) -> Option<String> {
    let items: Vec<String> =
        devices.iter().filter(|d| d.place == Placement::Spare).flat_map(profile_items).collect();
    if items.is_empty() {
        let named = ["nic", "nvswitch", "a100", "h100"];
        return Some(named[rng.usize(..named.len())].to_string());
    }
    Some(items.join(","))
}

/// A BAR no port of the scenario can take: four times the largest sum of any device's or
/// the profile's resources, rounded up to a power of two.
fn no_fit_size(devices: &[DeviceSpec], profile: Option<&str>) -> u64 {
    let device_total = |d: &DeviceSpec| {
        let m = super::models::model(d.kind, d.bar_size.map(|b| b.0));
        m.bars.iter().map(|b| b.size).sum::<u64>().saturating_mul(u64::from(d.functions))
    };
    let mut largest = devices.iter().map(device_total).max().unwrap_or(0);
    if let Some(p) = profile.and_then(|p| pcie_topology::HotplugProfile::parse(p).ok()) {
        largest = largest.max(p.resources.iter().map(|r| r.resource.size).sum());
    }
    largest.max(1 << 20).saturating_mul(4).checked_next_power_of_two().unwrap_or(1 << 62)
}

/// How one scenario ended under the random rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum Verdict {
    /// Booted, every port window and every BAR as planned.
    Passed,
    /// The planner refused it before boot with this (typed) error.
    Refused(String),
    /// Anything else: what went wrong first.
    Failed(String),
}

impl Verdict {
    /// Whether the rule held (passed or refused before boot).
    pub fn ok(&self) -> bool {
        !matches!(self, Verdict::Failed(_))
    }
}

/// One scenario's verdict with its report (none when the planner refused it).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Checked {
    /// The scenario's name.
    pub scenario: String,
    /// Its platform, as `x86_64 ovmf`.
    pub platform: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What the guest run reported, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ScenarioReport>,
}

fn platform_name(s: &Scenario) -> String {
    format!("{} {}", s.arch, s.firmware().name())
}

/// Plans `s` as its runner will; `Err` is the planner's refusal, and a panic in the
/// planner is a failure, not a refusal.
fn plan_first(s: &Scenario, ctx: &RunContext) -> Result<(), Verdict> {
    let memory_mib = GuestSpec::new(s.arch).firmware(s.firmware()).memory_mib;
    let root = ctx.stack.root().map_err(|e| Verdict::Failed(format!("stack root: {e}")))?;
    match catch_unwind(AssertUnwindSafe(|| planned::make_plan_for(s, memory_mib, Some(&root)))) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Verdict::Refused(e)),
        Err(_) => Err(Verdict::Failed("the planner panicked".into())),
    }
}

/// The first thing that went wrong in a report, `None` when it passed.
fn first_failure(r: &ScenarioReport) -> Option<String> {
    if r.ok() {
        return None;
    }
    let row: Option<&Row> = r.rows.iter().find(|row| !row.ok);
    let why = r.error.clone().or_else(|| row.map(|row| format!("{}: {}", row.device, row.result)));
    Some(why.unwrap_or_else(|| "no rows".into()))
}

/// Checks one scenario under the random rule: a planner refusal is decided before any
/// boot, the others run in a guest.
pub fn check_one(s: &Scenario, ctx: &RunContext) -> Checked {
    let mut c = Checked {
        scenario: s.name.clone(),
        platform: platform_name(s),
        verdict: Verdict::Passed,
        report: None,
    };
    if let Err(v) = plan_first(s, ctx) {
        if let (true, Verdict::Refused(why)) = (ctx.progress, &v) {
            eprintln!("[{}] refused before boot: {why}", s.name);
        }
        c.verdict = v;
        return c;
    }
    let report = super::run_scenario(s, ctx);
    if ctx.progress {
        let verdict = if report.ok() { "passed" } else { "FAILED" };
        eprintln!("[{}] {verdict} in {:.1} s", s.name, report.wall_ms as f64 / 1000.0);
    }
    if let Some(why) = first_failure(&report) {
        c.verdict = Verdict::Failed(why);
    }
    c.report = Some(report);
    c
}

/// Runs `scenarios` under the random rule ([`check_one`]), `jobs` at a time, starting
/// none after `deadline`; returns the verdicts of those that ran, in the order given.
pub fn run_checked(
    scenarios: &[Scenario],
    ctx: &RunContext,
    jobs: usize,
    deadline: Option<Instant>,
) -> Vec<Checked> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<Checked>>> = Mutex::new(vec![None; scenarios.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, scenarios.len().max(1)) {
            scope.spawn(|| loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                let i = {
                    let mut n = next.lock().unwrap_or_else(PoisonError::into_inner);
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(s) = scenarios.get(i) else { return };
                let checked = check_one(s, ctx);
                let mut r = results.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(slot) = r.get_mut(i) {
                    *slot = Some(checked);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(PoisonError::into_inner).into_iter().flatten().collect()
}

/// A failure's kind: its text without numbers and addresses, so that a smaller scenario
/// failing at another port or BAR size still counts as the same failure.
fn signature(why: &str) -> String {
    let first = why.lines().next().unwrap_or("");
    let words: Vec<&str> = first
        .split_whitespace()
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .filter(|w| !w.ends_with(':') || w.len() > 4)
        .collect();
    words.join(" ")
}

/// Scenarios one step smaller than `s`, the most promising first: one device fewer, one
/// function fewer, a BAR a sixteenth or half the size, a spare port fewer, no group, no
/// native hotplug.
pub fn smaller(s: &Scenario) -> Vec<Scenario> {
    let mut out = Vec::new();
    let with = |f: &dyn Fn(&mut Scenario)| {
        let mut t = s.clone();
        f(&mut t);
        t
    };
    if s.devices.len() > 1 {
        for i in 0..s.devices.len() {
            out.push(with(&|t| {
                t.devices.remove(i);
            }));
        }
    }
    for i in 0..s.devices.len() {
        let d = &s.devices[i];
        if d.functions > 1 {
            out.push(with(&|t| t.devices[i].functions = 1));
            if d.functions > 2 {
                out.push(with(&|t| t.devices[i].functions = d.functions / 2));
            }
        }
        if let Some(Size(bar)) = d.bar_size {
            for div in [16, 2] {
                if bar / div >= 1 << BAR_SHIFTS.start() {
                    out.push(with(&|t| t.devices[i].bar_size = Some(Size(bar / div))));
                }
            }
        }
        if d.group.is_some() {
            out.push(with(&|t| t.devices[i].group = None));
        }
    }
    let on_spares = s.devices.iter().filter(|d| d.place == Placement::Spare).count() as u32;
    if s.spare_ports > on_spares {
        out.push(with(&|t| {
            t.spare_ports -= 1;
            if t.spare_ports == 0 {
                t.spare_profile = None;
            }
        }));
    }
    if s.native_hotplug {
        out.push(with(&|t| t.native_hotplug = false));
    }
    out.retain(|t| t.validate().is_ok());
    out
}

/// Limits of a shrink.
#[derive(Clone, Copy, Debug)]
pub struct ShrinkLimits {
    /// Guest runs at most.
    pub runs: usize,
    /// Wall time at most.
    pub time: Duration,
}

/// Shrinks a scenario that failed with `why`: takes the first smaller scenario
/// ([`smaller`]) that still fails the same way, again and again, within `limits`
/// (candidates run `jobs` at a time). Returns the smallest one found and its failure.
pub fn shrink(
    failing: &Scenario,
    why: &str,
    ctx: &RunContext,
    jobs: usize,
    limits: ShrinkLimits,
) -> (Scenario, String) {
    let begun = Instant::now();
    let want = signature(why);
    let mut best = (failing.clone(), why.to_string());
    let mut runs = 0;
    'outer: loop {
        let candidates = smaller(&best.0);
        for batch in candidates.chunks(jobs.max(1)) {
            if runs >= limits.runs || begun.elapsed() >= limits.time {
                break 'outer;
            }
            let batch: Vec<Scenario> = batch
                .iter()
                .enumerate()
                .map(|(k, c)| Scenario { name: format!("{}-s{}", failing.name, runs + k), ..c.clone() })
                .collect();
            runs += batch.len();
            let checked = run_checked(&batch, ctx, jobs, None);
            let still = batch.iter().zip(&checked).find_map(|(c, r)| match &r.verdict {
                Verdict::Failed(w) if signature(w) == want => Some((c.clone(), w.clone())),
                _ => None,
            });
            if let Some((c, w)) = still {
                if ctx.progress {
                    eprintln!("[{}] shrunk: {} devices, still failing: {w}", failing.name, c.devices.len());
                }
                best = (Scenario { name: failing.name.clone(), ..c }, w);
                continue 'outer;
            }
        }
        break;
    }
    best
}

/// The folder of the shrunk failures: `xtask/scenarios/regressions`.
pub fn regressions_dir() -> PathBuf {
    crate::scenario::default_dir().join("regressions")
}

/// The regression scenarios, by file name (none when the folder is missing).
pub fn regression_files() -> std::io::Result<Vec<PathBuf>> {
    let dir = regressions_dir();
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Writes a shrunk failure as a scenario file into `dir` (named after the scenario),
/// with the seed and the failure as comments; returns its path.
pub fn write_regression(dir: &Path, s: &Scenario, seed: u64, why: &str) -> Result<PathBuf, String> {
    let text = toml::to_string(s).map_err(|e| format!("{}: {e}", s.name))?;
    let mut out = format!(
        "# Shrunk from the random scenario of seed {seed} (`cargo xtask e2e --random 1 --seed {seed}`).\n# It failed: {}\n",
        why.lines().next().unwrap_or("")
    );
    out.push_str(&text);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{}.toml", s.name));
    std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    Scenario::load(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Per platform: scenarios run, passed in a guest, refused before boot, failed.
pub fn counts(checked: &[Checked]) -> Table {
    let mut t = Table::new(["platform", "scenarios", "passed in a guest", "refused before boot", "failed"]);
    for (arch, fw) in PLATFORMS {
        let name = format!("{arch} {}", fw.name());
        let mine: Vec<&Checked> = checked.iter().filter(|c| c.platform == name).collect();
        let n = |f: &dyn Fn(&Verdict) -> bool| mine.iter().filter(|c| f(&c.verdict)).count().to_string();
        t.row([
            name.clone(),
            mine.len().to_string(),
            n(&|v| *v == Verdict::Passed),
            n(&|v| matches!(v, Verdict::Refused(_))),
            n(&|v| matches!(v, Verdict::Failed(_))),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_scenario() {
        for seed in [0, 1, 7, 1 << 40, u64::MAX] {
            assert_eq!(generate(seed), generate(seed));
            assert_eq!(generate(seed).name, format!("random-{seed}"));
        }
        assert_ne!(generate(5).devices, generate(9).devices);
    }

    #[test]
    fn generated_scenarios_are_valid_and_cover_every_dimension() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..2000u64 {
            let s = generate(seed);
            s.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let planned = s.devices.iter().filter(|d| d.expect == PlugExpect::Visible).count();
            assert!((1..=8).contains(&planned), "seed {seed}: {planned} devices");
            seen.insert(format!("{} {}", s.arch, s.firmware().name()));
            seen.insert(format!("mode {}", s.mode.name()));
            for d in &s.devices {
                seen.insert(format!("kind {}", d.kind.name()));
                if let Some(Size(b)) = d.bar_size {
                    if d.expect == PlugExpect::Visible {
                        assert!((4 << 10..=256 << 30).contains(&b), "seed {seed}: {b}");
                    }
                    seen.insert(format!("bar {b}"));
                }
                seen.insert(format!("functions {}", d.functions));
                if d.place == Placement::Spare {
                    seen.insert(format!("spare {:?}", d.expect));
                }
                if d.group.is_some() {
                    seen.insert("group".into());
                }
                if d.numa_node.is_some() {
                    seen.insert("numa node".into());
                }
            }
        }
        for want in [
            "x86_64 seabios",
            "x86_64 ovmf",
            "aarch64 none",
            "aarch64 uefi",
            "mode root-port",
            "mode switch-port",
            "mode numa",
            "kind ivshmem",
            "kind e1000e",
            "kind nvme",
            "kind virtio-net",
            "kind virtio-blk",
            "bar 4096",
            "bar 274877906944",
            "functions 8",
            "spare Visible",
            "spare NoFit",
            "group",
            "numa node",
        ] {
            assert!(seen.contains(want), "no scenario with {want}");
        }
    }

    #[test]
    fn a_scenario_survives_its_file() {
        let dir = tempfile::tempdir().unwrap();
        for seed in 0..40 {
            let s = generate(seed);
            let path = write_regression(dir.path(), &s, seed, "a failure\nmore").unwrap();
            let back = Scenario::load(&path).unwrap();
            assert_eq!(Scenario { source: s.source.clone(), ..back }, s, "seed {seed}");
        }
    }

    #[test]
    fn smaller_scenarios_are_smaller_and_valid() {
        let size = |s: &Scenario| {
            let bars: u64 = s.devices.iter().filter_map(|d| d.bar_size).map(|b| b.0).sum();
            let functions: u32 = s.devices.iter().map(|d| u32::from(d.functions)).sum();
            let groups = s.devices.iter().filter(|d| d.group.is_some()).count();
            (s.devices.len(), functions, bars, s.spare_ports, groups, s.native_hotplug)
        };
        for seed in 0..200 {
            let s = generate(seed);
            for t in smaller(&s) {
                t.validate().unwrap();
                let (a, b) = (size(&s), size(&t));
                assert!(b != a && (b.0 <= a.0 && b.1 <= a.1 && b.3 <= a.3), "seed {seed}: {a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn regression_scenarios_parse() {
        let files = regression_files().unwrap();
        assert!(files.len() >= 4, "{files:?}");
        for f in files {
            Scenario::load(&f).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn signatures_ignore_numbers() {
        assert_eq!(
            signature("d1: port 00:03.0 has no 64-bit prefetchable window (planned 64G)"),
            signature("d0: port 00:05.0 has no 64-bit prefetchable window (planned 16G)\nnotes")
        );
        assert_ne!(signature("planning: too large"), signature("boot: timed out"));
    }
}

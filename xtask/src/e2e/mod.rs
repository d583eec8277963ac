//! `cargo xtask e2e`: runs scenarios in real guests and reports one table row per device.
//!
//! Each scenario ([`crate::scenario::Scenario`]) boots its own guest; independent guests
//! run in parallel ([`run_all`], two at a time by default on this project's 2-core
//! machines). [`run_scenario`] is the dispatch point: it picks the runner of the
//! scenario's mode, and every runner returns a [`ScenarioReport`] whose [`Row`]s join the
//! common table ([`render`]) and JSON file.
//!
//! The runners are this module's children ([`planned`] for the root-port, switch, NUMA and
//! ccw modes, [`nested`] for `nested-vfio`), so they use its report types without an
//! import circle. A new mode plugs in with a [`crate::scenario::Mode`] variant, its runner
//! as a child module, and one arm in [`run_scenario`] calling the runner with the scenario
//! and the [`RunContext`]; its rows
//! use the same columns (device, planned path, guest BDF, BARs ok, hotplug ms, unplug ms,
//! result) and set `ok` for the exit status.

pub mod kata;
pub mod models;
pub mod nested;
pub mod planned;
pub mod random;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::scenario::{Mode, Scenario};
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::stacks::Stack;
use guest_harness::table::Table;

/// One device (or one check) of a scenario: a row of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    /// The device (QEMU id of function 0) or the check.
    pub device: String,
    /// Where the plan put it: the guest PCI path, the ccw bus id, or the zPCI address.
    pub planned: String,
    /// Where the guest showed it (BDF or bus id; `-` when it never did).
    pub guest: String,
    /// Every BAR assigned inside its port's window (`None`: not checked or no BARs).
    pub bars_ok: Option<bool>,
    /// From the first QMP command of the plug to the guest showing the device.
    pub hotplug_ms: Option<u128>,
    /// From `device_del` to both QEMU (`DEVICE_DELETED`) and the guest saying it is gone.
    pub unplug_ms: Option<u128>,
    /// Whether every check of this row passed.
    pub ok: bool,
    /// `ok`, or what went wrong (first line shown in the table).
    pub result: String,
    /// Details: BAR addresses and windows, kernel messages, states the engine went through.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Row {
    /// A row for `device` with nothing measured yet.
    pub fn new(device: impl Into<String>) -> Self {
        Row { device: device.into(), guest: "-".into(), ..Row::default() }
    }

    /// Marks the row failed with `why` (keeps an earlier failure's text first).
    pub fn fail(&mut self, why: impl Into<String>) {
        let why = why.into();
        if self.ok || self.result.is_empty() {
            self.result = why;
        } else {
            self.notes.push(why);
        }
        self.ok = false;
    }
}

/// Boots `spec` with the stack's assets for `scenario` and records in `report` what ran:
/// the versions, QEMU's command line (also written to `dir/qemu.txt`), the accelerator
/// and the boot time.
pub(crate) fn boot_recorded(
    scenario: &Scenario,
    spec: &GuestSpec,
    ctx: &RunContext,
    dir: &Path,
    report: &mut ScenarioReport,
) -> Result<Guest, String> {
    let assets = GuestAssets::ensure(&ctx.stack, scenario.arch).map_err(|e| e.to_string())?;
    report.set_versions(scenario, &assets);
    let guest = Guest::boot(spec, &assets).map_err(|e| e.to_string())?;
    report.qemu = guest.command_line();
    report.accel = guest.accel().qemu_name().into();
    report.boot_ms = guest.boot_time().map(|d| d.as_millis());
    let file = dir.join("qemu.txt");
    std::fs::write(&file, format!("{}\n", report.qemu)).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(guest)
}

/// What one scenario did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub scenario: String,
    /// The file it came from.
    pub file: String,
    /// Guest architecture.
    pub arch: String,
    /// Firmware.
    pub firmware: String,
    /// Mode.
    pub mode: String,
    /// Accelerator the guest ran on (`tcg`, `kvm`).
    pub accel: String,
    /// The stack it ran on.
    pub stack: String,
    /// QEMU's version (`--version`).
    pub qemu_version: String,
    /// The firmware with its version (`SeaBIOS 1.16.2-1`, `OVMF 2022.11-6+deb12u2`).
    pub firmware_version: String,
    /// Guest kernel release.
    pub kernel: String,
    /// Guest kernel package and version.
    pub kernel_version: String,
    /// From starting QEMU to the guest's READY.
    pub boot_ms: Option<u128>,
    /// Whole scenario, provisioning of its assets to the last unplug.
    pub wall_ms: u128,
    /// The rows.
    pub rows: Vec<Row>,
    /// A failure of the scenario as a whole (plan, boot, QMP), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The QEMU command line.
    pub qemu: String,
}

impl ScenarioReport {
    /// A report for `scenario` with nothing run yet.
    pub fn new(scenario: &Scenario) -> Self {
        ScenarioReport {
            scenario: scenario.name.clone(),
            file: scenario.source.display().to_string(),
            arch: scenario.arch.to_string(),
            firmware: scenario.firmware().name().into(),
            mode: scenario.mode.name().into(),
            ..ScenarioReport::default()
        }
    }

    /// Fills in the stack, QEMU and firmware versions from the stack's root (before the
    /// guest's kernel is provisioned, so a run whose kernel fails still names them).
    pub fn set_stack(&mut self, scenario: &Scenario, stack: &Stack) {
        self.stack = stack.name().into();
        if let Ok(root) = stack.root() {
            let versions = root.versions();
            self.qemu_version = versions.qemu.clone();
            self.firmware_version = versions.firmware(scenario.firmware(), scenario.arch);
        }
    }

    /// Fills in the stack, QEMU, firmware and kernel versions from the guest's assets.
    pub fn set_versions(&mut self, scenario: &Scenario, assets: &GuestAssets) {
        self.stack = assets.versions.stack.clone();
        self.qemu_version = assets.versions.qemu.clone();
        self.firmware_version = assets.versions.firmware(scenario.firmware(), scenario.arch);
        self.kernel = assets.kernel.release.clone();
        self.kernel_version = format!("{} {}", assets.kernel.package, assets.kernel.version);
    }

    /// Whether the scenario passed: no scenario-level error, at least one row, every row ok.
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.rows.is_empty() && self.rows.iter().all(|r| r.ok)
    }
}

/// What every runner gets besides its scenario.
#[derive(Clone, Debug)]
pub struct RunContext {
    /// The stack every guest runs on: QEMU, firmware, guest kernels and busybox.
    pub stack: Stack,
    /// Where runs keep their files (`target/e2e/run`); each scenario uses
    /// `<run_dir>/<scenario name>/` (journal, plan).
    pub run_dir: PathBuf,
    /// Print progress lines.
    pub progress: bool,
    /// Unplug every device again after the plug checks (planned modes). Random runs,
    /// which test where BARs land, skip it to run more scenarios in the same time.
    pub unplug: bool,
}

impl RunContext {
    /// A context for `stack`, keeping files in `target/e2e/run/<stack>`, with progress.
    pub fn new(stack: Stack) -> Self {
        let run_dir = guest_harness::e2e_dir().join("run").join(stack.name());
        RunContext { stack, run_dir, progress: true, unplug: true }
    }

    /// The folder of one scenario's files, emptied first.
    pub fn scenario_dir(&self, scenario: &Scenario) -> std::io::Result<PathBuf> {
        let safe: String = scenario
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let dir = self.run_dir.join(safe);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// Runs one scenario with the runner of its mode. This is where modes plug in.
pub fn run_scenario(scenario: &Scenario, ctx: &RunContext) -> ScenarioReport {
    let begun = Instant::now();
    let mut report = match scenario.mode {
        Mode::RootPort | Mode::SwitchPort | Mode::Numa | Mode::Ccw => planned::run(scenario, ctx),
        Mode::NestedVfio => nested::run(scenario, ctx),
        Mode::Kata => kata::run(scenario, ctx),
    };
    if report.qemu_version.is_empty() {
        report.set_stack(scenario, &ctx.stack);
    }
    report.wall_ms = begun.elapsed().as_millis();
    report
}

/// Runs `scenarios`, at most `parallel` guests at a time, and returns the reports in the
/// order given.
pub fn run_all(scenarios: &[Scenario], ctx: &RunContext, parallel: usize) -> Vec<ScenarioReport> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<ScenarioReport>>> = Mutex::new(vec![None; scenarios.len()]);
    std::thread::scope(|scope| {
        for _ in 0..parallel.clamp(1, scenarios.len().max(1)) {
            scope.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(s) = scenarios.get(i) else { return };
                let report = run_scenario(s, ctx);
                if ctx.progress {
                    let verdict = if report.ok() { "passed" } else { "FAILED" };
                    eprintln!("[{}] {verdict} in {:.1} s", s.name, report.wall_ms as f64 / 1000.0);
                }
                let mut r = results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(slot) = r.get_mut(i) {
                    *slot = Some(report);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    results
        .into_iter()
        .zip(scenarios)
        .map(|(r, s)| {
            r.unwrap_or_else(|| ScenarioReport {
                error: Some("the scenario's thread ended without a report".into()),
                ..ScenarioReport::new(s)
            })
        })
        .collect()
}

fn ms(v: Option<u128>) -> String {
    v.map_or_else(|| "-".into(), |ms| ms.to_string())
}

fn bars(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

/// The report as text: per scenario a heading and its table, then notes of failed rows.
pub fn render(reports: &[ScenarioReport]) -> String {
    let mut out = String::new();
    for r in reports {
        let verdict = if r.ok() { "PASS" } else { "FAIL" };
        out.push_str(&format!(
            "== {} ({} {}, {}, {}, boot {} ms, {:.1} s) {verdict}\n   stack {}: QEMU {}, {}, kernel {} ({})\n",
            r.scenario,
            r.arch,
            r.firmware,
            r.mode,
            dash(&r.accel),
            ms(r.boot_ms),
            r.wall_ms as f64 / 1000.0,
            dash(&r.stack),
            dash(&r.qemu_version),
            dash(&r.firmware_version),
            dash(&r.kernel),
            dash(&r.kernel_version),
        ));
        let mut t = Table::new([
            "device",
            "planned path",
            "guest BDF",
            "BARs ok",
            "hotplug ms",
            "unplug ms",
            "result",
        ]);
        for row in &r.rows {
            t.row([
                row.device.clone(),
                row.planned.clone(),
                row.guest.clone(),
                bars(row.bars_ok).to_string(),
                ms(row.hotplug_ms),
                ms(row.unplug_ms),
                row.result.lines().next().unwrap_or("").to_string(),
            ]);
        }
        if !t.is_empty() {
            out.push_str(&t.render());
        }
        if let Some(e) = &r.error {
            out.push_str(&format!("scenario error: {e}\n"));
        }
        for row in r.rows.iter().filter(|row| !row.ok) {
            out.push_str(&format!("  {}: {}\n", row.device, row.result));
            for n in &row.notes {
                out.push_str(&format!("    {n}\n"));
            }
        }
        out.push('\n');
    }
    out.push_str(&summary(reports).render());
    let passed = reports.iter().filter(|r| r.ok()).count();
    out.push_str(&format!("{passed} of {} scenarios passed\n", reports.len()));
    out
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// One row per scenario: what it ran on (stack, QEMU, firmware, kernel) and its result.
pub fn summary(reports: &[ScenarioReport]) -> Table {
    let mut t = Table::new(["scenario", "stack", "QEMU", "firmware", "kernel", "s", "result"]);
    for r in reports {
        let result = if r.ok() {
            "PASS".to_string()
        } else {
            let why = r
                .error
                .as_deref()
                .or_else(|| r.rows.iter().find(|row| !row.ok).map(|row| row.result.as_str()));
            format!("FAIL: {}", why.and_then(|w| w.lines().next()).unwrap_or("no rows"))
        };
        t.row([
            r.scenario.clone(),
            dash(&r.stack).to_string(),
            dash(&r.qemu_version).to_string(),
            dash(&r.firmware_version).to_string(),
            dash(&r.kernel).to_string(),
            format!("{:.0}", r.wall_ms as f64 / 1000.0),
            result,
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_row_fails_the_scenario() {
        let mut r = ScenarioReport { scenario: "s".into(), ..ScenarioReport::default() };
        assert!(!r.ok(), "no rows is no proof");
        let mut row = Row::new("gpu0");
        row.ok = true;
        row.result = "ok".into();
        r.rows.push(row.clone());
        assert!(r.ok());
        row.fail("BAR 2 unassigned");
        row.fail("second problem");
        assert_eq!(row.result, "BAR 2 unassigned");
        assert_eq!(row.notes, vec!["second problem".to_string()]);
        r.rows.push(row);
        assert!(!r.ok());
        r.stack = "trixie".into();
        r.qemu_version = "10.0.6 (Debian 1:10.0.6+ds-0+deb13u2)".into();
        r.firmware_version = "SeaBIOS 1.16.3-2".into();
        r.kernel = "6.12.117+deb13-amd64".into();
        let text = render(&[r]);
        assert!(
            text.contains("FAIL") && text.contains("BAR 2 unassigned") && text.contains("0 of 1"),
            "{text}"
        );
        // The heading and the summary row name every version.
        for want in [
            "stack trixie: QEMU 10.0.6",
            "SeaBIOS 1.16.3-2",
            "6.12.117+deb13-amd64",
            "FAIL: BAR 2 unassigned",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}

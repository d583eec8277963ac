//! `cargo xtask e2e`: runs scenarios in real guests and reports one table row per device.
//!
//! Each scenario ([`crate::scenario::Scenario`]) boots its own guest; independent guests
//! run in parallel ([`run_all`], two at a time by default on this project's 2-core
//! machines). [`run_scenario`] is the dispatch point: it picks the runner of the
//! scenario's mode, and every runner returns a [`ScenarioReport`] whose [`Row`]s join the
//! common table ([`render`]) and JSON file.
//!
//! A new mode plugs in with a [`crate::scenario::Mode`] variant and one arm in
//! [`run_scenario`] calling its runner with the scenario and the [`RunContext`]; its rows
//! use the same columns (device, planned path, guest BDF, BARs ok, hotplug ms, unplug ms,
//! result) and set `ok` for the exit status.

pub mod models;
pub mod planned;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use crate::debs::DebCache;
use crate::scenario::{Mode, Scenario};
use crate::table::Table;

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
    /// Guest kernel release.
    pub kernel: String,
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

    /// Whether the scenario passed: no scenario-level error, at least one row, every row ok.
    pub fn ok(&self) -> bool {
        self.error.is_none() && !self.rows.is_empty() && self.rows.iter().all(|r| r.ok)
    }
}

/// What every runner gets besides its scenario.
#[derive(Clone, Debug)]
pub struct RunContext {
    /// Guest kernels and busybox.
    pub cache: DebCache,
    /// Where runs keep their files (`target/e2e/run`); each scenario uses
    /// `<run_dir>/<scenario name>/` (journal, plan).
    pub run_dir: PathBuf,
    /// Print progress lines.
    pub progress: bool,
}

impl RunContext {
    /// The default context: `target/e2e/cache` and `target/e2e/run`, with progress.
    pub fn new() -> Self {
        RunContext { cache: crate::cache(), run_dir: crate::e2e_dir().join("run"), progress: true }
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

impl Default for RunContext {
    fn default() -> Self {
        RunContext::new()
    }
}

/// Runs one scenario with the runner of its mode. This is where modes plug in.
pub fn run_scenario(scenario: &Scenario, ctx: &RunContext) -> ScenarioReport {
    let begun = Instant::now();
    let mut report = match scenario.mode {
        Mode::RootPort | Mode::SwitchPort | Mode::Numa | Mode::Ccw => planned::run(scenario, ctx),
        Mode::NestedVfio => crate::nested::run(scenario, ctx),
    };
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
            "== {} ({} {}, {}, {}, kernel {}, boot {} ms, {:.1} s) {verdict}\n",
            r.scenario,
            r.arch,
            r.firmware,
            r.mode,
            if r.accel.is_empty() { "-" } else { &r.accel },
            if r.kernel.is_empty() { "-" } else { &r.kernel },
            ms(r.boot_ms),
            r.wall_ms as f64 / 1000.0
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
    let passed = reports.iter().filter(|r| r.ok()).count();
    out.push_str(&format!("{passed} of {} scenarios passed\n", reports.len()));
    out
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
        let text = render(&[r]);
        assert!(
            text.contains("FAIL") && text.contains("BAR 2 unassigned") && text.contains("0 of 1"),
            "{text}"
        );
    }
}

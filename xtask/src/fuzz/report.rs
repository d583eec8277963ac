//! What a fuzzing run did, read from libFuzzer's output, and the tables printed for it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use guest_harness::table::Table;

/// Coverage of a corpus, as libFuzzer reports it once the corpus has run (`INITED`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Covered code edges (`cov`).
    pub cov: u64,
    /// Features (`ft`: edges with hit counts, comparisons, …).
    pub features: u64,
    /// Inputs kept in the corpus (`corp`).
    pub corpus: u64,
}

/// Counts of the fork-mode status lines: out-of-memory inputs, timeouts and crashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Inputs over the memory bound.
    pub ooms: u64,
    /// Inputs over the per-input deadline.
    pub timeouts: u64,
    /// Inputs that crashed (a panic is a crash).
    pub crashes: u64,
}

/// The last status line of a fork-mode run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForkStats {
    /// Inputs run.
    pub runs: u64,
    /// Findings counted.
    pub counts: Counts,
}

/// One artifact of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `crash`, `timeout`, `oom`, `slow-unit`, `leak`, or `reproducer` (an input of
    /// `fuzz/reproducers` that still fails).
    pub kind: String,
    /// Where and why it fails when replayed (the panic's place and message, or libFuzzer's
    /// verdict).
    pub what: String,
    /// The reproducer.
    pub input: PathBuf,
}

/// The report of one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetReport {
    /// Target name.
    pub target: String,
    /// Seconds fuzzed.
    pub seconds: u64,
    /// Inputs run.
    pub runs: u64,
    /// Inputs per second.
    pub execs_per_second: u64,
    /// Coverage of both corpora before the run.
    pub coverage_before: Coverage,
    /// Coverage of both corpora after the run.
    pub coverage_after: Coverage,
    /// Findings as the fork-mode status line counted them.
    pub counted: Counts,
    /// Time of the slowest corpus input, replayed alone, in milliseconds.
    pub slowest_ms: u64,
    /// The slowest corpus input.
    pub slowest_input: Option<PathBuf>,
    /// Every artifact, replayed.
    pub findings: Vec<Finding>,
    /// libFuzzer's log of the run.
    pub log: PathBuf,
    /// Exit status of the fuzzing process.
    pub exit: String,
}

impl TargetReport {
    /// No crash, timeout or out-of-memory input.
    pub fn clean(&self) -> bool {
        self.findings.is_empty() && self.counted == Counts::default()
    }
}

/// The number after `key` (`cov: 123` gives 123 for `cov:`).
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(key).nth(1)?;
    let word = rest.split_whitespace().next()?;
    word.split('/').next()?.parse().ok()
}

/// Coverage from the `INITED` line of a corpus run (zero when there is none).
pub fn coverage(text: &str) -> Coverage {
    text.lines()
        .find(|l| l.contains("INITED cov:"))
        .map(|l| Coverage {
            cov: number_after(l, "cov:").unwrap_or(0),
            features: number_after(l, "ft:").unwrap_or(0),
            corpus: number_after(l, "corp:").unwrap_or(0),
        })
        .unwrap_or_default()
}

/// Runs and finding counts from the last fork-mode status line
/// (`#8792: cov: 4667 ft: 14416 corp: 176 exec/s: 58 oom/timeout/crash: 7/0/0 time: 39s`).
pub fn fork_stats(text: &str) -> ForkStats {
    let Some(line) = text.lines().rev().find(|l| l.starts_with('#') && l.contains("oom/timeout/crash:"))
    else {
        return ForkStats::default();
    };
    let runs = line.trim_start_matches('#').split(':').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let counts: Vec<u64> = line
        .split("oom/timeout/crash:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(|w| w.split('/').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    let at = |i: usize| counts.get(i).copied().unwrap_or(0);
    ForkStats { runs, counts: Counts { ooms: at(0), timeouts: at(1), crashes: at(2) } }
}

/// `(milliseconds, file)` of every `Executed FILE in N ms` line.
pub fn executed(text: &str) -> Vec<(u64, PathBuf)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Executed ")?;
            let (file, time) = rest.rsplit_once(" in ")?;
            let ms = time.strip_suffix(" ms")?.trim().parse().ok()?;
            Some((ms, PathBuf::from(file)))
        })
        .collect()
}

/// Why a replayed input failed: the panic's place and first line of its message, or
/// libFuzzer's verdict (timeout, out-of-memory, deadly signal).
pub fn failure(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.contains("panicked at ")) {
        let place =
            lines.get(i).and_then(|l| l.split("panicked at ").nth(1)).unwrap_or("").trim_end_matches(':');
        let message = lines.get(i + 1).copied().unwrap_or("").trim();
        let message: String = message.chars().take(200).collect();
        return Some(format!("panic at {place}: {message}"));
    }
    lines.iter().find_map(|l| l.split("ERROR: libFuzzer: ").nth(1)).map(|v| v.chars().take(200).collect())
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// One row per target: inputs run, coverage gained, findings, the slowest input.
pub fn render(reports: &[TargetReport]) -> String {
    let mut t = Table::new([
        "target",
        "seconds",
        "inputs run",
        "inputs/s",
        "coverage (edges)",
        "features",
        "corpus",
        "crashes",
        "timeouts",
        "ooms",
        "slowest input",
    ]);
    for r in reports {
        let kind = |k: &str| r.findings.iter().filter(|f| f.kind == k).count() as u64;
        let (b, a) = (r.coverage_before, r.coverage_after);
        t.row([
            r.target.clone(),
            r.seconds.to_string(),
            r.runs.to_string(),
            r.execs_per_second.to_string(),
            format!("{} -> {} (+{})", b.cov, a.cov, a.cov.saturating_sub(b.cov)),
            format!("{} -> {}", b.features, a.features),
            format!("{} -> {}", b.corpus, a.corpus),
            kind("crash").max(r.counted.crashes).to_string(),
            kind("timeout").max(r.counted.timeouts).to_string(),
            kind("oom").max(r.counted.ooms).to_string(),
            kind("reproducer").to_string(),
            match &r.slowest_input {
                Some(p) => format!("{} ms ({})", r.slowest_ms, file_name(p)),
                None => "-".to_string(),
            },
        ]);
    }
    t.render()
}

impl Finding {
    /// What findings of one cause share: the kind and the panic's place, or libFuzzer's
    /// verdict without its numbers (`out-of-memory (used: 990Mb; …)` → `out-of-memory`).
    pub fn cause(&self) -> String {
        let what = match self.what.strip_prefix("panic at ") {
            Some(rest) => format!("panic at {}", rest.split(": ").next().unwrap_or(rest)),
            None => self.what.split(" (").next().unwrap_or(&self.what).to_string(),
        };
        format!("{} {what}", self.kind)
    }
}

/// The findings grouped by cause: how many, the first one's text and the smallest
/// reproducer (empty text when there is none).
pub fn render_findings(reports: &[TargetReport]) -> String {
    let mut t = Table::new(["target", "kind", "inputs", "what (first)", "smallest reproducer"]);
    for r in reports {
        let mut causes: Vec<String> = r.findings.iter().map(Finding::cause).collect();
        causes.sort();
        causes.dedup();
        for cause in causes {
            let same: Vec<&Finding> = r.findings.iter().filter(|f| f.cause() == cause).collect();
            let size = |f: &&&Finding| std::fs::metadata(&f.input).map_or(u64::MAX, |m| m.len());
            let smallest =
                same.iter().min_by_key(size).map(|f| f.input.display().to_string()).unwrap_or_default();
            let first = same.first().map(|f| (f.kind.clone(), f.what.chars().take(160).collect::<String>()));
            let (kind, what) = first.unwrap_or_default();
            t.row([r.target.clone(), kind, same.len().to_string(), what, smallest]);
        }
    }
    if t.is_empty() {
        "no crash, timeout or out-of-memory input".to_string()
    } else {
        t.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_lines() {
        let inited = "INFO: seed corpus: files: 180\n#181\tINITED cov: 4662 ft: 14431 corp: 167/936b exec/s: 0 rss: 41Mb\n";
        assert_eq!(coverage(inited), Coverage { cov: 4662, features: 14431, corpus: 167 });
        assert_eq!(coverage("nothing"), Coverage::default());
        let fork = "#382: cov: 4667 ft: 14436 corp: 167 exec/s: 191 oom/timeout/crash: 0/0/0 time: 2s job: 1\n\
                    #8792: cov: 4667 ft: 14416 corp: 176 exec/s: 58 oom/timeout/crash: 7/1/2 time: 39s job: 10\n\
                    INFO: exiting: 71 time: 42s\n";
        assert_eq!(
            fork_stats(fork),
            ForkStats { runs: 8792, counts: Counts { ooms: 7, timeouts: 1, crashes: 2 } }
        );
        let replay = "Running: /c/a\nExecuted /c/a in 3 ms\nExecuted /c/b c in 16 ms\n";
        assert_eq!(executed(replay), vec![(3, PathBuf::from("/c/a")), (16, PathBuf::from("/c/b c"))]);
        let panic = "Running: x\n\nthread '<unnamed>' (6291) panicked at src/checks.rs:101:13:\nrp0 does not fit\nstack";
        assert_eq!(failure(panic).as_deref(), Some("panic at src/checks.rs:101:13: rp0 does not fit"));
        let oom = "==1== ERROR: libFuzzer: out-of-memory (used: 2179Mb; limit: 2048Mb)\n";
        assert_eq!(failure(oom).as_deref(), Some("out-of-memory (used: 2179Mb; limit: 2048Mb)"));
        let f =
            |kind: &str, what: &str| Finding { kind: kind.into(), what: what.into(), input: PathBuf::new() };
        assert_eq!(f("oom", "out-of-memory (used: 990Mb; limit: 512Mb)").cause(), "oom out-of-memory");
        assert_eq!(
            f("crash", "panic at src/a.rs:5:3: dev1 does not fit").cause(),
            "crash panic at src/a.rs:5:3"
        );
    }
}

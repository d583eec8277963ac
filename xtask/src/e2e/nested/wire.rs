//! What the host hands to the program in the outer guest, and the result lines it prints.
//!
//! The host writes an [`InnerConfig`] as JSON into the outer guest's initramfs. The
//! program answers with one line per finding on its standard output, which the host reads
//! back through the reporter's command channel (`@@XT OUT <id> …`):
//!
//! ```text
//! NV LOG <text>                     progress, also copied to the console as it happens
//! NV INFO <key> <value>             facts about the run (backend, inner boot time, …)
//! NV ROW <json>                     one table row (WireRow)
//! ```
//!
//! Lines without the `NV ` tag (QEMU's or the kernel's words) are kept as notes.

use serde::{Deserialize, Serialize};

use crate::e2e::Row;
use guest_harness::launcher::Launcher;
use guest_harness::stacks::Versions;

/// Tag at the start of every result line.
pub const TAG: &str = "NV";

/// One device to pass through, as the outer guest has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassDevice {
    /// Scenario id; the inner plan uses it as the QEMU id of function 0.
    pub id: String,
    /// Model name in the scenario (`ivshmem`, `nvme`, `e1000e`).
    pub kind: String,
    /// Slot of the outer root port on `pcie.0` that holds the device.
    pub port_slot: u8,
    /// Number of functions: all in one slot, hence one IOMMU group; for `nvme`, the PF
    /// and its SR-IOV VFs (more than one: the VFs are passed through, see [`Self::vfs`]).
    pub functions: u8,
    /// Unplug with the inner guest's CPUs stopped: the unplug must end pending at its
    /// deadline, and `cont` must let the late `DEVICE_DELETED` finish it.
    pub stopped_unplug: bool,
}

impl PassDevice {
    /// SR-IOV VFs to create and pass through instead of the device itself: an `nvme` with
    /// more than one function is its PF plus that many VFs.
    pub fn vfs(&self) -> u8 {
        if self.kind == "nvme" {
            self.functions.saturating_sub(1)
        } else {
            0
        }
    }
}

/// The inner guest's kernel, as copied into the outer guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InnerKernel {
    /// The image inside the outer guest.
    pub image: String,
    /// Its release (`uname -r`).
    pub release: String,
    /// Debian package name and version, for reports.
    pub package: String,
    /// Package version.
    pub version: String,
}

/// Everything the program in the outer guest needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InnerConfig {
    /// Devices, in scenario order.
    pub devices: Vec<PassDevice>,
    /// Kernel for the inner guest.
    pub kernel: InnerKernel,
    /// Inner guest RAM in MiB (all of it is pinned for VFIO DMA).
    pub memory_mib: u32,
    /// Extra words for the inner guest's kernel command line.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// How long an unplug waits for `DEVICE_DELETED`.
    pub unplug_timeout_ms: u64,
    /// How long the inner guest may take to boot, or to show or drop a device.
    pub guest_wait_s: u64,
    /// The scenario asks for iommufd: the legacy container running is a failure.
    #[serde(default)]
    pub require_iommufd: bool,
    /// How to start the inner QEMU (the stack's, at its paths in the outer guest).
    pub qemu: Launcher,
    /// What the stack runs, for reports.
    #[serde(default)]
    pub versions: Versions,
}

/// A table row as it travels over the console (the same columns as [`Row`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRow {
    /// Device or check.
    pub device: String,
    /// Planned place.
    pub planned: String,
    /// Where it was seen.
    pub guest: String,
    /// BARs as expected.
    pub bars_ok: Option<bool>,
    /// Hotplug time.
    pub hotplug_ms: Option<u128>,
    /// Unplug time.
    pub unplug_ms: Option<u128>,
    /// Passed.
    pub ok: bool,
    /// `ok …` or the first problem.
    pub result: String,
    /// Details.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl WireRow {
    /// A row for `device`, nothing measured yet, not passed.
    pub fn new(device: impl Into<String>) -> Self {
        WireRow { device: device.into(), guest: "-".into(), ..WireRow::default() }
    }

    /// Marks the row passed with `what` as its result, unless it already failed.
    pub fn pass(&mut self, what: impl Into<String>) {
        if self.result.is_empty() {
            self.ok = true;
            self.result = what.into();
        }
    }

    /// Marks the row failed; the first failure stays the result, later ones become notes.
    pub fn fail(&mut self, why: impl Into<String>) {
        let why = why.into();
        if self.ok || self.result.is_empty() {
            self.result = why;
        } else {
            self.notes.push(why);
        }
        self.ok = false;
    }

    /// The result line: `NV ROW <json>`.
    pub fn line(&self) -> String {
        let json = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"device\":\"unencodable row: {e}\"}}"));
        format!("{TAG} ROW {json}")
    }
}

impl From<WireRow> for Row {
    fn from(w: WireRow) -> Row {
        Row {
            device: w.device,
            planned: w.planned,
            guest: w.guest,
            bars_ok: w.bars_ok,
            hotplug_ms: w.hotplug_ms,
            unplug_ms: w.unplug_ms,
            ok: w.ok,
            result: w.result,
            notes: w.notes,
        }
    }
}

/// One line the program printed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Line {
    /// Progress.
    Log(String),
    /// A fact about the run.
    Info {
        /// Key.
        key: String,
        /// Value (rest of the line).
        value: String,
    },
    /// A table row.
    Row(WireRow),
    /// A line that is not part of the protocol, or a row that did not parse.
    Other(String),
}

/// Parses one output line.
pub fn parse(line: &str) -> Line {
    let Some(rest) = line.strip_prefix(TAG).and_then(|r| r.strip_prefix(' ')) else {
        return Line::Other(line.to_string());
    };
    let (tag, body) = rest.split_once(' ').unwrap_or((rest, ""));
    match tag {
        "LOG" => Line::Log(body.to_string()),
        "INFO" => {
            let (key, value) = body.split_once(' ').unwrap_or((body, ""));
            Line::Info { key: key.to_string(), value: value.to_string() }
        }
        "ROW" => match serde_json::from_str(body) {
            Ok(row) => Line::Row(row),
            Err(e) => Line::Other(format!("unreadable row ({e}): {body}")),
        },
        _ => Line::Other(line.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_the_trip() {
        let mut row = WireRow::new("gpu0");
        row.planned = "00.0/01/00".into();
        row.hotplug_ms = Some(1234);
        row.bars_ok = Some(true);
        row.pass("ok");
        row.fail("BAR 2 unassigned");
        row.fail("later");
        assert_eq!(row.result, "BAR 2 unassigned");
        assert_eq!(row.notes, ["later"]);
        assert_eq!(parse(&row.line()), Line::Row(row.clone()));
        let r: Row = row.into();
        assert!(!r.ok);
        assert_eq!(r.hotplug_ms, Some(1234));
    }

    #[test]
    fn other_lines() {
        assert_eq!(parse("NV LOG binding 0000:01:00.0"), Line::Log("binding 0000:01:00.0".into()));
        assert_eq!(
            parse("NV INFO backend legacy container"),
            Line::Info { key: "backend".into(), value: "legacy container".into() }
        );
        assert!(matches!(parse("NV ROW {not json"), Line::Other(t) if t.contains("unreadable")));
        assert_eq!(parse("qemu: warning"), Line::Other("qemu: warning".into()));
        assert_eq!(parse("NVX ROW"), Line::Other("NVX ROW".into()));
    }

    #[test]
    fn pass_does_not_override_a_failure() {
        let mut row = WireRow::new("x");
        row.fail("broken");
        row.pass("ok");
        assert!(!row.ok);
        assert_eq!(row.result, "broken");
    }
}

//! Journal files: any bytes as the journal a restarted engine opens. The reading entry
//! point is `qmp_hotplug::journal::Journal::open` (then `journal::fold`, what
//! `Engine::open` recovers from); the two calls are in `open` and `fold` below, so the
//! target follows a change of the journal format by changing those two functions.
//! Promises checked: no panic; a journal that does not read is a typed `JournalError`
//! with a message; one that reads can be compacted, and the compacted file reads back
//! with the same devices; a record appended to it reads back too.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pcie_hotplug_fuzz::sysfs_tree::Scratch;
use qmp_hotplug::journal::{self, Journal, JournalError, OpKind, Record};
use qmp_hotplug::{DeviceRecord, DeviceState};

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| Scratch::new().expect("a scratch directory"))
}

/// Opens the journal file and returns it with what it records.
fn open(path: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
    Journal::open(path, None)
}

/// The devices the records leave on each port.
fn fold(records: &[Record]) -> BTreeMap<String, DeviceRecord> {
    journal::fold(records).into_iter().map(|(port, log)| (port, log.device)).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = scratch().fresh("journal") else { return };
    let path: PathBuf = dir.join("vm.journal");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let (mut j, records) = match open(&path) {
        Ok(x) => x,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let devices = fold(&records);
    // Compaction keeps one snapshot per device that is not removed; the file it writes
    // must read back, with the same devices.
    j.compact(devices.values()).unwrap_or_else(|e| panic!("compaction of a journal that reads: {e}"));
    drop(j);
    let (mut j, again) =
        open(&path).unwrap_or_else(|e| panic!("a compacted journal does not read back: {e}"));
    let kept: Vec<&DeviceRecord> = devices.values().filter(|d| d.state != DeviceState::Removed).collect();
    assert_eq!(again.len(), kept.len(), "one snapshot per device kept");
    let consistent = devices.iter().all(|(port, d)| port == d.port());
    if consistent {
        let folded = fold(&again);
        let want: BTreeMap<String, DeviceRecord> =
            kept.iter().map(|d| (d.port().to_string(), (*d).clone())).collect();
        assert_eq!(folded, want, "the compacted journal folds to other devices");
    }
    // An append after that reads back as one more record.
    let extra = Record::Begin { port: "fuzz-port".into(), op: OpKind::Unplug, request: None };
    j.append(&extra).unwrap_or_else(|e| panic!("append to a compacted journal: {e}"));
    drop(j);
    let (_, last) =
        open(&path).unwrap_or_else(|e| panic!("a journal with one more record does not read: {e}"));
    assert_eq!(last.len(), again.len() + 1);
});

//! Journal files: any bytes as the journal a restarted engine opens. The reading entry
//! points are `qmp_hotplug::journal::read_bytes` (the bytes alone) and `Journal::open`
//! on a file, then `journal::fold` (what `Engine::open` recovers from).
//! Promises checked: no panic; a journal that does not read is a typed error with a
//! message; the bytes read the same through the file as alone; a journal that opens
//! can be compacted, and the compacted file opens with the same ports (devices,
//! operations under way and their steps); a record appended after that opens too.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pcie_hotplug_fuzz::sysfs_tree::Scratch;
use qmp_hotplug::journal::{self, Journal, OpKind, PortLog, Record};
use qmp_hotplug::DeviceState;

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| Scratch::new().expect("a scratch directory"))
}

/// The ports compaction keeps: those that hold a device or have an operation under way.
fn live(ports: &BTreeMap<String, PortLog>) -> BTreeMap<String, PortLog> {
    ports
        .iter()
        .filter(|(_, p)| p.device.state != DeviceState::Removed || p.open_op.is_some())
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let alone = match journal::read_bytes(data) {
        Ok(back) => {
            assert!(back.valid_len <= data.len() as u64, "valid length past the end");
            assert_eq!(back.report.records, back.records.len());
            Some(back.records)
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    };
    let Ok(dir) = scratch().fresh("journal") else { return };
    let path: PathBuf = dir.join("vm.journal");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let (mut j, records) = match Journal::open(&path, None) {
        Ok(x) => x,
        Err(e) => {
            assert!(alone.is_none(), "the bytes read alone but not as a file: {e}");
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(alone.as_ref(), Some(&records), "the file reads other records than its bytes");
    let ports = journal::fold(&records);
    // Compaction keeps one snapshot per live port; the file it writes must open, with
    // the same ports.
    j.compact().unwrap_or_else(|e| panic!("compaction of a journal that opens: {e}"));
    drop(j);
    let (mut j, again) =
        Journal::open(&path, None).unwrap_or_else(|e| panic!("a compacted journal does not open: {e}"));
    let kept = live(&ports);
    assert_eq!(again.len(), kept.len(), "one snapshot per live port");
    let consistent = ports.iter().all(|(port, p)| port.as_str() == p.device.request.port.as_str());
    if consistent {
        assert_eq!(live(&journal::fold(&again)), kept, "the compacted journal folds to other ports");
    }
    // An append after that opens as one more record.
    let extra = Record::Begin { port: "fuzz-port".into(), op: OpKind::Unplug, request: None };
    j.append(&extra).unwrap_or_else(|e| panic!("append to a compacted journal: {e}"));
    drop(j);
    let (_, last) = Journal::open(&path, None)
        .unwrap_or_else(|e| panic!("a journal with one more record does not open: {e}"));
    assert_eq!(last.len(), again.len() + 1);
});

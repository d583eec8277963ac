//! The journal: an append-only file of JSON lines, each written and `fsync`ed before the
//! QMP step it announces, so that a new process can tell what a dead one was doing.
//!
//! A torn last line (the process died inside `write`) is dropped on open; the step it
//! announced was never sent. [`Journal::compact`] replaces the file atomically
//! (temporary file, `fsync`, `rename`, `fsync` of the directory) with one snapshot record
//! per port that still holds a device.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::request::DeviceRequest;
use crate::state::{DeviceRecord, DeviceState, GuestAddress, Transition};

/// Largest journal read on open.
const MAX_JOURNAL_BYTES: u64 = 256 * 1024 * 1024;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Opening, reading, writing or syncing failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A complete line is not a journal record.
    #[error("journal {path}, line {line}: {message}")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file is larger than this crate reads.
    #[error("journal {0} is larger than 256 MiB")]
    TooLarge(PathBuf),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, JournalError>;

/// The kind of operation a `Begin` record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OpKind {
    /// Plugging a device.
    Plug,
    /// Unplugging a device.
    Unplug,
    /// Reconciling after a restart.
    Recover,
}

/// A QMP step, journaled before it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Step {
    /// `getfd` of a named descriptor.
    GetFd {
        /// The name.
        fdname: String,
    },
    /// `object-add`.
    ObjectAdd {
        /// The object id.
        id: String,
    },
    /// `device_add`.
    DeviceAdd {
        /// The device id.
        id: String,
    },
    /// `device_del`.
    DeviceDel {
        /// The device id.
        id: String,
    },
    /// `object-del`.
    ObjectDel {
        /// The object id.
        id: String,
    },
    /// `closefd`.
    CloseFd {
        /// The name.
        fdname: String,
    },
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Record {
    /// An operation begins on a port; a plug carries the request.
    Begin {
        /// The port.
        port: String,
        /// Which operation.
        op: OpKind,
        /// The request (plugs only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<Box<DeviceRequest>>,
    },
    /// A QMP step is about to be sent.
    Step {
        /// The port.
        port: String,
        /// The step.
        #[serde(flatten)]
        step: Step,
    },
    /// The device on a port changed state.
    State {
        /// The port.
        port: String,
        /// The transition.
        #[serde(flatten)]
        transition: Transition,
        /// Guest addresses, with `visible`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        guest: Vec<(String, GuestAddress)>,
    },
    /// The whole record of a port (written by compaction).
    Snapshot {
        /// The record.
        device: Box<DeviceRecord>,
    },
}

/// When a [`JournalHook`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookPoint {
    /// Record N is about to be written: everything before it (including the QMP step the
    /// previous record announced) has happened, record N has not.
    BeforeWrite,
    /// Record N is durable; the step it announces has not been sent yet.
    Durable,
}

/// A callback run around each record with the record's number in this process (1 for
/// the first). Used for observability and for fault injection: a test can end the
/// process at any point between two records.
pub type JournalHook = Arc<dyn Fn(HookPoint, u64) + Send + Sync>;

/// What the journal says about one port.
#[derive(Debug, Clone, PartialEq)]
pub struct PortLog {
    /// The device record as folded from the journal.
    pub device: DeviceRecord,
    /// The operation under way when the journal ends, if any.
    pub open_op: Option<OpKind>,
    /// Steps journaled since that operation began.
    pub steps: Vec<Step>,
}

/// An open journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
    appended: u64,
    hook: Option<JournalHook>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).field("appended", &self.appended).finish()
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` and returns it with its records.
    pub fn open(path: impl AsRef<Path>, hook: Option<JournalHook>) -> Result<(Journal, Vec<Record>)> {
        let path = path.as_ref().to_owned();
        let io = |source| JournalError::Io { path: path.clone(), source };
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_JOURNAL_BYTES {
            return Err(JournalError::TooLarge(path));
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        if complete < text.len() {
            // A torn tail was never durable and its step never sent: cut it off.
            file.set_len(u64::try_from(complete).unwrap_or(0)).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let mut records = Vec::new();
        let body = text.get(..complete).unwrap_or_default();
        for (n, line) in body.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let rec = serde_json::from_slice(line).map_err(|e| JournalError::Corrupt {
                path: path.clone(),
                line: n + 1,
                message: e.to_string(),
            })?;
            records.push(rec);
        }
        Ok((Journal { path, file, appended: 0, hook }, records))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and makes it durable before returning.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_vec(record)
            .map_err(|e| JournalError::Io { path: self.path.clone(), source: std::io::Error::other(e) })?;
        line.push(b'\n');
        if let Some(h) = &self.hook {
            h(HookPoint::BeforeWrite, self.appended + 1);
        }
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.appended += 1;
        if let Some(h) = &self.hook {
            h(HookPoint::Durable, self.appended);
        }
        Ok(())
    }

    /// Replaces the file with one snapshot per device that is not removed.
    pub fn compact<'a>(&mut self, devices: impl IntoIterator<Item = &'a DeviceRecord>) -> Result<()> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let tmp = self.path.with_extension("compact-tmp");
        let mut out = File::create(&tmp).map_err(io)?;
        for d in devices.into_iter().filter(|d| d.state != DeviceState::Removed) {
            let rec = Record::Snapshot { device: Box::new(d.clone()) };
            let mut line = serde_json::to_vec(&rec).map_err(|e| io(std::io::Error::other(e)))?;
            line.push(b'\n');
            out.write_all(&line).map_err(io)?;
        }
        out.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io)?;
        Ok(())
    }
}

/// Folds records into the state of each port.
pub fn fold(records: &[Record]) -> BTreeMap<String, PortLog> {
    let mut ports: BTreeMap<String, PortLog> = BTreeMap::new();
    for rec in records {
        match rec {
            Record::Begin { port, op, request } => {
                if let Some(req) = request {
                    let device = DeviceRecord {
                        request: (**req).clone(),
                        state: DeviceState::Planned,
                        history: Vec::new(),
                        guest: Vec::new(),
                    };
                    ports.insert(port.clone(), PortLog { device, open_op: Some(*op), steps: Vec::new() });
                } else if let Some(p) = ports.get_mut(port) {
                    p.open_op = Some(*op);
                    p.steps.clear();
                }
            }
            Record::Step { port, step } => {
                if let Some(p) = ports.get_mut(port) {
                    p.steps.push(step.clone());
                }
            }
            Record::State { port, transition, guest } => {
                if let Some(p) = ports.get_mut(port) {
                    p.device.state = transition.state;
                    p.device.history.push(transition.clone());
                    if !guest.is_empty() {
                        p.device.guest = guest.clone();
                    }
                    if transition.state.settled() {
                        p.open_op = None;
                        p.steps.clear();
                    }
                }
            }
            Record::Snapshot { device } => {
                let port = device.request.port.clone();
                ports.insert(port, PortLog { device: (**device).clone(), open_op: None, steps: Vec::new() });
            }
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
        /// A journal file of any content opens or is a typed error: never a panic.
        #[test]
        fn any_journal_file_opens_or_errs(bytes in proptest::collection::vec(any::<u8>(), 0..2048), lines in proptest::collection::vec("[ -~]{0,80}", 0..6)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal");
            let mut content = bytes;
            for l in lines {
                content.extend_from_slice(l.as_bytes());
                content.push(b'\n');
            }
            std::fs::write(&path, &content).unwrap();
            let _ = Journal::open(&path, None);
        }
    }

    use super::*;
    use crate::state::now_ms;

    /// A `State` record for `port`.
    fn state_record(port: &str, state: DeviceState, note: impl Into<String>) -> Record {
        Record::State {
            port: port.to_owned(),
            transition: Transition { state, at_unix_ms: now_ms(), note: note.into() },
            guest: Vec::new(),
        }
    }

    fn req(port: &str) -> DeviceRequest {
        serde_json::from_value(serde_json::json!({
            "port": port, "functions": [{"qdev": {"driver": "e1000e", "id": format!("d-{port}")}}]
        }))
        .unwrap()
    }

    #[test]
    fn append_fold_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, recs) = Journal::open(&path, None).unwrap();
        assert!(recs.is_empty());
        j.append(&Record::Begin {
            port: "rp0".into(),
            op: OpKind::Plug,
            request: Some(Box::new(req("rp0"))),
        })
        .unwrap();
        j.append(&state_record("rp0", DeviceState::Adding, "")).unwrap();
        j.append(&Record::Step { port: "rp0".into(), step: Step::DeviceAdd { id: "d-rp0".into() } }).unwrap();
        drop(j);
        // A process dying inside write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"record":"state","port":"rp0","sta"#).unwrap();
        drop(f);
        let (mut j, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(recs.len(), 3);
        let ports = fold(&recs);
        let p = &ports["rp0"];
        assert_eq!(p.device.state, DeviceState::Adding);
        assert_eq!(p.open_op, Some(OpKind::Plug));
        assert_eq!(p.steps, vec![Step::DeviceAdd { id: "d-rp0".into() }]);
        // Appending after the cut gives a readable file again.
        j.append(&state_record("rp0", DeviceState::Visible, "")).unwrap();
        let (_, recs) = Journal::open(&path, None).unwrap();
        let ports = fold(&recs);
        assert_eq!(ports["rp0"].device.state, DeviceState::Visible);
        assert_eq!(ports["rp0"].open_op, None);
    }

    #[test]
    fn compact_keeps_live_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c2 = Arc::clone(&count);
        let hook: JournalHook = Arc::new(move |point, n| {
            if point == HookPoint::Durable {
                c2.store(n, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let (mut j, _) = Journal::open(&path, Some(hook)).unwrap();
        for port in ["a", "b"] {
            j.append(&Record::Begin {
                port: port.into(),
                op: OpKind::Plug,
                request: Some(Box::new(req(port))),
            })
            .unwrap();
            j.append(&state_record(port, DeviceState::Visible, "")).unwrap();
        }
        j.append(&state_record("b", DeviceState::Removed, "")).unwrap();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 5);
        let (_, recs) = Journal::open(&path, None).unwrap();
        let ports = fold(&recs);
        j.compact(ports.values().map(|p| &p.device)).unwrap();
        let (_, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(recs.len(), 1);
        let again = fold(&recs);
        assert_eq!(again["a"].device, ports["a"].device);
        assert!(!again.contains_key("b"));
    }

    #[test]
    fn corrupt_complete_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(matches!(Journal::open(&path, None), Err(JournalError::Corrupt { line: 1, .. })));
    }
}

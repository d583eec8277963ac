//! The journal: an append-only file of records, each written and `fsync`ed before the
//! QMP step it announces, so that a new process can tell what a dead one was doing.
//!
//! # Format (version 2)
//!
//! A header line `qmp-hotplug journal 2`, then one line per record:
//!
//! ```text
//! R <length: 8 hex digits> <CRC-32 of the length digits and the payload: 8 hex digits> <payload>\n
//! ```
//!
//! The payload is the record as compact JSON (which never holds a newline), at most
//! [`MAX_RECORD_BYTES`]. A record counts when its line is complete and its length and
//! checksum agree; so
//!
//! * a torn append (the process or the machine died inside `write`) leaves a tail that
//!   is no complete record: reading reports it ([`ReadReport::torn_tail`]) and
//!   opening the journal for writing ([`crate::Engine::open`]) cuts it off; the step it announced was never sent;
//! * a failed append (a full disk, an I/O error) is cut off by the writer at once, and if
//!   even that fails, before anything else is written, so it never sits between records;
//! * a damaged line followed by good records (flipped bytes) is skipped and reported
//!   ([`ReadReport::damaged`]), and every other record is kept;
//! * before a record is written it is read back from its encoding and must come back
//!   equal and within the size limit: nothing is written that cannot be read.
//!
//! Journals of the first format (bare JSON lines) are read as before and rewritten in
//! this one when opened.
//!
//! # Records
//!
//! A plug's `begin` record carries its [`PlugRequest`] in the
//! request's serde form (`device_add` argument maps): journals written before requests
//! were typed read unchanged, and a request comes back typed (ids, addresses, host
//! functions checked when read). Guest addresses are written as address text and read in
//! that form or the `{"bus", "slot", "function"}` form of earlier journals. A descriptor
//! the caller held is recorded by its name only (see [`FdRequest`](crate::FdRequest)).
//!
//! The engine writes the journal; this module's public part reads one, for tools:
//! [`read_file`] (without changing it) and [`fold`] (what it says about each port).
//!
//! # Compaction
//!
//! Compaction replaces the file with one [`Record::Snapshot`] per port that
//! holds a device or has an operation under way. The engine compacts on open and, while
//! running, whenever the file has grown by [`crate::EngineOptions::journal_compact_bytes`] since the last
//! compaction (1 MiB by default), so a journal never grows with the number of operations.
//! The new file is written to a temporary file next to the journal and named after it
//! (`<journal>.compact-tmp`, so journals sharing a directory never share one), `fsync`ed,
//! renamed over the journal, and the directory is `fsync`ed before anything more is
//! appended. A process killed at any point leaves the old file or the new one, each
//! folding to the same state.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::files::{self, Access, FileKind};
use crate::request::PlugRequest;
use crate::state::{DeviceRecord, DeviceState, GuestAddresses, Transition};

/// Largest journal read on open.
pub const MAX_JOURNAL_BYTES: u64 = 256 * 1024 * 1024;

/// Largest record payload written or read.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Growth after which a running journal is compacted, by default.
pub const DEFAULT_COMPACT_BYTES: u64 = 1024 * 1024;

/// The first line of a version 2 journal.
pub(crate) const HEADER: &[u8] = b"qmp-hotplug journal 2\n";

/// Bytes of a record line before its payload: `R`, length, checksum and three spaces.
const FRAME_HEAD: usize = 20;

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
    /// A complete, intact line is not a journal record (a first-format line that is not
    /// JSON, or a record of a kind this version does not know).
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
    /// The path is not a regular file (a FIFO, a device, a socket, a directory, or a
    /// symbolic link, which is not followed); refused before anything is read from it.
    #[error("journal {path} is a {kind}, not a regular file")]
    SpecialFile {
        /// The journal path.
        path: PathBuf,
        /// What it is.
        kind: FileKind,
    },
    /// The file holds neither a journal nor nothing: it is left untouched.
    #[error("{0} is not a journal of this crate")]
    UnknownFormat(PathBuf),
    /// A record could not be written because it would not read back as written (too
    /// large, or nested deeper than the reader takes); nothing was written.
    #[error("journal {path}: a record would not read back ({reason}); nothing was written")]
    Unwritable {
        /// The journal file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The live state does not fit in [`MAX_JOURNAL_BYTES`] even after compaction.
    #[error("journal {0} would pass 256 MiB even after compaction")]
    Full(PathBuf),
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
        request: Option<Box<PlugRequest>>,
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
        #[serde(
            default,
            skip_serializing_if = "Vec::is_empty",
            deserialize_with = "crate::state::guest_addresses"
        )]
        guest: GuestAddresses,
    },
    /// The whole record of a port (written by compaction), with the operation under way
    /// on it and that operation's steps, so that compacting at any moment loses nothing
    /// recovery needs.
    Snapshot {
        /// The record.
        device: Box<DeviceRecord>,
        /// The operation under way (absent in snapshots of journals before version 2,
        /// which were only written with none under way).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op: Option<OpKind>,
        /// Steps journaled since that operation began.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        steps: Vec<Step>,
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
    /// Compaction N (1 for the first in this process) has written and synced its
    /// temporary file; the journal is not replaced yet.
    CompactWritten,
    /// Compaction N has replaced the journal and synced its directory.
    Compacted,
}

/// A callback run around each record with the record's number in this process (1 for
/// the first), and around each compaction with its number. Used for observability and
/// for fault injection: a test can end the process at any point between two records.
pub type JournalHook = Arc<dyn Fn(HookPoint, u64) + Send + Sync>;

/// What the journal says about one port ([`fold`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PortLog {
    /// The device record as folded from the journal.
    pub device: DeviceRecord,
    /// The operation under way when the journal ends, if any.
    pub open_op: Option<OpKind>,
    /// Steps journaled since that operation began.
    pub steps: Vec<Step>,
}

/// Which format a journal file was in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// No records and no complete header (a new file).
    #[default]
    Empty,
    /// The first format: one JSON record per line, no checksums.
    JsonLines,
    /// Version 2: a header, then framed, checksummed records.
    Framed,
}

/// A stretch of a journal file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Span {
    /// Offset of its first byte.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What reading a journal found besides its records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadReport {
    /// The file's format.
    pub format: Format,
    /// Records read.
    pub records: usize,
    /// Bytes after the last complete record (a torn or failed append, or damage at the
    /// end): never a record, discarded.
    pub torn_tail: Option<Span>,
    /// Damaged lines (a header or records whose length or checksum do not agree) followed
    /// by good records: skipped, the records around them kept.
    pub damaged: Vec<Span>,
}

/// A journal file as read: its records, what was wrong, and where appending goes on.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReadBack {
    /// Every complete record, in order.
    pub records: Vec<Record>,
    /// What was found besides them.
    pub report: ReadReport,
    /// Bytes up to the end of the last complete record (or header): where the next
    /// record goes once the torn tail is cut.
    pub valid_len: u64,
}

/// Why a journal's bytes could not be read ([`read_bytes`]).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BytesError {
    /// A complete, intact line is not a record.
    #[error("line {line}: {message}")]
    Corrupt {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Neither a journal nor empty.
    #[error("not a journal of this crate")]
    UnknownFormat,
    /// More than [`MAX_JOURNAL_BYTES`].
    #[error("larger than {MAX_JOURNAL_BYTES} bytes")]
    TooLarge,
}

/// Reads a journal from its bytes: the read-back path of [`crate::Engine::open`] and
/// [`read_file`], without a file (for fuzzing; tools read a file with [`read_file`]).
/// Never panics; memory is bounded by the input's size. Not part of the stable API.
#[doc(hidden)]
pub fn read_bytes(bytes: &[u8]) -> std::result::Result<ReadBack, BytesError> {
    if u64::try_from(bytes.len()).map_or(true, |n| n > MAX_JOURNAL_BYTES) {
        return Err(BytesError::TooLarge);
    }
    if bytes.is_empty() {
        return Ok(ReadBack { records: Vec::new(), report: ReadReport::default(), valid_len: 0 });
    }
    if bytes.starts_with(b"{") && !lines(bytes).any(|(_, l)| l.is_some_and(|l| frame(l).is_ok())) {
        return read_json_lines(bytes);
    }
    read_framed(bytes)
}

/// Each line with its offset: `Some(line)` without its newline when complete, `None` for
/// a last piece without one.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Option<&[u8]>)> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let rest = bytes.get(pos..).filter(|r| !r.is_empty())?;
        let at = pos;
        match rest.iter().position(|b| *b == b'\n') {
            Some(n) => {
                pos = pos.saturating_add(n).saturating_add(1);
                Some((at, rest.get(..n)))
            }
            None => {
                pos = bytes.len();
                Some((at, None))
            }
        }
    })
}

fn offset(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The first format: a torn last line is dropped, any other line must be a record.
fn read_json_lines(bytes: &[u8]) -> std::result::Result<ReadBack, BytesError> {
    let mut records = Vec::new();
    let mut valid_len = 0;
    for (n, (at, line)) in lines(bytes).enumerate() {
        let Some(line) = line else { break };
        valid_len = at.saturating_add(line.len()).saturating_add(1);
        if line.is_empty() {
            continue;
        }
        let rec = serde_json::from_slice(line)
            .map_err(|e| BytesError::Corrupt { line: n.saturating_add(1), message: e.to_string() })?;
        records.push(rec);
    }
    let torn = bytes.len().saturating_sub(valid_len);
    let report = ReadReport {
        format: Format::JsonLines,
        records: records.len(),
        torn_tail: (torn > 0).then(|| Span { offset: offset(valid_len), len: offset(torn) }),
        damaged: Vec::new(),
    };
    Ok(ReadBack { records, report, valid_len: offset(valid_len) })
}

/// Why a line is not a record.
enum FrameError {
    /// Its length or checksum do not agree: damaged or torn.
    Damaged,
    /// Intact, but not a record this version knows.
    Unreadable(String),
}

/// One record line (without its newline).
fn frame(line: &[u8]) -> std::result::Result<Record, FrameError> {
    let head = line.get(..FRAME_HEAD).ok_or(FrameError::Damaged)?;
    let payload = line.get(FRAME_HEAD..).unwrap_or_default();
    let hex = |r: std::ops::Range<usize>| -> Option<u32> {
        let digits = head.get(r)?;
        if !digits.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let shape = head.first() == Some(&b'R')
        && head.get(1) == Some(&b' ')
        && head.get(10) == Some(&b' ')
        && head.get(19) == Some(&b' ');
    let (Some(len), Some(crc)) = (hex(2..10), hex(11..19)) else { return Err(FrameError::Damaged) };
    if !shape || usize::try_from(len).ok() != Some(payload.len()) || payload.len() > MAX_RECORD_BYTES {
        return Err(FrameError::Damaged);
    }
    if checksum(head.get(2..10).unwrap_or_default(), payload) != crc {
        return Err(FrameError::Damaged);
    }
    serde_json::from_slice(payload).map_err(|e| FrameError::Unreadable(e.to_string()))
}

fn checksum(len_digits: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len_digits);
    h.update(payload);
    h.finalize()
}

/// Version 2: a header, then record lines; damaged lines are skipped when good records
/// follow them, and are the torn tail when none do.
fn read_framed(bytes: &[u8]) -> std::result::Result<ReadBack, BytesError> {
    let mut records = Vec::new();
    let mut damaged: Vec<Span> = Vec::new();
    let mut pending: Option<Span> = None;
    let mut valid_len = 0usize;
    let mut header_ok = false;
    for (n, (at, line)) in lines(bytes).enumerate() {
        let end = at.saturating_add(line.map_or(0, |l| l.len().saturating_add(1)));
        let bad = |pending: &mut Option<Span>| {
            let span_end = if line.is_some() { end } else { bytes.len() };
            let p = pending.get_or_insert(Span { offset: offset(at), len: 0 });
            p.len = offset(span_end).saturating_sub(p.offset);
        };
        let Some(line) = line else {
            bad(&mut pending);
            break;
        };
        if n == 0 {
            if HEADER.strip_suffix(b"\n") == Some(line) {
                header_ok = true;
                valid_len = end;
            } else {
                bad(&mut pending);
            }
            continue;
        }
        match frame(line) {
            Ok(rec) => {
                records.push(rec);
                damaged.extend(pending.take());
                valid_len = end;
            }
            Err(FrameError::Damaged) => bad(&mut pending),
            Err(FrameError::Unreadable(message)) => {
                return Err(BytesError::Corrupt { line: n.saturating_add(1), message })
            }
        }
    }
    let torn = bytes.len().saturating_sub(valid_len);
    let torn_header = !header_ok && records.is_empty() && HEADER.starts_with(bytes);
    if !header_ok && records.is_empty() && !torn_header {
        return Err(BytesError::UnknownFormat);
    }
    let report = ReadReport {
        format: if header_ok || !records.is_empty() { Format::Framed } else { Format::Empty },
        records: records.len(),
        torn_tail: (torn > 0).then(|| Span { offset: offset(valid_len), len: offset(torn) }),
        damaged,
    };
    Ok(ReadBack { records, report, valid_len: offset(valid_len) })
}

/// One record as a line of the file, checked to read back equal and within the limits.
pub(crate) fn encode(record: &Record) -> std::result::Result<Vec<u8>, String> {
    let payload = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    if payload.len() > MAX_RECORD_BYTES {
        return Err(format!("{} bytes, more than the {MAX_RECORD_BYTES}-byte limit", payload.len()));
    }
    if payload.contains(&b'\n') {
        return Err("the encoding holds a newline".into());
    }
    let back: Record = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
    if back != *record {
        return Err("it reads back different from what was written".into());
    }
    let len = format!("{:08x}", payload.len());
    let mut line = Vec::with_capacity(payload.len().saturating_add(FRAME_HEAD).saturating_add(1));
    line.extend_from_slice(b"R ");
    line.extend_from_slice(len.as_bytes());
    line.extend_from_slice(format!(" {:08x} ", checksum(len.as_bytes(), &payload)).as_bytes());
    line.extend_from_slice(&payload);
    line.push(b'\n');
    Ok(line)
}

/// Reads the journal at `path` without changing it (for tools that look at a journal an
/// engine may be using): the same checks as [`crate::Engine::open`], no repairs.
pub fn read_file(path: impl AsRef<Path>) -> Result<(Vec<Record>, ReadReport)> {
    let path = path.as_ref();
    let access = Access { no_follow: true, ..Access::READ };
    let mut file = files::open(path, access, &[FileKind::Regular]).map_err(|e| open_error(path, e))?;
    let bytes = read_all(path, &mut file)?;
    let back = read_bytes(&bytes).map_err(|e| parse_error(path, e))?;
    Ok((back.records, back.report))
}

fn open_error(path: &Path, e: files::OpenError) -> JournalError {
    match e {
        files::OpenError::Kind(kind) => JournalError::SpecialFile { path: path.to_owned(), kind },
        files::OpenError::Io(source) => JournalError::Io { path: path.to_owned(), source },
    }
}

fn parse_error(path: &Path, e: BytesError) -> JournalError {
    match e {
        BytesError::Corrupt { line, message } => {
            JournalError::Corrupt { path: path.to_owned(), line, message }
        }
        BytesError::UnknownFormat => JournalError::UnknownFormat(path.to_owned()),
        BytesError::TooLarge => JournalError::TooLarge(path.to_owned()),
    }
}

fn read_all(path: &Path, file: &mut File) -> Result<Vec<u8>> {
    files::read_bounded(file, MAX_JOURNAL_BYTES).map_err(|e| match e {
        files::ReadError::TooLarge => JournalError::TooLarge(path.to_owned()),
        files::ReadError::Io(source) => JournalError::Io { path: path.to_owned(), source },
    })
}

/// `fsync` of the directory that holds `path`, so that a created or renamed entry lasts.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
    let fd = rustix::fs::open(dir, flags, rustix::fs::Mode::empty())?;
    rustix::fs::fsync(&fd)?;
    Ok(())
}

/// An open journal file. Public, hidden, for the fuzz target that opens, compacts and
/// appends to any bytes; an engine is the way to use a journal.
#[doc(hidden)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of complete records (and header): where the next record goes.
    len: u64,
    /// `len` right after the last compaction (or open).
    base_len: u64,
    compact_bytes: u64,
    appended: u64,
    compactions: u64,
    hook: Option<JournalHook>,
    /// Every durable record folded, for compaction at any moment.
    ports: BTreeMap<String, PortLog>,
    opened: ReadReport,
    /// A failed append may have left bytes past `len` that could not be cut yet.
    tail_dirty: bool,
    /// The directory entry (a new file, a rename) is not known to be durable yet.
    dir_dirty: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("appended", &self.appended)
            .field("compactions", &self.compactions)
            .finish()
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` and returns it with its records.
    ///
    /// The path must be a regular file or absent: a FIFO, device, socket or symbolic
    /// link is refused ([`JournalError::SpecialFile`]) before anything is read, and at
    /// most [`MAX_JOURNAL_BYTES`] are read. A torn tail is cut off, a first-format
    /// journal is rewritten in version 2, and a new one gets its header; what was found
    /// is in [`Journal::read_report`].
    pub fn open(path: impl AsRef<Path>, hook: Option<JournalHook>) -> Result<(Journal, Vec<Record>)> {
        let path = path.as_ref().to_owned();
        let access = Access { write: true, append: true, create: true, truncate: false, no_follow: true };
        let mut file = files::open(&path, access, &[FileKind::Regular]).map_err(|e| open_error(&path, e))?;
        let bytes = read_all(&path, &mut file)?;
        let back = read_bytes(&bytes).map_err(|e| parse_error(&path, e))?;
        let mut journal = Journal {
            ports: fold(&back.records),
            path,
            file,
            len: back.valid_len,
            base_len: back.valid_len,
            compact_bytes: DEFAULT_COMPACT_BYTES,
            appended: 0,
            compactions: 0,
            hook,
            opened: back.report.clone(),
            tail_dirty: false,
            dir_dirty: bytes.is_empty(),
        };
        let path = journal.path.clone();
        let io = |source| JournalError::Io { path: path.clone(), source };
        match back.report.format {
            Format::JsonLines => journal.compact()?,
            Format::Empty => {
                journal.file.set_len(0).map_err(io)?;
                journal.file.write_all(HEADER).map_err(io)?;
                journal.file.sync_all().map_err(io)?;
                journal.len = offset(HEADER.len());
                journal.base_len = journal.len;
                journal.dir_dirty = true;
            }
            Format::Framed if back.report.torn_tail.is_some() => {
                // Never durable, its step never sent: cut it off.
                journal.cut_tail().map_err(io)?;
            }
            Format::Framed => {}
        }
        if journal.dir_dirty {
            sync_dir(&journal.path).map_err(io)?;
            journal.dir_dirty = false;
        }
        Ok((journal, back.records))
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What [`Journal::open`] found: the format, a torn tail cut off, damaged records
    /// skipped.
    pub(crate) fn read_report(&self) -> &ReadReport {
        &self.opened
    }

    /// Every port the journal knows, folded from every durable record.
    pub(crate) fn ports(&self) -> &BTreeMap<String, PortLog> {
        &self.ports
    }

    /// Bytes the file holds now.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.len
    }

    /// True when the file holds no record (only its header).
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len <= offset(HEADER.len())
    }

    /// Compactions this process has made.
    #[cfg(test)]
    fn compactions(&self) -> u64 {
        self.compactions
    }

    /// Compact before an append once the file has grown by `bytes` since the last
    /// compaction (0: before every append). Compaction writes every live port's record,
    /// so keep this well above their size (a few KiB per device).
    pub(crate) fn set_compact_bytes(&mut self, bytes: u64) {
        self.compact_bytes = bytes;
    }

    /// Appends one record and makes it durable before returning. A record that would
    /// not read back is refused before anything is written; a write that fails is cut
    /// off again, so the file still ends with the last good record.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let line =
            encode(record).map_err(|reason| JournalError::Unwritable { path: self.path.clone(), reason })?;
        self.make_room(offset(line.len()))?;
        let n = self.appended.saturating_add(1);
        if let Some(h) = &self.hook {
            h(HookPoint::BeforeWrite, n);
        }
        let written = self.file.write_all(&line).and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            if self.cut_tail().is_err() {
                self.tail_dirty = true;
            }
            return Err(JournalError::Io { path: self.path.clone(), source });
        }
        self.len = self.len.saturating_add(offset(line.len()));
        self.appended = n;
        apply(&mut self.ports, record);
        if let Some(h) = &self.hook {
            h(HookPoint::Durable, n);
        }
        Ok(())
    }

    /// Before an append: the file ends with its last good record and its directory entry
    /// is durable; compacts when due, and refuses when even compaction leaves no room.
    fn make_room(&mut self, line: u64) -> Result<()> {
        let io = |path: &Path, source| JournalError::Io { path: path.to_owned(), source };
        if self.tail_dirty {
            self.cut_tail().map_err(|e| io(&self.path, e))?;
        }
        if self.dir_dirty {
            sync_dir(&self.path).map_err(|e| io(&self.path, e))?;
            self.dir_dirty = false;
        }
        let grown = self.len.saturating_sub(self.base_len);
        if grown > 0 && grown >= self.compact_bytes {
            // A compaction that fails (a full disk) leaves the journal as it was; it is
            // tried again before the next append.
            let _ = self.compact();
            if self.dir_dirty {
                sync_dir(&self.path).map_err(|e| io(&self.path, e))?;
                self.dir_dirty = false;
            }
        }
        if self.len.saturating_add(line) > MAX_JOURNAL_BYTES {
            self.compact()?;
            if self.len.saturating_add(line) > MAX_JOURNAL_BYTES {
                return Err(JournalError::Full(self.path.clone()));
            }
        }
        Ok(())
    }

    /// Cuts the file back to its last good record.
    fn cut_tail(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_all()?;
        self.tail_dirty = false;
        Ok(())
    }

    /// The temporary file compaction writes: next to the journal, named after it.
    pub(crate) fn compact_tmp_path(&self) -> PathBuf {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".compact-tmp");
        self.path.with_file_name(name)
    }

    /// Replaces the file with one snapshot per port that holds a device or has an
    /// operation under way (temporary file, `fsync`, `rename`, `fsync` of the
    /// directory). On failure the journal is left as it was.
    pub fn compact(&mut self) -> Result<()> {
        let io = |path: &Path, source| JournalError::Io { path: path.to_owned(), source };
        let live: BTreeMap<String, PortLog> = self
            .ports
            .iter()
            .filter(|(_, p)| p.device.state != DeviceState::Removed || p.open_op.is_some())
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let mut body = HEADER.to_vec();
        for p in live.values() {
            let rec = Record::Snapshot {
                device: Box::new(p.device.clone()),
                op: p.open_op,
                steps: p.steps.clone(),
            };
            let line = encode(&rec)
                .map_err(|reason| JournalError::Unwritable { path: self.path.clone(), reason })?;
            body.extend_from_slice(&line);
        }
        if offset(body.len()) > MAX_JOURNAL_BYTES {
            return Err(JournalError::Full(self.path.clone()));
        }
        let tmp = self.compact_tmp_path();
        let access = Access { write: true, append: true, create: true, truncate: true, no_follow: true };
        let written = files::open(&tmp, access, &[FileKind::Regular])
            .map_err(|e| open_error(&tmp, e))
            .and_then(|mut out| {
                out.write_all(&body).and_then(|()| out.sync_all()).map_err(|e| io(&tmp, e))?;
                Ok(out)
            });
        let out = match written {
            Ok(out) => out,
            Err(e) => {
                // A stale temporary file is harmless (the next compaction truncates it),
                // but it takes room on a full disk.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let n = self.compactions.saturating_add(1);
        if let Some(h) = &self.hook {
            h(HookPoint::CompactWritten, n);
        }
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&self.path, e));
        }
        // The old file is gone: from here on the new one is the journal.
        self.file = out;
        self.len = offset(body.len());
        self.base_len = self.len;
        self.tail_dirty = false;
        self.ports = live;
        self.compactions = n;
        self.dir_dirty = true;
        sync_dir(&self.path).map_err(|e| io(&self.path, e))?;
        self.dir_dirty = false;
        if let Some(h) = &self.hook {
            h(HookPoint::Compacted, n);
        }
        Ok(())
    }
}

/// Folds records into the state of each port.
pub fn fold(records: &[Record]) -> BTreeMap<String, PortLog> {
    let mut ports = BTreeMap::new();
    for rec in records {
        apply(&mut ports, rec);
    }
    ports
}

/// Folds one more record into `ports`.
pub(crate) fn apply(ports: &mut BTreeMap<String, PortLog>, rec: &Record) {
    match rec {
        Record::Begin { port, op, request } => {
            if let Some(req) = request {
                let device = DeviceRecord::new((**req).clone(), DeviceState::Planned);
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
                p.device.push_history(transition.clone());
                if !guest.is_empty() {
                    p.device.guest = guest.clone();
                }
                if transition.state.settled() {
                    p.open_op = None;
                    p.steps.clear();
                }
            }
        }
        Record::Snapshot { device, op, steps } => {
            let port = device.request.port.to_string();
            ports.insert(port, PortLog { device: (**device).clone(), open_op: *op, steps: steps.clone() });
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use std::fs::OpenOptions;

    use super::*;
    use crate::state::now_ms;

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

        /// Any bytes after a valid journal's header read without a panic; whatever reads
        /// reads again the same after the torn tail is cut.
        #[test]
        fn any_bytes_read_back_or_err(tail in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let mut bytes = HEADER.to_vec();
            bytes.extend_from_slice(&tail);
            if let Ok(back) = read_bytes(&bytes) {
                let cut = bytes.get(..usize::try_from(back.valid_len).unwrap()).unwrap();
                let again = read_bytes(cut).unwrap();
                prop_assert_eq!(again.records, back.records);
                prop_assert_eq!(again.report.torn_tail, None);
            }
        }

        /// Compaction at any moment folds to what the records folded to (ports without a
        /// device or an operation left out).
        #[test]
        fn compaction_at_any_point_keeps_the_fold(ops in proptest::collection::vec((0usize..3, 0usize..6), 1..40), at in 0usize..40) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("j");
            let (mut j, _) = Journal::open(&path, None).unwrap();
            for (n, (port, what)) in ops.iter().enumerate() {
                let port = ["a", "b", "c"][*port];
                let rec = match what {
                    0 => Record::Begin { port: port.into(), op: OpKind::Plug, request: Some(Box::new(req(port))) },
                    1 => Record::Begin { port: port.into(), op: OpKind::Unplug, request: None },
                    2 => Record::Step { port: port.into(), step: Step::DeviceAdd { id: format!("d-{port}") } },
                    3 => state_record(port, DeviceState::Visible, "up"),
                    4 => state_record(port, DeviceState::Removing, ""),
                    _ => state_record(port, DeviceState::Removed, ""),
                };
                j.append(&rec).unwrap();
                if n == at {
                    j.compact().unwrap();
                }
            }
            let live = |m: &BTreeMap<String, PortLog>| -> BTreeMap<String, PortLog> {
                m.iter().filter(|(_, p)| p.device.state != DeviceState::Removed || p.open_op.is_some())
                    .map(|(k, v)| (k.clone(), v.clone())).collect()
            };
            let before = live(j.ports());
            let (_, recs) = Journal::open(&path, None).unwrap();
            prop_assert_eq!(&live(&fold(&recs)), &before);
            j.compact().unwrap();
            let (_, recs) = Journal::open(&path, None).unwrap();
            prop_assert_eq!(fold(&recs), before);
        }
    }

    /// A `State` record for `port`.
    fn state_record(port: &str, state: DeviceState, note: impl Into<String>) -> Record {
        Record::State {
            port: port.to_owned(),
            transition: Transition { state, at_unix_ms: now_ms(), note: note.into() },
            guest: Vec::new(),
        }
    }

    fn req(port: &str) -> PlugRequest {
        serde_json::from_value(serde_json::json!({
            "port": port, "functions": [{"qdev": {"driver": "e1000e", "id": format!("d-{port}")}}]
        }))
        .unwrap()
    }

    fn plug(port: &str) -> Record {
        Record::Begin { port: port.into(), op: OpKind::Plug, request: Some(Box::new(req(port))) }
    }

    /// A journal of five records on two ports; returns its bytes and where each record
    /// line starts.
    fn five_records(path: &Path) -> (Vec<u8>, Vec<usize>) {
        let (mut j, _) = Journal::open(path, None).unwrap();
        let mut starts = Vec::new();
        for rec in [
            plug("rp0"),
            state_record("rp0", DeviceState::Visible, ""),
            plug("rp1"),
            state_record("rp1", DeviceState::Adding, ""),
            Record::Step { port: "rp1".into(), step: Step::DeviceAdd { id: "d-rp1".into() } },
        ] {
            starts.push(usize::try_from(j.len()).unwrap());
            j.append(&rec).unwrap();
        }
        (std::fs::read(path).unwrap(), starts)
    }

    #[test]
    fn append_fold_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, recs) = Journal::open(&path, None).unwrap();
        assert!(recs.is_empty());
        j.append(&plug("rp0")).unwrap();
        j.append(&state_record("rp0", DeviceState::Adding, "")).unwrap();
        j.append(&Record::Step { port: "rp0".into(), step: Step::DeviceAdd { id: "d-rp0".into() } }).unwrap();
        drop(j);
        // A process dying inside write leaves part of a record.
        let line = encode(&state_record("rp0", DeviceState::Added, "")).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(line.get(..line.len() / 2).unwrap()).unwrap();
        drop(f);
        let (mut j, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(recs.len(), 3);
        let torn = j.read_report().torn_tail.unwrap();
        assert_eq!(torn.len, u64::try_from(line.len() / 2).unwrap());
        let ports = fold(&recs);
        let p = &ports["rp0"];
        assert_eq!(p.device.state, DeviceState::Adding);
        assert_eq!(p.open_op, Some(OpKind::Plug));
        assert_eq!(p.steps, vec![Step::DeviceAdd { id: "d-rp0".into() }]);
        // Appending after the cut gives a readable file again.
        j.append(&state_record("rp0", DeviceState::Visible, "")).unwrap();
        let (j, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(j.read_report().torn_tail, None);
        let ports = fold(&recs);
        assert_eq!(ports["rp0"].device.state, DeviceState::Visible);
        assert_eq!(ports["rp0"].open_op, None);
    }

    /// A journal cut at every byte of its last record reads as the records before it,
    /// with the rest reported as a torn tail.
    #[test]
    fn torn_at_every_offset_of_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, starts) = five_records(&dir.path().join("j"));
        let all = read_bytes(&bytes).unwrap().records;
        assert_eq!(all.len(), 5);
        let last = *starts.last().unwrap();
        for cut in last..bytes.len() {
            let back = read_bytes(bytes.get(..cut).unwrap()).unwrap();
            assert_eq!(back.records, all.get(..4).unwrap(), "cut at {cut}");
            assert_eq!(back.valid_len, u64::try_from(last).unwrap());
            let torn = (cut > last).then(|| Span { offset: offset(last), len: offset(cut - last) });
            assert_eq!(back.report.torn_tail, torn);
        }
    }

    /// A flipped byte anywhere in the last record makes it a torn tail; in an earlier
    /// record it is skipped and reported, and every other record is kept.
    #[test]
    fn flipped_bytes_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, starts) = five_records(&dir.path().join("j"));
        let all = read_bytes(&bytes).unwrap().records;
        let last = *starts.last().unwrap();
        for at in last..bytes.len() {
            for mask in [0x01u8, 0x20, 0x80, 0xff] {
                let mut b = bytes.clone();
                *b.get_mut(at).unwrap() ^= mask;
                let back = read_bytes(&b).unwrap();
                assert_eq!(back.records, all.get(..4).unwrap(), "byte {at} ^ {mask:#x}");
                assert_eq!(back.valid_len, offset(last));
            }
        }
        // The second record damaged: the other four are kept, its line reported. (Its
        // newline damaged joins it to the third: both are lost, as one damaged line.)
        let (from, to) = (starts[1], starts[2]);
        for at in from..to - 1 {
            let mut b = bytes.clone();
            *b.get_mut(at).unwrap() ^= 0x04;
            let back = read_bytes(&b).unwrap();
            let mut want = all.clone();
            want.remove(1);
            assert_eq!(back.records, want, "byte {at}");
            assert_eq!(back.report.damaged, vec![Span { offset: offset(from), len: offset(to - from) }]);
            assert_eq!(back.report.torn_tail, None);
        }
        let mut b = bytes.clone();
        *b.get_mut(to - 1).unwrap() ^= 0x04;
        let back = read_bytes(&b).unwrap();
        assert_eq!(back.records, vec![all[0].clone(), all[3].clone(), all[4].clone()]);
        assert_eq!(back.report.damaged, vec![Span { offset: offset(from), len: offset(starts[3] - from) }]);
    }

    #[test]
    fn first_format_reads_and_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut text = String::new();
        for rec in [plug("rp0"), state_record("rp0", DeviceState::Visible, "")] {
            text.push_str(&serde_json::to_string(&rec).unwrap());
            text.push('\n');
        }
        text.push_str(r#"{"record":"state","port":"rp0","sta"#);
        std::fs::write(&path, &text).unwrap();
        let (j, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(j.read_report().format, Format::JsonLines);
        assert!(j.read_report().torn_tail.is_some());
        let (j, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(j.read_report().format, Format::Framed);
        assert_eq!(fold(&recs)["rp0"].device.state, DeviceState::Visible);
    }

    #[test]
    fn what_is_not_a_journal_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(matches!(Journal::open(&path, None), Err(JournalError::UnknownFormat(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"not json\n");
        std::fs::write(&path, "{not json}\n").unwrap();
        assert!(matches!(Journal::open(&path, None), Err(JournalError::Corrupt { line: 1, .. })));
        // A torn header is a new journal.
        std::fs::write(&path, HEADER.get(..7).unwrap()).unwrap();
        let (j, recs) = Journal::open(&path, None).unwrap();
        assert!(recs.is_empty() && j.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), HEADER);
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
            j.append(&plug(port)).unwrap();
            j.append(&state_record(port, DeviceState::Visible, "")).unwrap();
        }
        j.append(&state_record("b", DeviceState::Removed, "")).unwrap();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 5);
        let (_, recs) = Journal::open(&path, None).unwrap();
        let ports = fold(&recs);
        j.compact().unwrap();
        let (_, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(recs.len(), 1);
        let again = fold(&recs);
        assert_eq!(again["a"].device, ports["a"].device);
        assert!(!again.contains_key("b"));
    }

    /// A record larger than the reader takes (a `device_add` property of 1 MiB) is
    /// refused before anything is written; the journal stays readable. (A request cannot
    /// nest deeper than the reader takes: its properties are booleans, numbers and text.)
    #[test]
    fn unreadable_records_are_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, None).unwrap();
        j.append(&plug("rp0")).unwrap();
        let before = std::fs::read(&path).unwrap();
        let mut big = req("rp1");
        let device = big.functions[0].device.clone().prop("big", "x".repeat(MAX_RECORD_BYTES));
        big.functions[0].device = device;
        let rec = Record::Begin { port: "rp1".into(), op: OpKind::Plug, request: Some(Box::new(big)) };
        assert!(matches!(j.append(&rec), Err(JournalError::Unwritable { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        j.append(&state_record("rp0", DeviceState::Visible, "")).unwrap();
        let (_, recs) = Journal::open(&path, None).unwrap();
        assert_eq!(fold(&recs)["rp0"].device.state, DeviceState::Visible);
    }

    /// Journals `vm.1` and `vm.2` in one directory compact through temporary files of
    /// their own: compacting both over and over, at the same time, leaves each with its
    /// own device (both used to go through `vm.compact-tmp`).
    #[test]
    fn journals_in_one_directory_compact_apart() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("vm.1"), dir.path().join("vm.2")];
        let threads: Vec<_> = paths
            .iter()
            .enumerate()
            .map(|(n, path)| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let port = format!("rp{n}");
                    let (mut j, _) = Journal::open(&path, None).unwrap();
                    j.append(&plug(&port)).unwrap();
                    j.append(&state_record(&port, DeviceState::Visible, "")).unwrap();
                    for _ in 0..300 {
                        j.compact().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for (n, path) in paths.iter().enumerate() {
            let (j, recs) = Journal::open(path, None).unwrap();
            let ports = fold(&recs);
            assert_eq!(ports.keys().collect::<Vec<_>>(), vec![&format!("rp{n}")], "{}", path.display());
            assert_eq!(ports[&format!("rp{n}")].device.state, DeviceState::Visible);
            assert_ne!(j.compact_tmp_path(), dir.path().join("vm.compact-tmp"));
        }
    }

    /// Plug and unplug cycles on one port while a device stays on another: the file is
    /// compacted while running and never grows past the threshold by more than a record,
    /// and reopening it keeps the other device.
    #[test]
    fn a_running_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path, None).unwrap();
        j.append(&plug("keep")).unwrap();
        j.append(&state_record("keep", DeviceState::Visible, "")).unwrap();
        let mut largest = 0;
        for _ in 0..3000 {
            j.append(&plug("rp0")).unwrap();
            j.append(&state_record("rp0", DeviceState::Visible, "")).unwrap();
            j.append(&Record::Begin { port: "rp0".into(), op: OpKind::Unplug, request: None }).unwrap();
            j.append(&state_record("rp0", DeviceState::Removed, "")).unwrap();
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        assert!(j.compactions() >= 1, "{j:?}");
        assert!(largest < DEFAULT_COMPACT_BYTES + 4096, "{largest}");
        drop(j);
        let (_, recs) = Journal::open(&path, None).unwrap();
        let ports = fold(&recs);
        assert_eq!(ports["keep"].device.state, DeviceState::Visible);
        assert_eq!(ports.get("rp0").map(|p| p.device.state), Some(DeviceState::Removed));
    }

    /// A FIFO, a character device or a symbolic link as the journal is refused with a
    /// typed error at once (a FIFO used to block `open`, `/dev/zero` to be read until
    /// memory ran out).
    #[test]
    fn special_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let started = std::time::Instant::now();
        for (path, kind) in [
            (fifo.as_path(), FileKind::Fifo),
            (Path::new("/dev/zero"), FileKind::CharDevice),
            (link.as_path(), FileKind::Symlink),
            (dir.path(), FileKind::Directory),
        ] {
            match Journal::open(path, None) {
                Err(JournalError::SpecialFile { kind: k, .. }) => assert_eq!(k, kind, "{}", path.display()),
                other => panic!("{}: {other:?}", path.display()),
            }
            assert!(matches!(read_file(path), Err(JournalError::SpecialFile { .. })));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}

//! A blocking QMP client: greeting, `qmp_capabilities`, commands matched to replies by id
//! while events arrive in between, event fan-out to several subscribers, descriptor passing.
//!
//! One reader thread per connection reads every message QEMU sends. Replies go to the
//! caller waiting on that id; events are copied to every live [`EventStream`]. Any number of
//! threads may call [`QmpClient::execute_raw`] at the same time. Every wait has a deadline.
//! When the connection ends (EOF, malformed JSON, an oversized message, an I/O error) every
//! waiter and subscriber learns why through [`CloseReason`].

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::deadline;
use crate::event_queue::{EventQueue, Popped, RawEvent};
pub use crate::transport::TransportError;
use crate::transport::{LineReader, LineWriter};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting to the QMP socket failed.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connect error.
        source: std::io::Error,
    },
    /// The QMP socket did not take the connection within
    /// [`ClientOptions::connect_timeout`]: it was missing, refused, or its listen backlog
    /// stayed full (QEMU serves one QMP client at a time; later ones wait in the backlog).
    #[error("QMP socket {path} did not take a connection within {after:?} (last: {source})")]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long was tried.
        after: Duration,
        /// The last connect error.
        source: std::io::Error,
    },
    /// Setting up the connection failed.
    #[error("QMP connection set-up: {0}")]
    Setup(#[source] std::io::Error),
    /// Sending a message failed.
    #[error("sending to QEMU failed: {0}")]
    Send(#[from] TransportError),
    /// The connection is gone; the reason says how it ended.
    #[error("QMP connection closed: {0}")]
    Closed(CloseReason),
    /// No reply (or event) arrived before the deadline.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long was waited.
        after: Duration,
    },
    /// QEMU answered the command with an error.
    #[error("{command} failed: {class}: {desc}")]
    Qmp {
        /// The command that failed.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The greeting was not a QMP greeting.
    #[error("bad QMP greeting: {0}")]
    Greeting(String),
    /// A command's arguments could not be encoded.
    #[error("cannot encode arguments of {command}: {source}")]
    Encode {
        /// The command.
        command: String,
        /// The encoder's error.
        source: serde_json::Error,
    },
    /// A reply did not have the shape the typed command expects.
    #[error("unexpected reply to {command}: {source}")]
    UnexpectedReply {
        /// The command.
        command: String,
        /// The decoder's error.
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The QMP error class and description when QEMU answered with an error.
    pub fn qmp_error(&self) -> Option<(&str, &str)> {
        match self {
            ClientError::Qmp { class, desc, .. } => Some((class, desc)),
            _ => None,
        }
    }

    /// True when the connection to QEMU is gone (as opposed to one command failing).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ClientError::Closed(_) | ClientError::Send(_))
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// QEMU closed the connection (or exited).
    #[error("end of stream")]
    Eof,
    /// QEMU sent a line that is not a JSON object.
    #[error("malformed JSON from QEMU ({message}): {preview}")]
    MalformedJson {
        /// The parser's message.
        message: String,
        /// The first bytes of the line.
        preview: String,
    },
    /// QEMU sent a line longer than the limit.
    #[error("message longer than the {limit}-byte limit")]
    MessageTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Reading failed.
    #[error("read error: {0}")]
    Io(String),
    /// The client was dropped.
    #[error("client dropped")]
    Dropped,
}

/// Connection settings: [`ClientOptions::default`], then change the fields that differ.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Default deadline for a command's reply.
    pub command_timeout: Duration,
    /// Deadline for the greeting and `qmp_capabilities`.
    pub handshake_timeout: Duration,
    /// How long [`QmpClient::connect_unix`] retries while the socket is missing, refuses,
    /// or has a full listen backlog; `connect(2)` itself never blocks past it.
    pub connect_timeout: Duration,
    /// Longest message accepted from QEMU; a longer one closes the connection.
    pub max_message_bytes: usize,
    /// Events one [`EventStream`] holds while nobody reads it; more are dropped and
    /// counted ([`EventStream::dropped`]).
    pub event_queue_capacity: usize,
    /// Bytes (of the events as QEMU sent them) one [`EventStream`] holds while nobody
    /// reads it; an event that would pass it is dropped and counted
    /// ([`EventStream::dropped_bytes`]). Events are queued as their bytes and parsed when
    /// received, so this bounds the memory of a stream nobody reads. Keep it at least
    /// `max_message_bytes`, or events that large are never queued.
    pub event_queue_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            command_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: 8 * 1024 * 1024,
            event_queue_capacity: 4096,
            event_queue_bytes: 16 * 1024 * 1024,
        }
    }
}

/// QEMU's version from the greeting; ordered, so that `version >= QemuVersion::new(9, 0, 0)`
/// asks for a feature of QEMU 9.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl QemuVersion {
    /// Version `major.minor.micro`.
    pub fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion { major, minor, micro }
    }
}

/// The QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// The distribution's package string, e.g. `Debian 1:7.2+dfsg-7`.
    pub package: String,
    /// Capabilities offered (e.g. `oob`), as QEMU spelt them.
    pub capabilities: Vec<String>,
}

/// An event's time stamp as QEMU sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds.
    pub microseconds: i64,
}

/// An asynchronous event, kept as raw JSON so that events this crate's schema does not
/// know are delivered too.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// The event name, e.g. `DEVICE_DELETED`.
    pub name: String,
    /// The `data` member (`null` when absent).
    pub data: Value,
    /// The time stamp, when QEMU sent one.
    pub timestamp: Option<Timestamp>,
}

impl Event {
    /// Reads an event line the reader thread has already sorted as an event.
    fn from_line(line: &[u8]) -> Option<Event> {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(line) else { return None };
        let Some(Value::String(name)) = obj.remove("event") else { return None };
        let data = obj.remove("data").unwrap_or(Value::Null);
        let timestamp = obj.remove("timestamp").and_then(|t| serde_json::from_value(t).ok());
        Some(Event { name, data, timestamp })
    }

    /// The event as the `qapi` crate's generated type, when its schema knows it.
    pub fn typed(&self) -> Option<qapi::qmp::Event> {
        let mut obj = Map::new();
        obj.insert("event".into(), Value::String(self.name.clone()));
        if !self.data.is_null() {
            obj.insert("data".into(), self.data.clone());
        }
        let ts = self.timestamp.unwrap_or(Timestamp { seconds: 0, microseconds: 0 });
        obj.insert("timestamp".into(), serde_json::json!(ts));
        serde_json::from_value(Value::Object(obj)).ok()
    }

    /// For `DEVICE_DELETED`: the device id, when the event names one.
    pub fn deleted_device_id(&self) -> Option<&str> {
        if self.name != "DEVICE_DELETED" {
            return None;
        }
        self.data.get("device").and_then(Value::as_str)
    }
}

/// A QMP error reply body.
#[derive(Debug, Clone)]
struct ErrorBody {
    class: String,
    desc: String,
}

type Reply = std::result::Result<Value, ErrorBody>;

/// Setting up a writer fails only with an OS error.
fn setup_error(e: TransportError) -> ClientError {
    match e {
        TransportError::Io(io) => ClientError::Setup(io),
        other => ClientError::Setup(std::io::Error::other(other.to_string())),
    }
}

/// What the reader thread and the callers share.
#[derive(Debug, Default)]
struct Conn {
    pending: HashMap<u64, SyncSender<Reply>>,
    /// The queues of live streams (a dropped stream's queue is pruned on the next event).
    subscribers: Vec<Weak<EventQueue>>,
    closed: Option<CloseReason>,
    stray_replies: u64,
}

#[derive(Debug, Default)]
struct Shared {
    conn: Mutex<Conn>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        // A panic while holding this lock cannot leave the maps inconsistent: take the data.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close_reason(&self) -> CloseReason {
        self.lock().closed.clone().unwrap_or(CloseReason::Dropped)
    }
}

/// A stream of events from one connection. Each stream sees every event that arrives after
/// it was created; streams do not take events from each other. While nobody reads it, it
/// holds at most [`ClientOptions::event_queue_capacity`] events and
/// [`ClientOptions::event_queue_bytes`] bytes; what does not fit is dropped and counted.
#[derive(Debug)]
pub struct EventStream {
    queue: Arc<EventQueue>,
}

impl EventStream {
    /// Events this stream missed because its queue was full while nobody read it. A
    /// waiter that may have missed its event asks QEMU for the state instead (the engine
    /// does).
    pub fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// Bytes of the events counted by [`EventStream::dropped`].
    pub fn dropped_bytes(&self) -> u64 {
        self.queue.dropped_bytes()
    }

    /// Bytes of the events queued and not yet received.
    pub fn queued_bytes(&self) -> usize {
        self.queue.queued_bytes()
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event> {
        let until = deadline::after(timeout);
        self.next(Some(until))
            .and_then(|e| e.ok_or(ClientError::Timeout { what: "event".into(), after: timeout }))
    }

    /// An event already received, if any, without waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.next(None).ok().flatten()
    }

    /// Waits until an event satisfies `pred` or `deadline` passes; other events are skipped.
    pub fn wait_for(&self, deadline: Instant, mut pred: impl FnMut(&Event) -> bool) -> Result<Event> {
        let started = Instant::now();
        loop {
            match self.next(Some(deadline))? {
                Some(e) if pred(&e) => return Ok(e),
                Some(_) => {}
                None => {
                    return Err(ClientError::Timeout {
                        what: "matching event".into(),
                        after: started.elapsed(),
                    })
                }
            }
        }
    }

    /// The next event before `deadline` (`None`: only one already queued); `Ok(None)` at
    /// the deadline, `Closed` once the connection is gone and the queue is empty.
    fn next(&self, deadline: Option<Instant>) -> Result<Option<Event>> {
        loop {
            match self.queue.pop(deadline) {
                // The reader thread parsed it as an event already; a line that does not
                // read again cannot happen, and is skipped rather than trusted.
                Popped::Event(line) => match Event::from_line(&line) {
                    Some(e) => return Ok(Some(e)),
                    None => continue,
                },
                Popped::Timeout => return Ok(None),
                Popped::Closed(reason) => return Err(ClientError::Closed(reason)),
            }
        }
    }
}

/// A QMP connection to one QEMU process. Cheap to share between threads (`Arc`).
#[derive(Debug)]
pub struct QmpClient {
    shared: Arc<Shared>,
    writer: Mutex<LineWriter>,
    next_id: AtomicU64,
    greeting: Greeting,
    options: ClientOptions,
    stop: Arc<AtomicBool>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl QmpClient {
    /// Connects to QEMU's QMP Unix socket (`-qmp unix:PATH,server=on,wait=off`), retrying
    /// for up to `options.connect_timeout` while the socket is not there, refuses, or has
    /// its listen backlog full. The socket is non-blocking, so `connect(2)` itself never
    /// waits past that deadline; then [`ClientError::ConnectTimeout`].
    pub fn connect_unix(path: impl AsRef<Path>, options: ClientOptions) -> Result<Self> {
        let path = path.as_ref();
        let started = Instant::now();
        let until = deadline::from(started, options.connect_timeout);
        let stream = loop {
            match connect_nonblocking(path, until) {
                Ok(s) => break s,
                Err(e) => {
                    let retry = matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                    );
                    if !retry {
                        return Err(ClientError::Connect { path: path.to_owned(), source: e });
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::ConnectTimeout {
                            path: path.to_owned(),
                            after: started.elapsed(),
                            source: e,
                        });
                    }
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                }
            }
        };
        Self::from_stream(stream, options)
    }

    /// Speaks QMP over an already connected Unix socket.
    pub fn from_stream(stream: UnixStream, options: ClientOptions) -> Result<Self> {
        // Non-blocking with a deadline: a send that QEMU never drains must not block us.
        let read = stream.try_clone().map_err(ClientError::Setup)?;
        let writer = LineWriter::socket(stream).map_err(setup_error)?;
        Self::start(OwnedFd::from(read), writer, options)
    }

    /// Speaks QMP over a pair of pipes, e.g. the stdout and stdin of a QEMU started with
    /// `-qmp stdio`. Descriptor passing is not possible over pipes.
    pub fn from_pipes(
        from_qemu: impl Into<OwnedFd>,
        to_qemu: impl Into<OwnedFd>,
        options: ClientOptions,
    ) -> Result<Self> {
        // Non-blocking with a deadline: a QEMU that stops reading stdin must not block us.
        let writer = LineWriter::pipe(to_qemu.into()).map_err(setup_error)?;
        Self::start(from_qemu.into(), writer, options)
    }

    /// Speaks QMP over a connection a VMM hands over in command mode: it read QEMU's
    /// greeting and sent `qmp_capabilities` itself, and gives the connection up (QMP
    /// matches replies to commands by order and id on one connection, so two clients
    /// cannot share it). The greeting is gone, so [`QmpClient::greeting`] holds the
    /// version `query-version` reports and no capabilities; asking it shares
    /// `options.handshake_timeout`. Events QEMU sent before are read as events; replies
    /// to commands the VMM sent and did not read count as stray replies.
    pub fn from_negotiated_stream(stream: UnixStream, options: ClientOptions) -> Result<Self> {
        let read = stream.try_clone().map_err(ClientError::Setup)?;
        let writer = LineWriter::socket(stream).map_err(setup_error)?;
        Self::start_with(OwnedFd::from(read), writer, options, true)
    }

    fn start(read: OwnedFd, writer: LineWriter, options: ClientOptions) -> Result<Self> {
        Self::start_with(read, writer, options, false)
    }

    /// Starts the reader; `negotiated`: the connection is past the greeting and in
    /// command mode already.
    fn start_with(
        read: OwnedFd,
        writer: LineWriter,
        options: ClientOptions,
        negotiated: bool,
    ) -> Result<Self> {
        let mut reader = LineReader::new(read, options.max_message_bytes);
        let stop = Arc::new(AtomicBool::new(false));
        // The greeting is read here, not by `qapi`, whose handshake panics on EOF. Greeting
        // and `qmp_capabilities` (or `query-version`) share one deadline.
        let started = Instant::now();
        let until = deadline::from(started, options.handshake_timeout);
        let greeting = if negotiated { None } else { Some(read_greeting(&mut reader, until, &stop)?) };
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread_stop = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, &thread_shared, &thread_stop))
            .map_err(ClientError::Setup)?;
        let mut client = QmpClient {
            shared,
            writer: Mutex::new(writer),
            next_id: AtomicU64::new(1),
            greeting: greeting.clone().unwrap_or(Greeting {
                version: QemuVersion { major: 0, minor: 0, micro: 0 },
                package: String::new(),
                capabilities: Vec::new(),
            }),
            options,
            stop,
            reader: Mutex::new(Some(handle)),
        };
        if greeting.is_some() {
            client.execute_until("qmp_capabilities", None, &[], started, until)?;
        } else {
            let v = client.execute_until("query-version", None, &[], started, until)?;
            client.greeting = parse_version(&v)?;
        }
        Ok(client)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn closed(&self) -> Option<CloseReason> {
        self.shared.lock().closed.clone()
    }

    /// Replies that matched no waiting command (late after a timeout, or unknown ids).
    pub fn stray_replies(&self) -> u64 {
        self.shared.lock().stray_replies
    }

    /// A new event stream that sees every event from now on.
    pub fn subscribe(&self) -> EventStream {
        let queue = Arc::new(EventQueue::new(
            self.options.event_queue_capacity.max(1),
            self.options.event_queue_bytes,
        ));
        let mut conn = self.shared.lock();
        match &conn.closed {
            Some(reason) => queue.close(reason.clone()),
            None => conn.subscribers.push(Arc::downgrade(&queue)),
        }
        drop(conn);
        EventStream { queue }
    }

    /// Runs a command given by name with raw JSON arguments and returns the raw `return`
    /// value. This path works for any command, including ones the `qapi` schema lacks.
    pub fn execute_raw(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value> {
        self.execute_raw_with_fds(command, arguments, &[], timeout)
    }

    /// Like [`QmpClient::execute_raw`], passing `fds` with the message (`SCM_RIGHTS`).
    ///
    /// `timeout` is one deadline for sending the command and receiving its reply. A
    /// command that only partly went out (QEMU stopped reading) leaves the stream unusable:
    /// the connection is closed then, and every later call says so.
    pub fn execute_raw_with_fds(
        &self,
        command: &str,
        arguments: Option<Value>,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Value> {
        let started = Instant::now();
        self.execute_until(command, arguments, fds, started, deadline::from(started, timeout))
    }

    fn execute_until(
        &self,
        command: &str,
        arguments: Option<Value>,
        fds: &[BorrowedFd<'_>],
        started: Instant,
        until: Instant,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), Value::from(id));
        let line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|source| ClientError::Encode { command: command.into(), source })?;
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut conn = self.shared.lock();
            if let Some(reason) = &conn.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            conn.pending.insert(id, tx);
        }
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let sent = if fds.is_empty() {
                w.write_line(&line, until)
            } else {
                w.write_line_with_fds(&line, fds, until)
            };
            if let Err(TransportError::WriteTimeout { sent: partial, .. }) = &sent {
                if *partial > 0 {
                    // Half a command is in QEMU's buffer: whatever follows would be read
                    // as its continuation. End the connection.
                    self.shared.lock().closed.get_or_insert_with(|| {
                        CloseReason::Io(format!("a command was cut off after {partial} bytes"))
                    });
                    w.shutdown();
                }
            }
            sent
        };
        if let Err(e) = sent {
            self.shared.lock().pending.remove(&id);
            return Err(ClientError::Send(e));
        }
        let reply = match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                self.shared.lock().pending.remove(&id);
                // The reply may have raced in between; use it if so.
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(ClientError::Timeout { what: command.into(), after: started.elapsed() })
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(ClientError::Closed(self.shared.close_reason()))
            }
        };
        reply.map_err(|e| ClientError::Qmp { command: command.into(), class: e.class, desc: e.desc })
    }

    /// Runs a command of the `qapi` crate's generated schema with the default deadline.
    pub fn execute<C: qapi::Command>(&self, command: &C) -> Result<C::Ok> {
        self.execute_timeout(command, self.options.command_timeout)
    }

    /// Runs a typed command with an explicit deadline.
    pub fn execute_timeout<C: qapi::Command>(&self, command: &C, timeout: Duration) -> Result<C::Ok> {
        let args = serde_json::to_value(command)
            .map_err(|source| ClientError::Encode { command: C::NAME.into(), source })?;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            other => Some(other),
        };
        let ret = self.execute_raw(C::NAME, args, timeout)?;
        serde_json::from_value(ret)
            .map_err(|source| ClientError::UnexpectedReply { command: C::NAME.into(), source })
    }

    /// Hands `fd` to QEMU under `fdname` (`getfd`), e.g. for `vfio-pci`'s or iommufd's `fd`.
    pub fn getfd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let args = serde_json::json!({ "fdname": fdname });
        self.execute_raw_with_fds("getfd", Some(args), &[fd], self.options.command_timeout).map(drop)
    }

    /// Closes a descriptor that [`QmpClient::getfd`] passed (`closefd`).
    pub fn closefd(&self, fdname: &str) -> Result<()> {
        self.execute(&qapi::qmp::closefd { fdname: fdname.into() }).map(drop)
    }

    /// Adds `fd` to a file descriptor set (`add-fd`); QEMU picks the set when `fdset_id`
    /// is `None`.
    pub fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<i64>,
        opaque: Option<&str>,
    ) -> Result<qapi::qmp::AddfdInfo> {
        let cmd = qapi::qmp::add_fd { fdset_id, opaque: opaque.map(str::to_owned) };
        let args = serde_json::to_value(&cmd)
            .map_err(|source| ClientError::Encode { command: "add-fd".into(), source })?;
        let ret = self.execute_raw_with_fds("add-fd", Some(args), &[fd], self.options.command_timeout)?;
        serde_json::from_value(ret)
            .map_err(|source| ClientError::UnexpectedReply { command: "add-fd".into(), source })
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        let handle = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            // The reader sees the stop flag within 100 ms; its result carries nothing.
            let _ = h.join();
        }
    }
}

/// One non-blocking `connect(2)` to a Unix socket. A full listen backlog is `EAGAIN`
/// (`WouldBlock`) at once instead of a wait in the kernel; a connection in progress (not
/// what Linux does for Unix sockets, but allowed) is waited for until `until`.
fn connect_nonblocking(path: &Path, until: Instant) -> std::io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::INPROGRESS) => {
            let left = until.saturating_duration_since(Instant::now());
            let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::OUT)];
            let wait = rustix::event::Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            if rustix::event::poll(&mut fds, Some(&wait))? == 0 {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            rustix::net::sockopt::socket_error(&fd)??;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(UnixStream::from(fd))
}

fn close_reason(e: TransportError) -> CloseReason {
    match e {
        TransportError::Eof => CloseReason::Eof,
        TransportError::LineTooLong { limit } => CloseReason::MessageTooLarge { limit },
        TransportError::Stopped => CloseReason::Dropped,
        other => CloseReason::Io(other.to_string()),
    }
}

#[derive(Deserialize)]
struct RawGreeting {
    #[serde(rename = "QMP")]
    qmp: RawGreetingBody,
}

#[derive(Deserialize)]
struct RawGreetingBody {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<Value>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

/// Events QEMU may send before its greeting and that are skipped. A client that connects
/// while QEMU is still starting can see `RESUME` (or other events) written to the socket
/// before the monitor has sent its greeting; no [`EventStream`] exists yet to see them.
const EVENTS_BEFORE_GREETING: usize = 64;

/// Reads lines until the greeting, skipping the events that may come first (at most
/// [`EVENTS_BEFORE_GREETING`], all within `until`).
fn read_greeting(reader: &mut LineReader, until: Instant, stop: &AtomicBool) -> Result<Greeting> {
    let mut skipped = 0usize;
    loop {
        let line = reader.read_line(Some(until), stop).map_err(|e| match e {
            TransportError::Timeout(after) => ClientError::Timeout { what: "QMP greeting".into(), after },
            other => ClientError::Closed(close_reason(other)),
        })?;
        if skipped < EVENTS_BEFORE_GREETING && is_event_line(&line) {
            skipped += 1;
            continue;
        }
        return parse_greeting(&line);
    }
}

/// Whether a line is a QMP event (an object with an `"event"` member and no `"QMP"`).
fn is_event_line(line: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        event: Option<serde::de::IgnoredAny>,
        #[serde(rename = "QMP")]
        qmp: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(line).is_ok_and(|p| p.event.is_some() && p.qmp.is_none())
}

fn parse_greeting(line: &[u8]) -> Result<Greeting> {
    let g: RawGreeting =
        serde_json::from_slice(line).map_err(|e| ClientError::Greeting(format!("{e}: {}", preview(line))))?;
    Ok(Greeting {
        version: g.qmp.version.qemu,
        package: g.qmp.version.package.trim().to_owned(),
        capabilities: g
            .qmp
            .capabilities
            .iter()
            .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_owned))
            .collect(),
    })
}

/// The greeting of a connection handed over in command mode, from `query-version`'s reply.
fn parse_version(reply: &Value) -> Result<Greeting> {
    #[derive(Deserialize)]
    struct Version {
        qemu: QemuVersion,
        #[serde(default)]
        package: String,
    }
    let v: Version = serde_json::from_value(reply.clone())
        .map_err(|e| ClientError::Greeting(format!("query-version: {e}: {reply}")))?;
    Ok(Greeting { version: v.qemu, package: v.package.trim().to_owned(), capabilities: Vec::new() })
}

fn preview(line: &[u8]) -> String {
    let cut = line.get(..line.len().min(120)).unwrap_or_default();
    String::from_utf8_lossy(cut).into_owned()
}

/// One message from QEMU, classified.
enum Incoming {
    Reply(Option<u64>, Reply),
    /// An event, kept as its line: parsed when a stream's owner receives it.
    Event,
    Other,
}

/// Reads one line as the client's reader thread does (for fuzzing QMP input): what kind
/// of message it is (`"reply"`, `"event"` or `"other"`), or why it ends the connection.
/// Events are parsed as their receiver would parse them.
#[doc(hidden)]
pub fn classify_line(line: &[u8]) -> std::result::Result<&'static str, CloseReason> {
    Ok(match classify(line)? {
        Incoming::Reply(..) => "reply",
        Incoming::Event => {
            // A line sorted as an event must read as one.
            Event::from_line(line).map(|_| "event").ok_or_else(|| CloseReason::MalformedJson {
                message: "an event that does not read back".into(),
                preview: preview(line),
            })?
        }
        Incoming::Other => "other",
    })
}

/// Sorts a line without building its JSON tree: only the members QMP dispatches on are
/// read, the rest stays raw text (a reply's `return` is parsed for its caller).
fn classify(line: &[u8]) -> std::result::Result<Incoming, CloseReason> {
    let malformed = |message: String| CloseReason::MalformedJson { message, preview: preview(line) };
    let mut obj: BTreeMap<String, &RawValue> =
        serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
    let id = obj.get("id").and_then(|v| serde_json::from_str::<u64>(v.get()).ok());
    if let Some(ret) = obj.remove("return") {
        let ret: Value = serde_json::from_str(ret.get()).map_err(|e| malformed(e.to_string()))?;
        return Ok(Incoming::Reply(id, Ok(ret)));
    }
    if let Some(err) = obj.remove("error") {
        let err: Value = serde_json::from_str(err.get()).map_err(|e| malformed(e.to_string()))?;
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        return Ok(Incoming::Reply(id, Err(ErrorBody { class: field("class"), desc: field("desc") })));
    }
    if obj.get("event").is_some_and(|e| serde_json::from_str::<String>(e.get()).is_ok()) {
        return Ok(Incoming::Event);
    }
    Ok(Incoming::Other)
}

fn reader_loop(mut reader: LineReader, shared: &Shared, stop: &AtomicBool) {
    let reason = loop {
        let line = match reader.read_line(None, stop) {
            Ok(l) => l,
            Err(e) => break close_reason(e),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match classify(&line) {
            Ok(Incoming::Reply(id, reply)) => {
                let mut conn = shared.lock();
                match id.and_then(|id| conn.pending.remove(&id)) {
                    // The waiter may have given up in the meantime; nothing to do then.
                    Some(tx) => drop(tx.try_send(reply)),
                    None => conn.stray_replies = conn.stray_replies.saturating_add(1),
                }
            }
            Ok(Incoming::Event) => {
                let event: RawEvent = Arc::from(line);
                let mut conn = shared.lock();
                conn.subscribers.retain(|sub| match sub.upgrade() {
                    Some(queue) => {
                        queue.push(&event);
                        true
                    }
                    None => false,
                });
            }
            Ok(Incoming::Other) => {}
            Err(reason) => break reason,
        }
    };
    let mut conn = shared.lock();
    // A reason set before (a command cut off in mid-write) is the real one.
    let reason = conn.closed.get_or_insert(reason).clone();
    // Dropping the senders wakes every waiter with "disconnected"; each stream gets the
    // events it holds, then the reason.
    conn.pending.clear();
    for queue in conn.subscribers.drain(..).filter_map(|q| q.upgrade()) {
        queue.close(reason.clone());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// Arbitrary JSON, nested a few levels, with QMP's member names likely.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z_ ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("id".to_string()),
                        Just("return".to_string()),
                        Just("error".to_string()),
                        Just("event".to_string()),
                        Just("data".to_string()),
                        Just("timestamp".to_string()),
                        Just("class".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever QEMU sends, a line is classified or reported as malformed: no panic.
        #[test]
        fn any_line_is_classified_or_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = classify(&bytes);
        }

        #[test]
        fn any_json_is_classified(v in json()) {
            let line = serde_json::to_vec(&v).unwrap();
            let r = classify_line(&line);
            // Only objects are messages; every event reads back as one.
            prop_assert_eq!(r.is_ok(), v.is_object());
        }
    }

    use super::*;

    #[test]
    fn greeting_of_qemu_7_2_parses() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
        let g = parse_greeting(line).unwrap();
        assert_eq!(g.version, QemuVersion { major: 7, minor: 2, micro: 22 });
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
        assert!(parse_greeting(b"{\"hello\":1}").is_err());
    }

    #[test]
    fn classify_reply_error_event() {
        match classify(br#"{"return": {}, "id": 7}"#).unwrap() {
            Incoming::Reply(Some(7), Ok(_)) => {}
            _ => panic!("reply"),
        }
        match classify(br#"{"error": {"class": "DeviceNotFound", "desc": "x"}, "id": 3}"#).unwrap() {
            Incoming::Reply(Some(3), Err(e)) => assert_eq!(e.class, "DeviceNotFound"),
            _ => panic!("error"),
        }
        match classify(br#"{"event": "NEVER_HEARD_OF", "data": {"a": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).unwrap() {
            Incoming::Event => {
                let e = Event::from_line(br#"{"event": "NEVER_HEARD_OF", "data": {"a": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).unwrap();
                assert_eq!(e.name, "NEVER_HEARD_OF");
                assert!(e.typed().is_none());
            }
            _ => panic!("event"),
        }
        assert!(classify(b"[1,2]").is_err());
        assert!(classify(b"{\"return\": ").is_err());
    }

    #[test]
    fn known_event_has_typed_form() {
        let e = Event {
            name: "DEVICE_DELETED".into(),
            data: serde_json::json!({"device": "gpu0", "path": "/machine/peripheral/gpu0"}),
            timestamp: Some(Timestamp { seconds: 1, microseconds: 0 }),
        };
        assert_eq!(e.deleted_device_id(), Some("gpu0"));
        assert!(matches!(e.typed(), Some(qapi::qmp::Event::DEVICE_DELETED { .. })));
    }
}

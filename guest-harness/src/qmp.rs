//! A tiny QMP client for the harness's own experiments: JSON lines over a unix socket,
//! every read bounded by a deadline. The project's `qmp-hotplug` crate is the real client;
//! this one only needs `execute` and waiting for events.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// The deadline passed.
    #[error("QMP: timed out waiting for {0}")]
    Timeout(String),
    /// QEMU closed the connection.
    #[error("QMP: connection closed by QEMU")]
    Closed,
    /// QEMU sent something that is not a JSON object.
    #[error("QMP: bad message {0:?}")]
    BadMessage(String),
    /// QEMU answered with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, QmpError>;

/// Longest message accepted (QEMU's replies are far smaller; this bounds memory).
const MAX_MESSAGE: usize = 16 << 20;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects to `path` (retrying until it exists or `deadline`), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(QmpError::Io(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut qmp = Qmp { stream, buf: Vec::new(), events: Vec::new(), next_id: 1 };
        let greeting = qmp.read_message(deadline, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadMessage(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}), deadline)?;
        Ok(qmp)
    }

    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                let value: Value =
                    serde_json::from_str(text.trim()).map_err(|_| QmpError::BadMessage(text.to_string()))?;
                return if value.is_object() {
                    Ok(value)
                } else {
                    Err(QmpError::BadMessage(text.to_string()))
                };
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(QmpError::BadMessage(format!("a message over {MAX_MESSAGE} bytes")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(what.to_string()));
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }

    /// Runs `command` with `arguments` and returns its `return` value. Events that arrive
    /// meanwhile are kept for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Value, deadline: Instant) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.stream.write_all(text.as_bytes())?;
        loop {
            let reply = self.read_message(deadline, &format!("the reply to {command}"))?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Waits for an event that satisfies `matches` (looking at already received events
    /// first) and removes it from the queue.
    pub fn wait_event(
        &mut self,
        what: &str,
        deadline: Instant,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        loop {
            if let Some(pos) = self.events.iter().position(&matches) {
                return Ok(self.events.remove(pos));
            }
            let msg = self.read_message(deadline, what)?;
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }
}

/// Whether `event` is `DEVICE_DELETED` for device `id`.
pub fn is_device_deleted(event: &Value, id: &str) -> bool {
    event.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
        && event.pointer("/data/device").and_then(Value::as_str) == Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A scripted peer: greeting, capabilities, one error, an event then a return.
    #[test]
    fn execute_errors_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").unwrap();
            for reply in [
                "{\"return\": {}, \"id\": 1}\r\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 2}\r\n",
                "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"d1\"}}\r\n{\"return\": [1], \"id\": 3}\r\n",
            ] {
                line.clear();
                r.read_line(&mut line).unwrap();
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut q = Qmp::connect(&path, deadline).unwrap();
        let err = q.execute("device_add", json!({"driver": "x"}), deadline).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(q.execute("query-pci", json!({}), deadline).unwrap(), json!([1]));
        let ev = q.wait_event("DEVICE_DELETED", deadline, |e| is_device_deleted(e, "d1")).unwrap();
        assert_eq!(ev["data"]["device"], "d1");
        peer.join().unwrap();
        let short = Instant::now() + Duration::from_millis(100);
        assert!(matches!(
            q.wait_event("nothing", short, |_| false),
            Err(QmpError::Closed | QmpError::Timeout(_))
        ));
    }
}

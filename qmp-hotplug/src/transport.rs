//! The byte level of a QMP connection: bounded line reading with deadlines, writing, and
//! passing file descriptors with `SCM_RIGHTS`.
//!
//! QMP is one JSON document per line. Lines are read into a buffer that never grows past
//! the configured limit plus one read chunk, so a peer that sends a 16 MiB line (or never
//! sends a newline) costs bounded memory and ends in [`TransportError::LineTooLong`].

use std::fs::File;
use std::io::{self, IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Size of one `read(2)` into the line buffer.
const CHUNK: usize = 64 * 1024;
/// How often a blocked reader wakes up to look at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Most descriptors passed in one message (QEMU's limit for one message is larger).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 16;

/// Errors of the byte level.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer closed the connection (end of stream, or a reset because it closed with
    /// data of ours unread).
    #[error("end of stream from QEMU")]
    Eof,
    /// A line grew past the limit before its newline arrived.
    #[error("message longer than the {limit}-byte limit")]
    LineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// No complete line arrived before the deadline.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// QEMU did not take a message we sent before the write deadline (it stopped
    /// reading, or reads too slowly). When `sent` is not zero, part of the message went
    /// out and the connection can no longer be used.
    #[error("QEMU did not take the message within {after:?} ({sent} bytes of it went out)")]
    WriteTimeout {
        /// How long was tried.
        after: Duration,
        /// Bytes of the message that went out.
        sent: usize,
    },
    /// The reader was asked to stop.
    #[error("reader stopped")]
    Stopped,
    /// An operating-system error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Passing descriptors needs a Unix socket; the connection is a pipe pair.
    #[error("file descriptors can only be passed over a Unix socket, not over pipes")]
    FdPassingUnsupported,
    /// More descriptors than one message carries.
    #[error("{0} file descriptors in one message, at most {MAX_FDS_PER_MESSAGE}")]
    TooManyFds(usize),
}

/// Result alias of this module.
pub(crate) type Result<T> = std::result::Result<T, TransportError>;

/// Reads newline-terminated lines from a file descriptor with a length limit and deadlines.
#[derive(Debug)]
pub(crate) struct LineReader {
    file: File,
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline (a long line is scanned once).
    scanned: usize,
    max_line: usize,
}

impl LineReader {
    /// Wraps a readable descriptor (socket or pipe).
    pub(crate) fn new(fd: OwnedFd, max_line: usize) -> Self {
        LineReader { file: File::from(fd), buf: Vec::with_capacity(CHUNK), scanned: 0, max_line }
    }

    /// Returns the next line without its line ending.
    ///
    /// Waits until `deadline` (forever when `None`), checking `stop` at least every 100 ms.
    pub(crate) fn read_line(&mut self, deadline: Option<Instant>, stop: &AtomicBool) -> Result<Vec<u8>> {
        let started = Instant::now();
        loop {
            let unscanned = self.buf.get(self.scanned..).unwrap_or_default();
            if let Some(at) = unscanned.iter().position(|b| *b == b'\n') {
                let pos = self.scanned.saturating_add(at);
                self.scanned = 0;
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_line {
                return Err(TransportError::LineTooLong { limit: self.max_line });
            }
            if stop.load(Ordering::Relaxed) {
                return Err(TransportError::Stopped);
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(TransportError::Timeout(started.elapsed()));
                    }
                    left.min(STOP_POLL)
                }
                None => STOP_POLL,
            };
            if !wait_readable(self.file.as_fd(), wait)? {
                continue;
            }
            self.fill()?;
        }
    }

    /// One `read(2)` into the buffer; EOF is an error because a line was expected.
    fn fill(&mut self) -> Result<()> {
        let old = self.buf.len();
        // Never read more than the limit allows, so memory stays bounded.
        let room = self.max_line.saturating_add(1).saturating_sub(old).clamp(1, CHUNK);
        self.buf.resize(old.saturating_add(room), 0);
        let got = loop {
            match self.file.read(self.buf.get_mut(old..).unwrap_or_default()) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.buf.truncate(old);
                    return Ok(());
                }
                // A Unix socket whose peer closed with bytes of ours still unread reports
                // ECONNRESET instead of EOF, once everything sent to us has been read.
                // QEMU's monitor reads one byte at a time and pauses while a command runs,
                // so a QEMU killed right after a reply often leaves our newline unread.
                // Either way the peer is gone.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.buf.truncate(old);
                    return Err(TransportError::Eof);
                }
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e.into());
                }
            }
        };
        self.buf.truncate(old.saturating_add(got));
        if got == 0 {
            return Err(TransportError::Eof);
        }
        Ok(())
    }
}

/// Waits until `fd` is readable (or hung up) for at most `wait`.
fn wait_readable(fd: BorrowedFd<'_>, wait: Duration) -> Result<bool> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&timespec(wait))) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(TransportError::Io(e.into())),
    }
}

/// The writing half of a connection. Every write has one deadline for the whole
/// message: a QEMU that stops reading fills the socket or pipe buffer, and one that
/// reads slowly must not stretch a write past it either (the deadline does not restart
/// when some bytes go out).
#[derive(Debug)]
pub(crate) enum LineWriter {
    /// A connected Unix socket (can pass descriptors), non-blocking, written with
    /// `poll(2)`.
    Socket {
        /// The socket.
        stream: UnixStream,
    },
    /// The write end of a pipe (`-qmp stdio`), non-blocking, written with `poll(2)`.
    Pipe {
        /// The pipe.
        file: File,
    },
}

impl LineWriter {
    /// A socket writer; the socket is made non-blocking (the reader on a clone of it
    /// copes: it polls before each read).
    pub(crate) fn socket(stream: UnixStream) -> Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(LineWriter::Socket { stream })
    }

    /// A pipe writer; the pipe is made non-blocking.
    pub(crate) fn pipe(fd: OwnedFd) -> Result<Self> {
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(io::Error::from)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK).map_err(io::Error::from)?;
        Ok(LineWriter::Pipe { file: File::from(fd) })
    }

    /// Writes one message followed by a newline, all of it before `deadline`.
    pub(crate) fn write_line(&mut self, line: &[u8], deadline: Instant) -> Result<()> {
        let msg = with_newline(line);
        let mut out = Outgoing { data: &msg, sent: 0, started: Instant::now(), deadline };
        match self {
            LineWriter::Socket { stream } => out.send_all(stream.as_fd()),
            LineWriter::Pipe { file } => out.write_all(file.as_fd()),
        }
    }

    /// Writes one message with `fds` attached to its first byte(s) as `SCM_RIGHTS`, all
    /// of it before `deadline`.
    pub(crate) fn write_line_with_fds(
        &mut self,
        line: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> Result<()> {
        let LineWriter::Socket { stream: sock } = self else {
            return Err(TransportError::FdPassingUnsupported);
        };
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(TransportError::TooManyFds(fds.len()));
        }
        let msg = with_newline(line);
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(TransportError::TooManyFds(fds.len()));
        }
        let mut out = Outgoing { data: &msg, sent: 0, started: Instant::now(), deadline };
        loop {
            match rustix::net::sendmsg(sock.as_fd(), &[IoSlice::new(&msg)], &mut control, SendFlags::NOSIGNAL)
            {
                Ok(n) => {
                    out.sent = n;
                    break;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => out.wait_writable(sock.as_fd())?,
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(TransportError::Eof)
                }
                Err(e) => return Err(TransportError::Io(e.into())),
            }
        }
        // The descriptors travelled with the first bytes; the rest is plain data.
        out.send_all(sock.as_fd())
    }

    /// Shuts a socket down so that a blocked reader on it wakes up with EOF.
    pub(crate) fn shutdown(&self) {
        if let LineWriter::Socket { stream: s } = self {
            // Already closed by the peer is fine: nothing left to wake.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn with_newline(line: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(line.len().saturating_add(1));
    msg.extend_from_slice(line);
    msg.push(b'\n');
    msg
}

/// One message on its way out: what is left, and the one deadline for all of it.
struct Outgoing<'a> {
    data: &'a [u8],
    sent: usize,
    started: Instant,
    deadline: Instant,
}

impl Outgoing<'_> {
    fn rest(&self) -> &[u8] {
        self.data.get(self.sent..).unwrap_or_default()
    }

    /// Waits until `fd` takes more bytes, or fails at the deadline. A message cut short
    /// is reported with how much of it went out (the connection is then unusable).
    fn wait_writable(&self, fd: BorrowedFd<'_>) -> Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::WriteTimeout { after: self.started.elapsed(), sent: self.sent });
        }
        let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
        match rustix::event::poll(&mut fds, Some(&timespec(left))) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }

    /// `send(2)` on a non-blocking socket until everything is out, without `SIGPIPE`.
    fn send_all(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        while !self.rest().is_empty() {
            match rustix::net::send(fd, self.rest(), SendFlags::NOSIGNAL) {
                Ok(0) => return Err(TransportError::Eof),
                Ok(n) => self.sent = self.sent.saturating_add(n),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => self.wait_writable(fd)?,
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(TransportError::Eof)
                }
                Err(e) => return Err(TransportError::Io(e.into())),
            }
        }
        Ok(())
    }

    /// `write(2)` on a non-blocking pipe until everything is out. A closed reader is
    /// [`TransportError::Eof`] (`EPIPE`; Rust programs ignore `SIGPIPE`).
    fn write_all(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        while !self.rest().is_empty() {
            match rustix::io::write(fd, self.rest()) {
                Ok(0) => return Err(TransportError::Eof),
                Ok(n) => self.sent = self.sent.saturating_add(n),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::PIPE) => return Err(TransportError::Eof),
                Err(rustix::io::Errno::AGAIN) => self.wait_writable(fd)?,
                Err(e) => return Err(TransportError::Io(e.into())),
            }
        }
        Ok(())
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec { tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), tv_nsec: i64::from(d.subsec_nanos()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Nobody reads the other end: the buffer fills, and the write gives up at its
    /// deadline instead of blocking.
    #[test]
    fn writes_to_a_peer_that_stops_reading_time_out() {
        let big = vec![b'x'; 4 << 20];
        let (a, _keep_open) = UnixStream::pair().unwrap();
        let mut w = LineWriter::socket(a).unwrap();
        let t = Instant::now();
        let err = w.write_line(&big, t + Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, TransportError::WriteTimeout { sent, .. } if sent > 0), "{err:?}");
        assert!(t.elapsed() >= Duration::from_millis(200) && t.elapsed() < Duration::from_secs(5));

        let (r, wfd) = rustix::pipe::pipe().unwrap();
        let mut w = LineWriter::pipe(wfd).unwrap();
        let t = Instant::now();
        let err = w.write_line(&big, t + Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, TransportError::WriteTimeout { .. }), "{err:?}");
        assert!(t.elapsed() >= Duration::from_millis(200) && t.elapsed() < Duration::from_secs(5));
        // A closed reader is the end of the connection, not a signal or a hang.
        drop(r);
        assert!(matches!(
            w.write_line(b"{}", Instant::now() + Duration::from_secs(5)),
            Err(TransportError::Eof)
        ));
    }

    /// A peer that reads 256 KiB every 1.5 s takes a 4 MiB message in pieces: each piece
    /// makes progress, but the whole write still ends at its one deadline (2 s), not
    /// 2 s after the last piece (which took 26 s when each `send` had its own timeout).
    #[test]
    fn a_slow_reader_does_not_stretch_the_deadline() {
        let big = vec![b'x'; 4 << 20];
        let (a, b) = UnixStream::pair().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let reader_stop = std::sync::Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut b = b;
            let mut chunk = vec![0u8; 256 << 10];
            while !reader_stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1500));
                let mut got = 0;
                while got < chunk.len() {
                    match b.read(chunk.get_mut(got..).unwrap_or_default()) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
            }
        });
        let mut w = LineWriter::socket(a).unwrap();
        let t = Instant::now();
        let err = w.write_line(&big, t + Duration::from_secs(2)).unwrap_err();
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        w.shutdown();
        reader.join().unwrap();
        assert!(matches!(err, TransportError::WriteTimeout { sent, .. } if sent > 0), "{err:?}");
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    }

    fn pair(max: usize) -> (UnixStream, LineReader) {
        let (a, b) = UnixStream::pair().unwrap();
        (a, LineReader::new(OwnedFd::from(b), max))
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        let (mut w, mut r) = pair(1024);
        w.write_all(b"{\"a\":1}\r\n{\"b\":2}\n").unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(r.read_line(None, &stop).unwrap(), b"{\"a\":1}");
        assert_eq!(r.read_line(None, &stop).unwrap(), b"{\"b\":2}");
    }

    #[test]
    fn long_line_is_rejected_with_bounded_buffer() {
        let (mut w, mut r) = pair(1000);
        let t = std::thread::spawn(move || {
            // Writes until the reader hangs up; never sends a newline.
            let chunk = vec![b'x'; 4096];
            while w.write_all(&chunk).is_ok() {}
        });
        let stop = AtomicBool::new(false);
        let err = r.read_line(Some(Instant::now() + Duration::from_secs(10)), &stop).unwrap_err();
        assert!(matches!(err, TransportError::LineTooLong { limit: 1000 }), "{err:?}");
        assert!(r.buf.capacity() <= CHUNK + 1001);
        drop(r);
        t.join().unwrap();
    }

    #[test]
    fn eof_and_timeout_are_distinct() {
        let (w, mut r) = pair(1000);
        let stop = AtomicBool::new(false);
        let err = r.read_line(Some(Instant::now() + Duration::from_millis(50)), &stop).unwrap_err();
        assert!(matches!(err, TransportError::Timeout(_)), "{err:?}");
        drop(w);
        let err = r.read_line(Some(Instant::now() + Duration::from_secs(5)), &stop).unwrap_err();
        assert!(matches!(err, TransportError::Eof), "{err:?}");
    }

    #[test]
    fn stop_flag_ends_a_blocked_read() {
        let (_w, mut r) = pair(1000);
        let stop = AtomicBool::new(true);
        assert!(matches!(r.read_line(None, &stop), Err(TransportError::Stopped)));
    }

    #[test]
    fn pipes_cannot_pass_fds() {
        let (_r, w) = rustix::pipe::pipe().unwrap();
        let mut w = LineWriter::pipe(w).unwrap();
        let null = File::open("/dev/null").unwrap();
        let err = w
            .write_line_with_fds(b"{}", &[null.as_fd()], Instant::now() + Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, TransportError::FdPassingUnsupported));
    }
}

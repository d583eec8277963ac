//! A scripted QMP peer: plays back what "QEMU" sends, turn by turn, over a socket pair.
//!
//! The script is the fuzz input cut at NUL bytes (QEMU never sends one): segment 0 is
//! sent as soon as the client connects (the greeting, and whatever else the input puts
//! there), segment *k* once the client has sent its *k*-th line (its *k*-th command), so
//! a reply can follow the command it answers and an event can arrive while a command
//! waits. After the last segment the peer closes its side; it reads the client's lines
//! until the client goes away. Every socket operation of the peer has a deadline, so a
//! client that stops reading cannot hang the peer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the peer waits for one read or write before it gives up.
const PEER_DEADLINE: Duration = Duration::from_secs(2);

/// Longest line the peer reads from the client (commands are small).
const MAX_COMMAND: u64 = 1 << 20;

/// The segments of a script.
pub fn segments(data: &[u8]) -> Vec<Vec<u8>> {
    data.split(|b| *b == 0).map(<[u8]>::to_vec).collect()
}

/// Starts the peer on one end of a new socket pair and returns the other end.
pub fn start(script: Vec<Vec<u8>>) -> std::io::Result<(UnixStream, JoinHandle<()>)> {
    let (client, peer) = UnixStream::pair()?;
    peer.set_read_timeout(Some(PEER_DEADLINE))?;
    peer.set_write_timeout(Some(PEER_DEADLINE))?;
    let handle = std::thread::Builder::new().name("qmp-peer".into()).spawn(move || serve(peer, script))?;
    Ok((client, handle))
}

fn serve(peer: UnixStream, script: Vec<Vec<u8>>) {
    let Ok(read_half) = peer.try_clone() else { return };
    let mut reader = BufReader::new(read_half).take(MAX_COMMAND);
    let mut writer = &peer;
    let mut line = Vec::new();
    for (turn, segment) in script.iter().enumerate() {
        if turn > 0 {
            line.clear();
            reader.set_limit(MAX_COMMAND);
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        if writer.write_all(segment).is_err() {
            return;
        }
    }
    let _ = peer.shutdown(Shutdown::Write);
    // Keep reading so that the client's writes never block on a full buffer.
    loop {
        line.clear();
        reader.set_limit(MAX_COMMAND);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

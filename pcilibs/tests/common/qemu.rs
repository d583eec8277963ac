//! QEMU q35 started paused, with the test acting as firmware through the monitor.
//!
//! Configuration space is reached with port I/O on 0xcf8/0xcfc (`o`/`i` monitor commands;
//! the first 256 bytes, readable and writable) and through the ECAM window enabled at
//! 0xb0000000 (`xp`; all 4096 bytes, read-only).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcilibs::bdf::Bdf;
use pcilibs::decode::Function;
use pcilibs::sizing::probe::ConfigAccess;
use serde_json::{json, Value};

pub(crate) const QEMU: &str = "qemu-system-x86_64";
pub(crate) const ECAM_BASE: u64 = 0xb000_0000;

pub(crate) struct Qemu {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    _dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Starts QEMU paused with `args` added to a bare q35 command line.
    pub(crate) fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-M",
            "q35",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-m",
            "256",
            "-cpu",
            "max,phys-bits=46",
        ])
        .args(args)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {QEMU}: {e}; run the tests with `cargo xtask test`, which provisions QEMU into \
                 target/e2e/cache and puts it first on PATH, or put a {QEMU} on PATH (Debian's qemu-system-x86)"
            )
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("{QEMU} exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "{QEMU} did not open its QMP socket within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut q = Qemu { child, reader: BufReader::new(stream), writer, _dir: dir };
        q.line(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    pub(crate) fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read (20 s deadline)");
        assert!(!l.is_empty(), "QMP connection closed");
        serde_json::from_str(&l).unwrap()
    }

    pub(crate) fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = json!({ "execute": execute, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{execute}: {v}");
        }
    }

    pub(crate) fn hmp(&mut self, line: &str) -> String {
        self.cmd("human-monitor-command", json!({ "command-line": line })).as_str().unwrap().to_string()
    }

    pub(crate) fn cf8(&mut self, b: Bdf, offset: u16) {
        let addr = 0x8000_0000u32
            | (u32::from(b.bus()) << 16)
            | (u32::from(b.device()) << 11)
            | (u32::from(b.function()) << 8)
            | u32::from(offset & 0xfc);
        let out = self.hmp(&format!("o /w 0xcf8 {addr:#x}"));
        assert!(out.is_empty(), "port write: {out}");
    }

    pub(crate) fn read32(&mut self, b: Bdf, offset: u16) -> u32 {
        self.cf8(b, offset);
        let out = self.hmp("i /w 0xcfc");
        let hex = out.trim().rsplit("0x").next().unwrap();
        u32::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("port read: {out:?}"))
    }

    pub(crate) fn write32(&mut self, b: Bdf, offset: u16, value: u32) {
        self.cf8(b, offset);
        let out = self.hmp(&format!("o /w 0xcfc {value:#x}"));
        assert!(out.is_empty(), "port write: {out}");
    }

    /// All 4096 bytes through ECAM (read-only path).
    pub(crate) fn ecam(&mut self, b: Bdf) -> Vec<u8> {
        let base = ECAM_BASE | (u64::from(b.bus()) << 20) | (u64::from(b.devfn()) << 12);
        let out = self.hmp(&format!("xp /1024wx {base:#x}"));
        let mut bytes = Vec::with_capacity(4096);
        for line in out.lines() {
            let (_, words) = line.split_once(':').unwrap();
            for w in words.split_whitespace() {
                let v = u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap();
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        assert_eq!(bytes.len(), 4096, "{out}");
        bytes
    }

    /// Enables ECAM (q35 PCIEXBAR at 0xb0000000, 256 buses) and numbers every bridge
    /// depth first like SeaBIOS (honouring QEMU's bus reservation capability), starting
    /// with bus 0 and then each extra root bus (`pxb-pcie` `bus_nr`) in `extra_roots`.
    pub(crate) fn firmware(&mut self, extra_roots: &[u8]) -> Vec<Bdf> {
        let host = Bdf::default();
        self.write32(host, 0x64, 0);
        self.write32(host, 0x60, (ECAM_BASE as u32) | 1);
        let mut found = Vec::new();
        let mut next = 0u8;
        self.scan(0, &mut next, &mut found);
        for &root in extra_roots {
            next = next.max(root);
            self.scan(root, &mut next, &mut found);
        }
        found
    }

    pub(crate) fn scan(&mut self, bus: u8, next: &mut u8, found: &mut Vec<Bdf>) {
        for dev in 0..32 {
            for func in 0..8 {
                let b = Bdf::new(0, bus, dev, func).unwrap();
                if self.read32(b, 0) & 0xffff == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                found.push(b);
                let hdr = (self.read32(b, 0x0c) >> 16) as u8;
                if hdr & 0x7f == 1 {
                    *next += 1;
                    let secondary = *next;
                    let old = self.read32(b, 0x18);
                    let with = |sub: u8| {
                        (old & 0xff00_0000)
                            | (u32::from(sub) << 16)
                            | (u32::from(secondary) << 8)
                            | u32::from(bus)
                    };
                    self.write32(b, 0x18, with(0xff));
                    self.scan(secondary, next, found);
                    let reserve = Function::decode(&self.ecam(b))
                        .ok()
                        .and_then(|f| f.qemu_resource_reserve())
                        .and_then(|r| r.bus)
                        .and_then(|n| u8::try_from(n).ok())
                        .unwrap_or(0);
                    *next = (*next).max(secondary.saturating_add(reserve));
                    self.write32(b, 0x18, with(*next));
                }
                if func == 0 && hdr & 0x80 == 0 {
                    break;
                }
            }
        }
    }
}

/// Configuration access to one function through port I/O (first 256 bytes).
pub(crate) struct PortIo<'a> {
    pub(crate) q: &'a mut Qemu,
    pub(crate) bdf: Bdf,
}

impl ConfigAccess for PortIo<'_> {
    type Error = String;
    fn config_size(&self) -> usize {
        256
    }
    fn read_u32(&mut self, offset: u16) -> Result<u32, String> {
        Ok(self.q.read32(self.bdf, offset))
    }
    fn write_u32(&mut self, offset: u16, value: u32) -> Result<(), String> {
        self.q.write32(self.bdf, offset, value);
        Ok(())
    }
}

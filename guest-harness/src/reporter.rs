//! Host side of the reporter protocol: the guest's `/xt/reporter.sh` prints lines that
//! start with [`PREFIX`] on the serial console; this module turns them into typed
//! [`GuestEvent`]s and folds those into a [`GuestState`].
//!
//! The guest prints a full snapshot of `/sys/bus/pci/devices` (and `/sys/bus/ccw/devices`)
//! at boot and whenever anything there changes (polled every 200 ms), framed by
//! `SNAP seq` … `END seq`; a snapshot replaces the previous one only when it is complete,
//! so a state never mixes two points in time. Kernel messages about BARs, bridge windows
//! and pciehp arrive as they are logged.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use pcilibs::bdf::Bdf;

/// Every protocol line starts with this (anything before it on the line is ignored, so a
/// kernel message that lacked a newline cannot hide a report).
pub const PREFIX: &str = "@@XT ";

/// A protocol line that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad reporter line {line:?}: {reason}")]
pub struct ParseError {
    /// The line (after the prefix).
    pub line: String,
    /// What is wrong.
    pub reason: String,
}

/// `IORESOURCE_IO`.
pub const IORESOURCE_IO: u64 = 0x100;
/// `IORESOURCE_MEM`.
pub const IORESOURCE_MEM: u64 = 0x200;
/// `IORESOURCE_PREFETCH`.
pub const IORESOURCE_PREFETCH: u64 = 0x2000;
/// `IORESOURCE_MEM_64`.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// `IORESOURCE_DISABLED`.
pub const IORESOURCE_DISABLED: u64 = 0x1000_0000;
/// `IORESOURCE_UNSET`: the kernel knows the size but gave the resource no address.
pub const IORESOURCE_UNSET: u64 = 0x2000_0000;

/// Index of the first bridge window in a bridge's `resource` file (io, mem, prefetchable
/// mem follow): after 6 BARs, the ROM and 6 SR-IOV resources.
pub const FIRST_BRIDGE_WINDOW: u8 = 13;

/// One line of a device's sysfs `resource` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resource {
    /// Line number: 0–5 BARs, 6 ROM, 7–12 SR-IOV VF BARs (totals), 13–16 bridge windows.
    pub index: u8,
    /// First address.
    pub start: u64,
    /// Last address.
    pub end: u64,
    /// Kernel `IORESOURCE_*` flags.
    pub flags: u64,
}

/// What a `resource` line describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResourceKind {
    /// A BAR, 0–5.
    Bar(u8),
    /// The expansion ROM.
    Rom,
    /// An SR-IOV VF BAR (the total over all VFs), 0–5.
    VfBar(u8),
    /// A bridge window: 0 io, 1 mem, 2 prefetchable mem.
    BridgeWindow(u8),
}

impl Resource {
    /// What this line describes.
    pub fn kind(&self) -> ResourceKind {
        match self.index {
            0..=5 => ResourceKind::Bar(self.index),
            6 => ResourceKind::Rom,
            7..=12 => ResourceKind::VfBar(self.index - 7),
            n => ResourceKind::BridgeWindow(n.saturating_sub(FIRST_BRIDGE_WINDOW)),
        }
    }

    /// Size in bytes (`end - start + 1`; 0 for an empty line).
    pub fn size(&self) -> u64 {
        if self.end < self.start {
            0
        } else {
            (self.end - self.start).saturating_add(1)
        }
    }

    /// Whether the kernel gave it an address (not `UNSET`/`DISABLED`, not at 0).
    pub fn is_assigned(&self) -> bool {
        self.flags & (IORESOURCE_UNSET | IORESOURCE_DISABLED) == 0 && self.start != 0 && self.end > self.start
    }

    /// I/O space.
    pub fn is_io(&self) -> bool {
        self.flags & IORESOURCE_IO != 0
    }

    /// Memory space.
    pub fn is_mem(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }

    /// Prefetchable memory.
    pub fn is_prefetchable(&self) -> bool {
        self.flags & IORESOURCE_PREFETCH != 0
    }

    /// 64-bit memory.
    pub fn is_mem64(&self) -> bool {
        self.flags & IORESOURCE_MEM_64 != 0
    }

    /// Whether `other` lies within this range.
    pub fn contains(&self, other: &Resource) -> bool {
        other.start >= self.start && other.end <= self.end
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = if self.is_io() { "io" } else { "mem" };
        let pref = if self.is_prefetchable() { " pref" } else { "" };
        let bits = if self.is_mem64() { " 64bit" } else { "" };
        if self.is_assigned() {
            write!(f, "[{space} {:#x}-{:#x}{bits}{pref}]", self.start, self.end)
        } else {
            write!(f, "[{space} size {:#x}{bits}{pref} unassigned]", self.size())
        }
    }
}

/// An s390x zPCI function's identifiers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Zpci {
    /// The `uid` attribute.
    pub uid: String,
    /// The `function_id` attribute.
    pub fid: String,
}

/// One PCI function as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PciDevice {
    /// Its address.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (base, sub, prog-if).
    pub class: u32,
    /// Bound driver, if any.
    pub driver: Option<String>,
    /// Non-empty `resource` lines.
    pub resources: Vec<Resource>,
    /// Bridges above it, from the root bus down (empty on a root bus).
    pub upstream: Vec<Bdf>,
    /// zPCI identifiers (s390x).
    pub zpci: Option<Zpci>,
    /// Inode of its sysfs directory: changes whenever the function is removed and added
    /// again, even at the same address with the same ids.
    pub node: Option<u64>,
    /// NUMA node from sysfs `numa_node`, when the guest has NUMA and knows it (not -1).
    pub numa_node: Option<u32>,
}

impl PciDevice {
    /// The BARs (resources 0–5) the kernel knows of.
    pub fn bars(&self) -> impl Iterator<Item = &Resource> {
        self.resources.iter().filter(|r| matches!(r.kind(), ResourceKind::Bar(_)))
    }

    /// The bridge windows, if this is a bridge.
    pub fn windows(&self) -> impl Iterator<Item = &Resource> {
        self.resources.iter().filter(|r| matches!(r.kind(), ResourceKind::BridgeWindow(_)))
    }

    /// The bridge directly above, if any.
    pub fn parent(&self) -> Option<Bdf> {
        self.upstream.last().copied()
    }

    /// Whether the class is a PCI-to-PCI bridge (0x0604).
    pub fn is_bridge(&self) -> bool {
        self.class >> 8 == 0x0604
    }
}

/// One s390x channel device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CcwDevice {
    /// Bus id, e.g. `0.0.0042`.
    pub busid: String,
    /// Control unit type, e.g. `3832/01` (virtio).
    pub cutype: String,
    /// Device type.
    pub devtype: String,
    /// Whether the device is online.
    pub online: bool,
    /// Bound driver, if any.
    pub driver: Option<String>,
}

/// One parsed reporter line.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum GuestEvent {
    /// A snapshot starts.
    SnapshotBegin {
        /// Sequence number.
        seq: u64,
        /// Guest uptime in seconds.
        uptime: f64,
    },
    /// A PCI function of the snapshot.
    Pci {
        /// Address.
        bdf: Bdf,
        /// Vendor id.
        vendor: u16,
        /// Device id.
        device: u16,
        /// Class code.
        class: u32,
    },
    /// A `resource` line of a function.
    Resource {
        /// Address.
        bdf: Bdf,
        /// The line.
        resource: Resource,
    },
    /// A function's place in the hierarchy: the bridges above it, then itself.
    Link {
        /// Addresses from the root bus down, ending with the function.
        chain: Vec<Bdf>,
    },
    /// The inode of a function's sysfs directory.
    Node {
        /// Address.
        bdf: Bdf,
        /// Inode number.
        inode: u64,
    },
    /// A function's bound driver.
    Driver {
        /// Address.
        bdf: Bdf,
        /// Driver name.
        driver: String,
    },
    /// zPCI identifiers of a function.
    Zpci {
        /// Address.
        bdf: Bdf,
        /// Identifiers.
        zpci: Zpci,
    },
    /// A PCI function's NUMA node.
    Numa {
        /// Address.
        bdf: Bdf,
        /// Node number.
        node: u32,
    },
    /// A channel device of the snapshot.
    Ccw(CcwDevice),
    /// A channel device's driver.
    CcwDriver {
        /// Bus id.
        busid: String,
        /// Driver name.
        driver: String,
    },
    /// The snapshot is complete.
    SnapshotEnd {
        /// Sequence number.
        seq: u64,
    },
    /// Userspace is up and the first snapshot has been printed.
    Ready {
        /// Guest uptime in seconds.
        uptime: f64,
        /// Kernel release.
        release: String,
    },
    /// A kernel message about BARs, windows or pciehp.
    Kmsg(String),
    /// A line of a host command's output.
    Output {
        /// Command id.
        id: u64,
        /// The line.
        line: String,
    },
    /// A host command finished.
    Status {
        /// Command id.
        id: u64,
        /// Exit status.
        code: i32,
    },
    /// The guest reported an error of its own (a module that failed to load, …).
    Error(String),
}

fn num<T: FromStr>(s: Option<&str>, what: &str) -> Result<T, String> {
    let s = s.ok_or_else(|| format!("missing {what}"))?;
    s.parse().map_err(|_| format!("bad {what} {s:?}"))
}

fn hex(s: Option<&str>, what: &str) -> Result<u64, String> {
    let s = s.ok_or_else(|| format!("missing {what}"))?;
    u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| format!("bad {what} {s:?}"))
}

fn bdf(s: Option<&str>) -> Result<Bdf, String> {
    Bdf::parse(s.ok_or_else(|| "missing address".to_string())?).map_err(|e| e.to_string())
}

fn word(s: Option<&str>, what: &str) -> Result<String, String> {
    s.map(str::to_string).ok_or_else(|| format!("missing {what}"))
}

/// The part of a console line after [`PREFIX`], if it has one.
pub fn protocol_part(line: &str) -> Option<&str> {
    line.find(PREFIX).and_then(|at| line.get(at + PREFIX.len()..))
}

/// Parses the part of a line after [`PREFIX`].
pub fn parse(body: &str) -> Result<GuestEvent, ParseError> {
    parse_fields(body).map_err(|reason| ParseError { line: body.to_string(), reason })
}

fn rest_after(body: &str, words: usize) -> String {
    body.splitn(words + 1, ' ').nth(words).unwrap_or("").to_string()
}

fn parse_fields(body: &str) -> Result<GuestEvent, String> {
    let mut f = body.split_whitespace();
    let tag = f.next().ok_or("empty line")?;
    Ok(match tag {
        "SNAP" => GuestEvent::SnapshotBegin { seq: num(f.next(), "seq")?, uptime: num(f.next(), "uptime")? },
        "END" => GuestEvent::SnapshotEnd { seq: num(f.next(), "seq")? },
        "PCI" => {
            let bdf = bdf(f.next())?;
            let vendor = u16::try_from(hex(f.next(), "vendor")?).map_err(|_| "vendor out of range")?;
            let device = u16::try_from(hex(f.next(), "device")?).map_err(|_| "device out of range")?;
            let class = u32::try_from(hex(f.next(), "class")?).map_err(|_| "class out of range")?;
            GuestEvent::Pci { bdf, vendor, device, class }
        }
        "RES" => {
            let bdf = bdf(f.next())?;
            let index = num(f.next(), "index")?;
            let resource = Resource {
                index,
                start: hex(f.next(), "start")?,
                end: hex(f.next(), "end")?,
                flags: hex(f.next(), "flags")?,
            };
            GuestEvent::Resource { bdf, resource }
        }
        "LINK" => {
            let path = word(f.next(), "path")?;
            let chain: Vec<Bdf> = path.split('/').filter_map(|c| c.parse().ok()).collect();
            if chain.is_empty() {
                return Err(format!("no PCI address in {path:?}"));
            }
            GuestEvent::Link { chain }
        }
        "INO" => GuestEvent::Node { bdf: bdf(f.next())?, inode: num(f.next(), "inode")? },
        "NUMA" => GuestEvent::Numa { bdf: bdf(f.next())?, node: num(f.next(), "NUMA node")? },
        "DRV" => GuestEvent::Driver { bdf: bdf(f.next())?, driver: word(f.next(), "driver")? },
        "ZPCI" => {
            let bdf = bdf(f.next())?;
            GuestEvent::Zpci { bdf, zpci: Zpci { uid: word(f.next(), "uid")?, fid: word(f.next(), "fid")? } }
        }
        "CCW" => GuestEvent::Ccw(CcwDevice {
            busid: word(f.next(), "bus id")?,
            cutype: word(f.next(), "cutype")?,
            devtype: word(f.next(), "devtype")?,
            online: f.next() == Some("1"),
            driver: None,
        }),
        "CDRV" => {
            GuestEvent::CcwDriver { busid: word(f.next(), "bus id")?, driver: word(f.next(), "driver")? }
        }
        "READY" => {
            GuestEvent::Ready { uptime: num(f.next(), "uptime")?, release: word(f.next(), "release")? }
        }
        "KMSG" => GuestEvent::Kmsg(rest_after(body, 1)),
        "OUT" => GuestEvent::Output { id: num(f.next(), "id")?, line: rest_after(body, 2) },
        "RC" => GuestEvent::Status { id: num(f.next(), "id")?, code: num(f.next(), "status")? },
        "ERROR" => GuestEvent::Error(rest_after(body, 1)),
        other => return Err(format!("unknown tag {other:?}")),
    })
}

/// Output of a command run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Output lines (stdout and stderr together).
    pub lines: Vec<String>,
    /// Exit status, once it finished.
    pub status: Option<i32>,
}

/// A kernel message with the host time it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelMessage {
    /// When the host read it.
    pub at: Instant,
    /// The message text.
    pub text: String,
}

/// The guest's userspace came up.
#[derive(Clone, Debug, PartialEq)]
pub struct Ready {
    /// When the host read the line.
    pub at: Instant,
    /// Guest uptime then, in seconds.
    pub uptime: f64,
    /// Guest kernel release.
    pub release: String,
}

/// Lines of console output kept for error messages.
const CONSOLE_TAIL: usize = 60;

#[derive(Clone, Debug, Default)]
struct Pending {
    seq: u64,
    pci: BTreeMap<Bdf, PciDevice>,
    ccw: BTreeMap<String, CcwDevice>,
}

/// Everything the guest reported so far.
#[derive(Clone, Debug, Default)]
pub struct GuestState {
    /// Set once userspace is up.
    pub ready: Option<Ready>,
    /// PCI functions of the latest complete snapshot.
    pub pci: BTreeMap<Bdf, PciDevice>,
    /// Channel devices of the latest complete snapshot.
    pub ccw: BTreeMap<String, CcwDevice>,
    /// Sequence number of the latest complete snapshot (0: none yet).
    pub snapshot_seq: u64,
    /// When the latest snapshot completed.
    pub snapshot_at: Option<Instant>,
    /// Kernel messages about BARs, bridge windows and pciehp.
    pub kmsg: Vec<KernelMessage>,
    /// Errors the guest reported and lines that did not parse.
    pub errors: Vec<String>,
    /// A kernel panic line, if the console showed one.
    pub panic: Option<String>,
    /// Set when QEMU has exited: how.
    pub exited: Option<String>,
    /// The last console lines that were not protocol lines.
    pub console_tail: VecDeque<String>,
    /// Host commands by id.
    pub commands: BTreeMap<u64, CommandOutput>,
    pending: Option<Pending>,
}

impl GuestState {
    /// Feeds one console line (without its line ending).
    pub fn feed_line(&mut self, line: &str, now: Instant) {
        let line = line.trim_end_matches('\r');
        match protocol_part(line) {
            Some(body) => match parse(body) {
                Ok(event) => self.apply(event, now),
                Err(e) => self.errors.push(e.to_string()),
            },
            None => {
                if line.contains("Kernel panic") && self.panic.is_none() {
                    self.panic = Some(line.to_string());
                }
                if self.console_tail.len() == CONSOLE_TAIL {
                    self.console_tail.pop_front();
                }
                self.console_tail.push_back(line.to_string());
            }
        }
    }

    /// Applies one event.
    pub fn apply(&mut self, event: GuestEvent, now: Instant) {
        match event {
            GuestEvent::SnapshotBegin { seq, .. } => {
                self.pending = Some(Pending { seq, ..Pending::default() })
            }
            GuestEvent::SnapshotEnd { seq } => {
                if let Some(p) = self.pending.take().filter(|p| p.seq == seq) {
                    self.pci = p.pci;
                    self.ccw = p.ccw;
                    self.snapshot_seq = seq;
                    self.snapshot_at = Some(now);
                }
            }
            GuestEvent::Ready { uptime, release } => self.ready = Some(Ready { at: now, uptime, release }),
            GuestEvent::Kmsg(text) => self.kmsg.push(KernelMessage { at: now, text }),
            GuestEvent::Output { id, line } => self.commands.entry(id).or_default().lines.push(line),
            GuestEvent::Status { id, code } => self.commands.entry(id).or_default().status = Some(code),
            GuestEvent::Error(text) => self.errors.push(text),
            other => self.apply_to_pending(other),
        }
    }

    fn apply_to_pending(&mut self, event: GuestEvent) {
        let Some(p) = self.pending.as_mut() else { return };
        match event {
            GuestEvent::Pci { bdf, vendor, device, class } => {
                p.pci.insert(
                    bdf,
                    PciDevice {
                        bdf,
                        vendor,
                        device,
                        class,
                        driver: None,
                        resources: Vec::new(),
                        upstream: Vec::new(),
                        zpci: None,
                        node: None,
                        numa_node: None,
                    },
                );
            }
            GuestEvent::Resource { bdf, resource } => {
                if let Some(d) = p.pci.get_mut(&bdf) {
                    d.resources.push(resource);
                }
            }
            GuestEvent::Link { mut chain } => {
                if let Some(bdf) = chain.pop() {
                    if let Some(d) = p.pci.get_mut(&bdf) {
                        d.upstream = chain;
                    }
                }
            }
            GuestEvent::Node { bdf, inode } => {
                if let Some(d) = p.pci.get_mut(&bdf) {
                    d.node = Some(inode);
                }
            }
            GuestEvent::Driver { bdf, driver } => {
                if let Some(d) = p.pci.get_mut(&bdf) {
                    d.driver = Some(driver);
                }
            }
            GuestEvent::Zpci { bdf, zpci } => {
                if let Some(d) = p.pci.get_mut(&bdf) {
                    d.zpci = Some(zpci);
                }
            }
            GuestEvent::Numa { bdf, node } => {
                if let Some(d) = p.pci.get_mut(&bdf) {
                    d.numa_node = Some(node);
                }
            }
            GuestEvent::Ccw(dev) => {
                p.ccw.insert(dev.busid.clone(), dev);
            }
            GuestEvent::CcwDriver { busid, driver } => {
                if let Some(d) = p.ccw.get_mut(&busid) {
                    d.driver = Some(driver);
                }
            }
            _ => {}
        }
    }

    /// Functions with the given vendor and device id.
    pub fn find(&self, vendor: u16, device: u16) -> impl Iterator<Item = &PciDevice> {
        self.pci.values().filter(move |d| d.vendor == vendor && d.device == device)
    }

    /// Kernel messages that mention `bdf`.
    pub fn kmsg_about(&self, bdf: Bdf) -> impl Iterator<Item = &KernelMessage> {
        let needle = bdf.to_string();
        self.kmsg.iter().filter(move |m| m.text.contains(&needle))
    }

    /// Checks the BARs of `bdf`: every BAR the guest reports and every `expected` one
    /// (index, size) must be assigned and, below a bridge, lie inside one of that bridge's
    /// windows of the same space; and no kernel message since `since` may say that a BAR
    /// of `bdf` could not be assigned. (A BAR the kernel failed to assign is reset to an
    /// empty `resource` line, so without `expected` or the message it would go unseen.)
    /// Returns the problems found; empty means all good.
    pub fn bar_problems(&self, bdf: Bdf, expected: &[(u8, u64)], since: Option<Instant>) -> Vec<String> {
        let Some(dev) = self.pci.get(&bdf) else { return vec![format!("{bdf} is not present")] };
        let parent = dev.parent().and_then(|p| self.pci.get(&p));
        let mut problems = Vec::new();
        for &(index, size) in expected {
            match dev.bars().find(|b| b.index == index) {
                None => {
                    problems.push(format!("{bdf} BAR {index} ({size:#x} bytes) has no resource in the guest"))
                }
                Some(bar) if bar.size() != size => {
                    problems.push(format!("{bdf} BAR {index} is {:#x} bytes, expected {size:#x}", bar.size()))
                }
                Some(_) => {}
            }
        }
        for bar in dev.bars() {
            if !bar.is_assigned() {
                problems.push(format!("{bdf} BAR {}: {bar}", bar.index));
                continue;
            }
            if let Some(parent) = parent {
                let fits =
                    parent.windows().any(|w| w.is_assigned() && w.is_io() == bar.is_io() && w.contains(bar));
                if !fits {
                    problems.push(format!(
                        "{bdf} BAR {} {bar} is outside every window of {}",
                        bar.index, parent.bdf
                    ));
                }
            }
        }
        // The kernel may fail a BAR, grow the bridge window and then succeed: only the
        // last message about each BAR counts.
        let mut last: BTreeMap<Option<u8>, &str> = BTreeMap::new();
        for m in self.kmsg_about(bdf).filter(|m| since.map_or(true, |t| m.at >= t)) {
            let failed = BAR_FAILURES.iter().any(|f| m.text.contains(f));
            let bar = bar_number(&m.text);
            if failed || (bar.is_some() && m.text.ends_with("assigned")) {
                last.insert(bar, if failed { m.text.as_str() } else { "" });
            }
        }
        for text in last.values().filter(|t| !t.is_empty()) {
            if !problems.iter().any(|p| p.contains(text)) {
                problems.push(format!("kernel: {text}"));
            }
        }
        problems
    }
}

/// The BAR number in a kernel message (`… BAR 2 [mem …]`, `… BAR 2: …`).
pub fn bar_number(text: &str) -> Option<u8> {
    let rest = &text[text.find("BAR ")? + 4..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Kernel message fragments that mean a BAR or window got no address.
pub const BAR_FAILURES: &[&str] = &["can't assign", "failed to assign", "no space"];

#[cfg(test)]
mod tests {
    use super::*;

    const SNAPSHOT: &str = "\
@@XT SNAP 1 2.50
@@XT PCI 0000:00:00.0 0x8086 0x29c0 0x060000
@@XT PCI 0000:00:01.0 0x1b36 0x000c 0x060400
@@XT RES 0000:00:01.0 0 0x00000000fea00000 0x00000000fea00fff 0x0000000000040200
@@XT RES 0000:00:01.0 14 0x00000000fe800000 0x00000000fe9fffff 0x0000000000000200
@@XT RES 0000:00:01.0 15 0x0000000400000000 0x00000043ffffffff 0x0000000000102201
@@XT PCI 0000:01:00.0 0x1af4 0x1110 0x050000
@@XT RES 0000:01:00.0 2 0x0000002000000000 0x0000003fffffffff 0x000000000014220c
@@XT PCI 0000:01:00.1 0x1af4 0x1110 0x050000
@@XT RES 0000:01:00.1 2 0x0000000000000000 0x0000001fffffffff 0x000000002014220c
@@XT LINK ../../../devices/pci0000:00/0000:00:00.0
@@XT LINK ../../../devices/pci0000:00/0000:00:01.0
@@XT LINK ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
@@XT LINK ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.1
@@XT INO 0000:01:00.0 4242
@@XT DRV 0000:00:01.0 pcieport
@@XT END 1
";

    fn state(text: &str) -> GuestState {
        let mut s = GuestState::default();
        let now = Instant::now();
        for line in text.lines() {
            s.feed_line(line, now);
        }
        s
    }

    #[test]
    fn snapshot_builds_devices_with_hierarchy() {
        let s = state(SNAPSHOT);
        assert_eq!(s.snapshot_seq, 1);
        assert_eq!(s.pci.len(), 4);
        let dev: Bdf = "0000:01:00.0".parse().unwrap();
        let d = &s.pci[&dev];
        assert_eq!((d.vendor, d.device, d.class), (0x1af4, 0x1110, 0x050000));
        assert_eq!(d.parent(), Some("0000:00:01.0".parse().unwrap()));
        assert_eq!(d.node, Some(4242));
        assert_eq!(s.pci[&"0000:00:01.0".parse().unwrap()].node, None);
        assert_eq!(s.pci[&"0000:00:01.0".parse().unwrap()].driver.as_deref(), Some("pcieport"));
        let bar = d.bars().next().unwrap();
        assert_eq!(bar.size(), 128 << 30);
        assert!(bar.is_assigned() && bar.is_mem64() && bar.is_prefetchable());
        assert!(s.bar_problems(dev, &[(2, 128 << 30)], None).is_empty());
        let unassigned: Bdf = "0000:01:00.1".parse().unwrap();
        let problems = s.bar_problems(unassigned, &[], None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("unassigned"), "{problems:?}");
        let problems = s.bar_problems(dev, &[(0, 0x100), (2, 64 << 30)], None);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn a_bar_reset_after_failure_is_caught_by_expectation_and_message() {
        let mut s = state(SNAPSHOT);
        let dev: Bdf = "0000:01:00.0".parse().unwrap();
        let now = Instant::now();
        s.feed_line(
            "@@XT KMSG pci 0000:01:00.0: BAR 4 [mem size 0x800000000 64bit pref]: can't assign; no space",
            now,
        );
        let problems = s.bar_problems(dev, &[], None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("no space"));
        assert!(s.bar_problems(dev, &[], Some(now + std::time::Duration::from_secs(1))).is_empty());
        let problems =
            s.bar_problems(dev, &[(4, 0x800000000)], Some(now + std::time::Duration::from_secs(1)));
        assert!(problems[0].contains("no resource"), "{problems:?}");
    }

    #[test]
    fn incomplete_snapshot_does_not_replace_the_last_one() {
        let mut s = state(SNAPSHOT);
        let now = Instant::now();
        s.feed_line("@@XT SNAP 2 3.0", now);
        s.feed_line("@@XT PCI 0000:00:00.0 0x8086 0x29c0 0x060000", now);
        assert_eq!(s.pci.len(), 4);
        s.feed_line("@@XT END 3", now);
        assert_eq!((s.pci.len(), s.snapshot_seq), (4, 1));
        s.feed_line("@@XT SNAP 4 3.5", now);
        s.feed_line("@@XT END 4", now);
        assert_eq!((s.pci.len(), s.snapshot_seq), (0, 4));
    }

    #[test]
    fn other_lines_and_garbage() {
        let s = state(
            "[    1.0] random kernel text\n\
             garbage before @@XT READY 1.53 6.1.0-56-amd64\r\n\
             @@XT KMSG pci 0000:01:00.0: BAR 2: no space for [mem size 0x2000000000 64bit pref]\n\
             @@XT OUT 7 hello world\n@@XT OUT 7  indented\n@@XT RC 7 0\n\
             @@XT CCW 0.0.0042 3832/01 0000/00 1\n\
             @@XT BOGUS\n@@XT PCI zz\n\
             [    9.9] Kernel panic - not syncing: Attempted to kill init!\n",
        );
        let ready = s.ready.as_ref().unwrap();
        assert_eq!((ready.uptime, ready.release.as_str()), (1.53, "6.1.0-56-amd64"));
        assert_eq!(s.kmsg_about("0000:01:00.0".parse().unwrap()).count(), 1);
        assert_eq!(s.commands[&7].lines, ["hello world", " indented"]);
        assert_eq!(s.commands[&7].status, Some(0));
        assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
        assert!(s.panic.as_ref().unwrap().contains("Attempted to kill init"));
        assert_eq!(s.console_tail.len(), 2);
        assert!(s.ccw.is_empty(), "CCW outside a snapshot is ignored");
    }

    #[test]
    fn a_bar_assigned_after_a_failed_try_is_fine() {
        let mut s = state(SNAPSHOT);
        let dev: Bdf = "0000:01:00.0".parse().unwrap();
        let now = Instant::now();
        for line in [
            "@@XT KMSG pci 0000:01:00.0: BAR 2 [mem size 0x2000000000 64bit pref]: can't assign; no space",
            "@@XT KMSG pci 0000:01:00.0: BAR 2 [mem size 0x2000000000 64bit pref]: failed to assign",
            "@@XT KMSG pcieport 0000:00:01.0: bridge window [mem 0x2000000000-0x3fffffffff 64bit pref]: assigned",
            "@@XT KMSG pci 0000:01:00.0: BAR 2 [mem 0x2000000000-0x3fffffffff 64bit pref]: assigned",
        ] {
            s.feed_line(line, now);
        }
        assert!(s.bar_problems(dev, &[(2, 128 << 30)], None).is_empty());
        s.feed_line("@@XT KMSG pci 0000:01:00.0: BAR 0: no space for [mem size 0x00000100]", now);
        assert_eq!(s.bar_problems(dev, &[], None).len(), 1);
        assert_eq!(bar_number("pci 0000:01:00.0: BAR 12 [mem"), Some(12));
        assert_eq!(bar_number("bridge window"), None);
    }

    #[test]
    fn bdf_parsing_is_strict() {
        let b: Bdf = "0001:00:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0001:00:1f.7");
        assert_eq!("10000:00:00.0".parse::<Bdf>().unwrap().domain(), 0x10000);
        for bad in ["00:1f.7", "0000:00:20.0", "0000:00:00.8", "0000:0:00.0", "0000:00:00.0/..", "x"] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parser_never_panics_on_truncations() {
        for line in SNAPSHOT.lines() {
            let body = protocol_part(line).unwrap();
            for cut in 0..body.len() {
                let _ = parse(&body[..cut]);
            }
        }
    }
}

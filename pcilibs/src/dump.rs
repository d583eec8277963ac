//! Parser for `lspci -x` / `-xxx` / `-xxxx` hex dumps (the text people paste in bug
//! reports, and what `lspci -F` reads back).
//!
//! A device starts with a line beginning with its address, `BB:DD.F ` or `DDDD:BB:DD.F `
//! (the rest of the line is its description), and continues with lines of the form
//! `OFFSET: XX XX …` (offset in hex, then bytes in hex). A blank line ends the device.
//! Any other line (the `lspci -v` detail lines, prose around a paste) is skipped. Leading
//! whitespace and trailing carriage returns are tolerated.
//!
//! Bytes not given in the dump read as 0xff, like a missing function would; the
//! configuration space of a device is as long as the highest byte given.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::bdf::Bdf;
use crate::config::PCIE_CONFIG_SIZE;

/// Problems found in a dump; each belongs to one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    /// A device line whose address does not parse (e.g. a device above 0x1f).
    #[error("line {line}: bad device address {text:?}")]
    BadAddress {
        /// 1-based line number.
        line: usize,
        /// The address text.
        text: String,
    },
    /// A hex line with something that is not a two-digit hex byte.
    #[error("line {line}: malformed hex dump line")]
    Malformed {
        /// 1-based line number.
        line: usize,
    },
    /// A byte offset at or beyond 4096.
    #[error("line {line}: offset beyond the 4096-byte configuration space")]
    OffsetTooLarge {
        /// 1-based line number.
        line: usize,
    },
    /// A hex line that belongs to no device.
    #[error("line {line}: hex dump line outside any device")]
    Orphan {
        /// 1-based line number.
        line: usize,
    },
    /// The same address appears twice; the later one is kept separately.
    #[error("line {line}: device {bdf} appears more than once")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The repeated address.
        bdf: Bdf,
    },
}

/// One device of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DumpDevice {
    /// Address (domain 0 when the dump used the short form).
    pub bdf: Bdf,
    /// The rest of the device line (`lspci`'s description).
    pub description: String,
    /// Configuration space bytes, as long as the highest byte given (0xff where missing).
    pub config: Vec<u8>,
    /// Problems of this device's lines.
    pub problems: Vec<DumpError>,
}

/// A parsed dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dump {
    /// Devices in file order.
    pub devices: Vec<DumpDevice>,
    /// Problems that belong to no device.
    pub problems: Vec<DumpError>,
}

/// Parses dump text (never fails; problems are collected).
pub fn parse(text: &str) -> Dump {
    let mut dump = Dump::default();
    let mut current: Option<DumpDevice> = None;
    // Addresses seen so far, so that a dump of many devices is read in n log n.
    let mut seen = alloc::collections::BTreeSet::new();
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = raw.trim();
        if line.is_empty() {
            dump.devices.extend(current.take());
            continue;
        }
        if let Some((offset, rest)) = hex_line(line) {
            match current.as_mut() {
                Some(dev) => {
                    if let Err(e) = add_bytes(&mut dev.config, offset, rest, line_no) {
                        dev.problems.push(e);
                    }
                }
                None => dump.problems.push(DumpError::Orphan { line: line_no }),
            }
            continue;
        }
        let Some((addr, description)) = device_line(line) else { continue };
        dump.devices.extend(current.take());
        match Bdf::parse_any(addr) {
            Ok(bdf) => {
                if !seen.insert(bdf) {
                    dump.problems.push(DumpError::Duplicate { line: line_no, bdf });
                }
                current = Some(DumpDevice {
                    bdf,
                    description: description.to_string(),
                    config: Vec::new(),
                    problems: Vec::new(),
                });
            }
            Err(_) => dump.problems.push(DumpError::BadAddress { line: line_no, text: addr.to_string() }),
        }
    }
    dump.devices.extend(current);
    dump
}

/// `OFFSET: rest` where OFFSET is 2..=8 hex digits.
fn hex_line(line: &str) -> Option<(usize, &str)> {
    let (offset, rest) = line.split_once(": ")?;
    if !(2..=8).contains(&offset.len()) || !offset.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((usize::from_str_radix(offset, 16).ok()?, rest))
}

/// `BB:DD.F description` or `DDDD:BB:DD.F description`, the domain with four to eight
/// digits (`lspci` prints domains above `ffff`, such as Intel VMD's `10000`, in full).
fn device_line(line: &str) -> Option<(&str, &str)> {
    let (addr, description) = line.split_once(' ').unwrap_or((line, ""));
    let shape_ok = match addr.len() {
        7 => shape(addr, "##:##.#"),
        12..=16 => addr.split_at_checked(addr.len() - 8).is_some_and(|(domain, rest)| {
            domain.bytes().all(|b| b.is_ascii_hexdigit()) && shape(rest, ":##:##.#")
        }),
        _ => false,
    };
    shape_ok.then_some((addr, description))
}

fn shape(text: &str, pattern: &str) -> bool {
    text.bytes().zip(pattern.bytes()).all(|(t, p)| if p == b'#' { t.is_ascii_hexdigit() } else { t == p })
}

fn add_bytes(config: &mut Vec<u8>, offset: usize, rest: &str, line: usize) -> Result<(), DumpError> {
    for (at, word) in (offset..).zip(rest.split_whitespace()) {
        if word.len() != 2 {
            return Err(DumpError::Malformed { line });
        }
        let byte = u8::from_str_radix(word, 16).map_err(|_| DumpError::Malformed { line })?;
        if at >= PCIE_CONFIG_SIZE {
            return Err(DumpError::OffsetTooLarge { line });
        }
        if config.len() <= at {
            config.resize(at + 1, 0xff);
        }
        if let Some(slot) = config.get_mut(at) {
            *slot = byte;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// `lspci -D` prints domains above `ffff` (Intel VMD) with five digits; such a
    /// device was skipped as prose. A domain with a leading zero beyond four digits is
    /// not what lspci prints: a problem, not a silent skip.
    #[test]
    fn reads_five_digit_domains() {
        let d =
            parse("10000:e1:00.0 Non-Volatile memory controller: X\n00: 86 80 d3 10\n\n01000:e1:00.0 X\n");
        assert_eq!(d.devices.len(), 1);
        assert_eq!(d.devices[0].bdf.to_string(), "10000:e1:00.0");
        assert_eq!(d.devices[0].config, [0x86, 0x80, 0xd3, 0x10]);
        assert!(matches!(d.problems.as_slice(), [DumpError::BadAddress { line: 4, .. }]), "{:?}", d.problems);
    }

    #[test]
    fn parses_several_devices_in_both_address_forms() {
        let text = "garbage before\n\
            00:1f.3 Audio device: Intel Corporation Device a348 (rev 10)\n\
            \tSubsystem: Dell Device 0869\n\
            00: 86 80 48 a3 06 04 10 00 10 00 03 04 10 20 00 00\n\
            10: 04 00 31 df 00 00 00 00\r\n\
            \n\
            0001:02:00.0 Ethernet controller: X\n\
            00: 86 80 d3 10\n";
        let d = parse(text);
        assert_eq!(d.devices.len(), 2);
        assert!(d.problems.is_empty());
        assert_eq!(d.devices[0].bdf.to_string(), "0000:00:1f.3");
        assert_eq!(d.devices[0].description, "Audio device: Intel Corporation Device a348 (rev 10)");
        assert_eq!(d.devices[0].config.len(), 0x18);
        assert_eq!(d.devices[0].config[0x12], 0x31);
        assert_eq!(d.devices[1].bdf.to_string(), "0001:02:00.0");
        assert_eq!(d.devices[1].config, [0x86, 0x80, 0xd3, 0x10]);
    }

    #[test]
    fn gaps_read_as_ff_and_problems_are_kept() {
        let d = parse("00:00.0 x\n00: 01 02\n10: 03\n20: zz\n1000: 00\n00: 00\n");
        let dev = &d.devices[0];
        assert_eq!(dev.config.len(), 0x11);
        assert_eq!(dev.config[2], 0xff);
        assert_eq!(dev.config[0x10], 3);
        assert_eq!(dev.problems, [DumpError::Malformed { line: 4 }, DumpError::OffsetTooLarge { line: 5 }]);
        let d = parse("00: 00\n00:20.0 bad device\n");
        assert_eq!(d.problems.len(), 2);
        assert!(d.devices.is_empty());
    }
}

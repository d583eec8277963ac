//! The stack's pciutils as an independent decoder: configuration bytes written as an
//! `lspci -xxxx` dump, decoded by `lspci -F DUMP -D -vvv`, capability offsets read back.

use std::collections::BTreeMap;

use crate::command::{self, CommandError};
use crate::launcher::Launcher;
use pcilibs::bdf::Bdf;

/// One capability as `lspci` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Offset in configuration space.
    pub offset: u16,
    /// Version, for extended capabilities (`[100 v2]`).
    pub version: Option<u8>,
}

/// The capabilities `lspci` found in one function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Standard capabilities (offsets below 0x100).
    pub caps: Vec<Capability>,
    /// Extended capabilities (offsets from 0x100).
    pub ext_caps: Vec<Capability>,
}

/// Writes `config` as one device of an `lspci -xxxx` dump (16 bytes a line).
pub fn dump_text(bdf: Bdf, config: &[u8]) -> String {
    let mut out = format!("{bdf} device\n");
    for (i, chunk) in config.chunks(16).enumerate() {
        out.push_str(&format!("{:02x}:", i * 16));
        for b in chunk {
            out.push_str(&format!(" {b:02x}"));
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Parses `lspci -D -vvv` output into capabilities per function.
pub fn parse_capabilities(text: &str) -> BTreeMap<Bdf, Decoded> {
    let mut out: BTreeMap<Bdf, Decoded> = BTreeMap::new();
    let mut current: Option<Bdf> = None;
    for line in text.lines() {
        if !line.starts_with(['\t', ' ']) {
            current = line.split_whitespace().next().and_then(|w| w.parse().ok());
            if let Some(bdf) = current {
                out.entry(bdf).or_default();
            }
            continue;
        }
        let Some(bdf) = current else { continue };
        let Some(rest) = line.trim_start().strip_prefix("Capabilities: [") else { continue };
        let Some((inside, _)) = rest.split_once(']') else { continue };
        let mut words = inside.split_whitespace();
        let Some(offset) = words.next().and_then(|o| u16::from_str_radix(o, 16).ok()) else { continue };
        let version = words.next().and_then(|v| v.strip_prefix('v')).and_then(|v| v.parse().ok());
        let entry = out.entry(bdf).or_default();
        let cap = Capability { offset, version };
        if offset >= 0x100 {
            entry.ext_caps.push(cap);
        } else {
            entry.caps.push(cap);
        }
    }
    out
}

/// Decodes the capabilities of `devices` (address, configuration bytes) with the `lspci`
/// that `launcher` starts (a stack's).
pub fn decode(
    launcher: &Launcher,
    devices: &[(Bdf, Vec<u8>)],
) -> Result<BTreeMap<Bdf, Decoded>, CommandError> {
    let dir = tempfile::tempdir().map_err(|source| CommandError::Spawn { line: "mktemp".into(), source })?;
    let path = dir.path().join("dump.txt");
    let text: String = devices.iter().map(|(bdf, config)| dump_text(*bdf, config)).collect();
    std::fs::write(&path, text)
        .map_err(|source| CommandError::Spawn { line: "write dump".into(), source })?;
    let out = command::output(launcher.command("lspci").arg("-F").arg(&path).args(["-D", "-vvv"]))?;
    Ok(parse_capabilities(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines_have_offsets_and_bytes() {
        let text = dump_text("0000:00:02.0".parse().unwrap(), &[0x86, 0x80, 0xd3, 0x10]);
        assert_eq!(text, "0000:00:02.0 device\n00: 86 80 d3 10\n\n");
    }

    #[test]
    fn capabilities_per_device() {
        let text = "0000:00:02.0 Ethernet controller: Intel\n\
                    \tCapabilities: [c8] Power Management version 2\n\
                    \t\tStatus: D0\n\
                    \tCapabilities: [100 v1] Advanced Error Reporting\n\
                    0000:01:00.0 Non-Volatile memory controller: Red Hat\n\
                    \tCapabilities: [80] Express (v2) Endpoint, MSI 00\n\
                    \tCapabilities: [160 v1] Single Root I/O Virtualization (SR-IOV)\n";
        let caps = parse_capabilities(text);
        let a = &caps[&"0000:00:02.0".parse().unwrap()];
        assert_eq!(a.caps, [Capability { offset: 0xc8, version: None }]);
        assert_eq!(a.ext_caps, [Capability { offset: 0x100, version: Some(1) }]);
        let b = &caps[&"0000:01:00.0".parse().unwrap()];
        assert_eq!((b.caps.len(), b.ext_caps[0].offset), (1, 0x160));
    }
}

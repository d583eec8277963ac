//! `cargo xtask fixtures`: sysfs-like device folders for pcilibs' tests, taken from a
//! real x86_64 guest with many emulated devices.
//!
//! The guest's reporter copies each function's `config` (all of it, read as root),
//! `resource` and `sriov_*` files over the console (base64). The expected values come from
//! sources independent of pcilibs: BAR and SR-IOV sizes from the guest kernel's own
//! sizing (`resource`), capability offsets from the host's pciutils decoding the saved
//! bytes (`lspci -F`). Output: `pcilibs/tests/fixtures/qemu-x86_64/<bdf>/…`,
//! `expected.json` (the format `check.py sysfs` reads) and a README saying how they were
//! made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use guest_harness::arch::Arch;
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::lspci;
use guest_harness::reporter::{
    Resource, ResourceKind, IORESOURCE_IO, IORESOURCE_MEM_64, IORESOURCE_PREFETCH,
};
use guest_harness::stacks::Stack;
use pcilibs::bdf::Bdf;

/// Where the fixtures go, relative to the workspace root.
pub const FIXTURE_DIR: &str = "pcilibs/tests/fixtures/qemu-x86_64";

/// The SR-IOV attribute files copied when a function has them.
pub const SRIOV_FILES: &[&str] =
    &["sriov_totalvfs", "sriov_numvfs", "sriov_offset", "sriov_stride", "sriov_vf_device"];

/// The guest's devices: every kind of function and port the project meets. Root ports
/// carry each kind of resource reservation; a switch, a PCIe-to-PCI bridge with
/// conventional devices, an extra root bus (pxb-pcie), a multi-function device, NVMe with
/// SR-IOV and a 64-bit prefetchable BAR.
pub fn fixture_spec() -> GuestSpec {
    let mut spec = GuestSpec::new(Arch::X86_64).firmware(Firmware::SeaBios);
    spec.name = "fixtures".into();
    spec.memory_mib = 256;
    spec.objects.push("memory-backend-ram,id=shm0,size=1G,reserve=off".into());
    spec.extra_args.extend(
        ["-blockdev", "null-co,node-name=null0,size=67108864", "-audiodev", "none,id=snd0"].map(String::from),
    );
    let devices = [
        // Root complex integrated endpoints, one of them multi-function.
        "virtio-net-pci,id=net0,bus=pcie.0,addr=02.0",
        "virtio-rng-pci,id=rng0,bus=pcie.0,addr=03.0,multifunction=on",
        "virtio-rng-pci,id=rng1,bus=pcie.0,addr=03.1",
        // Root ports with every kind of reservation.
        "pcie-root-port,id=rp1,bus=pcie.0,addr=04.0,chassis=1,slot=1,bus-reserve=4,io-reserve=8K,mem-reserve=32M,pref64-reserve=1G",
        "e1000e,id=nic0,bus=rp1",
        "pcie-root-port,id=rp2,bus=pcie.0,addr=05.0,chassis=2,slot=2,pref32-reserve=16M",
        "nvme-subsys,id=nvmesubsys0,nqn=fixtures",
        "nvme,id=nvme0,bus=rp2,serial=fixtures0,subsys=nvmesubsys0,sriov_max_vfs=4,sriov_vq_flexible=8,sriov_vi_flexible=4,max_ioqpairs=10,msix_qsize=5",
        "pcie-root-port,id=rp3,bus=pcie.0,addr=06.0,chassis=3,slot=3",
        "qemu-xhci,id=xhci0,bus=rp3",
        "pcie-root-port,id=rp4,bus=pcie.0,addr=07.0,chassis=4,slot=4",
        "virtio-blk-pci,id=blk0,bus=rp4,drive=null0",
        "pcie-root-port,id=rp5,bus=pcie.0,addr=08.0,chassis=5,slot=5",
        "ivshmem-plain,id=shm0,bus=rp5,memdev=shm0",
        // A switch: one downstream port with a device, one empty.
        "pcie-root-port,id=rp6,bus=pcie.0,addr=09.0,chassis=6,slot=6",
        "x3130-upstream,id=up1,bus=rp6",
        "xio3130-downstream,id=dp1,bus=up1,chassis=11,slot=0",
        "virtio-net-pci,id=net1,bus=dp1",
        "xio3130-downstream,id=dp2,bus=up1,chassis=12,slot=1",
        // Conventional PCI behind a PCIe-to-PCI bridge.
        "pcie-pci-bridge,id=br1,bus=pcie.0,addr=0a.0",
        "e1000,id=nic1,bus=br1,addr=01.0",
        "AC97,id=snd0,bus=br1,addr=02.0,audiodev=snd0",
        "i6300esb,id=wdt0,bus=br1,addr=03.0",
        // An extra root bus with its own root port.
        "pxb-pcie,id=pxb1,bus=pcie.0,addr=0b.0,bus_nr=64",
        "pcie-root-port,id=rp7,bus=pxb1,chassis=7,slot=7",
        "virtio-net-pci,id=net2,bus=rp7",
    ];
    spec.devices.extend(devices.map(String::from));
    spec
}

/// One function as copied out of the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    /// Its address.
    pub bdf: Bdf,
    /// The `config` file.
    pub config: Vec<u8>,
    /// The `resource` file, as text.
    pub resource: String,
    /// `sriov_*` attribute files (name, contents).
    pub sriov: Vec<(String, String)>,
}

/// Decodes standard base64 (with or without padding).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim().bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            other => return Err(format!("bad base64 character {:?}", char::from(other))),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// The guest command that prints one function's files as tagged lines.
fn copy_command(bdf: Bdf) -> String {
    let list = SRIOV_FILES.join(" ");
    format!(
        "cd /sys/bus/pci/devices/{bdf} && echo \"config $(base64 -w0 config)\" && \
         while read -r l; do echo \"resource $l\"; done < resource && \
         for f in {list}; do [ -r $f ] && echo \"$f $(cat $f)\"; done; true"
    )
}

/// Parses the output of [`copy_command`].
pub fn parse_copy(bdf: Bdf, lines: &[String]) -> Result<Copied, String> {
    let mut copied = Copied { bdf, config: Vec::new(), resource: String::new(), sriov: Vec::new() };
    for line in lines {
        let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match tag {
            "config" => copied.config = base64_decode(rest)?,
            "resource" => {
                copied.resource.push_str(rest.trim());
                copied.resource.push('\n');
            }
            name if SRIOV_FILES.contains(&name) => {
                copied.sriov.push((name.to_string(), rest.trim().to_string()))
            }
            _ => return Err(format!("{bdf}: unexpected line {line:?}")),
        }
    }
    if copied.config.len() < 64 {
        return Err(format!("{bdf}: config is {} bytes", copied.config.len()));
    }
    Ok(copied)
}

/// Parses a sysfs `resource` file.
pub fn parse_resource_file(text: &str) -> Result<Vec<Resource>, String> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let mut f = line.split_whitespace().map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16));
            let mut next =
                || f.next().and_then(Result::ok).ok_or_else(|| format!("bad resource line {line:?}"));
            let index = u8::try_from(i).map_err(|_| "too many resource lines".to_string())?;
            Ok(Resource { index, start: next()?, end: next()?, flags: next()? })
        })
        .collect()
}

fn kind(r: &Resource) -> &'static str {
    if r.flags & IORESOURCE_IO != 0 {
        "io"
    } else if r.flags & IORESOURCE_MEM_64 != 0 {
        "mem64"
    } else {
        "mem32"
    }
}

/// The `expected.json` entry of one function: BARs and SR-IOV totals from the kernel's
/// `resource` lines, capabilities from pciutils with ids read at those offsets.
pub fn expected_entry(copied: &Copied, decoded: &lspci::Decoded) -> Result<Value, String> {
    let mut bars = Map::new();
    let mut sriov_bars = Map::new();
    for r in parse_resource_file(&copied.resource)? {
        if r.flags == 0 {
            continue;
        }
        let prefetchable = r.flags & IORESOURCE_PREFETCH != 0;
        match r.kind() {
            ResourceKind::Bar(i) => {
                bars.insert(
                    i.to_string(),
                    json!({"kind": kind(&r), "prefetchable": prefetchable, "size": r.size()}),
                );
            }
            ResourceKind::VfBar(i) => {
                sriov_bars.insert(
                    i.to_string(),
                    json!({"kind": kind(&r), "prefetchable": prefetchable, "size": r.size()}),
                );
            }
            _ => {}
        }
    }
    let byte = |off: u16| copied.config.get(usize::from(off)).copied();
    let mut caps = Vec::new();
    for c in &decoded.caps {
        let id = byte(c.offset)
            .ok_or_else(|| format!("{}: capability at {:#x} beyond config", copied.bdf, c.offset))?;
        caps.push(json!({"id": id, "offset": c.offset}));
    }
    let mut ext_caps = Vec::new();
    for c in &decoded.ext_caps {
        let (Some(lo), Some(hi), Some(ver)) = (byte(c.offset), byte(c.offset + 1), byte(c.offset + 2)) else {
            return Err(format!("{}: extended capability at {:#x} beyond config", copied.bdf, c.offset));
        };
        ext_caps.push(json!({"id": u16::from_le_bytes([lo, hi]), "offset": c.offset, "version": ver & 0xf}));
    }
    let id16 = |at: usize| copied.config.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    Ok(json!({
        "vendor": id16(0).map(|v| format!("{v:04x}")),
        "device": id16(2).map(|v| format!("{v:04x}")),
        "config_size": copied.config.len(),
        "caps": caps,
        "ext_caps": ext_caps,
        "bars": bars,
        "sriov_bars": sriov_bars,
    }))
}

fn write(path: &Path, data: &[u8]) -> Result<(), String> {
    std::fs::write(path, data).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Boots the fixture guest, copies every function out and writes the fixture folder
/// (replacing its previous contents). Returns the folder.
pub fn generate(stack: &Stack, root: &Path) -> Result<PathBuf, String> {
    let spec = fixture_spec();
    let assets = GuestAssets::ensure(stack, Arch::X86_64).map_err(|e| e.to_string())?;
    let guest = Guest::boot(&spec, &assets).map_err(|e| e.to_string())?;
    // Let the guest finish probing before taking the snapshot of functions.
    std::thread::sleep(Duration::from_secs(1));
    let state = guest.state();
    let mut copied = Vec::new();
    for bdf in state.pci.keys() {
        let out = guest
            .exec(&copy_command(*bdf), Instant::now() + Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        copied.push(parse_copy(*bdf, &out.lines)?);
    }
    let decoded =
        lspci::decode(&assets.qemu, &copied.iter().map(|c| (c.bdf, c.config.clone())).collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
    let mut expected = BTreeMap::new();
    for c in &copied {
        let d = decoded.get(&c.bdf).cloned().unwrap_or_default();
        expected.insert(c.bdf.to_string(), expected_entry(c, &d)?);
    }

    let dir = root.join(FIXTURE_DIR);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    for c in &copied {
        let d = dir.join(c.bdf.to_string());
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        write(&d.join("config"), &c.config)?;
        write(&d.join("resource"), c.resource.as_bytes())?;
        for (name, value) in &c.sriov {
            write(&d.join(name), format!("{value}\n").as_bytes())?;
        }
    }
    let json = serde_json::to_string_pretty(&expected).map_err(|e| e.to_string())?;
    write(&dir.join("expected.json"), format!("{json}\n").as_bytes())?;
    write(&dir.join("README.md"), readme(&guest, &assets, copied.len()).as_bytes())?;
    Ok(dir)
}

fn tool_version(mut cmd: std::process::Command, arg: &str) -> String {
    cmd.arg(arg)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn readme(guest: &Guest, assets: &GuestAssets, count: usize) -> String {
    let qemu = format!(
        "QEMU emulator version {}, SeaBIOS {} (stack {})",
        assets.versions.qemu, assets.versions.seabios, assets.versions.stack
    );
    let lspci = tool_version(assets.qemu.command("lspci"), "--version");
    let cmdline = guest.command_line();
    // Paths under temporary folders change every run; show them by role.
    let cmdline: Vec<String> = cmdline
        .split(' ')
        .map(|w| {
            if w.ends_with("initramfs.cpio") {
                "INITRAMFS".to_string()
            } else if w.contains("/vmlinuz-") {
                format!("vmlinuz-{}", assets.kernel.release)
            } else if w.starts_with("unix:") {
                "unix:QMP_SOCKET,server=on,wait=off".to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    format!(
        "# QEMU x86_64 device fixtures\n\n\
         {count} PCI functions of a q35 guest, one folder per function (named by its address\n\
         in the guest), each with the guest's sysfs `config` (read as root: 4096 bytes for\n\
         PCI Express functions, 256 for conventional ones), `resource` and, where the\n\
         function has them, `sriov_*` attribute files.\n\n\
         `expected.json` holds, per function, what independent decoders say:\n\n\
         - `bars` and `sriov_bars`: kind, prefetchability and size from the guest kernel's\n  \
           `resource` lines 0–5 and 7–12 (`sriov_bars` sizes are totals over all VFs);\n\
         - `caps` and `ext_caps`: the offsets pciutils' `lspci -F DUMP -D -vvv` lists for the\n  \
           saved bytes (written as an `lspci -xxxx` dump), with the id (and version) read\n  \
           at each offset.\n\n\
         Check pcilibs against them from the workspace root:\n\n    \
         python3 ../shared/conformance/check.py sysfs {FIXTURE_DIR}\n\n\
         ## How they were made\n\n    \
         cargo xtask fixtures\n\n\
         - QEMU: {qemu} (software emulation, {fw})\n\
         - guest kernel: Debian `{pkg}` {ver} (`{release}`)\n\
         - decoder: {lspci}\n\n\
         The guest is the project's test initramfs (busybox and the reporter script); the\n\
         fixture command reads each function's files through the reporter's command channel\n\
         as base64 over the serial console. QEMU command line:\n\n    {}\n",
        cmdline.join(" "),
        fw = guest.firmware().name(),
        pkg = assets.kernel.package,
        ver = assets.kernel.version,
        release = assets.kernel.release,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("AAEC/w==").unwrap(), [0, 1, 2, 255]);
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn copied_function_and_its_expected_entry() {
        let bdf: Bdf = "0000:01:00.0".parse().unwrap();
        let mut config = vec![0u8; 0x200];
        config[..4].copy_from_slice(&[0x36, 0x1b, 0x10, 0x00]);
        config[0x40] = 0x10;
        config[0x160..0x164].copy_from_slice(&[0x10, 0x00, 0x01, 0x00]);
        let b64 = encode(&config);
        let lines: Vec<String> = [
            format!("config {b64}"),
            "resource 0x00000000fe600000 0x00000000fe603fff 0x0000000000140204".into(),
            "resource 0x0000000000000000 0x0000000000000000 0x0000000000000000".into(),
            "resource 0x0000000000000000 0x0000000000000000 0x0000000000000000".into(),
            "resource 0x0000000000000000 0x0000000000000000 0x0000000000000000".into(),
            "resource 0x0000000000000000 0x0000000000000000 0x0000000000000000".into(),
            "resource 0x0000000000000000 0x0000000000000000 0x0000000000000000".into(),
            "resource 0x0000000000000000 0x0000000000000000 0x0000000000000000".into(),
            "resource 0x0000000800000000 0x000000080000ffff 0x0000000000140204".into(),
            "sriov_totalvfs 4".into(),
        ]
        .into();
        let copied = parse_copy(bdf, &lines).unwrap();
        assert_eq!(copied.config, config);
        assert_eq!(copied.sriov, [("sriov_totalvfs".to_string(), "4".to_string())]);
        let decoded = lspci::Decoded {
            caps: vec![lspci::Capability { offset: 0x40, version: None }],
            ext_caps: vec![lspci::Capability { offset: 0x160, version: Some(1) }],
        };
        let e = expected_entry(&copied, &decoded).unwrap();
        assert_eq!(e["bars"]["0"], json!({"kind": "mem64", "prefetchable": false, "size": 0x4000}));
        assert_eq!(e["sriov_bars"]["0"]["size"], 0x10000);
        assert_eq!(e["caps"], json!([{"id": 0x10, "offset": 0x40}]));
        assert_eq!(e["ext_caps"], json!([{"id": 0x10, "offset": 0x160, "version": 1}]));
        assert!(parse_copy(bdf, &["bogus line".to_string()]).is_err());
    }

    fn encode(data: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in data.chunks(3) {
            let n = chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                s.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        while s.len() % 4 != 0 {
            s.push('=');
        }
        s
    }
}

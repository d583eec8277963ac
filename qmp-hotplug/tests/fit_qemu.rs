//! Live bridge windows from real QEMU (q35, SeaBIOS, no guest OS): `pci::bridges` reads
//! what the firmware programmed, and `pci::window_shortfalls` says whether a device fits.
//! It reproduces the SeaBIOS fact the planner sizes for: a 128 GiB BAR does not fit a
//! port reserved with exactly `pref64-reserve=128G`, because the window is only 2 MiB
//! aligned; a 256 GiB reservation holds it. The `qmp-fit` tool (feature `cli`) is run as
//! a program against the same QEMU.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Hotplug, Qemu};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use qmp_hotplug::pci::{bridges, window_shortfalls, LiveBridge};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn live_bridges(q: &Qemu, want: &[&str]) -> Vec<LiveBridge> {
    let c = q.connect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = bridges(&c.execute_raw("query-pci", None, Duration::from_secs(30)).unwrap());
        let ready =
            want.iter().all(|id| all.iter().any(|b| b.qdev_id == *id && b.secondary != 0 && b.mem.is_some()));
        if ready {
            return all;
        }
        assert!(Instant::now() < deadline, "firmware did not program the bridges in 120 s: {all:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A q35 with the default root port `rp0` and ports reserving 128 GiB (`r128`) and
/// 256 GiB + 32 MiB (`r256`), its firmware done.
fn reserved_ports() -> (Qemu, Vec<LiveBridge>) {
    let q = Qemu::q35_with(
        1,
        Hotplug::Acpi,
        &[
            "-device",
            "pcie-root-port,id=r128,chassis=8,slot=8,bus=pcie.0,addr=0x8,pref64-reserve=128G",
            "-device",
            "pcie-root-port,id=r256,chassis=9,slot=9,bus=pcie.0,addr=0x9,pref64-reserve=256G,mem-reserve=32M",
        ],
    );
    let all = live_bridges(&q, &["rp0", "r128", "r256"]);
    (q, all)
}

#[test]
fn seabios_windows_decide_whether_a_large_bar_fits() {
    let (_q, all) = reserved_ports();
    let get = |id: &str| all.iter().find(|b| b.qdev_id == id).unwrap().clone();
    // An H100-class function: 16 MiB registers, 128 GiB aperture, 32 MiB.
    let gpu = [
        Resource::bar(BarKind::Mem32, false, 16 * MIB),
        Resource::bar(BarKind::Mem64, true, 128 * GIB),
        Resource::bar(BarKind::Mem64, true, 32 * MIB),
    ];
    let r256 = get("r256");
    let pref = r256.pref.expect("a prefetchable window");
    assert!(pref.size() >= 256 * GIB, "{pref:?}");
    assert!(window_shortfalls(&r256, &gpu[1..]).is_empty(), "{:?}", window_shortfalls(&r256, &gpu[1..]));

    let r128 = get("r128");
    let pref = r128.pref.expect("a prefetchable window");
    assert!(pref.size() >= 128 * GIB, "the reservation is honoured in size: {pref:?}");
    assert_ne!(pref.base % (128 * GIB), 0, "SeaBIOS aligns it to 2 MiB only: {pref:?}");
    let why = window_shortfalls(&r128, &gpu[1..]);
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].starts_with("pref:") && why[0].contains("past it"), "{why:?}");

    // The default port: a small prefetchable window, and the default memory window
    // cannot take 16 MiB of registers.
    let rp0 = get("rp0");
    let why = window_shortfalls(&rp0, &gpu);
    assert!(why.iter().any(|w| w.starts_with("pref:")), "{why:?} {rp0:?}");
    assert!(why.iter().any(|w| w.starts_with("mem:")), "{why:?} {rp0:?}");
    // A NIC-sized device fits the default port.
    let nic =
        [Resource::bar(BarKind::Mem64, false, 64 << 10), Resource::bar(BarKind::Mem64, false, 16 << 10)];
    assert!(window_shortfalls(&rp0, &nic).is_empty(), "{rp0:?}");
}

fn qmp_fit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmp-fit")).args(args).output().expect("run qmp-fit")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The installed tool against the same ports: a profile that fits only the 256 GiB port,
/// as a table and as JSON, one port asked for, and exit statuses 0 and 1.
#[test]
fn qmp_fit_says_which_port_takes_a_device() {
    let (q, _) = reserved_ports();
    // The engine's test client is gone: QMP is free for the tool.
    let sock = q.qmp.to_str().unwrap();
    let out = qmp_fit(&["--qmp", sock, "--need", "h100"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let r256 = stdout.lines().find(|l| l.starts_with("r256")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(r256.contains("0000:00:09.0") && r256.ends_with("fits"), "{stdout}");
    let r128 = stdout.lines().find(|l| l.starts_with("r128")).unwrap();
    assert!(r128.contains("pref:") && r128.contains("past it"), "{stdout}");
    assert!(stdout.contains("at least one empty port takes it"), "{stdout}");

    let out = qmp_fit(&["--qmp", sock, "--need", "h100", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["fits"], true);
    let fits: Vec<&str> = doc["bridges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["fits"] == true)
        .map(|b| b["port"].as_str().unwrap())
        .collect();
    assert_eq!(fits, ["r256"], "{doc}");

    let out = qmp_fit(&["--qmp", sock, "--need", "h100", "--port", "r128"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("port r128 does not take it"), "{stdout}");
    let out = qmp_fit(&["--qmp", sock, "--need", "nic", "--port", "rp0"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

/// A host function read from a sysfs tree (pcilibs' fixture of QEMU's nvme), and the
/// errors that say what to do instead.
#[test]
fn qmp_fit_reads_host_functions_and_explains_errors() {
    let help = qmp_fit(&["--help"]);
    let (stdout, _) = text(&help);
    assert!(help.status.success());
    for want in ["--qmp", "--host", "--need", "--port", "--json", "second QMP socket", "Exit status"] {
        assert!(stdout.contains(want), "--help lacks {want}: {stdout}");
    }
    let (q, _) = reserved_ports();
    let sock = q.qmp.to_str().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pcilibs/tests/fixtures/qemu-x86_64");
    let root = tempfile::tempdir().unwrap();
    let devices = root.path().join("bus/pci/devices");
    std::fs::create_dir_all(&devices).unwrap();
    std::os::unix::fs::symlink(fixtures.join("0000:06:00.0"), devices.join("0000:06:00.0")).unwrap();
    let sysfs = root.path().to_str().unwrap();
    let out = qmp_fit(&["--qmp", sock, "--host", "0000:06:00.0", "--sysfs-root", sysfs, "--json"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["device"], "0000:06:00.0");
    assert!(doc["bars"].as_u64().unwrap() >= 1, "{doc}");

    let cases: [(&[&str], &str); 5] = [
        (&["--qmp", sock], "--host"),
        (&["--qmp", sock, "--host", "41:00"], "e.g. 0000:41:00.0"),
        (&["--qmp", sock, "--host", "0000:09:00.0", "--sysfs-root", sysfs], "bus/pci/devices"),
        (&["--qmp", "/nonexistent/qmp.sock", "--need", "nic", "--timeout", "1"], "second -qmp"),
        (&["--qmp", sock, "--need", "nic", "--port", "nope"], "the ports are"),
    ];
    for (args, hint) in cases {
        let out = qmp_fit(args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(hint), "{args:?}: {stderr}");
    }
}

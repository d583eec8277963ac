//! The installed tool, run as a program: `--help`, plans for every kind of input (GPU
//! stand-ins and spares, host functions from a captured guest sysfs tree and from an
//! `lspci -xxx` dump, s390x channel and zPCI devices), the plan file it writes, and errors
//! that say what to change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pcie_topology::platform::Addressing;
use pcie_topology::{HostRef, Plan};
use pcilibs::bdf::Bdf;

fn pcie_plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcie-plan")).args(args).output().expect("run pcie-plan")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// The pcilibs fixtures: sysfs files of a QEMU 7.2 q35 guest's functions.
fn fixture(bdf: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pcilibs/tests/fixtures/qemu-x86_64").join(bdf);
    assert!(
        dir.join("config").is_file(),
        "{} missing: the workspace's pcilibs fixtures are needed",
        dir.display()
    );
    dir
}

#[test]
fn help_names_every_input_and_gives_examples() {
    let text = stdout(&pcie_plan(&["--help"]));
    for want in
        ["--host", "--lspci-dump", "--bar-size", "--ivshmem", "--spare", "--platform", "--json", "Examples:"]
    {
        assert!(text.contains(want), "--help lacks {want}: {text}");
    }
}

#[test]
fn stand_ins_and_spares_plan_with_reasons_and_the_plan_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.json");
    let args = ["--platform", "q35-seabios", "--ivshmem", "gpu0:128G", "--spare", "h100:2"];
    let text = stdout(&pcie_plan(&[&args[..], &["--out", file.to_str().unwrap()]].concat()));
    // Why each reservation has its size, the QEMU arguments, the hotplug.
    assert!(text.contains("128 GiB needed + 127.9 GiB slack"), "{text}");
    assert!(text.contains("-device pcie-root-port,id=rp1"), "{text}");
    assert!(text.contains("pref64-reserve=274909364224"), "{text}");
    assert!(
        text.contains("hotplug gpu0 onto rp0:") && text.contains("-> guest 0000:01:00.0, path 01/00"),
        "{text}"
    );
    // --json prints the plan file --out wrote, and it reads back.
    let json = stdout(&pcie_plan(&[&args[..], &["--json"]].concat()));
    assert_eq!(json, std::fs::read_to_string(&file).unwrap());
    let plan = Plan::from_json(&json).unwrap();
    assert_eq!(plan.ports.len(), 3);
    assert_eq!(plan.hotplug_actions().unwrap()[0].device.as_str(), "gpu0");
}

#[test]
fn switch_mode_and_ovmf_with_a_firmware_path() {
    let json = stdout(&pcie_plan(&[
        "--platform",
        "q35-ovmf",
        "--firmware",
        "/srv/fw/OVMF.fd",
        "--mode",
        "switch-port",
        "--ivshmem",
        "gpu0:64G@g0",
        "--ivshmem",
        "gpu1:64G@g0",
        "--spare",
        "a100:1@g0",
        "--json",
    ]));
    let plan = Plan::from_json(&json).unwrap();
    assert_eq!(plan.platform.firmware_args, ["-bios", "/srv/fw/OVMF.fd"]);
    assert_eq!(plan.switches.len(), 1);
    assert!(
        plan.ports.iter().any(|p| p.placeholder.is_some()),
        "the spare's downstream port has a placeholder"
    );
}

/// Host functions read from sysfs: the fixtures' nvme with SR-IOV, in a sysfs tree.
#[test]
fn host_functions_from_a_sysfs_tree() {
    let root = tempfile::tempdir().unwrap();
    let devices = root.path().join("bus/pci/devices");
    std::fs::create_dir_all(&devices).unwrap();
    std::os::unix::fs::symlink(fixture("0000:06:00.0"), devices.join("0000:06:00.0")).unwrap();
    let root_arg = root.path().to_str().unwrap();
    let json = stdout(&pcie_plan(&["--sysfs-root", root_arg, "--host", "0000:06:00.0", "--json"]));
    let plan = Plan::from_json(&json).unwrap();
    let f = &plan.device("hostdev0").unwrap().functions[0];
    assert_eq!(f.host, Some(HostRef::Pci(Bdf::parse("0000:06:00.0").unwrap())));
    assert_eq!(f.bars.iter().map(|b| (b.index, b.size)).collect::<Vec<_>>(), [(Some(0), 16 << 10)]);
    // A function that is not there says what to do.
    let out = pcie_plan(&["--sysfs-root", root_arg, "--host", "0000:06:00.1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--sysfs-root reads a captured tree"), "{}", stderr(&out));
}

/// `config` bytes as `lspci -xxx` prints them for `bdf` (short form).
fn lspci_dump(bdf: &str, config: &[u8]) -> String {
    let mut text =
        format!("{bdf} Non-Volatile memory controller: Red Hat, Inc. QEMU NVM Express Controller\n");
    for (i, line) in config.chunks(16).take(16).enumerate() {
        let bytes: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{:02x}: {}\n", i * 16, bytes.join(" ")));
    }
    text + "\n"
}

#[test]
fn host_functions_from_an_lspci_dump_need_their_bar_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("nvme.txt");
    let config = std::fs::read(fixture("0000:06:00.0").join("config")).unwrap();
    std::fs::write(&dump, lspci_dump("06:00.0", &config)).unwrap();
    let dump = dump.to_str().unwrap();
    let out = pcie_plan(&["--lspci-dump", dump, "--host", "06:00.0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("give each with --bar-size 0000:06:00.0:INDEX=SIZE"), "{}", stderr(&out));
    let json = stdout(&pcie_plan(&[
        "--lspci-dump",
        dump,
        "--host",
        "06:00.0",
        "--bar-size",
        "06:00.0:0=16K",
        "--json",
    ]));
    let plan = Plan::from_json(&json).unwrap();
    assert_eq!(plan.device("hostdev0").unwrap().functions[0].bars[0].size, 16 << 10);
    let out = pcie_plan(&["--lspci-dump", dump, "--host", "06:00.0", "--bar-size", "06:00.0:3=16K"]);
    assert!(stderr(&out).contains("has no BAR 3 (its BARs: 0)"), "{}", stderr(&out));
    let out = pcie_plan(&["--lspci-dump", dump, "--host", "07:00.0"]);
    assert!(stderr(&out).contains("0000:07:00.0 is not in"), "{}", stderr(&out));
}

#[test]
fn s390x_channel_and_zpci_devices_through_the_same_tool() {
    let text = stdout(&pcie_plan(&["--platform", "s390x", "--ccw", "net0", "--ivshmem", "shm0:1G"]));
    assert!(text.contains(r#""devno":"fe.0.0100""#) && text.contains("guest ccw 0.0.0100"), "{text}");
    assert!(text.contains(r#""driver":"zpci""#) && text.contains("-> guest 0001:00:00.0"), "{text}");
    let json = stdout(&pcie_plan(&["--platform", "s390x", "--ccw", "blk0:virtio-blk-ccw", "--json"]));
    let plan = Plan::from_json(&json).unwrap();
    assert_eq!(plan.platform.addressing, Addressing::Zpci { first_devno: 0x100 });
}

#[test]
fn errors_say_what_to_change() {
    let cases: [(&[&str], i32, &str); 6] = [
        (&["--spare", "h200"], 2, "expected a known name (h100, a100, nvswitch, nic)"),
        (&["--ivshmem", "gpu0"], 2, "expected ID:SIZE[@GROUP]"),
        (&["--host", "1:2:3"], 2, "write it as 0000:01:00.0 or 01:00.0"),
        (&["--platform", "virt", "--firmware", "/x.fd"], 1, "drop --firmware"),
        (&["--platform", "s390x", "--spare", "nic"], 1, "place devices at run time instead"),
        (&["--platform", "virt", "--ivshmem", "a:2048G", "--ivshmem", "b:2048G"], 1, "no plan: 64-bit MMIO"),
    ];
    for (args, code, want) in cases {
        let out = pcie_plan(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed a plan");
    }
}

//! The stack's own programs read what the harness writes: busybox unpacks the harness's
//! cpio archives and parses the guest scripts, the stack's `lspci` decodes the dumps. On
//! the stack `cargo xtask test` names (`$XTASK_STACK`, else the default), provisioned on
//! first use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;

use guest_harness::cpio::CpioWriter;
use guest_harness::initramfs::{INIT_SCRIPT, REPORTER_SCRIPT};
use guest_harness::lspci::{decode, Capability};
use guest_harness::stacks::StackRoot;
use pcilibs::bdf::Bdf;

fn root() -> StackRoot {
    guest_harness::default_stack().unwrap().root().unwrap_or_else(|e| panic!("{e} (cargo xtask provision)"))
}

/// An archive with a folder, files, a link and a device node.
fn sample() -> Vec<u8> {
    let mut w = CpioWriter::new(Vec::new());
    w.dir("bin", 0o755).unwrap();
    w.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
    w.file("/etc-odd", 0o644, b"x").unwrap();
    w.symlink("bin/sh", "hello").unwrap();
    w.char_device("console", 0o600, 5, 1).unwrap();
    w.finish().unwrap()
}

/// The stack's busybox lists and unpacks the archive.
#[test]
fn busybox_cpio_reads_it_back() {
    let busybox = root().busybox();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.cpio");
    std::fs::write(&archive, sample()).unwrap();
    let out = Command::new(&busybox).args(["cpio", "-t", "-F"]).arg(&archive).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(names, ["bin", "bin/hello", "etc-odd", "bin/sh", "console"]);
    let dest = tmp.path().join("x");
    std::fs::create_dir(&dest).unwrap();
    let status = Command::new(&busybox)
        .current_dir(&dest)
        .args(["cpio", "-i", "-d", "-F"])
        .arg(&archive)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(dest.join("bin/hello")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(std::fs::read_link(dest.join("bin/sh")).unwrap().to_str().unwrap(), "hello");
}

/// The guest scripts are valid shell (checked by the stack's busybox sh).
#[test]
fn scripts_parse() {
    let root = root();
    for (name, script) in [("init", INIT_SCRIPT), ("reporter", REPORTER_SCRIPT)] {
        let out = Command::new(root.busybox()).args(["sh", "-n", "-c", script]).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The stack's lspci reads what `dump_text` writes.
#[test]
fn stack_lspci_reads_the_dump() {
    let mut config = vec![0u8; 256];
    config[..4].copy_from_slice(&[0x86, 0x80, 0xd3, 0x10]);
    config[0x06] = 0x10; // status: capability list
    config[0x0b] = 0x02; // class: network
    config[0x34] = 0x40;
    config[0x40] = 0x01; // power management, end of list
    config[0x42] = 0x03;
    let bdf: Bdf = "0000:00:02.0".parse().unwrap();
    let decoded = decode(&root().launcher, &[(bdf, config)]).unwrap();
    assert_eq!(decoded[&bdf].caps, [Capability { offset: 0x40, version: None }]);
}

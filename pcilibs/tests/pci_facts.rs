//! The `pci-facts` tool (feature `cli`) run as a user runs it: on the QEMU guest fixtures
//! (BAR sizes from the guest kernel, capability offsets from pciutils, as the conformance
//! checker compares them), on pciutils' own dumps, on this host's sysfs, and on paths
//! that are not what it reads.

#![cfg(feature = "cli")]
// Test code: failures panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pci-facts")).args(args).output().expect("pci-facts runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--json` output as bdf → object.
fn listed(args: &[&str]) -> BTreeMap<String, Value> {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    list.into_iter().map(|v| (v["bdf"].as_str().unwrap().to_string(), v)).collect()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qemu-x86_64")
}

/// Sorted offsets of a capability list.
fn offsets(list: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = list.as_array().unwrap().iter().map(|c| c["offset"].as_u64().unwrap()).collect();
    v.sort_unstable();
    v
}

#[test]
fn fixtures_equal_the_guest_kernel_and_lspci() {
    let got = listed(&["--json", fixtures().to_str().unwrap()]);
    let want: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "the same 29 functions");
    for (bdf, w) in &want {
        let g = &got[bdf];
        assert_eq!(g["source"], "sysfs", "{bdf}");
        assert_eq!(offsets(&g["capabilities"]), offsets(&w["caps"]), "{bdf}: capabilities");
        assert_eq!(
            offsets(&g["extended_capabilities"]),
            offsets(&w["ext_caps"]),
            "{bdf}: extended capabilities"
        );
        let bars: BTreeMap<String, &Value> =
            g["bars"].as_array().unwrap().iter().map(|b| (b["index"].to_string(), b)).collect();
        for (index, wb) in w["bars"].as_object().unwrap() {
            let gb = bars.get(index).unwrap_or_else(|| panic!("{bdf}: BAR {index} missing"));
            for key in ["kind", "prefetchable", "size"] {
                assert_eq!(gb[key], wb[key], "{bdf} BAR {index} {key}");
            }
        }
    }
}

#[test]
fn human_listing_of_a_function_directory() {
    let nvme = fixtures().join("0000:01:00.0");
    let o = run(&[nvme.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with("0000:01:00.0 "), "{text}");
    assert!(text.contains("\tMemory at "), "{text}");
    assert!(text.contains("Capabilities: ["), "{text}");
}

#[test]
fn pciutils_dumps_decode() {
    let dumps = common::conformance_dir().join("pciutils/dumps");
    let mut devices = 0;
    for entry in std::fs::read_dir(&dumps).unwrap() {
        let path = entry.unwrap().path();
        let got = listed(&["--json", path.to_str().unwrap()]);
        assert!(!got.is_empty(), "{}", path.display());
        assert!(got.values().all(|d| d["source"] == "dump"), "{}", path.display());
        devices += got.len();
    }
    assert!(devices > 100, "{devices} devices in pciutils' dumps");
}

#[test]
fn this_hosts_functions_are_listed() {
    let got = listed(&["--json"]);
    let sysfs: Vec<String> =
        pcilibs::sysfs::Sysfs::default().functions().unwrap().iter().map(ToString::to_string).collect();
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), sysfs);
}

#[test]
fn help_and_version() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    for word in ["Usage: pci-facts", "--json", "--sysfs-root", "lspci -x"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    assert!(run(&["--version"]).status.success());
    let bad = run(&["--no-such-flag"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

/// Each error says what was wrong and what to give instead; a device or FIFO is refused
/// without being read.
#[test]
fn errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(PathBuf, &str); 4] = [
        (dir.path().join("missing"), "give a sysfs function directory"),
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"), "expected `lspci -x` output"),
        (dir.path().to_path_buf(), "no PCI function directories here"),
    ];
    for (path, says) in cases {
        let o = run(&[path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{}", path.display());
        assert!(stderr(&o).contains(says), "{}: {}", path.display(), stderr(&o));
    }
    let o = run(&["--sysfs-root", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is sysfs mounted"), "{}", stderr(&o));
    // One bad PATH does not hide the good ones.
    let o = run(&[
        Path::new("/nonexistent").to_str().unwrap(),
        fixtures().join("0000:01:00.0").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("0000:01:00.0"));
}

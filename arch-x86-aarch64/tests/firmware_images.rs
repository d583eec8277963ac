//! Firmware generation detection against the real images of every provisioned stack
//! (`target/e2e/cache/stacks/<stack>/root.json`, written by `cargo xtask provision`):
//! what each image says about itself must match the Debian package it came from.

use std::path::{Path, PathBuf};

use arch_x86_aarch64::{detect_firmware, FirmwareGeneration, FirmwareKind, Release};

/// Provisioned stacks: (name, root folder, package versions).
fn stacks() -> Vec<(String, PathBuf, serde_json::Value)> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e/cache/stacks");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("root.json")) else { continue };
        let json: serde_json::Value = serde_json::from_str(&text).expect("root.json");
        let root = PathBuf::from(json.get("root").and_then(|r| r.as_str()).expect("root"));
        let packages = json.get("packages").cloned().expect("packages");
        out.push((entry.file_name().to_string_lossy().into_owned(), root, packages));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn package_release(packages: &serde_json::Value, name: &str) -> Release {
    let version = packages
        .as_array()
        .and_then(|a| a.iter().find(|p| p.get("package").is_some_and(|n| n == name)))
        .and_then(|p| p.get("version").and_then(|v| v.as_str()))
        .expect("the package is in the stack");
    Release::parse_prefix(version).expect("a Debian version")
}

#[test]
fn every_stack_image_tells_its_generation() {
    let stacks = stacks();
    assert!(
        !stacks.is_empty(),
        "no provisioned stack under target/e2e/cache/stacks: run `cargo xtask provision --stack NAME` first"
    );
    for (stack, root, packages) in &stacks {
        let seabios = detect_firmware(&root.join("usr/share/seabios/bios-256k.bin")).unwrap();
        let want = package_release(packages, "seabios");
        assert_eq!(seabios.kind, FirmwareKind::SeaBios, "{stack}");
        assert_eq!(seabios.release, Some(want), "{stack}: {seabios:?}");
        assert_eq!(seabios.generation, FirmwareGeneration::of_seabios(want), "{stack}");
        println!("{stack}: SeaBIOS {:?} -> {}", seabios.version_string, seabios.generation);

        let ovmf = detect_firmware(&root.join("usr/share/ovmf/OVMF.fd")).unwrap();
        let want = package_release(packages, "ovmf");
        assert_eq!(ovmf.kind, FirmwareKind::Ovmf, "{stack}");
        // Debian 12's OVMF carries no version; the others carry the package's.
        assert!(ovmf.release.map_or(true, |r| r == want), "{stack}: {ovmf:?}");
        assert_eq!(ovmf.generation, FirmwareGeneration::of_ovmf(want), "{stack}");
        println!("{stack}: OVMF {:?} -> {}", ovmf.version_string, ovmf.generation);

        let aavmf = detect_firmware(&root.join("usr/share/AAVMF/AAVMF_CODE.fd")).unwrap();
        let want = package_release(packages, "qemu-efi-aarch64");
        assert_eq!(aavmf.kind, FirmwareKind::Aavmf, "{stack}");
        assert_eq!(aavmf.release, Some(want), "{stack}: {aavmf:?}");
        assert_eq!(aavmf.generation, FirmwareGeneration::Aavmf, "{stack}");
        println!("{stack}: AAVMF {:?} -> {}", aavmf.version_string, aavmf.generation);

        // An OVMF image is not taken for SeaBIOS nor the other way round.
        assert!(arch_x86_aarch64::Virt::detect(&root.join("usr/share/ovmf/OVMF.fd")).is_err());
        let q35 = arch_x86_aarch64::Q35::detect(&root.join("usr/share/seabios/bios-256k.bin")).unwrap();
        assert_eq!(q35.generation, seabios.generation);
    }
}

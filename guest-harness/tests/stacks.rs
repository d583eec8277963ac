//! Provisioning on real packages from Debian's archive: the stack's unpacked root runs
//! its QEMU and `lspci` with its own libraries only, absolute links stay inside it, the
//! guest kernels of all three Debian layouts are found (bookworm's, trixie's merged /usr,
//! the 7.x kernels split over `linux-binary-*`, `linux-modules-*`, `linux-base-*`), and a
//! guest architecture the archive cannot serve fails alone, saying what to do.
//!
//! Runs on `$XTASK_STACK` (set by `cargo xtask test`), else the default stack; the layout
//! test provisions the kernels of the other stacks too (downloads on first use).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;

use guest_harness::arch::Arch;
use guest_harness::guest::{asset_hint, GuestError};
use guest_harness::kernels::{GuestKernel, KernelError};
use guest_harness::stacks::{self, Stack, StackDef, Suite};

fn stack() -> Stack {
    guest_harness::default_stack().unwrap()
}

/// Every symbolic link below `dir` whose target is absolute.
fn absolute_links(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                todo.push(e.path());
            } else if kind.is_symlink() && std::fs::read_link(e.path()).unwrap().is_absolute() {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn the_root_runs_its_programs_with_its_own_libraries() {
    let root = stack().root().unwrap_or_else(|e| panic!("{e}"));
    assert!(root.root.starts_with(guest_harness::cache_dir()), "{}", root.root.display());
    assert_eq!(absolute_links(&root.root), Vec::<PathBuf>::new(), "absolute links would point into the host");
    for arch in Arch::ALL {
        let program = root.launcher.program(arch.qemu_binary());
        let libs = root.launcher.libraries(&program, &root.root).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libglib-2.0")), "{libs:?}");
        let out = root.launcher.qemu(arch).arg("--version").output().unwrap();
        assert!(out.status.success(), "{arch}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stacks::parse_qemu_version(&text), root.qemu_version, "{arch}");
    }
    let lspci = root.launcher.command("lspci").arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&lspci.stdout).starts_with("lspci version"), "{lspci:?}");
    for path in [stacks::OVMF_FD, stacks::AARCH64_UEFI_FD, stacks::AAVMF_CODE_FD, stacks::SEABIOS_BIN] {
        let file = root.file(path);
        assert!(file.starts_with(&root.root) && file.is_file(), "{path}: {}", file.display());
    }
    // Every package is named with its version, and the versions report says which.
    let v = root.versions();
    assert_eq!(v.seabios, root.package_version("seabios").unwrap());
    assert!(!v.ovmf.is_empty() && !v.aavmf.is_empty() && !v.qemu.is_empty(), "{v:?}");
}

/// bookworm's `libc6` ships `/lib64/ld-linux-x86-64.so.2` as an absolute link; unpacked,
/// it must lead to the root's own loader.
#[test]
fn the_loader_link_resolves_inside_the_root() {
    let bookworm = guest_harness::stack("bookworm").unwrap().root().unwrap_or_else(|e| panic!("{e}"));
    let link = bookworm.root.join("lib64/ld-linux-x86-64.so.2");
    let target = std::fs::read_link(&link).unwrap();
    assert!(target.is_relative(), "{}", target.display());
    let real = std::fs::canonicalize(&link).unwrap();
    assert!(real.starts_with(std::fs::canonicalize(&bookworm.root).unwrap()), "{}", real.display());
    assert_eq!(
        guest_harness::debroot::resolve(&bookworm.root, "/lib64/ld-linux-x86-64.so.2").unwrap(),
        bookworm.root.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    );
}

/// The wrapper scripts stand in for installed programs, as `cargo xtask test` uses them.
#[test]
fn wrappers_run_the_stacks_programs() {
    let root = stack().root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    root.write_wrappers(dir.path()).unwrap();
    for name in ["qemu-system-x86_64", "qemu-system-aarch64", "qemu-system-s390x", "lspci", "busybox"] {
        let out = Command::new(dir.path().join(name)).arg("--help").output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("No such file") && !text.contains("error while loading"), "{name}: {text}");
    }
    let out = Command::new(dir.path().join("qemu-system-s390x")).args(["-machine", "help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("s390-ccw-virtio"), "{out:?}");
}

fn check_kernel(k: &GuestKernel, merged_usr: bool) {
    let image = std::fs::read(&k.image).unwrap();
    match k.arch {
        // bzImage: "HdrS" at 0x202.
        Arch::X86_64 => {
            assert_eq!(image.get(0x202..0x206), Some(b"HdrS".as_slice()), "{}", k.image.display())
        }
        _ => assert!(image.len() > 1 << 20, "{}", k.image.display()),
    }
    let dir = k.modules_dir.to_string_lossy();
    assert!(dir.ends_with(&format!("/lib/modules/{}", k.release)), "{dir}");
    assert_eq!(dir.contains("/usr/lib/modules/"), merged_usr, "{dir}");
    assert!(k.kernel_config().unwrap().get("PCI").is_some());
    let index = k.module_index().unwrap();
    assert!(index.file("vfio-pci").is_some() || index.is_builtin("vfio-pci"), "{}", k.release);
    assert!(index.load_order(&["vfio-pci"]).is_ok());
}

/// bookworm keeps kernel files under `boot/` and `lib/modules`; trixie's 6.12 under
/// `boot/` and `usr/lib/modules`; the 7.x kernels (`current`) in `usr/lib/modules`
/// only, spread over three packages the `linux-image-*` package depends on.
#[test]
fn kernels_of_every_debian_layout_are_found() {
    for (name, merged_usr, split) in
        [("bookworm", false, false), ("trixie", true, false), ("current", true, true)]
    {
        let stack = guest_harness::stack(name).unwrap();
        let k = stack.kernel(Arch::X86_64).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_kernel(&k, merged_usr);
        let from_boot = k.image.to_string_lossy().contains("/boot/vmlinuz-");
        assert_eq!(from_boot, !split, "{name}: {}", k.image.display());
        if split {
            let parts = guest_harness::kernels::kernel_packages(&stack.debs(), Arch::X86_64).unwrap();
            let names: Vec<&str> = parts.iter().map(|p| p.package.as_str()).collect();
            for prefix in guest_harness::kernels::SPLIT_PARTS {
                assert!(names.iter().any(|n| n.starts_with(prefix)), "{name}: {names:?}");
            }
        }
    }
}

/// bookworm's suites with s390x left out: apt cannot resolve the s390x kernel, the other
/// architectures are served as before.
static NO_S390X: StackDef = StackDef {
    name: "test-bookworm-no-s390x",
    summary: "bookworm without s390x lists (tests)",
    suites: &[
        Suite { uri: stacks::DEBIAN, suite: "bookworm", arches: Some(&["amd64", "arm64"]) },
        Suite { uri: stacks::DEBIAN, suite: "bookworm-updates", arches: Some(&["amd64", "arm64"]) },
        Suite { uri: stacks::DEBIAN_SECURITY, suite: "bookworm-security", arches: Some(&["amd64", "arm64"]) },
    ],
    pins: &[],
    extra_packages: &[],
};

#[test]
fn an_architecture_the_archive_cannot_serve_fails_alone() {
    let stack = Stack::from_def(&NO_S390X, guest_harness::cache_dir());
    let x86 = stack.kernel(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    check_kernel(&x86, false);
    let err = stack.kernel(Arch::S390x).unwrap_err();
    assert!(matches!(err, KernelError::Deb(_)), "{err}");
    assert!(err.to_string().contains("linux-image-s390x:s390x"), "{err}");
    let hint = asset_hint(stack.name(), Arch::S390x, &err);
    let wrapped =
        GuestError::Assets { stack: stack.name().into(), arch: Arch::S390x, source: Box::new(err), hint };
    let text = wrapped.to_string();
    for want in
        ["s390x guest kernel", "other architectures are not affected", "cargo xtask provision --stack"]
    {
        assert!(text.contains(want), "{want} missing from: {text}");
    }
}

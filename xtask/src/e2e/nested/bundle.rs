//! Files the outer guest needs beyond the harness's initramfs: the inner QEMU with its
//! shared libraries, dynamic loader, TCG accelerator module and the firmware files it
//! loads, the project's program (dynamically linked, so with its libraries too) and the
//! kernel the inner guest boots.
//!
//! The inner QEMU is the stack's: its files keep their paths inside the stack's root,
//! under [`STACK_PREFIX`] in the outer guest, and it runs there through the root's own
//! loader as on the host ([`Launcher::relocated`]), so its libraries never mix with the
//! program's. The program's libraries are the host's (it is built here), found with
//! `ldd` and placed at the paths `ldd` names; the outer guest's default loader finds them
//! in its default directories (there is no `ld.so.cache`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_harness::arch::Arch;
use guest_harness::initramfs::ExtraFile;
use guest_harness::launcher::Launcher;
use guest_harness::stacks::StackRoot;

type Result<T> = std::result::Result<T, String>;

/// Where the stack's root goes in the outer guest.
pub const STACK_PREFIX: &str = "/stack";

/// The inner QEMU, inside the root.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// QEMU's TCG accelerator for x86 guests, a module in Debian's QEMU (7.2); built in
/// where the root has no such file.
pub const TCG_MODULE: &str = "accel-tcg-x86_64.so";

/// Firmware files a q35 guest with SeaBIOS and a `-kernel` loads (`pvh.bin` for an ELF
/// kernel, `linuxboot_dma.bin` for a bzImage), inside the root.
pub const FIRMWARE: [&str; 4] = [
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/pvh.bin",
];

/// Where the program goes in the outer guest.
pub const PROGRAM: &str = "/xt/nested/nested-vfio";

/// Where the inner guest's kernel goes in the outer guest (uncompressed ELF, PVH boot).
pub const KERNEL: &str = "/xt/nested/vmlinux";

/// Where it goes when only the compressed bzImage could be used.
pub const KERNEL_BZIMAGE: &str = "/xt/nested/vmlinuz";

/// Where the configuration goes in the outer guest.
pub const CONFIG: &str = "/xt/nested/config.json";

/// The shared libraries `ldd` lists for `elf` (absolute paths, loader included).
pub fn libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(elf).output().map_err(|e| format!("ldd {}: {e}", elf.display()))?;
    if !out.status.success() {
        return Err(format!("ldd {}: {}", elf.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
        return Err(format!("ldd {}: a library is missing on this host: {}", elf.display(), missing.trim()));
    }
    Ok(guest_harness::launcher::parse_ldd(&text))
}

/// Files by guest path; the first addition of a path wins.
#[derive(Debug, Default)]
pub struct Bundle {
    files: BTreeMap<String, ExtraFile>,
}

impl Bundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Bundle::default()
    }

    /// Adds `data` at `guest`.
    pub fn add_data(&mut self, guest: &str, mode: u32, data: Vec<u8>) {
        self.files.entry(guest.to_string()).or_insert_with(|| ExtraFile {
            path: guest.to_string(),
            mode,
            data,
        });
    }

    /// Adds the host file `host` (symbolic links followed) at `guest`.
    pub fn add_file(&mut self, host: &Path, guest: &str, mode: u32) -> Result<()> {
        if self.files.contains_key(guest) {
            return Ok(());
        }
        let data = std::fs::read(host).map_err(|e| format!("reading {}: {e}", host.display()))?;
        self.add_data(guest, mode, data);
        Ok(())
    }

    /// Adds an executable or shared object at its own path with every library it needs.
    pub fn add_elf(&mut self, elf: &Path, guest: &str) -> Result<()> {
        self.add_file(elf, guest, 0o755)?;
        for lib in libraries(elf)? {
            let path = lib.to_str().ok_or_else(|| format!("library path {} is not UTF-8", lib.display()))?;
            self.add_file(&lib, path, 0o755)?;
        }
        Ok(())
    }

    /// The stack's QEMU for x86_64 guests with its loader, libraries, TCG module (where
    /// it is one) and firmware, under [`STACK_PREFIX`]; returns the launcher that runs it
    /// there.
    pub fn add_stack_qemu(&mut self, stack: &StackRoot) -> Result<Launcher> {
        let root = &stack.root;
        let launcher = &stack.launcher;
        let guest_path = |host: &Path| -> Result<String> {
            let rel = host
                .strip_prefix(root)
                .map_err(|_| format!("{} is not inside {}", host.display(), root.display()))?;
            Ok(Path::new(STACK_PREFIX).join(rel).display().to_string())
        };
        let loader = launcher.loader.clone().ok_or("the stack has no loader")?;
        self.add_file(&loader, &guest_path(&loader)?, 0o755)?;
        let binary = launcher.program(Arch::X86_64.qemu_binary());
        let mut elves = vec![binary];
        if let Some(module) =
            launcher.qemu_module_dir.as_ref().map(|d| d.join(TCG_MODULE)).filter(|m| m.is_file())
        {
            elves.push(module);
        }
        for elf in elves {
            self.add_file(&elf, &guest_path(&elf)?, 0o755)?;
            for lib in launcher.libraries(&elf, root)? {
                self.add_file(&lib, &guest_path(&lib)?, 0o755)?;
            }
        }
        for path in FIRMWARE {
            let file = stack.file(path);
            // The guest path is the installed one: QEMU's `-L` folders are searched by name.
            self.add_file(
                &file,
                &Path::new(STACK_PREFIX).join(path.trim_start_matches('/')).display().to_string(),
                0o644,
            )?;
        }
        Ok(launcher.relocated(root, Path::new(STACK_PREFIX)))
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.data.len() as u64).sum()
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the bundle is empty.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The files, for [`guest_harness::initramfs::InitramfsSpec::files`].
    pub fn into_files(self) -> Vec<ExtraFile> {
        self.files.into_values().collect()
    }
}

/// A copy of `elf` without debug information (`strip --strip-debug`), in `dir`; the
/// original when `strip` is missing or fails (the guest then needs more memory).
pub fn stripped(elf: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(elf.file_name().unwrap_or_default());
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(elf)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        out
    } else {
        elf.to_path_buf()
    }
}

/// Start of an xz stream.
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];

/// Start of a zstd frame.
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The payload of a bzImage unpacked: xz (Debian's 6.1 kernels) with `xz
/// --single-stream`, zstd (6.12 and 7.x) with `ruzstd`, one frame; both ignore the
/// bzImage's trailing bytes.
fn unpack_payload(image: &[u8], bzimage: &Path) -> Result<Vec<u8>> {
    let find = |magic: &[u8]| image.windows(magic.len()).position(|w| w == magic);
    if let Some(at) = find(XZ_MAGIC) {
        return unxz(image.get(at..).unwrap_or_default());
    }
    if let Some(at) = find(ZSTD_MAGIC) {
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(image.get(at..).unwrap_or_default())
            .map_err(|e| format!("{}: zstd: {e}", bzimage.display()))?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut decoder, &mut out)
            .map_err(|e| format!("{}: zstd: {e}", bzimage.display()))?;
        return Ok(out);
    }
    Err(format!("{}: no xz or zstd payload", bzimage.display()))
}

fn unxz(payload: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("xz (install xz-utils): {e}"))?;
    let mut stdin = child.stdin.take().ok_or("xz: no stdin")?;
    let payload = payload.to_vec();
    // Writing and reading at once: xz's output would fill the pipe otherwise.
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        match stdin.write_all(&payload) {
            // xz stops reading at the end of the stream; the bzImage's tail stays unread.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("xz: {e}")),
            _ => Ok(()),
        }
    });
    let out = child.wait_with_output().map_err(|e| format!("xz: {e}"))?;
    writer.join().map_err(|_| "xz: the writer thread panicked".to_string())??;
    if !out.status.success() {
        return Err(format!("xz: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out.stdout)
}

/// The kernel inside a bzImage as a stripped ELF file, cached in `cache_dir`.
///
/// QEMU boots such an ELF through its PVH entry point, which skips the decompressor: inside
/// the outer guest (TCG inside TCG) that saves ~30 s of decompression per inner boot.
/// The payload is found by its magic ([`unpack_payload`]).
pub fn uncompressed_kernel(bzimage: &Path, cache_dir: &Path, key: &str) -> Result<PathBuf> {
    let out = cache_dir.join(format!("vmlinux-{key}"));
    if std::fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
        return Ok(out);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| format!("{}: {e}", cache_dir.display()))?;
    let image = std::fs::read(bzimage).map_err(|e| format!("reading {}: {e}", bzimage.display()))?;
    let elf = unpack_payload(&image, bzimage)?;
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(format!("{}: the payload did not unpack to an ELF file", bzimage.display()));
    }
    let raw = cache_dir.join(format!("vmlinux-{key}.unstripped"));
    std::fs::write(&raw, &elf).map_err(|e| format!("{}: {e}", raw.display()))?;
    let tmp = cache_dir.join(format!("vmlinux-{key}.tmp"));
    let stripped = Command::new("strip").arg("--strip-all").arg("-o").arg(&tmp).arg(&raw).status();
    let from = if stripped.is_ok_and(|s| s.success()) { &tmp } else { &raw };
    std::fs::rename(from, &out).map_err(|e| format!("{}: {e}", out.display()))?;
    let _ = std::fs::remove_file(&raw);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_payload_must_be_there() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("bzImage");
        std::fs::write(&fake, b"MZ no payload").unwrap();
        let e = uncompressed_kernel(&fake, dir.path(), "k").unwrap_err();
        assert!(e.contains("no xz or zstd payload"), "{e}");
        // A zstd payload after a header, with trailing bytes, unpacks to what was packed.
        let elf = b"\x7fELF rest of a kernel".repeat(100);
        let mut image = b"MZ header bytes".to_vec();
        image.extend(ruzstd::encoding::compress_to_vec(
            elf.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        image.extend(b"trailing");
        assert_eq!(unpack_payload(&image, &fake).unwrap(), elf);
    }

    /// The default stack's QEMU with everything it loads, and a launcher that runs it
    /// from the guest paths.
    #[test]
    fn stack_qemu_bundle_has_loader_libraries_and_firmware() {
        let stack = guest_harness::default_stack().unwrap();
        let root = stack.root().unwrap_or_else(|e| panic!("{e} (cargo xtask provision)"));
        let mut b = Bundle::new();
        let launcher = b.add_stack_qemu(&root).unwrap();
        let paths: Vec<String> = b.files.keys().cloned().collect();
        let loader = launcher.loader.clone().unwrap();
        assert!(loader.starts_with(STACK_PREFIX), "{loader:?}");
        assert!(paths.iter().any(|p| Path::new(p) == loader), "{loader:?} missing from {paths:?}");
        for want in [
            "/stack/usr/bin/qemu-system-x86_64",
            "/stack/usr/share/seabios/bios-256k.bin",
            "/stack/usr/share/qemu/pvh.bin",
        ] {
            assert!(paths.iter().any(|p| p == want), "{want} missing from {paths:?}");
        }
        assert!(paths.iter().any(|p| p.contains("libglib-2.0.so")), "{paths:?}");
        assert!(paths.iter().all(|p| p.starts_with("/stack/")), "{paths:?}");
        assert_eq!(launcher.bin_dir.as_deref(), Some(Path::new("/stack/usr/bin")));
        assert!(launcher.qemu_data_dirs.iter().all(|d| d.starts_with(STACK_PREFIX)), "{launcher:?}");
        assert!(b.bytes() > 10 << 20);
        let n = b.len();
        b.add_stack_qemu(&root).unwrap();
        assert_eq!(b.len(), n, "adding twice changes nothing");
    }
}

//! Software stacks: one generation of QEMU, firmware and guest kernels each, provisioned
//! from Debian's archive into the cache, never into the host.
//!
//! | stack | QEMU | SeaBIOS | edk2 (OVMF, AAVMF) | guest kernels | from |
//! |---|---|---|---|---|---|
//! | `bookworm` | 7.2 | 1.16.2 | 2022.11 | 6.1 | Debian 12 |
//! | `trixie` | 10.0 | 1.16.3 | 2025.02 | 6.12 | Debian 13 |
//! | `current` | 11.x | 1.17 | newest in Debian | 7.x | trixie-backports; edk2 from sid |
//!
//! Each stack has its own [`AptSource`] (own lists, pins and an empty dpkg status, see
//! [`crate::debs`]). Its host-side programs — the three QEMU system emulators with
//! `qemu-system-data`, SeaBIOS, OVMF, AAVMF, iPXE option ROMs, a static busybox and
//! pciutils — are resolved together as for an empty machine (`apt-get -s install
//! --no-install-recommends`: the packages and their whole library closure), downloaded
//! and unpacked with `dpkg-deb -x` into one root, `<cache>/stacks/<name>/root-<hash>/`
//! ([`StackRoot`]). Its programs run through the root's own dynamic loader
//! ([`Launcher`]), so a trixie QEMU runs on a bookworm host. The guest kernels and
//! busyboxes of the three guest architectures come from the same source, per
//! architecture ([`Stack::kernel`]): a failure there fails only that architecture.
//!
//! Firmware images are architecture-independent data, so `current` takes edk2 from sid
//! (pinned to those packages only) while its QEMU and libraries come from trixie and
//! trixie-backports.

use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::command::{self, CommandError};
use crate::debroot::{self, HostAbi, RootError};
use crate::debs::{AptSource, DebCache, DebError, DebRef};
use crate::firmware::Firmware;
use crate::kernels::{self, GuestKernel, KernelError};
use crate::launcher::Launcher;

/// A stack could not be named or provisioned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// No stack has that name.
    #[error("unknown stack `{name}` (known: {})", known.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The stacks there are.
        known: Vec<&'static str>,
    },
    /// Apt could not resolve, download or unpack the stack's packages.
    #[error("stack {stack}: {source}")]
    Deb {
        /// The stack.
        stack: &'static str,
        /// What apt or the cache said.
        source: Box<DebError>,
    },
    /// The unpacked root could not be read.
    #[error("stack {stack}: {source}")]
    Root {
        /// The stack.
        stack: &'static str,
        /// What went wrong.
        source: RootError,
    },
    /// The unpacked root lacks a file the stack needs.
    #[error("stack {stack}: {what} is missing from {}", root.display())]
    Missing {
        /// The stack.
        stack: &'static str,
        /// The file looked for.
        what: String,
        /// The root.
        root: PathBuf,
    },
    /// The stack's QEMU does not run.
    #[error("stack {stack}: its QEMU does not run: {source}")]
    Qemu {
        /// The stack.
        stack: &'static str,
        /// The failing command.
        source: CommandError,
    },
    /// Writing the stack's files failed.
    #[error("stack {stack}: {what} {}: {source}", path.display())]
    Io {
        /// The stack.
        stack: &'static str,
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// This host's architecture has no Debian QEMU build this code knows how to run.
    #[error("stacks run on x86_64 and aarch64 hosts only (this host: {0})")]
    UnsupportedHost(&'static str),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, StackError>;

/// The keyring Debian's sources are checked with (from the host's
/// `debian-archive-keyring`, which apt itself uses).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Debian's archive.
pub const DEBIAN: &str = "http://deb.debian.org/debian";

/// Debian's security archive.
pub const DEBIAN_SECURITY: &str = "http://deb.debian.org/debian-security";

/// One `deb` line of a stack's sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suite {
    /// Archive URI.
    pub uri: &'static str,
    /// Suite name (`bookworm-security`).
    pub suite: &'static str,
    /// The Debian architectures to fetch lists for; `None`: the host's and every guest
    /// architecture. A suite used for architecture-independent packages only names the
    /// host's.
    pub arches: Option<&'static [&'static str]>,
}

/// A pin: packages matching `packages` (apt's whitespace-separated names or globs) from
/// `suite` get `priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    /// Package names or globs.
    pub packages: &'static str,
    /// Suite (`n=` of the release).
    pub suite: &'static str,
    /// Pin priority.
    pub priority: i32,
}

/// A stack's definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackDef {
    /// Name on the command line (`--stack NAME`).
    pub name: &'static str,
    /// What it holds, in words.
    pub summary: &'static str,
    /// Where its packages come from.
    pub suites: &'static [Suite],
    /// Pins that pick suites per package.
    pub pins: &'static [Pin],
    /// Packages the root needs beyond [`ROOT_PACKAGES`] in this generation.
    pub extra_packages: &'static [&'static str],
}

const fn suite(uri: &'static str, suite: &'static str) -> Suite {
    Suite { uri, suite, arches: None }
}

/// Every stack.
pub const STACKS: [StackDef; 3] = [
    StackDef {
        name: "bookworm",
        summary: "Debian 12: QEMU 7.2, SeaBIOS 1.16.2, edk2 2022.11, Linux 6.1",
        suites: &[
            suite(DEBIAN, "bookworm"),
            suite(DEBIAN, "bookworm-updates"),
            suite(DEBIAN_SECURITY, "bookworm-security"),
        ],
        pins: &[],
        extra_packages: &[],
    },
    StackDef {
        name: "trixie",
        summary: "Debian 13: QEMU 10.0, SeaBIOS 1.16.3, edk2 2025.02, Linux 6.12",
        suites: &[
            suite(DEBIAN, "trixie"),
            suite(DEBIAN, "trixie-updates"),
            suite(DEBIAN_SECURITY, "trixie-security"),
        ],
        pins: &[],
        // Debian 13 packages the s390x emulator on its own (`qemu-system-misc` still
        // depends on it in 10.0, no longer in 11), and `qxl` (the planner's placeholder
        // with a 32-bit RAM BAR and an I/O BAR) with the SPICE modules.
        extra_packages: &["qemu-system-s390x", "qemu-system-modules-spice"],
    },
    StackDef {
        name: "current",
        summary: "trixie-backports: QEMU 11, SeaBIOS 1.17, Linux 7.x; edk2 (OVMF, AAVMF) from sid",
        suites: &[
            suite(DEBIAN, "trixie"),
            suite(DEBIAN, "trixie-updates"),
            suite(DEBIAN_SECURITY, "trixie-security"),
            suite(DEBIAN, "trixie-backports"),
            Suite { uri: DEBIAN, suite: "sid", arches: Some(&["amd64"]) },
        ],
        pins: &[
            // Backports count like the release, so the newest version wins.
            Pin { packages: "*", suite: "trixie-backports", priority: 500 },
            // From sid only the firmware images (architecture-independent data)...
            Pin { packages: "ovmf ovmf-* qemu-efi-aarch64", suite: "sid", priority: 990 },
            // ...and nothing else unless asked for by name.
            Pin { packages: "*", suite: "sid", priority: 1 },
        ],
        extra_packages: &["qemu-system-s390x", "qemu-system-modules-spice"],
    },
];

/// The stack runs use when none is named: the one every default scenario passes on (see
/// the README's "Stacks").
pub const DEFAULT_STACK: &str = "bookworm";

/// The environment variable naming the stack when `--stack` is not given (`cargo xtask
/// test` sets it for the tests it runs).
pub const STACK_ENV: &str = "XTASK_STACK";

/// The environment variable that tells the crates' tests where firmware lives: a folder
/// holding Debian's firmware layout (`usr/share/ovmf/OVMF.fd`,
/// `usr/share/AAVMF/AAVMF_CODE.fd`, `usr/share/qemu-efi-aarch64/QEMU_EFI.fd`). Unset, the
/// tests use the installed paths.
pub const FIRMWARE_ROOT_ENV: &str = "PCIE_HOTPLUG_FIRMWARE_ROOT";

/// The host-side packages of every stack.
pub const ROOT_PACKAGES: [&str; 10] = [
    "qemu-system-x86",
    "qemu-system-arm",
    "qemu-system-misc",
    "qemu-system-data",
    "seabios",
    "ovmf",
    "qemu-efi-aarch64",
    "ipxe-qemu",
    "busybox-static",
    "pciutils",
];

/// Firmware images and other files of a root, by their installed path.
pub const OVMF_FD: &str = "/usr/share/ovmf/OVMF.fd";
/// The aarch64 UEFI image `-bios` takes.
pub const AARCH64_UEFI_FD: &str = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd";
/// The AAVMF code image (pflash).
pub const AAVMF_CODE_FD: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
/// SeaBIOS as QEMU loads it.
pub const SEABIOS_BIN: &str = "/usr/share/seabios/bios-256k.bin";
/// The s390x loader QEMU boots.
pub const S390_CCW_IMG: &str = "/usr/share/qemu/s390-ccw.img";

impl StackDef {
    /// The stack called `name`.
    pub fn named(name: &str) -> Result<&'static StackDef> {
        STACKS.iter().find(|s| s.name == name).ok_or_else(|| StackError::Unknown {
            name: name.to_string(),
            known: STACKS.iter().map(|s| s.name).collect(),
        })
    }

    /// The stack's apt source: its `sources.list` lines and pin preferences.
    pub fn source(&self) -> AptSource {
        let archs = crate::debs::architectures().join(",");
        let mut lines = String::new();
        for s in self.suites {
            let arch = s.arches.map_or_else(|| archs.clone(), |a| a.join(","));
            lines.push_str(&format!(
                "deb [arch={arch} signed-by={DEBIAN_KEYRING}] {} {} main\n",
                s.uri, s.suite
            ));
        }
        let preferences: Vec<String> = self
            .pins
            .iter()
            .map(|p| {
                format!("Package: {}\nPin: release n={}\nPin-Priority: {}\n", p.packages, p.suite, p.priority)
            })
            .collect();
        AptSource { name: self.name, lines, preferences: preferences.join("\n") }
    }
}

/// The versions a stack runs, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Versions {
    /// Stack name.
    pub stack: String,
    /// `qemu-system-x86_64 --version`, without its "QEMU emulator version" prefix.
    pub qemu: String,
    /// Debian version of `seabios`.
    pub seabios: String,
    /// Debian version of `ovmf` (edk2).
    pub ovmf: String,
    /// Debian version of `qemu-efi-aarch64` (edk2, AAVMF).
    pub aavmf: String,
}

impl Versions {
    /// The firmware a guest of `arch` booting through `firmware` runs, with its version.
    pub fn firmware(&self, firmware: Firmware, arch: Arch) -> String {
        match (firmware, arch) {
            (Firmware::SeaBios, _) => format!("SeaBIOS {}", self.seabios),
            (Firmware::Ovmf, _) => format!("OVMF {}", self.ovmf),
            (Firmware::Uefi, _) => format!("AAVMF {}", self.aavmf),
            (_, Arch::S390x) => "s390-ccw (QEMU's)".into(),
            _ => "none (direct kernel boot)".into(),
        }
    }
}

/// A stack's unpacked root: where it is, what it holds, how to run its programs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct StackRoot {
    /// Stack name.
    pub stack: String,
    /// The root folder.
    pub root: PathBuf,
    /// Every package unpacked into it.
    pub packages: Vec<DebRef>,
    /// How to start its programs.
    pub launcher: Launcher,
    /// First line of `qemu-system-x86_64 --version`.
    pub qemu_version: String,
    /// [`set_hash`]-style hash of the source (lines and pins) the root was resolved from:
    /// a changed definition provisions a new root.
    pub source_hash: String,
}

/// The first line of `--version` output without QEMU's prefix.
pub fn parse_qemu_version(output: &str) -> String {
    let first = output.lines().next().unwrap_or("").trim();
    first.strip_prefix("QEMU emulator version ").unwrap_or(first).to_string()
}

/// FNV-1a of `text` (stable across builds and platforms), as 16 hex digits.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A short hash of a package set, naming its root folder.
pub fn set_hash(refs: &[DebRef]) -> String {
    let text: String = refs.iter().map(|r| format!("{} {} {}\n", r.package, r.version, r.arch)).collect();
    fnv(&text)
}

/// A short hash of a source's lines and pins.
pub fn source_hash(source: &AptSource) -> String {
    fnv(&format!("{}\n--\n{}", source.lines, source.preferences))
}

impl StackRoot {
    /// The version of `package` in the root, if it is there.
    pub fn package_version(&self, package: &str) -> Option<&str> {
        self.packages.iter().find(|r| r.package == package).map(|r| r.version.as_str())
    }

    /// What the stack runs.
    pub fn versions(&self) -> Versions {
        let v = |p: &str| self.package_version(p).unwrap_or("-").to_string();
        Versions {
            stack: self.stack.clone(),
            qemu: self.qemu_version.clone(),
            seabios: v("seabios"),
            ovmf: v("ovmf"),
            aavmf: v("qemu-efi-aarch64"),
        }
    }

    /// The file `path` (an installed path such as [`OVMF_FD`]) names in the root.
    pub fn file(&self, path: &str) -> PathBuf {
        debroot::resolve(&self.root, path).unwrap_or_else(|_| self.root.join(path.trim_start_matches('/')))
    }

    /// The host's static busybox from the root.
    pub fn busybox(&self) -> PathBuf {
        let usr = self.file("/usr/bin/busybox");
        if usr.is_file() {
            usr
        } else {
            self.file("/bin/busybox")
        }
    }

    /// The programs a wrapper stands in for: the QEMU emulators, `lspci`, `busybox`.
    fn wrapped(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Arch::ALL
            .iter()
            .map(|a| (a.qemu_binary().to_string(), self.launcher.wrapper_script(a.qemu_binary(), true)))
            .collect();
        // The root's device names (pciutils looks for them at the installed path).
        let ids = self.file("/usr/share/misc/pci.ids");
        let extra =
            if ids.is_file() { vec!["-i".to_string(), ids.display().to_string()] } else { Vec::new() };
        out.push(("lspci".into(), self.launcher.wrapper_script_with("lspci", false, &extra)));
        let busybox = crate::launcher::shell_quote(&self.busybox().display().to_string());
        out.push(("busybox".into(), format!("#!/bin/sh\nexec {busybox} \"$@\"\n")));
        out
    }

    /// Writes wrapper scripts for the QEMU emulators, `lspci` and `busybox` into `dir`:
    /// first on `PATH`, they stand in for installed programs.
    pub fn write_wrappers(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, script) in self.wrapped() {
            let path = dir.join(&name);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, script)?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }
}

/// A stack in a cache folder: provisions and hands out its root, kernels and busyboxes.
#[derive(Clone, Debug)]
pub struct Stack {
    def: &'static StackDef,
    cache_root: PathBuf,
}

/// One provisioning of a root at a time per process (guests start in parallel).
static PROVISIONING: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Stack {
    /// The stack called `name`, cached under `cache_root` (`target/e2e/cache`).
    pub fn named(name: &str, cache_root: impl Into<PathBuf>) -> Result<Stack> {
        Ok(Stack { def: StackDef::named(name)?, cache_root: cache_root.into() })
    }

    /// A stack of another definition than [`STACKS`] (a variant for tests), cached under
    /// `cache_root`. Its name must differ from every other stack's in that cache: it
    /// names the stack's apt set-up and root there.
    pub fn from_def(def: &'static StackDef, cache_root: impl Into<PathBuf>) -> Stack {
        Stack { def, cache_root: cache_root.into() }
    }

    /// The name of the stack to use when none is given: `$XTASK_STACK`, else
    /// [`DEFAULT_STACK`].
    pub fn default_name() -> String {
        std::env::var(STACK_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_STACK.to_string())
    }

    /// The stack's name.
    pub fn name(&self) -> &'static str {
        self.def.name
    }

    /// The stack's definition.
    pub fn def(&self) -> &'static StackDef {
        self.def
    }

    /// The cache folder shared by every stack.
    pub fn cache_root(&self) -> &Path {
        &self.cache_root
    }

    /// The package cache fed by this stack's source.
    pub fn debs(&self) -> DebCache {
        DebCache::new(&self.cache_root, self.def.source())
    }

    /// `<cache>/stacks/<name>`.
    pub fn dir(&self) -> PathBuf {
        self.cache_root.join("stacks").join(self.def.name)
    }

    /// Where [`Stack::write_wrappers`] puts the wrapper scripts.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir().join("bin")
    }

    fn manifest(&self) -> PathBuf {
        self.dir().join("root.json")
    }

    fn deb_err(&self) -> impl FnOnce(DebError) -> StackError {
        let stack = self.def.name;
        move |source| StackError::Deb { stack, source: Box::new(source) }
    }

    fn io_err<'a>(
        &self,
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> StackError + 'a {
        let stack = self.def.name;
        move |source| StackError::Io { stack, what, path: path.to_path_buf(), source }
    }

    /// The provisioned root: read from the cache when it is there, else resolved,
    /// downloaded, unpacked and checked now.
    pub fn root(&self) -> Result<StackRoot> {
        let _one = PROVISIONING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = self.cached_root() {
            return Ok(found);
        }
        self.provision_root()
    }

    /// Fetches the stack's package lists again and provisions the root they name (a new
    /// folder when any package changed).
    pub fn update(&self) -> Result<StackRoot> {
        let _one = PROVISIONING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.debs().update().map_err(self.deb_err())?;
        self.provision_root()
    }

    fn cached_root(&self) -> Option<StackRoot> {
        let text = std::fs::read(self.manifest()).ok()?;
        let root: StackRoot = serde_json::from_slice(&text).ok()?;
        let usable = root.source_hash == source_hash(&self.def.source())
            && root.root.is_dir()
            && root.launcher.loader.as_ref().is_some_and(|l| l.exists());
        usable.then_some(root)
    }

    fn provision_root(&self) -> Result<StackRoot> {
        let debs = self.debs();
        let wanted: Vec<String> =
            ROOT_PACKAGES.iter().chain(self.def.extra_packages).map(|p| p.to_string()).collect();
        let refs = debs.solve(&wanted).map_err(self.deb_err())?;
        let dir = self.dir().join(format!("root-{}", set_hash(&refs)));
        if !dir.is_dir() {
            eprintln!("stack {}: unpacking {} packages into {}", self.def.name, refs.len(), dir.display());
        }
        debs.unpack_into(&refs, &dir).map_err(self.deb_err())?;
        let root = self.check_root(&dir, refs)?;
        let manifest = self.manifest();
        let text = serde_json::to_vec_pretty(&root).unwrap_or_default();
        std::fs::write(&manifest, text).map_err(self.io_err("writing", &manifest))?;
        self.remove_other_roots(&dir);
        Ok(root)
    }

    /// Drops the roots of earlier package sets (a previous `--update`).
    fn remove_other_roots(&self, keep: &Path) {
        if let Ok(entries) = std::fs::read_dir(self.dir()) {
            for e in entries.flatten() {
                let p = e.path();
                if p != keep && e.file_name().to_string_lossy().starts_with("root-") && p.is_dir() {
                    // Space only: a folder that cannot be removed changes nothing.
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
    }

    /// The launcher for `dir`, after checking that every file the runs need is there
    /// and that QEMU starts.
    fn check_root(&self, dir: &Path, refs: Vec<DebRef>) -> Result<StackRoot> {
        let stack = self.def.name;
        let abi = HostAbi::current().ok_or(StackError::UnsupportedHost(std::env::consts::ARCH))?;
        let root_err = |source| StackError::Root { stack, source };
        let missing =
            |what: &str| StackError::Missing { stack, what: what.to_string(), root: dir.to_path_buf() };
        let loader = abi.loader_in(dir).map_err(root_err)?.ok_or_else(|| missing(abi.loader))?;
        let existing = |paths: &[&str]| -> Vec<PathBuf> {
            paths.iter().filter_map(|p| debroot::resolve(dir, p).ok()).filter(|p| p.is_dir()).collect()
        };
        let module_dir = format!("/usr/lib/{}/qemu", abi.triplet);
        let launcher = Launcher {
            loader: Some(loader),
            library_path: abi.library_dirs_in(dir),
            bin_dir: Some(dir.join("usr/bin")),
            qemu_data_dirs: existing(&["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu"]),
            qemu_module_dir: existing(&[module_dir.as_str()]).into_iter().next(),
        };
        let mut needed: Vec<String> =
            Arch::ALL.iter().map(|a| format!("/usr/bin/{}", a.qemu_binary())).collect();
        needed.extend(
            [OVMF_FD, AARCH64_UEFI_FD, AAVMF_CODE_FD, SEABIOS_BIN, S390_CCW_IMG, "/usr/bin/lspci"]
                .map(String::from),
        );
        for path in &needed {
            if !debroot::resolve(dir, path).map_err(root_err)?.exists() {
                return Err(missing(path));
            }
        }
        let mut root = StackRoot {
            stack: stack.to_string(),
            root: dir.to_path_buf(),
            packages: refs,
            launcher,
            qemu_version: String::new(),
            source_hash: source_hash(&self.def.source()),
        };
        if !root.busybox().is_file() {
            return Err(missing("/bin/busybox or /usr/bin/busybox"));
        }
        // Every library from the root: the loader would quietly take a missing one from
        // the host.
        let programs = Arch::ALL.iter().map(|a| a.qemu_binary()).chain(["lspci"]);
        for program in programs {
            root.launcher.libraries(&root.launcher.program(program), dir).map_err(|what| missing(&what))?;
        }
        let out = command::output(root.launcher.qemu(Arch::X86_64).arg("--version"))
            .map_err(|source| StackError::Qemu { stack, source })?;
        root.qemu_version = parse_qemu_version(&out);
        Ok(root)
    }

    /// Provisions the root and writes its wrapper scripts into [`Stack::bin_dir`].
    pub fn write_wrappers(&self) -> Result<(StackRoot, PathBuf)> {
        let root = self.root()?;
        let dir = self.bin_dir();
        root.write_wrappers(&dir).map_err(self.io_err("writing wrappers into", &dir))?;
        Ok((root, dir))
    }

    /// The guest kernel of `arch` from this stack's archive.
    pub fn kernel(&self, arch: Arch) -> std::result::Result<GuestKernel, KernelError> {
        kernels::ensure_kernel(&self.debs(), arch)
    }

    /// The static busybox of guest architecture `arch` from this stack's archive.
    pub fn busybox(&self, arch: Arch) -> std::result::Result<PathBuf, KernelError> {
        kernels::ensure_busybox(&self.debs(), arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stack_has_a_signed_source_for_every_guest_architecture() {
        for def in STACKS {
            let src = def.source();
            assert_eq!(src.name, def.name);
            for line in src.lines.lines() {
                assert!(line.starts_with("deb [arch=amd64"), "{line}");
                assert!(line.contains(&format!("signed-by={DEBIAN_KEYRING}]")), "{line}");
            }
            let first = src.lines.lines().next().unwrap();
            for arch in Arch::ALL {
                assert!(first.contains(arch.deb_arch()), "{first}");
            }
        }
        assert!(StackDef::named(DEFAULT_STACK).is_ok());
        let e = StackDef::named("sid").unwrap_err().to_string();
        assert!(e.contains("bookworm, trixie, current"), "{e}");
    }

    #[test]
    fn current_takes_only_firmware_from_sid() {
        let src = StackDef::named("current").unwrap().source();
        let sid = src.lines.lines().find(|l| l.contains(" sid ")).unwrap();
        assert!(sid.starts_with("deb [arch=amd64 "), "sid gives arch-independent packages only: {sid}");
        assert!(src
            .preferences
            .contains("Package: ovmf ovmf-* qemu-efi-aarch64\nPin: release n=sid\nPin-Priority: 990\n"));
        assert!(src.preferences.contains("Package: *\nPin: release n=sid\nPin-Priority: 1\n"));
        assert!(StackDef::named("bookworm").unwrap().source().preferences.is_empty());
    }

    #[test]
    fn versions_and_hashes() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022\n"
            ),
            "7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"
        );
        let a = DebRef { package: "a".into(), version: "1".into(), arch: "amd64".into() };
        let b = DebRef { version: "2".into(), ..a.clone() };
        let one = std::slice::from_ref(&a);
        let same = DebRef { package: "a".into(), version: "1".into(), arch: "amd64".into() };
        assert_eq!(set_hash(one), set_hash(&[same]));
        assert_ne!(set_hash(one), set_hash(&[b]));
        assert_eq!(set_hash(&[a]).len(), 16);
        let v = Versions {
            seabios: "1.16.2-1".into(),
            ovmf: "2022.11-6".into(),
            aavmf: "2022.11-6".into(),
            ..Versions::default()
        };
        assert_eq!(v.firmware(Firmware::SeaBios, Arch::X86_64), "SeaBIOS 1.16.2-1");
        assert_eq!(v.firmware(Firmware::Uefi, Arch::Aarch64), "AAVMF 2022.11-6");
        assert!(v.firmware(Firmware::None, Arch::S390x).starts_with("s390-ccw"));
    }
}

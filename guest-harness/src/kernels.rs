//! Guest kernels and guest busybox from Debian, per architecture, and the kernel's
//! modules with their dependencies.
//!
//! Debian's kernel package carries no `modules.dep` (the host's `depmod` writes it on
//! install), so dependencies are read from each module's `.modinfo` ELF section
//! (`depends=`), which is what `depmod` itself reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::debs::{self, DebCache, DebRef, Resolve};

/// A guest kernel or its modules could not be found or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The package could not be fetched.
    #[error(transparent)]
    Deb(#[from] debs::DebError),
    /// The unpacked package lacks a piece it should have.
    #[error("{what} not found in {}", dir.display())]
    Missing {
        /// What is missing.
        what: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A module asked for is neither built in nor shipped as a module.
    #[error("kernel {release} has no module `{name}` (neither built in nor in kernel/)")]
    UnknownModule {
        /// Kernel release.
        release: String,
        /// The module name.
        name: String,
    },
    /// A module file is not an ELF file with a readable `.modinfo` section.
    #[error("cannot read module info of {}: {reason}", path.display())]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a file failed.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, KernelError>;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| KernelError::Io { path: path.to_path_buf(), source })
}

/// Suffixes of module files: plain (Debian's 6.1 kernels), zstd (Ubuntu's) and xz.
const MODULE_SUFFIXES: [&str; 3] = [".ko", ".ko.zst", ".ko.xz"];

/// The module name of a module file name (`vfio-pci.ko.zst` → `vfio-pci`).
pub fn module_file_stem(file_name: &str) -> Option<&str> {
    MODULE_SUFFIXES.iter().rev().find_map(|suffix| file_name.strip_suffix(suffix))
}

/// A module file's ELF bytes, decompressed when it is `.ko.zst` or `.ko.xz`: busybox's
/// `insmod` loads plain ELF only, so compressed modules are unpacked on the host.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let data = read(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let bad = |reason: String| KernelError::BadModule { path: path.to_path_buf(), reason };
    if name.ends_with(".zst") {
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(data.as_slice())
            .map_err(|e| bad(format!("zstd: {e}")))?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut decoder, &mut out).map_err(|e| bad(format!("zstd: {e}")))?;
        Ok(out)
    } else if name.ends_with(".xz") {
        let mut child = std::process::Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| bad(format!("xz (install xz-utils): {e}")))?;
        if !child.status.success() {
            return Err(bad(format!("xz: {}", String::from_utf8_lossy(&child.stderr).trim())));
        }
        Ok(std::mem::take(&mut child.stdout))
    } else {
        Ok(data)
    }
}

/// Where a module file goes in the guest, relative to `lib/modules/<release>`: its path
/// with any compression suffix dropped, since the guest gets it decompressed.
pub fn guest_module_path(rel: &Path) -> PathBuf {
    let text = rel.to_string_lossy();
    let plain = text.strip_suffix(".zst").or_else(|| text.strip_suffix(".xz")).unwrap_or(&text);
    PathBuf::from(plain)
}

/// An unpacked Debian guest kernel.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    /// Guest architecture.
    pub arch: Arch,
    /// Kernel release (`uname -r` in the guest), e.g. `6.1.0-56-arm64`.
    pub release: String,
    /// Debian package name, e.g. `linux-image-6.1.0-56-arm64`.
    pub package: String,
    /// Debian package version, e.g. `6.1.192-2`.
    pub version: String,
    /// The bootable image (`boot/vmlinuz-…`).
    pub image: PathBuf,
    /// `lib/modules/<release>` (or `usr/lib/modules/<release>`).
    pub modules_dir: PathBuf,
    /// `boot/config-<release>` (or `config` in the modules folder): the kernel build
    /// configuration.
    pub config: PathBuf,
}

/// Prefixes of the packages a split kernel's `linux-image-<release>` depends on (Debian's
/// 7.x kernels): the image (`linux-binary-*`), the modules (`linux-modules-*`) and the
/// configuration and module lists (`linux-base-*`).
pub const SPLIT_PARTS: [&str; 3] = ["linux-binary-", "linux-modules-", "linux-base-"];

/// The packages of the kernel that `linux-image-<debarch>` names in `cache`'s source: the
/// `linux-image-<release>` package first, then the split parts it depends on (none for a
/// kernel in one package).
pub fn kernel_packages(cache: &DebCache, arch: Arch) -> debs::Result<Vec<DebRef>> {
    let meta = format!("linux-image-{}", arch.deb_arch());
    let (image, version) = cache.resolve_uncached(&meta, arch, Resolve::MetaDependency("linux-image-"))?;
    let release = image.trim_start_matches("linux-image-").to_string();
    let show = cache.show(&image, arch).map_err(|source| debs::DebError::Fetch {
        package: image.clone(),
        arch: arch.deb_arch(),
        version: version.clone(),
        source_name: cache.source().name.into(),
        source: Box::new(source),
    })?;
    let mut refs = vec![DebRef { package: image, version: version.clone(), arch: arch.deb_arch().into() }];
    refs.extend(split_parts(&debs::parse_depends(&show), &release, &version, arch));
    Ok(refs)
}

/// The split parts among `depends` (the image package's dependencies): the packages
/// named `<part><release>`, at the version the dependency pins (the image's otherwise).
pub fn split_parts(
    depends: &[debs::Dependency],
    release: &str,
    image_version: &str,
    arch: Arch,
) -> Vec<DebRef> {
    depends
        .iter()
        .filter(|(name, _)| SPLIT_PARTS.iter().any(|p| name.strip_prefix(p) == Some(release)))
        .map(|(name, version)| DebRef {
            package: name.clone(),
            version: version.clone().unwrap_or_else(|| image_version.to_string()),
            arch: arch.deb_arch().into(),
        })
        .collect()
}

/// Where a kernel's files are in its unpacked packages, for each layout Debian has used:
/// `boot/vmlinuz-<release>`, `boot/config-<release>` and `lib/modules/<release>`
/// (bookworm); the same with the modules under `usr/lib/modules` (trixie, merged /usr);
/// and `usr/lib/modules/<release>/{vmlinuz,config}` (the split 7.x packages).
pub fn locate_kernel(dir: &Path, release: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let first = |what: &str, candidates: &[String]| -> Result<PathBuf> {
        candidates.iter().map(|c| dir.join(c)).find(|p| p.exists()).ok_or_else(|| KernelError::Missing {
            what: format!("{what} (looked for {})", candidates.join(", ")),
            dir: dir.to_path_buf(),
        })
    };
    let modules_dir =
        first("modules", &[format!("lib/modules/{release}"), format!("usr/lib/modules/{release}")])?;
    let in_modules = |name: &str| {
        modules_dir.strip_prefix(dir).map(|rel| rel.join(name).display().to_string()).unwrap_or_default()
    };
    let image = first("kernel image", &[format!("boot/vmlinuz-{release}"), in_modules("vmlinuz")])?;
    let config = first("kernel config", &[format!("boot/config-{release}"), in_modules("config")])?;
    Ok((image, config, modules_dir))
}

/// The kernel series of a Debian kernel version (`6.12.118-1` → `6.12`).
pub fn kernel_series(version: &str) -> Option<String> {
    let mut parts = version.split(['.', '-', '+', '~']);
    let (major, minor) = (parts.next()?, parts.next()?);
    (major.chars().all(|c| c.is_ascii_digit()) && minor.chars().all(|c| c.is_ascii_digit()))
        .then(|| format!("{major}.{minor}"))
}

/// The upstream version at the start of a kernel release or package version
/// (`7.2.11+deb13-s390x` → `[7, 2, 11]`, `6.1.0-56-amd64` → `[6, 1, 0]`).
pub fn upstream_version(text: &str) -> Vec<u32> {
    let head = text.split(['+', '-', '~']).next().unwrap_or("");
    head.split('.').map_while(|p| p.parse().ok()).collect()
}

/// Whether `image` is a kernel image package of the plain flavour of `arch`:
/// `linux-image-<upstream>+<abi>-<debarch>` (trixie and later) or
/// `linux-image-<upstream>-<abi number>-<debarch>` (bookworm); not `-dbg`, `-unsigned`,
/// `-cloud-…` or `-rt-…`.
pub fn is_plain_image(image: &str, arch: Arch) -> bool {
    let Some(release) = image.strip_prefix("linux-image-") else { return false };
    let Some(head) = release.strip_suffix(&format!("-{}", arch.deb_arch())) else { return false };
    let upstream_len = head.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(head.len());
    if upstream_version(head).len() < 2 {
        return false;
    }
    let abi = &head[upstream_len..];
    match abi.strip_prefix('+') {
        Some(rest) => !rest.is_empty() && !rest.contains('-'),
        None => abi.strip_prefix('-').is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())),
    }
}

/// The kernels to try when the archive does not serve `failed` (image package and
/// version), best first: the other plain images of `arch` (see [`is_plain_image`]) of the
/// same series (`6.12`), then of the same major version (`7.x`: the same generation),
/// each newest first. `known` holds every (package, version) the lists know.
pub fn fallback_images(
    known: &[(String, String)],
    failed: &(String, String),
    arch: Arch,
) -> Vec<(String, String)> {
    let want = upstream_version(failed.0.trim_start_matches("linux-image-"));
    let Some(want_series) = want.get(..2) else {
        return Vec::new();
    };
    let mut out: Vec<Candidate<'_>> = known
        .iter()
        .enumerate()
        .filter(|(_, k)| *k != failed && is_plain_image(&k.0, arch))
        .filter_map(|(i, k)| {
            let upstream = upstream_version(k.0.trim_start_matches("linux-image-"));
            (upstream.first() == want.first()).then(|| Candidate {
                same_series: upstream.get(..2) == Some(want_series),
                upstream,
                listed_at: i,
                image: k,
            })
        })
        .collect();
    // Same series first, then newest upstream first; apt's order (newest Debian version
    // first) among versions of one upstream.
    out.sort_by(|a, b| {
        b.same_series
            .cmp(&a.same_series)
            .then_with(|| b.upstream.cmp(&a.upstream))
            .then_with(|| a.listed_at.cmp(&b.listed_at))
    });
    out.into_iter().map(|c| c.image.clone()).collect()
}

/// A kernel image [`fallback_images`] may try instead of the one the archive did not serve.
struct Candidate<'a> {
    /// Of the failed kernel's series (`6.12`).
    same_series: bool,
    /// Its upstream version, numbers (`[6, 12, 113]`).
    upstream: Vec<u32>,
    /// Its place in the lists (apt's order).
    listed_at: usize,
    /// Package and version.
    image: &'a (String, String),
}

/// The packages of `image` at `version` (the image first, then its split parts).
fn image_packages(cache: &DebCache, arch: Arch, image: &str, version: &str) -> debs::Result<Vec<DebRef>> {
    let release = image.trim_start_matches("linux-image-");
    let show = cache.show_version(image, version, arch).map_err(|source| debs::DebError::Fetch {
        package: image.to_string(),
        arch: arch.deb_arch(),
        version: version.to_string(),
        source_name: cache.source().name.into(),
        source: Box::new(source),
    })?;
    let mut refs = vec![DebRef {
        package: image.to_string(),
        version: version.to_string(),
        arch: arch.deb_arch().into(),
    }];
    refs.extend(split_parts(&debs::parse_depends(&show), release, version, arch));
    Ok(refs)
}

/// The folder name under which the kernel that stands in for an unserved one is
/// remembered.
fn fallback_key(meta: &str) -> String {
    format!("{meta}.fallback")
}

/// When the archive does not serve the candidate kernel of `arch` (404: listed before its
/// files reached the mirror, or withdrawn), the best kernel it does serve of the same
/// series, else of the same major version ([`fallback_images`]); the candidate's error
/// when there is none. The choice is remembered with the lists, so later runs ask
/// nothing.
fn fallback_kernel(cache: &DebCache, arch: Arch, failed: debs::DebError) -> Result<debs::Unpacked> {
    let meta = format!("linux-image-{}", arch.deb_arch());
    let key = fallback_key(&meta);
    if cache.resolved(&key, arch).is_some_and(|refs| !cache.is_unserved(arch, &refs)) {
        let unknown = || debs::DebError::Io {
            what: "no remembered kernel for",
            path: PathBuf::from(&key),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        // The remembered choice is used as it is (the closure only runs without one).
        if let Ok(found) = cache.ensure_set(&key, arch, |_| Err(unknown())) {
            return Ok(found);
        }
    }
    let failed_image = match cache.resolved(&meta, arch).and_then(|r| r.into_iter().next()) {
        Some(r) => (r.package, r.version),
        None => return Err(failed.into()),
    };
    let known = image_versions(cache, arch, &failed_image.0).unwrap_or_default();
    for (image, version) in fallback_images(&known, &failed_image, arch) {
        let probe =
            [DebRef { package: image.clone(), version: version.clone(), arch: arch.deb_arch().into() }];
        if cache.is_unserved(arch, &probe) {
            continue;
        }
        cache.forget(&key, arch);
        match cache.ensure_set(&key, arch, |c| image_packages(c, arch, &image, &version)) {
            Ok(found) => {
                eprintln!(
                    "kernels: {arch}: the archive does not serve kernel {} {} (404); using {} {} instead",
                    failed_image.0, failed_image.1, found.package, found.version
                );
                return Ok(found);
            }
            Err(e) if e.is_not_found() => mark_unserved(cache, arch, &e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(failed.into())
}

/// Every (image package, version) of `arch` of the same major version as `image` that the
/// lists know.
fn image_versions(cache: &DebCache, arch: Arch, image: &str) -> debs::Result<Vec<(String, String)>> {
    let major = upstream_version(image.trim_start_matches("linux-image-")).first().copied().unwrap_or(0);
    let fetch = |e: crate::command::CommandError| debs::DebError::Fetch {
        package: format!("linux-image-{major}.*"),
        arch: arch.deb_arch(),
        version: String::new(),
        source_name: cache.source().name.into(),
        source: Box::new(e),
    };
    let names: Vec<String> = cache
        .pkgnames(&format!("linux-image-{major}."))
        .map_err(fetch)?
        .into_iter()
        .filter(|n| is_plain_image(n, arch))
        .collect();
    cache.show_versions(&names, arch).map_err(fetch)
}

/// Remembers the package a 404 named as not served (see [`debs::DebCache::mark_unserved`]).
fn mark_unserved(cache: &DebCache, arch: Arch, e: &debs::DebError) {
    if let debs::DebError::Fetch { package, version, .. } = e {
        // Only saves asking again; a failure to write it changes nothing else.
        let _ = cache.mark_unserved(arch, package, version);
    }
}

/// The kernel for `arch`, resolved from Debian's `linux-image-<debarch>` metapackage, all
/// its packages unpacked into one folder. When the archive does not serve it (404), the
/// best served kernel of the same series or, failing that, the same major version is
/// used ([`fallback_kernel`]).
pub fn ensure_kernel(cache: &DebCache, arch: Arch) -> Result<GuestKernel> {
    let meta = format!("linux-image-{}", arch.deb_arch());
    let known_unserved = cache.resolved(&meta, arch).is_some_and(|refs| cache.is_unserved(arch, &refs));
    let unpacked = if known_unserved {
        fallback_kernel(cache, arch, unserved_error(cache, arch, &meta))?
    } else {
        match cache.ensure_set(&meta, arch, |c| kernel_packages(c, arch)) {
            Ok(found) => found,
            Err(e) if e.is_not_found() => {
                mark_unserved(cache, arch, &e);
                fallback_kernel(cache, arch, e)?
            }
            Err(e) => return Err(e.into()),
        }
    };
    let release = unpacked.package.trim_start_matches("linux-image-").to_string();
    let (image, config, modules_dir) = locate_kernel(&unpacked.dir, &release)?;
    Ok(GuestKernel {
        arch,
        release,
        package: unpacked.package,
        version: unpacked.version,
        image,
        modules_dir,
        config,
    })
}

/// The error of a kernel known not to be served (an earlier run's 404).
fn unserved_error(cache: &DebCache, arch: Arch, meta: &str) -> debs::DebError {
    let main = cache.resolved(meta, arch).and_then(|r| r.into_iter().next());
    let (package, version) = main.map(|r| (r.package, r.version)).unwrap_or_default();
    debs::DebError::Fetch {
        package,
        arch: arch.deb_arch(),
        version,
        source_name: cache.source().name.into(),
        source: Box::new(crate::command::CommandError::Failed {
            line: "apt-get download".into(),
            status: "404".into(),
            stderr: "the archive answered 404 Not Found earlier with the same lists".into(),
        }),
    }
}

/// The statically linked busybox of the guest architecture (`busybox-static:<debarch>`):
/// `bin/busybox` (bookworm) or `usr/bin/busybox` (merged /usr).
pub fn ensure_busybox(cache: &DebCache, arch: Arch) -> Result<PathBuf> {
    let unpacked = cache.ensure("busybox-static", arch, Resolve::Direct)?;
    ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|rel| unpacked.dir.join(rel))
        .find(|p| p.is_file())
        .ok_or(KernelError::Missing { what: "bin/busybox or usr/bin/busybox".into(), dir: unpacked.dir })
}

/// A kernel build configuration (`CONFIG_X=y|m|value`).
#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    values: BTreeMap<String, String>,
}

impl KernelConfig {
    /// Parses a `config-*` file's text.
    pub fn parse(text: &str) -> Self {
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim_start_matches("CONFIG_").to_string(), v.trim_matches('"').to_string()))
            .collect();
        KernelConfig { values }
    }

    /// The value of `CONFIG_<key>` (`key` without the prefix), if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key.trim_start_matches("CONFIG_")).map(String::as_str)
    }

    /// Whether `CONFIG_<key>` is built in (`=y`).
    pub fn builtin(&self, key: &str) -> bool {
        self.get(key) == Some("y")
    }
}

impl GuestKernel {
    /// The kernel's build configuration.
    pub fn kernel_config(&self) -> Result<KernelConfig> {
        let bytes = read(&self.config)?;
        Ok(KernelConfig::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// An index of the kernel's modules.
    pub fn module_index(&self) -> Result<ModuleIndex> {
        ModuleIndex::load(&self.release, &self.modules_dir)
    }
}

/// Module names use `_` and `-` interchangeably; this is the one spelling used as key.
pub fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// The modules of one kernel: where each lives, and which are built in.
#[derive(Clone, Debug)]
pub struct ModuleIndex {
    release: String,
    root: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// Upper bound on files looked at under `kernel/`, so a strange tree cannot make the walk
/// run away.
const MAX_MODULE_FILES: usize = 50_000;

impl ModuleIndex {
    /// Indexes `modules_dir` (`lib/modules/<release>`): every `*.ko` under `kernel/` and
    /// the names listed in `modules.builtin`.
    pub fn load(release: &str, modules_dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        let mut seen = 0usize;
        while let Some(dir) = stack.pop() {
            let entries =
                std::fs::read_dir(&dir).map_err(|source| KernelError::Io { path: dir.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| KernelError::Io { path: dir.clone(), source })?;
                seen += 1;
                if seen > MAX_MODULE_FILES {
                    return Err(KernelError::Missing {
                        what: format!("a module tree below {MAX_MODULE_FILES} files"),
                        dir: modules_dir.to_path_buf(),
                    });
                }
                let path = entry.path();
                let file_type =
                    entry.file_type().map_err(|source| KernelError::Io { path: path.clone(), source })?;
                if file_type.is_dir() {
                    stack.push(path);
                } else if let Some(name) =
                    path.file_name().and_then(|n| n.to_str()).and_then(module_file_stem)
                {
                    files.insert(module_key(name), path.clone());
                }
            }
        }
        let builtin_path = modules_dir.join("modules.builtin");
        let builtin = String::from_utf8_lossy(&read(&builtin_path)?)
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter_map(|f| f.strip_suffix(".ko"))
            .map(module_key)
            .collect();
        Ok(ModuleIndex { release: release.to_string(), root: modules_dir.to_path_buf(), files, builtin })
    }

    /// Whether `name` is built into the kernel image.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_key(name))
    }

    /// The module file of `name`, if the kernel ships it as a module.
    pub fn file(&self, name: &str) -> Option<&Path> {
        self.files.get(&module_key(name)).map(PathBuf::as_path)
    }

    /// `lib/modules/<release>` of this kernel.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The module files needed to load `names`, dependencies first, each once. Built-in
    /// names are skipped; a name that is neither built in nor a module is an error.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in names {
            self.visit(&module_key(name), &mut done, &mut order)?;
        }
        Ok(order)
    }

    /// Depth-first, dependencies before dependents. `done` is filled before recursing, so
    /// a dependency cycle ends instead of recursing forever; the walk visits each module at
    /// most once, so it is bounded by the number of modules.
    fn visit(&self, key: &str, done: &mut BTreeSet<String>, order: &mut Vec<PathBuf>) -> Result<()> {
        if !done.insert(key.to_string()) || self.builtin.contains(key) {
            return Ok(());
        }
        let path = self.files.get(key).ok_or_else(|| KernelError::UnknownModule {
            release: self.release.clone(),
            name: key.to_string(),
        })?;
        let info = modinfo(&read_module(path)?)
            .map_err(|reason| KernelError::BadModule { path: path.clone(), reason })?;
        let depends = info.get("depends").map(String::as_str).unwrap_or("");
        for dep in depends.split(',').filter(|d| !d.is_empty()) {
            self.visit(&module_key(dep), done, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
}

fn field(bytes: &[u8], at: usize, len: usize, big_endian: bool) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(len)?)?;
    let mut value = 0u64;
    for i in 0..len {
        let b = if big_endian { raw.get(i) } else { raw.get(len - 1 - i) };
        value = (value << 8) | u64::from(*b?);
    }
    Some(value)
}

/// The `key=value` pairs of a 64-bit ELF object's `.modinfo` section (either endianness).
pub fn modinfo(elf: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file (compressed modules are not supported)".into());
    }
    if elf.get(4) != Some(&2) {
        return Err("not a 64-bit ELF file".into());
    }
    let be = match elf.get(5) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("unknown ELF byte order".into()),
    };
    let bad = || "truncated ELF header".to_string();
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| bad());
    let shoff = to_usize(field(elf, 0x28, 8, be).ok_or_else(bad)?)?;
    let shentsize = to_usize(field(elf, 0x3a, 2, be).ok_or_else(bad)?)?;
    let shnum = to_usize(field(elf, 0x3c, 2, be).ok_or_else(bad)?)?;
    let shstrndx = to_usize(field(elf, 0x3e, 2, be).ok_or_else(bad)?)?;
    let section = |i: usize| -> std::result::Result<(usize, usize, usize), String> {
        let base = i.checked_mul(shentsize).and_then(|o| o.checked_add(shoff)).ok_or_else(bad)?;
        let name = to_usize(field(elf, base, 4, be).ok_or_else(bad)?)?;
        let offset = to_usize(field(elf, base.saturating_add(24), 8, be).ok_or_else(bad)?)?;
        let size = to_usize(field(elf, base.saturating_add(32), 8, be).ok_or_else(bad)?)?;
        Ok((name, offset, size))
    };
    let slice = |offset: usize, size: usize| elf.get(offset..offset.checked_add(size)?);
    let (_, str_off, str_size) = section(shstrndx)?;
    let names = slice(str_off, str_size).ok_or("section names out of bounds")?;
    for i in 0..shnum {
        let (name, offset, size) = section(i)?;
        let name_bytes = names.get(name..).unwrap_or_default();
        let name_end = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
        if name_bytes.get(..name_end) != Some(b".modinfo".as_slice()) {
            continue;
        }
        let data = slice(offset, size).ok_or(".modinfo out of bounds")?;
        return Ok(data
            .split(|&b| b == 0)
            .filter_map(|entry| std::str::from_utf8(entry).ok())
            .filter_map(|entry| entry.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect());
    }
    Err("no .modinfo section".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three layouts, as Debian's bookworm, trixie and 7.x packages have them.
    #[test]
    fn kernel_files_are_found_in_every_layout() {
        let layouts: [(&str, [&str; 3]); 3] = [
            (
                "6.1.0-56-amd64",
                ["boot/vmlinuz-6.1.0-56-amd64", "boot/config-6.1.0-56-amd64", "lib/modules/6.1.0-56-amd64"],
            ),
            (
                "6.12.117+deb13-amd64",
                [
                    "boot/vmlinuz-6.12.117+deb13-amd64",
                    "boot/config-6.12.117+deb13-amd64",
                    "usr/lib/modules/6.12.117+deb13-amd64",
                ],
            ),
            (
                "7.3.4+deb13-amd64",
                [
                    "usr/lib/modules/7.3.4+deb13-amd64/vmlinuz",
                    "usr/lib/modules/7.3.4+deb13-amd64/config",
                    "usr/lib/modules/7.3.4+deb13-amd64",
                ],
            ),
        ];
        for (release, [image, config, modules]) in layouts {
            let tmp = tempfile::tempdir().unwrap();
            let d = tmp.path();
            std::fs::create_dir_all(d.join(modules).join("kernel")).unwrap();
            for f in [image, config] {
                std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
                std::fs::write(d.join(f), b"x").unwrap();
            }
            let (i, c, m) = locate_kernel(d, release).unwrap();
            assert_eq!((i, c, m), (d.join(image), d.join(config), d.join(modules)), "{release}");
        }
        // The 7.x image package alone (no linux-binary unpacked): the error says what is missing.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("usr/lib/modules/7.3.4+deb13-amd64")).unwrap();
        let e = locate_kernel(tmp.path(), "7.3.4+deb13-amd64").unwrap_err().to_string();
        assert!(e.contains("kernel image") && e.contains("usr/lib/modules/7.3.4+deb13-amd64/vmlinuz"), "{e}");
        let e = locate_kernel(tmp.path(), "6.1.0-1-amd64").unwrap_err().to_string();
        assert!(e.contains("modules"), "{e}");
    }

    #[test]
    fn fallback_prefers_the_series_then_the_generation() {
        assert_eq!(upstream_version("7.2.11+deb13-s390x"), [7, 2, 11]);
        assert_eq!(upstream_version("6.1.0-56-amd64"), [6, 1, 0]);
        assert!(upstream_version("s390x").is_empty());
        for (name, plain) in [
            ("linux-image-6.12.113+deb13-s390x", true),
            ("linux-image-6.12.115+deb13.1-s390x", true),
            ("linux-image-6.1.0-56-s390x", true),
            ("linux-image-7.2.11+deb13-s390x-dbg", false),
            ("linux-image-6.12.113+deb13-cloud-s390x", false),
            ("linux-image-6.12.113+deb13-amd64", false),
            ("linux-image-s390x", false),
        ] {
            assert_eq!(is_plain_image(name, Arch::S390x), plain, "{name}");
        }
        let k = |p: &str, v: &str| (p.to_string(), v.to_string());
        // What trixie-security and trixie-backports list for s390x.
        let known = [
            k("linux-image-6.12.118+deb13-s390x", "6.12.118-1"),
            k("linux-image-6.12.113+deb13-s390x", "6.12.113-1"),
            k("linux-image-6.12.117+deb13-s390x", "6.12.117-1"),
            k("linux-image-6.12.115+deb13.1-s390x", "6.12.115-2"),
            k("linux-image-7.2.9+deb13-s390x", "7.2.9-1~bpo13+1"),
            k("linux-image-7.3.4+deb13-s390x", "7.3.4-1~bpo13+1"),
            k("linux-image-7.2.11+deb13-s390x", "7.2.11-1~bpo13+1"),
            k("linux-image-7.2.11+deb13-s390x-dbg", "7.2.11-1~bpo13+1"),
        ];
        // trixie's 6.12.118 missing: the other 6.12s, newest first, never 7.x.
        let got = fallback_images(&known, &known[0], Arch::S390x);
        let names: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "linux-image-6.12.117+deb13-s390x",
                "linux-image-6.12.115+deb13.1-s390x",
                "linux-image-6.12.113+deb13-s390x"
            ]
        );
        // current's 7.3.4 missing and no other 7.3: the newest 7.x, never 6.x.
        let got = fallback_images(&known, &known[5], Arch::S390x);
        assert_eq!(got, [known[6].clone(), known[4].clone()]);
    }

    #[test]
    fn split_parts_are_taken_from_the_image_dependencies() {
        let show = "Package: linux-image-7.3.4+deb13-s390x\nVersion: 7.3.4-1~bpo13+1\n\
                    Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                    linux-base-7.3.4+deb13-s390x (= 7.3.4-1~bpo13+1), \
                    linux-binary-7.3.4+deb13-s390x (= 7.3.4-1~bpo13+1), \
                    linux-modules-7.3.4+deb13-s390x (= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-cloud-s390x\n";
        let parts =
            split_parts(&debs::parse_depends(show), "7.3.4+deb13-s390x", "7.3.4-1~bpo13+1", Arch::S390x);
        let names: Vec<&str> = parts.iter().map(|p| p.package.as_str()).collect();
        assert_eq!(
            names,
            [
                "linux-base-7.3.4+deb13-s390x",
                "linux-binary-7.3.4+deb13-s390x",
                "linux-modules-7.3.4+deb13-s390x"
            ]
        );
        assert!(parts.iter().all(|p| p.version == "7.3.4-1~bpo13+1" && p.arch == "s390x"));
        // A kernel in one package (6.1, 6.12) has no parts.
        let whole = "Package: linux-image-6.12.117+deb13-amd64\nDepends: kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool\n";
        assert!(split_parts(&debs::parse_depends(whole), "6.12.117+deb13-amd64", "6.12.117-1", Arch::X86_64)
            .is_empty());
    }

    /// A minimal 64-bit ELF with a section-name table and a `.modinfo` section.
    fn elf(big_endian: bool, modinfo: &[u8]) -> Vec<u8> {
        let put = |buf: &mut Vec<u8>, at: usize, len: usize, v: u64| {
            for i in 0..len {
                let shift = if big_endian { 8 * (len - 1 - i) } else { 8 * i };
                buf[at + i] = (v >> shift) as u8;
            }
        };
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut buf = vec![0u8; 64];
        buf[..4].copy_from_slice(b"\x7fELF");
        buf[4] = 2;
        buf[5] = if big_endian { 2 } else { 1 };
        let names_off = buf.len();
        buf.extend_from_slice(names);
        let info_off = buf.len();
        buf.extend_from_slice(modinfo);
        let shoff = buf.len();
        buf.resize(shoff + 3 * 64, 0);
        put(&mut buf, 0x28, 8, shoff as u64);
        put(&mut buf, 0x3a, 2, 64);
        put(&mut buf, 0x3c, 2, 3);
        put(&mut buf, 0x3e, 2, 1);
        let sh1 = shoff + 64;
        put(&mut buf, sh1, 4, 1);
        put(&mut buf, sh1 + 24, 8, names_off as u64);
        put(&mut buf, sh1 + 32, 8, names.len() as u64);
        let sh2 = shoff + 128;
        put(&mut buf, sh2, 4, 11);
        put(&mut buf, sh2 + 24, 8, info_off as u64);
        put(&mut buf, sh2 + 32, 8, modinfo.len() as u64);
        buf
    }

    #[test]
    fn modinfo_of_both_byte_orders() {
        for be in [false, true] {
            let info =
                modinfo(&elf(be, b"license=GPL\0depends=vfio,vfio-pci-core\0name=vfio_pci\0")).unwrap();
            assert_eq!(info["depends"], "vfio,vfio-pci-core");
            assert_eq!(info["name"], "vfio_pci");
        }
    }

    #[test]
    fn modinfo_rejects_garbage_without_panicking() {
        assert!(modinfo(b"").is_err());
        assert!(modinfo(b"\x7fELF\x02\x01").is_err());
        let good = elf(false, b"depends=\0");
        for len in 0..good.len() {
            let _ = modinfo(&good[..len]);
        }
        let mut huge = good.clone();
        huge[0x3c] = 0xff;
        huge[0x3d] = 0xff;
        let _ = modinfo(&huge);
    }

    #[test]
    fn config_values() {
        let cfg = KernelConfig::parse(
            "# comment\nCONFIG_VFIO=m\nCONFIG_PCI=y\n# CONFIG_X is not set\nCONFIG_S=\"a b\"\n",
        );
        assert_eq!(cfg.get("VFIO"), Some("m"));
        assert!(cfg.builtin("CONFIG_PCI"));
        assert!(!cfg.builtin("VFIO"));
        assert_eq!(cfg.get("S"), Some("a b"));
        assert_eq!(cfg.get("X"), None);
    }

    #[test]
    fn load_order_puts_dependencies_first_and_stops_on_cycles() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("kernel/drivers")).unwrap();
        std::fs::write(root.join("modules.builtin"), "kernel/drivers/pci/hotplug/pciehp.ko\n").unwrap();
        let module = |name: &str, deps: &str| {
            let info = format!("depends={deps}\0name={name}\0");
            std::fs::write(root.join(format!("kernel/drivers/{name}.ko")), elf(false, info.as_bytes()))
                .unwrap();
        };
        module("vfio-pci", "vfio-pci-core,vfio");
        module("vfio-pci-core", "vfio,irqbypass");
        module("vfio", "");
        module("irqbypass", "");
        module("loop_a", "loop_b");
        module("loop_b", "loop_a");
        let index = ModuleIndex::load("test", root).unwrap();
        let order = index.load_order(&["vfio_pci", "pciehp"]).unwrap();
        let names: Vec<String> =
            order.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["vfio", "irqbypass", "vfio-pci-core", "vfio-pci"]);
        assert_eq!(index.load_order(&["loop_a"]).unwrap().len(), 2);
        assert!(matches!(index.load_order(&["nope"]), Err(KernelError::UnknownModule { .. })));
        assert!(index.is_builtin("pciehp"));
    }

    /// Ubuntu ships `.ko.zst`: indexed under the module name, its dependencies read from
    /// the decompressed ELF, and placed in the guest without the suffix.
    #[test]
    fn zstd_modules_are_indexed_and_unpacked() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("kernel/drivers/vfio")).unwrap();
        std::fs::write(root.join("modules.builtin"), "").unwrap();
        let pack = |name: &str, deps: &str| {
            let plain = elf(false, format!("depends={deps}\0name={name}\0").as_bytes());
            let packed = ruzstd::encoding::compress_to_vec(
                plain.as_slice(),
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            let path = root.join(format!("kernel/drivers/vfio/{name}.ko.zst"));
            std::fs::write(&path, packed).unwrap();
            (path, plain)
        };
        let (vfio_path, vfio_plain) = pack("vfio", "iommufd");
        pack("iommufd", "");
        let index = ModuleIndex::load("test", root).unwrap();
        let order = index.load_order(&["vfio"]).unwrap();
        let names: Vec<&str> = order
            .iter()
            .map(|p| module_file_stem(p.file_name().unwrap().to_str().unwrap()).unwrap())
            .collect();
        assert_eq!(names, ["iommufd", "vfio"]);
        assert_eq!(read_module(&vfio_path).unwrap(), vfio_plain);
        assert_eq!(
            guest_module_path(Path::new("kernel/drivers/vfio/vfio.ko.zst")),
            PathBuf::from("kernel/drivers/vfio/vfio.ko")
        );
        assert_eq!(guest_module_path(Path::new("kernel/x.ko")), PathBuf::from("kernel/x.ko"));
        assert_eq!(module_file_stem("a.ko.xz"), Some("a"));
        assert_eq!(module_file_stem("a.ko.gz"), None);
        // A corrupt compressed module is a typed error, not a panic.
        std::fs::write(&vfio_path, b"\x28\xb5\x2f\xfd garbage").unwrap();
        assert!(matches!(read_module(&vfio_path), Err(KernelError::BadModule { .. })));
    }
}

//! Debian packages of any architecture, downloaded and unpacked into a cache directory
//! without installing them into the host (guest kernels and guest busybox).
//!
//! Apt is told about the foreign architectures per call (`-o APT::Architectures::=…`), so
//! dpkg's own architecture list stays untouched. Each unpacked package lives in a folder
//! named by package, version and architecture; a folder that exists is complete (it is
//! renamed into place only after unpacking), so a second run resolves the version with
//! `apt-cache` and returns at once. When apt cannot resolve or download (offline, no
//! foreign package lists and not root), the last unpacked version is used.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::arch::Arch;
use crate::command::{self, CommandError, FixCommand};
use crate::provision::is_root;

/// A package could not be resolved, downloaded or unpacked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DebError {
    /// Apt does not know the package for that architecture and nothing is cached.
    #[error("cannot resolve {package}:{arch} and nothing is cached ({reason}); to fix, run as root:\n{fix}")]
    Unresolved {
        /// The package asked for.
        package: String,
        /// Its Debian architecture.
        arch: &'static str,
        /// What apt said.
        reason: String,
        /// The command that makes apt know the architecture's packages.
        fix: FixCommand,
    },
    /// `apt-get download` or `dpkg-deb` failed and nothing is cached.
    #[error("cannot fetch {package}:{arch}: {source}")]
    Fetch {
        /// The package.
        package: String,
        /// Its Debian architecture.
        arch: &'static str,
        /// The failing command.
        source: CommandError,
    },
    /// A file system operation in the cache failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, DebError>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DebError + 'a {
    move |source| DebError::Io { what, path: path.to_path_buf(), source }
}

/// How a requested name maps to the package that is downloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolve {
    /// The name is the package itself (`busybox-static`).
    Direct,
    /// The name is a metapackage; download its dependency whose name starts with the
    /// given prefix (`linux-image-arm64` → `linux-image-6.1.0-56-arm64`).
    MetaDependency(&'static str),
}

/// A package unpacked in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unpacked {
    /// The package that was unpacked (after resolving a metapackage).
    pub package: String,
    /// Its Debian version.
    pub version: String,
    /// The guest architecture.
    pub arch: Arch,
    /// The folder holding the package's files (`dpkg-deb -x` layout).
    pub dir: PathBuf,
}

/// The cache of unpacked packages, under one root folder.
#[derive(Clone, Debug)]
pub struct DebCache {
    root: PathBuf,
    source: Option<AptSource>,
}

/// A package repository the host's apt set-up does not name (Debian backports, Ubuntu),
/// used through its own sources list, package lists and apt cache under
/// `<cache>/apt/<name>/`, so the host's apt configuration stays untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AptSource {
    /// Folder name under `<cache>/apt/`, also separating this source's resolutions.
    pub name: &'static str,
    /// The `sources.list` lines (one-line format, each with `[arch=… signed-by=…]`).
    pub lines: String,
}

impl AptSource {
    fn dir(&self, root: &Path) -> PathBuf {
        root.join("apt").join(self.name)
    }

    /// The apt options that point apt at this source only.
    fn options(&self, root: &Path) -> Vec<String> {
        let d = self.dir(root);
        [
            ("Dir::Etc::SourceList", d.join("sources.list")),
            ("Dir::Etc::SourceParts", d.join("sources.list.d")),
            ("Dir::State::Lists", d.join("lists")),
            ("Dir::Cache", d.join("cache")),
            // An empty dpkg status: the host's installed versions must not count as
            // candidates of this source.
            ("Dir::State::status", d.join("status")),
        ]
        .iter()
        .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={}", v.display())])
        .collect()
    }

    /// Writes the sources list and creates the folders apt expects.
    fn prepare(&self, root: &Path) -> Result<()> {
        let d = self.dir(root);
        for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            let path = d.join(sub);
            std::fs::create_dir_all(&path).map_err(io_err("creating", &path))?;
        }
        let status = d.join("status");
        std::fs::write(&status, "").map_err(io_err("writing", &status))?;
        let list = d.join("sources.list");
        std::fs::write(&list, &self.lines).map_err(io_err("writing", &list))
    }
}

/// The apt options that make every guest architecture known for one call.
pub fn apt_arch_options() -> Vec<String> {
    let mut archs: Vec<&str> = Vec::new();
    if let Some(host) = Arch::host() {
        archs.push(host.deb_arch());
    }
    for arch in Arch::ALL {
        if !archs.contains(&arch.deb_arch()) {
            archs.push(arch.deb_arch());
        }
    }
    archs.iter().flat_map(|a| ["-o".to_string(), format!("APT::Architectures::={a}")]).collect()
}

/// The first dependency in `apt-cache depends` output whose name starts with `prefix`,
/// without an architecture qualifier.
pub fn parse_meta_dependency(depends_output: &str, prefix: &str) -> Option<String> {
    depends_output.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let name = line.strip_prefix("Depends:")?.trim();
        let name = name.split(':').next()?.trim();
        (name.starts_with(prefix) && !name.starts_with('<')).then(|| name.to_string())
    })
}

/// The `Version:` field of `apt-cache show` output.
pub fn parse_version(show_output: &str) -> Option<String> {
    show_output.lines().find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
}

impl DebCache {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DebCache { root: root.into(), source: None }
    }

    /// The same cache, resolving and downloading from `source` instead of the host's
    /// repositories (unpacked folders are shared; resolutions are kept per source).
    pub fn with_source(&self, source: AptSource) -> Self {
        DebCache { root: self.root.clone(), source: Some(source) }
    }

    /// Apt options for every call: all guest architectures, and the source if any.
    fn apt_options(&self) -> Vec<String> {
        let mut opts = apt_arch_options();
        if let Some(src) = &self.source {
            opts.extend(src.options(&self.root));
        }
        opts
    }

    fn apt_update_fix(&self) -> FixCommand {
        FixCommand(format!("apt-get {} update", self.apt_options().join(" ")))
    }

    fn lists_dir(&self) -> PathBuf {
        match &self.source {
            Some(src) => src.dir(&self.root).join("lists"),
            None => PathBuf::from(APT_LISTS),
        }
    }

    /// The cache's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn debs_dir(&self) -> PathBuf {
        self.root.join("debs")
    }

    /// Where resolutions and "current version" pointers live: per source, since a name
    /// (`linux-image-amd64`) means another package in another repository.
    fn state_dir(&self) -> PathBuf {
        match &self.source {
            Some(src) => self.debs_dir().join(format!("@{}", src.name)),
            None => self.debs_dir(),
        }
    }

    fn folder(&self, package: &str, version: &str, arch: Arch) -> PathBuf {
        self.debs_dir().join(format!("{package}_{}_{}", version.replace(':', "%3a"), arch.deb_arch()))
    }

    fn current_file(&self, name: &str, arch: Arch) -> PathBuf {
        self.state_dir().join(format!("{name}_{}.current", arch.deb_arch()))
    }

    /// The package `name` for `arch`, unpacked; downloads and unpacks it when the
    /// resolved version is not cached yet.
    pub fn ensure(&self, name: &str, arch: Arch, resolve: Resolve) -> Result<Unpacked> {
        match self.resolve(name, arch, resolve) {
            Ok((package, version)) => {
                let dir = self.folder(&package, &version, arch);
                if dir.is_dir() {
                    self.remember(name, arch, &package, &version)?;
                    return Ok(Unpacked { package, version, arch, dir });
                }
                match self.fetch(&package, &version, arch, &dir) {
                    Ok(()) => {
                        self.remember(name, arch, &package, &version)?;
                        Ok(Unpacked { package, version, arch, dir })
                    }
                    Err(e) => self.cached(name, arch).ok_or(e),
                }
            }
            Err(e) => self.cached(name, arch).ok_or(e),
        }
    }

    /// The last version of `name` that was unpacked for `arch`, if it is still there.
    pub fn cached(&self, name: &str, arch: Arch) -> Option<Unpacked> {
        let text = std::fs::read_to_string(self.current_file(name, arch)).ok()?;
        let (package, version) = text.trim().split_once(' ')?;
        let dir = self.folder(package, version, arch);
        dir.is_dir().then(|| {
            eprintln!("debs: using cached {package} {version} for {arch} (apt could not resolve {name})");
            Unpacked { package: package.to_string(), version: version.to_string(), arch, dir }
        })
    }

    fn remember(&self, name: &str, arch: Arch, package: &str, version: &str) -> Result<()> {
        let path = self.current_file(name, arch);
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        std::fs::write(&path, format!("{package} {version}\n")).map_err(io_err("writing", &path))
    }

    fn apt_cache(&self, args: &[&str]) -> std::result::Result<String, CommandError> {
        command::output(Command::new("apt-cache").args(self.apt_options()).args(args))
    }

    fn resolve_once(
        &self,
        name: &str,
        arch: Arch,
        resolve: Resolve,
    ) -> std::result::Result<(String, String), String> {
        let qualified = format!("{name}:{}", arch.deb_arch());
        let package = match resolve {
            Resolve::Direct => name.to_string(),
            Resolve::MetaDependency(prefix) => {
                let out = self.apt_cache(&["depends", &qualified]).map_err(|e| e.to_string())?;
                parse_meta_dependency(&out, prefix)
                    .ok_or_else(|| format!("{qualified} has no dependency named {prefix}*"))?
            }
        };
        let out = self
            .apt_cache(&["show", "--no-all-versions", &format!("{package}:{}", arch.deb_arch())])
            .map_err(|e| e.to_string())?;
        let version = parse_version(&out).ok_or_else(|| format!("no Version for {package}"))?;
        Ok((package, version))
    }

    fn memo_file(&self, name: &str, arch: Arch) -> PathBuf {
        self.state_dir().join(format!("{name}_{}.resolved", arch.deb_arch()))
    }

    /// Resolves with the local package lists; when they lack the architecture, updates
    /// them once (root only). A resolution is remembered together with the lists it was
    /// made from, so it is reused (apt-cache takes seconds with foreign architectures)
    /// until the lists change.
    fn resolve(&self, name: &str, arch: Arch, resolve: Resolve) -> Result<(String, String)> {
        let memo = self.memo_file(name, arch);
        let lists = lists_fingerprint(&self.lists_dir());
        if let Some(found) = std::fs::read_to_string(&memo).ok().and_then(|t| parse_memo(&t, &lists)) {
            return Ok(found);
        }
        let found = self.resolve_uncached(name, arch, resolve)?;
        // The memo only saves time; failing to write it changes nothing else.
        let _ = std::fs::create_dir_all(self.state_dir()).and_then(|()| {
            std::fs::write(
                &memo,
                format!("{}\n{} {}\n", lists_fingerprint(&self.lists_dir()), found.0, found.1),
            )
        });
        Ok(found)
    }

    fn resolve_uncached(&self, name: &str, arch: Arch, resolve: Resolve) -> Result<(String, String)> {
        if let Some(src) = &self.source {
            src.prepare(&self.root)?;
        }
        let first = self.resolve_once(name, arch, resolve);
        let reason = match first {
            Ok(found) => return Ok(found),
            Err(reason) => reason,
        };
        let unresolved = |reason: String| DebError::Unresolved {
            package: name.to_string(),
            arch: arch.deb_arch(),
            reason,
            fix: self.apt_update_fix(),
        };
        if !is_root() {
            return Err(unresolved(reason));
        }
        match &self.source {
            Some(src) => eprintln!("debs: updating apt lists of {}", src.name),
            None => eprintln!("debs: updating apt lists for {}", arch.deb_arch()),
        }
        command::run_visible(Command::new("apt-get").args(self.apt_options()).arg("update"))
            .map_err(|e| unresolved(format!("{reason}; {e}")))?;
        self.resolve_once(name, arch, resolve).map_err(unresolved)
    }

    fn fetch(&self, package: &str, version: &str, arch: Arch, dest: &Path) -> Result<()> {
        let debs = self.debs_dir();
        std::fs::create_dir_all(&debs).map_err(io_err("creating", &debs))?;
        let work = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(&debs)
            .map_err(io_err("creating a temporary folder in", &debs))?;
        let spec = format!("{package}:{}={version}", arch.deb_arch());
        eprintln!("debs: downloading {spec}");
        let fetch_err =
            |source| DebError::Fetch { package: package.to_string(), arch: arch.deb_arch(), source };
        let mut download = Command::new("apt-get");
        download.current_dir(work.path()).args(self.apt_options());
        if is_root() {
            // apt drops to the `_apt` user for downloads, which cannot write here.
            download.args(["-o", "APT::Sandbox::User=root"]);
        }
        command::output(download.args(["download", &spec])).map_err(fetch_err)?;
        let deb = find_deb(work.path())?;
        let tree = work.path().join("tree");
        command::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree)).map_err(fetch_err)?;
        match std::fs::rename(&tree, dest) {
            Ok(()) => Ok(()),
            // Another run unpacked the same version at the same time.
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(io_err("moving the unpacked package to", dest)(e)),
        }
    }
}

/// Where apt keeps its package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// A summary of the package lists in `lists` (count, total size, newest change) that
/// changes whenever `apt-get update` brings new lists.
pub fn lists_fingerprint(lists: &Path) -> String {
    let (mut count, mut size, mut newest) = (0u64, 0u64, 0u64);
    if let Ok(entries) = std::fs::read_dir(lists) {
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().contains("Packages") {
                continue;
            }
            if let Ok(meta) = entry.metadata() {
                count += 1;
                size += meta.len();
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                newest = newest.max(mtime);
            }
        }
    }
    format!("lists {count} {size} {newest}")
}

fn parse_memo(text: &str, lists: &str) -> Option<(String, String)> {
    let mut lines = text.lines();
    if lines.next()? != lists {
        return None;
    }
    let (package, version) = lines.next()?.split_once(' ')?;
    Some((package.to_string(), version.to_string()))
}

fn find_deb(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(io_err("reading", dir))?;
    for entry in entries {
        let path = entry.map_err(io_err("reading", dir))?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(path);
        }
    }
    Err(DebError::Io {
        what: "no .deb downloaded into",
        path: dir.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_dependency_is_found_without_arch_qualifier() {
        let out = "linux-image-arm64:arm64\n  Depends: linux-image-6.1.0-56-arm64:arm64\n";
        assert_eq!(parse_meta_dependency(out, "linux-image-").unwrap(), "linux-image-6.1.0-56-arm64");
        let native = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n  Recommends: x\n";
        assert_eq!(parse_meta_dependency(native, "linux-image-").unwrap(), "linux-image-6.1.0-56-amd64");
        assert_eq!(parse_meta_dependency("x\n  Depends: <virtual>\n", "linux-image-"), None);
        assert_eq!(parse_meta_dependency("", "linux-image-"), None);
    }

    #[test]
    fn version_field() {
        let show = "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\nArchitecture: arm64\n";
        assert_eq!(parse_version(show).unwrap(), "1:1.35.0-4+deb12u1+b1");
        assert_eq!(parse_version("Package: x\n"), None);
    }

    #[test]
    fn memo_is_only_valid_for_the_same_lists() {
        let memo = "lists 3 100 7\nlinux-image-6.1.0-56-arm64 6.1.192-2\n";
        let found = parse_memo(memo, "lists 3 100 7").unwrap();
        assert_eq!(found, ("linux-image-6.1.0-56-arm64".to_string(), "6.1.192-2".to_string()));
        assert_eq!(parse_memo(memo, "lists 3 100 8"), None);
        assert_eq!(parse_memo("", "lists 0 0 0"), None);
    }

    #[test]
    fn arch_options_name_every_guest_architecture() {
        let opts = apt_arch_options().join(" ");
        for arch in Arch::ALL {
            assert!(opts.contains(&format!("APT::Architectures::={}", arch.deb_arch())), "{opts}");
        }
    }

    #[test]
    fn cached_version_is_found_from_the_pointer_file() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DebCache::new(tmp.path());
        assert!(cache.cached("busybox-static", Arch::S390x).is_none());
        let dir = cache.folder("busybox-static", "1:1.0-1", Arch::S390x);
        std::fs::create_dir_all(&dir).unwrap();
        cache.remember("busybox-static", Arch::S390x, "busybox-static", "1:1.0-1").unwrap();
        let got = cache.cached("busybox-static", Arch::S390x).unwrap();
        assert_eq!(got.version, "1:1.0-1");
        assert_eq!(got.dir, dir);
    }
}

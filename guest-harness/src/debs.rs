//! Debian packages of any architecture, downloaded and unpacked into a cache directory,
//! never installed into the host.
//!
//! Every repository is used through an [`AptSource`]: its own `apt.conf` (handed to apt
//! with `APT_CONFIG`, so the host's `/etc/apt` configuration is not read), sources list,
//! pin preferences, package lists, downloaded `.deb` files and an **empty** dpkg status
//! under `<cache>/apt/<name>/`. With the empty status apt resolves a package's full
//! dependency closure, as for an empty machine, and the host's installed packages play no
//! part. The guest architectures are named in that `apt.conf`, so dpkg's own architecture
//! list stays untouched.
//!
//! A single package ([`DebCache::ensure`]) or a set of them ([`DebCache::ensure_set`])
//! is unpacked with `dpkg-deb -x` into a folder named by package, version and
//! architecture; a folder that exists is complete (it is renamed into place only after
//! unpacking), so a second run returns at once. Resolutions are remembered with a
//! fingerprint of the source's lists, so `apt-cache` runs again only after the lists
//! change. When apt cannot resolve or download (offline), the last unpacked version is
//! used. A download that fails (an archive that moved on since the lists were fetched
//! answers 404) updates the lists once and tries again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::arch::Arch;
use crate::command::{self, CommandError, FixCommand};
use crate::debroot::{self, RootError};

/// A package could not be resolved, downloaded or unpacked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DebError {
    /// Apt does not know the package for that architecture and nothing is cached.
    #[error("cannot resolve {package}:{arch} from {source_name} and nothing is cached ({reason}); to refresh that source's package lists, run:\n{fix}")]
    Unresolved {
        /// The package asked for.
        package: String,
        /// Its Debian architecture.
        arch: &'static str,
        /// The source asked.
        source_name: String,
        /// What apt said.
        reason: String,
        /// The command that refreshes the source's package lists.
        fix: FixCommand,
    },
    /// `apt-get download` failed and nothing is cached.
    #[error("cannot download {package}:{arch} {version} from {source_name}: {source}")]
    Fetch {
        /// The package.
        package: String,
        /// Its Debian architecture.
        arch: &'static str,
        /// The version asked for.
        version: String,
        /// The source asked.
        source_name: String,
        /// The failing command.
        source: Box<CommandError>,
    },
    /// `apt-get` could not compute the packages a set of packages needs.
    #[error("apt cannot resolve {} from {source_name}: {source}", packages.join(" "))]
    Solve {
        /// The packages asked for.
        packages: Vec<String>,
        /// The source asked.
        source_name: String,
        /// The failing command.
        source: Box<CommandError>,
    },
    /// Unpacking failed.
    #[error(transparent)]
    Root(#[from] RootError),
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

impl DebError {
    /// Whether the archive answered that a file does not exist (HTTP 404).
    pub fn is_not_found(&self) -> bool {
        match self {
            DebError::Fetch { source, .. } => match source.as_ref() {
                CommandError::Failed { stderr, .. } => stderr.contains("404"),
                CommandError::Spawn { .. } => false,
            },
            _ => false,
        }
    }
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

/// One package version of one architecture, as apt names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct DebRef {
    /// Package name, without an architecture qualifier.
    pub package: String,
    /// Debian version.
    pub version: String,
    /// Debian architecture (`amd64`, `arm64`, `all`).
    pub arch: String,
}

impl DebRef {
    /// The `.deb` file name `apt-get download` writes (`:` in the version as `%3a`).
    pub fn file_name(&self) -> String {
        format!("{}_{}_{}.deb", self.package, self.version.replace(':', "%3a"), self.arch)
    }

    /// The file name as it appears in the archive's URL (apt's messages quote it so).
    pub fn url_file_name(&self) -> String {
        self.file_name().replace('+', "%2b").replace('~', "%7e")
    }

    /// The argument that makes `apt-get download` fetch exactly this version:
    /// `name:arch=version`; an `all` package goes by the native architecture's name.
    pub fn download_spec(&self, native: &str) -> String {
        let arch = if self.arch == "all" { native } else { &self.arch };
        format!("{}:{arch}={}", self.package, self.version)
    }
}

/// A package (or a set of packages) unpacked in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unpacked {
    /// The package that was unpacked (after resolving a metapackage); for a set, the
    /// main package.
    pub package: String,
    /// Its Debian version.
    pub version: String,
    /// The guest architecture.
    pub arch: Arch,
    /// The folder holding the package's files (`dpkg-deb -x` layout).
    pub dir: PathBuf,
}

/// A package repository, used through its own apt set-up under `<cache>/apt/<name>/`:
/// the host's apt configuration, lists and dpkg status stay untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AptSource {
    /// Folder name under `<cache>/apt/`, also separating this source's resolutions.
    pub name: &'static str,
    /// The `sources.list` lines (one-line format, each with `[arch=… signed-by=…]`).
    pub lines: String,
    /// `apt_preferences` stanzas (pins), possibly empty.
    pub preferences: String,
}

/// Settings of the host's apt configuration that a private set-up keeps: how to reach
/// the network (proxies, retries) and whether a Release file's dates are checked (a
/// machine fed from an archive snapshot turns that off). Signatures are checked either way.
pub const HOST_ACQUIRE_KEYS: [&str; 5] = [
    "Acquire::http::Proxy",
    "Acquire::https::Proxy",
    "Acquire::Retries",
    "Acquire::Check-Valid-Until",
    "Acquire::Check-Date",
];

/// The lines of `apt-config dump` output that set one of [`HOST_ACQUIRE_KEYS`] (or a
/// per-host variant of a proxy key).
pub fn acquire_settings(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| {
            let key = l.split_whitespace().next().unwrap_or("");
            HOST_ACQUIRE_KEYS
                .iter()
                .any(|k| key == *k || (k.ends_with("Proxy") && key.starts_with(&format!("{k}::"))))
        })
        .filter(|l| l.trim_end().ends_with("\";"))
        .map(String::from)
        .collect()
}

/// [`acquire_settings`] of the host's apt configuration, read once.
fn host_acquire_settings() -> &'static [String] {
    static SETTINGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SETTINGS.get_or_init(|| {
        command::output(Command::new("apt-config").arg("dump"))
            .map(|d| acquire_settings(&d))
            .unwrap_or_default()
    })
}

/// The Debian architecture of this host, which `all` packages are fetched as.
pub fn native_arch() -> &'static str {
    Arch::host().map_or("amd64", Arch::deb_arch)
}

/// The Debian architectures a source knows: the host's first, then every guest's.
pub fn architectures() -> Vec<&'static str> {
    let mut archs = vec![native_arch()];
    for arch in Arch::ALL {
        if !archs.contains(&arch.deb_arch()) {
            archs.push(arch.deb_arch());
        }
    }
    archs
}

impl AptSource {
    fn dir(&self, root: &Path) -> PathBuf {
        root.join("apt").join(self.name)
    }

    fn config_file(&self, root: &Path) -> PathBuf {
        self.dir(root).join("apt.conf")
    }

    /// The `apt.conf` that points apt at this source only: no host configuration
    /// (`Dir::Etc::Main`, `Dir::Etc::Parts`), its own lists, cache, preferences and an
    /// empty dpkg status, every guest architecture, no translations.
    pub fn config_text(&self, root: &Path) -> String {
        let d = self.dir(root);
        let q = |p: &str| format!("\"{}\"", d.join(p).display());
        let archs: Vec<String> = architectures().iter().map(|a| format!("\"{a}\";")).collect();
        let mut text = format!(
            "Dir::Etc::Main \"/dev/null\";\n\
             Dir::Etc::Parts {};\n\
             Dir::Etc::SourceList {};\n\
             Dir::Etc::SourceParts {};\n\
             Dir::Etc::Preferences {};\n\
             Dir::Etc::PreferencesParts {};\n\
             Dir::State {};\n\
             Dir::State::Lists {};\n\
             Dir::State::status {};\n\
             Dir::Cache {};\n\
             Dir::Log {};\n\
             APT::Architecture \"{}\";\n\
             APT::Architectures {{ {} }};\n\
             APT::Install-Recommends \"false\";\n\
             Acquire::Languages \"none\";\n",
            q("apt.conf.d"),
            q("sources.list"),
            q("sources.list.d"),
            q("preferences"),
            q("preferences.d"),
            q("state"),
            q("lists"),
            q("status"),
            q("cache"),
            q("log"),
            native_arch(),
            archs.join(" "),
        );
        if rustix::process::geteuid().is_root() {
            // apt drops to the `_apt` user for downloads, which cannot write here.
            text.push_str("APT::Sandbox::User \"root\";\n");
        }
        for line in host_acquire_settings() {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Writes the configuration and creates the folders apt expects.
    fn prepare(&self, root: &Path) -> Result<()> {
        let d = self.dir(root);
        for sub in [
            "apt.conf.d",
            "sources.list.d",
            "preferences.d",
            "state",
            "log",
            "lists/partial",
            "cache/archives/partial",
            "debs",
        ] {
            let path = d.join(sub);
            std::fs::create_dir_all(&path).map_err(io_err("creating", &path))?;
        }
        for (file, text) in [
            ("status", String::new()),
            ("sources.list", self.lines.clone()),
            ("preferences", self.preferences.clone()),
            ("apt.conf", self.config_text(root)),
        ] {
            let path = d.join(file);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&path, text).map_err(io_err("writing", &path))?;
            }
        }
        Ok(())
    }

    /// `program` (`apt-get`, `apt-cache`) reading this source's configuration only.
    fn command(&self, root: &Path, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.config_file(root)).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update_fix(&self, root: &Path) -> FixCommand {
        FixCommand(format!("APT_CONFIG={} apt-get update", self.config_file(root).display()))
    }
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

/// A dependency: package name and the exact version it pins (`(= 1.0-1)`), if any.
pub type Dependency = (String, Option<String>);

/// The `Depends:` field of `apt-cache show` output (its first stanza): each entry's first
/// alternative as name and exact version (`(= 7.3.4-1)`), when one is given.
pub fn parse_depends(show_output: &str) -> Vec<Dependency> {
    let Some(field) = show_output
        .split("\n\n")
        .next()
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Depends:")))
    else {
        return Vec::new();
    };
    field
        .split(',')
        .filter_map(|entry| {
            let first = entry.split('|').next()?.trim();
            let name = first.split([' ', '(']).next()?.split(':').next()?.trim();
            if name.is_empty() {
                return None;
            }
            let version = first
                .split_once("(=")
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(v, _)| v.trim().to_string());
            Some((name.to_string(), version))
        })
        .collect()
}

/// Each stanza of `apt-cache show` output (one per version), in order: its version and
/// its `Depends:` (see [`parse_depends`]).
pub fn parse_stanzas(show_output: &str) -> Vec<(String, Vec<Dependency>)> {
    show_output
        .split("\n\n")
        .filter_map(|stanza| Some((parse_version(stanza)?, parse_depends(stanza))))
        .collect()
}

/// Each stanza of `apt-cache show` output: its `Package:` and `Version:`.
pub fn parse_package_versions(show_output: &str) -> Vec<(String, String)> {
    show_output
        .split("\n\n")
        .filter_map(|stanza| {
            let package = stanza.lines().find_map(|l| l.strip_prefix("Package:"))?.trim();
            Some((package.to_string(), parse_version(stanza)?))
        })
        .collect()
}

/// The packages `apt-get -s install` would unpack: its `Inst NAME (VERSION SUITES [ARCH])`
/// lines.
pub fn parse_simulated_installs(output: &str) -> Vec<DebRef> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Inst ")?;
            let (name, rest) = rest.split_once(' ')?;
            // `(VERSION SUITES [ARCH])`, possibly followed by `[]` (its dependants).
            let inner = rest.split_once('(')?.1.split_once(')')?.0;
            let version = inner.split_whitespace().next()?;
            let arch = inner.rsplit_once('[')?.1.split_once(']')?.0;
            let package = name.split(':').next()?;
            Some(DebRef {
                package: package.to_string(),
                version: version.to_string(),
                arch: arch.to_string(),
            })
        })
        .collect()
}

/// The cache of unpacked packages, under one root folder, fed by one source.
#[derive(Clone, Debug)]
pub struct DebCache {
    root: PathBuf,
    source: AptSource,
}

/// Sources whose lists this process updated already (at most once each).
static UPDATED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// One apt call at a time per process: apt's own locks would fail a second concurrent
/// `update` instead of waiting.
static APT: Mutex<()> = Mutex::new(());

impl DebCache {
    /// A cache rooted at `root` (created on first use), resolving from `source`.
    pub fn new(root: impl Into<PathBuf>, source: AptSource) -> Self {
        DebCache { root: root.into(), source }
    }

    /// The same cache, resolving and downloading from `source` instead (unpacked folders
    /// are shared; resolutions are kept per source).
    pub fn with_source(&self, source: AptSource) -> Self {
        DebCache { root: self.root.clone(), source }
    }

    /// The cache's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The source packages come from.
    pub fn source(&self) -> &AptSource {
        &self.source
    }

    fn lists_dir(&self) -> PathBuf {
        self.source.dir(&self.root).join("lists")
    }

    fn debs_dir(&self) -> PathBuf {
        self.root.join("debs")
    }

    /// Where this source's downloaded `.deb` files are kept.
    fn archive_dir(&self) -> PathBuf {
        self.source.dir(&self.root).join("debs")
    }

    /// Where resolutions and "current version" pointers live: per source, since a name
    /// (`linux-image-amd64`) means another package in another repository.
    fn state_dir(&self) -> PathBuf {
        self.debs_dir().join(format!("@{}", self.source.name))
    }

    fn folder(&self, package: &str, version: &str, arch: Arch) -> PathBuf {
        self.debs_dir().join(format!("{package}_{}_{}", version.replace(':', "%3a"), arch.deb_arch()))
    }

    fn current_file(&self, name: &str, arch: Arch) -> PathBuf {
        self.state_dir().join(format!("{name}_{}.current", arch.deb_arch()))
    }

    /// Where a successful `apt-get update` records the sources it fetched lists for.
    fn lists_marker(&self) -> PathBuf {
        self.source.dir(&self.root).join("lists.sources")
    }

    /// Whether this source has complete package lists for its current sources: an
    /// update that failed half-way (one suite unreachable) or a changed sources list
    /// does not count.
    pub fn has_lists(&self) -> bool {
        std::fs::read_to_string(self.lists_marker()).is_ok_and(|t| t == self.source.lines)
    }

    /// Fetches the source's package lists (`apt-get update`).
    pub fn update(&self) -> Result<()> {
        self.source.prepare(&self.root)?;
        let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        eprintln!("debs: updating the package lists of {}", self.source.name);
        command::output(self.source.command(&self.root, "apt-get").arg("update")).map_err(|e| {
            DebError::Unresolved {
                package: "(package lists)".into(),
                arch: native_arch(),
                source_name: self.source.name.into(),
                reason: e.to_string(),
                fix: self.source.update_fix(&self.root),
            }
        })?;
        UPDATED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(self.source.name.into());
        let marker = self.lists_marker();
        std::fs::write(&marker, &self.source.lines).map_err(io_err("writing", &marker))
    }

    /// Updates the lists unless this process did so already; whether it ran now.
    fn update_once(&self) -> Result<bool> {
        let done =
            UPDATED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(self.source.name);
        if done {
            return Ok(false);
        }
        self.update()?;
        Ok(true)
    }

    /// Fetches the lists when the source has none yet.
    pub fn ensure_lists(&self) -> Result<()> {
        self.source.prepare(&self.root)?;
        if !self.has_lists() {
            self.update()?;
        }
        Ok(())
    }

    /// The package `name` for `arch`, unpacked; downloads and unpacks it when the
    /// resolved version is not cached yet.
    pub fn ensure(&self, name: &str, arch: Arch, resolve: Resolve) -> Result<Unpacked> {
        self.ensure_set(name, arch, |cache| {
            let (package, version) = cache.resolve_uncached(name, arch, resolve)?;
            Ok(vec![DebRef { package, version, arch: arch.deb_arch().into() }])
        })
    }

    /// Like [`DebCache::ensure`] for a set of packages that `resolve` names (the first
    /// is the main one, naming the folder), all unpacked into one folder. The set is
    /// remembered under `name` with the lists it was resolved from.
    pub fn ensure_set(
        &self,
        name: &str,
        arch: Arch,
        resolve: impl Fn(&DebCache) -> Result<Vec<DebRef>>,
    ) -> Result<Unpacked> {
        let attempt = |cache: &DebCache| -> Result<Unpacked> {
            let refs = cache.memoized(name, arch, || resolve(cache))?;
            let main = refs.first().cloned().ok_or_else(|| DebError::Io {
                what: "nothing resolved for",
                path: PathBuf::from(name),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
            let dir = cache.folder(&main.package, &main.version, arch);
            if !dir.is_dir() {
                cache.unpack_new(&refs, &dir)?;
            }
            cache.remember(name, arch, &main.package, &main.version)?;
            Ok(Unpacked { package: main.package, version: main.version, arch, dir })
        };
        match attempt(self) {
            Ok(found) => Ok(found),
            // The archive moved on since the lists were fetched: refresh them once.
            Err(e @ DebError::Fetch { .. }) => match self.update_once() {
                Ok(true) => attempt(self).or_else(|e| self.cached(name, arch).ok_or(e)),
                _ => self.cached(name, arch).ok_or(e),
            },
            Err(e) => self.cached(name, arch).ok_or(e),
        }
    }

    /// Downloads `refs` and unpacks them, in order, into `dest` (renamed into place once
    /// complete).
    fn unpack_new(&self, refs: &[DebRef], dest: &Path) -> Result<()> {
        let debs = self.download(refs)?;
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
        let work = tempfile::Builder::new()
            .prefix(".unpack-")
            .tempdir_in(&parent)
            .map_err(io_err("creating a temporary folder in", &parent))?;
        let tree = work.path().join("tree");
        debroot::unpack(&debs, &tree)?;
        debroot::relink_absolute(&tree)?;
        match std::fs::rename(&tree, dest) {
            Ok(()) => Ok(()),
            // Another run unpacked the same version at the same time.
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(io_err("moving the unpacked packages to", dest)(e)),
        }
    }

    /// Unpacks `refs` into a new folder `dest` (see [`DebCache::ensure_set`]); an
    /// existing `dest` is kept as it is.
    pub fn unpack_into(&self, refs: &[DebRef], dest: &Path) -> Result<()> {
        if dest.is_dir() {
            return Ok(());
        }
        self.unpack_new(refs, dest)
    }

    /// The `.deb` files of `refs`, downloading those not kept yet (one `apt-get
    /// download` for all of them).
    pub fn download(&self, refs: &[DebRef]) -> Result<Vec<PathBuf>> {
        self.source.prepare(&self.root)?;
        let dir = self.archive_dir();
        let missing: Vec<&DebRef> = refs.iter().filter(|r| !dir.join(r.file_name()).is_file()).collect();
        if !missing.is_empty() {
            let work = tempfile::Builder::new()
                .prefix(".download-")
                .tempdir_in(&dir)
                .map_err(io_err("creating a temporary folder in", &dir))?;
            let specs: Vec<String> = missing.iter().map(|r| r.download_spec(native_arch())).collect();
            eprintln!("debs: downloading {} package(s) from {}", specs.len(), self.source.name);
            let out = {
                let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                command::output(
                    self.source
                        .command(&self.root, "apt-get")
                        .current_dir(work.path())
                        .arg("download")
                        .args(&specs),
                )
            };
            if let Err(source) = out {
                let first = missing.first().map(|r| (*r).clone()).unwrap_or_else(|| DebRef {
                    package: String::new(),
                    version: String::new(),
                    arch: String::new(),
                });
                // Name the package the archive refused when apt says which.
                let failed = missing
                    .iter()
                    .find(|r| source.to_string().contains(&r.url_file_name()))
                    .map_or(first, |r| (*r).clone());
                return Err(DebError::Fetch {
                    arch: Arch::ALL
                        .iter()
                        .map(|a| a.deb_arch())
                        .find(|a| *a == failed.arch)
                        .unwrap_or(native_arch()),
                    package: failed.package,
                    version: failed.version,
                    source_name: self.source.name.into(),
                    source: Box::new(source),
                });
            }
            for r in &missing {
                let from = work.path().join(r.file_name());
                let to = dir.join(r.file_name());
                std::fs::rename(&from, &to).map_err(io_err("keeping the download", &from))?;
            }
        }
        Ok(refs.iter().map(|r| dir.join(r.file_name())).collect())
    }

    /// The packages that installing `packages` on an empty machine unpacks
    /// (`apt-get -s install`, no recommends), each once.
    pub fn solve(&self, packages: &[String]) -> Result<Vec<DebRef>> {
        self.ensure_lists()?;
        let run = || {
            let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            command::output(self.source.command(&self.root, "apt-get").args(["-s", "install"]).args(packages))
        };
        let out = match run() {
            Ok(out) => Ok(out),
            Err(_) if self.update_once()? => run(),
            Err(e) => Err(e),
        }
        .map_err(|source| DebError::Solve {
            packages: packages.to_vec(),
            source_name: self.source.name.into(),
            source: Box::new(source),
        })?;
        let mut refs = parse_simulated_installs(&out);
        refs.sort();
        refs.dedup();
        Ok(refs)
    }

    /// `apt-cache show` of the candidate of `package` for `arch` (`--no-all-versions`).
    pub fn show(&self, package: &str, arch: Arch) -> std::result::Result<String, CommandError> {
        let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        command::output(self.source.command(&self.root, "apt-cache").args([
            "show",
            "--no-all-versions",
            &format!("{package}:{}", arch.deb_arch()),
        ]))
    }

    /// `apt-cache show` of every version of `package` for `arch` the lists know, in
    /// apt's order (newest first).
    pub fn show_all(&self, package: &str, arch: Arch) -> std::result::Result<String, CommandError> {
        let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        command::output(
            self.source
                .command(&self.root, "apt-cache")
                .args(["show", &format!("{package}:{}", arch.deb_arch())]),
        )
    }

    /// `apt-cache show` of `package` at `version` for `arch`.
    pub fn show_version(
        &self,
        package: &str,
        version: &str,
        arch: Arch,
    ) -> std::result::Result<String, CommandError> {
        let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        command::output(
            self.source
                .command(&self.root, "apt-cache")
                .args(["show", &format!("{package}:{}={version}", arch.deb_arch())]),
        )
    }

    /// The names of the packages the lists know that start with `prefix` (`apt-cache
    /// pkgnames`), of any architecture, each once.
    pub fn pkgnames(&self, prefix: &str) -> std::result::Result<Vec<String>, CommandError> {
        let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = command::output(self.source.command(&self.root, "apt-cache").args(["pkgnames", prefix]))?;
        let mut names: Vec<String> =
            out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// `apt-cache show` of every version of each of `packages` for `arch`, in one call:
    /// each stanza's package and version (see [`parse_package_versions`]).
    pub fn show_versions(
        &self,
        packages: &[String],
        arch: Arch,
    ) -> std::result::Result<Vec<(String, String)>, CommandError> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        let _apt = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = command::output(
            self.source
                .command(&self.root, "apt-cache")
                .arg("show")
                .args(packages.iter().map(|p| format!("{p}:{}", arch.deb_arch()))),
        )?;
        Ok(parse_package_versions(&out))
    }

    /// The packages `name` resolved to with the current lists, if that resolution is
    /// remembered (see [`DebCache::ensure_set`]).
    pub fn resolved(&self, name: &str, arch: Arch) -> Option<Vec<DebRef>> {
        let lists = lists_fingerprint(&self.lists_dir());
        std::fs::read_to_string(self.memo_file(name, arch)).ok().and_then(|t| parse_memo(&t, &lists))
    }

    /// Forgets what `name` resolved to, so the next [`DebCache::ensure_set`] resolves it
    /// again.
    pub fn forget(&self, name: &str, arch: Arch) {
        // A memo that cannot be removed is stale only until the lists change.
        let _ = std::fs::remove_file(self.memo_file(name, arch));
    }

    fn unserved_file(&self, arch: Arch) -> PathBuf {
        self.state_dir().join(format!("unserved_{}", arch.deb_arch()))
    }

    /// Records that the archive answered 404 for `package` at `version` of `arch` with
    /// the current lists, so later runs do not ask again (and do not refresh the lists
    /// for it) until the lists change.
    pub fn mark_unserved(&self, arch: Arch, package: &str, version: &str) -> Result<()> {
        let lists = lists_fingerprint(&self.lists_dir());
        let path = self.unserved_file(arch);
        let mut text = std::fs::read_to_string(&path)
            .ok()
            .filter(|t| t.lines().next() == Some(lists.as_str()))
            .unwrap_or_else(|| format!("{lists}\n"));
        let line = format!("{package} {version}");
        if !text.lines().any(|l| l == line) {
            text.push_str(&line);
            text.push('\n');
        }
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        std::fs::write(&path, text).map_err(io_err("writing", &path))
    }

    /// Whether the archive answered 404 for any of `refs` with the current lists
    /// ([`DebCache::mark_unserved`]).
    pub fn is_unserved(&self, arch: Arch, refs: &[DebRef]) -> bool {
        let lists = lists_fingerprint(&self.lists_dir());
        let Ok(text) = std::fs::read_to_string(self.unserved_file(arch)) else { return false };
        let mut lines = text.lines();
        if lines.next() != Some(lists.as_str()) {
            return false;
        }
        let known: BTreeSet<&str> = lines.collect();
        refs.iter().any(|r| known.contains(format!("{} {}", r.package, r.version).as_str()))
    }

    /// The last version of `name` that was unpacked for `arch`, if it is still there.
    pub fn cached(&self, name: &str, arch: Arch) -> Option<Unpacked> {
        let text = std::fs::read_to_string(self.current_file(name, arch)).ok()?;
        let (package, version) = text.trim().split_once(' ')?;
        let dir = self.folder(package, version, arch);
        dir.is_dir().then(|| {
            eprintln!("debs: using cached {package} {version} for {arch} (apt could not provide {name})");
            Unpacked { package: package.to_string(), version: version.to_string(), arch, dir }
        })
    }

    fn remember(&self, name: &str, arch: Arch, package: &str, version: &str) -> Result<()> {
        let path = self.current_file(name, arch);
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        std::fs::write(&path, format!("{package} {version}\n")).map_err(io_err("writing", &path))
    }

    fn resolve_once(
        &self,
        name: &str,
        arch: Arch,
        resolve: Resolve,
    ) -> std::result::Result<(String, String), String> {
        let package = match resolve {
            Resolve::Direct => name.to_string(),
            Resolve::MetaDependency(prefix) => {
                let out = self.show(name, arch).map_err(|e| e.to_string())?;
                parse_depends(&out)
                    .into_iter()
                    .map(|(n, _)| n)
                    .find(|n| n.starts_with(prefix))
                    .ok_or_else(|| format!("{name}:{} has no dependency named {prefix}*", arch.deb_arch()))?
            }
        };
        let out = self.show(&package, arch).map_err(|e| e.to_string())?;
        let version = parse_version(&out).ok_or_else(|| format!("no Version for {package}"))?;
        Ok((package, version))
    }

    fn memo_file(&self, name: &str, arch: Arch) -> PathBuf {
        self.state_dir().join(format!("{name}_{}.resolved", arch.deb_arch()))
    }

    /// What `compute` resolves `name` to, remembered together with the lists it was
    /// resolved from, so it is reused (`apt-cache` takes seconds with three
    /// architectures) until the lists change.
    fn memoized(
        &self,
        name: &str,
        arch: Arch,
        compute: impl FnOnce() -> Result<Vec<DebRef>>,
    ) -> Result<Vec<DebRef>> {
        let memo = self.memo_file(name, arch);
        let lists = lists_fingerprint(&self.lists_dir());
        if let Some(found) = std::fs::read_to_string(&memo).ok().and_then(|t| parse_memo(&t, &lists)) {
            return Ok(found);
        }
        let found = compute()?;
        // The memo only saves time; failing to write it changes nothing else.
        let _ = std::fs::create_dir_all(self.state_dir())
            .and_then(|()| std::fs::write(&memo, memo_text(&lists_fingerprint(&self.lists_dir()), &found)));
        Ok(found)
    }

    /// Resolves `name` with the source's lists (remembered, see [`DebCache::ensure`]):
    /// the package to download and its version.
    pub fn resolve(&self, name: &str, arch: Arch, resolve: Resolve) -> Result<(String, String)> {
        let refs = self.memoized(name, arch, || {
            let (package, version) = self.resolve_uncached(name, arch, resolve)?;
            Ok(vec![DebRef { package, version, arch: arch.deb_arch().into() }])
        })?;
        let first = refs.into_iter().next().ok_or_else(|| DebError::Io {
            what: "an empty resolution for",
            path: PathBuf::from(name),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })?;
        Ok((first.package, first.version))
    }

    /// Resolves `name` with the source's lists, fetching them first when there are
    /// none, and once more when the name is unknown to them.
    pub fn resolve_uncached(&self, name: &str, arch: Arch, resolve: Resolve) -> Result<(String, String)> {
        self.ensure_lists()?;
        let unresolved = |reason: String| DebError::Unresolved {
            package: name.to_string(),
            arch: arch.deb_arch(),
            source_name: self.source.name.into(),
            reason,
            fix: self.source.update_fix(&self.root),
        };
        match self.resolve_once(name, arch, resolve) {
            Ok(found) => Ok(found),
            Err(reason) => {
                if self.update_once()? {
                    self.resolve_once(name, arch, resolve).map_err(unresolved)
                } else {
                    Err(unresolved(reason))
                }
            }
        }
    }
}

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

fn memo_text(lists: &str, refs: &[DebRef]) -> String {
    let mut text = format!("{lists}\n");
    for r in refs {
        text.push_str(&format!("{} {} {}\n", r.package, r.version, r.arch));
    }
    text
}

fn parse_memo(text: &str, lists: &str) -> Option<Vec<DebRef>> {
    let mut lines = text.lines();
    if lines.next()? != lists {
        return None;
    }
    let refs: Option<Vec<DebRef>> = lines
        .map(|l| {
            let mut words = l.split(' ');
            Some(DebRef {
                package: words.next()?.to_string(),
                version: words.next()?.to_string(),
                arch: words.next()?.to_string(),
            })
        })
        .collect();
    refs.filter(|r| !r.is_empty())
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

    /// The fields as trixie-backports' split 7.3 kernel has them.
    #[test]
    fn depends_of_a_split_kernel() {
        let show = "Package: linux-image-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\n\
                    Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                    linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                    linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                    linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n\
                    Description: Linux 7.3.4 for 64-bit PCs\n\n\
                    Package: other\nDepends: nothing\n";
        let deps = parse_depends(show);
        assert_eq!(deps.len(), 4, "{deps:?}");
        assert_eq!(deps[0], ("dracut".to_string(), None));
        assert_eq!(
            deps[2],
            ("linux-binary-7.3.4+deb13-amd64".to_string(), Some("7.3.4-1~bpo13+1".to_string()))
        );
        let meta = "Package: linux-image-arm64\nDepends: linux-image-6.1.0-56-arm64:arm64 (= 6.1.192-2)\n";
        assert_eq!(
            parse_depends(meta),
            [("linux-image-6.1.0-56-arm64".to_string(), Some("6.1.192-2".into()))]
        );
        assert!(parse_depends("Package: x\n").is_empty());
    }

    #[test]
    fn simulated_installs() {
        let out = "NOTE: This is only a simulation!\n\
                   Inst libc6 (2.41-12+deb13u5 Debian:13.8/stable [amd64]) []\n\
                   Inst busybox-static:arm64 (1:1.37.0-6+b9 Debian:13.8/stable [arm64])\n\
                   Inst libpmem1 (1.13.1-1.1+b1 Debian:13.8/stable, Debian:unstable [amd64])\n\
                   Inst ovmf (2026.08+ds-2 Debian:unstable [all])\n\
                   Conf libc6 (2.41-12+deb13u5 Debian:13.8/stable [amd64])\n";
        let refs = parse_simulated_installs(out);
        assert_eq!(refs.len(), 4);
        assert_eq!(
            refs[0],
            DebRef { package: "libc6".into(), version: "2.41-12+deb13u5".into(), arch: "amd64".into() }
        );
        assert_eq!(
            refs[1],
            DebRef {
                package: "busybox-static".into(),
                version: "1:1.37.0-6+b9".into(),
                arch: "arm64".into()
            }
        );
        assert_eq!(refs[2].version, "1.13.1-1.1+b1");
        assert_eq!(refs[3].arch, "all");
        assert_eq!(refs[1].file_name(), "busybox-static_1%3a1.37.0-6+b9_arm64.deb");
        assert_eq!(refs[3].download_spec("amd64"), "ovmf:amd64=2026.08+ds-2");
        assert_eq!(refs[1].download_spec("amd64"), "busybox-static:arm64=1:1.37.0-6+b9");
        let split = DebRef {
            package: "linux-binary-7.3.4+deb13-s390x".into(),
            version: "7.3.4-1~bpo13+1".into(),
            arch: "s390x".into(),
        };
        assert_eq!(split.url_file_name(), "linux-binary-7.3.4%2bdeb13-s390x_7.3.4-1%7ebpo13%2b1_s390x.deb");
    }

    #[test]
    fn memo_is_only_valid_for_the_same_lists() {
        let refs = vec![
            DebRef {
                package: "linux-image-7.3.4+deb13-arm64".into(),
                version: "7.3.4-1~bpo13+1".into(),
                arch: "arm64".into(),
            },
            DebRef {
                package: "linux-binary-7.3.4+deb13-arm64".into(),
                version: "7.3.4-1~bpo13+1".into(),
                arch: "arm64".into(),
            },
        ];
        let memo = memo_text("lists 3 100 7", &refs);
        assert_eq!(parse_memo(&memo, "lists 3 100 7").unwrap(), refs);
        assert_eq!(parse_memo(&memo, "lists 3 100 8"), None);
        assert_eq!(parse_memo("", "lists 0 0 0"), None);
        assert_eq!(parse_memo("lists 0 0 0\n", "lists 0 0 0"), None, "an empty set is no resolution");
        assert_eq!(
            parse_memo("lists 0 0 0\npkg 1.0\n", "lists 0 0 0"),
            None,
            "old two-word memos are redone"
        );
    }

    fn source() -> AptSource {
        AptSource {
            name: "test",
            lines: "deb [arch=amd64] http://x y main\n".into(),
            preferences: String::new(),
        }
    }

    #[test]
    fn config_keeps_apt_away_from_the_host() {
        let text = source().config_text(Path::new("/c"));
        for want in [
            "Dir::Etc::Main \"/dev/null\";",
            "Dir::Etc::Parts \"/c/apt/test/apt.conf.d\";",
            "Dir::State::status \"/c/apt/test/status\";",
            "Dir::State::Lists \"/c/apt/test/lists\";",
            "Dir::Cache \"/c/apt/test/cache\";",
            "APT::Install-Recommends \"false\";",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        for arch in Arch::ALL {
            assert!(text.contains(&format!("\"{}\";", arch.deb_arch())), "{text}");
        }
    }

    #[test]
    fn network_and_date_settings_follow_the_host() {
        let dump = "APT::Architecture \"amd64\";\n\
                    Acquire::Check-Valid-Until \"false\";\n\
                    Acquire::http::Proxy \"http://proxy:3128\";\n\
                    Acquire::http::Proxy::deb.debian.org \"DIRECT\";\n\
                    Acquire::IndexTargets::deb::DEP-11::MetaKey \"x\";\n\
                    DPkg::Post-Invoke:: \"rm -f /var/cache/apt/archives/*.deb\";\n";
        assert_eq!(
            acquire_settings(dump),
            [
                "Acquire::Check-Valid-Until \"false\";",
                "Acquire::http::Proxy \"http://proxy:3128\";",
                "Acquire::http::Proxy::deb.debian.org \"DIRECT\";"
            ]
        );
    }

    #[test]
    fn cached_version_is_found_from_the_pointer_file() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DebCache::new(tmp.path(), source());
        assert!(cache.cached("busybox-static", Arch::S390x).is_none());
        let dir = cache.folder("busybox-static", "1:1.0-1", Arch::S390x);
        std::fs::create_dir_all(&dir).unwrap();
        cache.remember("busybox-static", Arch::S390x, "busybox-static", "1:1.0-1").unwrap();
        let got = cache.cached("busybox-static", Arch::S390x).unwrap();
        assert_eq!(got.version, "1:1.0-1");
        assert_eq!(got.dir, dir);
    }

    #[test]
    fn unserved_packages_are_remembered_with_the_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DebCache::new(tmp.path(), source());
        let r = DebRef {
            package: "linux-image-7.3.4+deb13-s390x".into(),
            version: "7.3.4-1".into(),
            arch: "s390x".into(),
        };
        assert!(!cache.is_unserved(Arch::S390x, std::slice::from_ref(&r)));
        cache.mark_unserved(Arch::S390x, &r.package, &r.version).unwrap();
        cache.mark_unserved(Arch::S390x, &r.package, &r.version).unwrap();
        assert!(cache.is_unserved(Arch::S390x, std::slice::from_ref(&r)));
        assert!(!cache.is_unserved(Arch::Aarch64, std::slice::from_ref(&r)));
        let other = DebRef { version: "7.3.5-1".into(), ..r.clone() };
        assert!(!cache.is_unserved(Arch::S390x, &[other]));
        // New lists: asked again.
        let lists = cache.lists_dir();
        std::fs::create_dir_all(&lists).unwrap();
        std::fs::write(lists.join("x_Packages"), "Package: a\n").unwrap();
        assert!(!cache.is_unserved(Arch::S390x, &[r]));
    }

    #[test]
    fn package_versions_of_several_packages() {
        let show =
            "Package: linux-image-7.2.11+deb13-s390x\nArchitecture: s390x\nVersion: 7.2.11-1~bpo13+1\n\n\
                    Package: linux-image-6.12.113+deb13-s390x\nVersion: 6.12.113-1\n\nNo Package here\n";
        assert_eq!(
            parse_package_versions(show),
            [
                ("linux-image-7.2.11+deb13-s390x".to_string(), "7.2.11-1~bpo13+1".to_string()),
                ("linux-image-6.12.113+deb13-s390x".to_string(), "6.12.113-1".to_string())
            ]
        );
    }

    #[test]
    fn not_found_is_recognised() {
        let e = DebError::Fetch {
            package: "linux-binary-7.3.4+deb13-s390x".into(),
            arch: "s390x",
            version: "7.3.4-1~bpo13+1".into(),
            source_name: "current".into(),
            source: Box::new(CommandError::Failed {
                line: "apt-get download".into(),
                status: "exit status: 100".into(),
                stderr: "E: Failed to fetch http://deb.debian.org/x.deb  404  Not Found".into(),
            }),
        };
        assert!(e.is_not_found());
        assert!(e.to_string().contains("linux-binary-7.3.4+deb13-s390x:s390x 7.3.4-1~bpo13+1"), "{e}");
    }
}

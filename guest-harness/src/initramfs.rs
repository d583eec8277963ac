//! The guest's initramfs: busybox of the guest architecture, `/init`, the reporter and,
//! when asked for, kernel modules with their dependencies.
//!
//! Layout: `/bin/busybox` (+ `/bin/sh` link; `/init` installs the other applets),
//! `/init`, `/xt/reporter.sh`, `/xt/kata-path` (a guest PCI path resolved as Kata's agent
//! does), `/xt/modules` (module files in load order),
//! `/lib/modules/<release>/…` (only the modules listed), optional `/xt/setup` and any
//! extra files. Uncompressed: the kernel unpacks plain `newc` cpio.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::kernels::{self, GuestKernel, KernelError};

/// The guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("../guest/init.sh");
/// The guest side of the reporter protocol (see [`crate::reporter`]).
pub const REPORTER_SCRIPT: &str = include_str!("../guest/reporter.sh");
/// The guest helper that resolves a guest PCI path as Kata's agent does
/// (`/xt/kata-path 20/00/00`).
pub const KATA_PATH_SCRIPT: &str = include_str!("../guest/kata-path.sh");

/// Building the initramfs failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitramfsError {
    /// A module or its dependencies could not be resolved.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A file could not be read or the archive not written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A path given for the guest is not a plain absolute path.
    #[error("guest path {0:?} must be absolute, without `..` and not UTF-8-less")]
    BadPath(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, InitramfsError>;

/// A file put into the initramfs as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraFile {
    /// Absolute guest path, e.g. `/xt/setup`.
    pub path: String,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
    /// Contents.
    pub data: Vec<u8>,
}

/// What goes into an initramfs beyond the fixed base.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitramfsSpec {
    /// Kernel modules to load at boot, by name (`vfio-pci`); dependencies are added and
    /// built-in ones skipped.
    pub modules: Vec<String>,
    /// A shell script run by `/init` before the reporter starts (installed as `/xt/setup`).
    pub setup: Option<String>,
    /// More files.
    pub files: Vec<ExtraFile>,
}

fn check_guest_path(path: &str) -> Result<&str> {
    let rel = path.strip_prefix('/').ok_or_else(|| InitramfsError::BadPath(path.to_string()))?;
    if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(InitramfsError::BadPath(path.to_string()));
    }
    Ok(rel)
}

fn parents(rel: &str, dirs: &mut BTreeSet<String>) {
    let mut acc = String::new();
    let components: Vec<&str> = rel.split('/').collect();
    for c in components.iter().take(components.len().saturating_sub(1)) {
        if !acc.is_empty() {
            acc.push('/');
        }
        acc.push_str(c);
        dirs.insert(acc.clone());
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| InitramfsError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Builds the archive bytes for `kernel` with the guest-architecture `busybox`.
pub fn build(kernel: &GuestKernel, busybox: &Path, spec: &InitramfsSpec) -> Result<Vec<u8>> {
    // (guest path without leading '/', mode, contents)
    let mut files: Vec<(String, u32, Vec<u8>)> = vec![
        ("bin/busybox".into(), 0o755, read(busybox)?),
        ("init".into(), 0o755, INIT_SCRIPT.as_bytes().to_vec()),
        ("xt/reporter.sh".into(), 0o755, REPORTER_SCRIPT.as_bytes().to_vec()),
        ("xt/kata-path".into(), 0o755, KATA_PATH_SCRIPT.as_bytes().to_vec()),
    ];
    if !spec.modules.is_empty() {
        let index = kernel.module_index()?;
        let names: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
        let mut list = String::new();
        for module in index.load_order(&names)? {
            let rel = module.strip_prefix(index.root()).unwrap_or(&module);
            let guest =
                format!("lib/modules/{}/{}", kernel.release, kernels::guest_module_path(rel).display());
            list.push_str(&format!("/{guest}\n"));
            files.push((guest, 0o644, kernels::read_module(&module)?));
        }
        files.push(("xt/modules".into(), 0o644, list.into_bytes()));
    }
    if let Some(setup) = &spec.setup {
        files.push(("xt/setup".into(), 0o755, setup.as_bytes().to_vec()));
    }
    for extra in &spec.files {
        files.push((check_guest_path(&extra.path)?.to_string(), extra.mode, extra.data.clone()));
    }

    let mut dirs: BTreeSet<String> = ["dev", "proc", "sys", "tmp", "run"].map(String::from).into();
    for (path, _, _) in &files {
        parents(path, &mut dirs);
    }
    let io =
        |source| InitramfsError::Io { what: "writing the archive for", path: kernel.image.clone(), source };
    let mut w = CpioWriter::new(Vec::new());
    for dir in &dirs {
        w.dir(dir, 0o755).map_err(io)?;
    }
    // The kernel opens /dev/console for /init before anything is mounted.
    w.char_device("dev/console", 0o600, 5, 1).map_err(io)?;
    for (path, mode, data) in &files {
        w.file(path, *mode, data).map_err(io)?;
    }
    w.symlink("bin/sh", "busybox").map_err(io)?;
    w.finish().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_listed_before_children() {
        let mut dirs = BTreeSet::new();
        parents("lib/modules/6.1/kernel/x.ko", &mut dirs);
        let v: Vec<&String> = dirs.iter().collect();
        assert_eq!(v, ["lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel"]);
    }

    #[test]
    fn guest_paths_are_checked() {
        assert_eq!(check_guest_path("/xt/a").unwrap(), "xt/a");
        for bad in ["xt/a", "/", "/a/../b", "/a//b"] {
            assert!(check_guest_path(bad).is_err(), "{bad}");
        }
    }
}

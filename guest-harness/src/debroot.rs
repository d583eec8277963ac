//! A private root made of unpacked Debian packages (`dpkg-deb -x`), used in place of an
//! installation: a stack's QEMU, firmware and libraries, or a guest kernel split over
//! several packages.
//!
//! Packages name files by their absolute paths, and some of their symbolic links are
//! absolute too (bookworm's `libc6` ships `/lib64/ld-linux-x86-64.so.2 →
//! /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2`). Unpacked under a folder, such a link
//! would point into the host. [`relink_absolute`] rewrites each one into a relative link
//! to the same path inside the root, and [`resolve`] follows links the way a process
//! `chroot`ed into the root would, so no lookup ever leaves the root.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::command::{self, CommandError};

/// Unpacking or looking inside a root failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// `dpkg-deb -x` failed.
    #[error("unpacking {}: {source}", deb.display())]
    Unpack {
        /// The package file.
        deb: PathBuf,
        /// The failing command.
        source: CommandError,
    },
    /// A file system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Following symbolic links took more than [`MAX_LINK_HOPS`] steps (a loop).
    #[error("too many symbolic links resolving {path} inside {}", root.display())]
    LinkLoop {
        /// The path asked for.
        path: String,
        /// The root.
        root: PathBuf,
    },
    /// The tree holds more than [`MAX_ENTRIES`] entries.
    #[error("{} holds more than {MAX_ENTRIES} entries", root.display())]
    TooLarge {
        /// The root.
        root: PathBuf,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, RootError>;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootError + 'a {
    move |source| RootError::Io { what, path: path.to_path_buf(), source }
}

/// The most symbolic links one lookup follows (Linux's own limit).
pub const MAX_LINK_HOPS: usize = 40;

/// The most entries a root may hold; a stack's root has about 10 000, a kernel's 5 000.
pub const MAX_ENTRIES: usize = 500_000;

/// Unpacks `debs`, in order, into `tree` (created when missing).
pub fn unpack(debs: &[PathBuf], tree: &Path) -> Result<()> {
    std::fs::create_dir_all(tree).map_err(io_err("creating", tree))?;
    for deb in debs {
        command::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tree))
            .map_err(|source| RootError::Unpack { deb: deb.clone(), source })?;
    }
    Ok(())
}

/// `path` as normal components, with `.` dropped and `..` taking one away (never above
/// the start): the lexical form of a path inside a root.
fn normal_components(path: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(name) => out.push(name.to_os_string()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The relative link target that reaches `target` (an absolute path inside the root)
/// from a link whose folder is `link_dir` (relative to the root).
pub fn relative_target(link_dir: &Path, target: &Path) -> PathBuf {
    let depth = normal_components(link_dir).len();
    let mut out = PathBuf::new();
    for _ in 0..depth {
        out.push("..");
    }
    for c in normal_components(target) {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Rewrites every absolute symbolic link below `root` into a relative one naming the same
/// path inside the root. Returns how many links were rewritten.
pub fn relink_absolute(root: &Path) -> Result<usize> {
    let mut rewritten = 0usize;
    let mut seen = 0usize;
    let mut folders = vec![PathBuf::new()];
    while let Some(rel) = folders.pop() {
        let dir = root.join(&rel);
        for entry in std::fs::read_dir(&dir).map_err(io_err("reading", &dir))? {
            let entry = entry.map_err(io_err("reading", &dir))?;
            seen += 1;
            if seen > MAX_ENTRIES {
                return Err(RootError::TooLarge { root: root.to_path_buf() });
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err("reading", &path))?;
            if kind.is_dir() {
                folders.push(rel.join(entry.file_name()));
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io_err("reading the link", &path))?;
                if target.is_absolute() {
                    let relative = relative_target(&rel, &target);
                    std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
                    std::os::unix::fs::symlink(&relative, &path).map_err(io_err("linking", &path))?;
                    rewritten += 1;
                }
            }
        }
    }
    Ok(rewritten)
}

/// The file that `path` (absolute, as seen from inside the root) names under `root`,
/// following symbolic links as if `root` were `/`: an absolute link target starts again
/// at `root`, and `..` never climbs above it. The result need not exist.
pub fn resolve(root: &Path, path: &str) -> Result<PathBuf> {
    let mut pending: VecDeque<OsString> = normal_components_raw(Path::new(path));
    let mut current: Vec<OsString> = Vec::new();
    let mut hops = 0usize;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            current.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&current);
        candidate.push(&name);
        let is_link = std::fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            current.push(name);
            continue;
        }
        hops += 1;
        if hops > MAX_LINK_HOPS {
            return Err(RootError::LinkLoop { path: path.to_string(), root: root.to_path_buf() });
        }
        let target = std::fs::read_link(&candidate).map_err(io_err("reading the link", &candidate))?;
        if target.is_absolute() {
            current.clear();
        }
        for c in normal_components_raw(&target).into_iter().rev() {
            pending.push_front(c);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&current);
    Ok(out)
}

/// `path`'s components with `..` and `.` kept (they are applied while resolving, after
/// the links before them).
fn normal_components_raw(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// The first of `paths` (absolute, inside the root) that exists there, resolved.
pub fn find_first(root: &Path, paths: &[&str]) -> Result<Option<PathBuf>> {
    for p in paths {
        let found = resolve(root, p)?;
        if found.exists() {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The names a host architecture's libraries and dynamic loader have in Debian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostAbi {
    /// The multiarch triplet (`x86_64-linux-gnu`).
    pub triplet: &'static str,
    /// The dynamic loader's file name (`ld-linux-x86-64.so.2`).
    pub loader: &'static str,
}

impl HostAbi {
    /// The ABI of the machine this program runs on, if Debian builds QEMU for it here.
    pub fn current() -> Option<HostAbi> {
        match std::env::consts::ARCH {
            "x86_64" => Some(HostAbi { triplet: "x86_64-linux-gnu", loader: "ld-linux-x86-64.so.2" }),
            "aarch64" => Some(HostAbi { triplet: "aarch64-linux-gnu", loader: "ld-linux-aarch64.so.1" }),
            _ => None,
        }
    }

    /// The dynamic loader in `root`: `lib/<triplet>` (bookworm) or `usr/lib/<triplet>`
    /// (trixie and later, merged /usr).
    pub fn loader_in(&self, root: &Path) -> Result<Option<PathBuf>> {
        let candidates = [
            format!("/lib/{}/{}", self.triplet, self.loader),
            format!("/usr/lib/{}/{}", self.triplet, self.loader),
        ];
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        find_first(root, &refs)
    }

    /// The library folders of `root` that exist, in the loader's search order.
    pub fn library_dirs_in(&self, root: &Path) -> Vec<PathBuf> {
        [format!("lib/{}", self.triplet), format!("usr/lib/{}", self.triplet)]
            .iter()
            .map(|rel| root.join(rel))
            .filter(|p| p.is_dir())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn relative_targets_climb_to_the_root() {
        assert_eq!(
            relative_target(Path::new("lib64"), Path::new("/lib/x86_64-linux-gnu/ld.so")),
            PathBuf::from("../lib/x86_64-linux-gnu/ld.so")
        );
        assert_eq!(relative_target(Path::new(""), Path::new("/usr/bin")), PathBuf::from("usr/bin"));
        assert_eq!(relative_target(Path::new("a/b"), Path::new("/x/../../y")), PathBuf::from("../../y"));
        assert_eq!(relative_target(Path::new("a"), Path::new("/")), PathBuf::from(".."));
        assert_eq!(relative_target(Path::new(""), Path::new("/")), PathBuf::from("."));
    }

    /// A tree with the link shapes packages use: absolute (libc6's loader link), relative,
    /// a link to a folder, one that climbs above the root, and a loop.
    fn tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(r.join("lib64")).unwrap();
        std::fs::create_dir_all(r.join("usr/share/qemu")).unwrap();
        std::fs::create_dir_all(r.join("usr/share/seabios")).unwrap();
        std::fs::write(r.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"), b"loader").unwrap();
        std::fs::write(r.join("usr/share/seabios/bios-256k.bin"), b"bios").unwrap();
        symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", r.join("lib64/ld-linux-x86-64.so.2")).unwrap();
        symlink("../seabios/bios-256k.bin", r.join("usr/share/qemu/bios-256k.bin")).unwrap();
        symlink("/usr/share/seabios", r.join("usr/share/qemu/seabios-dir")).unwrap();
        symlink("../../../../../../etc/passwd", r.join("usr/share/qemu/escape")).unwrap();
        symlink("loop-b", r.join("usr/share/qemu/loop-a")).unwrap();
        symlink("loop-a", r.join("usr/share/qemu/loop-b")).unwrap();
        tmp
    }

    #[test]
    fn resolve_stays_inside_the_root() {
        let tmp = tree();
        let r = tmp.path();
        let loader = resolve(r, "/lib64/ld-linux-x86-64.so.2").unwrap();
        assert_eq!(loader, r.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
        assert_eq!(std::fs::read(&loader).unwrap(), b"loader");
        assert_eq!(
            resolve(r, "/usr/share/qemu/bios-256k.bin").unwrap(),
            r.join("usr/share/seabios/bios-256k.bin")
        );
        assert_eq!(
            resolve(r, "/usr/share/qemu/seabios-dir/bios-256k.bin").unwrap(),
            r.join("usr/share/seabios/bios-256k.bin")
        );
        // `..` beyond the root stays at the root, as in a chroot.
        assert_eq!(resolve(r, "/usr/share/qemu/escape").unwrap(), r.join("etc/passwd"));
        assert!(matches!(resolve(r, "/usr/share/qemu/loop-a"), Err(RootError::LinkLoop { .. })));
        assert_eq!(resolve(r, "/no/such/file").unwrap(), r.join("no/such/file"));
        let abi = HostAbi { triplet: "x86_64-linux-gnu", loader: "ld-linux-x86-64.so.2" };
        assert_eq!(abi.loader_in(r).unwrap(), Some(loader));
        assert_eq!(abi.library_dirs_in(r), vec![r.join("lib/x86_64-linux-gnu")]);
    }

    #[test]
    fn absolute_links_are_rewritten_relative() {
        let tmp = tree();
        let r = tmp.path();
        assert_eq!(relink_absolute(r).unwrap(), 2);
        let link = r.join("lib64/ld-linux-x86-64.so.2");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        );
        // Plain file system access now lands inside the root.
        assert_eq!(std::fs::read(&link).unwrap(), b"loader");
        assert_eq!(std::fs::read(r.join("usr/share/qemu/seabios-dir/bios-256k.bin")).unwrap(), b"bios");
        // Relative links are left as they were.
        assert_eq!(
            std::fs::read_link(r.join("usr/share/qemu/bios-256k.bin")).unwrap(),
            PathBuf::from("../seabios/bios-256k.bin")
        );
        assert_eq!(relink_absolute(r).unwrap(), 0, "a second pass finds nothing to do");
    }
}

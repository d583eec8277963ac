//! A sysfs-like tree written from fuzz input into a temporary directory.
//!
//! The input is a small archive of entries, each starting on a line of its own:
//!
//! ```text
//! @@ dir kernel/iommu_groups/3/devices
//! @@ file bus/pci/devices/0000:01:00.0/config 4096
//! <4096 bytes>
//! @@ file bus/pci/devices/0000:01:00.0/numa_node
//! 0
//! @@ link bus/pci/devices/0000:01:00.0/driver ../../../bus/pci/drivers/vfio-pci
//! ```
//!
//! A file's content is the given number of bytes, or without a number everything up to
//! the next line that starts with `@@ ` (its last newline kept). Real fixtures encode
//! directly (the seeds are the QEMU guest's sysfs fixtures of `pcilibs`, written by
//! `cargo xtask fuzz --make-seeds`), and mutations keep most of the structure.
//!
//! What is written stays inside the tree, whatever the input says: path components are
//! cut down to `[A-Za-z0-9:._+-]` (no `.` or `..`), a link target is resolved against the
//! link's directory without leaving the tree and stored as an absolute path inside it (so
//! no link, followed through other links, leads out). Only regular files, directories
//! and links are made (no FIFOs or device nodes), at most [`MAX_ENTRIES`] entries of at
//! most [`MAX_FILE`] bytes each, so one input costs well under a millisecond.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

/// Most entries taken from one input.
pub const MAX_ENTRIES: usize = 96;

/// Largest file written.
pub const MAX_FILE: usize = 8192;

/// Deepest path accepted.
const MAX_DEPTH: usize = 12;

/// A temporary directory kept for the life of the process; each input rebuilds its tree
/// in it.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A scratch directory in `/dev/shm` when there is one (no disk I/O), else in the
    /// system's temporary directory.
    pub fn new() -> io::Result<Scratch> {
        let shm = Path::new("/dev/shm");
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("pcie-hotplug-fuzz");
            b
        };
        let dir = if shm.is_dir() { builder.tempdir_in(shm)? } else { builder.tempdir()? };
        Ok(Scratch { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An empty directory `name` below the scratch directory (emptied if it was there).
    pub fn fresh(&self, name: &str) -> io::Result<PathBuf> {
        let p = self.dir.path().join(name);
        match fs::remove_dir_all(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(&p)?;
        fs::canonicalize(&p)
    }
}

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A directory (parents included).
    Dir(PathBuf),
    /// A regular file with its content.
    File(PathBuf, &'a [u8]),
    /// A symbolic link and its target as written (relative to the link's directory).
    Link(PathBuf, PathBuf),
}

/// The entries of an archive; malformed headers and paths are skipped.
pub fn parse(data: &[u8]) -> Vec<Entry<'_>> {
    let mut out = Vec::new();
    let mut rest = data;
    // Text before the first header belongs to no entry.
    if !rest.starts_with(b"@@ ") {
        rest = next_header(rest).map_or(&[], |at| rest.get(at..).unwrap_or_default());
    }
    while out.len() < MAX_ENTRIES && rest.starts_with(b"@@ ") {
        let line_end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let header = String::from_utf8_lossy(rest.get(3..line_end).unwrap_or_default()).into_owned();
        let body = rest.get(line_end + 1..).unwrap_or_default();
        let mut words = header.split_whitespace();
        let (kind, path) = (words.next(), words.next().and_then(clean_path));
        let arg = words.next();
        let consumed = match (kind, path) {
            (Some("file"), Some(path)) => {
                let (content, used) = file_content(body, arg);
                out.push(Entry::File(path, content.get(..content.len().min(MAX_FILE)).unwrap_or_default()));
                used
            }
            (Some("link"), Some(path)) => {
                if let Some(target) = arg {
                    out.push(Entry::Link(path, PathBuf::from(target)));
                }
                0
            }
            (Some("dir"), Some(path)) => {
                out.push(Entry::Dir(path));
                0
            }
            _ => 0,
        };
        let after = body.get(consumed..).unwrap_or_default();
        rest = if after.starts_with(b"@@ ") {
            after
        } else {
            next_header(after).map_or(&[], |at| after.get(at..).unwrap_or_default())
        };
    }
    out
}

/// Offset of the next `@@ ` at the start of a line (after a newline).
fn next_header(data: &[u8]) -> Option<usize> {
    data.windows(4).position(|w| w == b"\n@@ ").map(|p| p + 1)
}

/// A file's content and the bytes it takes: `len` bytes when given and present (and a
/// newline after them), else up to the next header.
fn file_content<'a>(body: &'a [u8], len: Option<&str>) -> (&'a [u8], usize) {
    if let Some(n) = len.and_then(|l| l.parse::<usize>().ok()).filter(|n| *n <= body.len()) {
        let content = body.get(..n).unwrap_or_default();
        let used = if body.get(n) == Some(&b'\n') { n + 1 } else { n };
        return (content, used);
    }
    let end = next_header(body).unwrap_or(body.len());
    (body.get(..end).unwrap_or_default(), end)
}

/// A relative path of clean components, or `None`.
fn clean_path(text: &str) -> Option<PathBuf> {
    let mut p = PathBuf::new();
    for c in text.split('/').filter(|c| !c.is_empty()) {
        let ok = c != "."
            && c != ".."
            && c.len() <= 64
            && c.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, ':' | '.' | '_' | '+' | '-'));
        if !ok {
            return None;
        }
        p.push(c);
    }
    (p.components().count() > 0 && p.components().count() <= MAX_DEPTH).then_some(p)
}

/// `target` (relative, may hold `..`) resolved against `dir` (relative to the root)
/// without leaving the root; `None` when it would.
fn resolve(dir: &Path, target: &Path) -> Option<PathBuf> {
    let mut parts: Vec<String> = dir.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    for c in target.components() {
        match c {
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(n) => {
                parts.push(clean_path(&n.to_string_lossy())?.to_string_lossy().into_owned())
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (parts.len() <= MAX_DEPTH).then(|| parts.iter().collect())
}

/// Writes the entries below `root` (an empty directory, canonical); an entry that cannot
/// be made (its place taken by another kind of entry) is skipped.
pub fn write(root: &Path, entries: &[Entry<'_>]) {
    for e in entries {
        let _ = write_one(root, e);
    }
}

fn write_one(root: &Path, e: &Entry<'_>) -> io::Result<()> {
    let path = match e {
        Entry::Dir(p) | Entry::File(p, _) | Entry::Link(p, _) => p,
    };
    let parent = path.parent().unwrap_or(Path::new(""));
    let dir = root.join(parent);
    fs::create_dir_all(&dir)?;
    // Through links made earlier the directory may lie elsewhere, but only inside the tree.
    if !fs::canonicalize(&dir)?.starts_with(root) {
        return Err(io::Error::other("outside the tree"));
    }
    let full = root.join(path);
    match e {
        Entry::Dir(_) => fs::create_dir_all(&full),
        Entry::File(_, content) => {
            if fs::symlink_metadata(&full).is_ok_and(|m| !m.is_file()) {
                return Err(io::Error::other("not a regular file"));
            }
            fs::write(&full, content)
        }
        Entry::Link(_, target) => {
            let inside =
                resolve(parent, target).ok_or_else(|| io::Error::other("target outside the tree"))?;
            symlink(root.join(inside), &full)
        }
    }
}

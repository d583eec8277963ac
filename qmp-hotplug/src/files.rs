//! Opening and reading files that a caller names, without hanging and with bounded memory.
//!
//! A FIFO named where a regular file is expected blocks `open(2)` until a writer comes, a
//! character device such as `/dev/zero` never ends a read, and a socket cannot be opened
//! at all. So every file is opened with `O_NONBLOCK` (opening a FIFO then returns at
//! once), its type is read with `fstat(2)` on the descriptor just opened (no window in
//! which the path could be swapped), a type the caller did not allow ends in a
//! typed error that names its [`FileKind`], and `O_NONBLOCK` is cleared again so that the descriptor
//! behaves as usual (it may be passed on to QEMU). Reads stop one byte past a limit.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

/// What a path turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link (refused where links are not followed).
    Symlink,
    /// A FIFO (named pipe).
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device (`/dev/zero`, `/dev/iommu`, a VFIO cdev).
    CharDevice,
    /// A block device.
    BlockDevice,
    /// Anything else.
    Unknown,
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symbolic link",
            FileKind::Fifo => "FIFO",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
            FileKind::Unknown => "special file",
        })
    }
}

impl From<FileType> for FileKind {
    fn from(t: FileType) -> Self {
        match t {
            FileType::RegularFile => FileKind::Regular,
            FileType::Directory => FileKind::Directory,
            FileType::Symlink => FileKind::Symlink,
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::CharacterDevice => FileKind::CharDevice,
            FileType::BlockDevice => FileKind::BlockDevice,
            _ => FileKind::Unknown,
        }
    }
}

/// Why a file could not be opened as asked.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The path is of a kind the caller does not take.
    Kind(FileKind),
    /// The operating system refused.
    Io(io::Error),
}

/// How to open a file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    /// Open for writing too (else read-only).
    pub(crate) write: bool,
    /// Writes go to the end.
    pub(crate) append: bool,
    /// Create when absent.
    pub(crate) create: bool,
    /// Truncate to zero length after the kind check.
    pub(crate) truncate: bool,
    /// Refuse a symbolic link as the last component (`O_NOFOLLOW`).
    pub(crate) no_follow: bool,
}

impl Access {
    /// Read-only, following links.
    pub(crate) const READ: Access =
        Access { write: false, append: false, create: false, truncate: false, no_follow: false };
}

/// Opens `path` as `access` says and returns it when its kind is one of `allowed`.
pub(crate) fn open(path: &Path, access: Access, allowed: &[FileKind]) -> Result<File, OpenError> {
    let mut flags = OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    flags |= if access.write { OFlags::RDWR } else { OFlags::RDONLY };
    if access.append {
        flags |= OFlags::APPEND;
    }
    if access.create {
        flags |= OFlags::CREATE;
    }
    if access.no_follow {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = match rustix::fs::open(path, flags, Mode::from_raw_mode(0o666)) {
        Ok(fd) => fd,
        // ELOOP (a link under O_NOFOLLOW), ENXIO (a FIFO without reader opened for
        // writing), EOPNOTSUPP / ENXIO (a socket), EISDIR (a directory opened for
        // writing): say what the path is, not errno.
        Err(e) => return Err(kind_of_failed(path, access, e)),
    };
    let kind = FileKind::from(FileType::from_raw_mode(
        rustix::fs::fstat(&fd).map_err(|e| OpenError::Io(e.into()))?.st_mode,
    ));
    if !allowed.contains(&kind) {
        return Err(OpenError::Kind(kind));
    }
    let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| OpenError::Io(e.into()))?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(|e| OpenError::Io(e.into()))?;
    let file = File::from(fd);
    if access.truncate {
        file.set_len(0).map_err(OpenError::Io)?;
    }
    Ok(file)
}

/// After a failed open: a special file the caller would have refused anyway is reported
/// as such; anything else is the operating system's error.
fn kind_of_failed(path: &Path, access: Access, e: rustix::io::Errno) -> OpenError {
    let special = matches!(
        e,
        rustix::io::Errno::LOOP
            | rustix::io::Errno::NXIO
            | rustix::io::Errno::OPNOTSUPP
            | rustix::io::Errno::ISDIR
    );
    if special {
        let st = if access.no_follow { rustix::fs::lstat(path) } else { rustix::fs::stat(path) };
        if let Ok(st) = st {
            let kind = FileKind::from(FileType::from_raw_mode(st.st_mode));
            if kind != FileKind::Regular {
                return OpenError::Kind(kind);
            }
        }
    }
    OpenError::Io(e.into())
}

/// Why a bounded read did not return the whole file.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The file holds more than the limit.
    TooLarge,
    /// Reading failed.
    Io(io::Error),
}

/// Reads all of `file` when it holds at most `limit` bytes; never reads more than
/// `limit + 1` bytes (a file that grows while read, or claims a wrong size, is bounded).
pub(crate) fn read_bounded(file: &mut File, limit: u64) -> Result<Vec<u8>, ReadError> {
    let hint = file.metadata().map(|m| m.len()).unwrap_or(0).min(limit);
    let mut out = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(ReadError::Io)?;
    if u64::try_from(out.len()).unwrap_or(u64::MAX) > limit {
        return Err(ReadError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &p, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        p
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = fifo(dir.path());
        let started = std::time::Instant::now();
        for access in [
            Access::READ,
            Access { write: true, append: true, create: true, truncate: false, no_follow: true },
        ] {
            assert!(matches!(open(&p, access, &[FileKind::Regular]), Err(OpenError::Kind(FileKind::Fifo))));
        }
        assert!(matches!(
            open(Path::new("/dev/zero"), Access::READ, &[FileKind::Regular]),
            Err(OpenError::Kind(FileKind::CharDevice))
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let no_follow = Access { no_follow: true, ..Access::READ };
        assert!(matches!(
            open(&link, no_follow, &[FileKind::Regular]),
            Err(OpenError::Kind(FileKind::Symlink))
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A character device where the caller takes one, opened blocking as usual.
        let f = open(Path::new("/dev/null"), Access::READ, &[FileKind::CharDevice]).unwrap();
        let fl = rustix::fs::fcntl_getfl(&f).unwrap();
        assert!(!fl.contains(OFlags::NONBLOCK));
    }

    #[test]
    fn reads_stop_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 100]).unwrap();
        let mut f = open(&p, Access::READ, &[FileKind::Regular]).unwrap();
        assert!(matches!(read_bounded(&mut f, 99), Err(ReadError::TooLarge)));
        let mut f = open(&p, Access::READ, &[FileKind::Regular]).unwrap();
        assert_eq!(read_bounded(&mut f, 100).unwrap().len(), 100);
    }
}

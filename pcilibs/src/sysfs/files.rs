//! Bounded reads of files that must be regular files.
//!
//! Everything [`super`] reads from a sysfs tree is a small regular file: attribute text
//! (`resource`, `numa_node`, `vendor`, …) of at most a page, and `config` of at most
//! 4096 bytes. A tree that is not the kernel's can hold anything under those names: a FIFO
//! (opening it for reading blocks until a writer comes, reading it blocks for good), a
//! character device (`/dev/zero` never ends), a huge or sparse file. So a file is first
//! checked with `stat`, so that a special file is refused before it is opened at all (some
//! devices act on open), then opened with `O_NONBLOCK` (a FIFO swapped in after the check
//! cannot block the open) and checked again on the open descriptor with `fstat`, which
//! is the check that counts; and it is read up to one byte past its limit, so a larger
//! file is an error after a bounded read.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use super::{io, Result, SysfsError};

/// The kind of a file that is not a regular one, for the error.
fn kind_of(file_type: fs::FileType) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return Some("a FIFO");
        }
        if file_type.is_char_device() {
            return Some("a character device");
        }
        if file_type.is_block_device() {
            return Some("a block device");
        }
        if file_type.is_socket() {
            return Some("a socket");
        }
    }
    if file_type.is_dir() {
        return Some("a directory");
    }
    if file_type.is_file() {
        return None;
    }
    Some("not a regular file")
}

fn check_regular(path: &Path, file_type: fs::FileType) -> Result<()> {
    match kind_of(file_type) {
        None => Ok(()),
        Some(kind) => Err(SysfsError::NotRegularFile { path: path.to_path_buf(), kind }),
    }
}

/// Opens `path` for reading when it is a regular file (following symbolic links);
/// anything else is [`SysfsError::NotRegularFile`], a missing file the `NotFound` I/O
/// error (which callers of optional files look for).
fn open_regular(path: &Path) -> std::result::Result<File, OpenError> {
    let mut options = OpenOptions::new();
    options.read(true);
    open_checked(path, options)
}

/// Opens `path` with `options` (plus `O_NONBLOCK | O_NOCTTY`) when it is a regular file,
/// checked before and after the open as [`open_regular`] describes.
fn open_checked(path: &Path, mut options: OpenOptions) -> std::result::Result<File, OpenError> {
    let before = fs::metadata(path).map_err(OpenError::Io)?;
    check_regular(path, before.file_type()).map_err(OpenError::Sysfs)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO put in place after the check above must not block the open; no device
        // may become this process's controlling terminal.
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(OpenError::Io)?;
    let after = file.metadata().map_err(OpenError::Io)?;
    check_regular(path, after.file_type()).map_err(OpenError::Sysfs)?;
    Ok(file)
}

enum OpenError {
    Io(std::io::Error),
    Sysfs(SysfsError),
}

/// What to do with a file longer than the limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Longer {
    /// [`SysfsError::TooLarge`].
    Refuse,
    /// Keep the first `limit` bytes.
    Cut,
}

/// The bytes of the regular file at `path`, at most `limit` of them; see the module
/// docs. `None` when the file does not exist.
fn read_bounded(path: &Path, limit: usize, longer: Longer) -> Result<Option<Vec<u8>>> {
    let file = match open_regular(path) {
        Ok(f) => f,
        Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(OpenError::Io(e)) => return Err(io(path)(e)),
        Err(OpenError::Sysfs(e)) => return Err(e),
    };
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    file.take(cap).read_to_end(&mut buf).map_err(io(path))?;
    if buf.len() > limit {
        if longer == Longer::Refuse {
            return Err(SysfsError::TooLarge { path: path.to_path_buf(), limit });
        }
        buf.truncate(limit);
    }
    Ok(Some(buf))
}

/// The bytes of the regular file at `path` when it has at most `limit` of them: a larger
/// file is [`SysfsError::TooLarge`], a FIFO, device, socket or directory
/// [`SysfsError::NotRegularFile`]. `None` when the file does not exist.
pub(super) fn read_optional_bytes(path: &Path, limit: usize) -> Result<Option<Vec<u8>>> {
    read_bounded(path, limit, Longer::Refuse)
}

/// [`read_optional_bytes`] for text: invalid UTF-8 is [`SysfsError::BadValue`].
pub(super) fn read_optional_text(path: &Path, limit: usize) -> Result<Option<String>> {
    let Some(bytes) = read_optional_bytes(path, limit)? else { return Ok(None) };
    String::from_utf8(bytes).map(Some).map_err(|e| SysfsError::BadValue {
        path: path.to_path_buf(),
        text: String::from_utf8_lossy(e.as_bytes()).chars().take(64).collect(),
    })
}

/// The first `limit` bytes (or fewer) of the regular file at `path`, read the way this
/// module reads sysfs: a FIFO, a device, a socket or a directory is
/// [`SysfsError::NotRegularFile`], refused before it is read, so it can neither block nor
/// stream forever; a missing file is [`SysfsError::Io`]. For host files read next to
/// sysfs whose beginning tells what is needed (`/proc/cpuinfo`).
pub fn read_regular_prefix(path: &Path, limit: usize) -> Result<Vec<u8>> {
    read_bounded(path, limit, Longer::Cut)?
        .ok_or_else(|| io(path)(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")))
}

/// Writes `value` to the sysfs attribute at `path` in one `write`, as `echo value > path`
/// does. The attribute must exist and be a regular file (sysfs attributes are; a FIFO,
/// a device or a directory is [`SysfsError::NotRegularFile`], refused before it is
/// opened, so a planted FIFO cannot block the write); nothing is created. A kernel that
/// refuses the value answers the write with an error, which is [`SysfsError::Write`].
pub(super) fn write_attribute(path: &Path, value: &str) -> Result<()> {
    let failed = |source| SysfsError::Write { path: path.to_path_buf(), value: value.to_owned(), source };
    let mut options = OpenOptions::new();
    options.write(true).truncate(true);
    let mut file = match open_checked(path, options) {
        Ok(f) => f,
        Err(OpenError::Io(e)) => return Err(failed(e)),
        Err(OpenError::Sysfs(e)) => return Err(e),
    };
    // One write: the kernel takes an attribute's value from a single write call.
    let written = file.write(value.as_bytes()).map_err(failed)?;
    if written != value.len() {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("{written} of {} bytes written", value.len()),
        )));
    }
    Ok(())
}

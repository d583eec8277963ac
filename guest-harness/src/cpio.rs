//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as initramfs.
//!
//! Entries carry fixed owner (root), a zero modification time and increasing inode
//! numbers, so the same input gives the same bytes.

use std::io::{self, Write};

/// Mode bits of a directory.
pub const S_IFDIR: u32 = 0o040000;
/// Mode bits of a regular file.
pub const S_IFREG: u32 = 0o100000;
/// Mode bits of a symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Mode bits of a character device.
pub const S_IFCHR: u32 = 0o020000;

/// Writes a `newc` archive entry by entry; [`CpioWriter::finish`] writes the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

/// One archive entry's header fields that vary.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// A writer that appends to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter { out, next_ino: 1, written: 0 }
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        // `pad` is 0..=3: the slice always fits.
        self.put([0u8; 3].get(..pad).unwrap_or_default())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn header(&mut self, h: &Header<'_>) -> io::Result<()> {
        let name = h.name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name.split('/').any(|c| c == "..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad archive path {:?}", h.name),
            ));
        }
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "archive path too long"))?;
        let fields = [ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize, 0];
        let mut text = String::with_capacity(110);
        text.push_str("070701");
        for f in fields {
            text.push_str(&format!("{f:08x}"));
        }
        self.put(text.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// A directory (parents must come first, as with `cpio` itself).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.header(&Header { name: path, mode: S_IFDIR | (perm & 0o7777), nlink: 2, size: 0, rdev: (0, 0) })
    }

    /// A regular file with `data` as contents.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        self.header(&Header { name: path, mode: S_IFREG | (perm & 0o7777), nlink: 1, size, rdev: (0, 0) })?;
        self.put(data)?;
        self.pad()
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let size = u32::try_from(target.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "link target too long"))?;
        self.header(&Header { name: path, mode: S_IFLNK | 0o777, nlink: 1, size, rdev: (0, 0) })?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(&Header {
            name: path,
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer entry and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(&Header { name: "TRAILER!!!", mode: 0, nlink: 1, size: 0, rdev: (0, 0) })?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("/etc-odd", 0o644, b"x").unwrap();
        w.symlink("bin/sh", "hello").unwrap();
        w.char_device("console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn entries_are_aligned_and_end_with_trailer() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let trailer = bytes.windows(10).position(|w| w == b"TRAILER!!!").unwrap();
        assert!(trailer > bytes.len() - 16);
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("../x", 0o644, b"").is_err());
        assert!(w.dir("", 0o755).is_err());
    }
}

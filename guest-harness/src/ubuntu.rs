//! Ubuntu's kernel, for the outer guest of a `vfio_backend = "iommufd"` scenario.
//!
//! The iommufd path needs a guest kernel with `CONFIG_IOMMUFD` and
//! `CONFIG_VFIO_DEVICE_CDEV`. Debian builds none of its kernels with `CONFIG_IOMMUFD`
//! (bookworm 6.1, bookworm-backports 6.12, trixie 6.12, trixie-backports 7.3 all have it
//! unset), so the outer guest boots Ubuntu's generic kernel (24.04, `noble-updates`:
//! `IOMMUFD=m`, `VFIO_DEVICE_CDEV=y`). The Ubuntu archive key comes from Debian's own
//! `ubuntu-keyring` package (trixie), so every download is verified by a key apt already
//! trusts. Each repository is used through its own [`AptSource`]: the host's apt set-up
//! stays untouched.

use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::debs::{AptSource, DebCache, DebError, Resolve, Unpacked};
use crate::kernels::GuestKernel;

/// A piece could not be provisioned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UbuntuError {
    /// Apt could not resolve, download or unpack a package.
    #[error(transparent)]
    Deb(#[from] DebError),
    /// An unpacked package lacks a file it should hold.
    #[error("{what} is missing from {}", dir.display())]
    Missing {
        /// The file looked for.
        what: String,
        /// The unpacked package.
        dir: PathBuf,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, UbuntuError>;

/// The keyring Debian's own sources are checked with.
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Debian trixie, for `ubuntu-keyring` only.
pub fn keyring_source() -> AptSource {
    AptSource {
        name: "trixie-keyring",
        lines: format!(
            "deb [arch=amd64 signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian trixie main\n"
        ),
        preferences: String::new(),
    }
}

/// Ubuntu 24.04 updates, checked with `keyring`.
pub fn ubuntu(keyring: &Path) -> AptSource {
    AptSource {
        name: "ubuntu-noble",
        lines: format!(
            "deb [arch=amd64 signed-by={}] http://archive.ubuntu.com/ubuntu noble-updates main\n",
            keyring.display()
        ),
        preferences: String::new(),
    }
}

fn file_in(unpacked: &Unpacked, rel: &str) -> Result<PathBuf> {
    let path = unpacked.dir.join(rel);
    if path.exists() {
        Ok(path)
    } else {
        Err(UbuntuError::Missing { what: rel.to_string(), dir: unpacked.dir.clone() })
    }
}

/// Ubuntu's archive keyring, from Debian's `ubuntu-keyring` package.
pub fn ubuntu_keyring(cache: &DebCache) -> Result<PathBuf> {
    let unpacked =
        cache.with_source(keyring_source()).ensure("ubuntu-keyring", Arch::X86_64, Resolve::Direct)?;
    file_in(&unpacked, "usr/share/keyrings/ubuntu-archive-keyring.gpg")
}

/// Ubuntu's generic x86_64 kernel: the image from `linux-image-<release>` (resolved from
/// `linux-image-generic`), the configuration and modules from `linux-modules-<release>`.
pub fn ubuntu_kernel(cache: &DebCache) -> Result<GuestKernel> {
    let ubuntu = cache.with_source(ubuntu(&ubuntu_keyring(cache)?));
    let image_pkg =
        ubuntu.ensure("linux-image-generic", Arch::X86_64, Resolve::MetaDependency("linux-image-"))?;
    let release = image_pkg.package.trim_start_matches("linux-image-").to_string();
    let modules_pkg = ubuntu.ensure(&format!("linux-modules-{release}"), Arch::X86_64, Resolve::Direct)?;
    Ok(GuestKernel {
        arch: Arch::X86_64,
        image: file_in(&image_pkg, &format!("boot/vmlinuz-{release}"))?,
        config: file_in(&modules_pkg, &format!("boot/config-{release}"))?,
        modules_dir: file_in(&modules_pkg, &format!("lib/modules/{release}"))?,
        release,
        package: image_pkg.package,
        version: image_pkg.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_amd64_and_signed() {
        let key = Path::new("/k/ubuntu.gpg");
        for src in [keyring_source(), ubuntu(key)] {
            assert!(src.lines.contains("[arch=amd64 signed-by=/"), "{}", src.lines);
            assert_eq!(src.lines.lines().count(), 1);
        }
        assert!(ubuntu(key).lines.contains("signed-by=/k/ubuntu.gpg"));
        let names = [keyring_source().name, ubuntu(key).name];
        assert!(names.iter().all(|n| !n.contains('/')), "{names:?}");
    }
}

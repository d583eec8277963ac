//! Host packages the guest runs need: QEMU for three architectures, firmware, pciutils.
//!
//! Checks files first, so a provisioned machine returns at once; installs with apt only
//! what is missing. Debian bookworm machines may carry `qemu-utils` from backports, which
//! breaks `qemu-system-common` from bookworm; the install therefore pins `qemu-utils` to
//! the release's own version (a downgrade that apt must be allowed to make).

use std::path::Path;
use std::process::Command;

use crate::command::{self, CommandError, FixCommand};

/// A file on the host and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct HostRequirement {
    /// The file whose presence shows the package is installed.
    pub path: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
}

/// Everything the project's guest runs and QEMU-based tests use.
pub const HOST_REQUIREMENTS: &[HostRequirement] = &[
    HostRequirement { path: "/usr/bin/qemu-system-x86_64", package: "qemu-system-x86" },
    HostRequirement { path: "/usr/bin/qemu-system-aarch64", package: "qemu-system-arm" },
    HostRequirement { path: "/usr/bin/qemu-system-s390x", package: "qemu-system-misc" },
    HostRequirement { path: "/usr/share/qemu/s390-ccw.img", package: "qemu-system-misc" },
    HostRequirement { path: "/usr/share/ovmf/OVMF.fd", package: "ovmf" },
    HostRequirement { path: "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd", package: "qemu-efi-aarch64" },
    HostRequirement { path: "/usr/lib/ipxe/qemu/efi-virtio.rom", package: "ipxe-qemu" },
    HostRequirement { path: "/usr/bin/busybox", package: "busybox-static" },
    HostRequirement { path: "/usr/bin/lspci", package: "pciutils" },
    HostRequirement { path: "/usr/bin/qemu-img", package: "qemu-utils" },
    HostRequirement { path: "/usr/bin/dpkg-deb", package: "dpkg" },
    HostRequirement { path: "/usr/bin/apt-get", package: "apt" },
];

/// Host provisioning failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// Packages are missing and this process cannot install them (not root).
    #[error("missing host packages: {}; install them as root with:\n{fix}", packages.join(" "))]
    NotRoot {
        /// The missing packages.
        packages: Vec<String>,
        /// The command that installs them.
        fix: FixCommand,
    },
    /// apt ran and failed (offline, broken sources, conflicts).
    #[error("installing {} failed: {source}\nto fix, run as root:\n{fix}", packages.join(" "))]
    Apt {
        /// The packages that were being installed.
        packages: Vec<String>,
        /// The apt failure.
        source: CommandError,
        /// The command that would install them.
        fix: FixCommand,
    },
    /// apt succeeded but files are still missing.
    #[error("after installing, still missing: {}", paths.join(", "))]
    StillMissing {
        /// The files that are still absent.
        paths: Vec<String>,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ProvisionError>;

/// What [`ensure_host_packages`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostPackages {
    /// Everything was present; nothing ran.
    Present,
    /// These packages were installed.
    Installed(Vec<String>),
}

/// The packages whose files are missing, each once, in requirement order.
pub fn missing_packages(requirements: &[HostRequirement]) -> Vec<String> {
    let mut missing: Vec<String> = Vec::new();
    for req in requirements {
        if !Path::new(req.path).exists() && !missing.iter().any(|p| p == req.package) {
            missing.push(req.package.to_string());
        }
    }
    missing
}

/// The release codename from `/etc/os-release` (`bookworm`), if there is one.
pub fn release_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The apt-get arguments that install `packages`.
///
/// Whenever a QEMU system package is installed, `qemu-utils` is pinned to the release
/// (`qemu-utils/bookworm`): a newer `qemu-utils` from backports declares Breaks on the
/// release's `qemu-system-common`, and apt would otherwise refuse the whole install.
pub fn apt_install_args(packages: &[String], codename: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["install", "-y", "--allow-downgrades"].map(String::from).to_vec();
    let needs_pin = packages.iter().any(|p| p.starts_with("qemu-system") || p == "qemu-utils");
    for p in packages {
        if p == "qemu-utils" && needs_pin && codename.is_some() {
            continue;
        }
        args.push(p.clone());
    }
    if let (true, Some(codename)) = (needs_pin, codename) {
        args.push(format!("qemu-utils/{codename}"));
    }
    args
}

fn fix_command(packages: &[String], codename: Option<&str>) -> FixCommand {
    let install = apt_install_args(packages, codename).join(" ");
    FixCommand(format!("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get {install}"))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Installs the host packages the guest runs need, when some are missing.
///
/// Returns at once when every file of [`HOST_REQUIREMENTS`] exists. Otherwise, as root,
/// runs `apt-get update` and installs the missing packages; not as root, or when apt
/// fails, the error carries the exact command that fixes it.
pub fn ensure_host_packages() -> Result<HostPackages> {
    let packages = missing_packages(HOST_REQUIREMENTS);
    if packages.is_empty() {
        return Ok(HostPackages::Present);
    }
    let codename = release_codename();
    let fix = fix_command(&packages, codename.as_deref());
    if !is_root() {
        return Err(ProvisionError::NotRoot { packages, fix });
    }
    eprintln!("provision: installing {}", packages.join(" "));
    let apt = |args: &[String]| {
        command::run_visible(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let result =
        apt(&["update".to_string()]).and_then(|()| apt(&apt_install_args(&packages, codename.as_deref())));
    if let Err(source) = result {
        return Err(ProvisionError::Apt { packages, source, fix });
    }
    let still: Vec<String> = HOST_REQUIREMENTS
        .iter()
        .filter(|r| !Path::new(r.path).exists())
        .map(|r| r.path.to_string())
        .collect();
    if still.is_empty() {
        Ok(HostPackages::Installed(packages))
    } else {
        Err(ProvisionError::StillMissing { paths: still })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_install_pins_qemu_utils_to_the_release() {
        let args = apt_install_args(&["qemu-system-x86".into(), "qemu-utils".into()], Some("bookworm"));
        assert!(args.contains(&"--allow-downgrades".to_string()));
        assert!(args.contains(&"qemu-system-x86".to_string()));
        assert!(args.contains(&"qemu-utils/bookworm".to_string()));
        assert!(!args.contains(&"qemu-utils".to_string()));
    }

    #[test]
    fn other_packages_are_not_pinned() {
        let args = apt_install_args(&["pciutils".into()], Some("bookworm"));
        assert_eq!(args.last().unwrap(), "pciutils");
        assert!(!args.iter().any(|a| a.starts_with("qemu-utils")));
    }

    #[test]
    fn missing_packages_are_listed_once() {
        let reqs = [
            HostRequirement { path: "/nonexistent/a", package: "p1" },
            HostRequirement { path: "/nonexistent/b", package: "p1" },
            HostRequirement { path: "/", package: "present" },
        ];
        assert_eq!(missing_packages(&reqs), vec!["p1".to_string()]);
    }

    #[test]
    fn fix_command_is_a_complete_line() {
        let fix = fix_command(&["qemu-system-arm".into()], Some("bookworm"));
        assert!(fix.0.starts_with("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y"));
        assert!(fix.0.ends_with("qemu-system-arm qemu-utils/bookworm"));
    }
}

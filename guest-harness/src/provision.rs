//! Provisioning a stack into the cache: its root (QEMU for the three guest architectures,
//! SeaBIOS, OVMF, AAVMF, iPXE ROMs, busybox, pciutils, with their libraries) and the
//! guest kernel and busybox of each architecture. Nothing is installed on the host: the
//! host's package list is the same before and after.
//!
//! The root is needed by every guest, so a failure there fails the whole run. A guest
//! architecture's kernel or busybox failing (the archive answering 404 for an s390x
//! kernel) is reported with what to do and fails only that architecture's guests.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::arch::Arch;
use crate::guest::{GuestAssets, GuestError};
use crate::stacks::{Stack, StackError, StackRoot};

/// Host programs provisioning uses (Debian's own tools, present on every Debian system),
/// with the package that has them.
pub const HOST_TOOLS: [(&str, &str); 4] =
    [("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg"), ("xz", "xz-utils")];

/// A host program provisioning needs is missing (it installs nothing itself).
#[derive(Debug, thiserror::Error)]
#[error("`{program}` is missing on this host (Debian package {package}); provisioning uses it and installs nothing on the host")]
pub struct MissingTool {
    /// The program.
    pub program: &'static str,
    /// The Debian package that has it.
    pub package: &'static str,
}

/// Checks that every [`HOST_TOOLS`] program runs.
pub fn check_host_tools() -> Result<(), MissingTool> {
    for (program, package) in HOST_TOOLS {
        let runs = Command::new(program)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok();
        if !runs {
            return Err(MissingTool { program, package });
        }
    }
    Ok(())
}

/// What provisioning one stack gave.
#[derive(Debug)]
#[non_exhaustive]
pub struct Provisioned {
    /// The stack's root.
    pub root: StackRoot,
    /// Per guest architecture: its assets, or why they could not be provisioned.
    pub arches: Vec<(Arch, Result<GuestAssets, GuestError>)>,
    /// How long it took.
    pub took: Duration,
}

impl Provisioned {
    /// The architectures that failed, with their errors.
    pub fn failed(&self) -> Vec<(Arch, String)> {
        self.arches.iter().filter_map(|(a, r)| r.as_ref().err().map(|e| (*a, e.to_string()))).collect()
    }

    /// One line per piece: the root's versions, then each architecture's kernel.
    pub fn summary(&self) -> Vec<String> {
        let v = self.root.versions();
        let mut out = vec![format!(
            "stack {}: QEMU {}, SeaBIOS {}, OVMF {}, AAVMF {} ({} packages in {})",
            v.stack,
            v.qemu,
            v.seabios,
            v.ovmf,
            v.aavmf,
            self.root.packages.len(),
            self.root.root.display()
        )];
        for (arch, r) in &self.arches {
            out.push(match r {
                Ok(a) => format!(
                    "stack {}: {arch}: kernel {} ({} {})",
                    v.stack, a.kernel.release, a.kernel.package, a.kernel.version
                ),
                Err(e) => format!("stack {}: {arch}: FAILED: {e}", v.stack),
            });
        }
        out
    }
}

/// Provisions `stack`'s root (fetching its package lists again first when `update`) and
/// the guest assets of `arches`. Fails only when the root fails; per-architecture
/// failures are in [`Provisioned::arches`].
pub fn provision(stack: &Stack, arches: &[Arch], update: bool) -> Result<Provisioned, StackError> {
    let begun = Instant::now();
    let root = if update { stack.update()? } else { stack.root()? };
    let arches = arches.iter().map(|&arch| (arch, GuestAssets::ensure(stack, arch))).collect();
    Ok(Provisioned { root, arches, took: begun.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tools_are_found() {
        check_host_tools().unwrap();
        let e = MissingTool { program: "dpkg-deb", package: "dpkg" }.to_string();
        assert!(e.contains("installs nothing"), "{e}");
    }
}

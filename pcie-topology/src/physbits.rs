//! The host's physical address width: how far a guest's address space may reach.
//!
//! With KVM the guest cannot address more than the host CPU (x86_64: CPUID leaf
//! 0x80000008 as KVM reports it; aarch64: the VM's IPA limit). The KVM query is a few
//! ioctls (`kvm-ioctls`) behind the `kvm` feature, off by default: without it, or without
//! /dev/kvm, the `address sizes` line of /proc/cpuinfo is used, which is the host CPU's
//! width (KVM may report less, e.g. with memory encryption, and on aarch64 its IPA
//! limit is the better answer).

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where a width came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PhysBitsSource {
    /// KVM (`KVM_GET_SUPPORTED_CPUID` leaf 0x80000008, or `KVM_CAP_ARM_VM_IPA_SIZE`).
    Kvm,
    /// `/proc/cpuinfo`'s `address sizes` line.
    CpuInfo,
}

/// A host physical address width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostPhysBits {
    /// Bits.
    pub bits: u8,
    /// Where they came from.
    pub source: PhysBitsSource,
}

/// Errors finding the width.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PhysBitsError {
    /// Neither KVM nor /proc/cpuinfo told it.
    #[error("host physical address width unknown: no usable /dev/kvm and no `address sizes` in {0}")]
    Unknown(String),
}

/// Reads the `N bits physical` of the first `address sizes` line.
pub(crate) fn parse_cpuinfo(text: &str) -> Option<u8> {
    text.lines()
        .filter(|l| l.starts_with("address sizes"))
        .find_map(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
}

/// The width KVM reports, or `None` where /dev/kvm is missing or the query fails.
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
fn kvm_phys_bits() -> Option<u8> {
    // KVM_MAX_CPUID_ENTRIES in the kernel ABI.
    const MAX_CPUID_ENTRIES: usize = 80;
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let cpuid = kvm.get_supported_cpuid(MAX_CPUID_ENTRIES).ok()?;
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|b| *b > 0)
}

/// The width KVM reports, or `None` where /dev/kvm is missing or the query fails.
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "aarch64"))]
fn kvm_phys_bits() -> Option<u8> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    u8::try_from(kvm.get_host_ipa_limit()).ok().filter(|b| *b > 0)
}

/// No KVM query: built without the `kvm` feature, or on a host KVM does not serve here.
#[cfg(not(all(feature = "kvm", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
fn kvm_phys_bits() -> Option<u8> {
    None
}

/// KVM's answer (with the `kvm` feature), else /proc/cpuinfo's.
pub fn host_phys_bits() -> Result<HostPhysBits, PhysBitsError> {
    host_phys_bits_with(kvm_phys_bits, Path::new("/proc/cpuinfo"))
}

/// How much of `/proc/cpuinfo` is read for the `address sizes` line.
const CPUINFO_PREFIX: usize = 64 << 10;

/// [`host_phys_bits`] with the KVM query and the cpuinfo path supplied (for tests and for
/// hosts where /proc is elsewhere).
pub fn host_phys_bits_with(
    kvm: impl Fn() -> Option<u8>,
    cpuinfo: &Path,
) -> Result<HostPhysBits, PhysBitsError> {
    if let Some(bits) = kvm() {
        return Ok(HostPhysBits { bits, source: PhysBitsSource::Kvm });
    }
    // The first processor's block has the line; the file of a large host is megabytes. A
    // FIFO or device in its place is refused, not read.
    pcilibs::sysfs::read_regular_prefix(cpuinfo, CPUINFO_PREFIX)
        .ok()
        .and_then(|bytes| parse_cpuinfo(&String::from_utf8_lossy(&bytes)))
        .map(|bits| HostPhysBits { bits, source: PhysBitsSource::CpuInfo })
        .ok_or_else(|| PhysBitsError::Unknown(cpuinfo.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_sizes() {
        let t = "processor\t: 0\naddress sizes\t: 46 bits physical, 48 bits virtual\n";
        assert_eq!(parse_cpuinfo(t), Some(46));
        assert_eq!(parse_cpuinfo("flags: x"), None);
    }

    #[test]
    fn falls_back_to_cpuinfo() {
        let dir = std::env::temp_dir().join(format!("physbits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cpuinfo");
        std::fs::write(&f, "address sizes : 39 bits physical, 48 bits virtual\n").unwrap();
        let got = host_phys_bits_with(|| None, &f).unwrap();
        assert_eq!(got, HostPhysBits { bits: 39, source: PhysBitsSource::CpuInfo });
        let kvm = host_phys_bits_with(|| Some(52), &f).unwrap();
        assert_eq!(kvm.source, PhysBitsSource::Kvm);
        assert!(host_phys_bits_with(|| None, &dir.join("missing")).is_err());
        // A FIFO or a device in its place is not read (a FIFO would block for good).
        assert!(host_phys_bits_with(|| None, Path::new("/dev/zero")).is_err());
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(host_phys_bits_with(|| None, &fifo).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_host_has_a_width() {
        // Every Linux host this project runs on has either /dev/kvm or an x86 cpuinfo line.
        let got = host_phys_bits().expect("host width");
        assert!((32..=57).contains(&got.bits), "{got:?}");
    }
}

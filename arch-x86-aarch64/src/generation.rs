//! Firmware generations: which placement rule the guest's firmware follows, read from
//! the firmware image (or from the QEMU version, or named by the caller).
//!
//! The rule that decides whether a reservation really holds a device differs between
//! firmware releases, not just between firmware kinds:
//!
//! | generation | what the firmware does | measured |
//! |---|---|---|
//! | [`FirmwareGeneration::SeaBiosAfterRam`] (SeaBIOS ≤ 1.16.2) | 64-bit region right after RAM; an empty port's window is only 2 MiB-aligned | QEMU 7.2 + SeaBIOS 1.16.2: a 128 GiB window at 4 GiB cannot take a 128 GiB BAR |
//! | [`FirmwareGeneration::SeaBiosEndOfSpace`] (SeaBIOS 1.16.3) | region at the end of `1 << phys-bits` (at most 46 bits); with RAM above 4 GiB every hotplug window is padded to `top >> 11` | QEMU 10.0 + SeaBIOS 1.16.3: the windows land where the planner lays them out (one H100: 129 GiB, several: 192 GiB each, every BAR assigned) |
//! | [`FirmwareGeneration::SeaBiosEndOfSpaceCapped`] (SeaBIOS ≥ 1.17.0) | the same, width capped at 44 bits below 1 TiB of RAM above 4 GiB; `opt/org.seabios/pci64` switches padding | QEMU 11.1 + SeaBIOS 1.17.0: a 128 GiB reservation holds a 128 GiB BAR at `0xfe0_0000_0000` |
//! | [`FirmwareGeneration::OvmfFixedAperture`] (edk2 before 2022.11) | fixed aperture after RAM, power-of-two windows | (not in Debian any more) |
//! | [`FirmwareGeneration::OvmfPhysBitsAperture`] (edk2 2022.11 and later) | the aperture becomes the top eighth of the address space from 40 trusted bits on | Debian's 2022.11 (which already has it, so the boundary is at or before 2022.11), 2025.02 and 2026.08: every mix of the reservation table assigned at 2.00× |
//! | [`FirmwareGeneration::Aavmf`] | Linux reassigns every window under ACPI | Debian's 6.1 guest on AAVMF 2022.11 |
//! | [`FirmwareGeneration::LinuxAssigned`] | no firmware: the guest kernel assigns windows | aarch64 `virt` with `-kernel` |
//!
//! The SeaBIOS facts come from `src/fw/pciinit.c` ("move 64bit pci window to end of
//! address space", in 1.16.3; "limit address space used for pci devices", "pciinit:
//! don't misalign large BARs" and "update pci_pad_mem64 handling", in 1.17.0); the edk2
//! ones from `OvmfPkg/Library/PlatformInitLib/MemDetect.c` (`PlatformDynamicMmioWindow`).

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;

use thiserror::Error;

/// Firmware kind, as read from an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FirmwareKind {
    /// SeaBIOS (`bios-256k.bin`, `bios.bin`).
    SeaBios,
    /// OVMF: edk2 for x86_64 (`OVMF.fd`, `OVMF_CODE*.fd`).
    Ovmf,
    /// AAVMF: edk2 for aarch64 `virt` (`AAVMF_CODE.fd`, `QEMU_EFI.fd`).
    Aavmf,
}

/// A release number: `1.16.3`, edk2's `2025.02` (patch 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Release {
    /// First number.
    pub major: u32,
    /// Second number.
    pub minor: u32,
    /// Third number (0 when absent).
    pub patch: u32,
}

impl Release {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Release { major, minor, patch }
    }

    /// Reads the leading `A.B[.C]` of `text` (`1.16.3-debian-1.16.3-2`, `2025.02-8`,
    /// `rel-1.17.0-0-g…`, `10.0.2+ds-1`, `1:10.0.2+ds-1`).
    pub fn parse_prefix(text: &str) -> Option<Release> {
        let text = text.strip_prefix("rel-").unwrap_or(text);
        let text = text.split_once(':').map_or(text, |(epoch, rest)| {
            if epoch.chars().all(|c| c.is_ascii_digit()) {
                rest
            } else {
                text
            }
        });
        let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
        let mut parts = text[..end].split('.').filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        Some(Release { major, minor, patch })
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.major, self.minor)?;
        if self.major < 2000 {
            // SeaBIOS and QEMU write three numbers without padding.
            return write!(f, ".{}", self.patch).map(|_| ());
        }
        Ok(())
    }
}

/// The placement rule a VM's firmware follows (see the module docs for each one's facts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FirmwareGeneration {
    /// SeaBIOS up to 1.16.2: the 64-bit region grows after RAM and an empty port's
    /// window is only 2 MiB-aligned, so a reservation carries its largest BAR's
    /// alignment as slack.
    SeaBiosAfterRam,
    /// SeaBIOS 1.16.3: the 64-bit region ends at the top of the guest's address space
    /// (phys-bits, at most 46); hotplug windows are padded when there is RAM above 4 GiB.
    SeaBiosEndOfSpace,
    /// SeaBIOS 1.17.0 and later: as 1.16.3, with the width capped at 44 bits unless the
    /// RAM above 4 GiB reaches 1 TiB.
    SeaBiosEndOfSpaceCapped,
    /// OVMF before edk2 2022.11: a fixed-size aperture after RAM.
    OvmfFixedAperture,
    /// OVMF from edk2 2022.11 on: the aperture is the top eighth of the address space
    /// when the guest's width is trusted (40 bits and more with 1 GiB pages).
    OvmfPhysBitsAperture,
    /// AAVMF: the Linux guest reassigns every bridge window (ACPI), so the guest
    /// kernel's rule applies.
    Aavmf,
    /// No firmware: the guest kernel assigns every window.
    LinuxAssigned,
}

impl FirmwareGeneration {
    /// The generation of SeaBIOS `release`.
    pub fn of_seabios(release: Release) -> Self {
        if release >= Release::new(1, 17, 0) {
            FirmwareGeneration::SeaBiosEndOfSpaceCapped
        } else if release >= Release::new(1, 16, 3) {
            FirmwareGeneration::SeaBiosEndOfSpace
        } else {
            FirmwareGeneration::SeaBiosAfterRam
        }
    }

    /// The generation of OVMF from edk2 `release` (`2022.11`).
    pub fn of_ovmf(release: Release) -> Self {
        if release >= Release::new(2022, 11, 0) {
            FirmwareGeneration::OvmfPhysBitsAperture
        } else {
            FirmwareGeneration::OvmfFixedAperture
        }
    }

    /// The SeaBIOS generation QEMU `qemu` ships in its own `roms/` (`bios-256k.bin` of
    /// an upstream build): 1.16.3 from QEMU 8.2 on, 1.17.0 from QEMU 10.1 on.
    /// Distributions often package SeaBIOS on its own: read the image where it can be
    /// read ([`detect_firmware`]).
    pub fn seabios_of_qemu(qemu: Release) -> Self {
        if qemu >= Release::new(10, 1, 0) {
            FirmwareGeneration::SeaBiosEndOfSpaceCapped
        } else if qemu >= Release::new(8, 2, 0) {
            FirmwareGeneration::SeaBiosEndOfSpace
        } else {
            FirmwareGeneration::SeaBiosAfterRam
        }
    }

    /// Short name (`seabios-after-ram`, …).
    pub fn name(self) -> &'static str {
        match self {
            FirmwareGeneration::SeaBiosAfterRam => "seabios-after-ram",
            FirmwareGeneration::SeaBiosEndOfSpace => "seabios-end-of-space",
            FirmwareGeneration::SeaBiosEndOfSpaceCapped => "seabios-end-of-space-44",
            FirmwareGeneration::OvmfFixedAperture => "ovmf-fixed-aperture",
            FirmwareGeneration::OvmfPhysBitsAperture => "ovmf-phys-bits-aperture",
            FirmwareGeneration::Aavmf => "aavmf",
            FirmwareGeneration::LinuxAssigned => "linux-assigned",
        }
    }

    /// Whether this is a SeaBIOS generation.
    pub fn is_seabios(self) -> bool {
        matches!(
            self,
            FirmwareGeneration::SeaBiosAfterRam
                | FirmwareGeneration::SeaBiosEndOfSpace
                | FirmwareGeneration::SeaBiosEndOfSpaceCapped
        )
    }
}

impl fmt::Display for FirmwareGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an image says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DetectedFirmware {
    /// Firmware kind.
    pub kind: FirmwareKind,
    /// The version string found in the image (`1.16.3-debian-1.16.3-2`, `2025.02-8+deb13u1`).
    pub version_string: Option<String>,
    /// Its release number.
    pub release: Option<Release>,
    /// The generation: from the release, or for an image without a version string the
    /// one whose plans hold on every release of that kind (see [`detect_firmware`]).
    pub generation: FirmwareGeneration,
}

/// Why an image could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DetectError {
    /// The image could not be read.
    #[error("cannot read firmware image {path}: {source}")]
    Read {
        /// The image.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The image is larger than any firmware image.
    #[error("firmware image {path} is larger than {limit} bytes")]
    TooLarge {
        /// The image.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// Neither SeaBIOS nor edk2.
    #[error("{0} is neither a SeaBIOS nor an edk2 (OVMF, AAVMF) image")]
    Unknown(String),
}

/// Largest image read (AAVMF code images are 64 MiB).
pub const MAX_IMAGE: u64 = 128 << 20;
/// Largest decompressed firmware volume (OVMF's DXE volume is about 16 MiB).
const MAX_VOLUME: usize = 64 << 20;

/// Reads the firmware image at `path` and tells its kind, version and generation.
///
/// SeaBIOS keeps its version as a plain string next to `SeaBIOS (version %s)`. AAVMF
/// keeps its edk2 release in the build paths of its uncompressed modules
/// (`edk2-2025.02/Build/ArmVirtQemu-…`) and Debian's its package version as a UTF-16
/// firmware version string; OVMF keeps both inside an LZMA-compressed firmware volume,
/// which is unpacked (at most 64 MiB). An edk2 image without any version (Debian 12's
/// OVMF has none) is [`FirmwareGeneration::OvmfPhysBitsAperture`]: its plans hold on
/// older OVMF too, which places the same aperture lower.
pub fn detect_firmware(path: &Path) -> Result<DetectedFirmware, DetectError> {
    let shown = path.display().to_string();
    let file =
        std::fs::File::open(path).map_err(|source| DetectError::Read { path: shown.clone(), source })?;
    let mut bytes = Vec::new();
    file.take(MAX_IMAGE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| DetectError::Read { path: shown.clone(), source })?;
    if bytes.len() as u64 > MAX_IMAGE {
        return Err(DetectError::TooLarge { path: shown, limit: MAX_IMAGE });
    }
    detect_firmware_bytes(&bytes).ok_or(DetectError::Unknown(shown))
}

/// [`detect_firmware`] on an image in memory; `None` when it is neither SeaBIOS nor edk2.
pub fn detect_firmware_bytes(image: &[u8]) -> Option<DetectedFirmware> {
    if contains(image, b"SeaBIOS (version") {
        let version = ascii_strings(image, 5).find(|s| seabios_version(s).is_some());
        let release = version.as_deref().and_then(seabios_version);
        let generation = release.map_or(FirmwareGeneration::SeaBiosAfterRam, FirmwareGeneration::of_seabios);
        return Some(DetectedFirmware {
            kind: FirmwareKind::SeaBios,
            version_string: version,
            release,
            generation,
        });
    }
    if !contains(image, b"_FVH") {
        return None;
    }
    let aarch64 = contains(image, b"ArmVirtQemu") || contains(image, b"ArmVirtPkg");
    // The image itself first (AAVMF's modules are not compressed), then OVMF's
    // LZMA-compressed volumes.
    let mut found = edk2_release_in(image);
    if found.is_none() {
        found = lzma_volumes(image).iter().find_map(|v| edk2_release_in(v));
    }
    let (version, release) = match found {
        Some((v, r)) => (Some(v), Some(r)),
        None => (None, None),
    };
    let (kind, generation) = if aarch64 {
        (FirmwareKind::Aavmf, FirmwareGeneration::Aavmf)
    } else {
        let g = release.map_or(FirmwareGeneration::OvmfPhysBitsAperture, FirmwareGeneration::of_ovmf);
        (FirmwareKind::Ovmf, g)
    };
    Some(DetectedFirmware { kind, version_string: version, release, generation })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// An edk2 release in `data`: Debian's firmware version string (UTF-16, it names the
/// patch level), else the release in a module's build path.
fn edk2_release_in(data: &[u8]) -> Option<(String, Release)> {
    // "20" in UTF-16LE starts every version of this century.
    for at in memchr::memmem::find_iter(data, b"2\x000\x00") {
        let starts_string =
            at < 2 || data.get(at - 1) != Some(&0) || !data.get(at - 2).is_some_and(u8::is_ascii_graphic);
        if !starts_string {
            continue;
        }
        let text: String = data
            .get(at..)
            .unwrap_or_default()
            .chunks_exact(2)
            .take(40)
            .map_while(|pair| match pair {
                [c @ 0x21..=0x7e, 0] => Some(char::from(*c)),
                _ => None,
            })
            .collect();
        if let Some(r) = edk2_version(&text) {
            return Some((text, r));
        }
    }
    for at in memchr::memmem::find_iter(data, b"edk2-") {
        let tail = data.get(at..).unwrap_or_default();
        let end = tail.iter().take(40).position(|b| !b.is_ascii_graphic()).unwrap_or(tail.len().min(40));
        let text = String::from_utf8_lossy(tail.get(..end).unwrap_or_default());
        if let Some(r) = build_path_release(&text) {
            return Some((r.to_string(), r));
        }
    }
    None
}

/// Runs of printable ASCII of at least `min` bytes.
fn ascii_strings(data: &[u8], min: usize) -> impl Iterator<Item = String> + '_ {
    data.split(|b| !(0x20..0x7f).contains(b))
        .filter(move |s| s.len() >= min)
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// A SeaBIOS version string: `1.16.2-debian-1.16.2-1`, `rel-1.16.3-0-g…`.
fn seabios_version(s: &str) -> Option<Release> {
    let r = Release::parse_prefix(s)?;
    let digits_then = s.trim_start_matches("rel-");
    let whole = digits_then.split('-').next().unwrap_or("");
    (r.major == 1 && whole.split('.').count() >= 2 && whole.split('.').all(|p| !p.is_empty())).then_some(r)
}

/// An edk2 release as Debian writes its firmware version: `2025.02-8+deb13u1`.
fn edk2_version(s: &str) -> Option<Release> {
    let r = Release::parse_prefix(s)?;
    let head = s.split(['-', '+']).next().unwrap_or("");
    ((2010..2100).contains(&r.major) && head.len() == 7 && (1..=12).contains(&r.minor)).then_some(r)
}

/// The release in a build path: `/build/…/edk2-2022.11/Build/…`.
fn build_path_release(s: &str) -> Option<Release> {
    let at = s.find("edk2-")?;
    edk2_version(s.get(at + 5..)?.split('/').next()?)
}

/// GUID of edk2's LZMA-compressed sections (`EE4E5898-3914-4259-9D6E-DC7BD79403CF`).
const LZMA_SECTION: [u8; 16] =
    [0x98, 0x58, 0x4e, 0xee, 0x14, 0x39, 0x59, 0x42, 0x9d, 0x6e, 0xdc, 0x7b, 0xd7, 0x94, 0x03, 0xcf];

/// The contents of the image's LZMA-compressed GUID-defined sections.
fn lzma_volumes(image: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for guid in memchr::memmem::find_iter(image, &LZMA_SECTION) {
        // EFI_GUID_DEFINED_SECTION: 3-byte size, type 0x02, GUID, data offset, attributes.
        let Some(start) = guid.checked_sub(4) else { continue };
        let head = image.get(start..start + 4);
        let offset = image.get(guid + 16..guid + 18);
        let (Some(&[s0, s1, s2, 0x02]), Some(&[o0, o1])) = (head, offset) else { continue };
        let size = usize::from(s0) | usize::from(s1) << 8 | usize::from(s2) << 16;
        let offset = usize::from(u16::from_le_bytes([o0, o1]));
        let Some(data) = image.get(start + offset..start + size) else { continue };
        if let Some(v) = unpack_lzma(data) {
            out.push(v);
        }
    }
    out
}

/// A writer that refuses more than [`MAX_VOLUME`] bytes.
struct Bounded(Vec<u8>);

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.len().saturating_add(buf.len()) > MAX_VOLUME {
            return Err(io::Error::other("decompressed firmware volume too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn unpack_lzma(data: &[u8]) -> Option<Vec<u8>> {
    let options = lzma_rs::decompress::Options { memlimit: Some(MAX_VOLUME), ..Default::default() };
    let mut out = Bounded(Vec::new());
    lzma_rs::lzma_decompress_with_options(&mut io::BufReader::new(data), &mut out, &options).ok()?;
    Some(out.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(Release::parse_prefix("1.16.3-debian-1.16.3-2"), Some(Release::new(1, 16, 3)));
        assert_eq!(Release::parse_prefix("rel-1.17.0-0-gabc"), Some(Release::new(1, 17, 0)));
        assert_eq!(Release::parse_prefix("2025.02-8+deb13u1"), Some(Release::new(2025, 2, 0)));
        assert_eq!(Release::parse_prefix("1:10.0.2+ds-1"), Some(Release::new(10, 0, 2)));
        assert_eq!(Release::parse_prefix("x1.2"), None);
        assert_eq!(Release::new(2025, 2, 0).to_string(), "2025.02");
        assert_eq!(Release::new(1, 16, 3).to_string(), "1.16.3");
    }

    #[test]
    fn generations_follow_the_releases() {
        let g = FirmwareGeneration::of_seabios;
        assert_eq!(g(Release::new(1, 16, 2)), FirmwareGeneration::SeaBiosAfterRam);
        assert_eq!(g(Release::new(1, 16, 3)), FirmwareGeneration::SeaBiosEndOfSpace);
        assert_eq!(g(Release::new(1, 17, 0)), FirmwareGeneration::SeaBiosEndOfSpaceCapped);
        assert_eq!(
            FirmwareGeneration::of_ovmf(Release::new(2022, 8, 0)),
            FirmwareGeneration::OvmfFixedAperture
        );
        assert_eq!(
            FirmwareGeneration::seabios_of_qemu(Release::new(7, 2, 0)),
            FirmwareGeneration::SeaBiosAfterRam
        );
    }

    #[test]
    fn garbage_is_not_firmware() {
        assert_eq!(detect_firmware_bytes(b"hello world, nothing here"), None);
        // A truncated LZMA section is skipped, not a panic.
        let mut image = b"_FVH".to_vec();
        image.extend_from_slice(&[0x40, 0, 0, 0x02]);
        image.extend_from_slice(&LZMA_SECTION);
        image.extend_from_slice(&[24, 0, 1, 0, 0x5d, 0, 0]);
        let d = detect_firmware_bytes(&image).unwrap();
        assert_eq!(d.kind, FirmwareKind::Ovmf);
        assert_eq!(d.release, None);
        assert!(detect_firmware(Path::new("/nonexistent/bios.bin")).is_err());
    }
}

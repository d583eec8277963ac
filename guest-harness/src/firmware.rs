//! The firmware a guest boots through, per architecture: SeaBIOS or OVMF on x86_64, none
//! or UEFI on aarch64, none on s390x. Its own module because both the stacks (which
//! provision and version each firmware) and the guests (which boot through one) name it.

use crate::arch::Arch;

/// The firmware a guest boots through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Firmware {
    /// x86_64: SeaBIOS (QEMU's default BIOS), loading the kernel via fw_cfg.
    SeaBios,
    /// x86_64: OVMF (UEFI), loading the kernel via fw_cfg.
    Ovmf,
    /// aarch64 and s390x: QEMU loads the kernel directly; on aarch64 Linux then assigns
    /// every PCI resource itself.
    None,
    /// aarch64: UEFI (edk2 `QEMU_EFI.fd`), which assigns PCI resources before Linux.
    Uefi,
}

impl Firmware {
    /// The default for `arch`.
    pub fn default_for(arch: Arch) -> Firmware {
        match arch {
            Arch::X86_64 => Firmware::SeaBios,
            _ => Firmware::None,
        }
    }

    /// Whether `arch` can boot through this firmware.
    pub fn supports(self, arch: Arch) -> bool {
        matches!(
            (arch, self),
            (Arch::X86_64, Firmware::SeaBios | Firmware::Ovmf)
                | (Arch::Aarch64, Firmware::None | Firmware::Uefi)
                | (Arch::S390x, Firmware::None)
        )
    }

    /// The name used in scenario files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::SeaBios => "seabios",
            Firmware::Ovmf => "ovmf",
            Firmware::None => "none",
            Firmware::Uefi => "uefi",
        }
    }
}

impl std::str::FromStr for Firmware {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "seabios" => Ok(Firmware::SeaBios),
            "ovmf" => Ok(Firmware::Ovmf),
            "none" => Ok(Firmware::None),
            "uefi" => Ok(Firmware::Uefi),
            other => Err(format!("unknown firmware {other:?} (seabios, ovmf, none, uefi)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for fw in ["seabios", "ovmf", "none", "uefi"] {
            assert_eq!(fw.parse::<Firmware>().unwrap().name(), fw);
        }
        assert!("bios".parse::<Firmware>().is_err());
    }
}

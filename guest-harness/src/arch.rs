//! Guest architectures and the names each tool knows them by.

use std::fmt;
use std::str::FromStr;

/// A guest architecture the end-to-end runs boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Arch {
    /// x86_64 on QEMU's `q35` machine.
    X86_64,
    /// aarch64 on QEMU's `virt` machine.
    Aarch64,
    /// s390x on QEMU's `s390-ccw-virtio` machine.
    S390x,
}

impl Arch {
    /// Every architecture, in the order runs and tables use.
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::S390x];

    /// The name used on the command line and in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::S390x => "s390x",
        }
    }

    /// Debian's name for the architecture (`dpkg --print-architecture`).
    pub fn deb_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
            Arch::S390x => "s390x",
        }
    }

    /// The QEMU system emulator for this guest.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
            Arch::S390x => "qemu-system-s390x",
        }
    }

    /// The guest kernel's console device for QEMU's first serial port.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
            Arch::S390x => "ttysclp0",
        }
    }

    /// The Debian package that carries the guest's QEMU system emulator.
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
            Arch::S390x => "qemu-system-misc",
        }
    }

    /// The architecture this program runs on, when it is one of the guest architectures.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            "s390x" => Some(Arch::S390x),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An architecture name that is not one of [`Arch::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown architecture `{0}` (expected x86_64, aarch64 or s390x)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            "s390x" => Ok(Arch::S390x),
            other => Err(UnknownArch(other.to_string())),
        }
    }
}

/// As its name (`x86_64`, `aarch64`, `s390x`), the form scenario files and reports use.
impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
            assert_eq!(arch.deb_arch().parse::<Arch>().unwrap(), arch);
        }
        assert!("riscv64".parse::<Arch>().is_err());
    }
}

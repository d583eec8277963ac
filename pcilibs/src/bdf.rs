//! PCI function addresses (`DDDD:BB:DD.F`), parsed strictly.
//!
//! A [`Bdf`] is only ever built from four hex digits of domain, two of bus, two of device
//! (at most `1f`), one digit of function (at most `7`) and the two separators. Because the
//! canonical text form contains nothing but hex digits, `:` and `.`, a path built from it
//! can never leave the directory it is joined to.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors parsing a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BdfError {
    /// The text is not of the form `DDDD:BB:DD.F` (or `BB:DD.F` where the short form is allowed).
    #[error("{text:?} is not a PCI address of the form DDDD:BB:DD.F")]
    Syntax {
        /// The offending text (cut to 32 characters).
        text: alloc::string::String,
    },
    /// The device number is above 0x1f.
    #[error("device number {0:#x} is above 0x1f")]
    Device(u8),
    /// The function number is above 7.
    #[error("function number {0} is above 7")]
    Function(u8),
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, BdfError>;

/// A PCI function address: domain (segment), bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Bdf {
    /// PCI domain (segment group).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=0x1f.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl Bdf {
    /// Builds an address, checking the device and function ranges.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Result<Self> {
        if device > 0x1f {
            return Err(BdfError::Device(device));
        }
        if function > 7 {
            return Err(BdfError::Function(function));
        }
        Ok(Bdf { domain, bus, device, function })
    }

    /// Parses exactly `DDDD:BB:DD.F` (hex digits of either case), as sysfs names functions.
    pub fn parse(text: &str) -> Result<Self> {
        let b = text.as_bytes();
        if b.len() != 12 || b.get(4) != Some(&b':') || b.get(7) != Some(&b':') || b.get(10) != Some(&b'.') {
            return Err(syntax(text));
        }
        let domain = hex(b.get(0..4), text)?;
        let rest = Self::parse_short(text.get(5..).ok_or_else(|| syntax(text))?)?;
        Self::new(domain as u16, rest.bus, rest.device, rest.function)
    }

    /// Parses exactly `BB:DD.F` (the form `lspci` prints for domain 0), with domain 0.
    pub fn parse_short(text: &str) -> Result<Self> {
        let b = text.as_bytes();
        if b.len() != 7 || b.get(2) != Some(&b':') || b.get(5) != Some(&b'.') {
            return Err(syntax(text));
        }
        let bus = hex(b.get(0..2), text)?;
        let device = hex(b.get(3..5), text)?;
        let function = hex(b.get(6..7), text)?;
        Self::new(0, bus as u8, device as u8, function as u8)
    }

    /// Parses either the full or the short form.
    pub fn parse_any(text: &str) -> Result<Self> {
        if text.len() == 7 {
            Self::parse_short(text)
        } else {
            Self::parse(text)
        }
    }

    /// Device and function packed as in a routing ID's low byte (`device << 3 | function`).
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }

    /// The same device's function `function`.
    pub fn with_function(&self, function: u8) -> Result<Self> {
        Self::new(self.domain, self.bus, self.device, function)
    }
}

fn syntax(text: &str) -> BdfError {
    let cut: alloc::string::String = text.chars().take(32).collect();
    BdfError::Syntax { text: cut }
}

/// Parses ASCII hex digits only (no sign, no prefix, no whitespace).
fn hex(digits: Option<&[u8]>, text: &str) -> Result<u32> {
    let digits = digits.ok_or_else(|| syntax(text))?;
    let mut v: u32 = 0;
    for &d in digits {
        let n = (d as char).to_digit(16).ok_or_else(|| syntax(text))?;
        v = (v << 4) | n;
    }
    Ok(v)
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl FromStr for Bdf {
    type Err = BdfError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl Serialize for Bdf {
    fn serialize<S: Serializer>(&self, s: S) -> core::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> core::result::Result<Self, D::Error> {
        let text = <alloc::borrow::Cow<'de, str>>::deserialize(d)?;
        Bdf::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn parses_and_prints_canonical_form() {
        let b = Bdf::parse("0001:3a:1F.7").unwrap();
        assert_eq!(b, Bdf { domain: 1, bus: 0x3a, device: 0x1f, function: 7 });
        assert_eq!(b.to_string(), "0001:3a:1f.7");
        assert_eq!(b.devfn(), 0xff);
        assert_eq!(Bdf::parse_short("09:00.0").unwrap().to_string(), "0000:09:00.0");
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "0000:00:00.0/../..",
            "../00:00:00.0",
            "0000:00:00.8",
            "0000:00:20.0",
            "000:00:00.0",
            "00000:00:00.0",
            "0000:00:00:0",
            "0000:0g:00.0",
            "0000:00:00.+",
            "+000:00:00.0",
            " 000:00:00.0",
            "0000:00:00.0 ",
            "0000-00:00.0",
            "００00:00:00.0",
        ] {
            assert!(Bdf::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Bdf::parse_short("0:00.00").is_err());
        assert!(Bdf::parse_short("00:00.0 ").is_err());
    }

    #[test]
    fn serde_uses_text_form() {
        let b = Bdf::new(0x10, 1, 2, 3).unwrap();
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, "\"0010:01:02.3\"");
        assert_eq!(serde_json::from_str::<Bdf>(&s).unwrap(), b);
        assert!(serde_json::from_str::<Bdf>("\"../../etc\"").is_err());
    }
}

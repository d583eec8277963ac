//! PCI function addresses (`DDDD:BB:DD.F`), parsed strictly.
//!
//! A [`Bdf`] is only ever built through [`Bdf::new`] or a parser: a domain (PCI segment)
//! of at most 32 bits, a bus, a device number of at most `1f` and a function of at most
//! `7`; its fields are private, so every `Bdf` in a program is a checked one.
//!
//! The text form is the one sysfs uses (`%04x:%02x:%02x.%1x`): the domain has four hex
//! digits, or more without a leading zero when it is above `ffff` (Intel VMD puts its
//! devices in domains from `10000`, Hyper-V uses arbitrary 32-bit domains), then two
//! digits of bus, two of device, one of function. Parsing accepts exactly the texts that
//! [`Bdf`]'s `Display` prints (hex digits of either case), so a name parses and prints
//! back to itself. Because that form contains nothing but hex digits, `:` and `.`, a path
//! built from it can never leave the directory it is joined to.

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
///
/// Built by [`Bdf::new`], [`Bdf::parse`], [`Bdf::parse_short`] or serde (from its text
/// form); read through the accessors. Ordered by domain, bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// Most hex digits of a domain: 32 bits.
const MAX_DOMAIN_DIGITS: usize = 8;

impl Bdf {
    /// Builds an address, checking the device and function ranges.
    pub const fn new(domain: u32, bus: u8, device: u8, function: u8) -> Result<Self> {
        if device > 0x1f {
            return Err(BdfError::Device(device));
        }
        if function > 7 {
            return Err(BdfError::Function(function));
        }
        Ok(Bdf { domain, bus, device, function })
    }

    /// PCI domain (segment group).
    pub const fn domain(&self) -> u32 {
        self.domain
    }

    /// Bus number.
    pub const fn bus(&self) -> u8 {
        self.bus
    }

    /// Device number, 0..=0x1f.
    pub const fn device(&self) -> u8 {
        self.device
    }

    /// Function number, 0..=7.
    pub const fn function(&self) -> u8 {
        self.function
    }

    /// Parses `DDDD:BB:DD.F` as sysfs names functions (hex digits of either case): a
    /// four-digit domain, or five to eight digits without a leading zero.
    pub fn parse(text: &str) -> Result<Self> {
        let (domain, rest) = text.split_once(':').ok_or_else(|| syntax(text))?;
        let digits = domain.len();
        let canonical =
            digits == 4 || (digits > 4 && digits <= MAX_DOMAIN_DIGITS && !domain.starts_with('0'));
        if !canonical {
            return Err(syntax(text));
        }
        let domain = hex(Some(domain.as_bytes()), text)?;
        let rest = Self::parse_short(rest).map_err(|e| match e {
            BdfError::Syntax { .. } => syntax(text),
            other => other,
        })?;
        Self::new(domain, rest.bus, rest.device, rest.function)
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
        // Two hex digits fit a u8; one fits a u8.
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
    pub const fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }

    /// The same device's function `function`.
    pub const fn with_function(&self, function: u8) -> Result<Self> {
        Self::new(self.domain, self.bus, self.device, function)
    }
}

fn syntax(text: &str) -> BdfError {
    let cut: alloc::string::String = text.chars().take(32).collect();
    BdfError::Syntax { text: cut }
}

/// Parses one to eight ASCII hex digits only (no sign, no prefix, no whitespace).
fn hex(digits: Option<&[u8]>, text: &str) -> Result<u32> {
    let digits =
        digits.filter(|d| !d.is_empty() && d.len() <= MAX_DOMAIN_DIGITS).ok_or_else(|| syntax(text))?;
    let mut v: u32 = 0;
    for &d in digits {
        let n = (d as char).to_digit(16).ok_or_else(|| syntax(text))?;
        // At most eight digits: the shift never drops a set bit.
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
        assert_eq!(b, Bdf::new(1, 0x3a, 0x1f, 7).unwrap());
        assert_eq!((b.domain(), b.bus(), b.device(), b.function()), (1, 0x3a, 0x1f, 7));
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
            "01000:00:00.0",
            "100000000:00:00.0",
            "fffffffff:00:00.0",
            "1000g:00:00.0",
            "10000:00:00.0:0",
            "10000:000:00.0",
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

    /// Intel VMD puts its functions in domains from 0x10000 and sysfs prints them with
    /// five digits (`10000:e1:00.0`); Linux domains are 32-bit.
    #[test]
    fn domains_above_ffff_parse_as_sysfs_prints_them() {
        let vmd = Bdf::parse("10000:e1:00.0").unwrap();
        assert_eq!((vmd.domain(), vmd.bus(), vmd.device(), vmd.function()), (0x1_0000, 0xe1, 0, 0));
        assert_eq!(vmd.to_string(), "10000:e1:00.0");
        let widest = Bdf::parse("FFFFFFFF:ff:1f.7").unwrap();
        assert_eq!(widest.domain(), u32::MAX);
        assert_eq!(widest.to_string(), "ffffffff:ff:1f.7");
        assert!(Bdf::parse("0000:ff:1f.7").unwrap() < vmd);
        assert_eq!(serde_json::to_string(&vmd).unwrap(), "\"10000:e1:00.0\"");
        assert_eq!(serde_json::from_str::<Bdf>("\"10000:e1:00.0\"").unwrap(), vmd);
        assert_eq!(Bdf::parse("10000:e1:20.0"), Err(BdfError::Device(0x20)));
    }

    proptest::proptest! {
        /// Every address prints in a form that parses back to it, and every text that
        /// parses prints back to itself (in lower case): a name read from sysfs and the
        /// path built from the parsed address are the same.
        #[test]
        fn text_round_trips(domain: u32, bus: u8, device in 0u8..32, function in 0u8..8) {
            let b = Bdf::new(domain, bus, device, function).unwrap();
            let text = b.to_string();
            proptest::prop_assert_eq!(Bdf::parse(&text), Ok(b));
            proptest::prop_assert_eq!(text.parse::<Bdf>(), Ok(b));
        }

        #[test]
        fn parsed_text_prints_back(text in "[0-9a-fA-F]{3,10}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\\.[0-9a-fA-F]") {
            if let Ok(b) = Bdf::parse(&text) {
                proptest::prop_assert_eq!(b.to_string(), text.to_ascii_lowercase());
            }
        }
    }
}

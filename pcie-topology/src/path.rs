//! Where the guest will see a device: its PCI path as Kata's agent reads it. (Its address
//! is a [`pcilibs::bdf::Bdf`], the same type as a host function's.)
//!
//! # Path format
//!
//! Kata's agent resolves a PCI path by starting at bus `00` of the root complex and, for
//! each element, taking the device at that slot and following the bus behind it; an
//! element is a two-digit hex slot with an optional `.function` (`02/00`, `02/00.1`). This
//! crate writes the same form for devices under `pcie.0`. A device under a `pxb-pcie`
//! expander sits on another root bus; for those the path starts with the expander's root
//! bus number (`20/01/00`: root bus 0x20, root port in slot 1, device in slot 0). Kata's
//! agent reads a path of three or more elements whose first is 0x20 or more that way (a
//! root complex, `/sys/devices/pci0000:20`), and Kata's runtime numbers expander root
//! buses `0x20 * (node + 1)`; a plan made with [`crate::ExpanderBuses::KataAgent`] numbers
//! them the same, and [`GuestPciPath::kata`] gives those paths. An expander root bus below
//! 0x20 (the default, packed numbering) would read as a slot of bus 0, so `kata()` gives
//! `None` for it. [`GuestPciPath::from_kata`] reads a path by the agent's rule.
//!
//! # Bus number prediction
//!
//! The predicted BDF depends on the bus numbers the firmware (or the guest kernel on a
//! machine booted without firmware) assigns. Both walk each root bus depth-first in devfn
//! order, give each bridge the next free bus number as its secondary bus and close its
//! subordinate range after its children, extended by `bus-reserve` where honoured. Expander
//! root buses keep their `bus_nr`, and their bridges are numbered from `bus_nr + 1`. The
//! prediction assumes that the guest OS keeps the firmware's numbers (Linux on x86 does
//! unless `pci=assign-busses`) and that no device the plan does not know sits on a bridge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::qemu::DevFn;

/// The lowest first path element Kata's agent reads as an expander's root bus.
pub const KATA_ROOT_COMPLEX_MIN: u32 = 0x20;

/// Errors parsing a path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PathError {
    /// Text is not a path like `02/00` or `20/01/00.1`.
    #[error("`{0}` is not a guest PCI path")]
    Invalid(String),
}

/// A guest PCI path: optional expander root bus, then one slot/function per bus hop.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[non_exhaustive]
pub struct GuestPciPath {
    /// Root bus number when the path starts at an expander's root bus; `None` for bus 0.
    pub root_bus: Option<u8>,
    /// Slot/function at each hop, from the root bus down.
    pub hops: Vec<DevFn>,
}

impl GuestPciPath {
    /// The path as Kata's agent reads it: `02/00` below `pcie.0`, `20/00/00` below an
    /// expander whose root bus is 0x20 or more (the agent's rule for a root complex);
    /// `None` below an expander with a lower root bus number, which the agent would take
    /// for a slot of bus 0.
    pub fn kata(&self) -> Option<String> {
        match self.root_bus {
            None => Some(self.to_string()),
            Some(bus) if u32::from(bus) >= KATA_ROOT_COMPLEX_MIN && self.hops.len() >= 2 => {
                Some(self.to_string())
            }
            Some(_) => None,
        }
    }

    /// Reads a path as Kata's agent does: three or more elements whose first is 0x20 or
    /// more name an expander's root bus and the hops below it; anything else is a path
    /// from bus 0.
    pub fn from_kata(text: &str) -> Result<Self, PathError> {
        let mut parts = text.split('/');
        let first = parts.next().and_then(|p| u8::from_str_radix(p, 16).ok());
        let root =
            text.split('/').count() >= 3 && first.is_some_and(|b| u32::from(b) >= KATA_ROOT_COMPLEX_MIN);
        GuestPciPath::parse_with_root(text, root)
    }

    /// This path extended by one hop.
    pub fn join(&self, hop: DevFn) -> GuestPciPath {
        let mut hops = self.hops.clone();
        hops.push(hop);
        GuestPciPath { root_bus: self.root_bus, hops }
    }
}

impl fmt::Display for GuestPciPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(bus) = self.root_bus {
            parts.push(format!("{bus:02x}"));
        }
        for hop in &self.hops {
            if hop.function() == 0 {
                parts.push(format!("{:02x}", hop.slot()));
            } else {
                parts.push(format!("{:02x}.{:x}", hop.slot(), hop.function()));
            }
        }
        f.write_str(&parts.join("/"))
    }
}

impl FromStr for GuestPciPath {
    type Err = PathError;

    /// Parses `02/00` (root bus 0) — a leading element above 0x1f, or a leading element
    /// followed by at least two more when `root:` is written (`20/01/00`), is not guessed:
    /// use [`GuestPciPath::parse_with_root`] for expander paths.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GuestPciPath::parse_with_root(s, false)
    }
}

impl GuestPciPath {
    /// Parses a path; with `has_root` the first element is the root bus number.
    pub fn parse_with_root(s: &str, has_root: bool) -> Result<Self, PathError> {
        let bad = || PathError::Invalid(s.to_string());
        let mut parts = s.split('/');
        let root_bus = if has_root {
            Some(u8::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?)
        } else {
            None
        };
        let mut hops = Vec::new();
        for p in parts {
            let (slot, func) = match p.split_once('.') {
                Some((s, f)) => (s, f),
                None => (p, "0"),
            };
            let slot = u8::from_str_radix(slot, 16).map_err(|_| bad())?;
            let func = u8::from_str_radix(func, 16).map_err(|_| bad())?;
            hops.push(DevFn::new(slot, func).map_err(|_| bad())?);
        }
        if hops.is_empty() {
            return Err(bad());
        }
        Ok(GuestPciPath { root_bus, hops })
    }
}

impl TryFrom<String> for GuestPciPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        // The serialized form marks expander paths with a leading `pxb:`.
        match s.strip_prefix("pxb:") {
            Some(rest) => GuestPciPath::parse_with_root(rest, true),
            None => GuestPciPath::parse_with_root(&s, false),
        }
    }
}

impl From<GuestPciPath> for String {
    fn from(p: GuestPciPath) -> String {
        if p.root_bus.is_some() {
            format!("pxb:{p}")
        } else {
            p.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kata_form() {
        let p =
            GuestPciPath { root_bus: None, hops: vec![DevFn::new(2, 0).unwrap(), DevFn::new(0, 1).unwrap()] };
        assert_eq!(p.to_string(), "02/00.1");
        assert_eq!(p.kata().as_deref(), Some("02/00.1"));
        assert_eq!("02/00.1".parse::<GuestPciPath>().unwrap(), p);
        let x = GuestPciPath {
            root_bus: Some(0x20),
            hops: vec![DevFn::new(1, 0).unwrap(), DevFn::new(0, 0).unwrap()],
        };
        assert_eq!(x.to_string(), "20/01/00");
        assert_eq!(x.kata().as_deref(), Some("20/01/00"));
        assert_eq!(GuestPciPath::from_kata("20/01/00").unwrap(), x);
        assert_eq!(GuestPciPath::from_kata("02/00.1").unwrap(), p);
        // Two elements are a path from bus 0 whatever the first is (the agent's rule), so
        // `20/01` is slot 0x20 of bus 0: no such slot.
        assert!(GuestPciPath::from_kata("20/01").is_err());
        let low = GuestPciPath { root_bus: Some(3), ..x.clone() };
        assert_eq!(low.kata(), None);
        let json = serde_json::to_string(&x).unwrap();
        assert_eq!(json, "\"pxb:20/01/00\"");
        assert_eq!(serde_json::from_str::<GuestPciPath>(&json).unwrap(), x);
        assert!("2x/00".parse::<GuestPciPath>().is_err());
        assert!("20/00".parse::<GuestPciPath>().is_err());
    }
}

//! Byte sizes as QEMU and Linux write them (`128G`, `16M`, `4K`).

use thiserror::Error;

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// One tebibyte.
pub const TIB: u64 = 1 << 40;

/// The widest guest physical address any platform here has, in bits: x86-64 defines
/// physical addresses of at most 52 bits (CPUID `MAXPHYADDR`), aarch64 intermediate
/// physical addresses of at most 52 bits (FEAT_LPA / LPA2); s390x zPCI has no bridge
/// windows. A plan that ends above `1 << MAX_PHYS_BITS` is refused
/// ([`crate::AddressSpaceError::PhysBits`]), and so is a memory resource larger than that
/// ([`crate::request::RequestError::TooLarge`]), before any size is added up: with every input
/// below 2^52, the sums and round-ups of a plan stay far from 2^64, and every one of them
/// is checked as well.
pub const MAX_PHYS_BITS: u8 = 52;

/// The largest I/O resource any platform could hold: PCI's I/O address space is at most
/// 32 bits wide (x86 and aarch64 `virt` have 64 KiB of it).
pub const MAX_IO_SIZE: u64 = 1 << 32;

/// Errors parsing a size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SizeError {
    /// The text is not a number with an optional `K`/`M`/`G`/`T` suffix.
    #[error("`{0}` is not a size (expected e.g. 4096, 0x1000, 16M, 128G)")]
    Invalid(String),
    /// The size does not fit in 64 bits.
    #[error("size `{0}` overflows 64 bits")]
    Overflow(String),
}

/// Parses `4096`, `0x1000`, `16M`, `16MiB`, `128G`, `1T` (binary units, case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Invalid(text.to_string()));
    }
    let stripped = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let (digits, shift) = [('k', 10u32), ('m', 20), ('g', 30), ('t', 40)]
        .iter()
        .find_map(|(c, sh)| stripped.strip_suffix(*c).map(|d| (d, *sh)))
        .unwrap_or((stripped, 0));
    let n: u64 = digits.parse().map_err(|_| SizeError::Invalid(text.to_string()))?;
    if shift > 0 && n.leading_zeros() < shift {
        return Err(SizeError::Overflow(text.to_string()));
    }
    Ok(n << shift)
}

/// Formats a size with the largest binary unit that divides it exactly (`128G`, `1536M`, `4097`).
pub fn fmt_size(size: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")];
    for (unit, suffix) in UNITS {
        if size >= unit && size % unit == 0 {
            return format!("{}{}", size / unit, suffix);
        }
    }
    size.to_string()
}

/// Formats a size for people: `128 GiB`, `31 MiB`, `1.5 TiB`.
pub fn human_size(size: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (unit, suffix) in UNITS {
        if size >= unit {
            let whole = size / unit;
            let tenth = (size % unit) * 10 / unit;
            return if tenth == 0 {
                format!("{whole} {suffix}")
            } else {
                format!("{whole}.{tenth} {suffix}")
            };
        }
    }
    format!("{size} B")
}

/// Rounds `v` up to a multiple of `align` (a power of two, or 0/1 for none); `None` on overflow.
pub(crate) fn align_up(v: u64, align: u64) -> Option<u64> {
    pcilibs::requirement::align_up(v, align)
}

/// The smallest power of two `>= v` (1 for 0); `None` above 2^63.
pub(crate) fn next_pow2(v: u64) -> Option<u64> {
    v.max(1).checked_next_power_of_two()
}

/// Number of address bits needed to address `[0, end)`: the bit width of `end - 1`.
pub(crate) fn bits_for_end(end: u64) -> u8 {
    if end <= 1 {
        return 0;
    }
    (64 - (end - 1).leading_zeros()) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_size("128G"), Ok(128 * GIB));
        assert_eq!(parse_size("16MiB"), Ok(16 * MIB));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(matches!(parse_size("99999999999T"), Err(SizeError::Overflow(_))));
        assert_eq!(fmt_size(128 * GIB + 32 * MIB), "131104M");
        assert_eq!(fmt_size(256 * GIB), "256G");
        assert_eq!(human_size(3 * MIB / 2), "1.5 MiB");
        assert_eq!(bits_for_end(1 << 40), 40);
        assert_eq!(bits_for_end((1 << 40) + 1), 41);
    }
}

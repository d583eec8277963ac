//! Property tests: no input panics or hangs the parsers; BAR layouts round-trip through
//! registers, the probe and the facts; requirements hold every resource they were made from.

// Test code: failures panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use pcilibs::bar::{Bar, BarKind};
use pcilibs::bdf::Bdf;
use pcilibs::caps;
use pcilibs::config::{ConfigSpace, Header};
use pcilibs::decode::Function;
use pcilibs::dump;
use pcilibs::ecaps;
use pcilibs::emulated::EmulatedConfigSpace;
use pcilibs::facts::FunctionFacts;
use pcilibs::requirement::{align_up, Requirement, Resource, Window, WindowRequirement};
use pcilibs::sizing::probe::probe;
use pcilibs::sizing::ResourceFile;
use proptest::prelude::*;

/// Bytes that look enough like a function to reach the capability walks.
fn function_like() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(any::<u8>(), 4096), 0usize..=4096, any::<bool>()).prop_map(|(mut b, len, pcie)| {
        b[0] = 0x86;
        b[1] = 0x80;
        b[6] |= 0x10; // capability list present
        if pcie {
            b[0x34] = 0x40;
            b[0x40] = 0x10; // PCI Express capability, so the extended walk runs
        }
        b.truncate(len.max(64));
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        let _ = Function::decode(&bytes);
        let cs = ConfigSpace::new(&bytes);
        prop_assert!(ecaps::walk(cs).entries.len() <= ecaps::MAX_EXT_CAPABILITIES);
        if let Ok(h) = Header::parse(&bytes) {
            prop_assert!(caps::walk(cs, &h).entries.len() <= caps::MAX_CAPABILITIES);
        }
        let _ = FunctionFacts::from_config(Bdf::default(), &bytes, None);
    }

    #[test]
    fn walks_over_random_lists_terminate(bytes in function_like()) {
        let f = Function::decode(&bytes).unwrap();
        prop_assert!(f.capabilities.len() <= caps::MAX_CAPABILITIES);
        prop_assert!(f.extended_capabilities.len() <= ecaps::MAX_EXT_CAPABILITIES);
        // Every listed capability lies inside the bytes, at a dword boundary.
        for c in &f.capabilities {
            prop_assert!(usize::from(c.offset) + 2 <= bytes.len() && c.offset % 4 == 0 && c.offset >= 0x40);
        }
        for c in &f.extended_capabilities {
            prop_assert!(usize::from(c.offset) + 4 <= bytes.len() && c.offset % 4 == 0 && c.offset >= 0x100);
        }
        // No offset is listed twice (a loop would).
        let mut offs: Vec<u16> = f.extended_capabilities.iter().map(|c| c.offset).collect();
        offs.sort_unstable();
        offs.dedup();
        prop_assert_eq!(offs.len(), f.extended_capabilities.len());
        let _ = FunctionFacts::from_function(Bdf::default(), &f, None);
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,2000}", lines in prop::collection::vec("[0-9a-f :.xX\\-]{0,60}", 0..40)) {
        let _ = dump::parse(&text);
        let joined = lines.join("\n");
        let d = dump::parse(&joined);
        for dev in &d.devices {
            prop_assert!(dev.config.len() <= 4096);
            let _ = Function::decode(&dev.config);
        }
        let _ = ResourceFile::parse(&joined);
        let _ = Bdf::parse(&text);
    }
}

/// One BAR of a random layout.
#[derive(Debug, Clone, Copy)]
struct Spec {
    kind: BarKind,
    prefetchable: bool,
    log2: u32,
    address_bits: u64,
}

fn layout() -> impl Strategy<Value = Vec<Option<Spec>>> {
    let spec = prop_oneof![
        Just(None),
        (2u32..=8, any::<u64>()).prop_map(|(l, a)| Some(Spec {
            kind: BarKind::Io,
            prefetchable: false,
            log2: l,
            address_bits: a
        })),
        (any::<bool>(), 4u32..=31, any::<u64>()).prop_map(|(p, l, a)| Some(Spec {
            kind: BarKind::Mem32,
            prefetchable: p,
            log2: l,
            address_bits: a
        })),
        (any::<bool>(), 4u32..=44, any::<u64>()).prop_map(|(p, l, a)| Some(Spec {
            kind: BarKind::Mem64,
            prefetchable: p,
            log2: l,
            address_bits: a
        })),
    ];
    prop::collection::vec(spec, 6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn bar_layouts_round_trip(slots in layout(), rom_log2 in prop::option::of(11u32..=24)) {
        let mut e = EmulatedConfigSpace::endpoint(0x1234, 0x5678, 0x030200, 256);
        let mut want: Vec<Bar> = Vec::new();
        let mut i = 0u8;
        while i < 6 {
            let Some(s) = slots[i as usize] else { i += 1; continue };
            if s.kind == BarKind::Mem64 && i == 5 {
                i += 1;
                continue;
            }
            let size = 1u64 << s.log2;
            // Any address aligned to the size, kept inside the kind's address space.
            let limit: u64 = match s.kind { BarKind::Io => 1 << 16, BarKind::Mem32 => 1 << 32, _ => 1 << 46 };
            let address = (s.address_bits % limit) & !(size - 1);
            e.set_bar(i, s.kind, s.prefetchable, size, address).unwrap();
            want.push(Bar { index: i, kind: s.kind, prefetchable: s.prefetchable, size: Some(size) });
            let decoded = Function::decode(e.bytes()).unwrap();
            prop_assert_eq!(decoded.bars.get(i).unwrap().address, address);
            i += if s.kind == BarKind::Mem64 { 2 } else { 1 };
        }
        let rom = rom_log2.map(|l| 1u64 << l);
        e.set_rom(rom, 0xfe00_0000).unwrap();
        let sizes = probe(&mut e).unwrap();
        prop_assert_eq!(sizes.rom, rom);
        let facts = FunctionFacts::from_config(Bdf::default(), e.bytes(), Some(&sizes)).unwrap();
        prop_assert_eq!(&facts.bars, &want);
        prop_assert!(facts.problems.is_empty());
    }
}

/// A resource: BAR of a random kind and size, or an SR-IOV aperture of `count` VF BARs.
fn resource() -> impl Strategy<Value = Resource> {
    (0u8..3, any::<bool>(), any::<bool>(), 2u32..=40, 1u64..=16).prop_map(|(k, pref, rom, log2, count)| {
        let kind = match k {
            0 => BarKind::Io,
            1 => BarKind::Mem32,
            _ => BarKind::Mem64,
        };
        let size = 1u64 << if kind == BarKind::Io { log2.min(8) } else { log2.max(4) };
        let rom = rom && kind != BarKind::Io;
        let count = if rom { 1 } else { count };
        Resource { kind, prefetchable: pref && kind != BarKind::Io, rom, size: size * count, align: size }
    })
}

/// Places `items` largest alignment first from `base`; returns (start, end) of each.
fn place(base: u64, mut items: Vec<Resource>) -> Vec<(u64, u64, u64)> {
    items.sort_by_key(|r| std::cmp::Reverse(r.align));
    let mut cursor = base;
    items
        .into_iter()
        .map(|r| {
            let start = align_up(cursor, r.align).unwrap();
            cursor = start + r.size;
            (start, cursor, r.align)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_resource_fits_its_window(rs in prop::collection::vec(resource(), 0..24), k in 1u64..8) {
        let req = Requirement::of(&rs).unwrap();
        for (window, w) in [(Window::Io, req.io), (Window::Mem, req.mem), (Window::Pref, req.pref)] {
            let mine: Vec<Resource> = rs.iter().copied().filter(|r| r.window() == window).collect();
            if mine.is_empty() {
                prop_assert!(w.is_empty());
                continue;
            }
            prop_assert!(w.align.is_power_of_two());
            // The window may start at any multiple of its alignment.
            let base = w.align * k;
            for (start, end, align) in place(base, mine) {
                prop_assert_eq!(start % align, 0);
                prop_assert!(start >= base && end <= base + w.size, "{start:#x}..{end:#x} outside {base:#x}+{:#x}", w.size);
            }
        }
    }

    #[test]
    fn combined_windows_hold_both(a in prop::collection::vec(resource(), 0..8), b in prop::collection::vec(resource(), 0..8)) {
        let ra = Requirement::of(&a).unwrap();
        let rb = Requirement::of(&b).unwrap();
        let c = ra.combine(&rb).unwrap();
        for (x, y, z) in [(ra.io, rb.io, c.io), (ra.mem, rb.mem, c.mem), (ra.pref, rb.pref, c.pref)] {
            let fits = |w: WindowRequirement| w.is_empty() || (z.size >= w.size && z.align >= w.align);
            prop_assert!(fits(x) && fits(y));
            prop_assert!(z.size >= x.size + y.size);
        }
    }
}

//! The inner guest of the nested runs boots the kernel's ELF payload, unpacked from the
//! bzImage of each stack's x86_64 kernel (downloads on first use).

use guest_harness::arch::Arch;

/// The inner guest of the nested runs boots the kernel's ELF payload: xz in bookworm's
/// bzImage, zstd in trixie's and the 7.x ones.
#[test]
fn bzimage_payloads_of_every_layout_unpack() {
    for name in ["bookworm", "trixie", "current"] {
        let k = guest_harness::stack(name)
            .unwrap()
            .kernel(Arch::X86_64)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let elf = xtask::e2e::nested::bundle::uncompressed_kernel(&k.image, dir.path(), "t").unwrap();
        let head = std::fs::read(&elf).unwrap();
        assert_eq!(head.get(..4), Some(b"\x7fELF".as_slice()), "{name}");
        assert!(head.len() > 8 << 20, "{name}: {} bytes", head.len());
    }
}

//! Helpers shared by the integration tests.
#![allow(dead_code)]
// Test helpers fail loudly, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

pub(crate) mod qemu;

/// `../shared/conformance` next to the workspace root, where the pciutils dumps live.
pub(crate) fn conformance_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance");
    assert!(
        dir.join("pciutils/oracle.json").is_file(),
        "conformance data missing: expected {} (the pciutils dumps and oracle.json are kept \
         outside the repository in ../shared/conformance relative to the workspace root)",
        dir.display()
    );
    dir
}

/// Text of one pciutils dump.
pub(crate) fn dump_text(name: &str) -> String {
    let p = conformance_dir().join("pciutils/dumps").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The oracle: file → bdf → {caps, ext_caps, regions}.
pub(crate) fn oracle() -> serde_json::Value {
    let p = conformance_dir().join("pciutils/oracle.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

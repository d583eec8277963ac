//! Live bridge windows from real QEMU (q35, SeaBIOS, no guest OS): `pci::bridges` reads
//! what the firmware programmed, and `pci::window_shortfalls` says whether a device fits.
//! It reproduces the SeaBIOS fact the planner sizes for: a 128 GiB BAR does not fit a
//! port reserved with exactly `pref64-reserve=128G`, because the window is only 2 MiB
//! aligned; a 256 GiB reservation holds it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{Hotplug, Qemu};
use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;
use qmp_hotplug::pci::{bridges, window_shortfalls, PciBridge};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn live_bridges(q: &Qemu, want: &[&str]) -> Vec<PciBridge> {
    let c = q.connect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = bridges(&c.execute_raw("query-pci", None, Duration::from_secs(30)).unwrap());
        let ready =
            want.iter().all(|id| all.iter().any(|b| b.qdev_id == *id && b.secondary != 0 && b.mem.is_some()));
        if ready {
            return all;
        }
        assert!(Instant::now() < deadline, "firmware did not program the bridges in 120 s: {all:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn seabios_windows_decide_whether_a_large_bar_fits() {
    let q = Qemu::q35_with(
        1,
        Hotplug::Acpi,
        &[
            "-device",
            "pcie-root-port,id=r128,chassis=8,slot=8,bus=pcie.0,addr=0x8,pref64-reserve=128G",
            "-device",
            "pcie-root-port,id=r256,chassis=9,slot=9,bus=pcie.0,addr=0x9,pref64-reserve=256G,mem-reserve=32M",
        ],
    );
    let all = live_bridges(&q, &["rp0", "r128", "r256"]);
    let get = |id: &str| all.iter().find(|b| b.qdev_id == id).unwrap().clone();
    // An H100-class function: 16 MiB registers, 128 GiB aperture, 32 MiB.
    let gpu = [
        Resource::bar(BarKind::Mem32, false, 16 * MIB),
        Resource::bar(BarKind::Mem64, true, 128 * GIB),
        Resource::bar(BarKind::Mem64, true, 32 * MIB),
    ];
    let r256 = get("r256");
    let pref = r256.pref.expect("a prefetchable window");
    assert!(pref.size() >= 256 * GIB, "{pref:?}");
    assert!(window_shortfalls(&r256, &gpu[1..]).is_empty(), "{:?}", window_shortfalls(&r256, &gpu[1..]));

    let r128 = get("r128");
    let pref = r128.pref.expect("a prefetchable window");
    assert!(pref.size() >= 128 * GIB, "the reservation is honoured in size: {pref:?}");
    assert_ne!(pref.base % (128 * GIB), 0, "SeaBIOS aligns it to 2 MiB only: {pref:?}");
    let why = window_shortfalls(&r128, &gpu[1..]);
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].starts_with("pref:") && why[0].contains("past it"), "{why:?}");

    // The default port: a small prefetchable window, and the default memory window
    // cannot take 16 MiB of registers.
    let rp0 = get("rp0");
    let why = window_shortfalls(&rp0, &gpu);
    assert!(why.iter().any(|w| w.starts_with("pref:")), "{why:?} {rp0:?}");
    assert!(why.iter().any(|w| w.starts_with("mem:")), "{why:?} {rp0:?}");
    // A NIC-sized device fits the default port.
    let nic =
        [Resource::bar(BarKind::Mem64, false, 64 << 10), Resource::bar(BarKind::Mem64, false, 16 << 10)];
    assert!(window_shortfalls(&rp0, &nic).is_empty(), "{rp0:?}");
}

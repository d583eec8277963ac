//! The harness against real QEMU guests: boot, reporter, command channel, QMP hotplug,
//! kernel modules, deadlines, on the stack `cargo xtask test` names (`$XTASK_STACK`, else
//! the default). Provisioning happens on first use (`cargo xtask test` does it first); a
//! missing piece fails with what to do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use guest_harness::arch::Arch;
use guest_harness::deadline;
use guest_harness::guest::{Guest, GuestAssets, GuestError, GuestSpec};
use guest_harness::hotplug::{self, Expect};
use guest_harness::stacks::Stack;
use serde_json::json;

fn stack() -> Stack {
    guest_harness::default_stack().unwrap()
}

fn assets(arch: Arch) -> GuestAssets {
    GuestAssets::ensure(&stack(), arch).unwrap_or_else(|e| panic!("{e}\n(run `cargo xtask provision`)"))
}

fn boot(spec: &GuestSpec) -> Guest {
    Guest::boot(spec, &assets(spec.arch)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn x86_64_guest_reports_hotplug_and_runs_commands() {
    let mut spec = GuestSpec::new(Arch::X86_64);
    spec.devices.push("pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1".into());
    let guest = boot(&spec);

    let out = guest.exec("echo hello; echo '  spaced'; exit 3", deadline(30)).unwrap();
    assert_eq!(out.lines, ["hello", "  spaced"]);
    assert_eq!(out.status, Some(3));
    assert!(guest.exec("two\nlines", deadline(5)).is_err());

    let state = guest.state();
    let port = state.find(0x1b36, 0x000c).next().expect("root port in the guest").bdf;
    assert!(state.ready.as_ref().unwrap().release.ends_with("amd64"));

    let qmp = guest.qmp(deadline(10)).unwrap();
    let args = json!({"driver": "virtio-net-pci", "id": "net0", "bus": "rp1"});
    let plugged = hotplug::plug(
        &guest,
        &qmp,
        args,
        Expect { vendor: 0x1af4, device: Some(0x1041), bars: &[] },
        deadline(60),
    )
    .unwrap();
    assert_eq!(plugged.device.parent(), Some(port));
    assert!(plugged.device.bars().count() >= 2, "{:?}", plugged.device);
    assert!(plugged.bar_problems.is_empty(), "{:?}", plugged.bar_problems);

    let gone = hotplug::unplug(&guest, &qmp, "net0", plugged.device.bdf, deadline(60)).unwrap();
    assert!(gone.gone_after > Duration::ZERO);
    assert!(!guest.state().pci.contains_key(&plugged.device.bdf));
}

#[test]
fn kernel_modules_load_with_their_dependencies() {
    let assets = assets(Arch::X86_64);
    let config = assets.kernel.kernel_config().unwrap();
    assert_eq!(config.get("VFIO_PCI"), Some("m"), "the test needs vfio-pci built as a module");
    let mut spec = GuestSpec::new(Arch::X86_64);
    spec.initramfs.modules = vec!["vfio-pci".into(), "vfio_iommu_type1".into()];
    let guest = Guest::boot(&spec, &assets).unwrap();
    let out = guest
        .exec("for m in vfio vfio_iommu_type1 vfio_pci_core vfio_pci; do test -d /sys/module/$m || echo missing $m; done", deadline(30))
        .unwrap();
    assert_eq!(out.lines, Vec::<String>::new());
    assert_eq!(out.status, Some(0));
    assert!(guest.state().errors.is_empty(), "{:?}", guest.state().errors);
}

#[test]
fn qemu_errors_and_deadlines_end_the_wait() {
    let mut spec = GuestSpec::new(Arch::X86_64);
    spec.devices.push("no-such-device".into());
    spec.progress = false;
    let err = Guest::boot(&spec, &assets(Arch::X86_64)).unwrap_err();
    match err {
        GuestError::Exited { diagnostics, .. } => {
            assert!(diagnostics.contains("no-such-device"), "{diagnostics}")
        }
        other => panic!("expected Exited, got {other}"),
    }

    let guest = boot(&GuestSpec::new(Arch::S390x));
    let err =
        guest
            .wait_for("something that never happens", Instant::now() + Duration::from_millis(500), |_| false);
    assert!(matches!(err, Err(GuestError::Timeout { .. })), "{err:?}");
}

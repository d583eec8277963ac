//! The hotplug engine against real QEMU 7.2 (q35, SeaBIOS, no guest OS).
//!
//! With no guest OS, root ports in native PCIe hotplug mode keep empty slots powered off,
//! so `device_del` completes at once; with q35's default ACPI hotplug it never completes,
//! which is the unplug-timeout path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{device, gpu_like, names, qid, single, unplug_after, Hotplug, Qemu};
use pcie_topology::HostRef;
use pcilibs::bdf::Bdf;
use pcilibs::sysfs::Sysfs;
use qmp_hotplug::engine::{Engine, EngineError, EngineOptions, UnplugOutcome};
use qmp_hotplug::request::{Expectation, PlugFunction, PlugRequest};
use qmp_hotplug::state::DeviceState;

fn setup(ports: usize, mode: Hotplug) -> (Qemu, Arc<qmp_hotplug::QmpClient>, tempfile::TempDir) {
    let q = Qemu::q35(ports, mode);
    let c = q.connect();
    q.wait_firmware(&c, ports);
    (q, Arc::new(c), tempfile::tempdir().unwrap())
}

/// Generous: where a removal must complete, a slow machine must not turn it into a timeout.
fn opts() -> EngineOptions {
    unplug_after(Duration::from_secs(20))
}

/// For the paths where no guest answers and the deadline is the point.
fn short_unplug() -> EngineOptions {
    unplug_after(Duration::from_secs(1))
}

fn states(rec: &qmp_hotplug::DeviceRecord) -> Vec<DeviceState> {
    rec.history.iter().map(|t| t.state).collect()
}

#[test]
fn multifunction_plug_visible_then_unplug_removed() {
    let (_q, c, dir) = setup(2, Hotplug::Native);
    let (engine, report) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    assert!(report.actions.is_empty());
    let rec = engine.plug(gpu_like(0, 64)).unwrap();
    assert_eq!(rec.state, DeviceState::Visible);
    assert_eq!(
        states(&rec),
        [DeviceState::Planned, DeviceState::Adding, DeviceState::Added, DeviceState::Visible]
    );
    assert_eq!(rec.guest_address("gpu0"), Some(Bdf::new(0, 1, 0, 0).unwrap()));
    assert_eq!(rec.guest_address("nic0"), Some(Bdf::new(0, 1, 0, 1).unwrap()));
    assert!(rec.request.functions.iter().all(|f| f.device.multifunction));
    assert!(names(&c, "/machine/peripheral")
        .is_superset(&["gpu0", "nic0"].iter().map(|s| s.to_string()).collect()));
    assert!(!engine.is_port_free("rp0"));

    // Unplugged by the device's id; the record is found by id and by port.
    assert_eq!(engine.unplug("gpu0").unwrap(), UnplugOutcome::Removed);
    let rec = engine.device("gpu0").unwrap();
    assert_eq!(engine.on_port("rp0").as_ref(), Some(&rec));
    assert_eq!(rec.state, DeviceState::Removed);
    assert_eq!(&states(&rec)[4..], [DeviceState::Removing, DeviceState::Removed]);
    let left = names(&c, "/machine/peripheral");
    assert!(!left.contains("gpu0") && !left.contains("nic0"), "{left:?}");
    assert!(!names(&c, "/objects").contains("mem0"));
    assert!(engine.is_port_free("rp0"));
    // The port is reusable, with the same ids.
    engine.plug(gpu_like(0, 64)).unwrap();
    // The port's id, or a function that is not the device, is no device to unplug.
    assert!(matches!(engine.unplug("rp0"), Err(EngineError::NoDevice(id)) if id == "rp0"));
    assert!(matches!(engine.unplug("nic0"), Err(EngineError::NoDevice(_))));
    assert_eq!(engine.device("gpu0").unwrap().state, DeviceState::Visible, "the live record first");
}

#[test]
fn unplug_without_guest_is_pending_and_keeps_the_port() {
    let (_q, c, dir) = setup(1, Hotplug::Acpi);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), short_unplug()).unwrap();
    engine.plug(single(0, "n0", "e1000e")).unwrap();
    assert_eq!(engine.unplug("n0").unwrap(), UnplugOutcome::Pending);
    let rec = engine.device("n0").unwrap();
    assert_eq!(rec.state, DeviceState::UnplugPending);
    assert!(rec.history.last().unwrap().note.contains("DEVICE_DELETED"));
    assert!(!engine.is_port_free("rp0"));
    match engine.plug(single(0, "n1", "e1000e")) {
        Err(EngineError::PortBusy { state: DeviceState::UnplugPending, .. }) => {}
        other => panic!("{other:?}"),
    }
    // Asking again is allowed and stays pending; nothing is freed that QEMU still has.
    assert_eq!(engine.unplug("n0").unwrap(), UnplugOutcome::Pending);
    assert!(engine.complete_pending().unwrap().is_empty());
    assert!(names(&c, "/machine/peripheral").contains("n0"));
}

#[test]
fn failed_function_rolls_back_everything() {
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    let mut req = gpu_like(0, 16);
    // Function 0 is added last and fails: function 1 and the object were already added.
    req.functions[0].device.driver = "no-such-device-model".into();
    match engine.plug(req) {
        Err(EngineError::PlugFailed { state: DeviceState::Removed, cause, .. }) => {
            assert!(cause.to_string().contains("no-such-device-model"), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    let rec = engine.device("gpu0").unwrap();
    assert!(states(&rec).contains(&DeviceState::Failed));
    assert!(!names(&c, "/machine/peripheral").contains("nic0"));
    assert!(!names(&c, "/objects").contains("mem0"));
    assert!(engine.is_port_free("rp0"));
}

#[test]
fn iommufd_object_on_qemu_7_2_fails_cleanly() {
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    // The iommufd object takes a descriptor the caller opened (a stand-in for /dev/iommu).
    let dev_iommu = std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let f = PlugFunction::new(device("vfio-pci", "n0", "rp0", None));
    let mut req =
        PlugRequest::new(qid("rp0"), qid("n0"), vec![f]).with_iommufd(qid("iommufd0"), Some(dev_iommu));
    assert_eq!(req.functions[0].qmp_arguments()["iommufd"], "iommufd0");
    // As an e1000e (no host here to pass through), with the `iommufd` property vfio-pci got.
    req.functions[0].device.driver = "e1000e".into();
    match engine.plug(req) {
        Err(EngineError::PlugFailed { state: DeviceState::Removed, cause, .. }) => {
            assert!(cause.to_string().contains("iommufd"), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    // The descriptor passed with getfd was closed again.
    let err = c.closefd("iommufd0-fd").unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[test]
fn wrong_bar_size_is_not_visible_and_rolls_back() {
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let mut options = opts();
    options.visible_timeout = Duration::from_millis(500);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), options).unwrap();
    let mut req = gpu_like(0, 16);
    if let Expectation::Pci(p) = &mut req.functions[0].expect {
        p.bars[1].size = 32 << 20;
    }
    match engine.plug(req) {
        Err(EngineError::PlugFailed { cause, state: DeviceState::Removed, .. }) => {
            assert!(matches!(*cause, EngineError::NotVisible { .. }), "{cause}");
            assert!(cause.to_string().contains("BAR 2"), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!names(&c, "/machine/peripheral").contains("gpu0"));
}

#[test]
fn vfio_group_not_viable_stops_before_qemu() {
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let sys = dir.path().join("sys");
    let dev = sys.join("devices/pci0000:00/0000:01:00.0");
    std::fs::create_dir_all(&dev).unwrap();
    let group = sys.join("kernel/iommu_groups/5/devices");
    std::fs::create_dir_all(&group).unwrap();
    std::os::unix::fs::symlink(sys.join("kernel/iommu_groups/5"), dev.join("iommu_group")).unwrap();
    std::os::unix::fs::symlink(&dev, group.join("0000:01:00.0")).unwrap();
    std::fs::create_dir_all(sys.join("bus/pci/drivers/nvidia")).unwrap();
    std::os::unix::fs::symlink(sys.join("bus/pci/drivers/nvidia"), dev.join("driver")).unwrap();
    std::fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
    std::os::unix::fs::symlink(&dev, sys.join("bus/pci/devices/0000:01:00.0")).unwrap();

    let mut options = opts();
    options.sysfs = Sysfs::new(&sys);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), options).unwrap();
    let gpu = PlugFunction::new(device("vfio-pci", "gpu0", "rp0", None))
        .with_host(HostRef::Pci(Bdf::parse("0000:01:00.0").unwrap()));
    let req = PlugRequest::new(qid("rp0"), qid("gpu0"), vec![gpu]);
    match engine.plug(req.clone()) {
        Err(EngineError::Vfio(e)) => assert!(e.to_string().contains("nvidia"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(engine.on_port("rp0").is_none(), "nothing admitted");

    // Bound to vfio-pci the group is viable; QEMU then tries the real host device, which
    // this machine does not have, and the engine rolls back.
    std::fs::remove_file(dev.join("driver")).unwrap();
    std::fs::create_dir_all(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
    std::os::unix::fs::symlink(sys.join("bus/pci/drivers/vfio-pci"), dev.join("driver")).unwrap();
    match engine.plug(req) {
        Err(EngineError::PlugFailed { state: DeviceState::Removed, cause, .. }) => {
            assert!(cause.to_string().contains("vfio"), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    assert!(engine.is_port_free("rp0"));
}

#[test]
fn concurrent_ports_and_serialized_port() {
    let (_q, c, dir) = setup(4, Hotplug::Native);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|n| {
                s.spawn({
                    let engine = &engine;
                    move || engine.plug(single(n, &format!("d{n}"), "e1000e"))
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap().state, DeviceState::Visible);
        }
    });
    // Same port from two threads: exactly one wins, the other finds the port taken.
    assert_eq!(engine.unplug("d0").unwrap(), UnplugOutcome::Removed);
    let results: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| engine.plug(single(0, "x0", "e1000e")));
        let b = s.spawn(|| engine.plug(single(0, "y0", "e1000e")));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(results.iter().any(|r| matches!(r, Err(EngineError::PortBusy { .. }))));
    // An id in use on another port is refused before QEMU sees it.
    assert!(matches!(
        engine.plug(single(0, "d1", "e1000e")),
        Err(EngineError::IdInUse { .. }) | Err(EngineError::PortBusy { .. })
    ));
    let peripherals = names(&c, "/machine/peripheral");
    assert_eq!(
        peripherals.iter().filter(|n| n.starts_with('d') || n.starts_with('x') || n.starts_with('y')).count(),
        4
    );
}

#[test]
fn qemu_killed_during_device_add() {
    let (q, c, dir) = setup(1, Hotplug::Native);
    let pid = rustix::process::Pid::from_raw(q.child.id() as i32).unwrap();
    // Records of a plug: begin, planned, adding, step(device_add) = 4th: kill QEMU there.
    let hook: qmp_hotplug::journal::JournalHook = Arc::new(move |point, n| {
        if point == qmp_hotplug::journal::HookPoint::Durable && n == 4 {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut options = opts();
    options.journal_hook = Some(hook);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), options).unwrap();
    let err = engine.plug(single(0, "n0", "e1000e")).unwrap_err();
    assert!(err.is_connection_lost(), "{err:?}");
    // The interrupted plug stays on record for recovery.
    assert_eq!(engine.device("n0").unwrap().state, DeviceState::Adding);
    drop(q);
}

#[test]
fn qemu_killed_during_unplug_wait() {
    let (mut q, c, dir) = setup(1, Hotplug::Acpi);
    let options = unplug_after(Duration::from_secs(120));
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), options).unwrap();
    engine.plug(single(0, "n0", "e1000e")).unwrap();
    std::thread::scope(|s| {
        let unplug = s.spawn(|| engine.unplug("n0"));
        std::thread::sleep(Duration::from_millis(500));
        q.kill();
        let err = unplug.join().unwrap().unwrap_err();
        assert!(err.is_connection_lost(), "{err:?}");
    });
    assert_eq!(engine.device("n0").unwrap().state, DeviceState::Removing);
}

#[test]
fn passed_descriptor_is_closed_on_unplug() {
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let (engine, _) = Engine::open(Arc::clone(&c), dir.path().join("journal"), opts()).unwrap();
    let req = single(0, "n0", "e1000e").with_fd_path("extra", "/dev/null", false);
    engine.plug(req).unwrap();
    assert_eq!(engine.unplug("n0").unwrap(), UnplugOutcome::Removed);
    let err = c.closefd("extra").unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

/// A descriptor the caller opened is passed, closed by the engine after the plug (QEMU
/// holds its own copy), journaled by name only, and closed in QEMU on unplug.
#[test]
fn held_descriptor_is_passed_and_closed() {
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let journal = dir.path().join("journal");
    let (engine, _) = Engine::open(Arc::clone(&c), &journal, opts()).unwrap();
    let path = dir.path().join("held-file");
    std::fs::write(&path, b"x").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let ours = std::os::fd::AsRawFd::as_raw_fd(&file);
    let req = single(0, "n0", "e1000e").with_fd("held0", std::os::fd::OwnedFd::from(file));
    let rec = engine.plug(req).unwrap();
    assert_eq!(rec.state, DeviceState::Visible);
    // Our descriptor is closed: its number no longer names the file (nothing else opens it).
    let link = std::fs::read_link(format!("/proc/self/fd/{ours}"));
    assert!(link.map_or(true, |l| l != path), "the engine kept the caller's descriptor open");
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(text.contains(r#"{"fdname":"held0","held":true}"#), "{text}");
    assert_eq!(engine.unplug("n0").unwrap(), UnplugOutcome::Removed);
    let err = c.closefd("held0").unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

/// `check_live_windows`: a device whose BARs the port's windows (as SeaBIOS programmed
/// them: 2 MiB prefetchable on a default root port) cannot hold is refused before
/// anything is sent; one that fits is plugged as usual.
#[test]
fn live_window_check_refuses_before_anything_is_sent() {
    use pcilibs::bar::BarKind;
    use pcilibs::requirement::Resource;
    let (_q, c, dir) = setup(1, Hotplug::Native);
    let mut options = opts();
    options.check_live_windows = true;
    let journal = dir.path().join("journal");
    let (engine, _) = Engine::open(Arc::clone(&c), &journal, options).unwrap();
    let mut big = gpu_like(0, 64);
    big.functions[0].needs = vec![Resource::bar(BarKind::Mem64, true, 64 << 20)];
    match engine.plug(big) {
        Err(EngineError::WontFit { port, shortfalls }) => {
            assert_eq!(port, "rp0");
            assert!(shortfalls.len() == 1 && shortfalls[0].starts_with("pref:"), "{shortfalls:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(engine.on_port("rp0").is_none(), "nothing admitted");
    let journal_text = std::fs::read_to_string(&journal).unwrap_or_default();
    assert!(!journal_text.contains("device-add"), "{journal_text}");
    let ids = names(&c, "/machine/peripheral");
    assert!(!ids.contains("gpu0") && !ids.contains("nic0"), "{ids:?}");
    assert!(!names(&c, "/objects").contains("mem0"));

    let mut small = gpu_like(0, 1);
    small.functions[0].needs = vec![Resource::bar(BarKind::Mem64, true, 1 << 20)];
    let rec = engine.plug(small).unwrap();
    assert_eq!(rec.state, DeviceState::Visible);
}

//! Journals written before requests were typed (`tests/fixtures`, see its README): they
//! still read, every request comes back typed (ids, addresses, host functions, device
//! ids), and an engine recovers from them against real QEMU 7.2 and goes on with typed
//! requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{names, Hotplug, Qemu};
use pcie_topology::qemu::PropValue;
use pcie_topology::{DevFn, HostRef, QemuId};
use pcilibs::bdf::Bdf;
use qmp_hotplug::journal::{fold, read_file, Format, OpKind, Record, Step};
use qmp_hotplug::{BarExpectation, DeviceState, Engine, Expectation, PlugRequest, UnplugOutcome};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn qid(id: &str) -> QemuId {
    QemuId::new(id).unwrap()
}

/// The request each `Begin` record of a journal carries, by port.
fn requests(records: &[Record]) -> Vec<(String, PlugRequest)> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Begin { port, request: Some(req), .. } => Some((port.clone(), (**req).clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn every_old_journal_reads_whole() {
    for name in ["journal-v2-engine.journal", "journal-v2-records.journal", "journal-v2-compacted.journal"] {
        let (records, report) = read_file(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.format, Format::Framed, "{name}");
        assert!(report.torn_tail.is_none() && report.damaged.is_empty(), "{name}: {report:?}");
        assert!(!records.is_empty(), "{name}");
    }
}

/// The requests of the engine's own journal: typed ids and addresses, the device id
/// (not written then) found from the functions, guest addresses as `Bdf`s.
#[test]
fn a_real_engines_requests_come_back_typed() {
    let (records, _) = read_file(fixture("journal-v2-engine.journal")).unwrap();
    let reqs = requests(&records);
    let devices: Vec<(&str, &str)> = reqs.iter().map(|(p, r)| (p.as_str(), r.device.as_str())).collect();
    assert_eq!(devices, [("rp0", "gpu0"), ("rp1", "nic1"), ("rp2", "gpu2")]);
    let gpu0 = &reqs[0].1;
    assert_eq!(gpu0.port, qid("rp0"));
    assert_eq!(gpu0.objects[0].id, qid("mem0"));
    assert_eq!(gpu0.objects[0].props["size"], PropValue::Int(64 << 20));
    assert_eq!(gpu0.fds[0].path(), Some(Path::new("/dev/null")));
    let f0 = &gpu0.functions[0];
    assert_eq!((f0.id(), f0.device.addr), (&qid("gpu0"), Some(DevFn::new(0, 0).unwrap())));
    assert!(f0.device.multifunction, "written as a JSON boolean");
    assert_eq!(f0.device.props["memdev"], PropValue::Str("mem0".into()));
    let Expectation::Pci(want) = &f0.expect else { panic!("{f0:?}") };
    assert_eq!(want.bars, [BarExpectation::at(0, 256), BarExpectation::at(2, 64 << 20)]);
    assert_eq!(gpu0.functions[1].device.addr, Some(DevFn::new(0, 1).unwrap()));
    // nic1's BAR expected by size alone, as written.
    let Expectation::Pci(want) = &reqs[1].1.functions[0].expect else { panic!() };
    assert_eq!(want.bars, [BarExpectation::at(0, 128 << 10), BarExpectation::any(16 << 10)]);
    // Guest addresses as query-pci gave them, now `Bdf`s.
    let ports = fold(&records);
    assert_eq!(ports["rp0"].device.guest_address("nic0"), Some(Bdf::new(0, 1, 0, 1).unwrap()));
    assert_eq!(ports["rp2"].device.guest_address("gpu2"), Some(Bdf::new(0, 3, 0, 0).unwrap()));
    assert_eq!(ports["rp1"].device.state, DeviceState::Removed);
}

/// Records of requests no QEMU here can plug: `host=` in both forms and `sysfsdev=`
/// become typed host functions; placeholders, objects and descriptors read; the
/// compacted journal folds to the same ports, open operations and steps.
#[test]
fn vfio_requests_and_snapshots_come_back_typed() {
    let (records, _) = read_file(fixture("journal-v2-records.journal")).unwrap();
    let reqs = requests(&records);
    let vfio = &reqs[0].1;
    assert_eq!(vfio.device, qid("gpu0"), "function 0 of the slot");
    let hosts: Vec<Option<HostRef>> = vfio.functions.iter().map(|f| f.host.clone()).collect();
    let bdf = |s: &str| Some(HostRef::Pci(Bdf::parse(s).unwrap()));
    assert_eq!(hosts, [bdf("0000:41:00.1"), bdf("0000:41:00.0")], "the short form 41:00.0 too");
    assert!(vfio.functions.iter().all(|f| !f.device.props.contains_key("host")));
    assert_eq!(vfio.functions[1].qmp_arguments()["host"], "0000:41:00.0");
    assert_eq!(vfio.functions[1].device.props["rombar"], PropValue::Int(0));
    assert_eq!(vfio.functions[1].device.props["iommufd"], PropValue::Str("iommufd0".into()));
    assert_eq!(vfio.objects[0].qom_type, "iommufd");
    assert!(vfio.fds[0].writable() && vfio.fds[0].path() == Some(Path::new("/dev/iommu")));
    let ph = vfio.placeholder.as_ref().unwrap();
    assert_eq!((ph.devices.as_slice(), ph.objects.as_slice()), (&[qid("ph0")][..], &[qid("ph0-mem")][..]));
    assert_eq!(vfio.functions[0].needs.len(), 1);
    let ccw = &reqs[1].1;
    assert_eq!(ccw.device, qid("dasd0"));
    let path = "/sys/bus/mdev/devices/6dfd3ec5-e8b3-4e18-a6fe-57bc9eceb920";
    assert_eq!(ccw.functions[0].host, Some(HostRef::Sysfsdev(path.into())));
    assert_eq!(reqs[2].1.device, qid("vnet1"), "s390x: the port is the device");

    let ports = fold(&records);
    assert_eq!(ports["rp0"].open_op, Some(OpKind::Plug));
    assert_eq!(ports["rp0"].steps.last(), Some(&Step::DeviceAdd { id: "gpu0-f1".into() }));
    assert_eq!(ports["vnet1"].open_op, Some(OpKind::Unplug));
    assert_eq!(ports["vnet1"].device.guest_address("vnet1"), Some(Bdf::new(0, 0, 1, 0).unwrap()));
    let (compacted, _) = read_file(fixture("journal-v2-compacted.journal")).unwrap();
    assert!(compacted.iter().all(|r| matches!(r, Record::Snapshot { .. })));
    assert_eq!(fold(&compacted), ports);
}

/// The engine's journal, cut after `gpu2`'s first `device_add` (a process killed there),
/// recovered against a fresh QEMU: `gpu0`, which QEMU no longer has, is released; the
/// interrupted plug of `gpu2` is finished. The engine then goes on: `gpu2` unplugs by its
/// device id, and the rewritten journal opens again.
#[test]
fn an_engine_recovers_from_an_old_journal() {
    let text = std::fs::read_to_string(fixture("journal-v2-engine.journal")).unwrap();
    let cut = text.find(r#""device-add","id":"nic2"}"#).unwrap();
    let end = cut + text[cut..].find('\n').unwrap() + 1;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    std::fs::write(&journal, &text[..end]).unwrap();

    let q = Qemu::q35(3, Hotplug::Native);
    let c = Arc::new(q.connect());
    q.wait_firmware(&c, 3);
    let (engine, report) =
        Engine::open(Arc::clone(&c), &journal, common::unplug_after(Duration::from_secs(20)))
            .unwrap_or_else(|e| panic!("an old journal opens: {e}"));
    let actions: Vec<(&str, &str, DeviceState)> =
        report.actions.iter().map(|a| (a.port.as_str(), a.device.as_str(), a.after)).collect();
    assert_eq!(
        actions,
        [("rp0", "gpu0", DeviceState::Removed), ("rp2", "gpu2", DeviceState::Visible)],
        "{report:?}"
    );
    assert!(report.actions[1].action.contains("finished plug"), "{report:?}");
    let rec = engine.device("gpu2").unwrap();
    assert_eq!(rec.guest_address("gpu2"), Some(Bdf::new(0, 3, 0, 0).unwrap()));
    assert!(names(&c, "/objects").contains("mem2"));
    assert_eq!(engine.unplug("gpu2").unwrap(), UnplugOutcome::Removed);
    assert!(engine.is_port_free("rp0") && engine.is_port_free("rp2"));
    drop(engine);
    let (_, report) = Engine::open(c, &journal, Default::default()).unwrap();
    assert!(!report.had_interrupted(), "{report:?}");
}

//! Plan files: a plan reads back as itself, plan files of older format versions (written
//! by earlier versions of this crate, kept in `tests/fixtures/`) read as the plan today's
//! planner makes from the same request, and versions this build does not know are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::Q35;
use pcie_topology::plan::GuestLocation;
use pcie_topology::request::{FunctionRequest, FunctionResource};
use pcie_topology::units::{GIB, MIB};
use pcie_topology::{
    plan, Addressing, Attach, DeviceRequest, HostRef, HotplugProfile, Mode, Plan, PlanError, PlanOptions,
    PlanRequest, QemuId, ResourceRole, SpareRequest, PLAN_VERSION, PLAN_VERSION_OLDEST,
};
use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use serde_json::Value;

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn bdf(text: &str) -> Bdf {
    Bdf::parse(text).unwrap()
}

/// What `plan-v2-q35-seabios-switch.json` was planned from: a two-function host device
/// and a stand-in behind a switch, a conventional NIC behind the PCIe-to-PCI bridge, a
/// device plugged at boot, spares on the switch and on root ports; then a stand-in placed
/// at run time onto the switch's spare (whose placeholder it removes).
fn seabios_switch() -> Plan {
    let mut host = DeviceRequest::new(
        QemuId::new("hostgpu").unwrap(),
        vec![
            FunctionRequest::vfio(
                0,
                bdf("0000:01:00.0"),
                vec![
                    FunctionResource::bar(0, BarKind::Mem32, false, 16 * MIB),
                    FunctionResource::bar(1, BarKind::Mem64, true, 32 * GIB),
                    FunctionResource::rom(128 << 10),
                ],
            ),
            FunctionRequest::vfio(
                1,
                bdf("0000:01:00.1"),
                vec![FunctionResource::bar(0, BarKind::Mem32, false, 16 << 10)],
            ),
        ],
    );
    host.p2p_group = Some("g".into());
    host.iommu_group = Some(7);
    let mut gpu0 = DeviceRequest::ivshmem("gpu0", 8 * GIB).unwrap();
    gpu0.p2p_group = Some("g".into());
    let mut nic = DeviceRequest::new(
        QemuId::new("nic0").unwrap(),
        vec![FunctionRequest::new(
            0,
            "e1000",
            vec![FunctionResource::bar(0, BarKind::Mem32, false, 128 << 10)],
        )],
    );
    nic.functions[0].pcie = false;
    nic.attach = Attach::PciBridge;
    nic.cold_plug = true;
    let mut boot = DeviceRequest::ivshmem("boot0", GIB).unwrap();
    boot.cold_plug = true;
    let request = PlanRequest::default()
        .with_mode(Mode::SwitchPort)
        .with_devices(vec![host, gpu0, nic, boot])
        .with_spares(vec![
            SpareRequest::new(HotplugProfile::h100(), 1).with_p2p_group("g"),
            SpareRequest::new(HotplugProfile::a100(), 2),
        ])
        .with_options({
            let mut o = PlanOptions::default();
            o.spare_bus_reserve = 2;
            o
        });
    let mut p = plan(&Q35::seabios(), &request).unwrap();
    let mut late = DeviceRequest::ivshmem("late0", 64 * GIB).unwrap();
    late.p2p_group = Some("g".into());
    p.place(late).unwrap();
    p
}

/// What `plan-v2-q35-ovmf-numa.json` was planned from: a stand-in on each of two NUMA
/// nodes' expanders and a spare on node 1.
fn ovmf_numa() -> Plan {
    let mut a = DeviceRequest::ivshmem("a", 16 * GIB).unwrap();
    a.numa_node = Some(0);
    let mut b = DeviceRequest::ivshmem("b", 16 * GIB).unwrap();
    b.numa_node = Some(1);
    let mut h100 = SpareRequest::new(HotplugProfile::h100(), 1);
    h100.numa_node = Some(1);
    let request =
        PlanRequest::default().with_mode(Mode::Numa).with_devices(vec![a, b]).with_spares(vec![h100]);
    plan(&Q35::ovmf(), &request).unwrap()
}

#[test]
fn plans_read_back_as_themselves() {
    for p in [seabios_switch(), ovmf_numa(), s390x()] {
        assert_eq!(p.version, PLAN_VERSION);
        let json = p.to_json().unwrap();
        assert_eq!(Plan::from_json(&json).unwrap(), p);
        assert_eq!(Plan::from_json(&json).unwrap().to_json().unwrap(), json, "same plan, same bytes");
    }
}

/// Version 3 writes addresses as text: guest addresses and the host function.
#[test]
fn addresses_are_text_in_the_plan_file() {
    let v: Value = serde_json::from_str(&seabios_switch().to_json().unwrap()).unwrap();
    let host = v["devices"].as_array().unwrap().iter().find(|d| d["id"] == "hostgpu").unwrap();
    let f1 = host["functions"].as_array().unwrap().iter().find(|f| f["function"] == 1).unwrap();
    assert_eq!(f1["host"], serde_json::json!({"pci": "0000:01:00.1"}));
    assert!(f1["location"]["bdf"].as_str().unwrap().ends_with(":00.1"), "{}", f1["location"]);
    assert!(v["ports"].as_array().unwrap().iter().all(|p| p["bdf"].is_string()));
}

#[test]
fn version_2_plans_read_as_todays_plans() {
    for (file, today) in
        [("plan-v2-q35-seabios-switch.json", seabios_switch()), ("plan-v2-q35-ovmf-numa.json", ovmf_numa())]
    {
        let old = Plan::from_json(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        // The OVMF platform has since learnt where OVMF puts a small aperture
        // (`top_eighth_from_bits`); a file written before cannot say it and keeps the
        // description it was planned with. This plan's aperture is large, so nothing else
        // differs.
        let mut today = today;
        today.platform.mmio64 = old.platform.mmio64;
        // q35 plans ask the guest kernel to add no I/O windows of its own since.
        assert_eq!(today.extra.kernel, ["pci=hpiosize=0"], "{file}");
        today.extra.kernel = old.extra.kernel.clone();
        // OVMF's aperture is a power of two since (power-of-two windows then always pack,
        // and it leaves room for OVMF's padding of downstream ports): a file written
        // before keeps the aperture, and the fw_cfg size, it was planned with.
        if file.contains("ovmf") {
            assert_eq!(old.address.mmio64_aperture.map(|a| a.size), Some(288 << 30), "{file}");
            assert_eq!(today.address.mmio64_aperture.map(|a| a.size), Some(512 << 30), "{file}");
            today.address = old.address;
            today.extra = old.extra.clone();
        }
        // A switch's root port records what its downstream windows need packed the way
        // firmware places them, largest alignment first (98 MiB here, 112 MiB in port
        // order before); its window is what it was.
        for (o, t) in old.ports.iter().zip(today.ports.iter_mut()) {
            if t.reservation.purpose.starts_with("switch ") {
                assert_eq!(o.reservation.mem, t.reservation.mem, "{file}: {}", t.id);
                assert!(t.reservation.need.mem.size <= o.reservation.need.mem.size, "{file}: {}", t.id);
                t.reservation.need = o.reservation.need;
            }
        }
        assert_eq!(old, today, "{file}");
    }
    let old = Plan::from_json(&fixture("plan-v2-q35-seabios-switch.json")).unwrap();
    let f = &old.device("hostgpu").unwrap().functions;
    assert_eq!(f[1].host, Some(HostRef::Pci(bdf("0000:01:00.1"))));
    assert_eq!(old.hotplug_action("hostgpu").unwrap().functions[1].guest.bdf(), f[0].location.bdf());
}

/// What `plan-v2-s390x.json` was planned from (by the s390x crate's own planner then): a
/// channel device, a host function as zPCI function and a vfio-ap device at boot; then a
/// zPCI and a channel device placed at run time.
fn s390x() -> Plan {
    let bar = FunctionResource::bar(0, BarKind::Mem64, false, 16 << 10);
    let devices = [
        DeviceRequest::channel(QemuId::new("net0").unwrap(), "virtio-net-ccw", 0),
        DeviceRequest::new(
            QemuId::new("nvme0").unwrap(),
            vec![FunctionRequest::vfio(0, bdf("0000:00:00.0"), vec![bar])],
        ),
        DeviceRequest::vfio_ap(
            QemuId::new("ap0").unwrap(),
            "/sys/devices/vfio_ap/matrix/11111111-2222-3333-4444-555555555555",
        ),
    ]
    .map(|mut d| {
        d.cold_plug = true;
        d
    });
    let request = PlanRequest::default().with_devices(devices.to_vec());
    let mut p = plan(&S390xCcw::default(), &request).unwrap();
    let nic = DeviceRequest::new(
        QemuId::new("nic1").unwrap(),
        vec![FunctionRequest::new(0, "virtio-net-pci", vec![])],
    );
    p.place(nic).unwrap();
    p.place(DeviceRequest::channel(QemuId::new("blk1").unwrap(), "virtio-blk-ccw", 0)).unwrap();
    p
}

#[test]
fn version_2_s390x_plans_read_as_todays_plans() {
    let old = Plan::from_json(&fixture("plan-v2-s390x.json")).unwrap();
    assert_eq!(old, s390x());
    assert_eq!(old.platform.addressing, Addressing::Zpci { first_devno: 0x100 });
    let nvme = &old.device("nvme0").unwrap().functions[0];
    assert_eq!(nvme.host, Some(HostRef::Pci(bdf("0000:00:00.0"))));
    let GuestLocation::Zpci { uid, bdf: at, .. } = nvme.location else { panic!("{:?}", nvme.location) };
    assert_eq!(at, bdf(&format!("{uid:04x}:00:00.0")));
    assert_eq!(old.device("nic1").unwrap().functions[0].location.bdf(), Some(bdf("0002:00:00.0")));
    // The numbers of the old plan are taken: the next device gets the next free ones.
    let mut old = old;
    let a = old.place(DeviceRequest::channel(QemuId::new("net2").unwrap(), "virtio-net-ccw", 0)).unwrap();
    assert_eq!(a.functions[0].guest, GuestLocation::Ccw { busid: "0.0.0102".into() });
}

/// `json` with `version` set and, in every object that has them, the members `drop` removed.
fn rewrite(json: &str, version: u64, drop: &[&str]) -> String {
    fn walk(v: &mut Value, drop: &[&str]) {
        match v {
            Value::Object(m) => {
                for k in drop {
                    m.remove(*k);
                }
                m.values_mut().for_each(|v| walk(v, drop));
            }
            Value::Array(a) => a.iter_mut().for_each(|v| walk(v, drop)),
            _ => {}
        }
    }
    let mut v: Value = serde_json::from_str(json).unwrap();
    walk(&mut v, drop);
    v["version"] = version.into();
    v.to_string()
}

#[test]
fn version_1_plans_read_as_bars_of_unknown_index() {
    // Version 1 had the version 2 addresses and no index or role anywhere.
    let v2 = fixture("plan-v2-q35-seabios-switch.json");
    let old = Plan::from_json(&rewrite(&v2, 1, &["index", "role"])).unwrap();
    assert_eq!(old.version, PLAN_VERSION);
    for d in &old.devices {
        let bars = d.functions.iter().flat_map(|f| f.bars.iter());
        assert!(bars.clone().all(|b| b.index.is_none() && b.role == ResourceRole::Bar), "{}", d.id);
    }
    assert_eq!(old.ports.len(), seabios_switch().ports.len());
    assert_eq!(old.device_args(), seabios_switch().device_args());
}

#[test]
fn other_versions_are_refused() {
    let json = seabios_switch().to_json().unwrap();
    for version in [0, u64::from(PLAN_VERSION) + 1] {
        match Plan::from_json(&rewrite(&json, version, &[])) {
            Err(e @ PlanError::Version { found, oldest, supported }) => {
                assert_eq!(
                    (u64::from(found), oldest, supported),
                    (version, PLAN_VERSION_OLDEST, PLAN_VERSION)
                );
                assert!(e.to_string().contains(&format!("reads versions {PLAN_VERSION_OLDEST} to")), "{e}");
            }
            other => panic!("version {version}: {other:?}"),
        }
    }
    // A version 2 plan whose addresses are not what version 2 wrote is an error, not a guess.
    let mut broken: Value = serde_json::from_str(&fixture("plan-v2-q35-ovmf-numa.json")).unwrap();
    broken["ports"][0]["bdf"]["devfn"]["slot"] = 40.into();
    match Plan::from_json(&broken.to_string()) {
        Err(PlanError::Json(e)) => assert!(e.contains("device number 0x28"), "{e}"),
        other => panic!("{other:?}"),
    }
}

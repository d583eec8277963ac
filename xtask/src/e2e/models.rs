//! The emulated device models scenarios plug: their QEMU driver, the ids the guest sees,
//! and their BARs (index, space, size), so that the planner gets real resources and the
//! guest check knows which `resource` line must be assigned.
//!
//! BAR layouts are QEMU 7.2's, as the guest kernel reports them on a PCI Express port
//! (`pcilibs/tests/fixtures/qemu-x86_64/expected.json` holds the same facts read from a
//! guest): virtio devices there are modern-only, without an I/O BAR. `virtio-net-pci`
//! and `e1000e` also carry QEMU's iPXE option ROM (`efi-virtio.rom`, `efi-e1000e.rom`:
//! 244 KiB in bookworm, 256 KiB in trixie and later), an expansion ROM BAR of 256 KiB
//! that the guest kernel places in the port's 32-bit window like any other BAR.

use pcilibs::bar::BarKind;
use pcilibs::requirement::Resource;

use crate::scenario::DeviceKind;

/// One BAR of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR index (0–5; [`ROM`] for the expansion ROM).
    pub index: u8,
    /// Address space.
    pub kind: BarKind,
    /// Prefetchable.
    pub prefetchable: bool,
    /// Size in bytes.
    pub size: u64,
}

/// The index `query-pci` and the planner give the expansion ROM.
pub const ROM: u8 = qmp_hotplug::BarExpectation::ROM;

/// QEMU's iPXE option ROMs round up to a 256 KiB ROM BAR.
const IPXE_ROM: u64 = 256 * KIB;

impl BarSpec {
    const fn new(index: u8, kind: BarKind, prefetchable: bool, size: u64) -> Self {
        BarSpec { index, kind, prefetchable, size }
    }

    /// The expansion ROM of `size` bytes.
    const fn rom(size: u64) -> Self {
        BarSpec { index: ROM, kind: BarKind::Mem32, prefetchable: false, size }
    }

    /// Whether this is the expansion ROM.
    pub fn is_rom(&self) -> bool {
        self.index == ROM
    }

    /// As a planner resource.
    pub fn resource(&self) -> Resource {
        Resource { rom: self.is_rom(), ..Resource::bar(self.kind, self.prefetchable, self.size) }
    }
}

/// A device model as plugged by a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// QEMU driver.
    pub driver: &'static str,
    /// PCI vendor id the guest sees (0 for channel devices).
    pub vendor: u16,
    /// PCI device id the guest sees on a PCI Express port.
    pub device: u16,
    /// PCI device ids the function may show on s390x's zPCI bus: virtio devices there are
    /// transitional (`1af4:1000`) up to QEMU's `s390-ccw-virtio-11.0` machine and
    /// modern-only (`1af4:1041`, as on a PCI Express port) from `s390-ccw-virtio-11.1`
    /// on. Which one a run gets is read from QEMU (`query-pci`) after the plug.
    pub zpci_devices: &'static [u16],
    /// BARs.
    pub bars: Vec<BarSpec>,
    /// Needs a block device (`drive=`): a `null-co` node is created at boot.
    pub needs_drive: bool,
    /// Needs a `serial=` (nvme).
    pub needs_serial: bool,
    /// Channel device: control unit type the guest reports (`3832/01`).
    pub cutype: Option<&'static str>,
}

const KIB: u64 = 1 << 10;

/// The model of `kind`; `bar_size` is the large BAR of an ivshmem.
pub fn model(kind: DeviceKind, bar_size: Option<u64>) -> Model {
    use BarKind::{Io, Mem32, Mem64};
    let virtio = |driver: &'static str, device: u16, zpci_devices: &'static [u16], needs_drive: bool| Model {
        driver,
        vendor: 0x1af4,
        device,
        zpci_devices,
        bars: vec![BarSpec::new(1, Mem32, false, 4 * KIB), BarSpec::new(4, Mem64, true, 16 * KIB)],
        needs_drive,
        needs_serial: false,
        cutype: None,
    };
    let ccw = |driver: &'static str, cutype: &'static str, needs_drive: bool| Model {
        driver,
        vendor: 0,
        device: 0,
        zpci_devices: &[],
        bars: Vec::new(),
        needs_drive,
        needs_serial: false,
        cutype: Some(cutype),
    };
    match kind {
        DeviceKind::Ivshmem => Model {
            driver: "ivshmem-plain",
            vendor: 0x1af4,
            device: 0x1110,
            zpci_devices: &[0x1110],
            bars: vec![
                BarSpec::new(0, Mem32, false, 256),
                BarSpec::new(2, Mem64, true, bar_size.unwrap_or(1 << 30)),
            ],
            needs_drive: false,
            needs_serial: false,
            cutype: None,
        },
        DeviceKind::VirtioNet => {
            let mut m = virtio("virtio-net-pci", 0x1041, &[0x1000, 0x1041], false);
            m.bars.push(BarSpec::rom(IPXE_ROM));
            m
        }
        DeviceKind::VirtioBlk => virtio("virtio-blk-pci", 0x1042, &[0x1001, 0x1042], true),
        DeviceKind::Nvme => Model {
            driver: "nvme",
            vendor: 0x1b36,
            device: 0x0010,
            zpci_devices: &[0x0010],
            bars: vec![BarSpec::new(0, Mem64, false, 16 * KIB)],
            needs_drive: false,
            needs_serial: true,
            cutype: None,
        },
        DeviceKind::E1000e => Model {
            driver: "e1000e",
            vendor: 0x8086,
            device: 0x10d3,
            zpci_devices: &[0x10d3],
            bars: vec![
                BarSpec::new(0, Mem32, false, 128 * KIB),
                BarSpec::new(1, Mem32, false, 128 * KIB),
                BarSpec::new(2, Io, false, 32),
                BarSpec::new(3, Mem32, false, 16 * KIB),
                BarSpec::rom(IPXE_ROM),
            ],
            needs_drive: false,
            needs_serial: false,
            cutype: None,
        },
        DeviceKind::VirtioNetCcw => ccw("virtio-net-ccw", "3832/01", false),
        DeviceKind::VirtioBlkCcw => ccw("virtio-blk-ccw", "3832/02", true),
    }
}

impl Model {
    /// The (index, size) pairs the guest must show, for [`guest_harness::reporter::GuestState::bar_problems`].
    pub fn expected_bars(&self) -> Vec<(u8, u64)> {
        self.bars.iter().filter(|b| !b.is_rom()).map(|b| (b.index, b.size)).collect()
    }

    /// Planner resources of one function.
    pub fn resources(&self) -> Vec<Resource> {
        self.bars.iter().map(BarSpec::resource).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_match_the_guest_fixture() {
        // Facts from pcilibs' q35 guest fixture (expected.json): vendor, device, BARs.
        let text = std::fs::read_to_string(
            guest_harness::workspace_root().join("pcilibs/tests/fixtures/qemu-x86_64/expected.json"),
        )
        .unwrap();
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (bdf, kind) in [
            ("0000:01:00.0", DeviceKind::E1000e),
            ("0000:06:00.0", DeviceKind::Nvme),
            ("0000:08:00.0", DeviceKind::VirtioBlk),
            ("0000:0c:00.0", DeviceKind::VirtioNet),
        ] {
            let f = &fixture[bdf];
            let m = model(kind, None);
            assert_eq!(f["vendor"].as_str().unwrap(), format!("{:04x}", m.vendor), "{bdf}");
            assert_eq!(f["device"].as_str().unwrap(), format!("{:04x}", m.device), "{bdf}");
            let bars = f["bars"].as_object().unwrap();
            assert_eq!(bars.len(), m.expected_bars().len(), "{bdf}");
            for b in m.bars.iter().filter(|b| !b.is_rom()) {
                let want = &bars[&b.index.to_string()];
                assert_eq!(want["size"].as_u64().unwrap(), b.size, "{bdf} BAR {}", b.index);
                assert_eq!(want["prefetchable"].as_bool().unwrap(), b.prefetchable, "{bdf} BAR {}", b.index);
                let kind = match b.kind {
                    BarKind::Io => "io",
                    BarKind::Mem32 => "mem32",
                    _ => "mem64",
                };
                assert_eq!(want["kind"].as_str().unwrap(), kind, "{bdf} BAR {}", b.index);
            }
        }
        let shm = &fixture["0000:09:00.0"];
        let m = model(DeviceKind::Ivshmem, Some(1 << 30));
        assert_eq!(shm["bars"]["2"]["size"].as_u64().unwrap(), m.bars[1].size);
        assert_eq!(shm["bars"]["0"]["size"].as_u64().unwrap(), m.bars[0].size);
    }
}

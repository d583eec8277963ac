//! Kata Containers' QEMU VM in the planner's terms: its hypervisor device settings, its
//! own devices on `pcie.0`, its device ids and its agent's VFIO option strings.
//!
//! Nothing here depends on Kata: the settings are plain values with the names and
//! meanings of Kata's `[hypervisor.qemu]` keys (after Kata's own adjustments: a
//! `default_maxmemory` of 0 is the host's memory there, resolved before it gets here).
//!
//! - [`KataConfig::plan_request`]: `pcie_root_port` / `pcie_switch_port` (how many ports
//!   Kata creates at boot, cold-plugged devices included), `cold_plug_vfio` /
//!   `hot_plug_vfio` ([`PortSetting`]: `root-port`, `switch-port`, `bridge-port`,
//!   `no-port`) and a profile for the spare ports (Kata has no key for what a spare must
//!   hold) become a [`PlanRequest`]; Kata's own devices on `pcie.0` (its bridges,
//!   `virtio-rng-pci`, `vhost-vsock-pci`, `virtio-serial-pci`, … without `addr=`) and its
//!   memory hotplug become the request's [`Foreign`] part; expander root buses are
//!   numbered as Kata's agent reads them; `pci=assign-busses` in the guest kernel's
//!   parameters marks the plan's bus numbers as not holding in the guest.
//! - [`qemu_id`] / [`runtime_id`]: Kata's device ids are hex strings (`3fa9c2e1b0d4e577`)
//!   that QEMU refuses (an id must start with a letter); they map to valid QEMU ids and
//!   back, deterministically, and the plan keeps both ([`DeviceRequest::runtime_id`],
//!   [`Plan::device_by_runtime_id`]).
//! - [`vfio_options`]: the agent's `Device.options` for a VFIO device, `DDDD:BB:DD.F=<path>`
//!   for every function of every device of the IOMMU group, the path in the agent's form
//!   ([`GuestPciPath::kata`]).
//! - [`group_request`]: a `/dev/vfio/<group>` or `/dev/vfio/devices/vfioX` node as Kata
//!   is handed it → the host functions (through `pcilibs`'s host layer) → one
//!   [`DeviceRequest`].

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use pcilibs::requirement::Resource;
use pcilibs::sysfs::{Sysfs, SysfsError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::PlanError;
use crate::foreign::{Foreign, ForeignDevice, MemoryHotplug};
use crate::plan::{ExpanderBuses, Mode, PlacedDevice, PlacedFunction, Plan, PlanRequest, SpareRequest};
use crate::qemu::{DevFn, QemuError, QemuId};
use crate::request::{Attach, DeviceRequest, HostRef, HotplugProfile, RequestError};
use crate::units::MIB;

/// Errors of the Kata mapping.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KataError {
    /// A `cold_plug_vfio` / `hot_plug_vfio` value Kata does not have.
    #[error("`{0}` is not a port setting (root-port, switch-port, bridge-port, no-port)")]
    PortSetting(String),
    /// Kata refuses root ports and switch ports at once.
    #[error("pcie_root_port and pcie_switch_port are both set; Kata allows one of them")]
    BothPortKinds,
    /// Devices to cold-plug with `cold_plug_vfio = "no-port"`.
    #[error("{0} devices to cold-plug, but cold_plug_vfio is no-port")]
    ColdPlugOff(usize),
    /// Spare ports without a profile of what they must hold.
    #[error("{count} spare ports from {key}, but no profile of what they must hold (Kata has no key for it: pass one)")]
    NoSpareProfile {
        /// `pcie_root_port` or `pcie_switch_port`.
        key: &'static str,
        /// How many spares.
        count: u32,
    },
    /// A machine type the mapping does not plan for.
    #[error("machine type `{0}`: the mapping plans q35 and virt")]
    Machine(String),
    /// A device of the plan has no path Kata's agent reads.
    #[error("device `{0}` has no guest path Kata's agent reads (an expander root bus below 0x20: plan with ExpanderBuses::KataAgent)")]
    NoAgentPath(String),
    /// A device is not in the plan.
    #[error("device `{0}` is not in the plan")]
    UnknownDevice(String),
    /// A VFIO node names no host functions.
    #[error("{0}: no PCI functions behind it")]
    EmptyGroup(String),
    /// The id mapping was given text that no Kata id maps to.
    #[error("`{0}` is not a QEMU id this mapping made")]
    NotMapped(String),
    /// A QEMU id could not be made.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// A device request is invalid.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The host layer failed (sysfs, `/dev/vfio`).
    #[error(transparent)]
    Host(#[from] SysfsError),
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Kata's `cold_plug_vfio` / `hot_plug_vfio` values: where VFIO devices go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PortSetting {
    /// `no-port`: not at all (cold plug or hotplug of VFIO devices off).
    #[default]
    NoPort,
    /// `root-port`: one root port each.
    RootPort,
    /// `switch-port`: downstream ports of one switch.
    SwitchPort,
    /// `bridge-port`: slots of a PCI bridge.
    BridgePort,
}

impl FromStr for PortSetting {
    type Err = KataError;
    fn from_str(s: &str) -> Result<Self, KataError> {
        match s {
            "no-port" | "" => Ok(PortSetting::NoPort),
            "root-port" => Ok(PortSetting::RootPort),
            "switch-port" => Ok(PortSetting::SwitchPort),
            "bridge-port" => Ok(PortSetting::BridgePort),
            other => Err(KataError::PortSetting(other.to_string())),
        }
    }
}

impl fmt::Display for PortSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortSetting::NoPort => "no-port",
            PortSetting::RootPort => "root-port",
            PortSetting::SwitchPort => "switch-port",
            PortSetting::BridgePort => "bridge-port",
        })
    }
}

/// The peer-to-peer group the mapping puts every device and spare of Kata's switch in:
/// Kata makes one switch.
pub const SWITCH_GROUP: &str = "kata-switch";

/// Kata's `vhost-vsock-pci`, `virtio-serial-pci` (the console) and `virtio-rng-pci`: the
/// devices every Kata VM on q35 has on `pcie.0` without `addr=`.
pub const DEFAULT_ROOT_DEVICES: [&str; 3] = ["virtio-rng-pci", "virtio-serial-pci", "vhost-vsock-pci"];

/// Kata's QEMU settings that shape the guest's PCI topology, under Kata's key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KataConfig {
    /// `machine_type` (`q35`, `virt`).
    pub machine_type: String,
    /// `firmware`: empty for SeaBIOS; an image (OVMF) makes Kata put each bridge behind a
    /// root port of its own.
    pub firmware: String,
    /// `default_bridges`: Kata's bridges at slots 2, 3, …
    pub default_bridges: u32,
    /// `pcie_root_port`: root ports created at boot, cold-plugged devices' included.
    pub pcie_root_port: u32,
    /// `pcie_switch_port`: switch downstream ports created at boot, cold-plugged
    /// devices' included.
    pub pcie_switch_port: u32,
    /// `cold_plug_vfio`.
    pub cold_plug_vfio: PortSetting,
    /// `hot_plug_vfio`.
    pub hot_plug_vfio: PortSetting,
    /// `default_memory` in MiB.
    pub default_memory: u32,
    /// `memory_slots`.
    pub memory_slots: u32,
    /// `default_maxmemory` in MiB, as Kata resolved it (0: no memory hotplug).
    pub default_maxmemory: u32,
    /// Confidential guests get no memory hotplug region.
    pub confidential_guest: bool,
    /// `kernel_params` (the NVIDIA configurations add `pci=realloc pci=nocrs
    /// pci=assign-busses`).
    pub kernel_params: String,
    /// Devices Kata puts on `pcie.0` without `addr=`, as QEMU drivers
    /// ([`DEFAULT_ROOT_DEVICES`]; add `virtio-scsi-pci`, `virtio-balloon-pci`, network
    /// devices, … as the configuration has them).
    pub root_devices: Vec<String>,
    /// One `pxb-pcie` expander per NUMA node for the devices of that node (Kata's NUMA
    /// topology).
    pub numa: bool,
}

impl Default for KataConfig {
    /// Kata's defaults on q35 with SeaBIOS: one bridge, no VFIO ports, 2 GiB of memory,
    /// 10 memory slots, no maxmem resolved yet.
    fn default() -> Self {
        KataConfig {
            machine_type: "q35".into(),
            firmware: String::new(),
            default_bridges: 1,
            pcie_root_port: 0,
            pcie_switch_port: 0,
            cold_plug_vfio: PortSetting::NoPort,
            hot_plug_vfio: PortSetting::NoPort,
            default_memory: 2048,
            memory_slots: 10,
            default_maxmemory: 0,
            confidential_guest: false,
            kernel_params: String::new(),
            root_devices: DEFAULT_ROOT_DEVICES.map(String::from).to_vec(),
            numa: false,
        }
    }
}

/// A virtio device on `pcie.0` as QEMU 7.2 builds it on q35: a legacy I/O BAR, the MSI-X
/// table and the modern 64-bit BAR (`query-pci` of Kata's `virtio-rng-pci` and
/// `virtio-serial-pci`).
fn virtio_on_root(driver: &str) -> ForeignDevice {
    ForeignDevice::auto("", driver).with_resources(vec![
        Resource::bar(BarKind::Io, false, 0x40),
        Resource::bar(BarKind::Mem32, false, 4 << 10),
        Resource::bar(BarKind::Mem64, true, 16 << 10),
    ])
}

/// Kata's bridge `index` (`pci-bridge-<index>` at slot `2 + index`): a `pci-bridge` under
/// SeaBIOS (one bus, windows of 2 MiB as SeaBIOS gives them), a `pcie-root-port` with
/// `bus-reserve=1` and a `pcie-pci-bridge` behind it under UEFI (two buses, the windows
/// OVMF gives the pair: 3 MiB and 512 MiB prefetchable).
fn kata_bridge(index: u32, uefi: bool) -> Result<ForeignDevice, KataError> {
    // Past slot 0x1f (which `DevFn::new` refuses) whatever the index.
    let addr = DevFn::new(u8::try_from(index.saturating_add(2)).unwrap_or(u8::MAX), 0)?;
    let windows = |mem: u64, pref: u64| {
        vec![
            Resource::bar(BarKind::Mem32, false, mem),
            Resource::bar(BarKind::Mem64, true, pref),
            Resource::bar(BarKind::Io, false, 4 << 10),
        ]
    };
    Ok(if uefi {
        ForeignDevice::at(&format!("rp-pci-bridge-{index}"), "pcie-root-port", addr)
            .with_buses(2)
            .with_resources(windows(4 * MIB, 512 * MIB))
    } else {
        ForeignDevice::at(&format!("pci-bridge-{index}"), "pci-bridge", addr)
            .with_buses(1)
            .with_resources(windows(2 * MIB, 2 * MIB))
    })
}

impl KataConfig {
    /// Whether Kata boots the guest with UEFI firmware (`firmware` set).
    pub fn uefi(&self) -> bool {
        !self.firmware.is_empty()
    }

    /// Whether the guest kernel renumbers every bus (`pci=assign-busses`, alone or in a
    /// `pci=` list).
    pub fn guest_renumbers_buses(&self) -> bool {
        self.kernel_params
            .split_whitespace()
            .filter_map(|p| p.strip_prefix("pci="))
            .any(|v| v.split(',').any(|o| o == "assign-busses"))
    }

    /// What Kata puts on the machine besides the plan: its devices on `pcie.0` (the
    /// auto-addressed ones in the lowest free slots, its bridges at 2, 3, …) and memory
    /// hotplug (`-m <default_memory>M,slots=<memory_slots>,maxmem=<default_maxmemory>M`).
    pub fn foreign(&self) -> Result<Foreign, KataError> {
        let mut devices: Vec<ForeignDevice> = Vec::new();
        for (i, driver) in self.root_devices.iter().enumerate() {
            // Kata adds its random-number device before its bridges; the rest after.
            if i == 0 {
                devices.push(virtio_on_root(driver));
                for b in 0..self.default_bridges {
                    devices.push(kata_bridge(b, self.uefi())?);
                }
            } else {
                devices.push(virtio_on_root(driver));
            }
        }
        if self.root_devices.is_empty() {
            for b in 0..self.default_bridges {
                devices.push(kata_bridge(b, self.uefi())?);
            }
        }
        let mut foreign = Foreign::new().with_devices(devices);
        let ram = u64::from(self.default_memory) * MIB;
        let maxmem = u64::from(self.default_maxmemory) * MIB;
        if !self.confidential_guest && self.memory_slots > 0 && maxmem > ram {
            foreign = foreign.with_memory_hotplug(MemoryHotplug::new(self.memory_slots, maxmem));
        }
        Ok(foreign)
    }

    /// The plan request for a Kata VM: `cold` are the devices Kata cold-plugs (their
    /// [`DeviceRequest::cold_plug`] is set here), the remaining ports of
    /// `pcie_root_port` / `pcie_switch_port` become spares for `spare` (each a port that
    /// holds such a device wherever the firmware puts it).
    ///
    /// `root-port` puts each device on a root port; `switch-port` puts the devices (and the
    /// spares) behind one switch; `bridge-port` puts cold-plugged devices behind a
    /// PCIe-to-PCI bridge (hotplug there needs no spare port); `no-port` refuses
    /// cold-plugged devices and makes no spares. In NUMA mode each device goes on its
    /// node's expander (its [`DeviceRequest::numa_node`]), spares on the first node's.
    pub fn plan_request(
        &self,
        cold: Vec<DeviceRequest>,
        spare: Option<HotplugProfile>,
    ) -> Result<PlanRequest, KataError> {
        if !matches!(self.machine_type.as_str(), "q35" | "virt") {
            return Err(KataError::Machine(self.machine_type.clone()));
        }
        if self.pcie_root_port > 0 && self.pcie_switch_port > 0 {
            return Err(KataError::BothPortKinds);
        }
        if self.cold_plug_vfio == PortSetting::NoPort && !cold.is_empty() {
            return Err(KataError::ColdPlugOff(cold.len()));
        }
        let cold_count = u32::try_from(cold.len()).unwrap_or(u32::MAX);
        let mut devices = Vec::with_capacity(cold.len());
        for mut d in cold {
            d.cold_plug = true;
            match self.cold_plug_vfio {
                PortSetting::SwitchPort => d.p2p_group = Some(SWITCH_GROUP.into()),
                PortSetting::BridgePort => d.attach = Attach::PciBridge,
                _ => {}
            }
            devices.push(d);
        }
        // The ports of the hotplug kind that cold-plugged devices do not take are spares
        // (Kata counts the cold-plugged ones in the same setting; with fewer ports than
        // cold-plugged devices, it makes one per device, as the plan does).
        let (key, ports) = match self.hot_plug_vfio {
            PortSetting::SwitchPort => ("pcie_switch_port", self.pcie_switch_port),
            _ => ("pcie_root_port", self.pcie_root_port),
        };
        let used = if self.cold_plug_vfio == self.hot_plug_vfio { cold_count } else { 0 };
        let spares_wanted = match self.hot_plug_vfio {
            PortSetting::RootPort | PortSetting::SwitchPort => ports.saturating_sub(used),
            _ => 0,
        };
        let mut spares = Vec::new();
        if spares_wanted > 0 {
            let profile = spare.ok_or(KataError::NoSpareProfile { key, count: spares_wanted })?;
            let mut s = SpareRequest::new(profile, spares_wanted);
            if self.hot_plug_vfio == PortSetting::SwitchPort {
                s = s.with_p2p_group(SWITCH_GROUP);
            }
            if self.numa {
                let node = devices.iter().filter_map(|d| d.numa_node).min().unwrap_or(0);
                s = s.with_numa_node(node);
            }
            spares.push(s);
        }
        let switch =
            self.cold_plug_vfio == PortSetting::SwitchPort || self.hot_plug_vfio == PortSetting::SwitchPort;
        let mode = match (self.numa, switch) {
            (true, _) => Mode::Numa,
            (false, true) => Mode::SwitchPort,
            (false, false) => Mode::RootPort,
        };
        let mut request = PlanRequest::default()
            .with_mode(mode)
            .with_devices(devices)
            .with_spares(spares)
            .with_foreign(self.foreign()?);
        request.options.guest_ram = u64::from(self.default_memory) * MIB;
        request.options.expander_buses = ExpanderBuses::KataAgent;
        request.options.guest_renumbers_buses = self.guest_renumbers_buses();
        Ok(request)
    }
}

/// Prefix of every QEMU id the mapping makes from a Kata id.
const ID_PREFIX: char = 'k';

/// The QEMU id for Kata device id `kata_id`: `k` and the id, each character outside
/// `[A-Za-z0-9_-]` written as `.xx` (its UTF-8 bytes in hex), so every Kata id has one
/// QEMU id and [`runtime_id`] gives it back (`3fa9c2e1b0d4e577` → `k3fa9c2e1b0d4e577`).
pub fn qemu_id(kata_id: &str) -> Result<QemuId, QemuError> {
    let mut out = String::with_capacity(kata_id.len() + 1);
    out.push(ID_PREFIX);
    for c in kata_id.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!(".{b:02x}"));
            }
        }
    }
    QemuId::new(out)
}

/// The Kata id a QEMU id made by [`qemu_id`] stands for.
pub fn runtime_id(id: &QemuId) -> Result<String, KataError> {
    let bad = || KataError::NotMapped(id.to_string());
    let text = id.as_str().strip_prefix(ID_PREFIX).ok_or_else(bad)?;
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'.' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = tail.get(2..).unwrap_or_default();
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

/// A device request for Kata device `kata_id` from host `functions`: the QEMU id from
/// [`qemu_id`], the Kata id kept with it.
pub fn device_request(
    kata_id: &str,
    functions: &[FunctionFacts],
    opts: &ResourceOptions,
) -> Result<DeviceRequest, KataError> {
    let id = qemu_id(kata_id)?;
    Ok(DeviceRequest::from_facts(id, functions, opts)?.with_runtime_id(kata_id))
}

/// The host functions behind a VFIO node as Kata is handed it: `/dev/vfio/<group>`
/// gives every PCI function of the IOMMU group (bridges left out: they stay on the host),
/// `/dev/vfio/devices/vfioX` (iommufd) the one function it opens.
pub fn host_functions(sysfs: &Sysfs, node: &Path) -> Result<Vec<FunctionFacts>, KataError> {
    let bdfs = if node.parent().and_then(Path::file_name).is_some_and(|n| n == "devices") {
        vec![sysfs.function_of_cdev(node)?]
    } else {
        let group = sysfs.group_of_node(node)?;
        group
            .members
            .iter()
            .filter(|m| !m.bridge)
            .filter_map(|m| match &m.name {
                pcilibs::sysfs::MemberName::Pci(b) => Some(*b),
                _ => None,
            })
            .collect()
    };
    if bdfs.is_empty() {
        return Err(KataError::EmptyGroup(node.display().to_string()));
    }
    bdfs.into_iter().map(|b| sysfs.facts(b).map_err(KataError::from)).collect()
}

/// [`host_functions`] and [`device_request`] in one: the request for Kata device
/// `kata_id` handed the VFIO node `node`.
pub fn group_request(
    sysfs: &Sysfs,
    kata_id: &str,
    node: &Path,
    opts: &ResourceOptions,
) -> Result<DeviceRequest, KataError> {
    device_request(kata_id, &host_functions(sysfs, node)?, opts)
}

/// The agent's `Device.options` for the VFIO device `device` of the plan (a QEMU id or
/// the Kata id): `DDDD:BB:DD.F=<path>` for every host function of every device that
/// shares its IOMMU group, in plan order, the path as the agent reads it.
pub fn vfio_options(plan: &Plan, device: &str) -> Result<Vec<String>, KataError> {
    options_for(plan, device, |_, f| match &f.host {
        Some(HostRef::Pci(host)) => Some(*host),
        _ => None,
    })
}

/// [`vfio_options`] with the host address of each function given by `host` (a function
/// without one is left out): for devices that stand in for host functions the plan does
/// not know, such as emulated devices in tests.
pub fn options_for(
    plan: &Plan,
    device: &str,
    host: impl Fn(&PlacedDevice, &PlacedFunction) -> Option<Bdf>,
) -> Result<Vec<String>, KataError> {
    let d = plan
        .device(device)
        .or_else(|| plan.device_by_runtime_id(device))
        .ok_or_else(|| KataError::UnknownDevice(device.to_string()))?;
    let members: Vec<&PlacedDevice> = match d.iommu_group {
        Some(g) => plan.devices.iter().filter(|x| x.iommu_group == Some(g)).collect(),
        None => vec![d],
    };
    let mut out = Vec::new();
    for m in members {
        for f in &m.functions {
            let Some(address) = host(m, f) else { continue };
            let path = f
                .location
                .path()
                .and_then(|p| p.kata())
                .ok_or_else(|| KataError::NoAgentPath(m.id.to_string()))?;
            out.push(format!("{address}={path}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_settings_read_as_kata_writes_them() {
        for s in ["no-port", "root-port", "switch-port", "bridge-port"] {
            assert_eq!(s.parse::<PortSetting>().unwrap().to_string(), s);
        }
        assert!(matches!("rootport".parse::<PortSetting>(), Err(KataError::PortSetting(_))));
    }

    #[test]
    fn kata_ids_map_both_ways() {
        for kata in ["3fa9c2e1b0d4e577", "vfio-0", "a.b/c", "größe", ""] {
            let q = qemu_id(kata).unwrap();
            assert!(q.as_str().starts_with('k'));
            assert_eq!(runtime_id(&q).unwrap(), kata, "{q}");
        }
        assert_eq!(qemu_id("3fa9c2e1b0d4e577").unwrap().as_str(), "k3fa9c2e1b0d4e577");
        assert!(runtime_id(&QemuId::new("rp0").unwrap()).is_err());
        assert!(runtime_id(&QemuId::new("k.4").unwrap()).is_err());
    }

    #[test]
    fn assign_busses_is_found_in_the_kernel_parameters() {
        let mut c = KataConfig {
            kernel_params: "cgroup_no_v1=all pci=realloc pci=nocrs pci=assign-busses".into(),
            ..KataConfig::default()
        };
        assert!(c.guest_renumbers_buses());
        c.kernel_params = "pci=realloc,assign-busses".into();
        assert!(c.guest_renumbers_buses());
        c.kernel_params = "pci=lastbus=0 assign-busses".into();
        assert!(!c.guest_renumbers_buses());
    }
}

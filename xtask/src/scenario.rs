//! End-to-end scenarios: what `cargo xtask e2e` boots and plugs, read from TOML files.
//!
//! A scenario names one guest (architecture, firmware), a placement mode and the devices to
//! hotplug into it. The format is documented in `xtask/README.md` ("Scenario files"); the
//! default set lives in `xtask/scenarios/*.toml`. Unknown keys and values are errors that
//! name the file, the key and what is accepted.
//!
//! # Adding a mode
//!
//! A mode is a [`Mode`] variant (its TOML name in kebab case) plus one match arm in
//! [`crate::e2e::run_scenario`], which hands the parsed [`Scenario`] and the
//! [`crate::e2e::RunContext`] to the mode's runner and gets back a
//! [`crate::e2e::ScenarioReport`] whose [`crate::e2e::Row`]s join the common table. A mode
//! that needs settings of its own adds an optional field (a table) to [`Scenario`]; the
//! other modes reject it in [`Scenario::validate`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use guest_harness::arch::Arch;
use guest_harness::firmware::Firmware;

/// A scenario file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("scenario {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys or values.
    #[error("scenario {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, key and what is accepted).
        message: String,
    },
    /// The keys are known but do not go together.
    #[error("scenario {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ScenarioError>;

/// How devices are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Mode {
    /// One root port per device (x86_64, aarch64).
    RootPort,
    /// Devices of one `group` behind one switch, a boot-time placeholder behind each of
    /// its downstream ports (x86_64, aarch64).
    SwitchPort,
    /// x86_64: a `pxb-pcie` expander per guest NUMA node other than 0 (`numa_nodes`),
    /// each device on a root port of its `numa_node`'s expander (node 0: `pcie.0`).
    Numa,
    /// s390x: channel devices by CCW device number, PCI devices as zPCI functions.
    Ccw,
    /// x86_64: the devices are passed through with VFIO into a QEMU running inside the
    /// guest (see `crate::e2e::nested`).
    NestedVfio,
    /// x86_64: a guest shaped like Kata Containers' VM (its `[kata]` settings through
    /// `pcie_topology::kata`; see `crate::e2e::kata`).
    Kata,
}

impl Mode {
    /// The name used in scenario files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::RootPort => "root-port",
            Mode::SwitchPort => "switch-port",
            Mode::Numa => "numa",
            Mode::Ccw => "ccw",
            Mode::NestedVfio => "nested-vfio",
            Mode::Kata => "kata",
        }
    }
}

/// How the planner sizes port windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Reservations {
    /// Sized from the devices' BARs for the platform's firmware (the planner's job).
    #[default]
    Planned,
    /// No `*-reserve` properties and no placeholders: the machine's defaults. Used to show
    /// that the guest then fails with "no space" and that the run reports it.
    QemuDefault,
}

/// The emulated device models a scenario can plug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DeviceKind {
    /// `ivshmem-plain`: GPU stand-in, a 256-byte BAR 0 and a 64-bit prefetchable BAR 2 of
    /// `bar_size` backed by `memory-backend-ram,reserve=off` (no host memory used).
    Ivshmem,
    /// `virtio-net-pci` (on s390x a zPCI function).
    VirtioNet,
    /// `virtio-blk-pci` on a `null-co` block device created at boot.
    VirtioBlk,
    /// `nvme` (one 16 KiB 64-bit BAR).
    Nvme,
    /// `e1000e` (three 32-bit memory BARs and an I/O BAR).
    E1000e,
    /// s390x: `virtio-net-ccw`, a channel device.
    VirtioNetCcw,
    /// s390x: `virtio-blk-ccw` on a `null-co` block device created at boot.
    VirtioBlkCcw,
}

impl DeviceKind {
    /// The name used in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Ivshmem => "ivshmem",
            DeviceKind::VirtioNet => "virtio-net",
            DeviceKind::VirtioBlk => "virtio-blk",
            DeviceKind::Nvme => "nvme",
            DeviceKind::E1000e => "e1000e",
            DeviceKind::VirtioNetCcw => "virtio-net-ccw",
            DeviceKind::VirtioBlkCcw => "virtio-blk-ccw",
        }
    }

    /// Whether this is an s390x channel device.
    pub fn is_ccw(self) -> bool {
        matches!(self, DeviceKind::VirtioNetCcw | DeviceKind::VirtioBlkCcw)
    }
}

/// When a device gets its port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Placement {
    /// In the plan from the start: the planner makes a port for it before boot.
    #[default]
    Planned,
    /// Placed at run time (`Plan::place`) on one of the spare ports.
    Spare,
}

/// What the hotplug of a device must do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PlugExpect {
    /// Appear at the planned place with every BAR assigned.
    #[default]
    Visible,
    /// Fit no free port: placing it must fail with a clear error before any `device_add`.
    NoFit,
}

/// How a device is taken out again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum UnplugMode {
    /// `device_del` with the guest running; `DEVICE_DELETED` and the guest must agree.
    #[default]
    Normal,
    /// The guest's CPUs are stopped (QMP `stop`) first: the unplug must end in the
    /// pending state at its deadline, and `cont` must let the late `DEVICE_DELETED`
    /// complete it.
    GuestStopped,
    /// The guest kernel is crashed first (sysrq `c`, its panic timeout set to 0 so it
    /// never reboots) while QEMU keeps running: nobody will ever answer the slot. The
    /// unplug must end pending at its deadline, stay pending (no `DEVICE_DELETED` in a
    /// second deadline), the port held and QEMU still holding the device. The guest is
    /// dead afterwards, so such a device is the scenario's last.
    GuestHung,
}

/// The VFIO interface a nested-vfio scenario runs with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum VfioBackend {
    /// Debian bookworm's kernel and QEMU 7.2: iommufd if they had it, else (as they are)
    /// the legacy container.
    #[default]
    Auto,
    /// iommufd and the VFIO device cdev, required: the outer guest boots Ubuntu's kernel
    /// and the inner QEMU is bookworm-backports' QEMU 10 (see `guest_harness::stacks`); anything
    /// else running is a failure.
    Iommufd,
}

/// A byte size written as in QEMU (`128G`, `16M`, `4096`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&pcie_topology::units::fmt_size(self.0))
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        pcie_topology::units::parse_size(s).map(Size).map_err(|e| e.to_string())
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Kata's settings of a `kata` scenario (`[kata]`), under Kata's key names; the guest's
/// memory, firmware and NUMA nodes come from the scenario itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KataSection {
    /// `pcie_root_port`.
    #[serde(default)]
    pub pcie_root_port: u32,
    /// `pcie_switch_port`.
    #[serde(default)]
    pub pcie_switch_port: u32,
    /// `cold_plug_vfio` (`root-port`, `switch-port`, `bridge-port`, `no-port`).
    #[serde(default = "no_port")]
    pub cold_plug_vfio: String,
    /// `hot_plug_vfio`.
    #[serde(default = "no_port")]
    pub hot_plug_vfio: String,
    /// `default_bridges`.
    #[serde(default = "one_bridge")]
    pub default_bridges: u32,
    /// `memory_slots`.
    #[serde(default)]
    pub memory_slots: u32,
    /// `default_maxmemory` in MiB (0: no memory hotplug).
    #[serde(default)]
    pub default_maxmemory: u32,
    /// `kernel_params` added to the guest's command line.
    #[serde(default)]
    pub kernel_params: String,
    /// A `pxb-pcie` expander per NUMA node of the devices (needs `numa_nodes`).
    #[serde(default)]
    pub numa: bool,
    /// Not a Kata key: extra bus numbers the plan keeps below each spare root port (room
    /// for a switch hotplugged later). Firmware honours them; a guest that renumbers every
    /// bus (`pci=assign-busses`) does not, so its bus numbers differ from the plan's.
    #[serde(default)]
    pub spare_bus_reserve: u8,
}

fn no_port() -> String {
    "no-port".into()
}

fn one_bridge() -> u32 {
    1
}

/// One device of a scenario (`[[device]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// QEMU id of function 0 (other functions get `<id>-f<n>`); in mode `kata` Kata's
    /// device id (a hex string), which the mapping turns into a QEMU id.
    pub id: String,
    /// Device model.
    pub kind: DeviceKind,
    /// Size of the large BAR (`ivshmem` only): a power of two of at least 4 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bar_size: Option<Size>,
    /// Number of functions of the device (1–8), all of `kind`, plugged as one
    /// multi-function slot, function 0 last.
    #[serde(default = "one")]
    pub functions: u8,
    /// Guest NUMA node the device belongs to (mode `numa`; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Peer-to-peer group: devices of one group share a switch in switch-port mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// When the device gets its port.
    #[serde(default)]
    pub place: Placement,
    /// What its hotplug must do.
    #[serde(default)]
    pub expect: PlugExpect,
    /// How it is unplugged.
    #[serde(default)]
    pub unplug: UnplugMode,
    /// Mode `kata`: plugged at boot (Kata's cold plug); the others are hotplugged onto
    /// spare ports.
    #[serde(default)]
    pub cold: bool,
}

fn one() -> u8 {
    1
}

/// A scenario file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in tables and progress lines.
    pub name: String,
    /// Guest architecture.
    pub arch: Arch,
    /// Firmware; the architecture's default when absent (x86_64 SeaBIOS, else none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// Placement mode.
    pub mode: Mode,
    /// Spare ports for devices placed at run time (`place = "spare"`).
    #[serde(default)]
    pub spare_ports: u32,
    /// What each spare port must take: a profile name (`h100`, `a100`, `nvswitch`, `nic`)
    /// or a list like `16M:mem32,128G:pref64`. Default `nic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spare_profile: Option<String>,
    /// How port windows are sized.
    #[serde(default)]
    pub reservations: Reservations,
    /// x86_64: native PCIe hotplug (pciehp) instead of QEMU's default ACPI hotplug.
    #[serde(default)]
    pub native_hotplug: bool,
    /// Seconds an unplug waits for `DEVICE_DELETED` before it counts as pending (default:
    /// 10 on x86_64 with ACPI hotplug and on s390x, 20 with pciehp, which takes 5–6 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplug_timeout_s: Option<u64>,
    /// Mode `numa`: guest NUMA nodes (2–8); the guest's memory is split evenly.
    #[serde(default)]
    pub numa_nodes: u32,
    /// nested-vfio: which VFIO interface must run (default: whatever the stack offers).
    #[serde(default)]
    pub vfio_backend: VfioBackend,
    /// Mode `kata`: Kata's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kata: Option<KataSection>,
    /// The devices, in plug order.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSpec>,
    /// The file it was read from (not a key).
    #[serde(skip)]
    pub source: PathBuf,
}

impl Scenario {
    /// Parses scenario TOML; `path` names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Scenario> {
        let mut s: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse { path: path.to_owned(), message: e.to_string() })?;
        s.source = path.to_owned();
        s.validate()?;
        Ok(s)
    }

    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
        Scenario::parse(&text, path)
    }

    /// The firmware the guest boots through.
    pub fn firmware(&self) -> Firmware {
        self.firmware.unwrap_or_else(|| Firmware::default_for(self.arch))
    }

    /// Checks that the keys go together (arch and firmware, mode and device kinds, sizes).
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(ScenarioError::Invalid { path: self.source.clone(), message });
        if self.name.trim().is_empty() {
            return bad("`name` is empty".into());
        }
        if !self.firmware().supports(self.arch) {
            return bad(format!("{} cannot boot with firmware `{}`", self.arch, self.firmware().name()));
        }
        let ccw_arch = self.arch == Arch::S390x;
        if (self.mode == Mode::Ccw) != ccw_arch {
            return bad(format!(
                "mode `{}` does not go with arch `{}` (s390x takes mode `ccw`; x86_64 and aarch64 `root-port` or `switch-port`)",
                self.mode.name(),
                self.arch
            ));
        }
        if let Some(p) = &self.spare_profile {
            if let Err(e) = pcie_topology::HotplugProfile::parse(p) {
                return bad(format!("spare_profile: {e}"));
            }
        }
        if ccw_arch && (self.spare_ports > 0 || self.reservations != Reservations::Planned) {
            return bad("s390x has no ports: `spare_ports` and `reservations` do not apply".into());
        }
        let kata = self.mode == Mode::Kata;
        if kata != self.kata.is_some() {
            return bad("mode `kata` and a `[kata]` table go together".into());
        }
        if kata && self.arch != Arch::X86_64 {
            return bad("mode `kata` runs on x86_64 (q35)".into());
        }
        if let Some(k) = &self.kata {
            for v in [&k.cold_plug_vfio, &k.hot_plug_vfio] {
                if let Err(e) = v.parse::<pcie_topology::kata::PortSetting>() {
                    return bad(format!("[kata]: {e}"));
                }
            }
            if k.numa && !(2..=8).contains(&self.numa_nodes) {
                return bad("[kata] numa = true needs numa_nodes = 2 to 8".into());
            }
        }
        if let Some(d) = self.devices.iter().find(|d| d.cold && !kata) {
            return bad(format!("device `{}`: `cold` applies to mode `kata` only", d.id));
        }
        if self.mode == Mode::Numa || (kata && self.numa_nodes > 0) {
            if self.arch != Arch::X86_64 {
                return bad("mode `numa` runs on x86_64 (q35 with pxb-pcie expanders)".into());
            }
            if !(2..=8).contains(&self.numa_nodes) {
                return bad("mode `numa` needs numa_nodes = 2 to 8".into());
            }
        } else if self.numa_nodes != 0 || self.devices.iter().any(|d| d.numa_node.is_some()) {
            return bad("`numa_nodes` and a device's `numa_node` apply to mode `numa` only".into());
        }
        if let Some(d) = self.devices.iter().find(|d| d.numa_node.is_some_and(|n| n >= self.numa_nodes)) {
            return bad(format!(
                "device `{}`: numa_node must be below numa_nodes = {}",
                d.id, self.numa_nodes
            ));
        }
        if self.vfio_backend != VfioBackend::Auto && self.mode != Mode::NestedVfio {
            return bad("`vfio_backend` applies to mode `nested-vfio` only".into());
        }
        let mut ids = std::collections::BTreeSet::new();
        for d in &self.devices {
            if !ids.insert(d.id.as_str()) {
                return bad(format!("device id `{}` appears twice", d.id));
            }
            let id = if kata {
                pcie_topology::kata::qemu_id(&d.id)
            } else {
                pcie_topology::QemuId::new(d.id.as_str())
            };
            if let Err(e) = id {
                return bad(format!("device `{}`: {e}", d.id));
            }
            if d.kind.is_ccw() && !ccw_arch {
                return bad(format!("device `{}`: kind `{}` exists on s390x only", d.id, d.kind.name()));
            }
            if (d.kind == DeviceKind::Ivshmem) != d.bar_size.is_some() {
                return bad(format!("device `{}`: `bar_size` is required for ivshmem and only for it", d.id));
            }
            if let Some(Size(size)) = d.bar_size {
                if !size.is_power_of_two() || size < (4 << 10) {
                    return bad(format!("device `{}`: bar_size must be a power of two of at least 4K", d.id));
                }
            }
            if !(1..=8).contains(&d.functions) {
                return bad(format!("device `{}`: functions must be 1 to 8", d.id));
            }
            if ccw_arch && (d.functions > 1 || d.place != Placement::Planned || d.group.is_some()) {
                return bad(format!(
                    "device `{}`: s390x devices take no `functions`, `place` or `group`",
                    d.id
                ));
            }
            if d.place == Placement::Spare && self.spare_ports == 0 && !kata {
                return bad(format!("device `{}` is placed on a spare port but spare_ports = 0", d.id));
            }
            if d.expect == PlugExpect::NoFit && d.place != Placement::Spare {
                return bad(format!(
                    "device `{}`: expect = \"no-fit\" needs place = \"spare\" (a planned device always gets a port)",
                    d.id
                ));
            }
            if d.expect == PlugExpect::NoFit && d.unplug != UnplugMode::Normal {
                return bad(format!("device `{}`: a device that must not fit is never unplugged", d.id));
            }
            let last = self.devices.last().is_some_and(|l| std::ptr::eq(l, d));
            if d.unplug == UnplugMode::GuestHung && !last {
                return bad(format!(
                    "device `{}`: unplug = \"guest-hung\" leaves a dead guest, so it must be the last device",
                    d.id
                ));
            }
        }
        Ok(())
    }
}

/// The folder of the default scenario set: `xtask/scenarios`.
pub fn default_dir() -> PathBuf {
    guest_harness::workspace_root().join("xtask").join("scenarios")
}

/// The default set: every `*.toml` directly in [`default_dir`], by file name. (Scenarios
/// that must fail live in a subfolder and run only when named.)
pub fn default_files() -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(default_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Finds a scenario file named on the command line: as given, else relative to `xtask/`,
/// else in [`default_dir`].
pub fn resolve(name: &Path) -> PathBuf {
    let candidates = [
        name.to_path_buf(),
        guest_harness::workspace_root().join("xtask").join(name),
        default_dir().join(name),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| name.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario> {
        Scenario::parse(text, Path::new("t.toml"))
    }

    const GPU: &str = r#"
        name = "gpu-root-port"
        arch = "x86_64"
        firmware = "seabios"
        mode = "root-port"
        spare_ports = 1
        [[device]]
        id = "gpu0"
        kind = "ivshmem"
        bar_size = "128G"
        [[device]]
        id = "nic0"
        kind = "virtio-net"
        group = "p2p0"
    "#;

    #[test]
    fn the_issue_example_parses() {
        let s = parse(GPU).unwrap();
        assert_eq!(s.arch, Arch::X86_64);
        assert_eq!(s.firmware(), Firmware::SeaBios);
        assert_eq!(s.devices[0].bar_size, Some(Size(128 << 30)));
        assert_eq!(s.devices[1].functions, 1);
        assert_eq!(s.devices[1].group.as_deref(), Some("p2p0"));
        assert_eq!(s.reservations, Reservations::Planned);
    }

    #[test]
    fn a_hung_guest_unplug_must_come_last() {
        let hung_first =
            GPU.replacen("bar_size = \"128G\"", "bar_size = \"128G\"\n        unplug = \"guest-hung\"", 1);
        let e = parse(&hung_first).unwrap_err().to_string();
        assert!(e.contains("gpu0") && e.contains("last device"), "{e}");
        let hung_last = format!("{GPU}        unplug = \"guest-hung\"\n");
        let s = parse(&hung_last).unwrap();
        assert_eq!(s.devices[1].unplug, UnplugMode::GuestHung);
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let e = parse(&GPU.replace("spare_ports", "spare_port")).unwrap_err().to_string();
        assert!(e.contains("t.toml") && e.contains("spare_port"), "{e}");
        let e = parse(&GPU.replace("\"virtio-net\"", "\"virtio-nett\"")).unwrap_err().to_string();
        assert!(e.contains("virtio-nett") && e.contains("virtio-net"), "{e}");
        let e = parse(&GPU.replace("\"x86_64\"", "\"riscv64\"")).unwrap_err().to_string();
        assert!(e.contains("riscv64"), "{e}");
        let e = parse(&GPU.replace("\"128G\"", "\"lots\"")).unwrap_err().to_string();
        assert!(e.contains("lots"), "{e}");
        let e = parse(&format!("{GPU}\nreservations = \"tiny\"")).unwrap_err().to_string();
        assert!(e.contains("tiny"), "{e}");
    }

    #[test]
    fn keys_must_go_together() {
        for (from, to, needle) in [
            ("\"seabios\"", "\"uefi\"", "firmware"),
            ("\"root-port\"", "\"ccw\"", "mode"),
            ("bar_size = \"128G\"", "", "bar_size"),
            ("bar_size = \"128G\"", "bar_size = \"3M\"", "power of two"),
            ("kind = \"virtio-net\"", "kind = \"virtio-net-ccw\"", "s390x only"),
            ("spare_ports = 1", "spare_ports = 1\nspare_profile = \"huge\"", "spare_profile"),
        ] {
            let e = parse(&GPU.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(e.contains(needle), "{from} -> {to}: {e}");
        }
        let no_fit = format!("{GPU}\n[[device]]\nid = \"big\"\nkind = \"e1000e\"\nexpect = \"no-fit\"\n");
        assert!(parse(&no_fit).unwrap_err().to_string().contains("place"));
        let dup = format!("{GPU}\n[[device]]\nid = \"gpu0\"\nkind = \"nvme\"\n");
        assert!(parse(&dup).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn default_set_parses() {
        let files = default_files().unwrap();
        assert!(!files.is_empty());
        for f in files {
            Scenario::load(&f).unwrap();
        }
    }

    #[test]
    fn numa_keys_go_with_numa_mode() {
        let e = parse(&GPU.replace("kind = \"virtio-net\"", "kind = \"virtio-net\"\n        numa_node = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("numa_node"), "{e}");
        let numa = GPU.replace("mode = \"root-port\"", "mode = \"numa\"\n        numa_nodes = 2");
        let s = parse(&numa).unwrap();
        assert_eq!((s.mode, s.numa_nodes), (Mode::Numa, 2));
        let e = parse(&numa.replace("kind = \"virtio-net\"", "kind = \"virtio-net\"\n        numa_node = 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("below numa_nodes"), "{e}");
        let e = parse(&numa.replace("numa_nodes = 2", "numa_nodes = 1")).unwrap_err().to_string();
        assert!(e.contains("2 to 8"), "{e}");
    }

    #[test]
    fn iommufd_backend_only_for_nested_vfio() {
        let e = parse(&format!("vfio_backend = \"iommufd\"\n{GPU}")).unwrap_err().to_string();
        assert!(e.contains("vfio_backend") && e.contains("nested-vfio"), "{e}");
        let s = Scenario::load(&default_dir().join("iommufd/nested-vfio-iommufd.toml")).unwrap();
        assert_eq!((s.mode, s.vfio_backend), (Mode::NestedVfio, VfioBackend::Iommufd));
        let legacy = Scenario::load(&default_dir().join("nested-vfio.toml")).unwrap();
        assert_eq!(legacy.vfio_backend, VfioBackend::Auto);
    }
}

//! The runner of the planned modes (`root-port`, `switch-port`, `ccw`): plan with the
//! scenario's platform, boot with the plan's boot-time devices and kernel arguments, hand
//! the QMP socket to `qmp-hotplug`'s engine, hotplug every device onto its planned port
//! (the engine first removes a placeholder where the plan put one), check in the guest
//! that each function is at the planned address with every BAR assigned inside its
//! port's window, then unplug each and check that QEMU and the guest agree it is gone.
//!
//! All devices are plugged first and unplugged afterwards, so devices that share a switch
//! are checked side by side. QEMU serves one QMP client at a time: the engine's client is
//! the only one, and the `stop`/`cont` of the unfriendly unplug go through it too.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::{Virt, Q35};
use pcie_topology::plan::{function_id, GuestLocation, Reservation};
use pcie_topology::qemu::PropValue;
use pcie_topology::{
    FunctionRequest, FunctionResource, HotplugAction, HotplugProfile, Plan, PlanRequest, Platform, QemuId,
    SpareRequest,
};
use qmp_hotplug::journal::{read_file, Record, Step};
use qmp_hotplug::{
    ClientOptions, DeviceState, Engine, EngineOptions, Expectation, PlugRequest, QmpClient, UnplugOutcome,
};
use serde_json::Value;

use super::models::{model, Model};
use super::{Row, RunContext, ScenarioReport};
use crate::scenario::{
    DeviceKind, DeviceSpec, Mode, Placement, PlugExpect, Reservations, Scenario, UnplugMode,
};
use guest_harness::arch::Arch;
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestSpec};
use guest_harness::reporter::{GuestState, PciDevice};
use guest_harness::stacks::{StackRoot, OVMF_FD, SEABIOS_BIN};
use pcilibs::bdf::Bdf;

type Result<T> = std::result::Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// How long the guest may take to show or drop a device (TCG, two guests at a time).
const GUEST_WAIT: Duration = Duration::from_secs(90);

/// Kernel messages about a new function arrive a moment after it appears in sysfs.
const SETTLE: Duration = Duration::from_millis(600);

/// Runs one planned-mode scenario.
pub fn run(scenario: &Scenario, ctx: &RunContext) -> ScenarioReport {
    let mut report = ScenarioReport::new(scenario);
    if let Err(e) = run_inner(scenario, ctx, &mut report) {
        report.error = Some(e);
    }
    report
}

/// The plan and the block devices it needs.
pub(crate) struct Planned {
    plan: Plan,
    /// Block devices (`null-co`) the devices need, created at boot.
    blockdevs: Vec<String>,
}

/// The planner platform of `scenario`. With the stack's root, x86_64 plans follow the
/// generation of the firmware image the guest will boot (read from the image); without
/// it, the rules whose plans hold on every generation.
fn platform(scenario: &Scenario, root: Option<&StackRoot>) -> Result<Box<dyn Platform>> {
    let detect = |image: &str| -> Result<Box<dyn Platform>> {
        let Some(root) = root else {
            return Ok(Box::new(if image == SEABIOS_BIN { Q35::seabios() } else { Q35::ovmf() }));
        };
        let q35 = Q35::detect(&root.file(image)).map_err(|e| format!("firmware generation: {e}"))?;
        Ok(Box::new(q35))
    };
    Ok(match (scenario.arch, scenario.firmware()) {
        (Arch::X86_64, Firmware::SeaBios) => detect(SEABIOS_BIN)?,
        (Arch::X86_64, Firmware::Ovmf) => detect(OVMF_FD)?,
        (Arch::Aarch64, Firmware::None) => Box::new(Virt::direct_kernel()),
        (Arch::Aarch64, Firmware::Uefi) => Box::new(Virt::uefi()),
        (Arch::S390x, Firmware::None) => Box::new(S390xCcw::default()),
        (arch, fw) => return Err(format!("no planner platform for {arch} with firmware {}", fw.name())),
    })
}

/// The planner resources of one function of a model: its BARs at their indices.
fn resources(m: &Model) -> Vec<FunctionResource> {
    m.bars.iter().map(|b| FunctionResource::at(b.index, b.resource())).collect()
}

/// The planner request of one scenario device (every function of it; a channel device
/// on s390x).
fn device_request(d: &DeviceSpec, m: &Model) -> Result<pcie_topology::DeviceRequest> {
    let id = QemuId::new(d.id.as_str()).map_err(s)?;
    if d.kind.is_ccw() {
        let mut r = pcie_topology::DeviceRequest::channel(id, m.driver, 0);
        if m.needs_drive {
            r.functions[0].props.insert("drive".into(), PropValue::Str(format!("{}-disk", d.id)));
        }
        return Ok(r);
    }
    let mut functions = Vec::new();
    for f in 0..d.functions {
        let fid = function_id(&id, f);
        let func = match (d.kind, d.bar_size) {
            (DeviceKind::Ivshmem, Some(size)) => FunctionRequest::ivshmem(f, &id, size.0).map_err(s)?,
            _ => {
                let mut func = FunctionRequest::new(f, m.driver, resources(m));
                if m.needs_serial {
                    func.props.insert("serial".into(), PropValue::Str(fid.clone()));
                }
                if m.needs_drive {
                    func.props.insert("drive".into(), PropValue::Str(format!("{fid}-disk")));
                }
                func
            }
        };
        functions.push(func);
    }
    let mut r = pcie_topology::DeviceRequest::new(id, functions);
    r.p2p_group = d.group.clone();
    r.numa_node = d.numa_node;
    Ok(r)
}

fn blockdevs(scenario: &Scenario) -> Vec<String> {
    let mut out = Vec::new();
    for d in &scenario.devices {
        if model(d.kind, d.bar_size.map(|b| b.0)).needs_drive {
            for f in 0..d.functions {
                let fid = if f == 0 { d.id.clone() } else { format!("{}-f{f}", d.id) };
                out.push(format!("null-co,node-name={fid}-disk,size=67108864"));
            }
        }
    }
    out
}

#[cfg(test)]
fn make_plan(scenario: &Scenario, memory_mib: u32) -> Result<Planned> {
    make_plan_for(scenario, memory_mib, None)
}

/// Plans `scenario` for a guest of `memory_mib` as [`run`] does, for the firmware in the
/// stack root `root` (see [`platform`]); the random runner asks first, to tell a refusal
/// before boot from a failure.
pub(crate) fn make_plan_for(
    scenario: &Scenario,
    memory_mib: u32,
    root: Option<&StackRoot>,
) -> Result<Planned> {
    let blockdevs = blockdevs(scenario);
    let platform = platform(scenario, root)?;
    let planned_devices: Vec<pcie_topology::DeviceRequest> = scenario
        .devices
        .iter()
        .filter(|d| d.place == Placement::Planned)
        .map(|d| device_request(d, &model(d.kind, d.bar_size.map(|b| b.0))))
        .collect::<Result<_>>()?;
    let mut spares = Vec::new();
    if scenario.spare_ports > 0 {
        let profile = HotplugProfile::parse(scenario.spare_profile.as_deref().unwrap_or("nic")).map_err(s)?;
        spares.push(SpareRequest::new(profile, scenario.spare_ports));
    }
    let mode = match scenario.mode {
        Mode::SwitchPort => pcie_topology::Mode::SwitchPort,
        Mode::Numa => pcie_topology::Mode::Numa,
        _ => pcie_topology::Mode::RootPort,
    };
    let mut request =
        PlanRequest::default().with_mode(mode).with_devices(planned_devices).with_spares(spares);
    let sized = scenario.reservations == Reservations::Planned;
    request.options.guest_ram = u64::from(memory_mib) << 20;
    request.options.size_reservations = sized;
    request.options.switch_placeholders = sized;
    let plan = pcie_topology::plan(platform.as_ref(), &request).map_err(|e| format!("planning: {e}"))?;
    Ok(Planned { plan, blockdevs })
}

fn guest_spec(scenario: &Scenario, planned: &Planned) -> GuestSpec {
    let mut spec = GuestSpec::new(scenario.arch).firmware(scenario.firmware());
    spec.name = scenario.name.clone();
    // The machine type and firmware come from the harness (same machine as the plan's);
    // the plan gives the boot-time devices and the platform's own arguments.
    spec.extra_args.extend(planned.plan.device_args());
    spec.extra_args.extend(planned.plan.extra.qemu.iter().cloned());
    for b in &planned.blockdevs {
        spec.extra_args.extend(["-blockdev".to_string(), b.clone()]);
    }
    spec.extra_args.extend(numa_args(scenario.numa_nodes, spec.memory_mib));
    if scenario.native_hotplug && scenario.arch == Arch::X86_64 {
        spec.extra_args
            .extend(["-global".into(), "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into()]);
    }
    spec.cmdline.extend(planned.plan.kernel_args().iter().cloned());
    if scenario.arch == Arch::X86_64 {
        spec.phys_bits = planned.plan.cpu_phys_bits();
    }
    spec
}

/// `-object`/`-numa` arguments for `nodes` guest NUMA nodes sharing `memory_mib` evenly
/// (node 0 gets the rest); the one vCPU sits on node 0, the other nodes hold memory only.
pub(crate) fn numa_args(nodes: u32, memory_mib: u32) -> Vec<String> {
    if nodes == 0 {
        return Vec::new();
    }
    let each = memory_mib / nodes;
    let mut args = Vec::new();
    for n in 0..nodes {
        let size = if n == 0 { memory_mib - each * (nodes - 1) } else { each };
        let cpus = if n == 0 { ",cpus=0" } else { "" };
        args.extend([
            "-object".to_string(),
            format!("memory-backend-ram,id=numa{n},size={size}M"),
            "-numa".to_string(),
            format!("node,nodeid={n}{cpus},memdev=numa{n}"),
        ]);
    }
    args
}

/// The unplug deadline: the scenario's, else long enough for the platform's hotplug.
fn unplug_timeout(scenario: &Scenario) -> Duration {
    let secs = scenario.unplug_timeout_s.unwrap_or(match scenario.arch {
        // ACPI hotplug completes in ~0.1 s (10 s leaves room for a loaded machine);
        // pciehp needs its 5 s attention-button window on top. Ports on pxb-pcie
        // expanders always use pciehp: QEMU 7.2's _OSC keeps PCIe hotplug for pcie.0 only
        // (ACPI hotplug) and grants it to the OS on expander root bridges.
        Arch::X86_64 if !scenario.native_hotplug && scenario.mode != Mode::Numa => 10,
        Arch::S390x => 10,
        _ => 20,
    });
    Duration::from_secs(secs)
}

/// One device plugged (or refused), carried from the plug phase to the unplug phase.
struct Plugged<'a> {
    spec: &'a DeviceSpec,
    /// The engine's port name, once the device was plugged.
    port: Option<String>,
    row: Row,
    /// Where the guest showed each function.
    seen: Vec<Seen>,
}

/// Where the guest showed one function.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// A PCI (or zPCI) function at this address.
    Pci(Bdf),
    /// A channel device with this bus id.
    Ccw(String),
}

fn run_inner(scenario: &Scenario, ctx: &RunContext, report: &mut ScenarioReport) -> Result<()> {
    let dir = ctx.scenario_dir(scenario).map_err(|e| format!("run folder: {e}"))?;
    let memory_mib = GuestSpec::new(scenario.arch).firmware(scenario.firmware()).memory_mib;
    let root = ctx.stack.root().map_err(s)?;
    let mut planned = make_plan_for(scenario, memory_mib, Some(&root))?;
    std::fs::write(dir.join("plan.json"), planned.plan.to_json().map_err(s)?).map_err(s)?;
    std::fs::write(dir.join("plan.txt"), planned.plan.explain()).map_err(s)?;
    let spec = guest_spec(scenario, &planned);
    let guest = super::boot_recorded(scenario, &spec, ctx, &dir, report)?;

    // The engine's client is the QMP client of this guest: QEMU serves one at a time.
    let mut client_options = ClientOptions::default();
    client_options.connect_timeout = Duration::from_secs(30);
    let client =
        QmpClient::connect_unix(guest.qmp_socket(), client_options).map_err(|e| format!("QMP: {e}"))?;
    let journal = dir.join("hotplug.journal");
    let mut options = EngineOptions::default();
    options.unplug_timeout = unplug_timeout(scenario);
    options.visible_timeout = Duration::from_secs(30);
    options.placeholder_timeout = Duration::from_secs(30);
    // Where firmware windows are final, the engine refuses what cannot fit before sending
    // anything; not with QEMU's default reservations, whose guest-side failure the
    // must-fail scenario is there to reproduce.
    options.check_live_windows = matches!(scenario.firmware(), Firmware::SeaBios | Firmware::Ovmf)
        && scenario.reservations == Reservations::Planned;
    let (engine, _) =
        Engine::open(Arc::new(client), &journal, options).map_err(|e| format!("hotplug engine: {e}"))?;
    let ctx = Step3 { scenario, ctx, guest: &guest, engine: &engine, journal: &journal };

    let mut plugged: Vec<Plugged<'_>> = Vec::new();
    let boot_rows: Vec<Row> = ports_at_boot(scenario, &planned.plan, &guest.state()).into_iter().collect();
    for d in &scenario.devices {
        plugged.push(ctx.plug(&mut planned, d));
    }
    save_guest_records(&guest, &dir);
    for p in plugged.iter_mut().filter(|_| ctx.ctx.unplug) {
        if let Some(port) = p.port.clone() {
            ctx.unplug(p, &port);
            if p.row.ok {
                // Free the port in the plan too, for later placements.
                if let Err(e) = planned.plan.release(p.spec.id.as_str()) {
                    p.row.fail(format!("plan release: {e}"));
                }
            }
        }
    }
    report.rows = boot_rows.into_iter().chain(plugged.into_iter().map(|p| p.row)).collect();
    Ok(())
}

/// Writes the guest kernel's log and its address map (`dmesg.txt`, `iomem.txt`) into the
/// run folder once every device is plugged: where a BAR failed, the kernel's own words and
/// the windows it placed around it say why. Best effort: a guest that no longer answers
/// leaves the reason in the file instead.
fn save_guest_records(guest: &Guest, dir: &Path) {
    for (file, command) in [("dmesg.txt", "dmesg"), ("iomem.txt", "cat /proc/iomem")] {
        let text = match guest.exec(command, Instant::now() + Duration::from_secs(30)) {
            Ok(out) => out.lines.join("\n") + "\n",
            Err(e) => format!("`{command}` failed: {e}\n"),
        };
        // A folder that cannot be written loses only this record, not the run's verdict.
        let _ = std::fs::write(dir.join(file), text);
    }
}

/// Every planned port's windows as the firmware left them at boot, before any plug: each
/// must be at least what the plan reserved, spare ports and ports waiting for a device
/// alike (a window missing there is found only when a device comes, too late). Where the
/// firmware's windows are final (SeaBIOS, OVMF) a shortfall fails the row; where the
/// guest kernel sizes windows itself at hotplug (aarch64) it is only noted. `None` on
/// s390x (no ports).
fn ports_at_boot(scenario: &Scenario, plan: &Plan, state: &GuestState) -> Option<Row> {
    if scenario.arch == Arch::S390x {
        return None;
    }
    let final_windows = matches!(scenario.firmware(), Firmware::SeaBios | Firmware::Ovmf);
    let mut row = Row::new("port windows at boot");
    let mut checked = 0;
    let mut problems = Vec::new();
    for port in plan.ports.iter().filter(|p| p.device.is_some()) {
        let r = &port.reservation;
        if r.mem.size == 0 && r.pref.size == 0 {
            continue;
        }
        checked += 1;
        let Ok(bdf) = port.bdf.to_string().parse::<Bdf>() else {
            problems.push(format!("port {}: address {} unreadable", port.id, port.bdf));
            continue;
        };
        match state.pci.get(&bdf) {
            None => problems.push(format!("port {} ({bdf}) is not in the guest", port.id)),
            Some(bridge) => {
                let w: Vec<String> = bridge.windows().map(ToString::to_string).collect();
                row.notes.push(format!("port {} ({bdf}) windows {}", port.id, w.join(" ")));
                problems.extend(
                    bridge_window_problems(bridge, r)
                        .into_iter()
                        .map(|p| format!("{} ({}): {p}", port.id, r.purpose)),
                );
            }
        }
    }
    row.planned = format!("{checked} ports");
    row.guest = format!("{} bridges", state.pci.values().filter(|d| d.windows().next().is_some()).count());
    if problems.is_empty() || !final_windows {
        for p in problems {
            row.notes.push(format!("{p} (this guest sizes windows at hotplug)"));
        }
        row.ok = true;
        row.result = "ok".into();
    } else {
        for p in problems {
            row.fail(p);
        }
    }
    row.bars_ok = None;
    Some(row)
}

/// The action for a device: from the plan, or placed now on a spare port.
fn action_for(planned: &mut Planned, d: &DeviceSpec) -> Result<HotplugAction> {
    if d.place == Placement::Planned {
        return planned.plan.hotplug_action(d.id.as_str()).map_err(s);
    }
    let m = model(d.kind, d.bar_size.map(|b| b.0));
    planned.plan.place(device_request(d, &m)?).map_err(s)
}

/// `planned` column: the guest path of function 0 (ccw: bus id; zPCI: address, uid, fid),
/// with the number of functions when there are more.
fn planned_location(action: &HotplugAction) -> String {
    let mut parts: Vec<String> = action
        .functions
        .iter()
        .rev()
        .map(|f| match &f.guest {
            GuestLocation::Pci { path, .. } => path.to_string(),
            GuestLocation::Ccw { busid } => busid.clone(),
            GuestLocation::Zpci { uid, fid, bdf } => format!("{bdf} (uid {uid}, fid {fid})"),
            _ => "-".into(),
        })
        .collect();
    parts.dedup();
    parts.join(" ")
}

/// The engine's request for a plan action (`PlugRequest::from_action`): each PCI
/// function expected at its planned place with the plan's BARs at their indices, which
/// `query-pci` must show. The plan's (index, size) pairs must be the model's: a plan that
/// disagrees is an error, not a weaker check.
fn engine_request(action: &HotplugAction, m: &Model) -> Result<PlugRequest> {
    let request = PlugRequest::from_action(action);
    let mut model: Vec<(Option<u8>, u64)> = m.bars.iter().map(|b| (Some(b.index), b.size)).collect();
    model.sort_unstable();
    for f in &request.functions {
        let Expectation::Pci(want) = &f.expect else { continue };
        let mut planned: Vec<(Option<u8>, u64)> = want.bars.iter().map(|b| (b.bar, b.size)).collect();
        planned.sort_unstable();
        if planned != model {
            return Err(format!(
                "{}: the plan expects BARs (index, size) {planned:?}, the model {model:?}",
                f.id()
            ));
        }
    }
    Ok(request)
}

fn journal_device_adds(journal: &Path) -> Result<usize> {
    let (records, _) = read_file(journal).map_err(s)?;
    Ok(records.iter().filter(|r| matches!(r, Record::Step { step: Step::DeviceAdd { .. }, .. })).count())
}

/// The guest path of a function from the chain of bridges the guest reported; behind an
/// expander's root bus it starts with that bus number, as the plan writes it (`20/01/00`).
fn guest_path(dev: &PciDevice) -> String {
    let root_bus = dev.upstream.first().unwrap_or(&dev.bdf).bus();
    let root = (root_bus != 0).then(|| format!("{root_bus:02x}"));
    root.into_iter()
        .chain(dev.upstream.iter().chain(std::iter::once(&dev.bdf)).map(|b| {
            if b.function() == 0 {
                format!("{:02x}", b.device())
            } else {
                format!("{:02x}.{:x}", b.device(), b.function())
            }
        }))
        .collect::<Vec<_>>()
        .join("/")
}

/// The port's guest windows must be at least what the plan reserved.
fn window_problems(state: &GuestState, dev: &PciDevice, planned: &Reservation) -> Vec<String> {
    let Some(parent) = dev.parent().and_then(|p| state.pci.get(&p)) else {
        return vec![format!("{} has no parent bridge in the guest", dev.bdf)];
    };
    bridge_window_problems(parent, planned)
}

/// A bridge's assigned guest windows must be at least what the plan reserved.
fn bridge_window_problems(parent: &PciDevice, planned: &Reservation) -> Vec<String> {
    let mut out = Vec::new();
    for (what, size, pref) in
        [("64-bit prefetchable", planned.pref.size, true), ("memory", planned.mem.size, false)]
    {
        if size == 0 {
            continue;
        }
        let window = parent.windows().find(|w| w.is_assigned() && w.is_mem() && w.is_prefetchable() == pref);
        match window {
            Some(w) if w.size() >= size => {}
            Some(w) => out.push(format!(
                "port {} {what} window {w} is smaller than the planned {}",
                parent.bdf,
                pcie_topology::units::fmt_size(size)
            )),
            None => out.push(format!(
                "port {} has no {what} window (planned {})",
                parent.bdf,
                pcie_topology::units::fmt_size(size)
            )),
        }
    }
    out
}

/// Everything one device's steps need.
struct Step3<'a> {
    scenario: &'a Scenario,
    ctx: &'a RunContext,
    guest: &'a Guest,
    engine: &'a Engine,
    journal: &'a Path,
}

impl Step3<'_> {
    fn progress(&self, text: &str) {
        if self.ctx.progress {
            eprintln!("[{}] {text}", self.scenario.name);
        }
    }

    fn peripheral(&self) -> Result<Vec<String>> {
        let list = self
            .engine
            .client()
            .execute_raw(
                "qom-list",
                Some(serde_json::json!({"path": "/machine/peripheral"})),
                Duration::from_secs(30),
            )
            .map_err(s)?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter().filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned)).collect()
            })
            .unwrap_or_default())
    }

    fn qmp(&self, command: &str) -> Result<()> {
        self.engine.client().execute_raw(command, None, Duration::from_secs(30)).map(|_| ()).map_err(s)
    }

    /// Plans (or places) a device, plugs it through the engine and checks the guest.
    fn plug<'d>(&self, planned: &mut Planned, d: &'d DeviceSpec) -> Plugged<'d> {
        let mut p = Plugged { spec: d, port: None, row: Row::new(d.id.as_str()), seen: Vec::new() };
        let adds_before = journal_device_adds(self.journal);
        let action = match action_for(planned, d) {
            Ok(a) => a,
            Err(e) if d.expect == PlugExpect::NoFit => {
                self.refused(&mut p, &e, adds_before);
                return p;
            }
            Err(e) => {
                p.row.fail(format!("no place for it: {e}"));
                return p;
            }
        };
        p.row.planned = planned_location(&action);
        if d.expect == PlugExpect::NoFit {
            let port = action.port.as_ref().map_or("-", |x| x.as_str());
            p.row.fail(format!("should fit no free port but the plan placed it on {port}"));
            return p;
        }
        let m = model(d.kind, d.bar_size.map(|b| b.0));
        let request = match engine_request(&action, &m) {
            Ok(r) => r,
            Err(e) => {
                p.row.fail(e);
                return p;
            }
        };
        let port = request.port.to_string();
        let first = if request.placeholder.is_some() { ", placeholder removed first" } else { "" };
        self.progress(&format!("plugging {} onto {port} (planned {}){first}", d.id, p.row.planned));
        let predicted = self.live_fit(&port, &m, d.functions);
        let before = self.guest.state();
        let sent = Instant::now();
        match self.engine.plug(request) {
            Ok(rec) => p.row.notes.push(format!("engine: {:?} on {port}", rec.state)),
            Err(e) => {
                p.row.fail(format!("plug: {e}"));
                return p;
            }
        }
        p.port = Some(port);
        match self.check_guest(&action, &m, sent, &before, &mut p.row) {
            Ok(seen) => p.seen = seen,
            Err(e) => p.row.fail(e),
        }
        if let (Some(why), Some(bars_ok)) = (&predicted, p.row.bars_ok) {
            self.compare_fit(why, bars_ok, &mut p.row);
        }
        if self.scenario.mode == Mode::Numa {
            let planned_node = action
                .port
                .as_ref()
                .and_then(|id| planned.plan.ports.iter().find(|x| &x.id == id))
                .and_then(|x| x.numa_node);
            self.check_numa(&p.seen, planned_node, &mut p.row);
        }
        if p.row.result.is_empty() {
            p.row.ok = true;
            p.row.result = "ok".into();
        }
        self.progress(&format!("{}: {} ({} ms)", d.id, p.row.result, p.row.hotplug_ms.unwrap_or(0)));
        p
    }

    /// The PCI device id QEMU presents for the zPCI function `qdev_id` (`query-pci`,
    /// which lists s390x's zPCI bus too): one of the model's ids on zPCI, which depend on
    /// the machine version (see [`Model::zpci_devices`]).
    fn zpci_device_id(&self, qdev_id: &str, m: &Model) -> Result<u16> {
        let reply =
            self.engine.client().execute_raw("query-pci", None, Duration::from_secs(30)).map_err(s)?;
        let ids = guest_harness::hotplug::query_pci_ids(&reply, qdev_id).ok_or_else(|| {
            format!("QEMU holds {qdev_id} but query-pci does not list it as a PCI function")
        })?;
        match ids {
            (vendor, device) if vendor == m.vendor && m.zpci_devices.contains(&device) => Ok(device),
            (vendor, device) => Err(format!(
                "QEMU presents {qdev_id} as {vendor:04x}:{device:04x}; a {} on zPCI is {:04x}:{}",
                m.driver,
                m.vendor,
                m.zpci_devices.iter().map(|d| format!("{d:04x}")).collect::<Vec<_>>().join(" or ")
            )),
        }
    }

    /// The failure of a function QEMU holds (the engine reported it plugged) that the
    /// guest never listed: what was awaited, for how long, and what the guest lists that
    /// is new since the plug.
    fn never_listed(&self, id: &str, what: &str, waited: Duration, before: &GuestState) -> String {
        let now = self.guest.state();
        let new: Vec<String> = now
            .pci
            .values()
            .filter(|d| before.pci.get(&d.bdf).map_or(true, |old| old.node != d.node))
            .map(|d| format!("{} {:04x}:{:04x}", d.bdf, d.vendor, d.device))
            .collect();
        let listed = if new.is_empty() { "nothing new".to_string() } else { new.join(", ") };
        format!(
            "QEMU holds {id} (the engine reported it plugged) but the guest never listed {what} \
             within {:.0} s; new in the guest since the plug: {listed}",
            waited.as_secs_f64()
        )
    }

    /// A device that must not fit: the planner refused it. Proves that the engine was never
    /// asked: no new `device_add` in its journal, nothing of the device in QEMU.
    fn refused(&self, p: &mut Plugged<'_>, error: &str, adds_before: Result<usize>) {
        p.row.planned = "-".into();
        let adds_after = journal_device_adds(self.journal);
        let in_qemu = self.peripheral().map(|list| list.iter().any(|x| x.starts_with(p.spec.id.as_str())));
        match (adds_before, adds_after, in_qemu) {
            (Ok(a), Ok(b), Ok(false)) if a == b => {
                p.row.ok = true;
                p.row.result = format!("ok: refused before any device_add: {error}");
            }
            other => p.row.fail(format!("refused ({error}), but journal/QEMU show a device_add: {other:?}")),
        }
        self.progress(&format!("{}: refused as it must be: {error}", p.spec.id));
    }

    /// Waits until the guest shows every function of the action where planned, then
    /// checks ids, path, BARs and the port's windows. A function counts as new only when
    /// its sysfs node differs from the one `before` the plug: a placeholder with the same
    /// ids and BARs at the same address must not pass for the device.
    fn check_guest(
        &self,
        action: &HotplugAction,
        m: &Model,
        sent: Instant,
        before: &GuestState,
        row: &mut Row,
    ) -> Result<Vec<Seen>> {
        let deadline = Instant::now() + GUEST_WAIT;
        let planned_bdfs: Vec<Bdf> = action
            .functions
            .iter()
            .filter_map(|f| f.guest.bdf())
            .filter_map(|b| b.to_string().parse().ok())
            .collect();
        let mut seen = Vec::new();
        let mut last_seen = sent;
        let mut guest_col = Vec::new();
        for f in action.functions.iter().rev() {
            match &f.guest {
                GuestLocation::Pci { bdf, .. } | GuestLocation::Zpci { bdf, .. } => {
                    let want: Bdf = *bdf;
                    let device_id = match f.guest {
                        GuestLocation::Zpci { .. } => self.zpci_device_id(f.id().as_str(), m)?,
                        _ => m.device,
                    };
                    let what = format!("{} ({:04x}:{device_id:04x}) at {want}", f.id(), m.vendor);
                    let found = self.guest.wait_map(&what, deadline, |st| {
                        let at = st.snapshot_at.unwrap_or_else(Instant::now);
                        let is_new =
                            |d: &&PciDevice| before.pci.get(&d.bdf).map_or(true, |old| old.node != d.node);
                        // Whatever is new at the planned address is the function; its ids
                        // are checked below, so other ids fail at once instead of at the
                        // deadline.
                        if let Some(d) = st.pci.get(&want).filter(is_new) {
                            return Some(Ok((d.clone(), at)));
                        }
                        // A new function elsewhere: the plan's address was wrong.
                        st.find(m.vendor, device_id)
                            .find(|d| !before.pci.contains_key(&d.bdf) && !planned_bdfs.contains(&d.bdf))
                            .map(|d| Err(d.bdf))
                    });
                    let found = match found {
                        Ok(found) => found,
                        Err(guest_harness::guest::GuestError::Timeout { waited, .. }) => {
                            return Err(self.never_listed(f.id().as_str(), &what, waited, before));
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    match found {
                        Ok((dev, at)) => {
                            last_seen = last_seen.max(at);
                            guest_col.push(want.to_string());
                            seen.push(Seen::Pci(want));
                            if (dev.vendor, dev.device) != (m.vendor, device_id) {
                                row.fail(format!(
                                    "the guest lists {:04x}:{:04x} at {want} where {} ({:04x}:{device_id:04x}) was plugged",
                                    dev.vendor,
                                    dev.device,
                                    f.id(),
                                    m.vendor
                                ));
                            }
                            if let GuestLocation::Pci { path, .. } = &f.guest {
                                let got = guest_path(&dev);
                                if got != path.to_string() {
                                    row.fail(format!("{} is at guest path {got}, planned {path}", f.id()));
                                }
                            }
                            if let (GuestLocation::Zpci { uid, fid, .. }, Some(z)) = (&f.guest, &dev.zpci) {
                                let num = |t: &str| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok();
                                if num(&z.uid) != Some(u64::from(*uid))
                                    || num(&z.fid) != Some(u64::from(*fid))
                                {
                                    row.fail(format!(
                                        "{}: zPCI uid {} fid {}, planned {uid} {fid}",
                                        f.id(),
                                        z.uid,
                                        z.fid
                                    ));
                                }
                            }
                        }
                        Err(elsewhere) => {
                            guest_col.push(elsewhere.to_string());
                            seen.push(Seen::Pci(elsewhere));
                            row.fail(format!("{} appeared at {elsewhere}, planned {want}", f.id()));
                        }
                    }
                }
                GuestLocation::Ccw { busid } => {
                    let what = format!("{} as ccw {busid}", f.id());
                    let (dev, at) = self
                        .guest
                        .wait_map(&what, deadline, |st| {
                            st.ccw
                                .get(busid)
                                .map(|d| (d.clone(), st.snapshot_at.unwrap_or_else(Instant::now)))
                        })
                        .map_err(s)?;
                    last_seen = last_seen.max(at);
                    guest_col.push(busid.clone());
                    seen.push(Seen::Ccw(busid.clone()));
                    if Some(dev.cutype.as_str()) != m.cutype {
                        row.fail(format!("{busid} has control unit {}, expected {:?}", dev.cutype, m.cutype));
                    }
                }
                other => return Err(format!("{}: guest location {other:?} cannot be checked here", f.id())),
            }
        }
        row.hotplug_ms = Some(last_seen.saturating_duration_since(sent).as_millis());
        row.guest = guest_col.join(" ");
        // BAR checks: let the kernel's messages about the new functions arrive first.
        std::thread::sleep(SETTLE);
        let state = self.guest.state();
        let mut problems = Vec::new();
        for bdf in seen.iter().filter_map(|x| match x {
            Seen::Pci(b) => Some(*b),
            Seen::Ccw(_) => None,
        }) {
            problems.extend(state.bar_problems(bdf, &m.expected_bars(), Some(sent)));
            for msg in state.kmsg_about(bdf).filter(|k| k.at >= sent) {
                row.notes.push(format!("kernel: {}", msg.text));
            }
            if let Some(dev) = state.pci.get(&bdf) {
                for bar in dev.bars() {
                    row.notes.push(format!("{bdf} BAR {} {bar}", bar.index));
                }
                if let Some(parent) = dev.parent().and_then(|p| state.pci.get(&p)) {
                    let w: Vec<String> = parent.windows().map(ToString::to_string).collect();
                    row.notes.push(format!("port {} windows {}", parent.bdf, w.join(" ")));
                }
                if let Some(windows) = &action.windows {
                    problems.extend(window_problems(&state, dev, windows));
                }
            }
        }
        if seen.iter().any(|x| matches!(x, Seen::Pci(_))) {
            row.bars_ok = Some(problems.is_empty());
        }
        for p in problems {
            row.fail(p);
        }
        Ok(seen)
    }

    /// What the port's live windows (`query-pci`: as the firmware or the guest programmed
    /// them) say about the device's BARs before it is plugged (`pci::window_shortfalls`):
    /// `None` where there is no such port (s390x).
    fn live_fit(&self, port: &str, m: &Model, functions: u8) -> Option<Vec<String>> {
        if self.scenario.arch == Arch::S390x {
            return None;
        }
        let reply = self.engine.client().execute_raw("query-pci", None, Duration::from_secs(30)).ok()?;
        let bridge = qmp_hotplug::pci::bridges(&reply).into_iter().find(|b| b.qdev_id == port)?;
        let need: Vec<_> = (0..functions).flat_map(|_| m.resources()).collect();
        Some(qmp_hotplug::pci::window_shortfalls(&bridge, &need))
    }

    /// The live-window prediction must match what the guest did where firmware windows
    /// are final (SeaBIOS, OVMF); where the guest kernel resizes windows at hotplug
    /// (aarch64) a mismatch is only noted.
    fn compare_fit(&self, why: &[String], bars_ok: bool, row: &mut Row) {
        let predicted = why.is_empty();
        row.notes.push(if predicted {
            "live windows before the plug: the BARs fit (pci::window_shortfalls)".to_string()
        } else {
            format!("live windows before the plug: {}", why.join("; "))
        });
        if predicted == bars_ok {
            return;
        }
        let said = if predicted { "a fit" } else { "no fit" };
        let did = if bars_ok { "assigned every BAR" } else { "did not" };
        let msg = format!("the live-window check predicted {said}, the guest {did}");
        if matches!(self.scenario.firmware(), Firmware::SeaBios | Firmware::Ovmf) {
            row.fail(msg);
        } else {
            row.notes.push(format!("{msg} (this guest resizes windows at hotplug)"));
        }
    }

    /// Every function on an expander must sit on the expander's NUMA node in the guest
    /// (`numa_node` in sysfs, from the expander's ACPI proximity domain). `pcie.0` has no
    /// node of its own (`planned` is `None`): what the guest says is only noted.
    fn check_numa(&self, seen: &[Seen], planned: Option<u32>, row: &mut Row) {
        let state = self.guest.state();
        for x in seen {
            let Seen::Pci(bdf) = x else { continue };
            let got = state.pci.get(bdf).and_then(|d| d.numa_node);
            match (planned, got) {
                (Some(want), Some(node)) if node == want => {
                    row.notes.push(format!("{bdf} on NUMA node {node} as planned"))
                }
                (Some(want), Some(node)) => row.fail(format!("{bdf} is on NUMA node {node}, planned {want}")),
                (Some(want), None) => {
                    row.fail(format!("{bdf}: the guest reports no NUMA node, planned {want}"))
                }
                (None, got) => row.notes.push(format!("{bdf} on pcie.0, guest NUMA node {got:?}")),
            }
        }
    }

    /// Waits until the guest shows none of `seen`; returns when (the snapshot's time).
    fn wait_gone(&self, seen: &[Seen]) -> Result<Instant> {
        let deadline = Instant::now() + GUEST_WAIT;
        self.guest
            .wait_map("the device to leave the guest", deadline, |st| {
                let gone = seen.iter().all(|x| match x {
                    Seen::Pci(b) => !st.pci.contains_key(b),
                    Seen::Ccw(id) => !st.ccw.contains_key(id),
                });
                gone.then(|| st.snapshot_at.unwrap_or_else(Instant::now))
            })
            .map_err(s)
    }

    fn unplug(&self, p: &mut Plugged<'_>, port: &str) {
        let result = match p.spec.unplug {
            UnplugMode::Normal => self.unplug_normal(p),
            UnplugMode::GuestStopped => self.unplug_guest_stopped(p, port),
            UnplugMode::GuestHung => self.unplug_guest_hung(p, port),
        };
        if let Err(e) = result {
            p.row.fail(format!("unplug: {e}"));
        }
        self.progress(&format!(
            "{}: unplugged, {} ({} ms)",
            p.spec.id,
            p.row.result,
            p.row.unplug_ms.unwrap_or(0)
        ));
    }

    fn unplug_normal(&self, p: &mut Plugged<'_>) -> Result<()> {
        let t0 = Instant::now();
        match self.engine.unplug(p.spec.id.as_str()).map_err(s)? {
            UnplugOutcome::Removed => {}
            other => {
                return Err(format!(
                    "{other:?}: no DEVICE_DELETED within {:?} with the guest running",
                    unplug_timeout(self.scenario)
                ))
            }
        }
        let qemu = t0.elapsed();
        let guest = self.wait_gone(&p.seen)?.saturating_duration_since(t0);
        p.row.unplug_ms = Some(qemu.max(guest).as_millis());
        p.row.notes.push(format!(
            "DEVICE_DELETED and objects released after {} ms, guest dropped it after {} ms",
            qemu.as_millis(),
            guest.as_millis()
        ));
        Ok(())
    }

    /// The guest's CPUs are stopped, so nothing answers the slot: the unplug must end
    /// pending at its deadline with the port held; after `cont` the late
    /// `DEVICE_DELETED` must complete it (the engine's watcher frees the port).
    fn unplug_guest_stopped(&self, p: &mut Plugged<'_>, port: &str) -> Result<()> {
        self.qmp("stop")?;
        let t0 = Instant::now();
        let outcome = self.engine.unplug(p.spec.id.as_str());
        let waited = t0.elapsed();
        let state = self.engine.device(p.spec.id.as_str()).map(|d| d.state);
        let held = !self.engine.is_port_free(port);
        // Whatever happened, the guest runs again.
        self.qmp("cont")?;
        let resumed = Instant::now();
        match outcome.map_err(s)? {
            UnplugOutcome::Pending => {}
            other => return Err(format!("ended {other:?} although the guest's CPUs were stopped")),
        }
        if state != Some(DeviceState::UnplugPending) || !held {
            return Err(format!("after the deadline the device is {state:?} and the port held: {held}"));
        }
        let deadline = Instant::now() + GUEST_WAIT;
        while !self.engine.is_port_free(port) {
            if Instant::now() >= deadline {
                return Err("still pending after cont: no late DEVICE_DELETED".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let qemu = resumed.elapsed();
        let guest = self.wait_gone(&p.seen)?.saturating_duration_since(resumed);
        p.row.unplug_ms = Some(qemu.max(guest).as_millis());
        p.row.result = "ok: pending while stopped, completed after cont".into();
        p.row.notes.push(format!(
            "guest stopped: unplug-pending after {} ms (deadline), port held; after cont DEVICE_DELETED freed it in {} ms, guest dropped it after {} ms",
            waited.as_millis(),
            qemu.as_millis(),
            guest.as_millis()
        ));
        Ok(())
    }
    /// Crashes the guest kernel while QEMU runs on, so nothing ever answers the slot:
    /// the unplug must end pending at its deadline, and stay so for a second deadline
    /// (no late `DEVICE_DELETED`), with the port held and QEMU still holding the device.
    fn unplug_guest_hung(&self, p: &mut Plugged<'_>, port: &str) -> Result<()> {
        // Panic timeout 0: the crashed kernel spins instead of rebooting (the harness
        // boots with panic=-1). The crash comes after the command has answered.
        self.guest
            .exec(
                "echo 0 > /proc/sys/kernel/panic; (sleep 1; echo c > /proc/sysrq-trigger) >/dev/null 2>&1 &",
                Instant::now() + Duration::from_secs(30),
            )
            .map_err(s)?;
        let panic = self
            .guest
            .wait_map("the guest kernel to panic", Instant::now() + GUEST_WAIT, |st| st.panic.clone())
            .map_err(s)?;
        let status =
            self.engine.client().execute_raw("query-status", None, Duration::from_secs(30)).map_err(s)?;
        let running = status.get("status").and_then(Value::as_str).map(str::to_owned);
        if running.as_deref() != Some("running") {
            return Err(format!("QEMU should run on with the guest dead, its status is {running:?}"));
        }
        let t0 = Instant::now();
        let outcome = self.engine.unplug(p.spec.id.as_str()).map_err(s)?;
        let waited = t0.elapsed();
        if outcome != UnplugOutcome::Pending {
            return Err(format!("ended {outcome:?} although the guest kernel is dead"));
        }
        // A second deadline: a dead guest never sends the event late either.
        std::thread::sleep(unplug_timeout(self.scenario));
        let state = self.engine.device(p.spec.id.as_str()).map(|d| d.state);
        let held = !self.engine.is_port_free(port);
        let in_qemu = self.peripheral()?.iter().any(|id| id.starts_with(p.spec.id.as_str()));
        if state != Some(DeviceState::UnplugPending) || !held || !in_qemu {
            return Err(format!(
                "with the guest dead the device is {state:?}, port held: {held}, still in QEMU: {in_qemu}"
            ));
        }
        p.row.unplug_ms = Some(waited.as_millis());
        p.row.result = "ok: pending, guest dead".into();
        p.row.notes.push(format!("guest crashed on purpose ({panic}); QEMU status running"));
        p.row.notes.push(format!(
            "unplug-pending after {} ms (deadline) and still after another {} ms; port held, QEMU still has the device",
            waited.as_millis(),
            unplug_timeout(self.scenario).as_millis()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_harness::reporter::Resource;
    use qmp_hotplug::BarExpectation;

    fn scenario(text: &str) -> Scenario {
        Scenario::parse(text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn switch_plan_maps_placeholders_objects_and_expectations() {
        let s = scenario(
            r#"
            name = "sw"
            arch = "x86_64"
            firmware = "seabios"
            mode = "switch-port"
            [[device]]
            id = "gpu0"
            kind = "ivshmem"
            bar_size = "32G"
            group = "g"
            [[device]]
            id = "gpu1"
            kind = "ivshmem"
            bar_size = "32G"
            group = "g"
            "#,
        );
        let planned = make_plan(&s, 256).unwrap();
        assert_eq!(planned.plan.switches.len(), 1);
        let spec = guest_spec(&s, &planned);
        assert!(spec.extra_args.iter().any(|a| a.starts_with("xio3130-downstream")), "{:?}", spec.extra_args);
        for id in ["gpu0", "gpu1"] {
            let action = planned.plan.hotplug_action(id).unwrap();
            let m = model(DeviceKind::Ivshmem, Some(32 << 30));
            let r = engine_request(&action, &m).unwrap();
            assert_eq!(Some(r.port.as_str()), action.port.as_ref().map(|p| p.as_str()));
            let ph = r.placeholder.as_ref().expect("a placeholder to remove first");
            let removal = action.remove_placeholder.as_ref().unwrap();
            assert_eq!(ph.devices, removal.device_del);
            assert!(!ph.objects.is_empty());
            assert_eq!(r.objects.len(), 1);
            assert_eq!(r.objects[0].qom_type, "memory-backend-ram");
            let GuestLocation::Pci { bdf, .. } = &action.functions[0].guest else { panic!("pci") };
            let Expectation::Pci(want) = &r.functions[0].expect else { panic!("pci expectation") };
            assert_eq!((want.bus, want.slot, want.function), (Some(bdf.bus()), Some(0), Some(0)));
            assert_eq!(want.bars, [BarExpectation::at(0, 256), BarExpectation::at(2, 32 << 30)]);
            // A model that disagrees with the plan's sizes is refused, not checked loosely.
            let e = engine_request(&action, &model(DeviceKind::Ivshmem, Some(64 << 30))).unwrap_err();
            assert!(
                e.contains("the plan expects BARs (index, size) [(Some(0), 256), (Some(2), 34359738368)]"),
                "{e}"
            );
            // So is a model whose BARs sit at other indices.
            let mut moved = model(DeviceKind::Ivshmem, Some(32 << 30));
            moved.bars[1].index = 4;
            assert!(engine_request(&action, &moved).is_err());
        }
    }

    #[test]
    fn qemu_default_reservations_plan_no_reserve_and_no_placeholder() {
        let s = scenario(
            r#"
            name = "u"
            arch = "x86_64"
            mode = "root-port"
            reservations = "qemu-default"
            [[device]]
            id = "gpu0"
            kind = "ivshmem"
            bar_size = "128G"
            "#,
        );
        let planned = make_plan(&s, 256).unwrap();
        let args = planned.plan.device_args().join(" ");
        assert!(!args.contains("reserve"), "{args}");
    }

    #[test]
    fn multifunction_and_zpci_requests() {
        let s = scenario(
            r#"
            name = "mf"
            arch = "x86_64"
            mode = "root-port"
            [[device]]
            id = "mf0"
            kind = "e1000e"
            functions = 2
            "#,
        );
        let planned = make_plan(&s, 256).unwrap();
        let action = planned.plan.hotplug_action("mf0").unwrap();
        let r = engine_request(&action, &model(DeviceKind::E1000e, None)).unwrap();
        let ids: Vec<&str> = r.functions.iter().map(|f| f.id().as_str()).collect();
        assert_eq!(ids, ["mf0-f1", "mf0"], "function 0 last");
        assert_eq!(r.device.as_str(), "mf0", "unplugged by the device's id");
        assert!(r.placeholder.is_none());
        let e1000e: Vec<BarExpectation> = model(DeviceKind::E1000e, None)
            .bars
            .iter()
            .map(|b| BarExpectation::at(b.index, b.size))
            .collect();
        for f in &r.functions {
            let Expectation::Pci(want) = &f.expect else { panic!("{} on PCI", f.id()) };
            assert_eq!(want.bars, e1000e, "{}: the plan's BARs at the model's indices", f.id());
        }

        let s = scenario(
            r#"
            name = "z"
            arch = "s390x"
            mode = "ccw"
            [[device]]
            id = "net0"
            kind = "virtio-net-ccw"
            [[device]]
            id = "znic0"
            kind = "virtio-net"
            "#,
        );
        let planned = make_plan(&s, 256).unwrap();
        let ccw = engine_request(
            &planned.plan.hotplug_action("net0").unwrap(),
            &model(DeviceKind::VirtioNetCcw, None),
        )
        .unwrap();
        assert_eq!((ccw.port.as_str(), ccw.device.as_str()), ("net0", "net0"));
        assert_eq!(ccw.functions[0].expect, Expectation::Present);
        let action = planned.plan.hotplug_action("znic0").unwrap();
        assert_eq!(planned_location(&action), "0001:00:00.0 (uid 1, fid 0)");
        let z = engine_request(&action, &model(DeviceKind::VirtioNet, None)).unwrap();
        let ids: Vec<&str> = z.functions.iter().map(|f| f.id().as_str()).collect();
        assert_eq!(ids, ["zpci-znic0", "znic0"], "the zpci device goes first");
        assert_eq!(z.device.as_str(), "znic0");
        // The function is expected in query-pci with the model's BARs, at any address.
        let Expectation::Pci(want) = &z.functions[1].expect else { panic!("znic0 on PCI") };
        assert_eq!((want.bus, want.slot, want.function), (None, None, None));
        let virtio: Vec<BarExpectation> = model(DeviceKind::VirtioNet, None)
            .bars
            .iter()
            .map(|b| BarExpectation::at(b.index, b.size))
            .collect();
        assert_eq!(want.bars, virtio);
    }

    fn dev(bdf: &str, upstream: &[&str], resources: Vec<Resource>) -> PciDevice {
        PciDevice {
            bdf: bdf.parse().unwrap(),
            vendor: 0x1af4,
            device: 0x1110,
            class: 0x050000,
            driver: None,
            resources,
            upstream: upstream.iter().map(|u| u.parse().unwrap()).collect(),
            zpci: None,
            node: Some(1),
            numa_node: None,
        }
    }

    #[test]
    fn expander_paths_start_with_the_root_bus_and_numa_memory_adds_up() {
        let behind_pxb = dev("0000:81:00.0", &["0000:80:00.0"], Vec::new());
        assert_eq!(guest_path(&behind_pxb), "80/00/00");
        let on_pxb_root = dev("0000:80:03.0", &[], Vec::new());
        assert_eq!(guest_path(&on_pxb_root), "80/03");
        let args = numa_args(3, 256).join(" ");
        assert!(args.contains("id=numa0,size=86M") && args.contains("id=numa2,size=85M"), "{args}");
        assert!(
            args.contains("node,nodeid=0,cpus=0,memdev=numa0") && args.contains("node,nodeid=1,memdev=numa1")
        );
        assert!(numa_args(0, 256).is_empty());
    }

    #[test]
    fn numa_scenario_plans_an_expander_for_node_1() {
        let s = Scenario::load(&crate::scenario::default_dir().join("x86-numa-expanders.toml")).unwrap();
        let planned = make_plan(&s, 256).unwrap();
        let gpu = planned.plan.hotplug_action("gpu1").unwrap();
        let GuestLocation::Pci { path, .. } = &gpu.functions[0].guest else { panic!("pci") };
        let root = path.root_bus.expect("node 1 is behind an expander");
        let node_of = |id: &str| {
            let a = planned.plan.hotplug_action(id).unwrap();
            let GuestLocation::Pci { path, .. } = &a.functions[0].guest else { panic!("pci") };
            let port = planned.plan.ports.iter().find(|p| Some(&p.id) == a.port.as_ref()).unwrap();
            (path.root_bus, port.numa_node)
        };
        assert_eq!(node_of("gpu1"), (Some(root), Some(1)));
        let (node0_root, node0) = node_of("nic0");
        assert!(node0_root.is_some_and(|r| r != root) && node0 == Some(0), "node 0 has an expander too");
        assert_eq!(node_of("nic9"), (None, None), "a device without a node stays on pcie.0");
        assert!(guest_spec(&s, &planned).extra_args.iter().any(|a| a.contains(&format!("bus_nr={root}"))));
    }

    #[test]
    fn guest_path_and_window_checks() {
        let d = dev("0000:03:00.1", &["0000:00:01.0", "0000:01:00.0", "0000:02:01.0"], Vec::new());
        assert_eq!(guest_path(&d), "01/00/01/00.1");
        let pref = |size: u64| Resource {
            index: 15,
            start: 0x40_0000_0000,
            end: 0x40_0000_0000 + size - 1,
            flags: guest_harness::reporter::IORESOURCE_MEM
                | guest_harness::reporter::IORESOURCE_PREFETCH
                | guest_harness::reporter::IORESOURCE_MEM_64,
        };
        let mut state = GuestState::default();
        let port = dev("0000:02:01.0", &["0000:00:01.0", "0000:01:00.0"], vec![pref(32 << 30)]);
        state.pci.insert(port.bdf, port);
        let planned = |size: u64| {
            let mut r = Reservation::default();
            r.pref = pcie_topology::WindowReservation { size, align: size };
            r
        };
        assert!(window_problems(&state, &d, &planned(32 << 30)).is_empty());
        let p = window_problems(&state, &d, &planned(64 << 30));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("smaller than the planned 64G"), "{p:?}");
        let orphan = dev("0000:09:00.0", &["0000:00:09.0"], Vec::new());
        assert!(window_problems(&state, &orphan, &planned(1 << 20))[0].contains("no parent"));
    }
}

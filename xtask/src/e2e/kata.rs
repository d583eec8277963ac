//! The `kata` mode: a guest shaped like Kata Containers' VM, planned and driven through
//! `pcie_topology::kata` and `qmp-hotplug` the way a Kata runtime would.
//!
//! The scenario's `[kata]` table holds Kata's settings (`pcie_root_port`,
//! `cold_plug_vfio`, `hot_plug_vfio`, `default_bridges`, memory hotplug, kernel
//! parameters, NUMA); its devices carry Kata-style hex ids. The guest boots q35 with
//! Kata's command-line shape: `virtio-rng-pci` on `pcie.0` without `addr=` before Kata's
//! bridge at slot 2 (`pci-bridge`, or under OVMF a root port with a `pcie-pci-bridge`
//! behind it), `virtio-serial-pci` and a stand-in for `vhost-vsock-pci` without `addr=`
//! (`virtio-balloon-pci`: `vhost-vsock-pci` needs the host's `/dev/vhost-vsock`, which a
//! TCG test host need not have; it takes a slot the same way), `-m …,slots=…,maxmem=…`,
//! the kernel parameters, then the plan's ports and the cold-plugged devices.
//!
//! QEMU's own QMP socket belongs to the "VMM" (a client the runner holds for the whole
//! run, as Kata's runtime holds its own); a second client there gets no greeting, which
//! one row shows. The engine works on a second monitor the runner adds
//! (`qmp_hotplug::monitor_args`).
//!
//! Every device is looked up in the guest from the agent option string the mapping made
//! for it (`pcie_topology::kata::options_for`, `DDDD:BB:DD.F=<path>`): the guest helper
//! `/xt/kata-path` resolves the path by Kata's agent's rules and must land on the
//! function QEMU has under the device's id (`query-pci` on the VMM's connection, bus
//! numbers as the guest left them) with the device's vendor and device ids. The emulated
//! devices stand in for host functions `0000:4X:00.F`, which the option strings name.
//! Cold-plugged devices are checked after boot; the others are placed on spare ports,
//! plugged, checked, unplugged, and plan and engine must agree on every port after each
//! step, after an unplug and after a restart of the engine (a new process's view: the
//! plan read back from the file written at boot, the engine opened on the same journal,
//! `Engine::reconcile_plan` holding the port of the device still plugged, which the new
//! engine then unplugs). The engine must say how it found each hotplugged function: by
//! its place in the tree where the guest renumbers buses (`pci=assign-busses`), by
//! address otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch_x86_aarch64::Q35;
use pcie_topology::kata::{self, KataConfig};
use pcie_topology::{FunctionRequest, FunctionResource, HotplugAction, HotplugProfile, Plan, QemuId};
use pcilibs::bdf::Bdf;
use qmp_hotplug::{
    ClientOptions, Engine, EngineOptions, Expectation, PciIds, QmpClient, UnplugOutcome, VisibilityCheck,
};

use super::models::{model, Model};
use super::planned::numa_args;
use super::{Row, RunContext, ScenarioReport};
use crate::scenario::{DeviceKind, DeviceSpec, KataSection, Scenario};
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestSpec};

type Result<T> = std::result::Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// How long the guest may take to show or drop a device (TCG, two guests at a time).
const GUEST_WAIT: Duration = Duration::from_secs(90);

/// The devices Kata puts on `pcie.0` without `addr=`, as the guest gets them: the
/// random-number device, the console, and the stand-in for the vsock device.
const ROOT_DEVICES: [&str; 3] = ["virtio-rng-pci", "virtio-serial-pci", "virtio-balloon-pci"];

/// Runs one `kata` scenario.
pub fn run(scenario: &Scenario, ctx: &RunContext) -> ScenarioReport {
    let mut report = ScenarioReport::new(scenario);
    if let Err(e) = run_inner(scenario, ctx, &mut report) {
        report.error = Some(e);
    }
    report
}

/// Kata's settings of the scenario for a guest of `memory_mib`.
fn kata_config(scenario: &Scenario, section: &KataSection, memory_mib: u32) -> Result<KataConfig> {
    let mut c = KataConfig::default();
    c.firmware = if scenario.firmware() == Firmware::Ovmf { "OVMF.fd".into() } else { String::new() };
    c.default_bridges = section.default_bridges;
    c.pcie_root_port = section.pcie_root_port;
    c.pcie_switch_port = section.pcie_switch_port;
    c.cold_plug_vfio = section.cold_plug_vfio.parse().map_err(s)?;
    c.hot_plug_vfio = section.hot_plug_vfio.parse().map_err(s)?;
    c.default_memory = memory_mib;
    c.memory_slots = section.memory_slots;
    c.default_maxmemory = section.default_maxmemory;
    c.kernel_params = section.kernel_params.clone();
    c.root_devices = ROOT_DEVICES.map(String::from).to_vec();
    c.numa = section.numa;
    Ok(c)
}

/// Kata's own QEMU arguments for the devices of `config` (what its command-line
/// generator writes, the stand-in in place of `vhost-vsock-pci`).
fn kata_args(config: &KataConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]);
    for i in 0..config.default_bridges {
        if config.uefi() {
            let rp = format!(
                "pcie-root-port,id=rp-pci-bridge-{i},addr={},chassis={},slot=0,bus=pcie.0,multifunction=off,bus-reserve=0x1,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
                2 + i,
                16 + i
            );
            let br = format!("pcie-pci-bridge,bus=rp-pci-bridge-{i},id=pci-bridge-{i}");
            push(&["-device", &rp, "-device", &br]);
        } else {
            let br = format!(
                "pci-bridge,bus=pcie.0,id=pci-bridge-{i},chassis_nr={},shpc=off,addr={},io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
                i + 1,
                2 + i
            );
            push(&["-device", &br]);
        }
    }
    push(&["-device", "virtio-serial-pci,id=serial0", "-device", "virtio-balloon-pci,id=vsock-stand-in"]);
    a
}

/// The host function the `n`th device of the scenario stands for (function `f`).
fn stand_in_host(n: usize, f: u8) -> Result<Bdf> {
    let bus = u8::try_from(0x41 + n).map_err(|_| "too many devices".to_string())?;
    Bdf::new(0, bus, 0, f).map_err(s)
}

/// The planner request of a scenario device under its Kata id.
fn device_request(d: &DeviceSpec, m: &Model) -> Result<pcie_topology::DeviceRequest> {
    let id = kata::qemu_id(&d.id).map_err(s)?;
    let mut functions = Vec::new();
    for f in 0..d.functions {
        functions.push(match (d.kind, d.bar_size) {
            (DeviceKind::Ivshmem, Some(size)) => FunctionRequest::ivshmem(f, &id, size.0).map_err(s)?,
            _ => FunctionRequest::new(
                f,
                m.driver,
                m.bars.iter().map(|b| FunctionResource::at(b.index, b.resource())).collect(),
            ),
        });
    }
    let mut r = pcie_topology::DeviceRequest::new(id, functions).with_runtime_id(d.id.clone());
    r.numa_node = d.numa_node;
    Ok(r)
}

/// `request` with every function's vendor and device ids expected as the model has them
/// (a runtime knows them from the host function it passes through).
fn with_ids(mut request: qmp_hotplug::PlugRequest, m: &Model) -> qmp_hotplug::PlugRequest {
    for f in &mut request.functions {
        if let Expectation::Pci(want) = &mut f.expect {
            want.ids = Some(PciIds::new(m.vendor, m.device));
        }
    }
    request
}

fn run_inner(scenario: &Scenario, ctx: &RunContext, report: &mut ScenarioReport) -> Result<()> {
    let section = scenario.kata.as_ref().ok_or("mode kata without a [kata] table")?;
    let dir = ctx.scenario_dir(scenario).map_err(|e| format!("run folder: {e}"))?;
    let mut spec = GuestSpec::new(scenario.arch).firmware(scenario.firmware());
    spec.name = scenario.name.clone();
    let config = kata_config(scenario, section, spec.memory_mib)?;

    // The plan, as a Kata runtime would make it: its settings, its cold-plugged devices,
    // a profile for the spare ports.
    let mut hosts: BTreeMap<QemuId, Vec<Bdf>> = BTreeMap::new();
    let mut cold = Vec::new();
    for (n, d) in scenario.devices.iter().enumerate() {
        let m = model(d.kind, d.bar_size.map(|b| b.0));
        let r = device_request(d, &m)?;
        hosts.insert(r.id.clone(), (0..d.functions).map(|f| stand_in_host(n, f)).collect::<Result<_>>()?);
        if d.cold {
            cold.push(r);
        }
    }
    let profile = HotplugProfile::parse(scenario.spare_profile.as_deref().unwrap_or("nic")).map_err(s)?;
    let mut request = config.plan_request(cold, Some(profile)).map_err(|e| format!("kata mapping: {e}"))?;
    request.options.spare_bus_reserve = section.spare_bus_reserve;
    let platform = if scenario.firmware() == Firmware::Ovmf { Q35::ovmf() } else { Q35::seabios() };
    let plan = pcie_topology::plan(&platform, &request).map_err(|e| format!("planning: {e}"))?;
    let plan_file = dir.join("plan.json");
    std::fs::write(&plan_file, plan.to_json().map_err(s)?).map_err(s)?;
    std::fs::write(dir.join("plan.txt"), plan.explain()).map_err(s)?;

    // Kata's command line with the plan's part and the engine's own monitor.
    let monitor = dir.join("hotplug.sock");
    spec.extra_args.extend(kata_args(&config));
    spec.extra_args.extend(plan.device_args());
    spec.extra_args.extend(plan.extra.qemu.iter().cloned());
    spec.extra_args.extend(qmp_hotplug::monitor_args("hotplug", &monitor));
    spec.extra_args.extend(numa_args(scenario.numa_nodes, spec.memory_mib));
    if let Some(h) = plan.memory_hotplug {
        spec.memory_hotplug = Some((h.slots, u32::try_from(h.maxmem >> 20).map_err(s)?));
    }
    spec.cmdline.extend(config.kernel_params.split_whitespace().map(String::from));
    spec.cmdline.extend(plan.kernel_args().iter().cloned());
    spec.phys_bits = plan.cpu_phys_bits();
    let guest = super::boot_recorded(scenario, &spec, ctx, &dir, report)?;

    // The VMM's connection, held for the whole run.
    let mut options = ClientOptions::default();
    options.connect_timeout = Duration::from_secs(30);
    let vmm =
        QmpClient::connect_unix(guest.qmp_socket(), options.clone()).map_err(|e| format!("VMM QMP: {e}"))?;
    let mut rows = vec![shared_qmp_row(guest.qmp_socket(), &monitor)];
    let engine_client = QmpClient::connect_unix(&monitor, options).map_err(|e| format!("engine QMP: {e}"))?;
    let journal = dir.join("hotplug.journal");
    let mut engine_options = EngineOptions::default();
    engine_options.unplug_timeout = Duration::from_secs(if section.numa { 20 } else { 10 });
    engine_options.visible_timeout = Duration::from_secs(30);
    let (engine, _) = Engine::open(Arc::new(engine_client), &journal, engine_options.clone())
        .map_err(|e| format!("hotplug engine: {e}"))?;
    let mut run = Run { scenario, ctx, guest: &guest, vmm: &vmm, plan, hosts };

    for d in scenario.devices.iter().filter(|d| d.cold) {
        rows.push(run.check_cold(d));
    }
    let mut plugged = Vec::new();
    for d in scenario.devices.iter().filter(|d| !d.cold) {
        let (row, action) = run.hotplug(&engine, d);
        plugged.push((row, action, d));
    }
    // The last device stays plugged across the restart and is unplugged by the new
    // engine.
    let last = plugged.pop();
    for (mut row, action, d) in plugged {
        if let Some(action) = action {
            run.unplug(&engine, d, &action, &mut row);
        }
        rows.push(row);
    }
    let held = last.as_ref().and_then(|(_, a, _)| a.as_ref()).map(|a| a.port_or_device().clone());
    let (row, engine) = run.restart(engine, &journal, &plan_file, engine_options, held);
    rows.push(row);
    if let Some((mut row, action, d)) = last {
        if let (Some(action), Some(engine)) = (action, engine.as_ref()) {
            run.unplug(engine, d, &action, &mut row);
        }
        rows.push(row);
    }
    report.rows = rows;
    Ok(())
}

/// The row that shows QMP sharing: a second client on the VMM's socket gets no greeting
/// while the VMM holds it, and the engine's own monitor greets.
// Options are set field by field: `ClientOptions` is to become non-exhaustive.
#[allow(clippy::field_reassign_with_default)]
fn shared_qmp_row(vmm_socket: &Path, monitor: &Path) -> Row {
    let mut row = Row::new("qmp: VMM's socket + engine's monitor");
    row.planned = "-".into();
    let mut quick = ClientOptions::default();
    quick.handshake_timeout = Duration::from_secs(2);
    quick.connect_timeout = Duration::from_secs(2);
    match QmpClient::connect_unix(vmm_socket, quick) {
        Err(e) => row.notes.push(format!("second client on the VMM's socket: {e}")),
        Ok(_) => row.fail("a second client on the VMM's socket got a QMP session"),
    }
    row.notes.push(format!("engine on its own monitor {}", monitor.display()));
    if row.result.is_empty() {
        row.ok = true;
        row.result = "ok: the VMM keeps its socket, the engine has its own monitor".into();
    }
    row
}

/// What one run works with.
struct Run<'a> {
    scenario: &'a Scenario,
    ctx: &'a RunContext,
    guest: &'a Guest,
    /// The VMM's QMP connection.
    vmm: &'a QmpClient,
    plan: Plan,
    /// Host functions each device stands for, by its QEMU id.
    hosts: BTreeMap<QemuId, Vec<Bdf>>,
}

impl Run<'_> {
    fn progress(&self, text: &str) {
        if self.ctx.progress {
            eprintln!("[{}] {text}", self.scenario.name);
        }
    }

    /// The agent's option strings for device `id` (Kata's id), naming the host functions
    /// it stands for.
    fn options(&self, id: &str) -> Result<Vec<String>> {
        kata::options_for(&self.plan, id, |d, f| {
            self.hosts.get(&d.id).and_then(|h| h.get(usize::from(f.function))).copied()
        })
        .map_err(s)
    }

    /// Where QEMU has function `qdev` (`query-pci` on the VMM's connection).
    fn qemu_address(&self, qdev: &str) -> Result<(u8, u8, u8)> {
        let reply = self.vmm.execute_raw("query-pci", None, Duration::from_secs(30)).map_err(s)?;
        let f = qmp_hotplug::pci::functions(&reply)
            .into_iter()
            .find(|f| f.qdev_id == qdev)
            .ok_or_else(|| format!("{qdev} is not in query-pci"))?;
        Ok((f.address.bus(), f.address.device(), f.address.function()))
    }

    /// Looks every option of device `d` up in the guest as Kata's agent would and checks
    /// that it names the function QEMU has under the device's id, with its ids; returns
    /// the guest addresses found.
    fn check_options(&self, d: &DeviceSpec, m: &Model, row: &mut Row) -> Result<Vec<String>> {
        let options = self.options(&d.id)?;
        if options.len() != usize::from(d.functions) {
            return Err(format!(
                "{} option strings for {} functions: {options:?}",
                options.len(),
                d.functions
            ));
        }
        let id = kata::qemu_id(&d.id).map_err(s)?;
        let mut found = Vec::new();
        for (f, option) in options.iter().enumerate() {
            let (host, path) =
                option.split_once('=').ok_or_else(|| format!("option {option} has no path"))?;
            let out = self
                .guest
                .exec(&format!("/xt/kata-path {path}"), Instant::now() + Duration::from_secs(30))
                .map_err(s)?;
            let line = out.lines.first().cloned().unwrap_or_default();
            if out.status != Some(0) {
                return Err(format!("{option}: the agent's lookup found nothing: {line}"));
            }
            let mut words = line.split_whitespace();
            let bdf = Bdf::parse(words.next().unwrap_or_default()).map_err(|e| format!("{line}: {e}"))?;
            let ids = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
            let want_ids = (format!("{:#06x}", m.vendor), format!("{:#06x}", m.device));
            if (ids.0, ids.1) != (want_ids.0.as_str(), want_ids.1.as_str()) {
                row.fail(format!(
                    "{option}: resolves to {bdf} with ids {ids:?}, the device has {want_ids:?}"
                ));
            }
            let qdev = pcie_topology::plan::function_id(&id, u8::try_from(f).unwrap_or(0));
            let qemu = self.qemu_address(&qdev)?;
            if qemu != (bdf.bus(), bdf.device(), bdf.function()) {
                row.fail(format!(
                    "{option}: resolves to {bdf}, but QEMU has {qdev} at {:02x}:{:02x}.{}",
                    qemu.0, qemu.1, qemu.2
                ));
            }
            row.notes.push(format!("agent option {option}: host {host} -> guest {bdf} ({qdev})"));
            found.push(bdf.to_string());
        }
        Ok(found)
    }

    /// A cold-plugged device: present after boot, found from its option strings.
    fn check_cold(&self, d: &DeviceSpec) -> Row {
        let mut row = Row::new(format!("{} (cold)", d.id));
        let m = model(d.kind, d.bar_size.map(|b| b.0));
        row.planned = self.options(&d.id).map(|o| o.join(" ")).unwrap_or_else(|e| e);
        let wait =
            self.guest.wait_for(&format!("{} in the guest", d.id), Instant::now() + GUEST_WAIT, |st| {
                st.find(m.vendor, m.device).count() > 0
            });
        if let Err(e) = wait {
            row.fail(format!("never in the guest: {e}"));
            return row;
        }
        match self.check_options(d, &m, &mut row) {
            Ok(found) => row.guest = found.join(" "),
            Err(e) => row.fail(e),
        }
        self.bars(&row.guest.clone(), &m, &mut row);
        if row.result.is_empty() {
            row.ok = true;
            row.result = "ok".into();
        }
        self.progress(&format!("{} (cold): {}", d.id, row.result));
        row
    }

    /// Every BAR of the functions at `guest` (addresses, space separated) assigned.
    fn bars(&self, guest: &str, m: &Model, row: &mut Row) {
        let state = self.guest.state();
        let mut problems = Vec::new();
        for b in guest.split_whitespace() {
            let Ok(bdf) = b.parse() else { continue };
            problems.extend(state.bar_problems(bdf, &m.expected_bars(), None));
        }
        row.bars_ok = Some(problems.is_empty());
        for p in problems {
            row.fail(p);
        }
    }

    /// Plan and engine agree on every port: a port is taken in the plan exactly when the
    /// engine holds a device there or the device was plugged at boot.
    fn agree(&self, engine: &Engine) -> Result<()> {
        let mut wrong = Vec::new();
        for p in &self.plan.ports {
            let plan_taken = p.occupant.is_some();
            let cold =
                p.occupant.as_ref().and_then(|o| self.plan.device(o.as_str())).is_some_and(|d| d.cold_plug);
            let engine_taken = !engine.is_port_free(p.id.as_str());
            if plan_taken != (engine_taken || cold) {
                wrong.push(format!("{}: plan {plan_taken}, engine {engine_taken}", p.id));
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("plan and engine disagree on ports: {}", wrong.join(", ")))
        }
    }

    /// Places a device on a spare port, plugs it and finds it from its option strings.
    fn hotplug(&mut self, engine: &Engine, d: &DeviceSpec) -> (Row, Option<HotplugAction>) {
        let mut row = Row::new(d.id.clone());
        let m = model(d.kind, d.bar_size.map(|b| b.0));
        let request = match device_request(d, &m) {
            Ok(r) => r,
            Err(e) => {
                row.fail(e);
                return (row, None);
            }
        };
        let action = match self.plan.place(request) {
            Ok(a) => a,
            Err(e) => {
                row.fail(format!("no spare port: {e}"));
                return (row, None);
            }
        };
        row.planned = self.options(&d.id).map(|o| o.join(" ")).unwrap_or_else(|e| e);
        let port = action.port_or_device().to_string();
        self.progress(&format!("plugging {} ({}) onto {port}", d.id, action.device));
        let before = self.guest.state();
        let sent = Instant::now();
        let plugged = engine.plug(with_ids(qmp_hotplug::PlugRequest::from_action(&action), &m));
        if let Ok(record) = &plugged {
            self.checks_used(record, &mut row);
        }
        if let Err(e) = plugged {
            row.fail(format!("plug: {e}"));
            // The plan placed it; the engine rolled it back: one call puts them in step.
            self.reconcile(engine, &mut row);
            return (row, None);
        }
        let seen =
            self.guest.wait_for(&format!("{} in the guest", d.id), Instant::now() + GUEST_WAIT, |st| {
                st.find(m.vendor, m.device)
                    .any(|x| before.pci.get(&x.bdf).map_or(true, |old| old.node != x.node))
            });
        row.hotplug_ms = Some(sent.elapsed().as_millis());
        if let Err(e) = seen {
            row.fail(format!("never in the guest: {e}"));
        } else {
            match self.check_options(d, &m, &mut row) {
                Ok(found) => row.guest = found.join(" "),
                Err(e) => row.fail(e),
            }
            self.bars(&row.guest.clone(), &m, &mut row);
        }
        if let Err(e) = self.agree(engine) {
            row.fail(e);
        }
        (row, Some(action))
    }

    /// How the engine found each function (it must say), and that it is the check the
    /// guest's bus numbering calls for: by place in the tree when the guest renumbers
    /// buses, by address otherwise.
    fn checks_used(&self, record: &qmp_hotplug::DeviceRecord, row: &mut Row) {
        let want = if self.plan.options.guest_renumbers_buses {
            VisibilityCheck::TreePlace
        } else {
            VisibilityCheck::Address
        };
        for f in &record.request.functions {
            let id = f.id().as_str();
            match record.check_of(id) {
                Some(c) if c == want => row.notes.push(format!("engine found {id} {c}")),
                Some(c) => row.fail(format!("engine found {id} {c}, expected {want}")),
                None => row.fail(format!("engine says nothing of how it found {id}")),
            }
        }
    }

    /// Unplugs a device and frees its port in the plan once the engine did.
    fn unplug(&mut self, engine: &Engine, d: &DeviceSpec, action: &HotplugAction, row: &mut Row) {
        let t0 = Instant::now();
        match engine.unplug(action.device.as_str()) {
            Ok(UnplugOutcome::Removed) => {}
            Ok(other) => row.fail(format!("unplug: {other:?}")),
            Err(e) => row.fail(format!("unplug: {e}")),
        }
        // Released from the plan when the engine freed the port, kept while the unplug
        // is pending (`agree` below checks every port).
        self.reconcile(engine, row);
        let gone =
            row.guest.split_whitespace().filter_map(|b| b.parse().ok()).collect::<Vec<pcilibs::bdf::Bdf>>();
        let wait = self.guest.wait_for("the device to leave the guest", Instant::now() + GUEST_WAIT, |st| {
            gone.iter().all(|b| !st.pci.contains_key(b))
        });
        if let Err(e) = wait {
            row.fail(format!("still in the guest: {e}"));
        }
        row.unplug_ms = Some(t0.elapsed().as_millis());
        if let Err(e) = self.agree(engine) {
            row.fail(e);
        }
        if row.result.is_empty() {
            row.ok = true;
            row.result = "ok".into();
        }
        self.progress(&format!("{}: {}", d.id, row.result));
    }

    /// [`Engine::reconcile_plan`] on the run's plan, what it did in the row's notes.
    fn reconcile(&mut self, engine: &Engine, row: &mut Row) {
        match engine.reconcile_plan(&mut self.plan) {
            Ok(sync) if sync.unchanged() && sync.pending.is_empty() => {}
            Ok(sync) => row.notes.push(format!("reconcile: {sync:?}")),
            Err(e) => row.fail(format!("reconcile: {e}")),
        }
    }

    /// A restart of the runtime with a device still plugged (its port `held`): the engine
    /// is dropped and opened again on its journal, the plan read back from the file written
    /// at boot (which does not know that device) and put in step with the engine, which
    /// must hold that port in the plan; then they must agree on every port. Returns the
    /// new engine.
    fn restart(
        &mut self,
        engine: Engine,
        journal: &Path,
        plan_file: &Path,
        options: EngineOptions,
        held: Option<QemuId>,
    ) -> (Row, Option<Engine>) {
        let mut row = Row::new("restart: plan file from boot + journal");
        row.planned = "-".into();
        let client = engine.client().clone();
        drop(engine);
        let result = (|| -> Result<Engine> {
            let (engine, report) = Engine::open(client, journal, options).map_err(s)?;
            row.notes.push(format!("recovery: {report:?}"));
            let text = std::fs::read_to_string(plan_file).map_err(s)?;
            self.plan = Plan::from_json(&text).map_err(s)?;
            let sync = engine.reconcile_plan(&mut self.plan).map_err(s)?;
            row.notes.push(format!("reconcile: {sync:?}"));
            if let Some(port) = &held {
                if !sync.held.iter().any(|(p, _)| p == port) {
                    return Err(format!("the plan does not hold {port}, where the engine has a device"));
                }
            }
            self.agree(&engine)?;
            Ok(engine)
        })();
        match result {
            Ok(engine) => {
                row.ok = true;
                row.result = "ok: plan and engine agree after the restart".into();
                (row, Some(engine))
            }
            Err(e) => {
                row.fail(e);
                (row, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Scenario {
        Scenario::parse(text, Path::new("t.toml")).unwrap()
    }

    const KATA: &str = r#"
        name = "k"
        arch = "x86_64"
        firmware = "seabios"
        mode = "kata"
        [kata]
        pcie_root_port = 3
        cold_plug_vfio = "root-port"
        hot_plug_vfio = "root-port"
        memory_slots = 10
        default_maxmemory = 65536
        kernel_params = "pci=realloc pci=nocrs pci=assign-busses"
        [[device]]
        id = "3fa9c2e1b0d4e577"
        kind = "ivshmem"
        bar_size = "1G"
        cold = true
        [[device]]
        id = "9b2d"
        kind = "virtio-net"
    "#;

    #[test]
    fn kata_scenario_plans_around_kata_devices() {
        let s = scenario(KATA);
        let section = s.kata.as_ref().unwrap();
        let c = kata_config(&s, section, 512).unwrap();
        assert!(c.guest_renumbers_buses());
        let m = model(DeviceKind::Ivshmem, Some(1 << 30));
        let cold = device_request(&s.devices[0], &m).unwrap();
        assert_eq!(cold.id.as_str(), "k3fa9c2e1b0d4e577");
        let r = c.plan_request(vec![cold], Some(HotplugProfile::nic())).unwrap();
        let plan = pcie_topology::plan(&Q35::seabios(), &r).unwrap();
        assert_eq!(plan.ports.len(), 3);
        assert_eq!(plan.ports[0].bdf.device(), 5, "rng, bridge, serial and stand-in take slots 1-4");
        let args = kata_args(&c).join(" ");
        assert!(
            args.contains("pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2"),
            "{args}"
        );
        assert!(!args.contains("virtio-rng-pci,rng=rng0,addr"), "{args}");
    }
}

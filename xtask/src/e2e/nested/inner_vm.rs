//! In the outer guest: plan the inner VM from the passed-through functions' facts, boot
//! it (SeaBIOS and a Debian kernel with the project's reporter, TCG inside TCG), and drive
//! its hotplug through `qmp-hotplug`'s engine: every device onto its planned port, checked
//! in `query-pci` (place and the host's BAR sizes) and in the inner guest (address, every
//! BAR assigned inside the port's window), unplugged again, and a multi-function group
//! whose function 0 fails on purpose rolled back without leftovers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch_x86_aarch64::Q35;
use pcie_topology::plan::GuestLocation;
use pcie_topology::request::guest_function_numbers;
use pcie_topology::{HotplugAction, Plan, PlanRequest, QemuId};
use pcilibs::facts::{FunctionFacts, ResourceOptions};
use qmp_hotplug::journal::{read_file, Record, Step};
use qmp_hotplug::{
    BarExpectation, ClientOptions, DeviceState, Engine, EngineError, EngineOptions, Expectation, PlugRequest,
    QmpClient, UnplugOutcome,
};
use serde_json::{json, Value};

use super::passthrough::HostFunction;
use super::wire::{InnerConfig, PassDevice, WireRow};
use guest_harness::accel::AccelChoice;
use guest_harness::arch::Arch;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::kernels::GuestKernel;
use guest_harness::reporter::GuestState;
use pcilibs::bdf::Bdf;

type Result<T> = std::result::Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// The ROM file function 0 asks for in the rollback check: it does not exist, so QEMU
/// fails that function's realize after VFIO opened the device.
pub const MISSING_ROM: &str = "/nonexistent/nested-vfio-rollback.rom";

/// The passed-through functions of one inner device, by their function number there: the
/// planner's numbering (`guest_function_numbers`), so a lone SR-IOV VF is function 0.
pub fn functions_by_number<'a>(
    device: &PassDevice,
    host: &'a [HostFunction],
) -> BTreeMap<u8, &'a HostFunction> {
    let mine: Vec<&HostFunction> = host.iter().filter(|f| f.device == device.id).collect();
    let facts: Vec<FunctionFacts> = mine.iter().map(|f| f.vfio.clone()).collect();
    guest_function_numbers(&facts).into_iter().zip(mine).collect()
}

/// The planner's request for one inner device: each host function as `vfio-pci` with its
/// VFIO facts (`DeviceRequest::from_facts`). Functions without a PCI Express capability
/// (ivshmem) go on a root port like any other.
pub fn device_request(device: &PassDevice, host: &[HostFunction]) -> Result<pcie_topology::DeviceRequest> {
    let opts = ResourceOptions::default().with_rom(true);
    let id = QemuId::new(device.id.as_str()).map_err(s)?;
    let facts: Vec<FunctionFacts> =
        host.iter().filter(|f| f.device == device.id).map(|f| f.vfio.clone()).collect();
    pcie_topology::DeviceRequest::from_facts(id, &facts, &opts).map_err(s)
}

/// Plans the inner q35 (SeaBIOS, one root port per device) from the VFIO facts.
pub fn plan_inner(devices: &[PassDevice], host: &[HostFunction], memory_mib: u32) -> Result<Plan> {
    let mut requests = Vec::new();
    for d in devices {
        if host.iter().any(|f| f.device == d.id) {
            requests.push(device_request(d, host)?);
        }
    }
    let mut request = PlanRequest::default().with_devices(requests);
    request.options.guest_ram = u64::from(memory_mib) << 20;
    pcie_topology::plan(&Q35::seabios(), &request).map_err(|e| format!("planning the inner VM: {e}"))
}

/// The inner guest: same kernel as the outer one, the outer guest's busybox.
pub fn inner_assets(cfg: &InnerConfig) -> GuestAssets {
    GuestAssets {
        kernel: GuestKernel {
            arch: Arch::X86_64,
            release: cfg.kernel.release.clone(),
            package: cfg.kernel.package.clone(),
            version: cfg.kernel.version.clone(),
            image: PathBuf::from(&cfg.kernel.image),
            // No modules go into the inner initramfs.
            modules_dir: PathBuf::from("/nonexistent"),
            config: PathBuf::from("/nonexistent"),
        },
        busybox: PathBuf::from("/bin/busybox"),
        qemu: cfg.qemu.clone(),
        // The inner guest boots SeaBIOS (from the launcher's firmware folders).
        ovmf: PathBuf::from("/nonexistent"),
        aarch64_uefi: PathBuf::from("/nonexistent"),
        versions: cfg.versions.clone(),
        state_dir: std::env::temp_dir(),
    }
}

/// QEMU arguments of the inner VM: the harness's machine, the plan's ports.
pub fn inner_spec(plan: &Plan, cfg: &InnerConfig) -> GuestSpec {
    let mut spec = GuestSpec::new(Arch::X86_64);
    spec.name = "inner".into();
    spec.accel = AccelChoice::Tcg;
    spec.memory_mib = cfg.memory_mib;
    spec.cmdline.extend(cfg.cmdline.iter().cloned());
    spec.phys_bits = plan.cpu_phys_bits();
    spec.extra_args.extend(plan.device_args());
    spec.extra_args.extend(plan.extra.qemu.iter().cloned());
    spec.boot_timeout = Duration::from_secs(cfg.guest_wait_s.max(60) * 4);
    spec
}

/// The BARs the host function has, as `query-pci` numbers them (ROM is 6).
pub fn host_bars(f: &HostFunction) -> Vec<(u8, u64)> {
    let mut bars: Vec<(u8, u64)> = f.vfio.bars.iter().filter_map(|b| Some((b.index, b.size?))).collect();
    if let Some(rom) = f.vfio.rom_size {
        bars.push((6, rom));
    }
    bars
}

/// The engine's request for a plan action (`PlugRequest::from_action`), expecting each
/// function at its planned place with the BARs the plan took from the host function's
/// VFIO facts, at their indices (the ROM as BAR 6). Those must be the host function's BARs
/// ([`host_bars`]); a plan that says otherwise is an error, not a weaker check. With
/// `iommufd` the devices use an `iommufd` object (`HotplugAction::with_iommufd`).
pub fn engine_request(
    action: &HotplugAction,
    host: &BTreeMap<u8, &HostFunction>,
    iommufd: bool,
) -> Result<PlugRequest> {
    let action = if iommufd {
        let id = QemuId::new(format!("iommufd-{}", action.device)).map_err(s)?;
        action.clone().with_iommufd(id, None)
    } else {
        action.clone()
    };
    let mut request = PlugRequest::from_action(&action);
    for f in &action.functions {
        let hf = host
            .get(&f.function)
            .ok_or_else(|| format!("{}: no host function {}", action.device, f.function))?;
        let not_pci = || format!("{}: function {} is not planned on PCI", action.device, f.function);
        let function = request.functions.iter_mut().find(|r| r.id() == f.id()).ok_or_else(not_pci)?;
        let Expectation::Pci(want) = &function.expect else { return Err(not_pci()) };
        let host: Vec<BarExpectation> =
            host_bars(hf).into_iter().map(|(bar, size)| BarExpectation::at(bar, size)).collect();
        if want.bars != host {
            return Err(format!(
                "{}: the plan expects BARs {:?}, host function {} has {host:?}",
                f.id(),
                want.bars,
                hf.bdf
            ));
        }
    }
    Ok(request)
}

/// Planned guest address of each function of an action: (function number, QEMU id, BDF).
pub fn planned_functions(action: &HotplugAction) -> Vec<(u8, String, Bdf)> {
    action
        .functions
        .iter()
        .filter_map(|f| match &f.guest {
            GuestLocation::Pci { bdf, .. } => Some((f.function, f.id().to_string(), *bdf)),
            _ => None,
        })
        .collect()
}

/// The planned guest path of function 0 (Kata form).
pub fn planned_path(action: &HotplugAction) -> String {
    action
        .functions
        .iter()
        .find(|f| f.function == 0)
        .and_then(|f| f.guest.path())
        .map_or_else(|| "-".into(), ToString::to_string)
}

/// `device_add` ids of the port's plug steps in the journal, in the order they were sent.
pub fn journal_adds(journal: &Path, port: &str) -> Result<Vec<String>> {
    let (records, _) = read_file(journal).map_err(s)?;
    Ok(records
        .iter()
        .filter_map(|r| match r {
            Record::Step { port: p, step: Step::DeviceAdd { id } } if p == port => Some(id.clone()),
            _ => None,
        })
        .collect())
}

/// The running inner VM and its engine.
pub struct InnerVm<'a> {
    /// The guest (the harness's `Guest`, run inside the outer guest).
    pub guest: Guest,
    /// The hotplug engine on the guest's QMP socket.
    pub engine: Engine,
    /// The plan it was booted with.
    pub plan: Plan,
    /// Journal of the engine.
    pub journal: PathBuf,
    /// The passed-through functions.
    pub host: &'a [HostFunction],
    /// Devices use an iommufd object.
    pub iommufd: bool,
    /// How long the guest may take to show or drop a device.
    pub guest_wait: Duration,
}

/// A device plugged, carried to the unplug.
pub struct Plugged {
    /// Its row.
    pub row: WireRow,
    /// The engine's port, when the plug succeeded.
    pub port: Option<String>,
    /// The device's id (what the engine unplugs by), when the plug succeeded.
    pub device: Option<String>,
    /// Where the inner guest showed each function.
    pub seen: Vec<Bdf>,
    /// QEMU ids of its functions.
    pub ids: Vec<String>,
}

impl InnerVm<'_> {
    /// Boots the inner VM with `plan` and opens the engine on its QMP socket.
    pub fn start<'a>(
        plan: Plan,
        cfg: &InnerConfig,
        host: &'a [HostFunction],
        iommufd: bool,
        work: &Path,
    ) -> Result<InnerVm<'a>> {
        let spec = inner_spec(&plan, cfg);
        let guest = Guest::boot(&spec, &inner_assets(cfg)).map_err(|e| format!("inner guest: {e}"))?;
        let mut client_options = ClientOptions::default();
        client_options.connect_timeout = Duration::from_secs(60);
        client_options.handshake_timeout = Duration::from_secs(60);
        client_options.command_timeout = Duration::from_secs(120);
        let client = QmpClient::connect_unix(guest.qmp_socket(), client_options)
            .map_err(|e| format!("inner QMP: {e}"))?;
        let journal = work.join("hotplug.journal");
        let guest_wait = Duration::from_secs(cfg.guest_wait_s);
        let mut options = EngineOptions::default();
        options.unplug_timeout = Duration::from_millis(cfg.unplug_timeout_ms);
        options.visible_timeout = guest_wait;
        options.busy_retry = guest_wait;
        options.placeholder_timeout = guest_wait;
        let (engine, _) =
            Engine::open(Arc::new(client), &journal, options).map_err(|e| format!("engine: {e}"))?;
        Ok(InnerVm { guest, engine, plan, journal, host, iommufd, guest_wait })
    }

    fn qmp(&self, command: &str, args: Option<Value>) -> Result<Value> {
        self.engine
            .client()
            .execute_raw(command, args, Duration::from_secs(120))
            .map_err(|e| format!("{command}: {e}"))
    }

    /// Ids under `/machine/peripheral`.
    pub fn peripheral(&self) -> Result<BTreeSet<String>> {
        let list = self.qmp("qom-list", Some(json!({"path": "/machine/peripheral"})))?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| {
                        p.get("type").and_then(Value::as_str).is_some_and(|t| t.starts_with("child<"))
                    })
                    .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Ids of the `iommufd` objects QEMU holds (`qom-list /objects`).
    fn iommufd_objects(&self) -> Result<BTreeSet<String>> {
        let list = self.qmp("qom-list", Some(json!({"path": "/objects"})))?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p.get("type").and_then(Value::as_str) == Some("child<iommufd>"))
                    .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// With iommufd, the unplug must take the device's `iommufd` object away too: `before`
    /// is the list from before the unplug.
    fn check_objects_released(&self, p: &mut Plugged, before: &BTreeSet<String>) -> Result<()> {
        if !self.iommufd {
            return Ok(());
        }
        let after = self.iommufd_objects()?;
        let released: Vec<&String> = before.difference(&after).collect();
        if released.is_empty() {
            return Err(format!(
                "no iommufd object was released with the device (before {before:?}, after {after:?})"
            ));
        }
        p.row
            .notes
            .push(format!("iommufd object(s) {released:?} removed with the device (qom-list /objects)"));
        Ok(())
    }

    /// Whether QEMU offers an `iommufd` object (QEMU 9.0+).
    pub fn qemu_has_iommufd(&self) -> Result<bool> {
        let types = self.qmp("qom-list-types", Some(json!({"implements": "user-creatable"})))?;
        Ok(types
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t.get("name").and_then(Value::as_str) == Some("iommufd"))))
    }

    fn device_functions(&self, device: &PassDevice) -> BTreeMap<u8, &HostFunction> {
        super::inner_vm::functions_by_number(device, self.host)
    }

    fn wait_guest(&self, what: &str, check: impl FnMut(&GuestState) -> bool) -> Result<GuestState> {
        self.guest.wait_for(what, Instant::now() + self.guest_wait, check).map_err(s)
    }

    /// Plugs `device` onto its planned port and checks QEMU and the inner guest.
    pub fn plug(&self, device: &PassDevice) -> Plugged {
        let mut row = WireRow::new(device.id.clone());
        let mut plugged =
            Plugged { row: WireRow::default(), port: None, device: None, seen: Vec::new(), ids: Vec::new() };
        if let Err(e) = self.plug_checked(device, &mut row, &mut plugged) {
            row.fail(e);
        }
        plugged.row = row;
        plugged
    }

    fn plug_checked(&self, device: &PassDevice, row: &mut WireRow, plugged: &mut Plugged) -> Result<()> {
        let action = self.plan.hotplug_action(&device.id).map_err(s)?;
        row.planned = planned_path(&action);
        let host = self.device_functions(device);
        let request = engine_request(&action, &host, self.iommufd)?;
        let port = request.port.to_string();
        let id = request.device.to_string();
        plugged.ids = request.functions.iter().map(|f| f.id().to_string()).collect();
        let planned = planned_functions(&action);
        let started = Instant::now();
        let rec = self.engine.plug(request).map_err(|e| format!("plug: {e}"))?;
        plugged.port = Some(port.clone());
        plugged.device = Some(id);
        let engine_ms = started.elapsed().as_millis();
        row.notes.push(format!(
            "engine: {} in {engine_ms} ms; query-pci: {}",
            rec.history.iter().map(|t| format!("{:?}", t.state)).collect::<Vec<_>>().join(" > "),
            rec.guest.iter().map(|(id, a)| format!("{id} {a}")).collect::<Vec<_>>().join(", ")
        ));
        if rec.state != DeviceState::Visible {
            row.fail(format!("engine state {:?} after plug", rec.state));
        }
        // The engine expects every vfio-pci function with its host function's ids.
        for f in rec.request.functions.iter().filter(|f| f.device.driver == "vfio-pci") {
            match &f.expect {
                Expectation::Pci(p) if p.ids.is_some() => {
                    let ids = p.ids.map(|i| i.to_string()).unwrap_or_default();
                    row.notes.push(format!("engine checked {} with ids {ids}", f.id()));
                }
                _ => row.fail(format!("the engine did not check the ids of {}", f.id())),
            }
        }
        // Function 0 last: the journal has the order the engine sent them in.
        let adds = journal_adds(&self.journal, &port)?;
        let f0 = action.functions.iter().find(|f| f.function == 0).map(|f| f.id().to_string());
        if adds.last() != f0.as_ref() {
            row.fail(format!("device_add order {adds:?}: function 0 was not last"));
        }
        if adds.len() > 1 {
            row.notes.push(format!("device_add order: {}", adds.join(", ")));
        }
        self.wait_guest(&format!("{} in the inner guest", device.id), |s| {
            planned.iter().all(|(n, _, bdf)| {
                let want = host.get(n).map(|h| h.vfio.vendor_id);
                s.pci.get(bdf).is_some_and(|d| Some(d.vendor) == want)
            })
        })?;
        row.hotplug_ms = Some(started.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(800)); // BAR messages follow the device
        let state = self.guest.state();
        let mut problems = Vec::new();
        for (n, _, bdf) in &planned {
            plugged.seen.push(*bdf);
            let expected: Vec<(u8, u64)> = host
                .get(n)
                .map(|h| host_bars(h).into_iter().filter(|(i, _)| *i < 6).collect())
                .unwrap_or_default();
            problems.extend(state.bar_problems(*bdf, &expected, Some(started)));
            if let Some(dev) = state.pci.get(bdf) {
                let bars: Vec<String> = dev.bars().map(|b| format!("BAR{} {b}", b.index)).collect();
                row.notes.push(format!("inner guest {bdf}: {}", bars.join(", ")));
            }
        }
        problems.extend(self.window_problems(&state, &action, &planned));
        row.guest = planned.iter().map(|(_, _, b)| b.to_string()).collect::<Vec<_>>().join(" ");
        row.bars_ok = Some(problems.is_empty());
        if let Some(first) = problems.first() {
            row.fail(first.clone());
            row.notes.extend(problems.iter().skip(1).cloned());
        }
        Ok(())
    }

    /// The port's windows in the inner guest must be at least what the plan reserved.
    fn window_problems(
        &self,
        state: &GuestState,
        action: &HotplugAction,
        planned: &[(u8, String, Bdf)],
    ) -> Vec<String> {
        let Some(reservation) = &action.windows else { return Vec::new() };
        let Some(parent) = planned.first().and_then(|(_, _, b)| state.pci.get(b)).and_then(|d| d.parent())
        else {
            return vec!["the device has no parent bridge in the inner guest".into()];
        };
        let Some(port) = state.pci.get(&parent) else { return vec![format!("port {parent} missing")] };
        let mut out = Vec::new();
        for (what, size, pref) in
            [("prefetchable", reservation.pref.size, true), ("memory", reservation.mem.size, false)]
        {
            if size == 0 {
                continue;
            }
            let window =
                port.windows().find(|w| w.is_assigned() && w.is_mem() && w.is_prefetchable() == pref);
            match window {
                Some(w) if w.size() >= size => {}
                Some(w) => {
                    out.push(format!("port {parent} {what} window {w} is smaller than planned {size:#x}"))
                }
                None => out.push(format!("port {parent} has no {what} window (planned {size:#x})")),
            }
        }
        out
    }

    /// Unplugs a plugged device: `device_del` until `DEVICE_DELETED` and the inner guest
    /// dropped it. With `stopped`, the inner guest's CPUs are stopped first: the unplug must
    /// end pending at the deadline, and after `cont` the late event must finish it.
    pub fn unplug(&self, p: &mut Plugged, stopped: bool) {
        let Some(device) = p.device.clone() else { return };
        let result = if stopped { self.unplug_stopped(p, &device) } else { self.unplug_normal(p, &device) };
        if let Err(e) = result {
            p.row.fail(e);
        }
    }

    fn gone_from_guest(&self, seen: &[Bdf]) -> Result<()> {
        self.wait_guest("the inner guest to drop the device", |s| seen.iter().all(|b| !s.pci.contains_key(b)))
            .map(|_| ())
    }

    /// Waits until a pending unplug of `device` was finished by its late `DEVICE_DELETED`.
    fn await_removed(&self, device: &str) -> Result<()> {
        let deadline = Instant::now() + self.guest_wait;
        loop {
            if self.engine.device(device).map(|d| d.state) == Some(DeviceState::Removed) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the late DEVICE_DELETED did not finish the unplug within {:?}",
                    self.guest_wait
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn unplug_normal(&self, p: &mut Plugged, device: &str) -> Result<()> {
        let objects = if self.iommufd { self.iommufd_objects()? } else { BTreeSet::new() };
        let started = Instant::now();
        match self.engine.unplug(device).map_err(|e| format!("unplug: {e}"))? {
            UnplugOutcome::Removed => {}
            // A loaded machine can make the inner guest miss the deadline; the late event
            // must still finish the job (and the row says so).
            UnplugOutcome::Pending => {
                self.await_removed(device)?;
                p.row.notes.push(format!(
                    "DEVICE_DELETED came after the deadline; the late event completed the unplug after {} ms",
                    started.elapsed().as_millis()
                ));
            }
            other => return Err(format!("unplug ended {other:?} with the inner guest running")),
        }
        let deleted_ms = started.elapsed().as_millis();
        self.gone_from_guest(&p.seen)?;
        p.row.unplug_ms = Some(started.elapsed().as_millis());
        p.row.notes.push(format!("DEVICE_DELETED after {deleted_ms} ms"));
        self.check_objects_released(p, &objects)?;
        p.row.pass(format!(
            "ok: at planned place with host BAR sizes ({})",
            if self.iommufd { "iommufd" } else { "container" }
        ));
        Ok(())
    }

    fn unplug_stopped(&self, p: &mut Plugged, device: &str) -> Result<()> {
        let objects = if self.iommufd { self.iommufd_objects()? } else { BTreeSet::new() };
        self.qmp("stop", None)?;
        let started = Instant::now();
        let outcome = self.engine.unplug(device).map_err(|e| format!("unplug: {e}"));
        let waited = started.elapsed();
        let peripheral = self.peripheral()?;
        let still: Vec<&String> = p.ids.iter().filter(|id| peripheral.contains(*id)).collect();
        let state = self.engine.device(device).map(|d| d.state);
        self.qmp("cont", None)?;
        let resumed = Instant::now();
        match outcome? {
            UnplugOutcome::Pending => {}
            other => {
                return Err(format!("unplug with the inner guest stopped ended {other:?}, expected pending"))
            }
        }
        if state != Some(DeviceState::UnplugPending) || still.is_empty() {
            return Err(format!("after the deadline: state {state:?}, QEMU still has {still:?}"));
        }
        p.row.notes.push(format!(
            "guest stopped: unplug pending after {} ms (deadline), port kept, QEMU still has {still:?}",
            waited.as_millis()
        ));
        self.await_removed(device)?;
        self.gone_from_guest(&p.seen)?;
        // As in the other modes' tables: from `cont` to QEMU and the guest agreeing.
        p.row.unplug_ms = Some(resumed.elapsed().as_millis());
        p.row.notes.push(format!("after cont: removed in {} ms", resumed.elapsed().as_millis()));
        self.check_objects_released(p, &objects)?;
        p.row.pass(format!(
            "ok: pending at the {} ms deadline while stopped, late DEVICE_DELETED completed it",
            waited.as_millis()
        ));
        Ok(())
    }

    /// Plugs the group again with function 0 failing on purpose (a ROM file that does not
    /// exist): the engine must roll back the functions already added, and neither QEMU
    /// (`qom-list`, `query-pci`) nor the inner guest may keep anything. Then plugs it
    /// normally, which proves QEMU gave the VFIO group back, and unplugs it.
    pub fn rollback(&self, device: &PassDevice) -> WireRow {
        let mut row = WireRow::new(format!("{} rollback", device.id));
        if let Err(e) = self.rollback_checked(device, &mut row) {
            row.fail(e);
        }
        row
    }

    fn rollback_checked(&self, device: &PassDevice, row: &mut WireRow) -> Result<()> {
        let action = self.plan.hotplug_action(&device.id).map_err(s)?;
        row.planned = planned_path(&action);
        let host = self.device_functions(device);
        let mut request = engine_request(&action, &host, self.iommufd)?;
        let f0 =
            action.functions.iter().find(|f| f.function == 0).map(|f| f.id().to_string()).unwrap_or_default();
        for f in &mut request.functions {
            if f.id().as_str() == f0 {
                f.device = f.device.clone().prop("romfile", MISSING_ROM);
            }
        }
        let ids: Vec<String> = request.functions.iter().map(|f| f.id().to_string()).collect();
        let port = request.port.to_string();
        let device_id = request.device.to_string();
        let before = journal_adds(&self.journal, &port)?.len();
        let objects_before = if self.iommufd { self.iommufd_objects()? } else { BTreeSet::new() };
        let started = Instant::now();
        match self.engine.plug(request) {
            Err(EngineError::PlugFailed { state: DeviceState::Removed, cause, .. }) => {
                row.notes.push(format!("function 0 failed as intended: {cause}"));
            }
            Err(EngineError::PlugFailed { state: DeviceState::UnplugPending, cause, .. }) => {
                row.notes.push(format!("function 0 failed as intended: {cause}"));
                self.await_removed(&device_id)?;
                row.notes.push("the rollback's DEVICE_DELETED came after the deadline".into());
            }
            Err(e) => return Err(format!("plug failed but did not end removed: {e}")),
            Ok(rec) => return Err(format!("the faulty plug succeeded ({:?})", rec.state)),
        }
        row.unplug_ms = Some(started.elapsed().as_millis());
        let adds = journal_adds(&self.journal, &port)?;
        let sent: Vec<String> = adds.iter().skip(before).cloned().collect();
        row.notes.push(format!("sent before the failure: {}", sent.join(", ")));
        if sent.len() < 2 {
            row.fail(format!("only {sent:?} was sent: nothing was there to roll back"));
        }
        let peripheral = self.peripheral()?;
        let pci = qmp_hotplug::pci::functions(&self.qmp("query-pci", None)?);
        let left: Vec<&String> = ids
            .iter()
            .filter(|id| peripheral.contains(*id) || pci.iter().any(|f| &f.qdev_id == *id))
            .collect();
        if !left.is_empty() {
            row.fail(format!("left behind in QEMU: {left:?}"));
        }
        if self.iommufd {
            let objects = self.iommufd_objects()?;
            if objects != objects_before {
                row.fail(format!(
                    "iommufd objects before {objects_before:?}, after the rollback {objects:?}"
                ));
            } else {
                row.notes
                    .push("the rollback removed the group's iommufd object too (qom-list /objects)".into());
            }
        }
        let planned = planned_functions(&action);
        std::thread::sleep(Duration::from_millis(1500)); // let the guest settle
        let state = self.guest.state();
        let in_guest: Vec<String> = planned
            .iter()
            .filter(|(_, _, b)| state.pci.contains_key(b))
            .map(|(_, _, b)| b.to_string())
            .collect();
        if !in_guest.is_empty() {
            row.fail(format!("left behind in the inner guest: {in_guest:?}"));
        }
        if !self.engine.is_port_free(&port) {
            row.fail(format!("port {port} is not free after the rollback"));
        }
        row.guest = "-".into();
        // The group is usable again: a clean plug and unplug on the same port.
        let mut again = self.plug(device);
        self.unplug(&mut again, false);
        if !again.row.ok {
            row.fail(format!("plug after the rollback: {}", again.row.result));
        } else {
            let ms = again.row.hotplug_ms.map_or_else(|| "-".into(), |m| m.to_string());
            row.notes.push(format!("plugged again after the rollback ({ms} ms) and unplugged"));
        }
        row.pass(format!(
            "ok: {} rolled back after function 0 failed; nothing left in qom-list, query-pci or the inner guest",
            sent.first().map_or("nothing", String::as_str)
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcilibs::bar::BarKind;
    use pcilibs::emulated::EmulatedConfigSpace;
    use pcilibs::sizing::{BarSizes, SizeSource};

    use super::super::passthrough::Caps;

    fn function(device: &str, bdf: &str, bar: u64, rom: Option<u64>) -> HostFunction {
        let mut e = EmulatedConfigSpace::endpoint(0x8086, 0x10d3, 0x020000, 4096);
        e.set_bar(0, BarKind::Mem32, false, bar, 0xfe80_0000).unwrap();
        let mut sizes = BarSizes::empty(SizeSource::Vfio);
        sizes.bars[0] = Some(bar);
        sizes.rom = rom;
        let bdf = Bdf::parse(bdf).unwrap();
        let mut facts = FunctionFacts::from_config(bdf, e.bytes(), Some(&sizes)).unwrap();
        facts.rom_size = rom;
        facts.iommu_group = Some(4);
        HostFunction {
            device: device.into(),
            bdf,
            group: 4,
            sysfs: facts.clone(),
            vfio: facts,
            sysfs_caps: Caps::default(),
            vfio_caps: Caps::default(),
        }
    }

    fn devices() -> (Vec<PassDevice>, Vec<HostFunction>) {
        let d = |id: &str, slot, functions| PassDevice {
            id: id.into(),
            kind: "e1000e".into(),
            port_slot: slot,
            functions,
            stopped_unplug: false,
        };
        (
            vec![d("nic0", 1, 1), d("mf0", 2, 2)],
            vec![
                function("nic0", "0000:01:00.0", 128 << 10, Some(256 << 10)),
                function("mf0", "0000:02:00.0", 128 << 10, None),
                function("mf0", "0000:02:00.1", 64 << 10, None),
            ],
        )
    }

    #[test]
    fn plan_and_requests_from_host_functions() {
        let (devs, host) = devices();
        let plan = plan_inner(&devs, &host, 128).unwrap();
        let action = plan.hotplug_action("mf0").unwrap();
        let by_number = functions_by_number(&devs[1], &host);
        let req = engine_request(&action, &by_number, false).unwrap();
        assert_eq!(Some(&req.port), action.port.as_ref());
        assert_eq!(req.device, action.device);
        // Planned highest function first; the expectation carries the host's BAR sizes.
        assert_eq!(req.functions.len(), 2);
        assert_eq!(
            req.functions[0].host,
            Some(pcie_topology::HostRef::Pci(Bdf::parse("0000:02:00.1").unwrap()))
        );
        assert_eq!(req.functions[0].qmp_arguments()["host"], "0000:02:00.1");
        let Expectation::Pci(want) = &req.functions[0].expect else { panic!() };
        assert_eq!(want.bars, [BarExpectation::at(0, 64 << 10)]);
        assert_eq!(want.function, Some(1));
        let single = engine_request(
            &plan.hotplug_action("nic0").unwrap(),
            &functions_by_number(&devs[0], &host),
            true,
        )
        .unwrap();
        let Expectation::Pci(want) = &single.functions[0].expect else { panic!() };
        assert!(want.bars.contains(&BarExpectation::at(6, 256 << 10)), "ROM as BAR 6");
        assert_eq!(single.objects[0].qom_type, "iommufd");
        assert_eq!(single.functions[0].qmp_arguments()["iommufd"], single.objects[0].id.as_str());
        // A plan whose BARs are not the host function's is refused.
        let mut wrong = plan.hotplug_action("mf0").unwrap();
        wrong.functions[0].bars[0].index = Some(2);
        let e = engine_request(&wrong, &by_number, false).unwrap_err();
        assert!(e.contains("host function 0000:02:00.1 has"), "{e}");
        let planned = planned_functions(&plan.hotplug_action("mf0").unwrap());
        assert_eq!(planned.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 0]);
        assert!(!planned_path(&action).is_empty());
    }

    #[test]
    fn a_lone_vf_becomes_function_0() {
        let vf = PassDevice {
            id: "nvme1-vf2".into(),
            kind: "nvme".into(),
            port_slot: 3,
            functions: 1,
            stopped_unplug: false,
        };
        let host = [function("nvme1-vf2", "0000:03:00.2", 16 << 10, None)];
        let by_number = functions_by_number(&vf, &host);
        assert_eq!(by_number.keys().copied().collect::<Vec<_>>(), [0]);
        let req = device_request(&vf, &host).unwrap();
        assert_eq!(req.functions[0].function, 0);
        assert_eq!(req.iommu_group, Some(4));
        let plan = plan_inner(std::slice::from_ref(&vf), &host, 128).unwrap();
        let planned = planned_functions(&plan.hotplug_action("nvme1-vf2").unwrap());
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].2.function(), 0);
        let placed = plan.device("nvme1-vf2").unwrap();
        assert_eq!(
            placed.host_functions(),
            [(&pcie_topology::HostRef::Pci("0000:03:00.2".parse().unwrap()), 0)]
        );
    }

    #[test]
    fn a_function_without_pcie_capability_goes_on_a_root_port() {
        let ivs = PassDevice {
            id: "ivs0".into(),
            kind: "ivshmem".into(),
            port_slot: 1,
            functions: 1,
            stopped_unplug: false,
        };
        let mut f = function("ivs0", "0000:01:00.0", 16 << 10, None);
        f.vfio.is_pcie = false;
        let plan = plan_inner(std::slice::from_ref(&ivs), &[f], 128).unwrap();
        assert!(plan.bridges.is_empty());
        let port = plan.port(plan.device("ivs0").unwrap().port.as_ref().unwrap().as_str()).unwrap();
        assert_eq!(port.kind, pcie_topology::PortKind::Root);
    }

    #[test]
    fn inner_spec_uses_the_plan() {
        let (devs, host) = devices();
        let plan = plan_inner(&devs, &host, 128).unwrap();
        let cfg = InnerConfig {
            devices: devs,
            kernel: super::super::wire::InnerKernel {
                image: "/xt/nested/vmlinuz".into(),
                release: "6.1.0-56-amd64".into(),
                package: "linux-image-6.1.0-56-amd64".into(),
                version: "6.1.192-2".into(),
            },
            memory_mib: 128,
            cmdline: vec!["mitigations=off".into()],
            unplug_timeout_ms: 5000,
            guest_wait_s: 60,
            require_iommufd: false,
            qemu: guest_harness::launcher::Launcher::system(),
            versions: guest_harness::stacks::Versions::default(),
        };
        let spec = inner_spec(&plan, &cfg);
        let args = spec.extra_args.join(" ");
        assert!(args.contains("pcie-root-port"), "{args}");
        assert_eq!(spec.memory_mib, 128);
        assert!(
            spec.kernel_cmdline().split(' ').any(|w| w == "mitigations=off"),
            "{}",
            spec.kernel_cmdline()
        );
        assert_eq!(inner_assets(&cfg).kernel.image, PathBuf::from("/xt/nested/vmlinuz"));
    }
}

//! Booting a QEMU guest with the project's initramfs and following what it reports.
//!
//! [`Guest::boot`] builds the initramfs, starts QEMU (serial console on a pipe, QMP on a
//! unix socket in a private temporary folder), and waits until the reporter says READY.
//! A reader thread folds the console into a [`GuestState`]; [`Guest::wait_for`] waits,
//! with a deadline, until that state satisfies a condition. Dropping a [`Guest`] kills
//! QEMU.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::accel::{self, Accel, AccelChoice, ProbeOutcome, VerdictStore};
use crate::arch::Arch;
use crate::firmware::Firmware;
use crate::initramfs::{self, InitramfsSpec};
use crate::kernels::{self, GuestKernel};
use crate::launcher::Launcher;
use crate::reporter::{CommandOutput, GuestState};
use crate::stacks::{self, Stack, StackError, Versions};
use qmp_hotplug::{ClientOptions, QmpClient};

/// Starting or following a guest failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// The spec asks for something the architecture does not have.
    #[error("bad guest spec: {0}")]
    BadSpec(String),
    /// The kernel or busybox could not be provisioned.
    #[error(transparent)]
    Kernel(Box<kernels::KernelError>),
    /// The stack's QEMU and firmware could not be provisioned.
    #[error(transparent)]
    Stack(Box<StackError>),
    /// The guest kernel or busybox of one architecture could not be provisioned: only
    /// that architecture's guests fail.
    #[error("the {arch} guest kernel or busybox of stack `{stack}` cannot be provisioned: {source}\n{hint}")]
    Assets {
        /// The stack.
        stack: String,
        /// The guest architecture.
        arch: Arch,
        /// What failed.
        source: Box<kernels::KernelError>,
        /// What to do about it.
        hint: String,
    },
    /// The initramfs could not be built.
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    /// QEMU could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The QEMU binary.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file in the guest's temporary folder could not be written.
    #[error("guest files: {0}")]
    Io(#[from] std::io::Error),
    /// The deadline passed before the guest got there.
    #[error("[{guest}] timed out after {waited:.1?} waiting for {what}{}", details(diagnostics))]
    Timeout {
        /// Guest name.
        guest: String,
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited: Duration,
        /// Console tail and QEMU's stderr.
        diagnostics: String,
    },
    /// QEMU exited (or the guest kernel panicked) before the guest got there.
    #[error("[{guest}] QEMU exited ({status}) while waiting for {what}{}", details(diagnostics))]
    Exited {
        /// Guest name.
        guest: String,
        /// What was awaited.
        what: String,
        /// Exit status in words.
        status: String,
        /// Console tail, panic line and QEMU's stderr.
        diagnostics: String,
    },
    /// A command sent to the guest was not acceptable.
    #[error("guest command {0:?} must be one line of printable text under 3000 bytes")]
    BadCommand(String),
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] qmp_hotplug::ClientError),
}

impl From<kernels::KernelError> for GuestError {
    fn from(e: kernels::KernelError) -> Self {
        GuestError::Kernel(Box::new(e))
    }
}

impl From<StackError> for GuestError {
    fn from(e: StackError) -> Self {
        GuestError::Stack(Box::new(e))
    }
}

fn details(diagnostics: &str) -> String {
    if diagnostics.is_empty() {
        String::new()
    } else {
        format!("\n{diagnostics}")
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, GuestError>;

/// Guest memory in MiB a lean guest gets with `firmware`: 256, and 512 under aarch64
/// UEFI, where Linux 7.3's EFI stub cannot place itself in 256 MiB under edk2 2026.08
/// ("EFI stub: ERROR: Failed to relocate kernel"; 6.1 and 6.12 boot in 256).
pub fn default_memory_mib(firmware: Firmware) -> u32 {
    match firmware {
        Firmware::Uefi => 512,
        Firmware::SeaBios | Firmware::Ovmf | Firmware::None => 256,
    }
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// Name used in progress messages and errors.
    pub name: String,
    /// Guest architecture.
    pub arch: Arch,
    /// Firmware.
    pub firmware: Firmware,
    /// Software emulation, KVM, or KVM only if the probe found it working.
    pub accel: AccelChoice,
    /// Extra `-machine` options (`key=value`), appended to the machine type.
    pub machine_opts: Vec<String>,
    /// CPU model; `None` picks the architecture's default for the accelerator.
    pub cpu: Option<String>,
    /// Guest physical address bits (x86_64 `phys-bits`).
    pub phys_bits: Option<u8>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Memory hotplug: DIMM slots and `maxmem` in MiB (`-m <memory>,slots=…,maxmem=…M`).
    pub memory_hotplug: Option<(u32, u32)>,
    /// `-object` arguments.
    pub objects: Vec<String>,
    /// `-device` arguments, in order.
    pub devices: Vec<String>,
    /// Any other QEMU arguments.
    pub extra_args: Vec<String>,
    /// Extra kernel command-line words.
    pub cmdline: Vec<String>,
    /// Modules, setup script and files for the initramfs.
    pub initramfs: InitramfsSpec,
    /// How long booting to READY may take.
    pub boot_timeout: Duration,
    /// Print progress messages while booting.
    pub progress: bool,
}

impl GuestSpec {
    /// A lean guest for `arch` with the architecture's defaults: 256 MiB, one vCPU, no
    /// devices beyond the machine's own.
    pub fn new(arch: Arch) -> Self {
        GuestSpec {
            name: arch.name().to_string(),
            arch,
            firmware: Firmware::default_for(arch),
            accel: AccelChoice::Auto,
            machine_opts: Vec::new(),
            cpu: None,
            phys_bits: None,
            memory_mib: default_memory_mib(Firmware::default_for(arch)),
            memory_hotplug: None,
            objects: Vec::new(),
            devices: Vec::new(),
            extra_args: Vec::new(),
            cmdline: Vec::new(),
            initramfs: InitramfsSpec::default(),
            boot_timeout: Duration::from_secs(120),
            progress: true,
        }
    }

    /// Adds a `-device` argument.
    pub fn device(mut self, arg: impl Into<String>) -> Self {
        self.devices.push(arg.into());
        self
    }

    /// Adds an `-object` argument.
    pub fn object(mut self, arg: impl Into<String>) -> Self {
        self.objects.push(arg.into());
        self
    }

    /// Sets the firmware (and the memory to that firmware's default, unless it was
    /// changed).
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        if self.memory_mib == default_memory_mib(self.firmware) {
            self.memory_mib = default_memory_mib(firmware);
        }
        self.firmware = firmware;
        self
    }

    fn machine_type(&self) -> &'static str {
        match self.arch {
            Arch::X86_64 => "q35",
            Arch::Aarch64 => "virt",
            Arch::S390x => "s390-ccw-virtio",
        }
    }

    fn cpu_model(&self, accel: Accel) -> Option<String> {
        let base = match (&self.cpu, accel, self.arch) {
            (Some(cpu), _, _) => cpu.clone(),
            (None, Accel::Kvm, _) => "host".to_string(),
            // 1 GiB pages: OVMF hangs before the kernel without them once its 64-bit
            // aperture (X-PciMmio64Mb) reaches 1 TiB.
            (None, Accel::Tcg, Arch::X86_64) => "qemu64,+pdpe1gb".to_string(),
            // Boots in a third of the time `max` needs under TCG.
            (None, Accel::Tcg, Arch::Aarch64) => "cortex-a57".to_string(),
            (None, Accel::Tcg, Arch::S390x) => return None,
        };
        Some(match self.phys_bits {
            Some(bits) if self.arch == Arch::X86_64 => format!("{base},phys-bits={bits}"),
            _ => base,
        })
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut words =
            vec![format!("console={}", self.arch.console()), "panic=-1".into(), "loglevel=1".into()];
        words.extend(self.cmdline.iter().cloned());
        // The IO-APIC timer check counts ticks over a 40 ms TSC busy-wait; under TCG on a
        // loaded host the vCPU misses them and the kernel panics at boot ("IO-APIC +
        // timer doesn't work"; seen at load 15-19 on 2 cores). KVM guests skip the check.
        if self.arch == Arch::X86_64 && !words.iter().any(|w| w == "no_timer_check") {
            words.push("no_timer_check".into());
        }
        words.join(" ")
    }

    /// The QEMU arguments (without the binary) for this spec; `firmware_image` is the
    /// `-bios` image of OVMF or aarch64 UEFI ([`GuestAssets::firmware_image`]).
    pub fn qemu_args(
        &self,
        firmware_image: Option<&Path>,
        kernel: &Path,
        initrd: &Path,
        qmp_socket: &Path,
        accel: Accel,
    ) -> Result<Vec<String>> {
        if !self.firmware.supports(self.arch) {
            return Err(GuestError::BadSpec(format!(
                "{} cannot boot with firmware {}",
                self.arch,
                self.firmware.name()
            )));
        }
        let mut machine = self.machine_type().to_string();
        if self.arch == Arch::Aarch64 {
            machine.push_str(",gic-version=3");
        }
        for opt in &self.machine_opts {
            machine.push(',');
            machine.push_str(opt);
        }
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"]);
        push(&["-machine", &machine, "-accel", accel.qemu_name()]);
        if let Some(cpu) = self.cpu_model(accel) {
            push(&["-cpu", &cpu]);
        }
        let memory = match self.memory_hotplug {
            Some((slots, maxmem)) => format!("{},slots={slots},maxmem={maxmem}M", self.memory_mib),
            None => self.memory_mib.to_string(),
        };
        push(&["-m", &memory, "-smp", "1"]);
        match (self.firmware, firmware_image) {
            (Firmware::Ovmf | Firmware::Uefi, Some(image)) => push(&["-bios", &image.display().to_string()]),
            (Firmware::Ovmf | Firmware::Uefi, None) => {
                return Err(GuestError::BadSpec(format!("no image for firmware {}", self.firmware.name())))
            }
            (Firmware::SeaBios | Firmware::None, _) => {}
        }
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", qmp_socket.display())]);
        push(&["-kernel", &kernel.display().to_string(), "-initrd", &initrd.display().to_string()]);
        push(&["-append", &self.kernel_cmdline()]);
        for o in &self.objects {
            push(&["-object", o]);
        }
        for d in &self.devices {
            push(&["-device", d]);
        }
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }
}

/// Everything a guest of one architecture boots with, from one stack: kernel, busybox,
/// the QEMU to run and its firmware images.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    /// Guest kernel.
    pub kernel: GuestKernel,
    /// Statically linked busybox of the guest architecture.
    pub busybox: PathBuf,
    /// How to start QEMU.
    pub qemu: Launcher,
    /// The OVMF image (`-bios`, x86_64 UEFI).
    pub ovmf: PathBuf,
    /// The aarch64 UEFI image (`-bios`, edk2's `QEMU_EFI.fd`).
    pub aarch64_uefi: PathBuf,
    /// What the stack runs, for reports.
    pub versions: Versions,
    /// Where the KVM verdict is kept ([`GuestAssets::verdict_store`]).
    pub state_dir: PathBuf,
}

impl GuestAssets {
    /// The stack's QEMU and firmware (provisioned first when missing) with the kernel and
    /// busybox of `arch` from the stack's archive. A failure of the kernel or busybox is
    /// [`GuestError::Assets`], which says what to do.
    pub fn ensure(stack: &Stack, arch: Arch) -> Result<Self> {
        let root = stack.root()?;
        let assets_err = |source: kernels::KernelError| GuestError::Assets {
            stack: stack.name().into(),
            arch,
            hint: asset_hint(stack.name(), arch, &source),
            source: Box::new(source),
        };
        Ok(GuestAssets {
            kernel: stack.kernel(arch).map_err(assets_err)?,
            busybox: stack.busybox(arch).map_err(assets_err)?,
            qemu: root.launcher.clone(),
            ovmf: root.file(stacks::OVMF_FD),
            aarch64_uefi: root.file(stacks::AARCH64_UEFI_FD),
            versions: root.versions(),
            state_dir: stack.dir(),
        })
    }

    /// Where the KVM verdict for this QEMU and guest kernel is kept.
    pub fn verdict_store(&self) -> VerdictStore<'_> {
        VerdictStore::new(&self.state_dir, &self.versions.qemu, &self.kernel.release)
    }

    /// The `-bios` image `firmware` boots from, if it takes one.
    pub fn firmware_image(&self, firmware: Firmware) -> Option<&Path> {
        match firmware {
            Firmware::Ovmf => Some(&self.ovmf),
            Firmware::Uefi => Some(&self.aarch64_uefi),
            Firmware::SeaBios | Firmware::None => None,
        }
    }
}

/// What to do when the kernel or busybox of `arch` cannot be provisioned.
pub fn asset_hint(stack: &str, arch: Arch, error: &kernels::KernelError) -> String {
    let not_found = matches!(error, kernels::KernelError::Deb(e) if e.is_not_found());
    if not_found {
        format!(
            "Debian's archive has no such file for {arch} at the moment (a new version may still be building or \
             syncing to the mirror), so {arch} guests cannot run on stack `{stack}` now; the other architectures are \
             not affected. Try again later with `cargo xtask provision --stack {stack} --update`, or run the {arch} \
             scenarios on another stack (`--stack NAME`)."
        )
    } else {
        format!(
            "{arch} guests cannot run on stack `{stack}` until this is fixed; the other architectures are not \
             affected. Check that deb.debian.org is reachable and run `cargo xtask provision --stack {stack} \
             --update`."
        )
    }
}

/// The state shared with the console reader thread.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<GuestState>,
    changed: Condvar,
    stderr: Mutex<String>,
    /// QEMU's stderr reached its end (all of it is in `stderr`).
    stderr_closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, GuestState> {
        // A reader thread that panicked leaves a usable state behind; keep going.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stderr_tail(&self) -> String {
        let text = self.stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::command::tail(&text, 12)
    }
}

/// Longest console line kept whole; longer runs without a line end are cut.
const MAX_LINE: usize = 1 << 20;

/// Keep at most this much of QEMU's stderr.
const STDERR_KEEP: usize = 64 << 10;

/// A running guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Guest {
    name: String,
    arch: Arch,
    firmware: Firmware,
    accel: Accel,
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    shared: Arc<Shared>,
    qmp_socket: PathBuf,
    started: Instant,
    args: Vec<String>,
    next_command: AtomicU64,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Boots `spec`: resolves the accelerator (probing KVM once when asked to), starts
    /// QEMU and waits for READY within `spec.boot_timeout`, printing progress.
    pub fn boot(spec: &GuestSpec, assets: &GuestAssets) -> Result<Guest> {
        let accel = accel::resolve(spec.accel, spec.arch, &assets.verdict_store(), || probe_kvm(assets));
        let guest = Guest::start(spec, assets, accel)?;
        if spec.progress {
            eprintln!(
                "[{}] booting {} ({}, {})",
                spec.name,
                spec.arch,
                accel.qemu_name(),
                spec.firmware.name()
            );
        }
        let deadline = guest.started + spec.boot_timeout;
        loop {
            let slice = (Instant::now() + Duration::from_secs(10)).min(deadline);
            match guest.wait_for("READY", slice, |s| s.ready.is_some()) {
                Ok(state) => {
                    if spec.progress {
                        let uptime = state.ready.as_ref().map_or(0.0, |r| r.uptime);
                        let took = guest.boot_time().unwrap_or_default();
                        eprintln!(
                            "[{}] ready after {:.1} s (guest uptime {uptime:.2} s)",
                            spec.name,
                            took.as_secs_f64()
                        );
                    }
                    return Ok(guest);
                }
                Err(GuestError::Timeout { guest: name, what, diagnostics, .. }) => {
                    if Instant::now() >= deadline {
                        return Err(GuestError::Timeout {
                            guest: name,
                            what,
                            waited: guest.started.elapsed(),
                            diagnostics,
                        });
                    }
                    if spec.progress {
                        eprintln!(
                            "[{}] still booting ({:.0} s)",
                            spec.name,
                            guest.started.elapsed().as_secs_f64()
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts QEMU for `spec` with the given accelerator and returns at once.
    pub fn start(spec: &GuestSpec, assets: &GuestAssets, accel: Accel) -> Result<Guest> {
        let dir = tempfile::Builder::new().prefix("xtask-guest-").tempdir()?;
        let initrd = dir.path().join("initramfs.cpio");
        std::fs::write(&initrd, initramfs::build(&assets.kernel, &assets.busybox, &spec.initramfs)?)?;
        let qmp_socket = dir.path().join("qmp.sock");
        let args = spec.qemu_args(
            assets.firmware_image(spec.firmware),
            &assets.kernel.image,
            &initrd,
            &qmp_socket,
            accel,
        )?;
        let program = spec.arch.qemu_binary();
        let mut child = assets
            .qemu
            .qemu(spec.arch)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| GuestError::Spawn { program: program.to_string(), source })?;
        let started = Instant::now();
        let shared = Arc::new(Shared::default());
        if let Some(out) = child.stdout.take() {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || read_console(out, &shared));
        }
        if let Some(err) = child.stderr.take() {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || read_stderr(err, &shared));
        }
        let stdin = child.stdin.take();
        Ok(Guest {
            name: spec.name.clone(),
            arch: spec.arch,
            firmware: spec.firmware,
            accel,
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            shared,
            qmp_socket,
            started,
            args,
            next_command: AtomicU64::new(1),
            _dir: dir,
        })
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The firmware it booted through.
    pub fn firmware(&self) -> Firmware {
        self.firmware
    }

    /// The accelerator it runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU command line, for reports.
    pub fn command_line(&self) -> String {
        format!("{} {}", self.arch.qemu_binary(), self.args.join(" "))
    }

    /// The QMP socket (`server=on,wait=off`). QEMU serves one client at a time: a second
    /// connection gets its greeting only after the first one closes.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// A new QMP session with this guest's QEMU (`qmp-hotplug`'s client). Connecting
    /// (retried while QEMU has not made the socket yet) and the greeting may each take what
    /// is left until `deadline`; commands then carry their own deadlines.
    pub fn qmp(&self, deadline: Instant) -> Result<QmpClient> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut options = ClientOptions::default();
        options.connect_timeout = left;
        options.handshake_timeout = left;
        Ok(QmpClient::connect_unix(&self.qmp_socket, options)?)
    }

    /// Time from starting QEMU to READY, once the guest is ready.
    pub fn boot_time(&self) -> Option<Duration> {
        self.shared.lock().ready.as_ref().map(|r| r.at.saturating_duration_since(self.started))
    }

    /// A copy of everything reported so far.
    pub fn state(&self) -> GuestState {
        self.shared.lock().clone()
    }

    /// Waits until `done` holds for the guest state and returns a copy of that state.
    /// Fails when `deadline` passes or QEMU exits first; `what` names the condition in
    /// the error.
    pub fn wait_for(
        &self,
        what: &str,
        deadline: Instant,
        mut done: impl FnMut(&GuestState) -> bool,
    ) -> Result<GuestState> {
        self.wait_map(what, deadline, |s| done(s).then(|| s.clone()))
    }

    /// Like [`Guest::wait_for`], returning what `check` extracts once it returns `Some`.
    pub fn wait_map<T>(
        &self,
        what: &str,
        deadline: Instant,
        mut check: impl FnMut(&GuestState) -> Option<T>,
    ) -> Result<T> {
        let begun = Instant::now();
        let mut state = self.shared.lock();
        loop {
            if let Some(found) = check(&state) {
                return Ok(found);
            }
            if state.exited.is_some() {
                drop(state);
                return Err(self.exited_error(what));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let diagnostics = self.diagnostics(&state);
                return Err(GuestError::Timeout {
                    guest: self.name.clone(),
                    what: what.to_string(),
                    waited: begun.elapsed(),
                    diagnostics,
                });
            }
            state = self.shared.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn diagnostics(&self, state: &GuestState) -> String {
        let mut lines = Vec::new();
        if let Some(p) = &state.panic {
            lines.push(format!("guest panic: {p}"));
        }
        for e in state.errors.iter().rev().take(5).rev() {
            lines.push(format!("guest error: {e}"));
        }
        let console: Vec<&String> = state.console_tail.iter().rev().take(10).collect();
        for l in console.into_iter().rev() {
            lines.push(format!("console: {l}"));
        }
        for l in self.shared.stderr_tail().lines() {
            lines.push(format!("qemu: {l}"));
        }
        lines.join("\n")
    }

    fn exited_error(&self, what: &str) -> GuestError {
        // The console closes just before the process is reaped, and the stderr reader may
        // not have read QEMU's last words yet (it says why it exited): give both a moment.
        let mut status = None;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if status.is_none() {
                let mut child = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                status = child.try_wait().ok().flatten().map(|s| s.to_string());
            }
            if status.is_some() && self.shared.stderr_closed.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = status.unwrap_or_else(|| "exited".to_string());
        let state = self.shared.lock().clone();
        GuestError::Exited {
            guest: self.name.clone(),
            what: what.to_string(),
            status,
            diagnostics: self.diagnostics(&state),
        }
    }

    /// Runs a shell command in the guest (as root, via the reporter) and returns its
    /// output once it exits. The command must be one printable line.
    pub fn exec(&self, command: &str, deadline: Instant) -> Result<CommandOutput> {
        if command.len() >= 3000 || command.chars().any(|c| c.is_control()) || command.trim().is_empty() {
            return Err(GuestError::BadCommand(command.to_string()));
        }
        let id = self.next_command.fetch_add(1, Ordering::Relaxed);
        {
            let mut stdin = self.stdin.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let pipe =
                stdin.as_mut().ok_or_else(|| GuestError::BadCommand("console input is closed".into()))?;
            pipe.write_all(format!("{id} {command}\n").as_bytes())?;
            pipe.flush()?;
        }
        self.wait_map(&format!("guest command `{command}`"), deadline, |s| {
            s.commands.get(&id).filter(|c| c.status.is_some()).cloned()
        })
    }

    /// Kills QEMU now (also done on drop).
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Boots a lean guest of `assets`' architecture under KVM and waits for READY within
/// [`accel::PROBE_TIMEOUT`]: the probe behind [`accel::kvm_verdict`].
fn probe_kvm(assets: &GuestAssets) -> ProbeOutcome {
    let mut spec = GuestSpec::new(assets.kernel.arch);
    spec.name = "kvm-probe".into();
    spec.accel = AccelChoice::Kvm;
    spec.boot_timeout = accel::PROBE_TIMEOUT;
    spec.progress = false;
    let ready = Guest::start(&spec, assets, Accel::Kvm).and_then(|g| {
        g.wait_for("READY under KVM", Instant::now() + accel::PROBE_TIMEOUT, |s| s.ready.is_some())?;
        Ok(g.boot_time())
    });
    match ready {
        Ok(took) => ProbeOutcome::Ready(took.unwrap_or_default()),
        Err(GuestError::Timeout { .. }) => ProbeOutcome::TimedOut,
        Err(e) => ProbeOutcome::Failed(e.to_string()),
    }
}

fn read_console(mut out: impl Read, shared: &Shared) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match out.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let now = Instant::now();
        let mut state = shared.lock();
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            state.feed_line(text.trim_end_matches(['\n', '\r']), now);
        }
        if pending.len() > MAX_LINE {
            // Output without line ends (a crashed guest writing garbage): keep memory bounded.
            let line: Vec<u8> = std::mem::take(&mut pending);
            state.feed_line(&String::from_utf8_lossy(&line), now);
        }
        drop(state);
        shared.changed.notify_all();
    }
    let mut state = shared.lock();
    if !pending.is_empty() {
        state.feed_line(&String::from_utf8_lossy(&pending), Instant::now());
    }
    state.exited = Some("console closed".into());
    drop(state);
    shared.changed.notify_all();
}

fn read_stderr(mut err: impl Read, shared: &Shared) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = err.read(&mut chunk) {
        if n == 0 {
            break;
        }
        let mut text = shared.stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        text.push_str(&String::from_utf8_lossy(chunk.get(..n).unwrap_or_default()));
        if text.len() > STDERR_KEEP {
            let cut = text.len() - STDERR_KEEP / 2;
            let cut = (cut..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
            text.drain(..cut);
        }
    }
    shared.stderr_closed.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(spec: &GuestSpec, accel: Accel) -> String {
        let fw = match spec.firmware {
            Firmware::Ovmf => Some(Path::new("/fw/OVMF.fd")),
            Firmware::Uefi => Some(Path::new("/fw/QEMU_EFI.fd")),
            _ => None,
        };
        spec.qemu_args(fw, Path::new("/k"), Path::new("/i"), Path::new("/s"), accel).unwrap().join(" ")
    }

    #[test]
    fn x86_args() {
        let mut spec =
            GuestSpec::new(Arch::X86_64).device("pcie-root-port,id=rp1,chassis=1").firmware(Firmware::Ovmf);
        spec.phys_bits = Some(46);
        spec.machine_opts.push("kernel-irqchip=split".into());
        spec.cmdline.push("pci=realloc".into());
        let a = args(&spec, Accel::Tcg);
        assert!(
            a.contains("-machine q35,kernel-irqchip=split -accel tcg -cpu qemu64,+pdpe1gb,phys-bits=46"),
            "{a}"
        );
        assert!(a.contains("-bios /fw/OVMF.fd"), "{a}");
        assert!(a.contains("-append console=ttyS0 panic=-1 loglevel=1 pci=realloc"), "{a}");
        assert!(a.ends_with("-device pcie-root-port,id=rp1,chassis=1"), "{a}");
        assert!(args(&GuestSpec::new(Arch::X86_64), Accel::Kvm).contains("-accel kvm -cpu host"));
    }

    #[test]
    fn other_arch_args() {
        let a = args(&GuestSpec::new(Arch::Aarch64).firmware(Firmware::Uefi), Accel::Tcg);
        assert!(a.contains("-m 512 "), "{a}");
        assert!(a.contains("-machine virt,gic-version=3 -accel tcg -cpu cortex-a57"), "{a}");
        assert!(a.contains("-bios /fw/QEMU_EFI.fd"), "{a}");
        let a = args(&GuestSpec::new(Arch::S390x), Accel::Tcg);
        assert!(a.contains("-machine s390-ccw-virtio -accel tcg -m 256"), "{a}");
        assert!(a.contains("console=ttysclp0"), "{a}");
    }

    #[test]
    fn firmware_must_fit_the_arch() {
        let spec = GuestSpec::new(Arch::Aarch64).firmware(Firmware::Ovmf);
        assert!(matches!(
            spec.qemu_args(
                Some(Path::new("/fw")),
                Path::new("/k"),
                Path::new("/i"),
                Path::new("/s"),
                Accel::Tcg
            ),
            Err(GuestError::BadSpec(_))
        ));
        // UEFI without an image is refused, not started without firmware.
        let spec = GuestSpec::new(Arch::X86_64).firmware(Firmware::Ovmf);
        assert!(matches!(
            spec.qemu_args(None, Path::new("/k"), Path::new("/i"), Path::new("/s"), Accel::Tcg),
            Err(GuestError::BadSpec(_))
        ));
    }
}

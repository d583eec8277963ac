//! Project automation. `cargo xtask test` runs the whole test suite; `cargo xtask e2e`
//! boots real guests; `cargo xtask fixtures` regenerates the QEMU device fixtures.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use guest_harness::arch::Arch;
use guest_harness::firmware::Firmware;
use guest_harness::guest::{Guest, GuestAssets, GuestSpec};
use guest_harness::stacks::{Stack, STACKS};
use xtask::{bootcheck, experiments, fixtures, tasks};

#[derive(Parser)]
#[command(about = "pcie-hotplug project automation")]
struct Cli {
    /// The software stack (QEMU, firmware, guest kernels) to run on: bookworm, trixie or
    /// current (default: $XTASK_STACK, else bookworm).
    #[arg(long, global = true)]
    stack: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Provisioning, format check, clippy (warnings denied), all tests and doc tests with
    /// the stack's QEMU and firmware, then the default end-to-end set.
    Test {
        /// Also run the default end-to-end set on this stack (repeatable).
        #[arg(long = "also-stack")]
        also: Vec<String>,
    },
    /// Run end-to-end scenarios in real guests (default: every xtask/scenarios/*.toml).
    E2e(E2eArgs),
    /// Boot one small guest per architecture and plug one device with plain QMP
    /// `device_add` / `device_del` (a quick check of provisioning, reporter and QMP).
    BootCheck {
        /// Only this architecture (repeatable).
        #[arg(long)]
        arch: Vec<Arch>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run the criterion benchmarks of every crate.
    Bench {
        /// Arguments for the benchmark binaries (e.g. a filter).
        args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ for a bounded time each (cargo-fuzz is installed into
    /// target/fuzz/tools when missing); fails on any crash, timeout or out-of-memory input.
    Fuzz(FuzzArgs),
    /// Provision the stack into the cache: QEMU, firmware, busybox, pciutils and every
    /// architecture's guest kernel (only what is missing; nothing is installed on the host).
    Provision {
        /// Fetch the stack's package lists again first (newer versions, moved files).
        #[arg(long)]
        update: bool,
        /// Every stack, not only the one named.
        #[arg(long)]
        all: bool,
    },
    /// Regenerate pcilibs' QEMU device fixtures (pcilibs/tests/fixtures/qemu-x86_64).
    Fixtures,
    /// Boot one guest, print what it reports, optionally run commands in it.
    Boot(BootArgs),
    /// Run one of the field experiments (see xtask/README.md, "Field notes").
    Experiment {
        /// Experiment name.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(experiments::NAMES))]
        name: String,
        /// Firmware, where the experiment takes one.
        #[arg(long)]
        firmware: Option<Firmware>,
        /// x86_64: native PCIe hotplug instead of QEMU's default ACPI hotplug.
        #[arg(long)]
        native_hotplug: bool,
        /// Size of the large BAR in GiB.
        #[arg(long)]
        bar_gib: Option<u64>,
        /// Root port `pref64-reserve` in GiB (root-port-128g; default twice the BAR).
        #[arg(long)]
        reserve_gib: Option<u64>,
        /// Guest RAM in MiB (reservation-mixes; above 4 GiB SeaBIOS pads hotplug windows).
        #[arg(long)]
        ram_mib: Option<u32>,
        /// Only the mixes whose name contains this (reservation-mixes).
        #[arg(long)]
        mix: Option<String>,
    },
}

#[derive(clap::Args)]
struct E2eArgs {
    /// Scenario files to run (as given, or relative to xtask/ or xtask/scenarios/);
    /// none: the default set.
    #[arg(long = "scenario", num_args = 1..)]
    scenarios: Vec<PathBuf>,
    /// Only scenarios of this architecture (repeatable).
    #[arg(long)]
    arch: Vec<Arch>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Guests running at the same time.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Instead of scenario files, N random scenarios (seeds S, S+1, …): each must be
    /// refused by the planner before boot or pass in its guest; a failure is shrunk and
    /// written to xtask/scenarios/regressions/.
    #[arg(long, value_name = "N", conflicts_with = "scenarios")]
    random: Option<u32>,
    /// First seed of --random (default: from the clock, printed).
    #[arg(long, value_name = "S", requires = "random")]
    seed: Option<u64>,
    /// Guest runs at most per failure to shrink it (0: no shrinking, no file).
    #[arg(long, default_value_t = 16, requires = "random")]
    shrink_runs: usize,
    /// Stop starting random scenarios after this many seconds.
    #[arg(long, value_name = "SECONDS", requires = "random")]
    budget_s: Option<u64>,
}

#[derive(clap::Args)]
struct FuzzArgs {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = xtask::fuzz::DEFAULT_SECONDS, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Only this target (repeatable): config_space, sysfs_tree, lspci_dump, plan_file,
    /// plan_request, journal_file, qmp_input.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Afterwards add the run's inputs (up to 4 KiB) that reach code edges fuzz/corpus does
    /// not to fuzz/corpus.
    #[arg(long)]
    merge: bool,
    /// Instead of fuzzing, write fuzz/corpus anew from the project's fixtures, the planner
    /// and the stack's QEMU (provisioned by `cargo xtask provision`).
    #[arg(long)]
    make_seeds: bool,
    /// Also write the reports as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BootArgs {
    /// Guest architecture.
    #[arg(long, default_value = "x86_64")]
    arch: Arch,
    /// Firmware (seabios, ovmf, none, uefi).
    #[arg(long)]
    firmware: Option<Firmware>,
    /// Extra `-device` arguments.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Extra `-object` arguments.
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Extra kernel command-line words.
    #[arg(long = "cmdline")]
    cmdline: Vec<String>,
    /// Kernel modules to load at boot.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Commands to run in the guest after boot.
    #[arg(long = "exec")]
    exec: Vec<String>,
    /// Guest physical address bits (x86_64).
    #[arg(long)]
    phys_bits: Option<u8>,
    /// Any other QEMU arguments, after `--`.
    #[arg(last = true)]
    qemu_args: Vec<String>,
}

fn print_state(state: &guest_harness::reporter::GuestState) {
    for dev in state.pci.values() {
        let driver = dev.driver.as_deref().unwrap_or("-");
        println!("{} {:04x}:{:04x} class {:06x} driver {driver}", dev.bdf, dev.vendor, dev.device, dev.class);
        for r in &dev.resources {
            println!("    res {:2} {r}", r.index);
        }
    }
    for dev in state.ccw.values() {
        println!("ccw {} {} {} online={}", dev.busid, dev.cutype, dev.devtype, dev.online);
    }
    for m in &state.kmsg {
        println!("kmsg: {}", m.text);
    }
}

fn boot(stack: &Stack, args: BootArgs) -> Result<(), String> {
    let assets = GuestAssets::ensure(stack, args.arch).map_err(|e| e.to_string())?;
    let mut spec = GuestSpec::new(args.arch);
    if let Some(fw) = args.firmware {
        spec.firmware = fw;
    }
    spec.devices = args.devices;
    spec.objects = args.objects;
    spec.cmdline = args.cmdline;
    spec.phys_bits = args.phys_bits;
    spec.extra_args = args.qemu_args;
    spec.initramfs.modules = args.modules;
    let guest = Guest::boot(&spec, &assets).map_err(|e| e.to_string())?;
    println!(
        "stack {}: QEMU {}, {}, kernel {} ({} {})",
        assets.versions.stack,
        assets.versions.qemu,
        assets.versions.firmware(spec.firmware, spec.arch),
        assets.kernel.release,
        assets.kernel.package,
        assets.kernel.version
    );
    println!("{}", guest.command_line());
    print_state(&guest.state());
    for cmd in args.exec {
        let out = guest.exec(&cmd, Instant::now() + Duration::from_secs(60)).map_err(|e| e.to_string())?;
        println!("$ {cmd}  (exit {})", out.status.unwrap_or(-1));
        for l in out.lines {
            println!("{l}");
        }
    }
    Ok(())
}

fn boot_check(stack: &Stack, arches: Vec<Arch>, json: Option<PathBuf>) -> Result<(), String> {
    let arches = if arches.is_empty() { Arch::ALL.to_vec() } else { arches };
    tasks::provision_stack(stack, &arches, false)?;
    let rows = bootcheck::run(&arches, stack);
    println!("{}", bootcheck::render(&rows));
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let failed: Vec<String> =
        rows.iter().filter(|r| !r.ok()).map(|r| format!("{}: {}", r.arch, r.result)).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("boot check failed:\n{}", failed.join("\n")))
    }
}

fn provision(stack: &Stack, update: bool, all: bool) -> Result<(), String> {
    if !all {
        return tasks::provision_all(stack, update);
    }
    let mut failed = Vec::new();
    for def in STACKS {
        let s = guest_harness::stack(def.name).map_err(|e| e.to_string())?;
        if let Err(e) = tasks::provision_all(&s, update) {
            failed.push(e);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

fn fuzz(stack: &Stack, args: FuzzArgs) -> Result<(), String> {
    if args.make_seeds {
        return xtask::fuzz::make_seeds(&args.targets, &tasks::stack_env(stack)?);
    }
    let opts = xtask::fuzz::Options {
        seconds: args.seconds,
        targets: args.targets,
        merge: args.merge,
        json: args.json,
    };
    xtask::fuzz::run(&opts)
}

fn run(cli: Cli) -> Result<(), String> {
    let name = cli.stack.unwrap_or_else(Stack::default_name);
    let stack = guest_harness::stack(&name).map_err(|e| e.to_string())?;
    match cli.cmd {
        Cmd::Test { also } => {
            let more = also
                .iter()
                .map(|n| guest_harness::stack(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            tasks::test(&stack, &more)
        }
        Cmd::E2e(args) => match args.random {
            Some(count) => tasks::random(
                &stack,
                &tasks::RandomOptions {
                    count,
                    seed: args.seed.unwrap_or_else(tasks::clock_seed),
                    jobs: args.jobs,
                    shrink_runs: args.shrink_runs,
                    budget: args.budget_s.map(Duration::from_secs),
                    json: args.json,
                },
            ),
            None => tasks::e2e(&stack, &args.scenarios, &args.arch, args.json.as_deref(), args.jobs),
        },
        Cmd::BootCheck { arch, json } => boot_check(&stack, arch, json),
        Cmd::Bench { args } => tasks::bench(&stack, &args),
        Cmd::Fuzz(args) => fuzz(&stack, args),
        Cmd::Provision { update, all } => provision(&stack, update, all),
        Cmd::Fixtures => fixtures::generate(&stack, &guest_harness::workspace_root())
            .map(|dir| println!("fixtures written to {}", dir.display())),
        Cmd::Boot(args) => boot(&stack, args),
        Cmd::Experiment { name, firmware, native_hotplug, bar_gib, reserve_gib, ram_mib, mix } => {
            let opts = experiments::Options { firmware, native_hotplug, bar_gib, reserve_gib, ram_mib, mix };
            match experiments::run(&name, opts, &stack) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("experiment {name}: the guest did not assign every BAR")),
                Err(e) => Err(e),
            }
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Project automation. `cargo xtask test` runs the whole test suite; `cargo xtask e2e`
//! boots real guests; `cargo xtask fixtures` regenerates the QEMU device fixtures.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use xtask::arch::Arch;
use xtask::guest::{Firmware, Guest, GuestAssets, GuestSpec};

#[derive(Parser)]
#[command(about = "pcie-hotplug project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the host packages and download the guest kernels (only what is missing).
    Provision,
    /// Boot one guest, print what it reports, optionally run commands in it.
    Boot {
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
        /// Commands to run in the guest after boot.
        #[arg(long = "exec")]
        exec: Vec<String>,
        /// Guest physical address bits (x86_64).
        #[arg(long)]
        phys_bits: Option<u8>,
        /// Any other QEMU arguments, after `--`.
        #[arg(last = true)]
        qemu_args: Vec<String>,
    },
    /// Regenerate pcilibs' QEMU device fixtures (pcilibs/tests/fixtures/qemu-x86_64).
    Fixtures,
    /// Run one of the field experiments (see xtask/README.md, "Field notes").
    Experiment {
        /// Experiment name.
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
    },
}

fn print_state(state: &xtask::reporter::GuestState) {
    for dev in state.pci.values() {
        println!(
            "{} {:04x}:{:04x} class {:06x} driver {}",
            dev.bdf,
            dev.vendor,
            dev.device,
            dev.class,
            dev.driver.as_deref().unwrap_or("-")
        );
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

#[allow(clippy::too_many_arguments)]
fn boot(
    arch: Arch,
    firmware: Option<Firmware>,
    devices: Vec<String>,
    objects: Vec<String>,
    cmdline: Vec<String>,
    exec: Vec<String>,
    phys_bits: Option<u8>,
    qemu_args: Vec<String>,
) -> Result<(), String> {
    let cache = xtask::cache();
    let assets = GuestAssets::ensure(&cache, arch).map_err(|e| e.to_string())?;
    let mut spec = GuestSpec::new(arch);
    if let Some(fw) = firmware {
        spec.firmware = fw;
    }
    spec.devices = devices;
    spec.objects = objects;
    spec.cmdline = cmdline;
    spec.phys_bits = phys_bits;
    spec.extra_args = qemu_args;
    let guest = Guest::boot(&spec, &assets, &cache).map_err(|e| e.to_string())?;
    println!("{}", guest.command_line());
    print_state(&guest.state());
    for cmd in exec {
        let out = guest.exec(&cmd, Instant::now() + Duration::from_secs(60)).map_err(|e| e.to_string())?;
        println!("$ {cmd}  (exit {})", out.status.unwrap_or(-1));
        for l in out.lines {
            println!("{l}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Provision => Err("todo".to_string()),
        Cmd::Fixtures => xtask::fixtures::generate(&xtask::cache(), &xtask::workspace_root())
            .map(|dir| println!("fixtures written to {}", dir.display())),
        Cmd::Experiment { name, firmware, native_hotplug, bar_gib } => {
            let opts = xtask::experiments::Options { firmware, native_hotplug, bar_gib };
            match xtask::experiments::run(&name, opts, &xtask::cache()) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("experiment {name}: the guest did not assign every BAR")),
                Err(e) => Err(e),
            }
        }
        Cmd::Boot { arch, firmware, devices, objects, cmdline, exec, phys_bits, qemu_args } => {
            boot(arch, firmware, devices, objects, cmdline, exec, phys_bits, qemu_args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `pcie-plan`: plans a QEMU guest's PCIe topology for host devices, GPU stand-ins and
//! hotplug profiles, and says why each reservation has its size.
//!
//! ```text
//! pcie-plan --platform q35-ovmf --mode switch-port \
//!     --ivshmem gpu0:128G@g0 --ivshmem gpu1:128G@g0 --spare h100:1@g0 --spare a100:2
//! pcie-plan --host 0000:01:00.0+0000:01:00.1 --spare h100 --json > plan.json
//! ```
//!
//! Devices come from host functions read through `pcilibs` (from sysfs, or from an
//! `lspci -xxx` dump with the BAR sizes given on the command line), from GPU stand-ins
//! (`ivshmem-plain`) and, on s390x, channel devices. The plan goes through
//! `pcie_topology::plan` for the chosen platform; the output is the plan's explanation,
//! the QEMU arguments and each hotplug's `device_add` arguments, or the plan file itself
//! with `--json`.

#![forbid(unsafe_code)]

mod args;
mod input;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    match output::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcie-plan: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Planning what the command line asks and printing it: the explanation, QEMU arguments
//! and hotplug actions for people, or the plan file.

use std::fmt::Write as _;

use pcie_topology::physbits::host_phys_bits;
use pcie_topology::plan::GuestLocation;
use pcie_topology::{plan, Plan, PlanRequest};

use crate::args::Args;
use crate::input::devices;

/// Plans and prints; the error says what went wrong and what to change.
pub(crate) fn run(args: &Args) -> Result<(), String> {
    let platform = args.platform.platform(args.firmware.as_deref())?;
    let mut request = PlanRequest::default()
        .with_mode(args.mode.into())
        .with_devices(devices(args)?)
        .with_spares(args.spare.clone());
    let o = &mut request.options;
    o.guest_ram = args.ram;
    o.guest_phys_bits = args.phys_bits;
    o.pack_root_ports = args.pack;
    o.size_reservations = !args.no_reservations;
    if args.check_host {
        let h = host_phys_bits().map_err(|e| format!("{e} (drop --check-host, or give --phys-bits)"))?;
        eprintln!("pcie-plan: host physical address width {} bits (from {:?})", h.bits, h.source);
        o.host_phys_bits = Some(h.bits);
    }
    let plan = plan(platform.as_ref(), &request).map_err(|e| format!("no plan: {e}"))?;
    let json = plan.to_json().map_err(|e| e.to_string())?;
    if let Some(path) = &args.out {
        std::fs::write(path, &json).map_err(|e| format!("--out {}: {e}", path.display()))?;
    }
    if args.json {
        print!("{json}");
    } else {
        print!("{}", human(&plan)?);
    }
    Ok(())
}

/// The explanation of every reservation, the QEMU arguments and each hotplug's
/// `device_add` arguments with where the guest will show the function.
fn human(plan: &Plan) -> Result<String, String> {
    let mut out = plan.explain();
    out.push_str("QEMU arguments:\n");
    let mut qemu = plan.qemu_args();
    if let Some(bits) = plan.cpu_phys_bits() {
        qemu.extend(["-cpu".to_string(), format!("max,phys-bits={bits}")]);
    }
    for pair in qemu.chunks(2) {
        let _ = writeln!(out, "  {}", pair.join(" "));
    }
    for a in plan.hotplug_actions().map_err(|e| e.to_string())? {
        let _ = writeln!(
            out,
            "hotplug {} onto {}:",
            a.device,
            a.port.as_ref().map_or("(machine bus)", |p| p.as_str())
        );
        for f in &a.functions {
            let guest = match (&f.guest, f.guest.bdf(), f.guest.path()) {
                (_, Some(bdf), Some(path)) => format!("guest {bdf}, path {path}"),
                (_, Some(bdf), None) => format!("guest {bdf}"),
                (GuestLocation::Ccw { busid }, ..) => format!("guest ccw {busid}"),
                (GuestLocation::Ap, ..) => "no guest address (vfio-ap)".to_string(),
                (other, ..) => format!("guest {other:?}"),
            };
            for c in &f.companions {
                let _ = writeln!(out, "  device_add {}", serde_json::Value::Object(c.to_qmp()));
            }
            let _ = writeln!(
                out,
                "  device_add {}  -> {guest}",
                serde_json::Value::Object(f.device_add.to_qmp())
            );
        }
    }
    Ok(out)
}

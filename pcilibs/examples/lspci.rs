//! `lspci`-like listing of PCI functions with pcilibs.
//!
//! ```text
//! cargo run -p pcilibs --example lspci -- [--json] [PATH…]
//! ```
//!
//! PATH is a sysfs-like function directory (`config`, optional `resource`, …), a directory
//! of such directories (`/sys/bus/pci/devices`), or a text file of `lspci -x`/`-xxx`/
//! `-xxxx` dumps. Without PATH every function of this host is listed. Problems are reported
//! per function; the other functions still print. The exit status is 1 when a PATH could
//! not be read at all or no function was found.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::caps;
use pcilibs::config::AddressRange;
use pcilibs::decode::Function;
use pcilibs::dump;
use pcilibs::ecaps;
use pcilibs::facts::FunctionFacts;
use pcilibs::sysfs::{Sysfs, SysfsDevice};
use serde_json::{json, Value};

/// One listed function, or why it could not be listed.
struct Entry {
    bdf: Bdf,
    description: Option<String>,
    from_dump: bool,
    config: Vec<u8>,
    /// Host relations (sysfs only): upstream bridges, IOMMU group members, SR-IOV links.
    host: Option<Value>,
    result: Result<(Function, FunctionFacts), String>,
}

fn main() -> ExitCode {
    let mut json_out = false;
    let mut paths = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--json" => json_out = true,
            "-h" | "--help" => {
                println!("usage: lspci [--json] [PATH…]");
                return ExitCode::SUCCESS;
            }
            _ => paths.push(a),
        }
    }
    let mut entries = Vec::new();
    let mut failed = false;
    if paths.is_empty() {
        let sys = Sysfs::default();
        match sys.functions() {
            Ok(list) => entries.extend(list.into_iter().map(|b| from_sysfs(&sys.device(b)))),
            Err(e) => {
                eprintln!("lspci: {e}");
                failed = true;
            }
        }
    }
    for p in &paths {
        if let Err(e) = collect(Path::new(p), &mut entries) {
            eprintln!("lspci: {p}: {e}");
            failed = true;
        }
    }
    let mut out = String::new();
    if json_out {
        let list: Vec<Value> = entries.iter().map(to_json).collect();
        out = serde_json::to_string_pretty(&list).unwrap_or_else(|e| format!("\"{e}\""));
        out.push('\n');
    } else {
        for e in &entries {
            print_human(&mut out, e);
        }
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    for e in &entries {
        if let Err(msg) = &e.result {
            eprintln!("lspci: {}: {msg}", e.bdf);
        }
    }
    if failed || entries.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn collect(path: &Path, out: &mut Vec<Entry>) -> Result<(), String> {
    if path.is_dir() {
        if path.join("config").exists() {
            let dev = SysfsDevice::open_dir(path).map_err(|e| e.to_string())?;
            out.push(from_sysfs(&dev));
            return Ok(());
        }
        let mut found = false;
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| Bdf::parse(n).ok()))
            .collect();
        names.sort();
        for bdf in names {
            let dev = SysfsDevice::open_dir(path.join(bdf.to_string())).map_err(|e| e.to_string())?;
            out.push(from_sysfs(&dev));
            found = true;
        }
        return if found { Ok(()) } else { Err("no PCI function directories here".into()) };
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let d = dump::parse(&text);
    for p in &d.problems {
        eprintln!("lspci: {}: {p}", path.display());
    }
    if d.devices.is_empty() {
        return Err("no device found in the dump".into());
    }
    for dev in d.devices {
        let result = Function::decode(&dev.config)
            .map(|f| {
                let mut facts = FunctionFacts::from_function(dev.bdf, &f, None);
                facts.problems.extend(dev.problems.iter().map(|p| p.to_string()));
                (f, facts)
            })
            .map_err(|e| e.to_string());
        out.push(Entry {
            bdf: dev.bdf,
            description: Some(dev.description),
            from_dump: true,
            config: dev.config,
            host: None,
            result,
        });
    }
    Ok(())
}

fn from_sysfs(dev: &SysfsDevice) -> Entry {
    let config = dev.config().unwrap_or_default();
    let result = Function::decode(&config).map_err(|e| e.to_string()).and_then(|f| {
        let facts = dev.facts().map_err(|e| e.to_string())?;
        Ok((f, facts))
    });
    let host = match (
        dev.upstream_bridges(),
        dev.iommu_group_members(),
        dev.virtual_functions(),
        dev.physical_function(),
    ) {
        (Ok(up), Ok(group), Ok(vfs), Ok(pf)) => json!({
            "upstream_bridges": up,
            "iommu_group_members": group,
            "virtual_functions": vfs,
            "physical_function": pf,
        }),
        (a, b, c, d) => {
            let errs: Vec<String> =
                [a.err(), b.err(), c.err(), d.err()].into_iter().flatten().map(|e| e.to_string()).collect();
            json!({ "host_error": errs.join("; ") })
        }
    };
    Entry { bdf: dev.bdf(), description: None, from_dump: false, config, host: Some(host), result }
}

fn to_json(e: &Entry) -> Value {
    let (f, facts) = match &e.result {
        Ok(v) => v,
        Err(msg) => return json!({ "bdf": e.bdf, "error": msg }),
    };
    let mut v = serde_json::to_value(facts).unwrap_or_else(|_| json!({ "bdf": e.bdf }));
    let caps: Vec<Value> = f
        .capabilities
        .iter()
        .map(|c| json!({ "id": c.id, "offset": c.offset, "name": caps::name(c.id) }))
        .collect();
    let ecaps: Vec<Value> = f
        .extended_capabilities
        .iter()
        .map(|c| json!({ "id": c.id, "offset": c.offset, "version": c.version, "name": ecaps::name(c.id) }))
        .collect();
    if let Some(obj) = v.as_object_mut() {
        if e.from_dump {
            if let Some(Value::Array(bars)) = obj.get_mut("bars") {
                bars.extend(lspci_upper_halves(f, &e.config));
            }
        }
        if let Some(Value::Object(host)) = &e.host {
            obj.extend(host.clone());
        }
        obj.insert("capabilities".into(), Value::Array(caps));
        obj.insert("extended_capabilities".into(), Value::Array(ecaps));
        obj.insert("config_bytes".into(), json!(f.config_len));
        obj.insert("source".into(), json!(if e.from_dump { "dump" } else { "sysfs" }));
        if let Some(d) = &e.description {
            obj.insert("description".into(), json!(d));
        }
        if let Some(br) = &f.header.bridge {
            obj.insert("bridge".into(), serde_json::to_value(br).unwrap_or(Value::Null));
        }
        if let Some(r) = f.qemu_resource_reserve() {
            obj.insert("qemu_resource_reserve".into(), serde_json::to_value(r).unwrap_or(Value::Null));
        }
        if let Some(p) = f.pcie() {
            obj.insert("pcie".into(), serde_json::to_value(p).unwrap_or(Value::Null));
        }
    }
    v
}

/// `lspci` (3.9) reading a dump shows the upper register of a 64-bit BAR as a region of
/// its own when it is not zero, decoding its bits as if it were a BAR. Those regions are
/// listed too, marked with `lspci_upper_half_of` (the slot of the real BAR), so the output
/// can be compared with `lspci -F`; they are not BARs.
fn lspci_upper_halves(f: &Function, config: &[u8]) -> Vec<Value> {
    let cs = pcilibs::config::ConfigSpace::new(config);
    let mut out = Vec::new();
    for b in f.bars.bars.iter().filter(|b| b.kind == BarKind::Mem64) {
        let upper = b.index + 1;
        let Some(raw) = cs.u32(pcilibs::config::reg::BAR0 + usize::from(upper) * 4) else { continue };
        if raw == 0 || raw == u32::MAX {
            continue;
        }
        let (kind, prefetchable) = if raw & 1 == 1 {
            ("io", false)
        } else {
            (if (raw >> 1) & 3 == 2 { "mem64" } else { "mem32" }, raw & 8 != 0)
        };
        out.push(json!({
            "index": upper,
            "kind": kind,
            "prefetchable": prefetchable,
            "size": null,
            "lspci_upper_half_of": b.index,
        }));
    }
    out
}

fn print_human(out: &mut String, e: &Entry) {
    let (f, facts) = match &e.result {
        Ok(v) => v,
        Err(msg) => {
            let _ = writeln!(out, "{} <error: {msg}>\n", e.bdf);
            return;
        }
    };
    let h = &f.header;
    let class = facts.class();
    let _ = write!(
        out,
        "{} {} [{:04x}]: Device {:04x}:{:04x}",
        facts.bdf,
        class_name(class.base, class.sub),
        class.class_and_sub(),
        h.vendor_id,
        h.device_id
    );
    if h.revision != 0 {
        let _ = write!(out, " (rev {:02x})", h.revision);
    }
    if class.prog_if != 0 {
        let _ = write!(out, " (prog-if {:02x})", class.prog_if);
    }
    out.push('\n');
    if let (Some(v), Some(d)) = (facts.subsystem_vendor_id, facts.subsystem_id) {
        let _ = writeln!(out, "\tSubsystem: Device {v:04x}:{d:04x}");
    }
    if let Some(p) = &facts.port_type {
        let slot = facts_slot(f);
        let _ = writeln!(out, "\tPCI Express: {}{slot}", p.description());
    }
    for b in &facts.bars {
        let addr = f.bars.get(b.index).map_or(0, |r| r.address);
        let _ = match b.kind {
            BarKind::Io => write!(out, "\tI/O ports at {addr:04x}"),
            kind => write!(
                out,
                "\tMemory at {addr:08x} ({}, {}prefetchable)",
                if kind == BarKind::Mem64 { "64-bit" } else { "32-bit" },
                if b.prefetchable { "" } else { "non-" }
            ),
        };
        let _ = writeln!(out, "{}", size_suffix(b.size));
    }
    if let Some(rom) = f.rom.filter(|r| r.raw != 0 || facts.rom_size.is_some()) {
        let _ = writeln!(
            out,
            "\tExpansion ROM at {:08x}{}{}",
            rom.address,
            if rom.enabled { "" } else { " [disabled]" },
            size_suffix(facts.rom_size)
        );
    }
    if let Some(br) = &h.bridge {
        let _ = writeln!(
            out,
            "\tBus: primary={:02x}, secondary={:02x}, subordinate={:02x}",
            br.primary_bus, br.secondary_bus, br.subordinate_bus
        );
        window(out, "I/O behind bridge", br.io_window);
        window(out, "Memory behind bridge", br.memory_window);
        window(out, "Prefetchable memory behind bridge", br.prefetchable_window);
    }
    for c in &f.capabilities {
        let _ = writeln!(out, "\tCapabilities: [{:02x}] {}", c.offset, describe_cap(c));
    }
    for c in &f.extended_capabilities {
        let _ = writeln!(out, "\tCapabilities: [{:03x} v{}] {}", c.offset, c.version, describe_ecap(c));
        if c.id == ecaps::id::SRIOV {
            for b in facts.sriov.iter().flat_map(|s| &s.vf_bars) {
                let _ = writeln!(
                    out,
                    "\t\tVF BAR {}: {}{} per VF",
                    b.index,
                    match b.kind {
                        BarKind::Io => "I/O".to_string(),
                        k => format!(
                            "{}, {}prefetchable",
                            if k == BarKind::Mem64 { "64-bit" } else { "32-bit" },
                            if b.prefetchable { "" } else { "non-" }
                        ),
                    },
                    size_suffix(b.size)
                );
            }
        }
    }
    if let Some(d) = &facts.driver {
        let _ = writeln!(out, "\tKernel driver in use: {d}");
    }
    if let Some(g) = facts.iommu_group {
        let _ = writeln!(out, "\tIOMMU group: {g}");
    }
    if let Some(n) = facts.numa_node {
        let _ = writeln!(out, "\tNUMA node: {n}");
    }
    for p in &facts.problems {
        let _ = writeln!(out, "\tProblem: {p}");
    }
    out.push('\n');
}

fn window(out: &mut String, name: &str, w: Option<AddressRange>) {
    let _ = match w {
        Some(r) => writeln!(out, "\t{name}: {:08x}-{:08x}{}", r.base, r.limit, size_suffix(r.size())),
        None => writeln!(out, "\t{name}: [disabled]"),
    };
}

fn describe_cap(c: &caps::Cap) -> String {
    use caps::Capability as C;
    let text = match &c.decoded {
        Err(e) => return format!("{} <{e}>", caps::name(c.id)),
        Ok(C::PowerManagement(p)) => format!("Power Management version {}", p.version),
        Ok(C::Msi(m)) => format!(
            "MSI: Enable{} Count={}/{} 64bit{}",
            pm(m.enabled),
            m.vectors_enabled,
            m.vectors_capable,
            pm(m.address_64bit)
        ),
        Ok(C::MsiX(m)) => format!(
            "MSI-X: Enable{} Count={} Masked{} Vector table: BAR={} offset={:08x} PBA: BAR={} offset={:08x}",
            pm(m.enabled),
            m.table_size,
            pm(m.function_mask),
            m.table_bar,
            m.table_offset,
            m.pba_bar,
            m.pba_offset
        ),
        Ok(C::PciExpress(p)) => {
            let mut s = format!("Express (v{}) {}{}", p.version, p.port_type.description(), facts_slot_of(p));
            if let Some(l) = &p.link {
                s += &format!(", Link: Speed {} Width x{}", caps::pcie::speed_name(l.max_speed), l.max_width);
            }
            if let Some(sl) = &p.slot {
                s += &format!(", Slot #{} HotPlug{}", sl.physical_slot, pm(sl.hotplug_capable));
            }
            s
        }
        Ok(C::Vendor(caps::vendor::VendorSpecific::QemuResourceReserve(r))) => format!(
            "Vendor Specific: QEMU resource reserve bus={} io={} mem={} pref32={} pref64={}",
            opt(r.bus.map(u64::from)),
            opt(r.io),
            opt(r.mem.map(u64::from)),
            opt(r.pref32.map(u64::from)),
            opt(r.pref64)
        ),
        Ok(C::Vendor(caps::vendor::VendorSpecific::Virtio(v))) => format!(
            "Vendor Specific: virtio type {} BAR={} offset={:08x} size={:08x}",
            v.cfg_type, v.bar, v.offset, v.length
        ),
        Ok(C::Vendor(_)) => "Vendor Specific Information".into(),
        Ok(C::SubsystemId { vendor_id, device_id }) => {
            format!("Subsystem: Device {vendor_id:04x}:{device_id:04x}")
        }
        Ok(_) if caps::name(c.id) == "Unknown" => format!("Capability ID {:#04x}", c.id),
        Ok(_) => caps::name(c.id).into(),
    };
    text
}

fn describe_ecap(c: &ecaps::ExtCap) -> String {
    use ecaps::ExtCapability as E;
    match &c.decoded {
        Err(e) => format!("{} <{e}>", ecaps::name(c.id)),
        Ok(E::Sriov(s)) => format!(
            "Single Root I/O Virtualization (SR-IOV): Initial VFs: {}, Total VFs: {}, Number of VFs: {}, VF offset: {}, stride: {}, Device ID: {:04x}",
            s.initial_vfs, s.total_vfs, s.num_vfs, s.first_vf_offset, s.vf_stride, s.vf_device_id
        ),
        Ok(E::Rebar(r)) | Ok(E::VfRebar(r)) => {
            let bars: Vec<String> = r
                .entries
                .iter()
                .map(|e| format!("BAR {}: current {}, max {}", e.bar, human(e.current_size), human(e.max_size().unwrap_or(0))))
                .collect();
            format!("{}: {}", ecaps::name(c.id), bars.join("; "))
        }
        Ok(E::Dsn(d)) => {
            let b = d.serial.to_be_bytes();
            let parts: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("Device Serial Number {}", parts.join("-"))
        }
        Ok(E::Acs(a)) => format!("Access Control Services: capabilities {:#06x}, control {:#06x}", a.capabilities, a.control),
        Ok(E::Ari(a)) => format!("Alternative Routing-ID Interpretation (ARI): next function {}", a.next_function),
        Ok(E::Ats(a)) => format!("Address Translation Service (ATS): queue depth {}, enabled{}", a.invalidate_queue_depth, pm(a.enabled)),
        Ok(E::Pasid(p)) => format!("Process Address Space ID (PASID): width {}, enabled{}", p.max_width, pm(p.enabled)),
        Ok(_) if ecaps::name(c.id) == "Unknown" => format!("Extended Capability ID {:#x}", c.id),
        Ok(_) => ecaps::name(c.id).into(),
    }
}

fn facts_slot(f: &Function) -> &'static str {
    f.pcie().map_or("", facts_slot_of)
}

fn facts_slot_of(p: &caps::pcie::PciExpress) -> &'static str {
    match (p.port_type.is_downstream_port(), p.slot_implemented) {
        (true, true) => " (Slot+)",
        (true, false) => " (Slot-)",
        _ => "",
    }
}

fn pm(b: bool) -> &'static str {
    if b {
        "+"
    } else {
        "-"
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "unset".into(), |v| format!("{v:#x}"))
}

fn size_suffix(size: Option<u64>) -> String {
    size.map_or_else(String::new, |s| format!(" [size={}]", human(s)))
}

fn human(size: u64) -> String {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut v = size;
    let mut u = 0;
    while v >= 1024 && v % 1024 == 0 && u < UNITS.len() - 1 {
        v /= 1024;
        u += 1;
    }
    format!("{v}{}", UNITS.get(u).copied().unwrap_or(""))
}

fn class_name(base: u8, sub: u8) -> &'static str {
    match (base, sub) {
        (0x00, _) => "Unclassified device",
        (0x01, 0x00) => "SCSI storage controller",
        (0x01, 0x01) => "IDE interface",
        (0x01, 0x06) => "SATA controller",
        (0x01, 0x08) => "Non-Volatile memory controller",
        (0x01, _) => "Mass storage controller",
        (0x02, 0x00) => "Ethernet controller",
        (0x02, _) => "Network controller",
        (0x03, 0x00) => "VGA compatible controller",
        (0x03, 0x02) => "3D controller",
        (0x03, _) => "Display controller",
        (0x04, 0x03) => "Audio device",
        (0x04, _) => "Multimedia controller",
        (0x05, _) => "Memory controller",
        (0x06, 0x00) => "Host bridge",
        (0x06, 0x01) => "ISA bridge",
        (0x06, 0x04) => "PCI bridge",
        (0x06, 0x07) => "CardBus bridge",
        (0x06, _) => "Bridge",
        (0x07, _) => "Communication controller",
        (0x08, _) => "System peripheral",
        (0x09, _) => "Input device controller",
        (0x0c, 0x03) => "USB controller",
        (0x0c, 0x05) => "SMBus",
        (0x0c, _) => "Serial bus controller",
        (0x0d, _) => "Wireless controller",
        (0x10, _) => "Encryption controller",
        (0x11, _) => "Signal processing controller",
        (0x12, _) => "Processing accelerators",
        (0xff, _) => "Unassigned class",
        _ => "Class",
    }
}

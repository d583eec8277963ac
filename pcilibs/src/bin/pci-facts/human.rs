//! The `lspci -vv`-like listing.

use std::fmt::Write as _;

use pcilibs::bar::BarKind;
use pcilibs::caps;
use pcilibs::config::AddressRange;
use pcilibs::decode::Function;
use pcilibs::ecaps;

use super::Entry;

/// The entries as text, one block per function.
pub(crate) fn render(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        print_human(&mut out, e);
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

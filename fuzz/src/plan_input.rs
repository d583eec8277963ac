//! Planner input built from fuzz bytes: plan requests, device requests, hotplug profiles
//! and s390x devices.
//!
//! The builders draw every choice from an [`Unstructured`], mostly from realistic ranges
//! (power-of-two BAR sizes from 4 KiB to 256 GiB, a handful of devices) and now and then
//! from the whole range of the type (any `u64` size, any alignment, counts up to
//! `u32::MAX`), so that both the planner's normal paths and its limits are reached.

use arbitrary::{Result, Unstructured};
use pcie_topology::{
    Attach, DeviceRequest, FunctionRequest, FunctionResource, HotplugProfile, Mode, PlanOptions, PlanRequest,
    QemuId, ResourceRole, SpareRequest,
};
use pcilibs::bar::BarKind;
use pcilibs::bdf::Bdf;
use pcilibs::requirement::Resource;

/// Most devices in one generated request (the planner's cost grows with it; the known
/// quadratic case needs 10^5 and is a fault of its own).
pub const MAX_DEVICES: usize = 24;

/// A size: mostly a power of two between 4 KiB and 256 GiB, sometimes any power of two,
/// sometimes any number.
pub fn size(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => u.arbitrary()?,
        1 => 1u64 << u.int_in_range(0u32..=63)?,
        _ => 1u64 << u.int_in_range(12u32..=38)?,
    })
}

fn kind(u: &mut Unstructured<'_>) -> Result<BarKind> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => BarKind::Io,
        1 | 2 => BarKind::Mem32,
        _ => BarKind::Mem64,
    })
}

/// One resource: a BAR at its natural alignment, now and then a ROM, an I/O BAR or an
/// SR-IOV-like aperture whose size is a multiple of its alignment, rarely anything.
pub fn resource(u: &mut Unstructured<'_>) -> Result<Resource> {
    let kind = kind(u)?;
    let prefetchable: bool = u.arbitrary()?;
    let rom = u.ratio(1u8, 16u8)?;
    let mut size = size(u)?;
    if kind == BarKind::Io && !u.ratio(1u8, 8u8)? {
        size = 1u64 << u.int_in_range(2u32..=12)?;
    }
    let align = match u.int_in_range(0u8..=9)? {
        0 => u.arbitrary()?,
        1 => {
            // An aperture: `count` VF BARs of `size` bytes, aligned to one of them.
            let count = u64::from(u.int_in_range(1u16..=256)?);
            let align = size;
            size = size.saturating_mul(count);
            align
        }
        _ => size,
    };
    Ok(Resource { kind, prefetchable, rom, size, align })
}

fn role(u: &mut Unstructured<'_>, size: u64) -> Result<ResourceRole> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => ResourceRole::VfAperture,
        1 => ResourceRole::ResizableMax { current: size >> u.int_in_range(0u32..=8)? },
        _ => ResourceRole::Bar,
    })
}

/// A resource with an index and a role (the index mostly valid, sometimes not).
pub fn function_resource(u: &mut Unstructured<'_>, slot: u8) -> Result<FunctionResource> {
    let resource = resource(u)?;
    let mut r = FunctionResource::at(slot, resource);
    r.index = match u.int_in_range(0u8..=7)? {
        0 => None,
        1 => Some(u.arbitrary()?),
        _ if resource.rom => Some(FunctionResource::ROM),
        _ => Some(slot),
    };
    r.role = role(u, resource.size)?;
    Ok(r)
}

/// Resources of one function: BARs at increasing registers.
fn resources(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<FunctionResource>> {
    let n = u.int_in_range(0..=max)?;
    let mut out = Vec::with_capacity(n);
    let mut slot = 0u8;
    for _ in 0..n {
        let r = function_resource(u, slot)?;
        slot = slot.saturating_add(if r.resource.kind == BarKind::Mem64 { 2 } else { 1 });
        out.push(r);
    }
    Ok(out)
}

/// A QEMU id: mostly `<prefix><n>`, sometimes any text (which [`QemuId::new`] may refuse).
fn id(u: &mut Unstructured<'_>, prefix: &str, n: usize) -> Result<QemuId> {
    if u.ratio(1u8, 16u8)? {
        let text: String = u.arbitrary()?;
        if let Ok(id) = QemuId::new(text) {
            return Ok(id);
        }
    }
    let n = if u.ratio(1u8, 8u8)? { u.int_in_range(0..=3)? } else { n };
    QemuId::new(format!("{prefix}{n}")).map_err(|_| arbitrary::Error::IncorrectFormat)
}

fn small_option<T>(
    u: &mut Unstructured<'_>,
    f: impl FnOnce(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Option<T>> {
    if u.arbitrary()? {
        Ok(Some(f(u)?))
    } else {
        Ok(None)
    }
}

fn function(u: &mut Unstructured<'_>, device: usize, number: u8) -> Result<FunctionRequest> {
    let driver = *u.choose(&["vfio-pci", "vfio-pci", "ivshmem-plain", "virtio-net-pci", "e1000e"])?;
    let resources = resources(u, 6)?;
    let host = Bdf::new(0, u8::try_from(device % 256).unwrap_or(0), 0, number % 8);
    let mut f = match host {
        Ok(bdf) if driver == "vfio-pci" => FunctionRequest::vfio(number, bdf, resources),
        _ => FunctionRequest::new(number, driver, resources),
    };
    f.pcie = !u.ratio(1u8, 8u8)?;
    f.class = small_option(u, |u| u.int_in_range(0u32..=0xff_ffff))?;
    Ok(f)
}

/// One device with 1 to 8 functions (numbers mostly 0, 1, …; sometimes anything).
pub fn device(u: &mut Unstructured<'_>, n: usize) -> Result<DeviceRequest> {
    let count = if u.ratio(1u8, 4u8)? { u.int_in_range(1u8..=8)? } else { 1 };
    let mut functions = Vec::with_capacity(usize::from(count));
    for i in 0..count {
        let number = if u.ratio(1u8, 32u8)? { u.arbitrary()? } else { i };
        functions.push(function(u, n, number)?);
    }
    let mut d = DeviceRequest::new(id(u, "dev", n)?, functions);
    d.p2p_group = small_option(u, |u| Ok(format!("g{}", u.int_in_range(0u8..=2)?)))?;
    d.iommu_group = small_option(u, |u| u.int_in_range(0u32..=4))?;
    d.numa_node =
        small_option(u, |u| if u.ratio(1u8, 16u8)? { u.arbitrary() } else { u.int_in_range(0u32..=3) })?;
    d.cold_plug = u.arbitrary()?;
    if u.ratio(1u8, 16u8)? {
        d.attach = Attach::PciBridge;
    }
    Ok(d)
}

/// A profile: a known one or resources of its own.
pub fn profile(u: &mut Unstructured<'_>) -> Result<HotplugProfile> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => HotplugProfile::h100(),
        1 => HotplugProfile::a100(),
        2 => HotplugProfile::nvswitch(),
        3 => HotplugProfile::nic(),
        _ => HotplugProfile::new("custom", resources(u, 4)?),
    })
}

fn spare(u: &mut Unstructured<'_>) -> Result<SpareRequest> {
    let count = match u.int_in_range(0u8..=31)? {
        0 => u.arbitrary()?,
        1 => u.int_in_range(0u32..=300)?,
        _ => u.int_in_range(0u32..=6)?,
    };
    let mut s = SpareRequest::new(profile(u)?, count);
    if let Some(node) = small_option(u, |u| u.int_in_range(0u32..=3))? {
        s = s.with_numa_node(node);
    }
    if let Some(group) = small_option(u, |u| Ok(format!("g{}", u.int_in_range(0u8..=2)?)))? {
        s = s.with_p2p_group(group);
    }
    Ok(s)
}

fn options(u: &mut Unstructured<'_>) -> Result<PlanOptions> {
    let d = PlanOptions::default();
    let guest_ram = match u.int_in_range(0u8..=7)? {
        0 => u.arbitrary()?,
        1 => 1u64 << u.int_in_range(20u32..=46)?,
        _ => d.guest_ram,
    };
    let bits = |u: &mut Unstructured<'_>| -> Result<u8> {
        if u.ratio(1u8, 8u8)? {
            u.arbitrary()
        } else {
            u.int_in_range(36u8..=52)
        }
    };
    let mut o = PlanOptions::default();
    o.guest_ram = guest_ram;
    o.guest_phys_bits = small_option(u, bits)?;
    o.host_phys_bits = small_option(u, bits)?;
    o.pack_root_ports = u.arbitrary()?;
    o.spare_bus_reserve = if u.ratio(1u8, 8u8)? { u.arbitrary()? } else { u.int_in_range(0u8..=2)? };
    o.switch_placeholders = !u.ratio(1u8, 4u8)?;
    o.first_root_slot = if u.ratio(1u8, 8u8)? { u.arbitrary()? } else { 1 };
    o.size_reservations = !u.ratio(1u8, 8u8)?;
    o.conventional_behind_bridge = u.ratio(1u8, 8u8)?;
    Ok(o)
}

/// A whole plan request.
pub fn plan_request(u: &mut Unstructured<'_>) -> Result<PlanRequest> {
    let mode = *u.choose(&[Mode::RootPort, Mode::SwitchPort, Mode::Numa])?;
    let n = u.int_in_range(0..=MAX_DEVICES)?;
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        devices.push(device(u, i)?);
    }
    let spares = (0..u.int_in_range(0u8..=3)?).map(|_| spare(u)).collect::<Result<Vec<_>>>()?;
    Ok(PlanRequest::default()
        .with_mode(mode)
        .with_devices(devices)
        .with_spares(spares)
        .with_options(options(u)?))
}

/// An s390x device: a channel device, a zPCI function or an AP matrix device (the
/// s390x platform takes them through the same planner).
pub fn s390x_device(u: &mut Unstructured<'_>, n: usize) -> Result<DeviceRequest> {
    let id = id(u, "s", n)?;
    Ok(match u.int_in_range(0u8..=2)? {
        0 => {
            let driver = *u.choose(&["virtio-net-ccw", "virtio-blk-ccw", "vfio-ccw"])?;
            let ssid = if u.ratio(1u8, 8u8)? { u.arbitrary()? } else { u.int_in_range(0u8..=3)? };
            let mut d = DeviceRequest::channel(id, driver, ssid);
            if driver == "vfio-ccw" {
                let sch = format!("/sys/bus/css/devices/0.0.{:04x}", u.int_in_range(0u16..=0xffff)?);
                d.functions = d.functions.into_iter().map(|f| f.with_sysfsdev(&sch)).collect();
            }
            d
        }
        1 => {
            let mut d = device(u, n)?;
            d.id = id;
            d.attach = Attach::Port;
            d
        }
        _ => DeviceRequest::vfio_ap(id, "/sys/devices/vfio_ap/matrix/fuzz"),
    })
}

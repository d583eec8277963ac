//! x86_64 `q35` and aarch64 `virt` machines for the `pcie-topology` planner.
//!
//! Each machine is a [`pcie_topology::Platform`]: its address map, port devices and the
//! rule its firmware (or the guest kernel) follows when it sizes and places bridge
//! windows. The facts below come from the firmware and QEMU sources of the versions
//! Debian 12 ships (QEMU 7.2, SeaBIOS 1.16.2, OVMF/AAVMF edk2 2022.11) and of the
//! generations after them ([`generation`]), each checked in real guests.
//!
//! # q35 with SeaBIOS
//!
//! - A root port's `mem-reserve`/`pref64-reserve` (QEMU's resource-reserve capability)
//!   becomes the window size when larger than what sits below the port. The window's
//!   alignment stays the largest alignment of the boot-time children, at least 2 MiB,
//!   and its size is rounded up to that alignment (QEMU 7.2 with SeaBIOS 1.16.2 put a
//!   placeholder's 128 GiB + 32 MiB behind a downstream port into a 256 GiB window). An
//!   empty hotplug port gets 2 MiB windows.
//! - When the 32-bit hole cannot hold everything, every 64-bit window and BAR of the
//!   root buses moves above 4 GiB: the region starts at 4 GiB plus RAM above 4 GiB,
//!   aligned to 1 GiB and to the largest entry alignment, and entries follow one another
//!   sorted by alignment, then size. An empty port's 128 GiB window can thus start at
//!   4 GiB: [`WindowRule::ReserveUnaligned`] with 2 MiB start alignment.
//! - Bus numbers: depth-first from bus 0, `bus-reserve` extends a port's range;
//!   expander roots keep their `bus_nr` and are walked after bus 0's tree.
//! - 32-bit PCI space 0xc000_0000..0xfec0_0000 (above the q35 MMCONFIG window); I/O
//!   0x1000..0xa000 when more than 16 KiB is needed.
//!
//! # q35 with SeaBIOS 1.16.3 and later
//!
//! The plan follows the generation of the firmware the VM runs ([`generation`]; read
//! from the image with [`Q35::detect`], or named with [`Q35::for_generation`]);
//! [`Q35::seabios`] keeps the 1.16.2 rule above, whose plans hold on later releases too.
//! From 1.16.3 on, SeaBIOS puts the 64-bit region at the end of the guest's physical
//! address space (`1 << phys-bits`, capped at 46 bits, 44 from 1.17.0 below 1 TiB of RAM
//! above 4 GiB) and lays the windows out largest alignment, then largest size first from
//! `top - ALIGN(sum, 1 GiB)` (or an eighth of the space, padded, with RAM above 4 GiB):
//! [`WindowRule::ReservePlaced`] with [`Mmio64Aperture::EndOfAddressSpace`]. The planner
//! reproduces that layout and sizes each spare port for where its window really starts:
//! exactly what it needs where the start suits (measured on 1.16.3 and 1.17.0: one to
//! eight 128 GiB BARs in 128 GiB windows, 1.00×), rounded to 1 GiB for a single GPU with
//! a small second BAR, half the large BAR more for several (windows then start
//! alternately on and half-way between boundaries), the 1.16.2 slack only where nothing
//! else holds. The firmware trusts phys-bits from 41 on whatever the CPU vendor, so these
//! plans ask for at least 41; QEMU's e820 hole below 1 TiB for AMD-vendor CPUs
//! ([`pcie_topology::AMD_HT_HOLE`]) is kept free of BARs.
//!
//! # q35 with OVMF
//!
//! - The hotplug-padding driver reads the same capability, rounds each reservation up to
//!   a power of two and asks for a window aligned to that size:
//!   [`WindowRule::ReservePowerOfTwo`].
//! - The 64-bit aperture has a fixed size, 32 GiB unless fw_cfg
//!   `opt/ovmf/X-PciMmio64Mb` says otherwise, and starts at the end of RAM rounded up to
//!   1 GiB and then to the largest power of two not above its size. The platform emits
//!   the fw_cfg file whenever the plan needs more than the default.
//! - OVMF 2022.11 computes the guest's address width from that aperture; the guest CPU
//!   must have at least the `phys-bits` the plan states.
//!
//! # aarch64 virt
//!
//! - Without firmware (direct kernel boot) Linux assigns everything; the port properties
//!   are not read. Every hotplug bridge gets the extra space of
//!   `pci=hpmmiosize=,hpmmioprefsize=` (and `hpbussize=` buses); the plan emits them as
//!   guest kernel arguments sized for the largest spare port, with the same alignment
//!   slack as SeaBIOS ([`WindowRule::KernelHotplugSize`]). Expander buses are not
//!   described to the kernel in this mode, so NUMA mode is unsupported there.
//! - With UEFI (AAVMF) a Linux guest boots with ACPI and assigns resources itself too:
//!   QEMU's DSDT does not ask it to keep the firmware's assignment, so the port
//!   properties do not count there either. Measured with Debian's 6.1 kernel: a root
//!   port with `pref64-reserve=64G` had a 2 MiB prefetchable window after boot; with
//!   `pci=hpmmioprefsize=64G,hpmmiosize=32M` it had 64 GiB and 32 MiB. So the plan for
//!   UEFI follows the kernel's rule and emits the same kernel arguments as direct boot,
//!   and no `*-reserve` properties. (Earlier versions planned AAVMF's power-of-two
//!   reservations, which the guest then threw away: it failed a 64 GiB BAR at hotplug and
//!   only assigned it after moving the port's window on its own.) A guest OS that keeps
//!   the firmware's windows is not what this platform plans for. Bus numbers stay the
//!   firmware's depth-first ones, which Linux keeps.
//! - The 64-bit window is the machine's high PCIe MMIO region, 512 GiB at 512 GiB.
//! - 32-bit PCI space 0x1000_0000..0x3eff_0000, I/O 64 KiB.
//!
//! # PCIe-to-PCI bridge (all machines)
//!
//! Both machines name `pcie-pci-bridge` for devices that ask for a conventional bus. In
//! QEMU 7.2 it has no `*-reserve` properties (`-device pcie-pci-bridge,help`); devices
//! are hotplugged into its slots through its SHPC controller. Measured with `query-pci`
//! on an empty bridge: SeaBIOS gives it 2 MiB of memory, 2 MiB prefetchable and 4 KiB of
//! I/O; OVMF 2 MiB, 512 MiB prefetchable and 4 KiB; AAVMF 2 MiB, no prefetchable window
//! and 4 KiB; Linux 6.1 booted directly on `virt` gives it no window at all (the
//! `pci=hpmmiosize=` space goes to PCIe hotplug ports only). The planner counts on the
//! 2 MiB memory window alone for everything hotplugged behind a bridge.

#![forbid(unsafe_code)]

pub mod generation;

pub use generation::{
    detect_firmware, DetectError, DetectedFirmware, FirmwareGeneration, FirmwareKind, Release,
};

use std::path::Path;

use pcie_topology::platform::{
    Arch, BusNumbering, ExtraArgs, Mmio64Aperture, Platform, PlatformSpec, Range, Totals, WindowRule,
};
use pcie_topology::units::{fmt_size, GIB, MIB};

/// SeaBIOS's minimum bridge memory window and its alignment (2 MiB, a huge page).
pub const SEABIOS_BRIDGE_MEM_MIN: u64 = 2 * MIB;

/// Default OVMF image.
pub const OVMF_PATH: &str = "/usr/share/ovmf/OVMF.fd";
/// Default AAVMF code image.
pub const AAVMF_PATH: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
/// OVMF's 64-bit aperture when `X-PciMmio64Mb` is not given (edk2 2022.11).
pub const OVMF_DEFAULT_MMIO64: u64 = 32 * GIB;
/// The guest kernel argument that keeps Linux from adding I/O windows of its own to
/// hotplug bridges (`pci=hpiosize=0`); every q35 plan carries it.
pub const KERNEL_NO_HOTPLUG_IO: &str = "pci=hpiosize=0";
/// OVMF's default prefetchable padding of a hotplug-capable bridge that carries no
/// reservation (a switch downstream port under native PCIe hotplug; a root port with
/// `pref64-reserve=0`) as measured in a 128 GiB aperture: 512 MiB (edk2 2022.11). It is
/// a 256th of the aperture, which the planner counts for larger ones.
pub const OVMF_DEFAULT_PREF_PADDING: u64 = 512 * MIB;
/// From this many guest physical address bits on, OVMF makes an aperture smaller than an
/// eighth of the address space that eighth, at its top (measured with Debian's edk2
/// 2022.11 under QEMU 7.2: 39 bits placed a 32 GiB aperture at 32 GiB, 40 bits at
/// 0xe0_0000_0000, 41 bits at 0x1c0_0000_0000, 46 bits at 0x3800_0000_0000).
pub const OVMF_TOP_EIGHTH_FROM_BITS: u8 = 40;

/// x86 firmware of a q35 machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum X86Firmware {
    /// SeaBIOS (QEMU's default).
    SeaBios,
    /// OVMF, from this image (`-bios`).
    Ovmf {
        /// Path of the OVMF image.
        path: String,
    },
}

/// SeaBIOS 1.16.3's cap on the width it places the 64-bit region under.
pub const SEABIOS_1163_MAX_BITS: u8 = 46;
/// SeaBIOS 1.17.0's cap, which holds while the RAM above 4 GiB is below
/// [`SEABIOS_117_UNCAPPED_RAM`].
pub const SEABIOS_117_MAX_BITS: u8 = 44;
/// RAM above 4 GiB from which SeaBIOS 1.17.0 uses the guest's whole width.
pub const SEABIOS_117_UNCAPPED_RAM: u64 = 1 << 40;

/// The `q35` machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Q35 {
    /// Firmware.
    pub firmware: X86Firmware,
    /// The firmware's generation, whose placement rule the plans follow.
    pub generation: FirmwareGeneration,
}

impl Q35 {
    /// q35 with SeaBIOS, planned for SeaBIOS up to 1.16.2
    /// ([`FirmwareGeneration::SeaBiosAfterRam`]), whose plans also hold on later releases.
    pub fn seabios() -> Self {
        Q35 { firmware: X86Firmware::SeaBios, generation: FirmwareGeneration::SeaBiosAfterRam }
    }

    /// q35 with OVMF from [`OVMF_PATH`].
    pub fn ovmf() -> Self {
        Q35::ovmf_at(OVMF_PATH)
    }

    /// q35 with the OVMF image at `path`, planned for edk2 2022.11 and later
    /// ([`FirmwareGeneration::OvmfPhysBitsAperture`]).
    pub fn ovmf_at(path: impl Into<String>) -> Self {
        Q35 {
            firmware: X86Firmware::Ovmf { path: path.into() },
            generation: FirmwareGeneration::OvmfPhysBitsAperture,
        }
    }

    /// q35 planned for `generation`, named by the caller: a SeaBIOS generation runs
    /// QEMU's default firmware, an OVMF one the image at `ovmf_path`. `None` for the
    /// generations of aarch64 ([`FirmwareGeneration::Aavmf`],
    /// [`FirmwareGeneration::LinuxAssigned`]).
    pub fn for_generation(generation: FirmwareGeneration, ovmf_path: impl Into<String>) -> Option<Self> {
        match generation {
            g if g.is_seabios() => Some(Q35 { firmware: X86Firmware::SeaBios, generation: g }),
            g @ (FirmwareGeneration::OvmfFixedAperture | FirmwareGeneration::OvmfPhysBitsAperture) => {
                Some(Q35 { firmware: X86Firmware::Ovmf { path: ovmf_path.into() }, generation: g })
            }
            _ => None,
        }
    }

    /// q35 planned for the firmware image the VM will run, read from the image: a
    /// SeaBIOS image (the one QEMU loads, e.g. its data directory's `bios-256k.bin`; the
    /// plan adds no `-bios`) or an OVMF image (passed with `-bios`).
    pub fn detect(image: &Path) -> Result<Self, DetectError> {
        let found = detect_firmware(image)?;
        Q35::for_generation(found.generation, image.display().to_string())
            .ok_or_else(|| DetectError::Unknown(format!("{} (an aarch64 image)", image.display())))
    }
}

impl Platform for Q35 {
    fn spec(&self) -> PlatformSpec {
        let (name, firmware_args, rule, mmio32, io, mmio64) = match &self.firmware {
            X86Firmware::SeaBios => {
                let (rule, mmio64) = seabios_rule(self.generation);
                (
                    "q35-seabios",
                    Vec::new(),
                    rule,
                    Range::new(0xc000_0000, 0xfec0_0000 - 0xc000_0000),
                    Range::new(0x1000, 0x9000),
                    mmio64,
                )
            }
            X86Firmware::Ovmf { path } => (
                "q35-ovmf",
                vec!["-bios".to_string(), path.clone()],
                WindowRule::ReservePowerOfTwo,
                Range::new(0xc000_0000, 0xfc00_0000 - 0xc000_0000),
                Range::new(0xc000, 0x4000),
                Mmio64Aperture::FwCfgSized {
                    default_size: OVMF_DEFAULT_MMIO64,
                    top_eighth_from_bits: (self.generation != FirmwareGeneration::OvmfFixedAperture)
                        .then_some(OVMF_TOP_EIGHTH_FROM_BITS),
                    downstream_padding: OVMF_DEFAULT_PREF_PADDING,
                },
            ),
        };
        let mut spec = PlatformSpec::new(name, Arch::X86_64, "q35");
        spec.firmware_args = firmware_args;
        spec.root_bus = "pcie.0".to_string();
        spec.root_port = Some("pcie-root-port".to_string());
        spec.switch_upstream = Some("x3130-upstream".to_string());
        spec.switch_downstream = Some("xio3130-downstream".to_string());
        spec.expander = Some("pxb-pcie".to_string());
        spec.pci_bridge = Some("pcie-pci-bridge".to_string());
        spec.reserved_root_slots = vec![0, 0x1f];
        spec.window_rule = rule;
        spec.bus_numbering = BusNumbering::FirmwareDepthFirst;
        spec.mmio32 = mmio32;
        spec.io = io;
        spec.mmio64 = mmio64;
        spec.mem32_placeholder = Some("qxl".to_string());
        spec.default_phys_bits = 40;
        spec.low_ram_limit = 2 * GIB;
        spec
    }

    fn extra_args(&self, totals: &Totals) -> ExtraArgs {
        let mut extra = ExtraArgs::default();
        // Firmware opens the I/O windows the plan reserves and no others. Linux would
        // add its own 4 KiB to every hotplug bridge without one, and where a bus has no
        // spare I/O (an expander's root bus holds exactly its ports' windows) it retries
        // a hotplug by releasing a sibling's window and giving it to the port plugged
        // into: measured with Linux 7.3, a nvme plugged into one expander port took the
        // I/O window planned for the e1000e of the next. With no I/O added for hotplug,
        // the kernel keeps the firmware's windows.
        extra.kernel.push(KERNEL_NO_HOTPLUG_IO.to_string());
        if matches!(self.firmware, X86Firmware::Ovmf { .. }) && totals.mmio64_needed > OVMF_DEFAULT_MMIO64 {
            extra.qemu.push("-fw_cfg".to_string());
            extra.qemu.push(format!("name=opt/ovmf/X-PciMmio64Mb,string={}", totals.mmio64_needed / MIB));
        }
        extra
    }
}

/// SeaBIOS's window rule and 64-bit region for `generation`.
fn seabios_rule(generation: FirmwareGeneration) -> (WindowRule, Mmio64Aperture) {
    let placed = WindowRule::ReservePlaced { start_align: SEABIOS_BRIDGE_MEM_MIN };
    match generation {
        FirmwareGeneration::SeaBiosEndOfSpace => (
            placed,
            Mmio64Aperture::EndOfAddressSpace {
                max_bits: SEABIOS_1163_MAX_BITS,
                uncapped_ram_above_4g: None,
            },
        ),
        FirmwareGeneration::SeaBiosEndOfSpaceCapped => (
            placed,
            Mmio64Aperture::EndOfAddressSpace {
                max_bits: SEABIOS_117_MAX_BITS,
                uncapped_ram_above_4g: Some(SEABIOS_117_UNCAPPED_RAM),
            },
        ),
        _ => (
            WindowRule::ReserveUnaligned { start_align: SEABIOS_BRIDGE_MEM_MIN },
            Mmio64Aperture::GrowsAfterRam,
        ),
    }
}

/// aarch64 firmware of a virt machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArmFirmware {
    /// No firmware: direct kernel boot, Linux assigns resources.
    None,
    /// UEFI (AAVMF) from this code image, as pflash unit 0.
    Uefi {
        /// Path of the code image.
        path: String,
    },
}

/// The aarch64 `virt` machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Virt {
    /// Firmware.
    pub firmware: ArmFirmware,
}

impl Virt {
    /// virt booted without firmware (`-kernel`).
    pub fn direct_kernel() -> Self {
        Virt { firmware: ArmFirmware::None }
    }

    /// virt with AAVMF from [`AAVMF_PATH`].
    pub fn uefi() -> Self {
        Virt::uefi_at(AAVMF_PATH)
    }

    /// virt with the AAVMF code image at `path`.
    pub fn uefi_at(path: impl Into<String>) -> Self {
        Virt { firmware: ArmFirmware::Uefi { path: path.into() } }
    }

    /// The generation the plans follow: [`FirmwareGeneration::Aavmf`] or
    /// [`FirmwareGeneration::LinuxAssigned`] (both leave the windows to the guest kernel).
    pub fn generation(&self) -> FirmwareGeneration {
        match self.firmware {
            ArmFirmware::None => FirmwareGeneration::LinuxAssigned,
            ArmFirmware::Uefi { .. } => FirmwareGeneration::Aavmf,
        }
    }

    /// virt with the AAVMF code image at `image`, after checking that it is one.
    pub fn detect(image: &Path) -> Result<Self, DetectError> {
        let found = detect_firmware(image)?;
        if found.kind != FirmwareKind::Aavmf {
            return Err(DetectError::Unknown(format!("{} (not an AAVMF image)", image.display())));
        }
        Ok(Virt::uefi_at(image.display().to_string()))
    }
}

/// virt's high PCIe MMIO window (QEMU 7.2): 512 GiB at 512 GiB.
pub const VIRT_HIGH_MMIO: Range = Range::new(512 * GIB, 512 * GIB);

impl Platform for Virt {
    fn spec(&self) -> PlatformSpec {
        let uefi = matches!(self.firmware, ArmFirmware::Uefi { .. });
        let firmware_args = match &self.firmware {
            ArmFirmware::None => Vec::new(),
            ArmFirmware::Uefi { path } => {
                vec!["-drive".to_string(), format!("if=pflash,format=raw,unit=0,readonly=on,file={path}")]
            }
        };
        let mut spec = PlatformSpec::new(if uefi { "virt-uefi" } else { "virt" }, Arch::Aarch64, "virt");
        spec.firmware_args = firmware_args;
        spec.root_bus = "pcie.0".to_string();
        spec.root_port = Some("pcie-root-port".to_string());
        spec.switch_upstream = Some("x3130-upstream".to_string());
        spec.switch_downstream = Some("xio3130-downstream".to_string());
        spec.expander = uefi.then(|| "pxb-pcie".to_string());
        spec.pci_bridge = Some("pcie-pci-bridge".to_string());
        spec.reserved_root_slots = vec![0];
        // Linux assigns windows itself under UEFI too (see the module docs).
        spec.window_rule = WindowRule::KernelHotplugSize { start_align: MIB };
        spec.bus_numbering =
            if uefi { BusNumbering::FirmwareDepthFirst } else { BusNumbering::KernelDepthFirst };
        spec.mmio32 = Range::new(0x1000_0000, 0x2eff_0000);
        spec.io = Range::new(0, 0x1_0000);
        spec.mmio64 = Mmio64Aperture::Fixed { base: VIRT_HIGH_MMIO.base, size: VIRT_HIGH_MMIO.size };
        spec.default_phys_bits = 40;
        spec.low_ram_limit = 3 * GIB;
        spec
    }

    fn extra_args(&self, totals: &Totals) -> ExtraArgs {
        let mut extra = ExtraArgs::default();
        {
            let mut opts = Vec::new();
            if totals.hotplug_mem > 0 {
                opts.push(format!("hpmmiosize={}", fmt_size(totals.hotplug_mem)));
            }
            if totals.hotplug_pref > 0 {
                opts.push(format!("hpmmioprefsize={}", fmt_size(totals.hotplug_pref)));
            }
            if totals.hotplug_buses > 0 {
                opts.push(format!("hpbussize={}", u32::from(totals.hotplug_buses) + 1));
            }
            if !opts.is_empty() {
                extra.kernel.push(format!("pci={}", opts.join(",")));
            }
        }
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcie_topology::{plan, HotplugProfile, Mode, PlanRequest, SpareRequest};

    fn spares(n: u32) -> PlanRequest {
        PlanRequest::default()
            .with_mode(Mode::RootPort)
            .with_spares(vec![SpareRequest::new(HotplugProfile::h100(), n)])
    }

    /// The guest kernel adds no I/O windows of its own to hotplug bridges (random seed
    /// 5032 on Linux 7.3: a plug into one expander port released the I/O window planned
    /// for the next port's e1000e).
    #[test]
    fn q35_plans_keep_the_kernel_from_adding_hotplug_io() {
        for platform in [Q35::seabios(), Q35::ovmf()] {
            let p = plan(&platform, &spares(1)).unwrap();
            assert!(p.kernel_args().iter().any(|a| a == KERNEL_NO_HOTPLUG_IO), "{:?}", p.kernel_args());
        }
    }

    #[test]
    fn seabios_reserves_alignment_slack() {
        let p = plan(&Q35::seabios(), &spares(1)).unwrap();
        let rp = &p.ports[0];
        let dev = rp.device.as_ref().unwrap();
        assert_eq!(dev.props["pref64-reserve"], (256 * GIB + 30 * MIB).into());
        assert_eq!(dev.props["mem-reserve"], (30 * MIB).into());
        assert_eq!(dev.props["io-reserve"], 0u64.into());
        assert!(p.extra.qemu.is_empty());
        // 4 GiB + 256 GiB + 31 MiB ends below 512 GiB: 39 bits.
        assert_eq!(p.address.phys_bits_needed, 39);
    }

    #[test]
    fn ovmf_sizes_the_aperture() {
        let p = plan(&Q35::ovmf(), &spares(2)).unwrap();
        assert_eq!(p.ports[0].device.as_ref().unwrap().props["pref64-reserve"], (256 * GIB).into());
        assert_eq!(
            p.extra.qemu,
            vec!["-fw_cfg".to_string(), format!("name=opt/ovmf/X-PciMmio64Mb,string={}", 512 * 1024)]
        );
    }

    fn seabios_117() -> Q35 {
        Q35::for_generation(FirmwareGeneration::SeaBiosEndOfSpaceCapped, "").unwrap()
    }

    #[test]
    fn seabios_at_the_end_reserves_what_the_gpu_needs() {
        let p = plan(&seabios_117(), &spares(1)).unwrap();
        let dev = p.ports[0].device.as_ref().unwrap();
        // 128 GiB + 32 MiB rounded to 1 GiB: the large BAR ends the window at the top.
        assert_eq!(dev.props["pref64-reserve"], (129 * GIB).into());
        assert_eq!(p.cpu_phys_bits(), Some(41));
        let aperture = p.address.mmio64_aperture.unwrap();
        assert_eq!(aperture.end(), 1 << 41);
        // Several: half the large BAR more, windows alternate between the boundary and
        // half-way.
        let p = plan(&seabios_117(), &spares(4)).unwrap();
        for port in &p.ports {
            assert_eq!(port.device.as_ref().unwrap().props["pref64-reserve"], (192 * GIB).into());
        }
    }

    #[test]
    fn seabios_at_the_end_without_a_trusted_width_keeps_the_slack() {
        let mut r = spares(1);
        r.options.guest_phys_bits = Some(40);
        let p = plan(&seabios_117(), &r).unwrap();
        let dev = p.ports[0].device.as_ref().unwrap();
        assert_eq!(dev.props["pref64-reserve"], (256 * GIB + 30 * MIB).into());
    }

    #[test]
    fn seabios_pads_with_ram_above_4g() {
        let mut r = spares(1);
        r.options.guest_ram = 16 * GIB;
        let p = plan(&seabios_117(), &r).unwrap();
        // 41 bits: windows padded to top >> 11 = 1 GiB; the layout puts the GPU's BAR on
        // its 128 GiB boundary.
        let r = &p.ports[0].reservation;
        assert_eq!((r.pref.size, r.pref.align), (129 * GIB, 128 * GIB));
        assert!(r.why.iter().any(|w| w.contains("pads hotplug windows")), "{:?}", r.why);
    }

    #[test]
    fn virt_emits_kernel_arguments() {
        let p = plan(&Virt::direct_kernel(), &spares(1)).unwrap();
        assert_eq!(p.kernel_args(), ["pci=hpmmiosize=31M,hpmmioprefsize=262175M".to_string()]);
        assert!(!p.ports[0].device.as_ref().unwrap().props.contains_key("pref64-reserve"));
    }
}

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! What a machine and its firmware do with the ports the planner emits.
//!
//! A [`Platform`] (implemented by the `arch-*` crates) describes a QEMU machine as data —
//! [`PlatformSpec`]: which port devices exist, where the 32-bit hole, the I/O space and the
//! 64-bit aperture lie, and by which [`WindowRule`] the firmware (or the guest kernel) sizes
//! and aligns each port's windows — and turns a finished plan's totals into the extra
//! arguments the machine needs (fw_cfg files, guest kernel arguments).

use serde::{Deserialize, Serialize};

use crate::error::AddressSpaceError;
use crate::units::{align_up, GIB};

/// Guest CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Arch {
    /// x86_64 (`qemu-system-x86_64`).
    X86_64,
    /// aarch64 (`qemu-system-aarch64`).
    Aarch64,
    /// s390x (`qemu-system-s390x`).
    S390x,
}

/// How the guest's bridge windows get their size and their start address.
///
/// This is the heart of "a reservation is a size *and* an alignment problem": a window of
/// the right size is useless if it starts at an address the largest BAR cannot be aligned
/// to inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "rule")]
#[non_exhaustive]
pub enum WindowRule {
    /// Firmware honours the port's `*-reserve` properties as sizes (rounded to the window
    /// granularity) but aligns the window only to the largest alignment of what is present
    /// at boot, at least `start_align` (SeaBIOS: 1 MiB for memory). An empty port's
    /// 128 GiB window can therefore start at 4 GiB; to guarantee that a BAR of alignment
    /// `A` fits, the reservation carries `A - start_align` bytes of slack.
    ReserveUnaligned {
        /// Alignment the firmware guarantees for an empty port's memory window start.
        start_align: u64,
    },
    /// Firmware rounds each reservation up to a power of two and aligns the window to its
    /// own size (OVMF and AAVMF through their hotplug-padding driver). No slack is needed,
    /// but the accounting must use the rounded sizes.
    ReservePowerOfTwo,
    /// No firmware assigns resources; the guest kernel sizes bridge windows and gives
    /// every hotplug bridge the same extra space from `pci=hpmmiosize=,hpmmioprefsize=`
    /// (aarch64 `virt` with direct kernel boot). Window starts are aligned to at least
    /// `start_align`, so the same slack as [`WindowRule::ReserveUnaligned`] applies.
    KernelHotplugSize {
        /// Alignment the kernel guarantees for the extra space of an empty port.
        start_align: u64,
    },
    /// Firmware honours the port's `*-reserve` properties as sizes and places every
    /// window of the root buses in an order the planner reproduces
    /// ([`Mmio64Aperture::EndOfAddressSpace`], SeaBIOS from 1.16.3 on): a reservation
    /// holds exactly what its profile needs wherever the layout puts the window start on
    /// a boundary the profile's largest BAR can use, and more only where it does not.
    /// Memory windows are still only `start_align`-aligned. A window laid out that way
    /// records its profile's largest alignment as its guaranteed alignment: wherever the
    /// layout starts it, the guest kernel assigns the profile as in a window so aligned
    /// (smaller BARs before the large one where the start is half-way).
    ReservePlaced {
        /// Alignment the firmware guarantees for an empty port's window start (2 MiB).
        start_align: u64,
    },
    /// No bridge windows (s390x: zPCI functions have no PCIe ports).
    NoWindows,
}

/// Where the firmware puts the 64-bit PCI aperture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum Mmio64Aperture {
    /// SeaBIOS: starts at `4 GiB + RAM above 4 GiB`, aligned to 1 GiB and to the largest
    /// alignment of the windows placed there, and grows to whatever they need; only the
    /// guest's physical address width limits it.
    GrowsAfterRam,
    /// OVMF: a fixed-size aperture (`opt/ovmf/X-PciMmio64Mb`, `default_size` when absent)
    /// starting at the end of RAM rounded up to 1 GiB and then to the largest power of two
    /// not above its size. The platform emits the fw_cfg file with the size the plan needs.
    FwCfgSized {
        /// Size when the fw_cfg file is not given (32 GiB in OVMF 2022.11).
        default_size: u64,
        /// From this many guest physical address bits on, an aperture smaller than an
        /// eighth of the guest's address space becomes that eighth, at the top of the
        /// address space (OVMF's dynamic MMIO window: measured with Debian's edk2
        /// 2022.11 under QEMU 7.2, from 40 bits on; with 39 or fewer, or an aperture of
        /// an eighth or more, the aperture is placed as above). `None`: never.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        top_eighth_from_bits: Option<u8>,
        /// Least prefetchable padding the firmware may give each switch downstream
        /// port: such a port has no reservation capability, and when it is
        /// hotplug-capable (native PCIe hotplug) OVMF widens its window to its default
        /// padding, a 256th of the 64-bit aperture once that is above 32 GiB (512 MiB
        /// measured in a 128 GiB aperture; a 512 MiB placeholder got a 1 GiB window in
        /// a 256 GiB one; edk2 2022.11 under QEMU 7.2). The aperture leaves room for
        /// the larger of this and its own 256th per downstream port.
        #[serde(default)]
        downstream_padding: u64,
    },
    /// A fixed window of the machine (aarch64 `virt`'s high PCIe MMIO region).
    Fixed {
        /// First address.
        base: u64,
        /// Size in bytes.
        size: u64,
    },
    /// SeaBIOS from 1.16.3 on: the 64-bit region ends at the top of the guest's physical
    /// address space, `1 << phys-bits` with the width capped at `max_bits` (1.16.3: 46;
    /// 1.17.0: 44 unless the RAM above 4 GiB reaches `uncapped_ram_above_4g`, 1 TiB).
    /// Windows are laid out as the firmware does (see the `end_placement` module of this
    /// crate); the rule needs [`WindowRule::ReservePlaced`]. Widths below 41 bits are
    /// not trusted by the firmware, which then places the region as
    /// [`Mmio64Aperture::GrowsAfterRam`] says.
    EndOfAddressSpace {
        /// Largest width the firmware uses.
        max_bits: u8,
        /// RAM above 4 GiB from which the cap no longer applies (`None`: always applies).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uncapped_ram_above_4g: Option<u64>,
    },
    /// No 64-bit aperture.
    None,
}

/// An address range `[base, base + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Range {
    /// First address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl Range {
    /// `[base, base + size)`.
    pub const fn new(base: u64, size: u64) -> Self {
        Range { base, size }
    }

    /// One past the last address (saturating; see [`Range::checked_end`]).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// One past the last address, `None` when that is past 2^64.
    pub fn checked_end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }
}

/// How guest bus numbers get assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BusNumbering {
    /// Firmware walks each root bus depth-first in devfn order, giving each bridge the next
    /// bus number and extending its subordinate range by the port's `bus-reserve`
    /// (SeaBIOS, OVMF).
    FirmwareDepthFirst,
    /// The guest kernel walks depth-first the same way; `bus-reserve` is ignored, the
    /// kernel's `pci=hpbussize=` applies to every hotplug bridge instead.
    KernelDepthFirst,
    /// No PCI bus numbers (s390x zPCI: each function gets its own domain from its uid).
    None,
}

/// How devices get their guest addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum Addressing {
    /// On PCIe ports the planner creates and sizes: root ports, switches, `pxb-pcie`
    /// expanders and a PCIe-to-PCI bridge (q35, aarch64 `virt`).
    #[default]
    PciePorts,
    /// No PCI topology (s390x `s390-ccw-virtio`): each PCI function is a zPCI function
    /// with its own uid and fid (the guest's PCI domain is the uid); channel devices
    /// ([`crate::Attach::Channel`]) get CCW device numbers `fe.<ssid>.<devno>`, from
    /// `first_devno` up; vfio-ap devices ([`crate::Attach::Ap`]) get no address.
    Zpci {
        /// Lowest device number handed out (lower ones are left to devices QEMU numbers
        /// itself, such as a boot disk without `devno`).
        first_devno: u16,
    },
}

/// A machine and firmware combination, as data that a plan stores and a reader can check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlatformSpec {
    /// Short name (`q35-seabios`, `q35-ovmf`, `virt`, `virt-uefi`, `s390x-ccw`).
    pub name: String,
    /// Guest architecture.
    pub arch: Arch,
    /// `-machine` value.
    pub machine: String,
    /// Firmware arguments (`-bios …`, `-drive if=pflash,…`), empty for the default firmware.
    pub firmware_args: Vec<String>,
    /// Id of the root PCIe bus (`pcie.0`); empty where there is none.
    pub root_bus: String,
    /// Root port driver (`pcie-root-port`).
    pub root_port: Option<String>,
    /// Switch upstream port driver (`x3130-upstream`).
    pub switch_upstream: Option<String>,
    /// Switch downstream port driver (`xio3130-downstream`).
    pub switch_downstream: Option<String>,
    /// Whether the downstream port driver has `*-reserve` properties (QEMU 7.2's
    /// `xio3130-downstream` has none).
    pub downstream_reserve: bool,
    /// Expander host bridge driver (`pxb-pcie`), where the platform supports it.
    pub expander: Option<String>,
    /// PCIe-to-PCI bridge driver for conventional devices (`pcie-pci-bridge`).
    pub pci_bridge: Option<String>,
    /// Slots of the root bus the machine itself occupies (q35: 0 and 0x1f).
    pub reserved_root_slots: Vec<u8>,
    /// Window sizing and alignment rule.
    pub window_rule: WindowRule,
    /// Bus numbering rule.
    pub bus_numbering: BusNumbering,
    /// 32-bit MMIO space available to PCI.
    pub mmio32: Range,
    /// I/O port space available to PCI.
    pub io: Range,
    /// 64-bit aperture rule.
    pub mmio64: Mmio64Aperture,
    /// Device that can stand in for large 32-bit non-prefetchable BARs in a boot-time
    /// placeholder (`qxl` on x86: its RAM BAR is sized by `ram_size_mb`).
    pub mem32_placeholder: Option<String>,
    /// Guest physical address bits the machine gives by default (x86 TCG: 40).
    pub default_phys_bits: u8,
    /// Guest RAM that sits below 4 GiB at most (q35: 2 GiB once RAM exceeds 2.75 GiB).
    pub low_ram_limit: u64,
    /// How devices get their guest addresses: on PCIe ports, or as zPCI and channel
    /// devices (s390x).
    #[serde(default)]
    pub addressing: Addressing,
}

impl PlatformSpec {
    /// Machine `machine` (the `-machine` value) of `arch`, called `name`, with nothing
    /// yet: no firmware arguments, no PCI ports or bridges, no windows
    /// ([`WindowRule::NoWindows`], [`BusNumbering::None`]), no address space for PCI, a
    /// default of 40 physical address bits, all RAM below 4 GiB, devices on PCIe ports
    /// ([`Addressing::PciePorts`]). A platform sets what its machine has.
    pub fn new(name: &str, arch: Arch, machine: &str) -> Self {
        PlatformSpec {
            name: name.to_string(),
            arch,
            machine: machine.to_string(),
            firmware_args: Vec::new(),
            root_bus: String::new(),
            root_port: None,
            switch_upstream: None,
            switch_downstream: None,
            downstream_reserve: false,
            expander: None,
            pci_bridge: None,
            reserved_root_slots: Vec::new(),
            window_rule: WindowRule::NoWindows,
            bus_numbering: BusNumbering::None,
            mmio32: Range::default(),
            io: Range::default(),
            mmio64: Mmio64Aperture::None,
            mem32_placeholder: None,
            default_phys_bits: 40,
            low_ram_limit: u64::MAX,
            addressing: Addressing::PciePorts,
        }
    }

    /// Bytes of guest RAM placed above 4 GiB for `ram` bytes of RAM.
    pub fn ram_above_4g(&self, ram: u64) -> u64 {
        ram.saturating_sub(self.low_ram_limit)
    }

    /// One past the last byte of `ram` bytes of guest RAM (RAM above 4 GiB starts there);
    /// [`AddressSpaceError::Overflow`] past 2^64.
    pub fn ram_end(&self, ram: u64) -> Result<u64, AddressSpaceError> {
        (4 * GIB).checked_add(self.ram_above_4g(ram)).ok_or(AddressSpaceError::Overflow)
    }

    /// The 64-bit aperture for windows needing `packed` bytes with largest alignment
    /// `align`, given `ram` bytes of guest RAM: `None` when there is no aperture,
    /// [`AddressSpaceError::Overflow`] when it would end past 2^64. (An overflow used to
    /// read as "no aperture", and a plan needing 2^63 bytes passed as needing none.)
    pub fn mmio64_range(
        &self,
        ram: u64,
        packed: u64,
        align: u64,
    ) -> Result<Option<Range>, AddressSpaceError> {
        self.mmio64_range_above(self.ram_end(ram)?, packed, align)
    }

    /// The 64-bit aperture as [`PlatformSpec::mmio64_range`] places it, when the
    /// firmware starts it above `ram_end` rather than above RAM: the end of the device
    /// memory region for memory hotplug (QEMU hands it to the firmware as
    /// `etc/reserved-memory-end`; SeaBIOS and OVMF start the 64-bit aperture there).
    pub fn mmio64_range_above(
        &self,
        ram_end: u64,
        packed: u64,
        align: u64,
    ) -> Result<Option<Range>, AddressSpaceError> {
        let overflow = || AddressSpaceError::Overflow;
        let range = match self.mmio64 {
            // The end-of-address-space region is laid out by the planner; without a width
            // the firmware trusts, it grows after RAM.
            Mmio64Aperture::GrowsAfterRam | Mmio64Aperture::EndOfAddressSpace { .. } => {
                let base =
                    align_up(ram_end, align.max(1)).and_then(|b| align_up(b, GIB)).ok_or_else(overflow)?;
                let end = base.checked_add(packed).and_then(|e| align_up(e, GIB)).ok_or_else(overflow)?;
                Range { base, size: end.checked_sub(base).ok_or_else(overflow)? }
            }
            Mmio64Aperture::FwCfgSized { default_size, .. } => {
                // A power of two, at a base aligned to it: power-of-two windows, each
                // aligned to its size, then always pack into it whatever order the
                // firmware places them in (an aperture of 257 GiB holds 256 GiB + 512 MiB
                // only when the 256 GiB window comes first).
                let size = align_up(packed, GIB)
                    .and_then(crate::units::next_pow2)
                    .ok_or_else(overflow)?
                    .max(default_size);
                let floor_pow2 = 1u64 << (63 - size.leading_zeros().min(63));
                let base =
                    align_up(ram_end, GIB).and_then(|b| align_up(b, floor_pow2)).ok_or_else(overflow)?;
                Range { base, size }
            }
            Mmio64Aperture::Fixed { base, size } => Range { base, size },
            Mmio64Aperture::None => return Ok(None),
        };
        range.checked_end().ok_or_else(overflow)?;
        Ok(Some(range))
    }

    /// Where the firmware really puts an aperture placed as `classic` (by
    /// [`PlatformSpec::mmio64_range_above`]) for a guest CPU with `guest_bits` physical
    /// address bits: the top eighth of the address space when the platform's firmware
    /// does that (`top_eighth_from_bits` of [`Mmio64Aperture::FwCfgSized`]), else
    /// `classic`.
    pub fn mmio64_placed(&self, classic: Range, guest_bits: u8) -> Range {
        let Mmio64Aperture::FwCfgSized { top_eighth_from_bits: Some(from), .. } = self.mmio64 else {
            return classic;
        };
        if guest_bits < from.max(3) || guest_bits >= 64 {
            return classic;
        }
        let space = 1u64 << guest_bits;
        let eighth = space >> 3;
        let fits_below = classic.base.checked_add(eighth).is_some_and(|end| end < space);
        if classic.size < eighth && fits_below {
            Range::new(space - eighth, eighth)
        } else {
            classic
        }
    }
}

/// Extra arguments a platform derives from a finished plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExtraArgs {
    /// QEMU command-line arguments (`-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=…`).
    pub qemu: Vec<String>,
    /// Guest kernel command-line arguments (`pci=hpmmiosize=…`).
    pub kernel: Vec<String>,
}

/// What a finished plan needs from the machine, for [`Platform::extra_args`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Totals {
    /// Bytes of 64-bit aperture the windows need (packed, rounded to 1 GiB).
    pub mmio64_needed: u64,
    /// Largest extra 32-bit space one empty hotplug port must get (kernel rule).
    pub hotplug_mem: u64,
    /// Largest extra 64-bit prefetchable space one empty hotplug port must get (kernel rule).
    pub hotplug_pref: u64,
    /// Extra bus numbers below each hotplug port (kernel rule).
    pub hotplug_buses: u8,
    /// Guest physical address bits the plan needs.
    pub phys_bits_needed: u8,
}

/// A QEMU machine with its firmware, implemented by the `arch-*` crates.
pub trait Platform {
    /// The machine as data; the planner reads only this and [`Platform::extra_args`].
    fn spec(&self) -> PlatformSpec;

    /// Arguments that depend on the plan's totals (aperture size, kernel window sizes).
    fn extra_args(&self, totals: &Totals) -> ExtraArgs;
}

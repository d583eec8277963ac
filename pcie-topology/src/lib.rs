//! Plans a QEMU guest's PCIe topology so that devices hotplugged later really fit.
//!
//! Given the devices to place (with every function's BARs, from `pcilibs`) and hotplug
//! profiles for spare ports, [`plan()`] decides which root ports, switches and expander
//! buses exist at boot, hands out ids, chassis/slot pairs, devfns and bus numbers from
//! free sets, sizes each port's windows so that the largest BAR fits *wherever the
//! platform's firmware places the window* (size and alignment), checks the whole guest
//! address space, and returns a [`Plan`]: QEMU arguments for boot, typed hotplug actions
//! ([`HotplugAction`]: the [`QemuDevice`]s and [`QemuObject`]s an engine turns into
//! `device_add` / `object-add`), and the guest PCI path and address of every function
//! (a [`pcilibs::bdf::Bdf`], with the host function it passes through, see
//! [`DeviceRequest::from_facts`] for the numbering).
//!
//! Machines are described by a [`Platform`] implementation from the `arch-x86-aarch64`
//! (q35 with SeaBIOS or OVMF, aarch64 `virt`) and `arch-s390x-ccw` crates; every one is
//! planned through [`plan()`], [`Plan::place`] and [`Plan::release`] (s390x, which has no
//! PCIe ports, hands out CCW device numbers and zPCI ids instead: [`Addressing`]).
//!
//! # Why reservations look the way they do
//!
//! - **SeaBIOS** honours a root port's `pref64-reserve` as a size but aligns an empty
//!   port's window only to 1 MiB; the 64-bit region starts at 4 GiB (after RAM above
//!   4 GiB), so a 128 GiB window can start at 4 GiB, where a 128 GiB BAR cannot be placed.
//!   The planner adds `alignment - 1 MiB` of slack: an H100-class profile (16 MiB +
//!   128 GiB + 32 MiB) gets `pref64-reserve` of 256 GiB + 31 MiB, which holds the BARs at
//!   any 1 MiB-aligned start.
//! - **OVMF** rounds each reservation up to a power of two and aligns the window to it,
//!   so the same profile gets 256 GiB, naturally aligned; its 64-bit aperture has a fixed
//!   size (32 GiB by default), so the plan emits `opt/ovmf/X-PciMmio64Mb` with the size
//!   the ports need.
//! - **aarch64 `virt` without firmware**: Linux sizes the windows and gives every hotplug
//!   bridge the same extra space; the plan emits `pci=hpmmiosize=,hpmmioprefsize=`.
//! - **Switch downstream ports** (`xio3130-downstream`) have no `*-reserve` properties in
//!   QEMU 7.2 and firmware sizes their windows from boot-time devices only, so the
//!   planner can plug a *placeholder* at boot behind each empty downstream port
//!   (`ivshmem-plain` functions with `memory-backend-ram,reserve=off`: the BAR sizes of
//!   the profile, no host memory) and every hotplug action onto such a port starts by
//!   removing it ([`HotplugAction::remove_placeholder`]). The firmware aligns a window to
//!   its largest boot-time child, so the placeholder gives both size and alignment. This
//!   relies on the window staying assigned after the placeholder is removed (firmware
//!   does not reprogram it and Linux keeps assigned bridge windows); the end-to-end
//!   guests prove it (`cargo xtask e2e`, scenarios `x86-ovmf-switch`,
//!   `x86-seabios-switch` with 2 × 128 GiB, `x86-native-hotplug-switch`): each device lands
//!   inside the window its placeholder left, under SeaBIOS and OVMF, with ACPI and
//!   native PCIe hotplug. `qmp-hotplug` removes the placeholder (journaled, with a
//!   deadline) before it plugs the device. It is a policy option
//!   ([`PlanOptions::switch_placeholders`]); without it, a plan that needs more than the
//!   firmware's minimum below a downstream port is an error, not a silent failure in the
//!   guest. The 32-bit window needs a 32-bit non-prefetchable BAR of the right size: on
//!   x86 a `qxl` function (its RAM BAR follows `ram_size_mb`; it also takes 4 KiB of I/O
//!   space) joins the placeholder. An option ROM does not work for this: OVMF maps no ROM
//!   BAR of a device it has no driver for, so the window stays at 2 MiB. Where no such
//!   device exists (aarch64), a profile with large 32-bit BARs below a switch is an error.
//! - **I/O** windows are reserved only for what needs I/O ports: only about 16 ports can
//!   have one.
//! - **Functions without a PCI Express capability** (`ivshmem-plain`, a conventional host
//!   function under `vfio-pci`) go on root ports and downstream ports like any other:
//!   QEMU accepts them there, Linux drives them, and the port's reservation holds their
//!   BARs. A `pcie-pci-bridge` is planned only for a device that asks for a conventional
//!   bus ([`Attach::PciBridge`], or [`PlanOptions::conventional_behind_bridge`] for every
//!   conventional device). In QEMU 7.2 that bridge has no `*-reserve` properties (devices
//!   are hotplugged into its slots through its SHPC controller); `pci-bridge` has them
//!   and SHPC too, but on q35 it sits behind a `pcie-pci-bridge`, and no plan uses it.
//!   Firmware sizes the bridge's windows from the devices present at boot and gives an
//!   empty one only its minimum (SeaBIOS, OVMF, AAVMF: 2 MiB of memory and 4 KiB of I/O,
//!   AAVMF no prefetchable window; Linux without firmware: nothing). A plan whose
//!   hotplugged devices behind the bridge need more is [`PlanError::BridgeWindow`].
//!
//! # Example
//!
//! ```
//! use arch_x86_aarch64::Q35;
//! use pcie_topology::{plan, HotplugProfile, Mode, PlanRequest, SpareRequest};
//!
//! let request = PlanRequest::default()
//!     .with_mode(Mode::RootPort)
//!     .with_spares(vec![SpareRequest::new(HotplugProfile::h100(), 2)]);
//! let plan = plan(&Q35::seabios(), &request)?;
//! assert_eq!(plan.ports.len(), 2);
//! println!("{}", plan.qemu_args().join(" "));
//! # Ok::<(), pcie_topology::PlanError>(())
//! ```

#![forbid(unsafe_code)]

mod alloc;
mod check;
pub mod error;
pub mod foreign;
mod format;
pub mod kata;
pub mod path;
pub mod physbits;
pub mod plan;
mod planner;
pub mod platform;
pub mod qemu;
pub mod request;
mod reserve;
mod sim;
pub mod units;

pub use error::{AddressSpaceError, AllocError, PlanError};
pub use foreign::{Foreign, ForeignDevice, MemoryHotplug};
pub use format::{PLAN_VERSION, PLAN_VERSION_OLDEST};
pub use path::GuestPciPath;
pub use plan::{
    ExpanderBuses, FunctionAction, HotplugAction, Mode, Placeholder, PlaceholderRemoval, Plan, PlanOptions,
    PlanRequest, Port, PortKind, SpareRequest,
};
pub use planner::plan;
pub use platform::{Addressing, Platform, PlatformSpec, WindowRule};
pub use qemu::{DevFn, QemuDevice, QemuId, QemuObject};
pub use request::{
    Attach, DeviceRequest, FunctionRequest, FunctionResource, HostRef, HotplugProfile, ResourceRole,
};
pub use reserve::WindowReservation;
pub use sim::{bars_fit, PlacedWindow};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

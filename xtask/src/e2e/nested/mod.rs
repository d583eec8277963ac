//! The `nested-vfio` scenarios: the real kernel VFIO stack end to end, without hardware.
//!
//! An outer q35 guest (software emulation, `kernel-irqchip=split`,
//! `intel-iommu,intremap=on,caching-mode=on,aw-bits=39`, `intel_iommu=on`) gets the scenario's
//! emulated devices on root ports: `ivshmem-plain` with a large 64-bit prefetchable BAR,
//! `nvme` with SR-IOV, `e1000e`, a multi-function `e1000e`. Its initramfs carries the VFIO
//! modules of the guest kernel package, QEMU with its libraries and firmware
//! ([`bundle`]), the kernel again for the inner guest, and the project's program
//! `nested-vfio` ([`program`]). That program, inside the outer guest:
//!
//! 1. binds every function to `vfio-pci` (`driver_override`), reads it through sysfs and
//!    through VFIO (iommufd where the kernel has it, else the legacy container: region
//!    info and the config region) and checks that both agree on every BAR, the ROM and
//!    the capability lists; judges each IOMMU group ([`passthrough`]);
//! 2. plans the inner VM with `pcie-topology` (q35, SeaBIOS) from those facts, boots it
//!    (TCG inside TCG, the harness's [`guest_harness::guest::Guest`] and reporter) and hotplugs
//!    `vfio-pci` devices through `qmp-hotplug`'s engine onto the planned ports: `query-pci`
//!    must show each function where planned with the host's BAR sizes, the inner guest must
//!    show it there with every BAR assigned inside the port's window ([`inner_vm`]);
//! 3. unplugs each (with the inner guest's CPUs stopped where the scenario asks: pending at
//!    the deadline, completed by the late `DEVICE_DELETED` after `cont`), and plugs a
//!    multi-function group again with function 0 failing on purpose: the engine must roll
//!    back and leave nothing in `qom-list`, `query-pci` or the inner guest.
//!
//! It prints one result line per finding ([`wire`]); the host side ([`outer`]) turns them
//! into rows of the e2e table.

pub mod bundle;
pub mod inner_vm;
pub mod outer;
pub mod passthrough;
pub mod program;
pub mod wire;

pub use outer::run;

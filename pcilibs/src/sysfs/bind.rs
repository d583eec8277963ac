//! Binding functions to `vfio-pci` and creating SR-IOV VFs, each with one deadline.
//!
//! Both write sysfs attributes the way an operator would with `echo` (see
//! [`files::write_attribute`](super::files)) and then wait for the kernel to show the
//! result: a probe runs asynchronously after `drivers_probe`, and device nodes appear
//! when udev or devtmpfs makes them. Every wait polls until one deadline computed when
//! the call starts; past it the call fails with [`SysfsError::Timeout`], naming what it
//! last saw.

use std::time::{Duration, Instant};

use super::files::write_attribute;
use super::{Result, Sysfs, SysfsError};
use crate::bdf::Bdf;

/// The driver [`Sysfs::bind_vfio`] binds.
const VFIO_PCI: &str = "vfio-pci";
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `ready` until it gives a value or `timeout` (counted from `started`) has passed;
/// `None` then.
fn wait_for<T>(
    started: Instant,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    loop {
        if let Some(v) = ready()? {
            return Ok(Some(v));
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        std::thread::sleep(POLL.min(left));
    }
}

impl Sysfs {
    /// Binds `bdf` to `vfio-pci` and waits, for at most `timeout`, until it is bound and
    /// its VFIO node exists (`/dev/vfio/<group>`, or its `/dev/vfio/devices/vfio<N>` on a
    /// kernel with only the iommufd interface). Returns its IOMMU group.
    ///
    /// A function on another driver is unbound from it first (`driver/unbind`); then
    /// `driver_override` names `vfio-pci` and `drivers_probe` asks the kernel to probe it,
    /// so no other function of that vendor and device ID is taken along (as `new_id` would).
    /// A function already on `vfio-pci` is left as it is. Errors: the function does not
    /// exist ([`SysfsError::NoDevice`]), has no IOMMU group ([`SysfsError::NoIommuGroup`]),
    /// a write is refused ([`SysfsError::Write`]), or the deadline passes
    /// ([`SysfsError::Timeout`]).
    ///
    /// This changes the host: the function leaves its driver (a NIC goes down, a disk
    /// goes away). Only call it for functions meant for a guest.
    pub fn bind_vfio(&self, bdf: Bdf, timeout: Duration) -> Result<u32> {
        let started = Instant::now();
        let dev = self.device(bdf);
        if !dev.path().exists() {
            return Err(SysfsError::NoDevice { path: dev.path().to_path_buf() });
        }
        let group =
            dev.iommu_group()?.ok_or_else(|| SysfsError::NoIommuGroup { path: dev.path().to_path_buf() })?;
        let driver = dev.driver()?;
        if driver.as_deref() != Some(VFIO_PCI) {
            if driver.is_some() {
                write_attribute(&dev.path().join("driver/unbind"), &bdf.to_string())?;
            }
            write_attribute(&dev.path().join("driver_override"), VFIO_PCI)?;
            write_attribute(&self.root.join("bus/pci/drivers_probe"), &bdf.to_string())?;
        }
        let node = self.vfio_group_node(group);
        let bound = wait_for(started, timeout, || {
            let ready = dev.driver()?.as_deref() == Some(VFIO_PCI)
                && (node.exists() || self.vfio_cdev(bdf)?.is_some());
            Ok(ready.then_some(()))
        })?;
        if bound.is_some() {
            return Ok(group);
        }
        Err(SysfsError::Timeout {
            bdf,
            waiting_for: "binding to vfio-pci",
            waited: timeout,
            state: format!(
                "driver {:?}, {} {}",
                dev.driver()?,
                node.display(),
                if node.exists() { "exists" } else { "missing" }
            ),
        })
    }

    /// Creates `count` SR-IOV VFs of `pf` through its host driver `driver` and returns
    /// them in VF order, waiting at most `timeout` in all: for `pf` to be bound to
    /// `driver` (which must implement `sriov_configure`, as `nvme` does; it may still be
    /// probing) and for the VFs to be listed. The VFs are left without a driver
    /// (`sriov_drivers_autoprobe` is turned off first), ready for [`Sysfs::bind_vfio`].
    pub fn create_vfs(&self, pf: Bdf, driver: &str, count: u16, timeout: Duration) -> Result<Vec<Bdf>> {
        let started = Instant::now();
        let dev = self.device(pf);
        if !dev.path().exists() {
            return Err(SysfsError::NoDevice { path: dev.path().to_path_buf() });
        }
        let on_driver =
            wait_for(started, timeout, || Ok((dev.driver()?.as_deref() == Some(driver)).then_some(())))?;
        if on_driver.is_none() {
            return Err(SysfsError::Timeout {
                bdf: pf,
                waiting_for: "the physical function's driver",
                waited: timeout,
                state: format!("driver {:?}, expected {driver}", dev.driver()?),
            });
        }
        write_attribute(&dev.path().join("sriov_drivers_autoprobe"), "0")?;
        write_attribute(&dev.path().join("sriov_numvfs"), &count.to_string())?;
        let want = usize::from(count);
        let vfs = wait_for(started, timeout, || {
            let vfs = dev.virtual_functions()?;
            Ok((vfs.len() == want).then_some(vfs))
        })?;
        match vfs {
            Some(vfs) => Ok(vfs),
            None => Err(SysfsError::Timeout {
                bdf: pf,
                waiting_for: "the VFs",
                waited: timeout,
                state: format!("asked for {count} VFs, sysfs lists {}", names(&dev.virtual_functions()?)),
            }),
        }
    }
}

/// `[0000:01:00.1 0000:01:00.2]`.
fn names(list: &[Bdf]) -> String {
    let names: Vec<String> = list.iter().map(ToString::to_string).collect();
    format!("[{}]", names.join(" "))
}

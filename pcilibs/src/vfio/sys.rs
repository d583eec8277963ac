//! The only `unsafe` code of the crate: VFIO ioctls.
//!
//! Each function issues one ioctl on a file this module's caller owns, with an argument
//! that lives on the caller's stack for the duration of the call.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_bind_iommufd, vfio_device_info, vfio_group_status, vfio_region_info, VFIO_BASE, VFIO_TYPE,
};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: VFIO ioctls carry no size or direction bits.
const fn vfio_io(nr: u32) -> u64 {
    // Architectures whose `_IOC_NONE` is 1 and direction field starts at bit 29.
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64"
    ))]
    const NONE: u64 = 1 << 29;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64"
    )))]
    const NONE: u64 = 0;
    NONE | ((VFIO_TYPE as u64) << 8) | (VFIO_BASE + nr) as u64
}

const GET_API_VERSION: u64 = vfio_io(0);
const CHECK_EXTENSION: u64 = vfio_io(1);
const SET_IOMMU: u64 = vfio_io(2);
const GROUP_GET_STATUS: u64 = vfio_io(3);
const GROUP_SET_CONTAINER: u64 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const DEVICE_GET_INFO: u64 = vfio_io(7);
const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const DEVICE_BIND_IOMMUFD: u64 = vfio_io(18);

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `VFIO_GET_API_VERSION` on a container.
pub(super) fn api_version(container: &File) -> io::Result<i32> {
    // SAFETY: the request takes no argument; the fd is valid while `container` lives.
    check(unsafe { libc::ioctl(container.as_raw_fd(), GET_API_VERSION as _) })
}

/// `VFIO_CHECK_EXTENSION` on a container.
pub(super) fn check_extension(container: &File, extension: u32) -> io::Result<bool> {
    // SAFETY: the argument is an integer passed by value; the fd is valid.
    check(unsafe { libc::ioctl(container.as_raw_fd(), CHECK_EXTENSION as _, extension as libc::c_ulong) })
        .map(|r| r > 0)
}

/// `VFIO_SET_IOMMU` on a container.
pub(super) fn set_iommu(container: &File, iommu_type: u32) -> io::Result<()> {
    // SAFETY: the argument is an integer passed by value; the fd is valid.
    check(unsafe { libc::ioctl(container.as_raw_fd(), SET_IOMMU as _, iommu_type as libc::c_ulong) })
        .map(drop)
}

/// `VFIO_GROUP_GET_STATUS`; returns the flags.
pub(super) fn group_status(group: &File) -> io::Result<u32> {
    let mut st = vfio_group_status { argsz: size_of::<vfio_group_status>() as u32, flags: 0 };
    // SAFETY: `st` is a valid, writable vfio_group_status with argsz set, alive for the call.
    check(unsafe {
        libc::ioctl(group.as_raw_fd(), GROUP_GET_STATUS as _, &mut st as *mut vfio_group_status)
    })?;
    Ok(st.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`.
pub(super) fn group_set_container(group: &File, container: &File) -> io::Result<()> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int through the pointer, which points at `fd` on our stack.
    check(unsafe { libc::ioctl(group.as_raw_fd(), GROUP_SET_CONTAINER as _, &fd as *const libc::c_int) })
        .map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD`; `name` is the device's address, NUL-terminated here.
pub(super) fn group_get_device(group: &File, name: &str) -> io::Result<File> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the kernel reads a NUL-terminated string through the pointer, valid for the call.
    let fd = check(unsafe { libc::ioctl(group.as_raw_fd(), GROUP_GET_DEVICE_FD as _, c.as_ptr()) })?;
    // SAFETY: on success the ioctl returned a new file descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `VFIO_DEVICE_BIND_IOMMUFD` (cdev path).
pub(super) fn bind_iommufd(device: &File, iommufd: &File) -> io::Result<u32> {
    let mut bind = vfio_device_bind_iommufd {
        // Only the fields up to out_devid: accepted by every kernel with the cdev interface.
        argsz: 16,
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: `bind` is valid and writable for the call; argsz covers only fields that exist.
    check(unsafe {
        libc::ioctl(device.as_raw_fd(), DEVICE_BIND_IOMMUFD as _, &mut bind as *mut vfio_device_bind_iommufd)
    })?;
    Ok(bind.out_devid)
}

/// `VFIO_DEVICE_GET_INFO`: (flags, regions, irqs).
pub(super) fn device_info(device: &File) -> io::Result<(u32, u32, u32)> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        flags: 0,
        num_regions: 0,
        num_irqs: 0,
        cap_offset: 0,
        pad: 0,
    };
    // SAFETY: `info` is valid and writable for the call, argsz set to its size.
    check(unsafe {
        libc::ioctl(device.as_raw_fd(), DEVICE_GET_INFO as _, &mut info as *mut vfio_device_info)
    })?;
    Ok((info.flags, info.num_regions, info.num_irqs))
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index`: (flags, size, offset).
pub(super) fn region_info(device: &File, index: u32) -> io::Result<(u32, u64, u64)> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        flags: 0,
        index,
        cap_offset: 0,
        size: 0,
        offset: 0,
    };
    // SAFETY: `info` is valid and writable for the call, argsz set to its size.
    check(unsafe {
        libc::ioctl(device.as_raw_fd(), DEVICE_GET_REGION_INFO as _, &mut info as *mut vfio_region_info)
    })?;
    Ok((info.flags, info.size, info.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The same requests declared with vmm-sys-util's `_IO` (rust-vmm's encoding per
    // architecture, as `vfio-ioctls` declares them), independently of `vfio_io` above.
    vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
    vmm_sys_util::ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
    vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
    vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, VFIO_BASE + 6);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE as u32, VFIO_BASE + 18);

    /// Every request number this module builds, with its name in `<linux/vfio.h>`.
    fn ours() -> [(&'static str, u64); 9] {
        [
            ("VFIO_GET_API_VERSION", GET_API_VERSION),
            ("VFIO_CHECK_EXTENSION", CHECK_EXTENSION),
            ("VFIO_SET_IOMMU", SET_IOMMU),
            ("VFIO_GROUP_GET_STATUS", GROUP_GET_STATUS),
            ("VFIO_GROUP_SET_CONTAINER", GROUP_SET_CONTAINER),
            ("VFIO_GROUP_GET_DEVICE_FD", GROUP_GET_DEVICE_FD),
            ("VFIO_DEVICE_GET_INFO", DEVICE_GET_INFO),
            ("VFIO_DEVICE_GET_REGION_INFO", DEVICE_GET_REGION_INFO),
            ("VFIO_DEVICE_BIND_IOMMUFD", DEVICE_BIND_IOMMUFD),
        ]
    }

    #[test]
    // `c_ulong` is `u64` here but `u32` on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    fn ioctl_numbers_equal_vmm_sys_util_encoding() {
        let theirs = [
            VFIO_GET_API_VERSION(),
            VFIO_CHECK_EXTENSION(),
            VFIO_SET_IOMMU(),
            VFIO_GROUP_GET_STATUS(),
            VFIO_GROUP_SET_CONTAINER(),
            VFIO_GROUP_GET_DEVICE_FD(),
            VFIO_DEVICE_GET_INFO(),
            VFIO_DEVICE_GET_REGION_INFO(),
            VFIO_DEVICE_BIND_IOMMUFD(),
        ];
        for ((name, ours), theirs) in ours().into_iter().zip(theirs) {
            assert_eq!(ours, u64::from(theirs), "{name}");
        }
    }

    /// The values of the kernel's own macros where `_IOC_NONE` is 0 (x86, arm64, s390x,
    /// riscv): printed by a C program built against `<linux/vfio.h>` of linux-libc-dev
    /// 6.1.187 (`printf("%#lx", VFIO_GET_API_VERSION)` …), and for
    /// `VFIO_DEVICE_BIND_IOMMUFD` (new in 6.6) `_IO(';', 100 + 18)` as 6.6's header defines it.
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "s390x",
        target_arch = "riscv64"
    ))]
    #[test]
    fn ioctl_numbers_equal_the_c_headers_values() {
        let kernel = [0x3b64, 0x3b65, 0x3b66, 0x3b67, 0x3b68, 0x3b6a, 0x3b6b, 0x3b6c, 0x3b76];
        for ((name, ours), want) in ours().into_iter().zip(kernel) {
            assert_eq!(ours, want, "{name}: {ours:#x}, <linux/vfio.h> {want:#x}");
        }
    }
}

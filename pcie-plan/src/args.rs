//! The command line: what to plan, for which machine, and how to print it.

use std::path::PathBuf;

use arch_s390x_ccw::S390xCcw;
use arch_x86_aarch64::{Virt, Q35};
use clap::{Parser, ValueEnum};
use pcie_topology::units::parse_size;
use pcie_topology::{HotplugProfile, Mode, Platform, QemuId, SpareRequest};
use pcilibs::bdf::Bdf;

const EXAMPLES: &str = "\
Examples:
  pcie-plan --ivshmem gpu0:128G --spare h100:2
  pcie-plan --platform q35-ovmf --mode switch-port --ivshmem gpu0:128G@g0 --spare h100:1@g0
  pcie-plan --host 0000:01:00.0+0000:01:00.1 --spare a100 --json > plan.json
  pcie-plan --lspci-dump gpu.txt --host 01:00.0 --bar-size 01:00.0:0=16M --bar-size 01:00.0:1=128G
  pcie-plan --platform s390x --ccw net0 --ivshmem shm0:1G";

/// Plans a QEMU guest's PCIe topology so that devices hotplugged later really fit: ports,
/// bus numbers and window reservations that hold the devices' BARs wherever the firmware
/// places the windows. Prints why each reservation has its size, the QEMU arguments and the
/// hotplug actions, or the plan file (--json).
#[derive(Debug, Parser)]
#[command(name = "pcie-plan", version, after_help = EXAMPLES)]
pub(crate) struct Args {
    /// Machine and firmware.
    #[arg(long, value_enum, default_value_t = PlatformName::Q35Seabios)]
    pub(crate) platform: PlatformName,
    /// Firmware image for q35-ovmf (OVMF.fd) or virt-uefi (AAVMF_CODE.fd), where it is not
    /// at Debian's path.
    #[arg(long, value_name = "PATH")]
    pub(crate) firmware: Option<String>,
    /// Placement policy: one root port per device, peer-to-peer groups behind a switch, or
    /// one pxb-pcie expander per NUMA node.
    #[arg(long, value_enum, default_value_t = ModeName::RootPort)]
    pub(crate) mode: ModeName,
    /// Host functions of one device, passed through with vfio-pci: a device's functions or
    /// an IOMMU group's members joined with '+', '@GROUP' for a peer-to-peer group. Repeat
    /// for more devices.
    #[arg(long, value_name = "BDF[+BDF...][@GROUP]", value_parser = parse_host)]
    pub(crate) host: Vec<HostArg>,
    /// Where sysfs is (a captured tree instead of the host's).
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    pub(crate) sysfs_root: PathBuf,
    /// Read the --host functions from this `lspci -xxx` dump instead of sysfs. A dump has
    /// no BAR sizes: give each with --bar-size.
    #[arg(long, value_name = "FILE")]
    pub(crate) lspci_dump: Option<PathBuf>,
    /// The size of BAR INDEX of a dump function (ROM: 6), e.g. 01:00.0:1=128G.
    #[arg(long, value_name = "BDF:INDEX=SIZE", value_parser = parse_bar_size)]
    pub(crate) bar_size: Vec<BarSizeArg>,
    /// A GPU stand-in: an ivshmem-plain device with one 64-bit prefetchable BAR of SIZE
    /// (backed by no host memory), '@GROUP' for a peer-to-peer group.
    #[arg(long, value_name = "ID:SIZE[@GROUP]", value_parser = parse_ivshmem)]
    pub(crate) ivshmem: Vec<IvshmemArg>,
    /// A channel device (s390x only), virtio-net-ccw unless DRIVER says otherwise.
    #[arg(long, value_name = "ID[:DRIVER]", value_parser = parse_ccw)]
    pub(crate) ccw: Vec<CcwArg>,
    /// Spare ports for later hotplug: PROFILE is h100, a100, nvswitch, nic or a list of
    /// SIZE:KIND (KIND mem32, pref32, mem64, pref64 or io) joined with ','; COUNT ports
    /// (1 unless given), '@GROUP' on that peer-to-peer group's switch.
    #[arg(long, value_name = "PROFILE[:COUNT][@GROUP]", value_parser = parse_spare)]
    pub(crate) spare: Vec<SpareRequest>,
    /// Plug the devices at boot instead of hotplugging them later.
    #[arg(long)]
    pub(crate) cold: bool,
    /// Guest RAM (decides how much RAM lies above 4 GiB, where the 64-bit windows go).
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = parse_size_arg)]
    pub(crate) ram: u64,
    /// Guest CPU physical address bits, when fixed.
    #[arg(long, value_name = "BITS")]
    pub(crate) phys_bits: Option<u8>,
    /// Check the plan against this host's physical address width (KVM, else /proc/cpuinfo).
    #[arg(long)]
    pub(crate) check_host: bool,
    /// Pack root ports 8 per slot as functions of one device.
    #[arg(long)]
    pub(crate) pack: bool,
    /// Reserve nothing: the machine's default windows (shows what fails without a plan).
    #[arg(long)]
    pub(crate) no_reservations: bool,
    /// Print the plan file (JSON) instead of the explanation.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the plan file here.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
}

/// The machines `pcie-topology` has platforms for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PlatformName {
    /// x86_64 q35 with SeaBIOS.
    Q35Seabios,
    /// x86_64 q35 with OVMF (UEFI).
    Q35Ovmf,
    /// aarch64 virt booted without firmware (the guest kernel assigns the windows).
    Virt,
    /// aarch64 virt with AAVMF (UEFI).
    VirtUefi,
    /// s390x s390-ccw-virtio: zPCI functions and channel devices, no ports.
    S390x,
}

impl PlatformName {
    /// The platform, with `firmware` as its image where it boots one.
    pub(crate) fn platform(self, firmware: Option<&str>) -> Result<Box<dyn Platform>, String> {
        Ok(match (self, firmware) {
            (PlatformName::Q35Ovmf, Some(path)) => Box::new(Q35::ovmf_at(path)),
            (PlatformName::Q35Ovmf, None) => Box::new(Q35::ovmf()),
            (PlatformName::VirtUefi, Some(path)) => Box::new(Virt::uefi_at(path)),
            (PlatformName::VirtUefi, None) => Box::new(Virt::uefi()),
            (other, Some(_)) => {
                let name = other.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
                return Err(format!(
                    "--firmware is for q35-ovmf and virt-uefi; platform {name} boots no firmware image (drop --firmware, or choose one of those)"
                ));
            }
            (PlatformName::Q35Seabios, None) => Box::new(Q35::seabios()),
            (PlatformName::Virt, None) => Box::new(Virt::direct_kernel()),
            (PlatformName::S390x, None) => Box::new(S390xCcw::default()),
        })
    }
}

/// Placement policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ModeName {
    /// One root port per device.
    RootPort,
    /// Devices of one peer-to-peer group behind one switch, the others on root ports.
    SwitchPort,
    /// One pxb-pcie expander per NUMA node, devices on their node's.
    Numa,
}

impl From<ModeName> for Mode {
    fn from(m: ModeName) -> Mode {
        match m {
            ModeName::RootPort => Mode::RootPort,
            ModeName::SwitchPort => Mode::SwitchPort,
            ModeName::Numa => Mode::Numa,
        }
    }
}

/// `--host`: the functions of one guest device.
#[derive(Debug, Clone)]
pub(crate) struct HostArg {
    pub(crate) functions: Vec<Bdf>,
    pub(crate) group: Option<String>,
}

/// `--bar-size`: one BAR size of a dump function.
#[derive(Debug, Clone)]
pub(crate) struct BarSizeArg {
    pub(crate) bdf: Bdf,
    pub(crate) index: u8,
    pub(crate) size: u64,
}

/// `--ivshmem`: a GPU stand-in.
#[derive(Debug, Clone)]
pub(crate) struct IvshmemArg {
    pub(crate) id: QemuId,
    pub(crate) size: u64,
    pub(crate) group: Option<String>,
}

/// `--ccw`: a channel device.
#[derive(Debug, Clone)]
pub(crate) struct CcwArg {
    pub(crate) id: QemuId,
    pub(crate) driver: String,
}

/// `TEXT@GROUP` as (TEXT, GROUP).
fn split_group(text: &str) -> (&str, Option<String>) {
    match text.split_once('@') {
        Some((a, g)) => (a, Some(g.to_string())),
        None => (text, None),
    }
}

/// A PCI address in the full (`0000:01:00.0`) or short (`01:00.0`) form.
fn parse_bdf(text: &str) -> Result<Bdf, String> {
    Bdf::parse_any(text).map_err(|e| format!("{e} (write it as 0000:01:00.0 or 01:00.0)"))
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| format!("{e} (write a size like 4K, 16M, 128G or a number of bytes)"))
}

fn parse_host(text: &str) -> Result<HostArg, String> {
    let (list, group) = split_group(text);
    let functions = list.split('+').map(parse_bdf).collect::<Result<Vec<_>, _>>()?;
    Ok(HostArg { functions, group })
}

fn parse_bar_size(text: &str) -> Result<BarSizeArg, String> {
    let bad = || format!("`{text}`: expected BDF:INDEX=SIZE, e.g. 01:00.0:1=128G");
    let (who, size) = text.split_once('=').ok_or_else(bad)?;
    let (bdf, index) = who.rsplit_once(':').ok_or_else(bad)?;
    let index: u8 = index
        .parse()
        .ok()
        .filter(|i| *i <= 6)
        .ok_or_else(|| format!("`{index}`: a BAR index is 0 to 5, or 6 for the ROM"))?;
    Ok(BarSizeArg { bdf: parse_bdf(bdf)?, index, size: parse_size_arg(size)? })
}

fn parse_id(text: &str) -> Result<QemuId, String> {
    QemuId::new(text).map_err(|e| e.to_string())
}

fn parse_ivshmem(text: &str) -> Result<IvshmemArg, String> {
    let (rest, group) = split_group(text);
    let (id, size) =
        rest.split_once(':').ok_or_else(|| format!("`{text}`: expected ID:SIZE[@GROUP], e.g. gpu0:128G"))?;
    Ok(IvshmemArg { id: parse_id(id)?, size: parse_size_arg(size)?, group })
}

fn parse_ccw(text: &str) -> Result<CcwArg, String> {
    let (id, driver) = text.split_once(':').unwrap_or((text, "virtio-net-ccw"));
    Ok(CcwArg { id: parse_id(id)?, driver: driver.to_string() })
}

fn parse_spare(text: &str) -> Result<SpareRequest, String> {
    let (rest, group) = split_group(text);
    let (profile, count) = match rest.rsplit_once(':') {
        Some((p, c)) if !c.is_empty() && c.chars().all(|c| c.is_ascii_digit()) => {
            (p, c.parse().map_err(|_| format!("`{c}`: too many spare ports"))?)
        }
        _ => (rest, 1),
    };
    let profile = HotplugProfile::parse(profile).map_err(|e| e.to_string())?;
    let spare = SpareRequest::new(profile, count);
    Ok(match group {
        Some(g) => spare.with_p2p_group(g),
        None => spare,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_read_as_they_are_documented() {
        let h = parse_host("0000:01:00.0+01:00.1@g0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.functions.len(), 2);
        assert_eq!(h.group.as_deref(), Some("g0"));
        let b = parse_bar_size("01:00.0:1=128G").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((b.index, b.size), (1, 128 << 30));
        assert!(parse_bar_size("01:00.0:7=1M").is_err());
        assert!(parse_bar_size("01:00.0=1M").is_err());
        let s = parse_spare("16M:mem32,64G:pref64:3@g1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.count, s.p2p_group.as_deref()), (3, Some("g1")));
        assert_eq!(parse_spare("h100").map(|s| s.count), Ok(1));
        assert!(parse_spare("h200").is_err());
        assert_eq!(parse_ccw("blk0:virtio-blk-ccw").map(|c| c.driver), Ok("virtio-blk-ccw".into()));
        assert!(parse_ivshmem("gpu0").is_err());
        assert!(parse_ivshmem("0gpu:1G").is_err());
    }
}

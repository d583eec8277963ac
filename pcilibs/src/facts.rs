//! Per-function facts a topology planner consumes, and the address-space requirement of a
//! set of functions.
//!
//! [`FunctionFacts`] is plain data (serde-serializable): ids, class, header type, PCI
//! Express port type, BARs with sizes, ROM size, SR-IOV and Resizable BAR facts, and the
//! host's IOMMU group, NUMA node and driver when it came from sysfs. Build it from
//! configuration-space bytes ([`FunctionFacts::from_config`]: sizes then come only from
//! the [`BarSizes`] you pass, if any) or from a sysfs device directory
//! (`crate::sysfs::Sysfs::facts`, with `std`).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::bar::{Bar, BarKind, BarRegisters};
use crate::bdf::Bdf;
use crate::caps::pcie::PortType;
use crate::config::{ClassCode, ConfigError, HeaderType};
use crate::decode::Function;
use crate::requirement::{Requirement, RequirementError, Resource};
use crate::sizing::{BarSizes, SizeSource};

/// Errors building facts or computing a requirement from them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FactsError {
    /// The configuration space header does not decode.
    #[error("{bdf}: {source}")]
    Config {
        /// The function.
        bdf: Bdf,
        /// Why.
        source: ConfigError,
    },
    /// A BAR the requirement needs has no known size.
    #[error("{bdf}: size of {} {index} is unknown", if *.vf { "VF BAR" } else { "BAR" })]
    SizeUnknown {
        /// The function.
        bdf: Bdf,
        /// BAR slot.
        index: u8,
        /// Whether it is an SR-IOV VF BAR.
        vf: bool,
    },
    /// The requirement arithmetic failed.
    #[error(transparent)]
    Requirement(#[from] RequirementError),
}

/// Result alias of this module.
pub type Result<T> = core::result::Result<T, FactsError>;

/// SR-IOV facts of a physical function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SriovFacts {
    /// TotalVFs: the most VFs the PF supports.
    pub total_vfs: u16,
    /// NumVFs: VFs currently configured.
    pub num_vfs: u16,
    /// InitialVFs.
    pub initial_vfs: u16,
    /// Routing-ID offset of the first VF.
    pub first_vf_offset: u16,
    /// Routing-ID stride between VFs.
    pub vf_stride: u16,
    /// Device ID of the VFs.
    pub vf_device_id: u16,
    /// VF BARs; `size` is per VF (all VFs together need `size × VFs`).
    pub vf_bars: Vec<Bar>,
}

impl SriovFacts {
    /// A physical function's SR-IOV facts with no VF enabled yet (`num_vfs` 0,
    /// `initial_vfs` = `total_vfs`); `vf_bars` sizes are per VF.
    pub fn new(
        total_vfs: u16,
        first_vf_offset: u16,
        vf_stride: u16,
        vf_device_id: u16,
        vf_bars: Vec<Bar>,
    ) -> Self {
        SriovFacts {
            total_vfs,
            num_vfs: 0,
            initial_vfs: total_vfs,
            first_vf_offset,
            vf_stride,
            vf_device_id,
            vf_bars,
        }
    }
}

/// Resizable BAR facts of one BAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RebarFacts {
    /// BAR index.
    pub bar: u8,
    /// Supported sizes in bytes, smallest first.
    pub supported_sizes: Vec<u64>,
    /// Current size in bytes.
    pub current_size: u64,
}

impl RebarFacts {
    /// BAR `bar` of `current_size` bytes, resizable to each of `supported_sizes` (smallest
    /// first).
    pub fn new(bar: u8, supported_sizes: Vec<u64>, current_size: u64) -> Self {
        RebarFacts { bar, supported_sizes, current_size }
    }
}

/// What a function needs and is, as far as planning a guest topology goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionFacts {
    /// Host address of the function.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID (from the header, or a bridge's subsystem capability).
    pub subsystem_vendor_id: Option<u16>,
    /// Subsystem ID.
    pub subsystem_id: Option<u16>,
    /// Revision ID.
    pub revision: u8,
    /// Class code `0xBBSSPP`.
    pub class_code: u32,
    /// Header layout.
    pub header_type: HeaderType,
    /// The device has several functions.
    pub multifunction: bool,
    /// The function has a PCI Express capability.
    pub is_pcie: bool,
    /// PCI Express device/port type.
    pub port_type: Option<PortType>,
    /// BARs; `size` is `None` when no size source was available.
    pub bars: Vec<Bar>,
    /// Expansion ROM size, when known and implemented.
    pub rom_size: Option<u64>,
    /// SR-IOV facts of a physical function.
    pub sriov: Option<SriovFacts>,
    /// Resizable BAR facts, one per resizable BAR.
    pub rebar: Vec<RebarFacts>,
    /// Host IOMMU group.
    pub iommu_group: Option<u32>,
    /// Host NUMA node.
    pub numa_node: Option<u32>,
    /// Host driver bound to the function.
    pub driver: Option<String>,
    /// Source of the sizes in `bars`, `rom_size` and `sriov.vf_bars`.
    pub size_source: Option<SizeSource>,
    /// Problems found while decoding (broken capability lists, bad BARs, …).
    pub problems: Vec<String>,
}

/// Which resources [`FunctionFacts::resources`] lists: none of the optional ones by
/// default; `ResourceOptions::default().with_rom(true)` or [`ResourceOptions::all`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResourceOptions {
    /// Include the expansion ROM (non-prefetchable window).
    pub include_rom: bool,
    /// Include the SR-IOV VF BAR apertures for TotalVFs VFs.
    pub include_sriov_vfs: bool,
    /// Size each resizable BAR at its largest supported size (when larger than now).
    pub rebar_max: bool,
}

impl ResourceOptions {
    /// Every optional resource: the ROM, the SR-IOV VF apertures, resizable BARs at their
    /// largest size.
    pub const fn all() -> Self {
        ResourceOptions { include_rom: true, include_sriov_vfs: true, rebar_max: true }
    }

    /// These options with [`ResourceOptions::include_rom`] set to `yes`.
    pub const fn with_rom(self, yes: bool) -> Self {
        ResourceOptions { include_rom: yes, ..self }
    }

    /// These options with [`ResourceOptions::include_sriov_vfs`] set to `yes`.
    pub const fn with_sriov_vfs(self, yes: bool) -> Self {
        ResourceOptions { include_sriov_vfs: yes, ..self }
    }

    /// These options with [`ResourceOptions::rebar_max`] set to `yes`.
    pub const fn with_rebar_max(self, yes: bool) -> Self {
        ResourceOptions { rebar_max: yes, ..self }
    }
}

impl FunctionFacts {
    /// Facts of a conventional type 0 function with these ids and nothing else known: no
    /// BARs, capabilities or host facts. For facts a caller describes itself (a planned
    /// device, a test); fill in the public fields that apply.
    pub fn new(bdf: Bdf, vendor_id: u16, device_id: u16, class_code: u32) -> FunctionFacts {
        FunctionFacts {
            bdf,
            vendor_id,
            device_id,
            subsystem_vendor_id: None,
            subsystem_id: None,
            revision: 0,
            class_code,
            header_type: HeaderType::Normal,
            multifunction: false,
            is_pcie: false,
            port_type: None,
            bars: Vec::new(),
            rom_size: None,
            sriov: None,
            rebar: Vec::new(),
            iommu_group: None,
            numa_node: None,
            driver: None,
            size_source: None,
            problems: Vec::new(),
        }
    }

    /// Facts from decoded configuration space plus optional sizes.
    ///
    /// With `sizes`, a BAR is listed when the source gives it a size. Without, a BAR is
    /// listed when its register is neither all zeros nor all ones (what `lspci` does with a
    /// dump), with an unknown size.
    pub fn from_function(bdf: Bdf, f: &Function, sizes: Option<&BarSizes>) -> FunctionFacts {
        let h = &f.header;
        let (subsystem_vendor_id, subsystem_id) = match (h.subsystem_vendor_id, h.subsystem_id) {
            (Some(v), Some(d)) => (Some(v), Some(d)),
            _ => f
                .find_capability(|c| match c {
                    crate::caps::Capability::SubsystemId { vendor_id, device_id } => {
                        Some((Some(*vendor_id), Some(*device_id)))
                    }
                    _ => None,
                })
                .unwrap_or((None, None)),
        };
        let sriov = f.sriov().map(|s| SriovFacts {
            total_vfs: s.total_vfs,
            num_vfs: s.num_vfs,
            initial_vfs: s.initial_vfs,
            first_vf_offset: s.first_vf_offset,
            vf_stride: s.vf_stride,
            vf_device_id: s.vf_device_id,
            vf_bars: bars_with_sizes(&s.vf_bars, sizes.and_then(|z| z.vf_bars.as_ref())),
        });
        let rebar = f
            .rebar()
            .map(|r| {
                r.entries
                    .iter()
                    .map(|e| RebarFacts {
                        bar: e.bar,
                        supported_sizes: e.sizes().collect(),
                        current_size: e.current_size,
                    })
                    .collect()
            })
            .unwrap_or_default();
        FunctionFacts {
            bdf,
            vendor_id: h.vendor_id,
            device_id: h.device_id,
            subsystem_vendor_id,
            subsystem_id,
            revision: h.revision,
            class_code: h.class.as_u32(),
            header_type: h.header_type,
            multifunction: h.multifunction,
            is_pcie: f.is_pcie(),
            port_type: f.pcie().map(|p| p.port_type),
            bars: bars_with_sizes(&f.bars, sizes.map(|z| &z.bars)),
            rom_size: sizes.and_then(|z| z.rom),
            sriov,
            rebar,
            iommu_group: None,
            numa_node: None,
            driver: None,
            size_source: sizes.map(|z| z.source),
            problems: f.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Facts from configuration-space bytes (a dump, a VFIO config region, …).
    pub fn from_config(bdf: Bdf, bytes: &[u8], sizes: Option<&BarSizes>) -> Result<FunctionFacts> {
        let f = Function::decode(bytes).map_err(|source| FactsError::Config { bdf, source })?;
        Ok(Self::from_function(bdf, &f, sizes))
    }

    /// The class code as a [`ClassCode`].
    pub fn class(&self) -> ClassCode {
        ClassCode::from_u32(self.class_code)
    }

    /// The address-space resources this function needs under `opts`; BARs of unknown size
    /// are left out (see [`FunctionFacts::unknown_sizes`] and [`requirement_of`], which
    /// refuses them). An SR-IOV VF BAR aperture (per-VF size × TotalVFs) that does not
    /// fit 64 bits is [`RequirementError::Overflow`], not left out.
    pub fn resources(&self, opts: &ResourceOptions) -> Result<Vec<Resource>> {
        let mut out = Vec::with_capacity(self.bars.len() + 1);
        for b in &self.bars {
            let Some(size) = b.size else { continue };
            let size = if opts.rebar_max { self.rebar_max(b).map_or(size, |m| m.max(size)) } else { size };
            out.push(Resource::bar(b.kind, b.prefetchable, size));
        }
        if opts.include_rom {
            if let Some(size) = self.rom_size {
                out.push(Resource { rom: true, ..Resource::bar(BarKind::Mem32, false, size) });
            }
        }
        if opts.include_sriov_vfs {
            if let Some(s) = self.sriov.as_ref().filter(|s| s.total_vfs > 0) {
                for b in &s.vf_bars {
                    let Some(size) = b.size else { continue };
                    let total = size.checked_mul(u64::from(s.total_vfs)).ok_or(RequirementError::Overflow)?;
                    out.push(Resource {
                        kind: b.kind,
                        prefetchable: b.prefetchable,
                        rom: false,
                        size: total,
                        align: size,
                    });
                }
            }
        }
        Ok(out)
    }

    /// BARs (and, with `include_sriov_vfs`, VF BARs) that `opts` needs but whose size is
    /// unknown, as `(index, is_vf_bar)`.
    pub fn unknown_sizes(&self, opts: &ResourceOptions) -> Vec<(u8, bool)> {
        let mut out: Vec<(u8, bool)> =
            self.bars.iter().filter(|b| b.size.is_none()).map(|b| (b.index, false)).collect();
        if opts.include_sriov_vfs {
            if let Some(s) = self.sriov.as_ref().filter(|s| s.total_vfs > 0) {
                out.extend(s.vf_bars.iter().filter(|b| b.size.is_none()).map(|b| (b.index, true)));
            }
        }
        out
    }

    /// The requirement of this function alone.
    pub fn requirement(&self, opts: &ResourceOptions) -> Result<Requirement> {
        requirement_of(core::iter::once(self), opts)
    }

    fn rebar_max(&self, b: &Bar) -> Option<u64> {
        if b.kind == BarKind::Io {
            return None;
        }
        self.rebar.iter().find(|r| r.bar == b.index).and_then(|r| r.supported_sizes.iter().copied().max())
    }
}

/// Whether a member of an IOMMU group is handed to a guest together with the others.
///
/// Only what `vfio-pci` cannot take is left out: functions with a bridge header (type 1
/// or 2) and the bridge classes host bridge (0x0600), PCI-to-PCI bridge (0x0604) and
/// semi-transparent PCI-to-PCI bridge (0x0609). Every other class stays, in particular
/// "other bridge" (0x0680), which NVIDIA NVSwitch functions use: dropping those breaks
/// multi-GPU guests.
pub fn is_passthrough_companion(f: &FunctionFacts) -> bool {
    f.header_type == HeaderType::Normal
        && !matches!(
            f.class().class_and_sub(),
            ClassCode::HOST_BRIDGE | ClassCode::PCI_BRIDGE | ClassCode::SEMI_TRANSPARENT_BRIDGE
        )
}

/// The members of a group (see [`is_passthrough_companion`]) that go to the guest, in the
/// order given.
pub fn passthrough_functions(group: &[FunctionFacts]) -> Vec<&FunctionFacts> {
    group.iter().filter(|f| is_passthrough_companion(f)).collect()
}

fn bars_with_sizes(regs: &BarRegisters, sizes: Option<&[Option<u64>; 6]>) -> Vec<Bar> {
    regs.bars
        .iter()
        .filter_map(|r| match sizes {
            Some(s) => {
                let size = s.get(usize::from(r.index)).copied().flatten().filter(|&v| v > 0)?;
                Some(r.with_size(Some(size)))
            }
            None => (!r.looks_unused()).then(|| r.with_size(None)),
        })
        .collect()
}

/// The requirement of a set of functions (an IOMMU group, or everything behind one port),
/// per the rule in [`crate::requirement`].
///
/// Fails with [`FactsError::SizeUnknown`] when a needed BAR has no known size: a
/// requirement that silently left a BAR out would under-reserve.
pub fn requirement_of<'a, I>(functions: I, opts: &ResourceOptions) -> Result<Requirement>
where
    I: IntoIterator<Item = &'a FunctionFacts>,
{
    let mut all = Vec::new();
    for f in functions {
        if let Some(&(index, vf)) = f.unknown_sizes(opts).first() {
            return Err(FactsError::SizeUnknown { bdf: f.bdf, index, vf });
        }
        all.extend(f.resources(opts)?);
    }
    Ok(Requirement::of(&all)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const MIB: u64 = 1 << 20;

    fn gpu() -> FunctionFacts {
        FunctionFacts {
            bdf: Bdf::parse("0000:3b:00.0").unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2330,
            subsystem_vendor_id: None,
            subsystem_id: None,
            revision: 0xa1,
            class_code: 0x030200,
            header_type: HeaderType::Normal,
            multifunction: false,
            is_pcie: true,
            port_type: Some(PortType::Endpoint),
            bars: alloc::vec![
                Bar { index: 0, kind: BarKind::Mem32, prefetchable: false, size: Some(16 * MIB) },
                Bar { index: 1, kind: BarKind::Mem64, prefetchable: true, size: Some(256 * MIB) },
            ],
            rom_size: Some(512 << 10),
            sriov: Some(SriovFacts {
                total_vfs: 4,
                num_vfs: 0,
                initial_vfs: 4,
                first_vf_offset: 4,
                vf_stride: 1,
                vf_device_id: 0x2331,
                vf_bars: alloc::vec![Bar {
                    index: 0,
                    kind: BarKind::Mem64,
                    prefetchable: true,
                    size: Some(32 * MIB)
                }],
            }),
            rebar: alloc::vec![RebarFacts {
                bar: 1,
                supported_sizes: alloc::vec![256 * MIB, 1 << 30, 8 << 30],
                current_size: 256 * MIB
            }],
            iommu_group: Some(7),
            numa_node: None,
            driver: None,
            size_source: Some(SizeSource::Sysfs),
            problems: Vec::new(),
        }
    }

    #[test]
    fn options_select_resources() {
        let g = gpu();
        let plain = g.resources(&ResourceOptions::default()).unwrap();
        assert_eq!(plain.len(), 2);
        let all = ResourceOptions { include_rom: true, include_sriov_vfs: true, rebar_max: true };
        let r = g.requirement(&all).unwrap();
        assert_eq!(r.mem.size, 17 * MIB);
        assert_eq!(r.pref.size, (8 << 30) + 128 * MIB);
        assert_eq!(r.pref.align, 8 << 30);
    }

    /// A VF BAR of 2^63 bytes times 4 VFs does not fit 64 bits: an error, where the
    /// aperture used to be left out of the requirement without a word.
    #[test]
    fn a_vf_aperture_beyond_64_bits_is_refused() {
        let mut g = gpu();
        g.sriov.as_mut().unwrap().vf_bars[0].size = Some(1 << 63);
        let opts = ResourceOptions { include_sriov_vfs: true, ..ResourceOptions::default() };
        assert_eq!(g.resources(&opts), Err(FactsError::Requirement(RequirementError::Overflow)));
        assert_eq!(g.requirement(&opts), Err(FactsError::Requirement(RequirementError::Overflow)));
        assert!(g.requirement(&ResourceOptions::default()).is_ok());
    }

    #[test]
    fn unknown_size_is_refused() {
        let mut g = gpu();
        g.bars[1].size = None;
        let err = requirement_of([&g], &ResourceOptions::default()).unwrap_err();
        assert!(matches!(err, FactsError::SizeUnknown { index: 1, vf: false, .. }));
        assert_eq!(err.to_string(), "0000:3b:00.0: size of BAR 1 is unknown");
    }

    #[test]
    fn companions_keep_nvswitch_and_drop_bridges() {
        let gpu = gpu();
        let nvswitch = FunctionFacts { class_code: 0x068000, ..gpu.clone() };
        let audio = FunctionFacts { class_code: 0x040300, ..gpu.clone() };
        let bridge = FunctionFacts { class_code: 0x060400, header_type: HeaderType::Bridge, ..gpu.clone() };
        let host = FunctionFacts { class_code: 0x060000, ..gpu.clone() };
        let group = [gpu, bridge, nvswitch, host, audio];
        let kept: Vec<u32> = passthrough_functions(&group).iter().map(|f| f.class_code).collect();
        assert_eq!(kept, [0x030200, 0x068000, 0x040300]);
    }

    #[test]
    fn serde_round_trip() {
        let g = gpu();
        let text = serde_json::to_string(&g).unwrap();
        assert!(text.contains("\"bdf\":\"0000:3b:00.0\""));
        assert!(text.contains("\"kind\":\"mem64\""));
        assert_eq!(serde_json::from_str::<FunctionFacts>(&text).unwrap(), g);
    }
}

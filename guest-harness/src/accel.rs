//! Which accelerator guests run on: software emulation (TCG) unless KVM is known to work.
//!
//! KVM can exist and still hang a Linux guest (nested virtualisation), so "known to work"
//! means: a probe guest booted with KVM reached READY within [`PROBE_TIMEOUT`]. The verdict
//! is cached per host kernel, QEMU version and guest kernel, so the probe runs once per
//! stack.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::arch::Arch;
use crate::guest::{Guest, GuestAssets, GuestError, GuestSpec};

/// The accelerator a guest runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Accel {
    /// Software emulation.
    Tcg,
    /// Hardware virtualisation.
    Kvm,
}

impl Accel {
    /// QEMU's name (`-accel tcg|kvm`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// What a guest spec asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AccelChoice {
    /// KVM when the probe found it working for this architecture, else TCG.
    #[default]
    Auto,
    /// Always TCG.
    Tcg,
    /// Always KVM.
    Kvm,
}

/// How long the probe guest may take to reach READY under KVM.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The probe's verdict.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvmVerdict {
    /// What the verdict is valid for: host kernel, QEMU version, guest kernel.
    pub key: String,
    /// Whether a KVM guest reached READY in time.
    pub usable: bool,
    /// Why not, or how long the boot took.
    pub detail: String,
}

static VERDICT: Mutex<Option<KvmVerdict>> = Mutex::new(None);

fn verdict_file(assets: &GuestAssets) -> PathBuf {
    assets.state_dir.join("kvm-probe.json")
}

fn host_key(assets: &GuestAssets) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("host {} / QEMU {} / guest {}", release.trim(), assets.versions.qemu, assets.kernel.release)
}

/// The accelerator for a guest of `arch` that asked for `choice`, booting `assets`.
pub fn resolve(choice: AccelChoice, arch: Arch, assets: &GuestAssets) -> Result<Accel, GuestError> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => Ok(Accel::Kvm),
        AccelChoice::Auto if Arch::host() != Some(arch) => Ok(Accel::Tcg),
        AccelChoice::Auto => {
            let verdict = kvm_verdict(assets);
            Ok(if verdict.usable { Accel::Kvm } else { Accel::Tcg })
        }
    }
}

/// Whether KVM works for guests of the host architecture with `assets`' QEMU and kernel:
/// remembered, cached, or probed now.
pub fn kvm_verdict(assets: &GuestAssets) -> KvmVerdict {
    let mut memo = VERDICT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = host_key(assets);
    if let Some(v) = memo.as_ref().filter(|v| v.key == key || v.key.is_empty()) {
        return v.clone();
    }
    let verdict = if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        KvmVerdict { key: String::new(), usable: false, detail: "/dev/kvm cannot be opened".into() }
    } else {
        let file = verdict_file(assets);
        let cached = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<KvmVerdict>(&b).ok())
            .filter(|v| v.key == key);
        match cached {
            Some(v) => v,
            None => {
                let v = probe(assets, key);
                if let Ok(json) = serde_json::to_vec_pretty(&v) {
                    let _ = std::fs::create_dir_all(&assets.state_dir);
                    let _ = std::fs::write(&file, json);
                }
                v
            }
        }
    };
    eprintln!(
        "accel: {} ({})",
        if verdict.usable { "KVM" } else { "TCG (software emulation)" },
        verdict.detail
    );
    *memo = Some(verdict.clone());
    verdict
}

fn probe(assets: &GuestAssets, key: String) -> KvmVerdict {
    eprintln!("accel: probing KVM (a guest must reach READY within {} s)", PROBE_TIMEOUT.as_secs());
    let mut spec = GuestSpec::new(assets.kernel.arch);
    spec.name = "kvm-probe".into();
    spec.accel = AccelChoice::Kvm;
    spec.boot_timeout = PROBE_TIMEOUT;
    spec.progress = false;
    match Guest::start(&spec, assets, Accel::Kvm).and_then(|g| {
        g.wait_for("READY under KVM", std::time::Instant::now() + PROBE_TIMEOUT, |s| s.ready.is_some())?;
        Ok(g.boot_time())
    }) {
        Ok(took) => KvmVerdict {
            key,
            usable: true,
            detail: format!("probe guest ready in {:.1} s", took.unwrap_or_default().as_secs_f64()),
        },
        Err(GuestError::Timeout { .. }) => KvmVerdict {
            key,
            usable: false,
            detail: format!(
                "a KVM guest did not reach READY within {} s (probed once, cached)",
                PROBE_TIMEOUT.as_secs()
            ),
        },
        Err(e) => KvmVerdict {
            key,
            usable: false,
            detail: format!("KVM probe failed: {}", first_line(&e.to_string())),
        },
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

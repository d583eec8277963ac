//! Which accelerator guests run on: software emulation (TCG) unless KVM is known to work.
//!
//! KVM can exist and still hang a Linux guest (nested virtualisation), so "known to work"
//! means: a probe guest booted with KVM reached READY within [`PROBE_TIMEOUT`]. The verdict
//! is cached per host kernel, QEMU version and guest kernel, so the probe runs once per
//! stack. Booting the probe guest is the caller's (the guest module hands in a closure):
//! this module keeps the verdict and knows nothing of guests.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::arch::Arch;

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

/// How a probe guest booted under KVM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeOutcome {
    /// It reached READY after this long.
    Ready(Duration),
    /// It did not reach READY within [`PROBE_TIMEOUT`].
    TimedOut,
    /// It failed otherwise (QEMU refused KVM, exited, ...): the error in words.
    Failed(String),
}

/// Where the verdict for one QEMU and guest kernel is kept: a file in `dir`, valid for the
/// host kernel, `qemu` and `guest_kernel`.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct VerdictStore<'a> {
    /// The folder of the cached verdict (the stack's folder).
    pub dir: &'a Path,
    /// QEMU's version.
    pub qemu: &'a str,
    /// The guest kernel's release.
    pub guest_kernel: &'a str,
}

impl<'a> VerdictStore<'a> {
    /// The verdict of `qemu` booting `guest_kernel`, kept in `dir`.
    pub fn new(dir: &'a Path, qemu: &'a str, guest_kernel: &'a str) -> Self {
        VerdictStore { dir, qemu, guest_kernel }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("kvm-probe.json")
    }

    fn key(&self) -> String {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        format!("host {} / QEMU {} / guest {}", release.trim(), self.qemu, self.guest_kernel)
    }
}

static VERDICT: Mutex<Option<KvmVerdict>> = Mutex::new(None);

/// The accelerator for a guest of `arch` that asked for `choice`. For
/// [`AccelChoice::Auto`] on the host's architecture that is KVM when [`kvm_verdict`] says
/// it works (`probe` boots the probe guest if no verdict is known yet).
pub fn resolve(
    choice: AccelChoice,
    arch: Arch,
    store: &VerdictStore<'_>,
    probe: impl FnOnce() -> ProbeOutcome,
) -> Accel {
    match choice {
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Auto if Arch::host() != Some(arch) => Accel::Tcg,
        AccelChoice::Auto => {
            if kvm_verdict(store, probe).usable {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    }
}

/// Whether KVM works for guests of the host architecture with `store`'s QEMU and kernel:
/// remembered, cached, or probed now with `probe`.
pub fn kvm_verdict(store: &VerdictStore<'_>, probe: impl FnOnce() -> ProbeOutcome) -> KvmVerdict {
    let mut memo = VERDICT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = store.key();
    if let Some(v) = memo.as_ref().filter(|v| v.key == key || v.key.is_empty()) {
        return v.clone();
    }
    let verdict = if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        KvmVerdict { key: String::new(), usable: false, detail: "/dev/kvm cannot be opened".into() }
    } else {
        let file = store.file();
        let cached = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<KvmVerdict>(&b).ok())
            .filter(|v| v.key == key);
        match cached {
            Some(v) => v,
            None => {
                eprintln!(
                    "accel: probing KVM (a guest must reach READY within {} s)",
                    PROBE_TIMEOUT.as_secs()
                );
                let v = verdict_of(probe(), key);
                if let Ok(json) = serde_json::to_vec_pretty(&v) {
                    let _ = std::fs::create_dir_all(store.dir);
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

/// The verdict for `key` after a probe ended with `outcome`.
fn verdict_of(outcome: ProbeOutcome, key: String) -> KvmVerdict {
    match outcome {
        ProbeOutcome::Ready(took) => KvmVerdict {
            key,
            usable: true,
            detail: format!("probe guest ready in {:.1} s", took.as_secs_f64()),
        },
        ProbeOutcome::TimedOut => KvmVerdict {
            key,
            usable: false,
            detail: format!(
                "a KVM guest did not reach READY within {} s (probed once, cached)",
                PROBE_TIMEOUT.as_secs()
            ),
        },
        ProbeOutcome::Failed(error) => {
            KvmVerdict { key, usable: false, detail: format!("KVM probe failed: {}", first_line(&error)) }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_say_why() {
        let ready = verdict_of(ProbeOutcome::Ready(Duration::from_millis(2500)), "k".into());
        assert!(ready.usable && ready.detail == "probe guest ready in 2.5 s", "{ready:?}");
        let slow = verdict_of(ProbeOutcome::TimedOut, "k".into());
        assert!(!slow.usable && slow.detail.contains("within 20 s"), "{slow:?}");
        let failed = verdict_of(ProbeOutcome::Failed("no KVM\nmore".into()), "k".into());
        assert_eq!(failed.detail, "KVM probe failed: no KVM");
        assert_eq!(failed.key, "k");
    }

    /// Guests of another architecture never probe; a fixed choice never probes either.
    #[test]
    fn only_auto_on_the_host_arch_probes() {
        let dir = tempfile::tempdir().unwrap();
        let store = VerdictStore::new(dir.path(), "q", "g");
        let never = || -> ProbeOutcome { panic!("probed") };
        let other = Arch::ALL.into_iter().find(|a| Arch::host() != Some(*a)).unwrap();
        assert_eq!(resolve(AccelChoice::Auto, other, &store, never), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Tcg, Arch::X86_64, &store, never), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Kvm, Arch::X86_64, &store, never), Accel::Kvm);
    }
}

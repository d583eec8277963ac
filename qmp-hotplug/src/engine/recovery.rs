//! Recovery after a restart (the table is in the module docs of [`super`]).

use std::collections::{BTreeMap, HashSet};

use pcie_topology::QemuId;

use crate::journal::{OpKind, PortLog, Record};
use crate::request::{PlugRequest, Prepared};
use crate::state::DeviceState;

use super::{lock, EngineError, Inner, Result};

/// What recovery did for one port.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryAction {
    /// The port.
    pub port: String,
    /// The device the journal recorded on it.
    pub device: QemuId,
    /// The state the journal recorded.
    pub before: DeviceState,
    /// The state after reconciliation.
    pub after: DeviceState,
    /// What was done, in words.
    pub action: String,
}

/// What [`super::Engine::open`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// One entry per port the journal knew about (removed ones excluded).
    pub actions: Vec<RecoveryAction>,
    /// What reading the journal found: its format, a torn tail cut off, damaged records
    /// skipped.
    pub journal: crate::journal::ReadReport,
}

impl RecoveryReport {
    /// True when the journal recorded an operation that was still under way.
    pub fn had_interrupted(&self) -> bool {
        self.actions.iter().any(|a| a.action != "unchanged")
    }
}

pub(super) fn recover(inner: &Inner, logs: &BTreeMap<String, PortLog>) -> Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let mut present = inner.peripheral_ids()?;
    present.extend(inner.qom_children("/objects")?);
    for (port, log) in logs {
        let before = log.device.state;
        if before == DeviceState::Removed && log.open_op.is_none() {
            continue;
        }
        let port_lock = inner.port_lock(port);
        let _g = lock(&port_lock);
        let action = reconcile(inner, log, &present)?;
        let after = lock(&inner.table).devices.get(port).map_or(DeviceState::Removed, |d| d.state);
        let device = log.device.device().clone();
        report.actions.push(RecoveryAction { port: port.clone(), device, before, after, action });
    }
    Ok(report)
}

fn reconcile(inner: &Inner, log: &PortLog, present: &HashSet<String>) -> Result<String> {
    let mut request = log.device.request.clone();
    let prepared = request.prepare()?;
    let port = request.port.to_string();
    // Functions present, and whether all are; a placeholder still present also keeps an
    // unplug-pending port taken.
    let here = request.functions.iter().filter(|f| present.contains(f.id().as_str())).count();
    let all_here = here == request.functions.len();
    let nothing_left = request.device_ids().all(|id| !present.contains(id.as_str()));
    let begin = |inner: &Inner| -> Result<()> {
        inner.record(&Record::Begin { port: port.clone(), op: OpKind::Recover, request: None })
    };
    match (log.open_op, log.device.state) {
        (Some(OpKind::Plug), _) if !log.device.failed_since_plan() => {
            begin(inner)?;
            // Descriptors only when a device is still to be added (one the dead process
            // held is gone: the plug is then rolled back).
            let fds = if super::missing_device(&request, present) {
                super::open_fds(&mut request)
            } else {
                Ok(Vec::new())
            };
            let result =
                fds.and_then(|fds| inner.add_all(&request, &prepared, present, &fds)).and_then(|()| {
                    inner.await_visible(&request, crate::deadline::after(inner.options.visible_timeout))
                });
            match inner.settle_plug(&request, &prepared, result) {
                Ok(_) => {
                    Ok(format!("finished plug ({} of {} devices were there)", here, request.functions.len()))
                }
                Err(EngineError::PlugFailed { cause, state, .. }) => {
                    Ok(format!("plug could not be finished ({cause}); rolled back to {state:?}"))
                }
                Err(e) => Err(e),
            }
        }
        (Some(_), _) | (None, DeviceState::Failed) => {
            begin(inner)?;
            let rolling_back = log.open_op == Some(OpKind::Plug) || log.device.state == DeviceState::Failed;
            let state = continue_removal(inner, &request, &prepared)?;
            let what = if rolling_back { "rollback" } else { "unplug" };
            Ok(format!("finished {what}: {state:?}"))
        }
        (None, DeviceState::UnplugPending) if nothing_left => {
            begin(inner)?;
            inner.complete_removal(&request)?;
            Ok("pending unplug had completed; released".into())
        }
        (None, DeviceState::Visible | DeviceState::Added) if here == 0 => {
            begin(inner)?;
            inner.transition(&port, DeviceState::Removing, "device gone from QEMU", Vec::new())?;
            inner.complete_removal(&request)?;
            Ok("device had vanished from QEMU; released".into())
        }
        (None, DeviceState::Visible | DeviceState::Added) if !all_here => {
            begin(inner)?;
            inner.transition(&port, DeviceState::Failed, "some functions vanished from QEMU", Vec::new())?;
            let state = continue_removal(inner, &request, &prepared)?;
            Ok(format!("partial device rolled back: {state:?}"))
        }
        _ => Ok("unchanged".into()),
    }
}

/// Drives an interrupted unplug or rollback to `removed` or `unplug-pending`.
fn continue_removal(inner: &Inner, request: &PlugRequest, prepared: &Prepared) -> Result<DeviceState> {
    let port = request.port.as_str();
    inner.transition(port, DeviceState::Removing, "recovery", Vec::new())?;
    match inner.remove_devices(request, prepared)? {
        super::Removal::Gone => {
            inner.complete_removal(request)?;
            Ok(DeviceState::Removed)
        }
        super::Removal::Pending => {
            inner.transition(
                port,
                DeviceState::UnplugPending,
                "recovery: waiting for the guest",
                Vec::new(),
            )?;
            inner.try_complete_locked(request)
        }
    }
}

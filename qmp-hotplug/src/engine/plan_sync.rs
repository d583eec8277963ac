//! Keeping a plan's idea of a taken port in step with the engine's.
//!
//! A runtime places a device in its plan ([`Plan::place`]) and then plugs it; the plan
//! and the engine each record that the port is taken. They drift apart when a plug fails
//! (the engine rolls back and frees the port, the plan still has the device), when an
//! unplug is pending (the engine keeps the port until the guest lets go; a runtime that
//! released the device from the plan would hand the port out again), or across a restart
//! (the plan read back from a file older or newer than the journal). [`Engine::reconcile_plan`]
//! makes them agree, taking the engine, which has asked QEMU, as the truth: afterwards a
//! port of the plan is taken exactly when the engine holds a device there or a device of
//! the plan was plugged at boot.

use pcie_topology::{Plan, QemuId};
use serde::Serialize;

use super::{Engine, Result};
use crate::state::{DeviceRecord, DeviceState};

/// What [`Engine::reconcile_plan`] changed in the plan, and what it left taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PlanSync {
    /// Devices placed at run time that the engine does not hold where the plan put them
    /// (a plug rolled back, an unplug finished, a plug that never reached the engine):
    /// released from the plan, their ports free in both.
    pub released: Vec<QemuId>,
    /// `(port, device)`: ports the engine holds that the plan had free (the plan read
    /// back from a file written before the device was placed): now held in the plan
    /// ([`Plan::hold`]).
    pub held: Vec<(QemuId, QemuId)>,
    /// Ports the plan held for a device ([`Plan::hold`]) that the engine no longer has:
    /// freed ([`Plan::unhold`]).
    pub unheld: Vec<QemuId>,
    /// Devices whose unplug the guest has not finished: their ports stay taken in both.
    pub pending: Vec<QemuId>,
    /// Pending unplugs that QEMU had finished while no event said so
    /// ([`Engine::complete_pending`]).
    pub completed: Vec<QemuId>,
}

impl PlanSync {
    /// True when the plan needed no change.
    pub fn unchanged(&self) -> bool {
        self.released.is_empty() && self.held.is_empty() && self.unheld.is_empty()
    }
}

impl Engine {
    /// Puts `plan` in step with the engine: call it after a failed plug, after an unplug
    /// (finished or pending) and after a restart (plan read back, engine opened on its
    /// journal), with no plug of this plan under way.
    ///
    /// First asks QEMU which pending unplugs are done ([`Engine::complete_pending`]).
    /// Then every device the plan placed at run time (not [`cold_plug`]) that the engine
    /// does not hold on the same port is released ([`Plan::release`]); a port the plan
    /// held for a device the engine no longer has is freed; a port the engine holds (a
    /// visible device, a pending unplug, an operation recovery left) that the plan has
    /// free is held for the engine's device ([`Plan::hold`]). A port the engine holds that
    /// the plan does not have, or gives to a device plugged at boot, is
    /// [`EngineError::Plan`](super::EngineError::Plan), with the changes before it made.
    ///
    /// [`cold_plug`]: pcie_topology::plan::PlacedDevice::cold_plug
    pub fn reconcile_plan(&self, plan: &mut Plan) -> Result<PlanSync> {
        let mut out = PlanSync { completed: self.complete_pending()?, ..PlanSync::default() };
        let held: Vec<DeviceRecord> = self.devices().into_iter().filter(|d| !d.state.port_free()).collect();
        let engine_holds =
            |port: &QemuId, device: &QemuId| held.iter().any(|r| r.port() == port && r.device() == device);

        // Placed at run time (on s390x the engine keys a device by its own id).
        let hot: Vec<(QemuId, QemuId)> = plan
            .devices
            .iter()
            .filter(|d| !d.cold_plug)
            .map(|d| (d.id.clone(), d.port.clone().unwrap_or_else(|| d.id.clone())))
            .collect();
        for (device, port) in hot {
            if !engine_holds(&port, &device) {
                plan.release(device.as_str())?;
                out.released.push(device);
            }
        }
        let holds: Vec<(QemuId, QemuId)> = plan
            .ports
            .iter()
            .filter_map(|p| p.occupant.as_ref().map(|o| (p.id.clone(), o.clone())))
            .filter(|(_, o)| plan.device(o.as_str()).is_none())
            .collect();
        for (port, device) in holds {
            if !engine_holds(&port, &device) {
                plan.unhold(port.as_str())?;
                out.unheld.push(port);
            }
        }
        for r in &held {
            if r.state == DeviceState::UnplugPending {
                out.pending.push(r.device().clone());
            }
            let (port, device) = (r.port(), r.device());
            let on_port = plan.port(port.as_str()).map(|p| p.occupant.as_ref());
            match on_port {
                Some(Some(o)) if o == device => {}
                // A port-less device the plan placed (s390x) is kept above.
                None if plan.device(device.as_str()).is_some() => {}
                _ => {
                    plan.hold(port.as_str(), device.clone())?;
                    out.held.push((port.clone(), device.clone()));
                }
            }
        }
        Ok(out)
    }
}

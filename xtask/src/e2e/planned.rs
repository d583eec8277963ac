//! The runner of the planned modes (`root-port`, `switch-port`, `ccw`): plan, boot with
//! the plan's ports, hotplug and unplug every device through `qmp-hotplug`, check in the
//! guest what the plan promised.

use super::{RunContext, ScenarioReport};
use crate::scenario::Scenario;

/// Runs one planned-mode scenario.
pub fn run(scenario: &Scenario, _ctx: &RunContext) -> ScenarioReport {
    let mut report = ScenarioReport::new(scenario);
    report.error = Some("the planned-mode runner is not wired yet".into());
    report
}

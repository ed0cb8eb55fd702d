//! Recovery: the sweep that sends again what may have been lost — commands
//! published long ago whose answer never came (a dead broker, a process
//! that died between writing a transition and publishing it).

use super::{HistoryEvent, StepStatus, Transition};
use crate::event::Phase;
use crate::time::Timestamp;

impl Transition<'_> {
    /// Republishes in-flight commands last published at or before `before`.
    pub(super) fn redispatch(&mut self, before: Timestamp) -> bool {
        let mut changed = false;
        for slot in self.all_slots() {
            let now = self.now;
            let (phase, attempt, deadline) = match &mut self.slot_mut(slot).status {
                StepStatus::Running {
                    attempt,
                    dispatched_at,
                    deadline,
                } if *dispatched_at <= before => {
                    *dispatched_at = now;
                    (Phase::Forward, *attempt, *deadline)
                }
                StepStatus::Compensating {
                    attempt,
                    dispatched_at,
                    deadline,
                } if *dispatched_at <= before => {
                    *dispatched_at = now;
                    (Phase::Compensate, *attempt, *deadline)
                }
                _ => continue,
            };
            self.record_slot(slot, attempt, HistoryEvent::Redispatched { phase });
            changed = true;
            if let Some(action) = self.send(slot, phase, attempt, deadline) {
                self.actions.push(action);
            }
        }
        changed
    }
}

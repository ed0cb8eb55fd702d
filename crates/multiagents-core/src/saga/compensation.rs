//! Undoing: cancellation, deadlines, the order compensations run in, their
//! retries and how the workflow ends.

use super::tasks::accepts_success;
use super::{
    Action, Failure, HistoryEvent, Slot, StatusUpdate, StepStatus, Transition, WorkflowStatus,
};
use crate::event::{Phase, StepError};
use crate::time::format_duration;
use crate::workflow::{RetryPolicy, StepDefinition, StepKind};

impl Transition<'_> {
    /// Cancellation: stop starting steps and undo what completed.
    pub(super) fn cancel(&mut self, reason: String) -> bool {
        if self.state.status != WorkflowStatus::Running {
            return false;
        }
        self.record(
            None,
            0,
            HistoryEvent::CancelRequested {
                reason: reason.clone(),
            },
        );
        self.state.failure = Some(Failure::Cancelled { reason });
        true
    }

    /// A completed workflow undoes itself (its parent step is compensated).
    pub(super) fn undo(&mut self, reason: String, parent_attempt: u32) -> bool {
        if self.state.status != WorkflowStatus::Completed {
            return false;
        }
        if let Some(parent) = &mut self.state.parent {
            parent.attempt = parent_attempt;
        }
        self.record(
            None,
            0,
            HistoryEvent::UndoRequested {
                reason: reason.clone(),
            },
        );
        self.state.failure = Some(Failure::Undone { reason });
        self.state.finished_at = None;
        self.state.status = WorkflowStatus::Compensating;
        true
    }

    /// Enters the compensating phase: steps that have not started will not,
    /// waits end, and steps in flight are told to stop.
    pub(super) fn begin_compensation(&mut self) {
        self.state.status = WorkflowStatus::Compensating;
        let reason = match &self.state.failure {
            Some(Failure::Cancelled { reason }) => format!("the workflow was cancelled: {reason}"),
            Some(Failure::DeadlineExceeded { .. }) => "the workflow's deadline passed".into(),
            Some(Failure::StepFailed { step, .. }) => format!("step `{step}` failed for good"),
            Some(Failure::Undone { reason }) => reason.clone(),
            None => String::new(),
        };
        for slot in self.all_slots() {
            let def = &self.def.steps()[slot.step];
            match self.slot(slot).status {
                StepStatus::Pending
                | StepStatus::RetryWaiting { .. }
                | StepStatus::Waiting { .. } => {
                    let attempt = self.slot(slot).attempts;
                    self.slot_mut(slot).status = StepStatus::Cancelled;
                    if attempt > 0 {
                        self.record_slot(slot, attempt, HistoryEvent::Cancelled);
                    }
                }
                StepStatus::Running { attempt, .. } => match &def.kind {
                    StepKind::Workflow(_) => {
                        let transaction_id = self.child_id(slot.step, attempt);
                        self.actions.push(Action::CancelChild {
                            transaction_id,
                            reason: reason.clone(),
                        });
                    }
                    _ => {
                        let step = self.slot(slot).name.clone();
                        let worker = def.worker().cloned().unwrap_or_else(|| "".into());
                        self.actions.push(Action::Interrupt {
                            step,
                            attempt,
                            worker,
                        });
                    }
                },
                _ => {}
            }
        }
    }

    /// True when nothing of this step or branch is in flight and it is
    /// undone or needs no undoing.
    fn own_settled(&self, slot: Slot) -> bool {
        match self.slot(slot).status {
            StepStatus::Pending
            | StepStatus::Cancelled
            | StepStatus::Failed
            | StepStatus::Skipped
            | StepStatus::Branching
            | StepStatus::Compensated
            | StepStatus::CompensationFailed => true,
            // A fan-out's branches are undone, not the fan-out itself.
            StepStatus::Completed => {
                (slot.item.is_none() && self.def.steps()[slot.step].for_each.is_some())
                    || !self.compensable(slot.step)
            }
            StepStatus::Running { .. }
            | StepStatus::RetryWaiting { .. }
            | StepStatus::Waiting { .. }
            | StepStatus::Compensating { .. }
            | StepStatus::CompensationRetryWaiting { .. } => false,
        }
    }

    /// True when step `i` needs no more work for the compensation to be
    /// complete: nothing of it (or of its branches) is in flight, it is
    /// undone or needs no undoing, and the same holds for every step after it.
    fn settled(&self, i: usize, memo: &mut [Option<bool>]) -> bool {
        if let Some(known) = memo[i] {
            return known;
        }
        let own = self.slots(i).all(|s| self.own_settled(s));
        let result = own
            && self
                .def
                .dependents(i)
                .iter()
                .all(|&d| self.settled(d, memo));
        memo[i] = Some(result);
        result
    }

    /// Dispatches every compensation whose later steps have settled, and ends
    /// the workflow when everything has.
    pub(super) fn compensate_ready_steps(&mut self) {
        let n = self.state.steps.len();
        let mut memo = vec![None; n];
        let mut ready = Vec::new();
        for i in 0..n {
            if !self.compensable(i) {
                continue;
            }
            let slots: Vec<Slot> = if self.def.steps()[i].for_each.is_none() {
                vec![Slot::step(i)]
            } else {
                self.slots(i).filter(|s| s.item.is_some()).collect()
            };
            let completed: Vec<Slot> = slots
                .into_iter()
                .filter(|&s| self.slot(s).status == StepStatus::Completed)
                .collect();
            if !completed.is_empty()
                && self
                    .def
                    .dependents(i)
                    .iter()
                    .all(|&d| self.settled(d, &mut memo))
            {
                ready.extend(completed);
            }
        }
        for slot in ready {
            self.dispatch_compensation(slot, 1);
        }
        let mut memo = vec![None; n];
        if (0..n).all(|i| self.settled(i, &mut memo)) {
            let slots = self.all_slots();
            let any = |s: StepStatus| slots.iter().any(|&x| self.slot(x).status == s);
            let status = if any(StepStatus::CompensationFailed) {
                WorkflowStatus::CompensationFailed
            } else {
                match self.state.failure {
                    Some(Failure::Cancelled { .. }) => WorkflowStatus::Cancelled,
                    Some(Failure::DeadlineExceeded { .. }) => WorkflowStatus::TimedOut,
                    Some(Failure::Undone { .. }) => WorkflowStatus::Compensated,
                    _ if any(StepStatus::Compensated) => WorkflowStatus::Compensated,
                    _ => WorkflowStatus::Failed,
                }
            };
            self.finish(status);
        }
    }

    pub(super) fn dispatch_compensation(&mut self, slot: Slot, attempt: u32) {
        let Some(timeout) = compensation_timeout(&self.def.steps()[slot.step]) else {
            return;
        };
        let deadline = self.now.plus(timeout);
        let now = self.now;
        let step = self.slot_mut(slot);
        step.status = StepStatus::Compensating {
            attempt,
            dispatched_at: now,
            deadline,
        };
        step.compensation_attempts = attempt;
        self.record_slot(slot, attempt, HistoryEvent::CompensationDispatched);
        if let Some(action) = self.send(slot, Phase::Compensate, attempt, deadline) {
            self.actions.push(action);
        }
    }

    pub(super) fn compensation_succeeded(&mut self, slot: Slot, attempt: u32) -> bool {
        if !accepts_success(&self.slot(slot).status, Phase::Compensate, attempt) {
            return false;
        }
        self.slot_mut(slot).status = StepStatus::Compensated;
        self.record_slot(slot, attempt, HistoryEvent::Compensated);
        let step = self.slot(slot).name.clone();
        self.actions
            .push(Action::Status(StatusUpdate::StepCompensated { step }));
        true
    }

    /// Fires a compensation's deadline or its due retry.
    pub(super) fn compensation_timer(&mut self, slot: Slot) -> bool {
        let now = self.now;
        match self.slot(slot).status {
            StepStatus::Compensating {
                attempt, deadline, ..
            } if deadline <= now => {
                let timeout =
                    compensation_timeout(&self.def.steps()[slot.step]).unwrap_or_default();
                let error = StepError::retryable(format!(
                    "compensation timed out after {}",
                    format_duration(timeout)
                ))
                .with_kind("timeout");
                self.compensation_failed(slot, attempt, error)
            }
            StepStatus::CompensationRetryWaiting { attempt, due } if due <= now => {
                self.dispatch_compensation(slot, attempt);
                true
            }
            _ => false,
        }
    }

    pub(super) fn compensation_failed(
        &mut self,
        slot: Slot,
        attempt: u32,
        error: StepError,
    ) -> bool {
        match self.slot(slot).status {
            StepStatus::Compensating {
                attempt: current, ..
            } if current == attempt => {}
            _ => return false,
        }
        let def = &self.def.steps()[slot.step];
        let child_policy;
        let policy = match (&def.kind, &def.compensation) {
            (StepKind::Workflow(_), _) => {
                child_policy = RetryPolicy::compensation_default();
                &child_policy
            }
            (_, Some(c)) => &c.retry,
            _ => return false,
        };
        let retry_at = policy.next_try(
            attempt,
            error.retry,
            self.now,
            self.retry_seed(slot, attempt),
        );
        let message = error.to_string();
        self.slot_mut(slot).last_error = Some(Box::new(error));
        match retry_at {
            Some(due) => {
                self.slot_mut(slot).status = StepStatus::CompensationRetryWaiting {
                    attempt: attempt + 1,
                    due,
                };
                self.record_slot(
                    slot,
                    attempt,
                    HistoryEvent::RetryScheduled {
                        phase: Phase::Compensate,
                        error: message,
                        at: due,
                    },
                );
            }
            None => {
                self.slot_mut(slot).status = StepStatus::CompensationFailed;
                self.record_slot(
                    slot,
                    attempt,
                    HistoryEvent::CompensationFailed {
                        error: message.clone(),
                    },
                );
                let step = self.slot(slot).name.clone();
                let reason = format!(
                    "compensation of step `{step}` failed for good after {attempt} attempt(s): {message}"
                );
                self.actions.push(Action::DeadLetter { step, reason });
            }
        }
        true
    }
}

/// How long one attempt of a step's undoing may take: its sub-workflow's
/// step timeout, or its compensation's; `None` when it has nothing to undo.
fn compensation_timeout(def: &StepDefinition) -> Option<std::time::Duration> {
    match (&def.kind, &def.compensation) {
        (StepKind::Workflow(_), _) => Some(def.timeout),
        (_, Some(c)) => Some(c.timeout),
        _ => None,
    }
}

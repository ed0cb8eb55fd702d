//! Undoing: cancellation, the order compensations run in, their retries and
//! how the workflow ends.

use super::{
    Action, Dispatch, Failure, HistoryEvent, StatusUpdate, StepStatus, Transition, WorkflowStatus,
};
use crate::event::{Phase, RetryDirective, StepError};
use crate::time::Timestamp;

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

    /// Enters the compensating phase: steps that have not started will not.
    pub(super) fn begin_compensation(&mut self) {
        self.state.status = WorkflowStatus::Compensating;
        for i in 0..self.state.steps.len() {
            if matches!(
                self.state.steps[i].status,
                StepStatus::Pending | StepStatus::RetryWaiting { .. }
            ) {
                let attempt = self.state.steps[i].attempts;
                self.state.steps[i].status = StepStatus::Cancelled;
                if attempt > 0 {
                    self.record(Some(i), attempt, HistoryEvent::Cancelled);
                }
            }
        }
    }

    /// True when step `i` needs no more work for the compensation to be
    /// complete: nothing of it is in flight, it is undone or needs no undoing,
    /// and the same holds for every step after it.
    fn settled(&self, i: usize, memo: &mut [Option<bool>]) -> bool {
        if let Some(known) = memo[i] {
            return known;
        }
        let own = match self.state.steps[i].status {
            StepStatus::Pending
            | StepStatus::Cancelled
            | StepStatus::Failed
            | StepStatus::Compensated
            | StepStatus::CompensationFailed => true,
            StepStatus::Completed => self.def.steps()[i].compensation.is_none(),
            StepStatus::Running { .. }
            | StepStatus::RetryWaiting { .. }
            | StepStatus::Compensating { .. }
            | StepStatus::CompensationRetryWaiting { .. } => false,
        };
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
            let compensable = self.state.steps[i].status == StepStatus::Completed
                && self.def.steps()[i].compensation.is_some();
            if compensable
                && self
                    .def
                    .dependents(i)
                    .iter()
                    .all(|&d| self.settled(d, &mut memo))
            {
                ready.push(i);
            }
        }
        for i in ready {
            self.dispatch_compensation(i, 1);
        }
        let mut memo = vec![None; n];
        if (0..n).all(|i| self.settled(i, &mut memo)) {
            let any = |s: StepStatus| self.state.steps.iter().any(|x| x.status == s);
            let status = if any(StepStatus::CompensationFailed) {
                WorkflowStatus::CompensationFailed
            } else if matches!(self.state.failure, Some(Failure::Cancelled { .. })) {
                WorkflowStatus::Cancelled
            } else if any(StepStatus::Compensated) {
                WorkflowStatus::Compensated
            } else {
                WorkflowStatus::Failed
            };
            self.finish(status);
        }
    }

    pub(super) fn dispatch_compensation(&mut self, i: usize, attempt: u32) {
        let Some(comp) = self.def.steps()[i].compensation.as_ref() else {
            return;
        };
        let deadline = self.now.plus(comp.timeout);
        let step = &mut self.state.steps[i];
        step.status = StepStatus::Compensating {
            attempt,
            dispatched_at: self.now,
            deadline,
        };
        step.compensation_attempts = attempt;
        let dispatch = Dispatch {
            step: self.def.steps()[i].name.clone(),
            phase: Phase::Compensate,
            worker: comp.worker.clone(),
            attempt,
            deadline,
            payload: self.payload_for(i),
        };
        self.record(Some(i), attempt, HistoryEvent::CompensationDispatched);
        self.actions.push(Action::Dispatch(dispatch));
    }

    pub(super) fn compensation_succeeded(&mut self, i: usize, attempt: u32) -> bool {
        let accepts = match self.state.steps[i].status {
            StepStatus::Compensating {
                attempt: current, ..
            } => attempt >= 1 && attempt <= current,
            StepStatus::CompensationRetryWaiting { attempt: next, .. } => {
                attempt >= 1 && attempt < next
            }
            _ => false,
        };
        if !accepts {
            return false;
        }
        self.state.steps[i].status = StepStatus::Compensated;
        self.record(Some(i), attempt, HistoryEvent::Compensated);
        let step = self.state.steps[i].name.clone();
        self.actions
            .push(Action::Status(StatusUpdate::StepCompensated { step }));
        true
    }

    pub(super) fn compensation_failed(&mut self, i: usize, attempt: u32, error: StepError) -> bool {
        match self.state.steps[i].status {
            StepStatus::Compensating {
                attempt: current, ..
            } if current == attempt => {}
            _ => return false,
        }
        let Some(policy) = self.def.steps()[i].compensation.as_ref().map(|c| &c.retry) else {
            return false;
        };
        let retry_at = match error.retry {
            _ if attempt >= policy.max_attempts => None,
            RetryDirective::Never => None,
            RetryDirective::Retry => Some(
                self.now
                    .plus(policy.delay_after(attempt, self.jitter_seed(i, attempt))),
            ),
            RetryDirective::RetryAfter(ms) => Some(Timestamp(self.now.0.saturating_add(ms))),
        };
        let message = error.to_string();
        self.state.steps[i].last_error = Some(error);
        match retry_at {
            Some(due) => {
                self.state.steps[i].status = StepStatus::CompensationRetryWaiting {
                    attempt: attempt + 1,
                    due,
                };
                self.record(
                    Some(i),
                    attempt,
                    HistoryEvent::RetryScheduled {
                        phase: Phase::Compensate,
                        error: message,
                        at: due,
                    },
                );
            }
            None => {
                self.state.steps[i].status = StepStatus::CompensationFailed;
                self.record(
                    Some(i),
                    attempt,
                    HistoryEvent::CompensationFailed {
                        error: message.clone(),
                    },
                );
                let step = self.state.steps[i].name.clone();
                let reason = format!(
                    "compensation of step `{step}` failed for good after {attempt} attempt(s): {message}"
                );
                self.actions.push(Action::DeadLetter { step, reason });
            }
        }
        true
    }
}

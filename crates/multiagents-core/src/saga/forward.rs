//! Running steps: dispatch, success, failure and retry, deadlines, recovery.

use super::{
    Action, Dispatch, Failure, HistoryEvent, StatusUpdate, StepStatus, Transition, WorkflowStatus,
};
use crate::event::{Phase, RetryDirective, StepError};
use crate::payload::Payload;
use crate::time::{Timestamp, format_duration};

impl Transition<'_> {
    /// Dispatches every pending step whose predecessors have all completed.
    pub(super) fn dispatch_ready_steps(&mut self) {
        for i in 0..self.state.steps.len() {
            if self.state.steps[i].status != StepStatus::Pending {
                continue;
            }
            let ready = self
                .def
                .dependencies(i)
                .iter()
                .all(|&d| self.state.steps[d].status == StepStatus::Completed);
            if ready {
                let attempt = self.state.steps[i].attempts + 1;
                self.dispatch_step(i, attempt);
            }
        }
    }

    pub(super) fn dispatch_step(&mut self, i: usize, attempt: u32) {
        let def = &self.def.steps()[i];
        let deadline = self.now.plus(def.timeout);
        let step = &mut self.state.steps[i];
        step.status = StepStatus::Running {
            attempt,
            dispatched_at: self.now,
            deadline,
        };
        step.attempts = attempt;
        let dispatch = Dispatch {
            step: def.name.clone(),
            phase: Phase::Forward,
            worker: def.worker.clone(),
            attempt,
            deadline,
            payload: self.payload_for(i),
        };
        self.record(Some(i), attempt, HistoryEvent::Dispatched);
        self.actions.push(Action::Dispatch(dispatch));
    }

    /// A forward attempt succeeded. An earlier attempt's late success counts
    /// too: the step did its work, so waiting for the retry would only repeat it.
    pub(super) fn step_succeeded(&mut self, i: usize, attempt: u32, output: Payload) -> bool {
        let accepts = match self.state.steps[i].status {
            StepStatus::Running {
                attempt: current, ..
            } => attempt >= 1 && attempt <= current,
            StepStatus::RetryWaiting { attempt: next, .. } => attempt >= 1 && attempt < next,
            _ => false,
        };
        if !accepts {
            return false;
        }
        let step = &mut self.state.steps[i];
        step.status = StepStatus::Completed;
        step.output = Some(output);
        self.record(Some(i), attempt, HistoryEvent::Succeeded);
        let name = self.state.steps[i].name.clone();
        self.actions
            .push(Action::Status(StatusUpdate::StepCompleted {
                step: name,
                attempt,
            }));
        true
    }

    /// A forward attempt failed: retry it, or fail the step for good.
    pub(super) fn step_failed(&mut self, i: usize, attempt: u32, error: StepError) -> bool {
        match self.state.steps[i].status {
            StepStatus::Running {
                attempt: current, ..
            } if current == attempt => {}
            _ => return false,
        }
        let policy = &self.def.steps()[i].retry;
        let retry_at = match error.retry {
            _ if self.state.status != WorkflowStatus::Running => None,
            _ if attempt >= policy.max_attempts => None,
            RetryDirective::Never => None,
            RetryDirective::Retry => Some(
                self.now
                    .plus(policy.delay_after(attempt, self.jitter_seed(i, attempt))),
            ),
            RetryDirective::RetryAfter(ms) => Some(Timestamp(self.now.0.saturating_add(ms))),
        };
        let message = error.to_string();
        self.state.steps[i].last_error = Some(error.clone());
        match retry_at {
            Some(due) => {
                self.state.steps[i].status = StepStatus::RetryWaiting {
                    attempt: attempt + 1,
                    due,
                };
                self.record(
                    Some(i),
                    attempt,
                    HistoryEvent::RetryScheduled {
                        phase: Phase::Forward,
                        error: message,
                        at: due,
                    },
                );
            }
            None => {
                self.state.steps[i].status = StepStatus::Failed;
                self.record(
                    Some(i),
                    attempt,
                    HistoryEvent::Failed {
                        error: message.clone(),
                    },
                );
                let step = self.state.steps[i].name.clone();
                self.actions.push(Action::Status(StatusUpdate::StepFailed {
                    step: step.clone(),
                    error: message,
                }));
                if self.state.failure.is_none() {
                    self.state.failure = Some(Failure::StepFailed { step, error });
                }
            }
        }
        true
    }

    /// Fires due retries and passed deadlines.
    pub(super) fn tick(&mut self) -> bool {
        let now = self.now;
        let mut changed = false;
        for i in 0..self.state.steps.len() {
            match self.state.steps[i].status {
                StepStatus::Running {
                    attempt, deadline, ..
                } if deadline <= now => {
                    let timeout = self.def.steps()[i].timeout;
                    let error = StepError::retryable(format!(
                        "timed out after {}",
                        format_duration(timeout)
                    ))
                    .with_kind("timeout");
                    changed |= self.step_failed(i, attempt, error);
                }
                StepStatus::RetryWaiting { attempt, due }
                    if due <= now && self.state.status == WorkflowStatus::Running =>
                {
                    self.dispatch_step(i, attempt);
                    changed = true;
                }
                StepStatus::Compensating {
                    attempt, deadline, ..
                } if deadline <= now => {
                    let timeout = self.def.steps()[i]
                        .compensation
                        .as_ref()
                        .map(|c| c.timeout)
                        .unwrap_or_default();
                    let error = StepError::retryable(format!(
                        "compensation timed out after {}",
                        format_duration(timeout)
                    ))
                    .with_kind("timeout");
                    changed |= self.compensation_failed(i, attempt, error);
                }
                StepStatus::CompensationRetryWaiting { attempt, due } if due <= now => {
                    self.dispatch_compensation(i, attempt);
                    changed = true;
                }
                _ => {}
            }
        }
        changed
    }

    /// Republishes in-flight commands last published at or before `before`.
    pub(super) fn redispatch(&mut self, before: Timestamp) -> bool {
        let mut changed = false;
        for i in 0..self.state.steps.len() {
            let def = &self.def.steps()[i];
            let (phase, attempt, deadline, worker) = match &mut self.state.steps[i].status {
                StepStatus::Running {
                    attempt,
                    dispatched_at,
                    deadline,
                } if *dispatched_at <= before => {
                    *dispatched_at = self.now;
                    (Phase::Forward, *attempt, *deadline, def.worker.clone())
                }
                StepStatus::Compensating {
                    attempt,
                    dispatched_at,
                    deadline,
                } if *dispatched_at <= before => {
                    *dispatched_at = self.now;
                    let Some(c) = &def.compensation else { continue };
                    (Phase::Compensate, *attempt, *deadline, c.worker.clone())
                }
                _ => continue,
            };
            let dispatch = Dispatch {
                step: def.name.clone(),
                phase,
                worker,
                attempt,
                deadline,
                payload: self.payload_for(i),
            };
            self.record(Some(i), attempt, HistoryEvent::Redispatched { phase });
            self.actions.push(Action::Dispatch(dispatch));
            changed = true;
        }
        changed
    }
}

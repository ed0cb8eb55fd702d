//! Time and signals: sleeps, signal waits and their timeouts, retries that
//! come due, step deadlines and the workflow's deadline. Timers fire from
//! the store's timer index: `tick` runs when one is due.

use super::{Failure, HistoryEvent, PendingSignal, Slot, StepStatus, Transition, WorkflowStatus};
use crate::event::StepError;
use crate::payload::Payload;
use crate::time::{Timestamp, format_duration};
use crate::workflow::{OnTimeout, StepKind};

impl Transition<'_> {
    pub(super) fn wait(&mut self, i: usize, until: Option<Timestamp>) {
        let step = &mut self.state.steps[i];
        step.status = StepStatus::Waiting { until };
        step.attempts = 1;
        self.record(Some(i), 1, HistoryEvent::WaitStarted { until });
    }

    /// A signal arrived.
    pub(super) fn signal(&mut self, name: String, payload: Payload) -> bool {
        if self.state.status != WorkflowStatus::Running || !self.def.signals().any(|s| s == name) {
            return false;
        }
        self.record(None, 0, HistoryEvent::SignalReceived { name: name.clone() });
        let waiting = (0..self.state.steps.len()).find(|&i| {
            matches!(self.state.steps[i].status, StepStatus::Waiting { .. })
                && matches!(&self.def.steps()[i].kind, StepKind::Signal(w) if w.name == name)
        });
        match waiting {
            Some(i) => self.complete(Slot::step(i), 1, payload),
            None => self.state.signals.push(PendingSignal {
                name,
                payload,
                at: self.now,
            }),
        }
        true
    }

    /// Fires due retries, timers and passed deadlines.
    pub(super) fn tick(&mut self) -> bool {
        let now = self.now;
        let mut changed = false;
        if self.state.status == WorkflowStatus::Running
            && self.state.failure.is_none()
            && let Some(deadline) = self.state.deadline
            && deadline <= now
        {
            self.record(None, 0, HistoryEvent::DeadlineExceeded);
            self.state.failure = Some(Failure::DeadlineExceeded { deadline });
            changed = true;
        }
        for slot in self.all_slots() {
            let def = &self.def.steps()[slot.step];
            match self.slot(slot).status {
                StepStatus::Running {
                    attempt, deadline, ..
                } if deadline <= now => {
                    if let StepKind::Workflow(_) = &def.kind {
                        self.child_timed_out(slot, attempt);
                        changed = true;
                    } else {
                        let timeout = format_duration(def.timeout);
                        let error = StepError::retryable(format!("timed out after {timeout}"))
                            .with_kind("timeout");
                        changed |= self.step_failed(slot, attempt, error);
                    }
                }
                StepStatus::RetryWaiting { attempt, due }
                    if due <= now && self.state.status == WorkflowStatus::Running =>
                {
                    self.dispatch_slot(slot, attempt);
                    changed = true;
                }
                StepStatus::Waiting {
                    until: Some(until), ..
                } if until <= now && self.state.status == WorkflowStatus::Running => {
                    match &def.kind {
                        StepKind::Signal(w) => match &w.on_timeout {
                            OnTimeout::Default(value) => {
                                let output =
                                    Payload::to_json(value).unwrap_or_else(|_| Payload::null());
                                self.complete(slot, 1, output);
                            }
                            OnTimeout::Fail => {
                                let waited = w.timeout.map(format_duration).unwrap_or_default();
                                let error = StepError::fatal(format!(
                                    "no `{}` signal within {waited}",
                                    w.name
                                ))
                                .with_kind("signal_timeout");
                                self.fail_for_good(slot, 1, error);
                            }
                        },
                        _ => self.complete(slot, 1, Payload::null()),
                    }
                    changed = true;
                }
                StepStatus::Compensating { .. } | StepStatus::CompensationRetryWaiting { .. } => {
                    changed |= self.compensation_timer(slot);
                }
                _ => {}
            }
        }
        changed
    }
}

//! Running steps: which are ready, conditions, dispatch, success, failure
//! and retry. The one retry rule is [`RetryPolicy::next_try`]; the one place
//! a dispatch is built is `send`; the one accept window is
//! [`accepts_success`].
//!
//! [`RetryPolicy::next_try`]: crate::workflow::RetryPolicy::next_try

use super::{
    Action, Dispatch, Failure, HistoryEvent, Slot, StatusUpdate, StepStatus, Transition,
    WorkflowStatus,
};
use crate::event::{Phase, StepError};
use crate::payload::Payload;
use crate::time::Timestamp;
use crate::workflow::StepKind;

impl Transition<'_> {
    /// Starts every pending step whose predecessors have all completed (or
    /// were skipped), and tops up running fan-outs. Returns true if a step
    /// finished on the spot (skipped, a kept signal, an empty fan-out), so
    /// that others may now be ready.
    ///
    /// `among`: the only steps that can have become ready (those that
    /// changed and the steps after them), in order; `None` looks at all.
    pub(super) fn dispatch_ready_steps(&mut self, among: Option<&[usize]>) -> bool {
        let mut settled_now = false;
        let count = among.map_or(self.state.steps.len(), <[usize]>::len);
        for k in 0..count {
            let i = among.map_or(k, |a| a[k]);
            match self.state.steps[i].status {
                StepStatus::Pending => {}
                StepStatus::Branching => {
                    settled_now |= self.top_up(i);
                    continue;
                }
                _ => continue,
            }
            let ready = self.def.dependencies(i).iter().all(|&d| {
                matches!(
                    self.state.steps[d].status,
                    StepStatus::Completed | StepStatus::Skipped
                )
            });
            if ready {
                settled_now |= self.start_step(i);
                if self.state.failure.is_some() {
                    return false;
                }
            }
        }
        settled_now
    }

    /// Starts a ready step; true if it finished on the spot.
    fn start_step(&mut self, i: usize) -> bool {
        let def = &self.def.steps()[i];
        if let Some(when) = &def.when {
            let (input, steps) = self.context();
            match when.eval_bool(&input, &steps) {
                Ok(true) => {}
                Ok(false) => {
                    self.state.steps[i].status = StepStatus::Skipped;
                    self.record(Some(i), 0, HistoryEvent::Skipped);
                    let step = self.state.steps[i].name.clone();
                    self.actions
                        .push(Action::Status(StatusUpdate::StepSkipped { step }));
                    return true;
                }
                Err(e) => {
                    let error = StepError::fatal(format!("condition `{when}` failed: {e}"))
                        .with_kind("condition");
                    self.fail_for_good(Slot::step(i), 0, error);
                    return true;
                }
            }
        }
        match &def.kind {
            StepKind::Task { .. } => match &def.for_each {
                None => {
                    self.dispatch_slot(Slot::step(i), 1);
                    false
                }
                Some(for_each) => {
                    let (input, steps) = self.context();
                    match for_each.items.eval_list(&input, &steps) {
                        Ok(items) => self.fan_out(i, items),
                        Err(e) => {
                            let error = StepError::fatal(format!(
                                "for_each `{}` failed: {e}",
                                for_each.items
                            ))
                            .with_kind("for_each");
                            self.fail_for_good(Slot::step(i), 0, error);
                            true
                        }
                    }
                }
            },
            StepKind::Sleep { duration } => {
                let until = self.now.plus(*duration);
                self.wait(i, Some(until));
                false
            }
            StepKind::Signal(wait) => {
                let name = wait.name.clone();
                let until = wait.timeout.map(|t| self.now.plus(t));
                if let Some(k) = self.state.signals.iter().position(|s| s.name == name) {
                    let signal = self.state.signals.remove(k);
                    self.wait(i, until);
                    self.complete(Slot::step(i), 1, signal.payload);
                    true
                } else {
                    self.wait(i, until);
                    false
                }
            }
            StepKind::Workflow(_) => {
                self.dispatch_slot(Slot::step(i), 1);
                false
            }
        }
    }

    /// Sends attempt `attempt` of a step or branch: a command to its
    /// worker, or the start of its sub-workflow.
    pub(super) fn dispatch_slot(&mut self, slot: Slot, attempt: u32) {
        let def = &self.def.steps()[slot.step];
        let deadline = self.now.plus(def.timeout);
        let now = self.now;
        let step = self.slot_mut(slot);
        step.status = StepStatus::Running {
            attempt,
            dispatched_at: now,
            deadline,
        };
        step.attempts = attempt;
        let event = match &def.kind {
            StepKind::Workflow(_) => HistoryEvent::ChildStarted {
                transaction_id: self.child_id(slot.step, attempt),
            },
            _ => HistoryEvent::Dispatched,
        };
        self.record_slot(slot, attempt, event);
        if let Some(action) = self.send(slot, Phase::Forward, attempt, deadline) {
            self.actions.push(action);
        }
    }

    /// What sends attempt `attempt` of `slot` in `phase`: a command to the
    /// step's worker (or its compensation's), the start of its sub-workflow
    /// or the undoing of it. `None` for a compensation the step does not
    /// have. The one place a dispatch is built, for first sends, retries and
    /// the recovery sweep alike.
    pub(super) fn send(
        &self,
        slot: Slot,
        phase: Phase,
        attempt: u32,
        deadline: Timestamp,
    ) -> Option<Action> {
        let def = &self.def.steps()[slot.step];
        let worker = match (&def.kind, phase) {
            (StepKind::Workflow(_), _) => return Some(self.child_action(slot, phase, attempt)),
            (_, Phase::Forward) => def.worker().cloned().unwrap_or_else(|| "".into()),
            (_, Phase::Compensate) => def.compensation.as_ref()?.worker.clone(),
        };
        Some(Action::Dispatch(Dispatch {
            step: self.slot(slot).name.clone(),
            phase,
            worker,
            attempt,
            deadline,
            payload: self.payload_for(slot),
        }))
    }

    /// The jitter seed of a retry of `slot`: distinct for a step and each of
    /// its branches, the same on every replica.
    pub(super) fn retry_seed(&self, slot: Slot, attempt: u32) -> u64 {
        self.jitter_seed(slot.step + slot.item.map_or(0, |k| (k + 1) << 16), attempt)
    }

    /// A forward attempt succeeded. An earlier attempt's late success counts
    /// too: the step did its work, so waiting for the retry would only repeat it.
    pub(super) fn step_succeeded(&mut self, slot: Slot, attempt: u32, output: Payload) -> bool {
        if !accepts_success(&self.slot(slot).status, Phase::Forward, attempt) {
            return false;
        }
        self.complete(slot, attempt, output);
        true
    }

    /// Marks a step or branch completed with `output`.
    pub(super) fn complete(&mut self, slot: Slot, attempt: u32, output: Payload) {
        let step = self.slot_mut(slot);
        step.status = StepStatus::Completed;
        step.output = Some(output);
        let name = step.name.clone();
        self.record_slot(slot, attempt, HistoryEvent::Succeeded);
        self.actions
            .push(Action::Status(StatusUpdate::StepCompleted {
                step: name,
                attempt,
            }));
    }

    /// A forward attempt failed: retry it, or fail the step for good.
    pub(super) fn step_failed(&mut self, slot: Slot, attempt: u32, error: StepError) -> bool {
        match self.slot(slot).status {
            StepStatus::Running {
                attempt: current, ..
            } if current == attempt => {}
            _ => return false,
        }
        // A workflow that is being undone starts no step again.
        let retry_at = (self.state.status == WorkflowStatus::Running)
            .then(|| {
                self.def.steps()[slot.step].retry.next_try(
                    attempt,
                    error.retry,
                    self.now,
                    self.retry_seed(slot, attempt),
                )
            })
            .flatten();
        match retry_at {
            Some(due) => {
                let message = error.to_string();
                let step = self.slot_mut(slot);
                step.last_error = Some(Box::new(error));
                step.status = StepStatus::RetryWaiting {
                    attempt: attempt + 1,
                    due,
                };
                self.record_slot(
                    slot,
                    attempt,
                    HistoryEvent::RetryScheduled {
                        phase: Phase::Forward,
                        error: message,
                        at: due,
                    },
                );
            }
            None => self.fail_for_good(slot, attempt, error),
        }
        true
    }

    /// A step or branch failed for good: so does the workflow (and a
    /// branch's fan-out step).
    pub(super) fn fail_for_good(&mut self, slot: Slot, attempt: u32, error: StepError) {
        let message = error.to_string();
        let step = self.slot_mut(slot);
        step.last_error = Some(Box::new(error.clone()));
        step.status = StepStatus::Failed;
        let name = step.name.clone();
        self.record_slot(
            slot,
            attempt,
            HistoryEvent::Failed {
                error: message.clone(),
            },
        );
        if slot.item.is_some() && self.state.steps[slot.step].status == StepStatus::Branching {
            self.state.steps[slot.step].status = StepStatus::Failed;
            self.state.steps[slot.step].last_error = Some(Box::new(error.clone()));
        }
        self.actions.push(Action::Status(StatusUpdate::StepFailed {
            step: name.clone(),
            error: message,
        }));
        if self.state.failure.is_none() {
            self.state.failure = Some(Failure::StepFailed { step: name, error });
        }
    }
}

/// True when a success of `attempt` in `phase` settles a step in `status`:
/// the attempt now running or an earlier one (its late answer did the work),
/// and while a retry waits, any attempt before it. The same window for
/// steps and compensations.
pub(super) fn accepts_success(status: &StepStatus, phase: Phase, attempt: u32) -> bool {
    match (phase, status) {
        (Phase::Forward, StepStatus::Running { attempt: now, .. })
        | (Phase::Compensate, StepStatus::Compensating { attempt: now, .. }) => {
            attempt >= 1 && attempt <= *now
        }
        (Phase::Forward, StepStatus::RetryWaiting { attempt: next, .. })
        | (Phase::Compensate, StepStatus::CompensationRetryWaiting { attempt: next, .. }) => {
            attempt >= 1 && attempt < *next
        }
        _ => false,
    }
}

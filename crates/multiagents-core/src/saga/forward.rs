//! Running steps: conditions, dispatch, fan-out, sleeps, signals,
//! sub-workflows, success, failure and retry, deadlines, recovery.

use super::{
    Action, Dispatch, Failure, HistoryEvent, PendingSignal, Slot, StartChild, StatusUpdate,
    StepState, StepStatus, Transition, WorkflowStatus,
};
use crate::event::{Phase, RetryDirective, StepError};
use crate::payload::Payload;
use crate::time::{Timestamp, format_duration};
use crate::workflow::{OnTimeout, StepKind};

impl Transition<'_> {
    /// Starts every pending step whose predecessors have all completed (or
    /// were skipped), and tops up running fan-outs. Returns true if a step
    /// finished on the spot (skipped, a kept signal, an empty fan-out), so
    /// that others may now be ready.
    pub(super) fn dispatch_ready_steps(&mut self) -> bool {
        let mut settled_now = false;
        for i in 0..self.state.steps.len() {
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

    fn wait(&mut self, i: usize, until: Option<Timestamp>) {
        let step = &mut self.state.steps[i];
        step.status = StepStatus::Waiting { until };
        step.attempts = 1;
        self.record(Some(i), 1, HistoryEvent::WaitStarted { until });
    }

    /// Makes one branch per item and starts as many as the bound allows.
    fn fan_out(&mut self, i: usize, items: Vec<serde_json::Value>) -> bool {
        let name = self.state.steps[i].name.clone();
        let count = items.len();
        self.state.steps[i].items = items
            .into_iter()
            .enumerate()
            .map(|(k, item)| {
                let mut branch = StepState::pending(format!("{name}[{k}]").into());
                branch.input = Some(Payload::to_json(&item).unwrap_or_else(|_| Payload::null()));
                branch
            })
            .collect();
        self.state.steps[i].status = StepStatus::Branching;
        self.state.steps[i].attempts = 1;
        self.record(
            Some(i),
            1,
            HistoryEvent::FannedOut {
                items: count as u32,
            },
        );
        self.top_up(i)
    }

    /// Starts pending branches of fan-out `i` up to its bound, and completes
    /// it once every branch has. True if it completed.
    fn top_up(&mut self, i: usize) -> bool {
        let limit = self.def.steps()[i]
            .for_each
            .as_ref()
            .map_or(1, |f| f.max_concurrency) as usize;
        let items = &self.state.steps[i].items;
        let running = items.iter().filter(|b| is_active(&b.status)).count();
        let pending: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, b)| b.status == StepStatus::Pending)
            .map(|(k, _)| k)
            .collect();
        for k in pending.into_iter().take(limit.saturating_sub(running)) {
            self.dispatch_slot(
                Slot {
                    step: i,
                    item: Some(k),
                },
                1,
            );
        }
        let done = self.state.steps[i]
            .items
            .iter()
            .all(|b| b.status == StepStatus::Completed);
        if done {
            let mut list = String::from("[");
            for (k, b) in self.state.steps[i].items.iter().enumerate() {
                if k > 0 {
                    list.push(',');
                }
                list.push_str(b.output.as_ref().map_or("null", |o| o.as_raw().get()));
            }
            list.push(']');
            let output = Payload::from_json_str(list).unwrap_or_else(|_| Payload::null());
            self.complete(Slot::step(i), 1, output);
        }
        done
    }

    /// Sends attempt `attempt` of a step or branch: a command to its
    /// worker, or the start of its sub-workflow.
    pub(super) fn dispatch_slot(&mut self, slot: Slot, attempt: u32) {
        let def = &self.def.steps()[slot.step];
        let deadline = self.now.plus(def.timeout);
        let payload = self.payload_for(slot);
        let now = self.now;
        let step = self.slot_mut(slot);
        step.status = StepStatus::Running {
            attempt,
            dispatched_at: now,
            deadline,
        };
        step.attempts = attempt;
        let name = step.name.clone();
        match &def.kind {
            StepKind::Workflow(child) => {
                let transaction_id = self.child_id(slot.step, attempt);
                let start = StartChild {
                    parent: self.parent_link(slot.step, attempt),
                    transaction_id,
                    workflow: child.workflow.clone(),
                    version: child.version,
                    input: self.step_input(slot.step).clone(),
                };
                self.record_slot(slot, attempt, HistoryEvent::ChildStarted { transaction_id });
                self.actions.push(Action::StartChild(Box::new(start)));
            }
            _ => {
                let worker = def.worker().cloned().unwrap_or_else(|| "".into());
                self.record_slot(slot, attempt, HistoryEvent::Dispatched);
                self.actions.push(Action::Dispatch(Dispatch {
                    step: name,
                    phase: Phase::Forward,
                    worker,
                    attempt,
                    deadline,
                    payload,
                }));
            }
        }
    }

    /// A forward attempt succeeded. An earlier attempt's late success counts
    /// too: the step did its work, so waiting for the retry would only repeat it.
    pub(super) fn step_succeeded(&mut self, slot: Slot, attempt: u32, output: Payload) -> bool {
        let accepts = match self.slot(slot).status {
            StepStatus::Running {
                attempt: current, ..
            } => attempt >= 1 && attempt <= current,
            StepStatus::RetryWaiting { attempt: next, .. } => attempt >= 1 && attempt < next,
            _ => false,
        };
        if !accepts {
            return false;
        }
        self.complete(slot, attempt, output);
        true
    }

    /// Marks a step or branch completed with `output`.
    fn complete(&mut self, slot: Slot, attempt: u32, output: Payload) {
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
        let policy = &self.def.steps()[slot.step].retry;
        let retry_at = match error.retry {
            _ if self.state.status != WorkflowStatus::Running => None,
            _ if attempt >= policy.max_attempts => None,
            RetryDirective::Never => None,
            RetryDirective::Retry => Some(
                self.now
                    .plus(policy.delay_after(attempt, self.jitter_seed(slot_seed(slot), attempt))),
            ),
            RetryDirective::RetryAfter(ms) => Some(Timestamp(self.now.0.saturating_add(ms))),
        };
        match retry_at {
            Some(due) => {
                let message = error.to_string();
                let step = self.slot_mut(slot);
                step.last_error = Some(error);
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
        step.last_error = Some(error.clone());
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
            self.state.steps[slot.step].last_error = Some(error.clone());
        }
        self.actions.push(Action::Status(StatusUpdate::StepFailed {
            step: name.clone(),
            error: message,
        }));
        if self.state.failure.is_none() {
            self.state.failure = Some(Failure::StepFailed { step: name, error });
        }
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
                    let timeout = format_duration(def.timeout);
                    if let StepKind::Workflow(child) = &def.kind {
                        // The child may still be running: stop it, and do not
                        // start another next to it.
                        let error = StepError::fatal(format!(
                            "sub-workflow `{}` did not finish within {timeout}",
                            child.workflow
                        ))
                        .with_kind("timeout");
                        let transaction_id = self.child_id(slot.step, attempt);
                        self.fail_for_good(slot, attempt, error);
                        self.actions.push(Action::CancelChild {
                            transaction_id,
                            reason: format!("its parent step timed out after {timeout}"),
                        });
                        changed = true;
                    } else {
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
                StepStatus::Compensating {
                    attempt, deadline, ..
                } if deadline <= now => {
                    let timeout = match &def.kind {
                        StepKind::Workflow(_) => def.timeout,
                        _ => def
                            .compensation
                            .as_ref()
                            .map(|c| c.timeout)
                            .unwrap_or_default(),
                    };
                    let error = StepError::retryable(format!(
                        "compensation timed out after {}",
                        format_duration(timeout)
                    ))
                    .with_kind("timeout");
                    changed |= self.compensation_failed(slot, attempt, error);
                }
                StepStatus::CompensationRetryWaiting { attempt, due } if due <= now => {
                    self.dispatch_compensation(slot, attempt);
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
        for slot in self.all_slots() {
            let def = &self.def.steps()[slot.step];
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
            let name = self.slot(slot).name.clone();
            self.record_slot(slot, attempt, HistoryEvent::Redispatched { phase });
            changed = true;
            if let StepKind::Workflow(child) = &def.kind {
                let child_attempt = match phase {
                    Phase::Forward => attempt,
                    Phase::Compensate => self.slot(slot).attempts,
                };
                let transaction_id = self.child_id(slot.step, child_attempt);
                let action = match phase {
                    Phase::Forward => Action::StartChild(Box::new(StartChild {
                        parent: self.parent_link(slot.step, attempt),
                        transaction_id,
                        workflow: child.workflow.clone(),
                        version: child.version,
                        input: self.step_input(slot.step).clone(),
                    })),
                    Phase::Compensate => Action::UndoChild {
                        parent: Box::new(self.parent_link(slot.step, attempt)),
                        transaction_id,
                    },
                };
                self.actions.push(action);
                continue;
            }
            let worker = match phase {
                Phase::Forward => def.worker().cloned().unwrap_or_else(|| "".into()),
                Phase::Compensate => match &def.compensation {
                    Some(c) => c.worker.clone(),
                    None => continue,
                },
            };
            let dispatch = Dispatch {
                step: name,
                phase,
                worker,
                attempt,
                deadline,
                payload: self.payload_for(slot),
            };
            self.actions.push(Action::Dispatch(dispatch));
        }
        changed
    }
}

/// True while a branch holds one of its fan-out's places.
fn is_active(status: &StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Running { .. } | StepStatus::RetryWaiting { .. }
    )
}

/// Distinct jitter seeds for a step and each of its branches.
fn slot_seed(slot: Slot) -> usize {
    slot.step + slot.item.map_or(0, |k| (k + 1) << 16)
}

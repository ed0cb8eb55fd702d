//! The saga state machine: pure, synchronous, deterministic.
//!
//! [`start`] creates a workflow's state; [`apply`] takes the state, one
//! [`Input`] and the current time, changes the state and returns the
//! [`Action`]s the runtime must carry out (publish a command, broadcast a
//! status, dead-letter a failure). No I/O, no clock, no randomness: the same
//! inputs always give the same result, which is what lets the property tests
//! below throw arbitrary interleavings at it.
//!
//! The rules, one file per kind of step or concern:
//!
//! * `tasks` — a step is dispatched once every step it comes after has
//!   completed (or was skipped by its condition); a success completes it; a
//!   failure is retried under the step's policy ([`RetryPolicy::next_try`]:
//!   a `RetryAfter` error sets the delay, a `Never` error or the last attempt
//!   fails it for good). Results for another attempt, for a step not in
//!   flight or for a finished workflow change nothing; a late success of an
//!   earlier attempt counts. Every command, start and undo of a child is
//!   built in one place there (`send`), for both phases and the recovery
//!   sweep.
//! * `fan_out` — one branch per item, at most `max_concurrency` at once; the
//!   step completes with the list of outputs, and fails with its first branch
//!   to fail for good.
//! * `children` — a sub-workflow step starts a child whose id is derived
//!   from the parent, the step and the attempt; a child that overruns its
//!   step's deadline is cancelled, never started twice.
//! * `timers` — sleeps, signal waits and their timeouts, due retries, step
//!   deadlines (a passed one is a retryable failure) and the workflow's
//!   deadline.
//! * `compensation` — once a step fails for good, or the workflow is
//!   cancelled, nothing new starts; every completed step that has a
//!   compensation is undone, each only after every step that came after it
//!   has been undone or has settled (so sequential steps are undone in reverse
//!   order and independent branches in parallel); compensations are retried
//!   under their own policy, by the same rule; one that fails for good is
//!   dead-lettered and the workflow ends `CompensationFailed`.
//! * `recovery` — commands in flight for longer than the sweep's cutoff are
//!   sent again, unchanged (same attempt, same idempotency key).
//!
//! [`RetryPolicy::next_try`]: crate::workflow::RetryPolicy::next_try

mod children;
mod compensation;
mod fan_out;
pub mod parts;
mod recovery;
mod retry;
mod state;
mod tasks;
mod timers;

use serde::{Deserialize, Serialize};

pub use retry::{
    RetryPlan, RetryRefused, check_redrive, check_retryable, mark_retried, retried_as, retry,
    retry_id,
};
pub use state::{
    Failure, HistoryEntry, HistoryEvent, ParentLink, PendingSignal, Priority, StepState,
    StepStatus, WorkflowState, WorkflowStatus,
};

use crate::chunked::Chunked;
use crate::event::{Phase, StepError};
use crate::ids::{CorrelationId, StepName, TransactionId, WorkerName};
use crate::payload::Payload;
use crate::time::Timestamp;
use crate::workflow::{StepKind, WorkflowDefinition};

/// Something that happened to a workflow, fed to [`apply`].
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A worker finished a step (or its compensation).
    Succeeded {
        /// The step.
        step: StepName,
        /// Forward or compensation.
        phase: Phase,
        /// The attempt that finished.
        attempt: u32,
        /// Its output.
        output: Payload,
    },
    /// A worker failed a step (or its compensation).
    Failed {
        /// The step.
        step: StepName,
        /// Forward or compensation.
        phase: Phase,
        /// The attempt that failed.
        attempt: u32,
        /// Why, and whether to retry.
        error: StepError,
    },
    /// Time passed: fire due retries and deadlines.
    Tick,
    /// Stop the workflow and undo what it did.
    Cancel {
        /// Why.
        reason: String,
    },
    /// Recovery: publish again the commands of steps in flight that were
    /// (last) published at or before this time. The attempt and so the
    /// idempotency key stay the same.
    Redispatch {
        /// Republish commands published at or before this.
        dispatched_before: Timestamp,
    },
    /// A named signal arrived: it completes the step waiting for it, or is
    /// kept for the step that will.
    Signal {
        /// The signal's name.
        name: String,
        /// Its payload: the waiting step's output.
        payload: Payload,
    },
    /// Undo a completed workflow: compensate every completed step. Sent to
    /// a sub-workflow when the parent step that ran it is compensated.
    Undo {
        /// Why.
        reason: String,
        /// The attempt of the parent step's compensation, reported back with
        /// the outcome.
        parent_attempt: u32,
    },
    /// Try again a compensation that failed for good (its dead letter was
    /// redriven): the only input a `CompensationFailed` workflow takes.
    RedriveCompensation {
        /// The step (or fan-out branch) whose compensation failed.
        step: StepName,
    },
}

/// A command to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatch {
    /// The step.
    pub step: StepName,
    /// Forward (a `Command`) or compensation (a `Compensation`).
    pub phase: Phase,
    /// The worker that must run it.
    pub worker: WorkerName,
    /// The attempt.
    pub attempt: u32,
    /// When it times out.
    pub deadline: Timestamp,
    /// `{"input": …, "steps": {…}}`; see [`crate::workflow`].
    pub payload: Payload,
}

/// A sub-workflow to start.
#[derive(Clone, Debug, PartialEq)]
pub struct StartChild {
    /// The parent step (and attempt) that waits for it.
    pub parent: ParentLink,
    /// The child's transaction id, derived from the parent's, the step and
    /// the attempt, so that starting it again is harmless.
    pub transaction_id: TransactionId,
    /// The definition to run.
    pub workflow: crate::ids::WorkflowName,
    /// Its version (the highest registered when absent).
    pub version: Option<u32>,
    /// Its input: the parent step's input.
    pub input: Payload,
}

/// How a sub-workflow ended, for its parent step.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildOutcome {
    /// The parent step waiting for it.
    pub parent: ParentLink,
    /// Forward (the child ran) or compensation (the child was undone).
    pub phase: Phase,
    /// The child's outputs by step name, or why it did not complete.
    pub result: Result<Payload, StepError>,
}

/// A status change worth broadcasting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StatusUpdate {
    /// The workflow started.
    Started,
    /// A step completed.
    StepCompleted {
        /// The step.
        step: StepName,
        /// The attempt.
        attempt: u32,
    },
    /// A step failed for good.
    StepFailed {
        /// The step.
        step: StepName,
        /// The error.
        error: String,
    },
    /// A step was undone.
    StepCompensated {
        /// The step.
        step: StepName,
    },
    /// A step was skipped: its condition did not hold.
    StepSkipped {
        /// The step.
        step: StepName,
    },
    /// The workflow ended.
    Finished {
        /// How.
        status: WorkflowStatus,
    },
}

/// What the runtime must do after a transition.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Publish a command or compensation.
    Dispatch(Dispatch),
    /// Broadcast a status change.
    Status(StatusUpdate),
    /// Put a failure where people will see it: a compensation failed for good.
    DeadLetter {
        /// The step that could not be undone.
        step: StepName,
        /// Why.
        reason: String,
    },
    /// Tell the worker running this attempt that its result is no longer
    /// wanted (the workflow is compensating): it should stop. Best effort:
    /// the step settles when its answer comes or its deadline passes.
    Interrupt {
        /// The step (or fan-out branch).
        step: StepName,
        /// The attempt.
        attempt: u32,
        /// The worker type running it.
        worker: WorkerName,
    },
    /// Start a sub-workflow.
    StartChild(Box<StartChild>),
    /// Cancel a running sub-workflow.
    CancelChild {
        /// The child.
        transaction_id: TransactionId,
        /// Why.
        reason: String,
    },
    /// Undo a completed sub-workflow (its parent step is compensated).
    UndoChild {
        /// The parent step (and compensation attempt) waiting for it.
        parent: Box<ParentLink>,
        /// The child.
        transaction_id: TransactionId,
    },
    /// This workflow is a sub-workflow and has ended: tell the parent.
    NotifyParent(Box<ChildOutcome>),
}

/// The result of [`apply`].
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// False when the input changed nothing (a duplicate, a stale result, an
    /// early tick): the runtime then neither persists nor publishes.
    pub changed: bool,
    /// What to do, in order.
    pub actions: Vec<Action>,
}

/// How many bytes of outputs a command carries at most: those of the
/// steps its step comes after (through skipped ones), of its `input_from`
/// step and its own (when undoing it), smallest first. A worker reads any
/// other from the store when it asks for it, so a command stays small
/// however large and many the outputs before it are.
pub const CARRIED_BYTES: usize = 64 * 1024;

/// Creates the state of a new workflow instance and the first commands.
pub fn start(
    def: &WorkflowDefinition,
    transaction_id: TransactionId,
    correlation_id: CorrelationId,
    input: Payload,
    now: Timestamp,
) -> (WorkflowState, Vec<Action>) {
    start_child(def, transaction_id, correlation_id, input, now, None)
}

/// Like [`start`], for a sub-workflow of `parent` (when given).
pub fn start_child(
    def: &WorkflowDefinition,
    transaction_id: TransactionId,
    correlation_id: CorrelationId,
    input: Payload,
    now: Timestamp,
    parent: Option<ParentLink>,
) -> (WorkflowState, Vec<Action>) {
    let mut state = WorkflowState {
        transaction_id,
        correlation_id,
        workflow: def.name().clone(),
        version: def.version(),
        status: WorkflowStatus::Running,
        input,
        steps: def
            .steps()
            .iter()
            .map(|s| StepState::pending(s.name.clone()))
            .collect(),
        deadline: def.deadline().map(|d| now.plus(d)),
        signals: Vec::new(),
        parent,
        priority: Priority::Normal,
        failure: None,
        started_at: now,
        updated_at: now,
        finished_at: None,
        history: Chunked::new(),
    };
    let mut t = Transition {
        def,
        state: &mut state,
        now,
        actions: Vec::new(),
    };
    t.record(None, 0, HistoryEvent::Started);
    t.actions.push(Action::Status(StatusUpdate::Started));
    t.advance(None);
    let actions = t.actions;
    (state, actions)
}

/// Applies one input to a workflow's state at time `now`.
///
/// The state must belong to `def` (same name and version, one entry per step);
/// a state that does not is left alone and nothing is returned.
pub fn apply(
    def: &WorkflowDefinition,
    state: &mut WorkflowState,
    input: Input,
    now: Timestamp,
) -> Outcome {
    if state.steps.len() != def.steps().len() {
        return Outcome::default();
    }
    if state.is_terminal() {
        // Only a completed workflow can be asked to undo itself, and only
        // one whose compensation failed can try it again.
        let reopens = match input {
            Input::Undo { .. } => state.status == WorkflowStatus::Completed,
            Input::RedriveCompensation { .. } => state.status == WorkflowStatus::CompensationFailed,
            _ => false,
        };
        if !reopens {
            return Outcome::default();
        }
    }
    // The steps before the input: cheap to keep (shared chunks), and what
    // tells `advance` which steps the input changed. A workflow of one chunk
    // of steps is simply looked at whole.
    let before = (state.steps.len() > LOOK_AT_ALL_UP_TO).then(|| state.steps.clone());
    let mut t = Transition {
        def,
        state,
        now,
        actions: Vec::new(),
    };
    let changed = match input {
        Input::Succeeded {
            step,
            phase,
            attempt,
            output,
        } => match t.index(&step) {
            Some(i) => match phase {
                Phase::Forward => t.step_succeeded(i, attempt, output),
                Phase::Compensate => t.compensation_succeeded(i, attempt),
            },
            None => false,
        },
        Input::Failed {
            step,
            phase,
            attempt,
            error,
        } => match t.index(&step) {
            Some(i) => match phase {
                Phase::Forward => t.step_failed(i, attempt, error),
                Phase::Compensate => t.compensation_failed(i, attempt, error),
            },
            None => false,
        },
        Input::Tick => t.tick(),
        Input::Cancel { reason } => t.cancel(reason),
        Input::Redispatch { dispatched_before } => t.redispatch(dispatched_before),
        Input::Signal { name, payload } => t.signal(name, payload),
        Input::Undo {
            reason,
            parent_attempt,
        } => t.undo(reason, parent_attempt),
        Input::RedriveCompensation { step } => t.redrive_compensation(&step),
    };
    if !changed {
        return Outcome::default();
    }
    t.advance(before);
    t.state.updated_at = now;
    Outcome {
        changed: true,
        actions: t.actions,
    }
}

/// Workflows of up to this many steps have every step looked at by each
/// transition (cheaper than finding the changed ones). In this crate's tests
/// none, so that the property tests check the search.
const LOOK_AT_ALL_UP_TO: usize = if cfg!(test) { 0 } else { crate::chunked::CHUNK };

/// One transition in progress.
struct Transition<'a> {
    def: &'a WorkflowDefinition,
    state: &'a mut WorkflowState,
    now: Timestamp,
    actions: Vec<Action>,
}

/// A step, or one branch of a fan-out step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    step: usize,
    item: Option<usize>,
}

impl Slot {
    fn step(step: usize) -> Self {
        Self { step, item: None }
    }
}

impl Transition<'_> {
    /// The step or branch a name refers to.
    fn index(&self, name: &StepName) -> Option<Slot> {
        if let Some(i) = self.def.step_index(name.as_str()) {
            return Some(Slot::step(i));
        }
        let (step, item) = state::split_item(name.as_str())?;
        let i = self.def.step_index(step)?;
        (item < self.state.steps[i].items.len()).then_some(Slot {
            step: i,
            item: Some(item),
        })
    }

    fn slot(&self, s: Slot) -> &StepState {
        match s.item {
            None => &self.state.steps[s.step],
            Some(k) => &self.state.steps[s.step].items[k],
        }
    }

    fn slot_mut(&mut self, s: Slot) -> &mut StepState {
        match s.item {
            None => &mut self.state.steps[s.step],
            Some(k) => &mut self.state.steps[s.step].items[k],
        }
    }

    /// The step itself and, for a fan-out, each branch.
    fn slots(&self, i: usize) -> impl Iterator<Item = Slot> + use<> {
        let items = self.state.steps[i].items.len();
        std::iter::once(Slot::step(i)).chain((0..items).map(move |k| Slot {
            step: i,
            item: Some(k),
        }))
    }

    /// Every step and branch.
    fn all_slots(&self) -> Vec<Slot> {
        (0..self.state.steps.len())
            .flat_map(|i| self.slots(i))
            .collect()
    }

    /// True when the step is undone by a compensation (a worker, or
    /// compensating its sub-workflow).
    fn compensable(&self, i: usize) -> bool {
        let def = &self.def.steps()[i];
        def.compensation.is_some() || matches!(def.kind, StepKind::Workflow(_))
    }

    fn record(&mut self, step: Option<usize>, attempt: u32, event: HistoryEvent) {
        let step = step.map(|i| self.state.steps[i].name.clone());
        self.push_history(step, attempt, event);
    }

    fn record_slot(&mut self, slot: Slot, attempt: u32, event: HistoryEvent) {
        let step = Some(self.slot(slot).name.clone());
        self.push_history(step, attempt, event);
    }

    fn push_history(&mut self, step: Option<StepName>, attempt: u32, event: HistoryEvent) {
        self.state.history.push(HistoryEntry {
            at: self.now,
            step,
            attempt,
            event,
            timing: None,
        });
    }

    /// Moves the workflow as far as it can go without new input. `since`:
    /// the steps as they were before this transition's input (`None` for a
    /// new state): only steps changed since, and the steps after them, can
    /// have become ready, so a long workflow's other steps are not looked at.
    fn advance(&mut self, since: Option<Chunked<StepState>>) {
        if self.state.status == WorkflowStatus::Running {
            // Starting steps may complete or fail some (a condition, a kept
            // signal, an empty fan-out), which may make others ready.
            let mut since = since;
            for _ in 0..=self.state.steps.len() {
                if self.state.failure.is_some() {
                    break;
                }
                let among = since.as_ref().map(|b| self.changed_and_after(b));
                let before = since.is_some().then(|| self.state.steps.clone());
                if !self.dispatch_ready_steps(among.as_deref()) {
                    break;
                }
                since = before;
            }
            if self.state.failure.is_some() {
                self.begin_compensation();
            } else if self.all_settled() {
                self.finish(WorkflowStatus::Completed);
            }
        }
        if self.state.status == WorkflowStatus::Compensating {
            self.compensate_ready_steps();
        }
    }

    /// Steps whose status or branches differ from `before`, and the steps
    /// that come after them, in order.
    fn changed_and_after(&self, before: &Chunked<StepState>) -> Vec<usize> {
        let mut out = Vec::new();
        for range in self.state.steps.changed_since(before) {
            for i in range {
                let now = &self.state.steps[i];
                let differs = before
                    .get(i)
                    .is_none_or(|b| b.status != now.status || b.items != now.items);
                if differs {
                    out.push(i);
                    out.extend_from_slice(self.def.dependents(i));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// True when every step completed or was skipped. The steps nothing
    /// comes after are looked at first: until they have finished, some step
    /// has not, and a long workflow is not scanned at every transition.
    fn all_settled(&self) -> bool {
        let settled =
            |s: &StepState| matches!(s.status, StepStatus::Completed | StepStatus::Skipped);
        self.def
            .sinks()
            .iter()
            .all(|&i| self.state.steps.get(i).is_some_and(settled))
            && self.state.steps.iter().all(settled)
    }

    fn finish(&mut self, status: WorkflowStatus) {
        self.state.status = status;
        self.state.finished_at = Some(self.now);
        self.record(None, 0, HistoryEvent::Finished { status });
        self.actions
            .push(Action::Status(StatusUpdate::Finished { status }));
        if let Some(outcome) = parent_outcome(self.state) {
            self.actions.push(Action::NotifyParent(Box::new(outcome)));
        }
    }

    /// Every completed step's output, by step name.
    fn outputs(&self) -> Payload {
        outputs(&self.state.steps)
    }

    /// A stable per-(transaction, step, attempt) number for retry jitter.
    fn jitter_seed(&self, index: usize, attempt: u32) -> u64 {
        // FNV-1a over the transaction id, step index and attempt, finalised
        // so that nearby inputs spread over the whole range.
        let bytes = self.state.transaction_id.as_uuid().as_bytes();
        crate::hash::mix64(crate::hash::fnv1a(
            bytes
                .iter()
                .copied()
                .chain((index as u64).to_le_bytes())
                .chain(attempt.to_le_bytes()),
        ))
    }

    /// A step's `input`: the workflow input, or its `input_from` step's output.
    fn step_input(&self, index: usize) -> &Payload {
        match &self.def.steps()[index].input_from {
            Some(source) => self
                .state
                .output(source.as_str())
                .unwrap_or(&self.state.input),
            None => &self.state.input,
        }
    }

    /// The document a step's (or branch's) worker receives: its input, and
    /// the outputs of the steps it comes after (through skipped ones), of its
    /// `input_from` step and (to undo it) its own, up to [`CARRIED_BYTES`]. Any other earlier output a worker asks for is
    /// read from the store then, so a command does not grow with the steps
    /// before it.
    fn payload_for(&self, slot: Slot) -> Payload {
        #[derive(Serialize)]
        struct Doc<'a> {
            input: &'a serde_json::value::RawValue,
            steps: Carried<'a>,
        }
        let input = match slot.item {
            Some(_) => self.slot(slot).input.as_ref().unwrap_or(&self.state.input),
            None => self.step_input(slot.step),
        };
        let def = &self.def.steps()[slot.step];
        // The steps it comes after; a skipped one stands for those it came after.
        let mut carried: smallvec::SmallVec<[usize; 8]> = smallvec::SmallVec::new();
        let mut todo: smallvec::SmallVec<[usize; 8]> =
            smallvec::SmallVec::from_slice(self.def.dependencies(slot.step));
        while let Some(d) = todo.pop() {
            if carried.contains(&d) {
                continue;
            }
            carried.push(d);
            if self.state.steps[d].status == StepStatus::Skipped {
                todo.extend_from_slice(self.def.dependencies(d));
            }
        }
        carried.extend(
            def.input_from
                .as_ref()
                .and_then(|s| self.def.step_index(s.as_str())),
        );
        carried.push(slot.step);
        carried.sort_unstable();
        carried.dedup();
        // Within the budget, smallest first; the rest are read on demand.
        let size = |i: &usize| self.state.steps[*i].output.as_ref().map_or(0, Payload::len);
        if carried.iter().map(size).sum::<usize>() > CARRIED_BYTES {
            carried.sort_by_key(size);
            let mut total = 0;
            carried.retain(|i| {
                total += size(i);
                total <= CARRIED_BYTES
            });
            carried.sort_unstable();
        }
        let doc = Doc {
            input: input.as_raw(),
            steps: Carried {
                steps: &self.state.steps,
                which: &carried,
            },
        };
        // Serializing raw values and string keys cannot fail.
        Payload::to_json(&doc).unwrap_or_else(|_| Payload::null())
    }

    /// Evaluates an expression against the input and the outputs so far.
    fn context(&self) -> (serde_json::Value, serde_json::Value) {
        let input = self.state.input.parse().unwrap_or(serde_json::Value::Null);
        let steps = self.outputs().parse().unwrap_or(serde_json::Value::Null);
        (input, steps)
    }
}

/// Every completed step's output, by step name: a workflow's output, and
/// what a sub-workflow step outputs.
pub fn outputs(steps: &Chunked<StepState>) -> Payload {
    Payload::to_json(&Outputs(steps)).unwrap_or_else(|_| Payload::null())
}

/// What a finished sub-workflow tells its parent step (`None` for a
/// top-level or unfinished workflow).
pub fn parent_outcome(state: &WorkflowState) -> Option<ChildOutcome> {
    let parent = state.parent.clone()?;
    if !state.is_terminal() {
        return None;
    }
    let undone = matches!(state.failure, Some(Failure::Undone { .. }));
    let result = match state.status {
        WorkflowStatus::Completed => Ok(outputs(&state.steps)),
        WorkflowStatus::Compensated if undone => Ok(Payload::null()),
        other => {
            let why = match &state.failure {
                Some(Failure::StepFailed { step, error }) => {
                    format!(": step `{step}` failed: {}", error.message)
                }
                Some(Failure::Cancelled { reason }) => format!(": cancelled: {reason}"),
                Some(Failure::DeadlineExceeded { .. }) => ": its deadline passed".into(),
                Some(Failure::Undone { .. }) | None => String::new(),
            };
            Err(StepError {
                message: format!("sub-workflow `{}` ended {other}{why}", state.workflow),
                retry: crate::event::RetryDirective::Never,
                kind: Some("sub_workflow".into()),
            })
        }
    };
    Some(ChildOutcome {
        parent,
        phase: if undone {
            Phase::Compensate
        } else {
            Phase::Forward
        },
        result,
    })
}

/// Step outputs as a JSON object by step name.
struct Outputs<'a>(&'a Chunked<StepState>);

/// The outputs of some steps, by name.
struct Carried<'a> {
    steps: &'a Chunked<StepState>,
    which: &'a [usize],
}

impl Serialize for Carried<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for &i in self.which {
            if let Some(step) = self.steps.get(i)
                && let Some(out) = &step.output
            {
                m.serialize_entry(step.name.as_str(), out.as_raw())?;
            }
        }
        m.end()
    }
}

impl Serialize for Outputs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for step in self.0 {
            if let Some(out) = &step.output {
                m.serialize_entry(step.name.as_str(), out.as_raw())?;
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
use tests as tests_support;

#[cfg(test)]
mod retry_tests;

#[cfg(test)]
mod power_tests;

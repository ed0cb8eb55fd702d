//! The saga state machine: pure, synchronous, deterministic.
//!
//! [`start`] creates a workflow's state; [`apply`] takes the state, one
//! [`Input`] and the current time, changes the state and returns the
//! [`Action`]s the runtime must carry out (publish a command, broadcast a
//! status, dead-letter a failure). No I/O, no clock, no randomness: the same
//! inputs always give the same result, which is what lets the property tests
//! below throw arbitrary interleavings at it.
//!
//! The rules, in the order they are written down in the submodules:
//!
//! * `forward` — a step is dispatched once every step it comes after has
//!   completed; a success completes it; a failure is retried under the step's
//!   policy (a `RetryAfter` error sets the delay, a `Never` error or the last
//!   attempt fails it for good); a passed deadline counts as a retryable
//!   failure. Results for another attempt, for a step not in flight or for a
//!   finished workflow change nothing.
//! * `compensation` — once a step fails for good, or the workflow is
//!   cancelled, nothing new starts; every completed step that has a
//!   compensation is undone, each only after every step that came after it
//!   has been undone or has settled (so sequential steps are undone in reverse
//!   order and independent branches in parallel); compensations are retried
//!   under their own policy; one that fails for good is dead-lettered and the
//!   workflow ends `CompensationFailed`.

mod compensation;
mod forward;
mod state;

use serde::{Deserialize, Serialize};

pub use state::{
    Failure, HistoryEntry, HistoryEvent, StepState, StepStatus, WorkflowState, WorkflowStatus,
};

use crate::event::{Phase, StepError};
use crate::ids::{CorrelationId, StepName, TransactionId, WorkerName};
use crate::payload::Payload;
use crate::time::Timestamp;
use crate::workflow::WorkflowDefinition;

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

/// Creates the state of a new workflow instance and the first commands.
pub fn start(
    def: &WorkflowDefinition,
    transaction_id: TransactionId,
    correlation_id: CorrelationId,
    input: Payload,
    now: Timestamp,
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
            .map(|s| StepState {
                name: s.name.clone(),
                status: StepStatus::Pending,
                attempts: 0,
                compensation_attempts: 0,
                output: None,
                last_error: None,
            })
            .collect(),
        failure: None,
        started_at: now,
        updated_at: now,
        finished_at: None,
        history: Vec::with_capacity(4 + def.steps().len() * 2),
    };
    let mut t = Transition {
        def,
        state: &mut state,
        now,
        actions: Vec::new(),
    };
    t.record(None, 0, HistoryEvent::Started);
    t.actions.push(Action::Status(StatusUpdate::Started));
    t.advance();
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
    if state.is_terminal() || state.steps.len() != def.steps().len() {
        return Outcome::default();
    }
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
    };
    if !changed {
        return Outcome::default();
    }
    t.advance();
    t.state.updated_at = now;
    Outcome {
        changed: true,
        actions: t.actions,
    }
}

/// One transition in progress.
struct Transition<'a> {
    def: &'a WorkflowDefinition,
    state: &'a mut WorkflowState,
    now: Timestamp,
    actions: Vec<Action>,
}

impl Transition<'_> {
    fn index(&self, step: &StepName) -> Option<usize> {
        self.def.step_index(step.as_str())
    }

    fn record(&mut self, step: Option<usize>, attempt: u32, event: HistoryEvent) {
        let step = step.map(|i| self.state.steps[i].name.clone());
        self.state.history.push(HistoryEntry {
            at: self.now,
            step,
            attempt,
            event,
            timing: None,
        });
    }

    /// Moves the workflow as far as it can go without new input.
    fn advance(&mut self) {
        if self.state.status == WorkflowStatus::Running {
            if self.state.failure.is_some() {
                self.begin_compensation();
            } else {
                self.dispatch_ready_steps();
                if self
                    .state
                    .steps
                    .iter()
                    .all(|s| s.status == StepStatus::Completed)
                {
                    self.finish(WorkflowStatus::Completed);
                }
            }
        }
        if self.state.status == WorkflowStatus::Compensating {
            self.compensate_ready_steps();
        }
    }

    fn finish(&mut self, status: WorkflowStatus) {
        self.state.status = status;
        self.state.finished_at = Some(self.now);
        self.record(None, 0, HistoryEvent::Finished { status });
        self.actions
            .push(Action::Status(StatusUpdate::Finished { status }));
    }

    /// A stable per-(transaction, step, attempt) number for retry jitter.
    fn jitter_seed(&self, index: usize, attempt: u32) -> u64 {
        // FNV-1a over the transaction id, step index and attempt.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = self.state.transaction_id.as_uuid().as_bytes();
        for b in bytes
            .iter()
            .chain((index as u64).to_le_bytes().iter())
            .chain(attempt.to_le_bytes().iter())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Finalise (splitmix64) so nearby inputs spread over the whole range.
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }

    /// The document a step's worker receives.
    fn payload_for(&self, index: usize) -> Payload {
        #[derive(Serialize)]
        struct Doc<'a> {
            input: &'a serde_json::value::RawValue,
            steps: Outputs<'a>,
        }
        struct Outputs<'a>(&'a [StepState]);
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
        let input = match &self.def.steps()[index].input_from {
            Some(source) => self
                .state
                .output(source.as_str())
                .unwrap_or(&self.state.input),
            None => &self.state.input,
        };
        let doc = Doc {
            input: input.as_raw(),
            steps: Outputs(&self.state.steps),
        };
        // Serializing raw values and string keys cannot fail.
        Payload::to_json(&doc).unwrap_or_else(|_| Payload::null())
    }
}

#[cfg(test)]
mod tests;

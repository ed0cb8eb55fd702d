//! Retrying a finished run, and redriving a compensation that failed for
//! good.
//!
//! A retry is a new run (Temporal's *reset*): it gets its own transaction
//! id, derived from the old one ([`retry_id`]), so every step it runs again
//! has fresh idempotency keys, and a late answer meant for the old run can
//! never settle a step of the new one. What the old run finished and that
//! still stands is carried over, and is not run again:
//!
//! * a step is **kept** (with its output) when it completed and was not
//!   undone, or was skipped by its condition, and it is neither the step the
//!   retry starts from nor comes after it;
//! * every other step runs again: the step the retry starts from (by default
//!   the one that failed), the steps that come after it, steps that were
//!   compensated (their effect was undone, so their output no longer holds),
//!   failed, cancelled or never ran — and, transitively, every step after a
//!   step that runs again, since its input may change.
//!
//! A kept step that ran a sub-workflow is refused: the new run could not undo
//! the old run's child. Retry from that step (or an earlier one) instead.

use super::{Action, Failure, WorkflowState, WorkflowStatus};
use super::{HistoryEvent, Priority, StatusUpdate, StepState, StepStatus, Transition};
use crate::ids::{StepName, TransactionId};
use crate::payload::Payload;
use crate::time::Timestamp;
use crate::workflow::{StepKind, WorkflowDefinition};

/// Why a run cannot be retried (or a compensation redriven).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryRefused {
    /// Only a run that ended failed, compensated, timed out or cancelled can
    /// be retried.
    #[error(
        "a {status} run cannot be retried: only failed, compensated, timed_out and cancelled runs can"
    )]
    Status {
        /// Its status.
        status: WorkflowStatus,
    },
    /// A sub-workflow is retried through its parent.
    #[error("this run is a sub-workflow of run {parent}: retry the parent")]
    Child {
        /// The parent run.
        parent: TransactionId,
    },
    /// `from_step` names no step of the definition.
    #[error("workflow `{workflow}` has no step `{step}`")]
    NoSuchStep {
        /// The workflow.
        workflow: String,
        /// The name given.
        step: String,
    },
    /// A completed sub-workflow step would be kept.
    #[error(
        "step `{step}` completed a sub-workflow that the new run could not undo: retry from `{step}` or an earlier step"
    )]
    KeptChild {
        /// The step.
        step: StepName,
    },
    /// The run was retried already.
    #[error("this run was retried already, as run {retry}: retry that run instead")]
    AlreadyRetried {
        /// The run that retried it.
        retry: TransactionId,
    },
    /// No compensation of that step failed for good.
    #[error("step `{step}` has no failed compensation to redrive (the run is {status})")]
    NothingToRedrive {
        /// The step.
        step: String,
        /// The run's status.
        status: WorkflowStatus,
    },
}

/// What to retry, and how.
#[derive(Clone, Debug, Default)]
pub struct RetryPlan {
    /// Start from this step (default: the step that failed; for a run that
    /// timed out or was cancelled, the steps that had not finished).
    pub from_step: Option<String>,
    /// The new run's input (default: the old run's).
    pub input: Option<Payload>,
}

/// The transaction id of the run that retries `old`: the same in every
/// process, so that two requests to retry the same run make one new run.
pub fn retry_id(old: TransactionId) -> TransactionId {
    let bytes = old.as_uuid().as_bytes();
    let high = crate::hash::mix64(crate::hash::fnv1a(bytes.iter().copied().chain(*b"/retry")));
    let low = crate::hash::splitmix64(high ^ crate::hash::fnv1a(bytes.iter().rev().copied()));
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&high.to_be_bytes());
    raw[8..].copy_from_slice(&low.to_be_bytes());
    TransactionId(uuid::Builder::from_custom_bytes(raw).into_uuid())
}

/// The run that retried `state`, when one did.
pub fn retried_as(state: &WorkflowState) -> Option<TransactionId> {
    state.history.iter().rev().find_map(|h| match &h.event {
        HistoryEvent::RetriedAs { transaction_id } => Some(*transaction_id),
        _ => None,
    })
}

/// Checks that `old` may be retried at all (before a definition is chosen).
pub fn check_retryable(old: &WorkflowState) -> Result<(), RetryRefused> {
    if let Some(parent) = &old.parent {
        return Err(RetryRefused::Child {
            parent: parent.transaction_id,
        });
    }
    match old.status {
        WorkflowStatus::Failed
        | WorkflowStatus::Compensated
        | WorkflowStatus::TimedOut
        | WorkflowStatus::Cancelled => Ok(()),
        status => Err(RetryRefused::Status { status }),
    }
}

/// The new run that retries `old` under `def` (the old run's version or a
/// later one), and its first commands. The new run's history begins with
/// [`HistoryEvent::Retried`]; the caller records [`HistoryEvent::RetriedAs`]
/// in the old run ([`mark_retried`]).
pub fn retry(
    def: &WorkflowDefinition,
    old: &WorkflowState,
    plan: RetryPlan,
    now: Timestamp,
) -> Result<(WorkflowState, Vec<Action>), RetryRefused> {
    check_retryable(old)?;
    let from = match plan.from_step.as_deref() {
        Some(name) => Some(
            def.step_index(name)
                .ok_or_else(|| RetryRefused::NoSuchStep {
                    workflow: def.name().to_string(),
                    step: name.to_string(),
                })?,
        ),
        None => match &old.failure {
            // A failed branch `step[i]` retries its fan-out step.
            Some(Failure::StepFailed { step, .. }) => {
                let name = step.as_str();
                let base = super::state::split_item(name).map_or(name, |(s, _)| s);
                def.step_index(base)
            }
            _ => None,
        },
    };
    // Which steps run again: the start, what it leads to, and whatever did
    // not finish in a way that still stands; then everything after those.
    let n = def.steps().len();
    let mut again = vec![false; n];
    for (i, step) in def.steps().iter().enumerate() {
        let stands = old
            .steps
            .iter()
            .find(|s| s.name == step.name)
            .is_some_and(|s| matches!(s.status, StepStatus::Completed | StepStatus::Skipped));
        again[i] = !stands || Some(i) == from;
    }
    // Steps are in an order where every step comes after its dependencies.
    for i in 0..n {
        if !again[i] && def.dependencies(i).iter().any(|&d| again[d]) {
            again[i] = true;
        }
    }
    let mut steps = Vec::with_capacity(n);
    for (i, step) in def.steps().iter().enumerate() {
        if again[i] {
            steps.push(StepState::pending(step.name.clone()));
            continue;
        }
        let kept = old
            .steps
            .iter()
            .find(|s| s.name == step.name)
            .cloned()
            .unwrap_or_else(|| StepState::pending(step.name.clone()));
        if matches!(step.kind, StepKind::Workflow(_)) && kept.status == StepStatus::Completed {
            return Err(RetryRefused::KeptChild {
                step: step.name.clone(),
            });
        }
        steps.push(kept);
    }
    let mut state = WorkflowState {
        transaction_id: retry_id(old.transaction_id),
        correlation_id: old.correlation_id,
        workflow: def.name().clone(),
        version: def.version(),
        status: WorkflowStatus::Running,
        input: plan.input.unwrap_or_else(|| old.input.clone()),
        steps: steps.into(),
        deadline: def.deadline().map(|d| now.plus(d)),
        signals: Vec::new(),
        parent: None,
        priority: Priority::Normal,
        failure: None,
        started_at: now,
        updated_at: now,
        finished_at: None,
        history: crate::chunked::Chunked::new(),
    };
    state.priority = old.priority;
    let mut t = Transition {
        def,
        state: &mut state,
        now,
        actions: Vec::new(),
    };
    t.record(
        None,
        0,
        HistoryEvent::Retried {
            transaction_id: old.transaction_id,
            from_step: from.map(|i| def.steps()[i].name.clone()),
        },
    );
    t.actions.push(Action::Status(StatusUpdate::Started));
    t.advance(None);
    let actions = t.actions;
    Ok((state, actions))
}

/// Records in `old` that run `retry` retried it.
pub fn mark_retried(old: &mut WorkflowState, retry: TransactionId, now: Timestamp) {
    old.history.push(super::HistoryEntry {
        at: now,
        step: None,
        attempt: 0,
        event: HistoryEvent::RetriedAs {
            transaction_id: retry,
        },
        timing: None,
    });
    old.updated_at = now;
}

impl Transition<'_> {
    /// A compensation that failed for good is tried again (its dead letter
    /// was redriven): the workflow compensates again and ends as the
    /// compensation then goes.
    pub(super) fn redrive_compensation(&mut self, step: &StepName) -> bool {
        if self.state.status != WorkflowStatus::CompensationFailed {
            return false;
        }
        let Some(slot) = self.index(step) else {
            return false;
        };
        if self.slot(slot).status != StepStatus::CompensationFailed {
            return false;
        }
        let attempt = self.slot(slot).compensation_attempts + 1;
        self.state.status = WorkflowStatus::Compensating;
        self.state.finished_at = None;
        self.record_slot(slot, attempt, HistoryEvent::CompensationRedriven);
        self.dispatch_compensation(slot, attempt);
        true
    }
}

/// Why [`super::Input::RedriveCompensation`] would change nothing, for the
/// error a caller shows.
pub fn check_redrive(state: &WorkflowState, step: &str) -> Result<(), RetryRefused> {
    let failed = state.status == WorkflowStatus::CompensationFailed
        && state
            .step(step)
            .is_some_and(|s| s.status == StepStatus::CompensationFailed);
    if failed {
        Ok(())
    } else {
        Err(RetryRefused::NothingToRedrive {
            step: step.to_string(),
            status: state.status,
        })
    }
}

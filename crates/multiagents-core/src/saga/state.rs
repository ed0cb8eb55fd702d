//! The persisted state of one workflow instance.

use serde::{Deserialize, Serialize};

use crate::chunked::Chunked;
use crate::event::{Phase, StepError};
use crate::ids::{CorrelationId, StepName, TransactionId, WorkflowName};
use crate::payload::Payload;
use crate::time::Timestamp;

/// Where a workflow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    /// Steps are running.
    Running,
    /// A step failed for good (or the workflow was cancelled): completed
    /// steps are being undone.
    Compensating,
    /// Every step completed.
    Completed,
    /// A step failed for good and every completed step with a compensation
    /// was undone.
    Compensated,
    /// A step failed for good and there was nothing to undo.
    Failed,
    /// A compensation failed for good: some effects could not be undone.
    /// The failure is dead-lettered and needs a person.
    CompensationFailed,
    /// Cancelled on request; completed steps were undone.
    Cancelled,
    /// The workflow's deadline passed; completed steps were undone.
    TimedOut,
}

impl WorkflowStatus {
    /// True once nothing more will happen.
    pub fn is_terminal(self) -> bool {
        !matches!(self, WorkflowStatus::Running | WorkflowStatus::Compensating)
    }

    /// All statuses, for listings and metrics.
    pub const ALL: [WorkflowStatus; 8] = [
        WorkflowStatus::Running,
        WorkflowStatus::Compensating,
        WorkflowStatus::Completed,
        WorkflowStatus::Compensated,
        WorkflowStatus::Failed,
        WorkflowStatus::CompensationFailed,
        WorkflowStatus::Cancelled,
        WorkflowStatus::TimedOut,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowStatus::Running => "running",
            WorkflowStatus::Compensating => "compensating",
            WorkflowStatus::Completed => "completed",
            WorkflowStatus::Compensated => "compensated",
            WorkflowStatus::Failed => "failed",
            WorkflowStatus::CompensationFailed => "compensation_failed",
            WorkflowStatus::Cancelled => "cancelled",
            WorkflowStatus::TimedOut => "timed_out",
        }
    }
}

impl std::fmt::Display for WorkflowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WorkflowStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WorkflowStatus::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| format!("unknown workflow status `{s}`"))
    }
}

/// How urgent a workflow is: when workers are saturated, the commands of
/// higher-priority workflows are taken first.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Before everything else.
    High,
    /// The default.
    #[default]
    Normal,
    /// After everything else.
    Low,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// True for the default.
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown priority `{s}`; use high, normal or low"))
    }
}

/// Where one step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for the steps it comes after.
    Pending,
    /// A command for `attempt` is out.
    Running {
        /// The attempt in flight.
        attempt: u32,
        /// When its command was (last) published.
        dispatched_at: Timestamp,
        /// When the attempt times out.
        deadline: Timestamp,
    },
    /// Waiting to dispatch `attempt` after a failure.
    RetryWaiting {
        /// The next attempt.
        attempt: u32,
        /// When it is dispatched.
        due: Timestamp,
    },
    /// Sleeping, or waiting for a signal, until `until` (forever when
    /// absent); the history says since when.
    Waiting {
        /// When the wait ends.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
    /// A fan-out whose branches (in [`StepState::items`]) are running.
    Branching,
    /// Done; its output is in [`StepState::output`].
    Completed,
    /// Not run: its condition did not hold.
    Skipped,
    /// Failed for good.
    Failed,
    /// Will not run: the workflow stopped first.
    Cancelled,
    /// A compensation command for `attempt` is out.
    Compensating {
        /// The compensation attempt in flight.
        attempt: u32,
        /// When its command was (last) published.
        dispatched_at: Timestamp,
        /// When the attempt times out.
        deadline: Timestamp,
    },
    /// Waiting to dispatch compensation `attempt` after a failure.
    CompensationRetryWaiting {
        /// The next compensation attempt.
        attempt: u32,
        /// When it is dispatched.
        due: Timestamp,
    },
    /// Undone.
    Compensated,
    /// Could not be undone.
    CompensationFailed,
}

impl StepStatus {
    /// A short name for timelines.
    pub fn label(&self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running { .. } => "running",
            StepStatus::RetryWaiting { .. } => "retry_waiting",
            StepStatus::Waiting { .. } => "waiting",
            StepStatus::Branching => "branching",
            StepStatus::Completed => "completed",
            StepStatus::Skipped => "skipped",
            StepStatus::Failed => "failed",
            StepStatus::Cancelled => "cancelled",
            StepStatus::Compensating { .. } => "compensating",
            StepStatus::CompensationRetryWaiting { .. } => "compensation_retry_waiting",
            StepStatus::Compensated => "compensated",
            StepStatus::CompensationFailed => "compensation_failed",
        }
    }

    /// The next time something is due for this step.
    pub fn wakeup(&self) -> Option<Timestamp> {
        match *self {
            StepStatus::Running { deadline, .. } | StepStatus::Compensating { deadline, .. } => {
                Some(deadline)
            }
            StepStatus::RetryWaiting { due, .. }
            | StepStatus::CompensationRetryWaiting { due, .. } => Some(due),
            StepStatus::Waiting { until, .. } => until,
            _ => None,
        }
    }

    /// True while a command for this step is out.
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            StepStatus::Running { .. } | StepStatus::Compensating { .. }
        )
    }
}

/// One step of one workflow instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name.
    pub name: StepName,
    /// Where it is.
    pub status: StepStatus,
    /// Forward attempts dispatched so far.
    pub attempts: u32,
    /// Compensation attempts dispatched so far.
    #[serde(default)]
    pub compensation_attempts: u32,
    /// The output, once completed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::payload::deserialize_present"
    )]
    pub output: Option<Payload>,
    /// The most recent error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Box<StepError>>,
    /// For a branch of a fan-out: its item, which it gets as `input`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::payload::deserialize_present"
    )]
    pub input: Option<Payload>,
    /// For a fan-out: one entry per item, named `step[i]`.
    #[serde(default, skip_serializing_if = "Chunked::is_empty")]
    pub items: Chunked<StepState>,
}

impl StepState {
    /// A step (or branch) that has not started.
    pub fn pending(name: StepName) -> Self {
        Self {
            name,
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            output: None,
            last_error: None,
            input: None,
            items: Chunked::new(),
        }
    }
}

/// Why a workflow is compensating (or ended without completing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Failure {
    /// A step failed for good.
    StepFailed {
        /// The step.
        step: StepName,
        /// Its last error.
        error: StepError,
    },
    /// Someone cancelled the workflow.
    Cancelled {
        /// The reason they gave.
        reason: String,
    },
    /// The workflow's deadline passed.
    DeadlineExceeded {
        /// The deadline.
        deadline: Timestamp,
    },
    /// The workflow had completed and was asked to undo itself (it ran as a
    /// sub-workflow of a step that is being compensated).
    Undone {
        /// Why.
        reason: String,
    },
}

/// The parent of a sub-workflow: which step of which workflow waits for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    /// The parent workflow.
    pub transaction_id: TransactionId,
    /// The parent's definition.
    pub workflow: WorkflowName,
    /// The parent's step that started this workflow.
    pub step: StepName,
    /// That step's attempt (once this workflow is being undone: the
    /// attempt of that step's compensation).
    pub attempt: u32,
    /// How deep this workflow is: 1 for a child of a top-level workflow.
    pub depth: u32,
}

/// A signal that arrived before a step waited for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingSignal {
    /// The signal's name.
    pub name: String,
    /// Its payload.
    pub payload: Payload,
    /// When it arrived.
    pub at: Timestamp,
}

/// One line of a workflow's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: Timestamp,
    /// The step concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepName>,
    /// The attempt concerned (0 for workflow-level entries).
    #[serde(default)]
    pub attempt: u32,
    /// What happened.
    pub event: HistoryEvent,
    /// For the outcome of an attempt: how the worker handled it (added by
    /// the runtime from the result event; the state machine leaves it empty).
    /// Behind a pointer: most entries have none, a finished workflow's
    /// history is kept, and a transition's copy of the history shares it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<std::sync::Arc<crate::event::Timing>>,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HistoryEvent {
    /// The workflow started.
    Started,
    /// A step's command was published.
    Dispatched,
    /// A step's command was published again (recovery).
    Redispatched {
        /// Forward or compensation.
        phase: Phase,
    },
    /// A step completed.
    Succeeded,
    /// An attempt failed; another is scheduled.
    RetryScheduled {
        /// Forward or compensation.
        phase: Phase,
        /// The error.
        error: String,
        /// When the next attempt goes out.
        at: Timestamp,
    },
    /// A step failed for good.
    Failed {
        /// The error.
        error: String,
    },
    /// A step was cancelled before it could finish.
    Cancelled,
    /// Cancellation was requested.
    CancelRequested {
        /// The reason.
        reason: String,
    },
    /// Compensation of a step was dispatched.
    CompensationDispatched,
    /// A step was undone.
    Compensated,
    /// A step could not be undone.
    CompensationFailed {
        /// The error.
        error: String,
    },
    /// A step's condition did not hold: it was skipped.
    Skipped,
    /// A fan-out step made one branch per item.
    FannedOut {
        /// How many.
        items: u32,
    },
    /// A step began to sleep or to wait for a signal.
    WaitStarted {
        /// Until when (forever when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
    /// A signal arrived (for a waiting step, or kept for a later one).
    SignalReceived {
        /// Its name.
        name: String,
    },
    /// A sub-workflow was started.
    ChildStarted {
        /// The child.
        transaction_id: TransactionId,
    },
    /// The workflow's deadline passed.
    DeadlineExceeded,
    /// A completed workflow was asked to undo itself.
    UndoRequested {
        /// Why.
        reason: String,
    },
    /// This run retries an earlier one (its first entry).
    Retried {
        /// The run it retries.
        transaction_id: TransactionId,
        /// The step it starts from, when it was one step (the failed one,
        /// or the one asked for).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_step: Option<StepName>,
    },
    /// This run was retried by a new run.
    RetriedAs {
        /// The new run.
        transaction_id: TransactionId,
    },
    /// A compensation that had failed for good was tried again (its dead
    /// letter was redriven).
    CompensationRedriven,
    /// The workflow reached a terminal status.
    Finished {
        /// The status.
        status: WorkflowStatus,
    },
}

/// The state of one workflow instance: the unit the store persists with a
/// version and the state machine transforms.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkflowState {
    /// The instance.
    pub transaction_id: TransactionId,
    /// The request chain it belongs to.
    pub correlation_id: CorrelationId,
    /// The definition's name.
    pub workflow: WorkflowName,
    /// The definition's version, fixed at start.
    pub version: u32,
    /// Where it is.
    pub status: WorkflowStatus,
    /// The workflow input.
    pub input: Payload,
    /// One entry per step of the definition, in the same order.
    pub steps: Chunked<StepState>,
    /// When the whole workflow must have finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Signals that arrived before a step waited for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<PendingSignal>,
    /// For a sub-workflow: the parent step waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
    /// Its priority (a sub-workflow has its parent's).
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Why it is compensating or did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it reached a terminal status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// What happened, in order.
    pub history: Chunked<HistoryEntry>,
}

impl Clone for WorkflowState {
    /// Cheap for any length: the full chunks of steps and history are
    /// shared, copied only where the clone is then changed; their tails
    /// (all the steps of a short workflow, the last history entries) are
    /// copied, the history's with room for what a transition appends.
    fn clone(&self) -> Self {
        Self {
            transaction_id: self.transaction_id,
            correlation_id: self.correlation_id,
            workflow: self.workflow.clone(),
            version: self.version,
            status: self.status,
            input: self.input.clone(),
            steps: self.steps.clone(),
            deadline: self.deadline,
            signals: self.signals.clone(),
            parent: self.parent.clone(),
            priority: self.priority,
            failure: self.failure.clone(),
            started_at: self.started_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            history: self.history.clone_with_room(4),
        }
    }
}

impl WorkflowState {
    /// Gives back the room transitions left in its lists: for a state kept
    /// long, such as a finished one in a store's memory.
    pub fn shrink_to_fit(&mut self) {
        self.steps.shrink_to_fit();
        self.history.shrink_to_fit();
    }

    /// The earliest time something is due (a deadline or a retry), if any.
    /// Stores index workflows by this so timers fire from the store.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        if self.status.is_terminal() {
            return None;
        }
        // Each chunk of steps (and of a fan-out's branches) keeps its least
        // wakeup until it changes: a transition recomputes the chunks it
        // touched, not every step of a long workflow.
        let steps = self.steps.min_summary(WAKEUP, chunk_wakeup);
        let steps = (steps != u64::MAX).then_some(Timestamp(steps));
        let deadline = self
            .deadline
            .filter(|_| self.status == WorkflowStatus::Running);
        steps.into_iter().chain(deadline).min()
    }

    /// True when the workflow still waits for an answer from `attempt` of
    /// `step` (a fan-out branch is `step[i]`) in `phase`: that very attempt
    /// is running or being compensated. A command for anything else — an
    /// attempt given up on, one already answered, a finished workflow — is
    /// stale, and its answer would change nothing.
    pub fn awaits(&self, step: &str, phase: Phase, attempt: u32) -> bool {
        match (self.step(step).map(|s| &s.status), phase) {
            (Some(StepStatus::Running { attempt: a, .. }), Phase::Forward) => *a == attempt,
            (Some(StepStatus::Compensating { attempt: a, .. }), Phase::Compensate) => *a == attempt,
            _ => false,
        }
    }

    /// The step named `name`, or the fan-out branch named `step[i]`.
    pub fn step(&self, name: &str) -> Option<&StepState> {
        if let Some(s) = self.steps.iter().find(|s| s.name.as_str() == name) {
            return Some(s);
        }
        let (step, item) = split_item(name)?;
        self.steps
            .iter()
            .find(|s| s.name.as_str() == step)?
            .items
            .get(item)
    }

    /// The output of a completed step.
    pub fn output(&self, name: &str) -> Option<&Payload> {
        self.step(name).and_then(|s| s.output.as_ref())
    }

    /// True once nothing more will happen.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }
}

/// The summaries kept per chunk of steps or branches (see
/// [`Chunked::summaries`]): the least wakeup (ms); for branches also how
/// many hold a place, how many have not completed, and the first pending.
pub(crate) const WAKEUP: usize = 0;
pub(crate) const ACTIVE: usize = 1;
pub(crate) const UNFINISHED: usize = 2;
pub(crate) const FIRST_PENDING: usize = 3;

/// The least wakeup of some steps and their branches, in ms (`u64::MAX`
/// for none): the summary [`WorkflowState::next_wakeup`] keeps per chunk.
fn chunk_wakeup(steps: &[StepState]) -> u64 {
    fn branch_wakeup(items: &[StepState]) -> u64 {
        items
            .iter()
            .filter_map(|s| s.status.wakeup())
            .map(|t| t.0)
            .min()
            .unwrap_or(u64::MAX)
    }
    steps
        .iter()
        .map(|s| {
            let own = s.status.wakeup().map_or(u64::MAX, |t| t.0);
            own.min(s.items.min_summary(WAKEUP, branch_wakeup))
        })
        .min()
        .unwrap_or(u64::MAX)
}

/// `"step[3]"` → `("step", 3)`.
pub(crate) fn split_item(name: &str) -> Option<(&str, usize)> {
    let open = name.rfind('[')?;
    let index = name[open + 1..].strip_suffix(']')?.parse().ok()?;
    Some((&name[..open], index))
}

//! Workflow definitions: the steps of a saga, the worker each step calls, its
//! compensation, retry policy, timeout and the steps it comes after.
//!
//! A definition is a graph, not a list: every step names the steps it comes
//! after (by default, the step declared before it). Definitions are built
//! with [`WorkflowBuilder`] or read from JSON/YAML, and are validated either
//! way: an invalid one is refused with a [`DefinitionError`] naming the culprit.
//!
//! # What a step receives
//!
//! Every command carries one JSON document:
//!
//! ```json
//! {"input": <the step's input>, "steps": {"validate": <output>, "reserve": <output>}}
//! ```
//!
//! * `input` is the workflow's input, or — when the step says
//!   `input_from("reserve")` — the output of that earlier step. A typed
//!   worker (`#[worker]`) receives this value, decoded into its input type.
//! * `steps` holds the outputs of the steps it comes after (through skipped
//!   ones) and of its `input_from` step, by step name. A worker reads one
//!   with `ctx.output::<T>("reserve").await`, which reads any other earlier
//!   output from the store.
//!
//! A compensation receives the same document: the workflow input (or its
//! step's `input_from`) as `input`, and the same outputs plus the output of
//! the step it undoes under `steps`.

mod builder;
pub mod diagram;
pub mod expr;
mod retry;

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use builder::WorkflowBuilder;
pub use expr::{Expr, ExprError, Reference};
pub use retry::RetryPolicy;

use crate::ids::{StepName, WorkerName, WorkflowName};
use crate::time::duration_serde;

/// The default time a step attempt may take before it counts as failed.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A validated workflow definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawWorkflow", into = "RawWorkflow")]
pub struct WorkflowDefinition {
    name: WorkflowName,
    version: u32,
    description: Option<String>,
    deadline: Option<Duration>,
    steps: Vec<StepDefinition>,
    /// `deps[i]`: indexes of the steps step `i` comes after.
    deps: Vec<Vec<usize>>,
    /// `dependents[i]`: indexes of the steps that come after step `i`.
    dependents: Vec<Vec<usize>>,
    /// Step indexes by name.
    by_name: std::collections::HashMap<String, usize>,
    /// The steps no step comes after.
    sinks: Vec<usize>,
}

/// One step of a workflow.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDefinition {
    /// Unique within the workflow.
    pub name: StepName,
    /// What the step does: call a worker, sleep, wait for a signal or run
    /// another workflow.
    pub kind: StepKind,
    /// How to undo it, if it can be undone.
    pub compensation: Option<Compensation>,
    /// Attempts and back-off.
    pub retry: RetryPolicy,
    /// How long one attempt may take (for a sub-workflow: the whole child).
    pub timeout: Duration,
    /// The steps it comes after.
    pub after: Vec<StepName>,
    /// Where its `input` comes from.
    pub input_from: Option<StepName>,
    /// Runs only when this holds; otherwise the step is skipped and the
    /// workflow goes on.
    pub when: Option<Expr>,
    /// Runs once per item of a list (one branch per item, at most
    /// `max_concurrency` at once); its output is the list of the branches'
    /// outputs, in order.
    pub for_each: Option<ForEach>,
    /// The parallel group it belongs to, if any: the steps of a group run at
    /// once, after the step before the group, and the step after the group
    /// waits for all of them.
    pub group: Option<String>,
}

impl StepDefinition {
    /// The worker a task step calls (`None` for sleep, signal and
    /// sub-workflow steps).
    pub fn worker(&self) -> Option<&WorkerName> {
        match &self.kind {
            StepKind::Task { worker } => Some(worker),
            _ => None,
        }
    }
}

/// What a step does.
#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    /// Sends a command to a worker and waits for its result.
    Task {
        /// The worker type.
        worker: WorkerName,
    },
    /// Waits, durably: the timer survives a restart of every process. The
    /// output is `null`.
    Sleep {
        /// How long.
        duration: Duration,
    },
    /// Waits for a named signal (a human approval, a webhook); the signal's
    /// payload becomes the output. A signal sent before the wait begins is
    /// kept for it.
    Signal(SignalWait),
    /// Starts another workflow and waits for its outcome.
    Workflow(ChildWorkflow),
}

/// A wait for a signal.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalWait {
    /// The signal's name.
    pub name: String,
    /// How long to wait (forever when absent).
    pub timeout: Option<Duration>,
    /// What happens when the wait times out.
    pub on_timeout: OnTimeout,
}

/// What a signal step does when its wait times out.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum OnTimeout {
    /// The step fails for good (and the workflow compensates).
    #[default]
    Fail,
    /// The step completes with this output.
    Default(serde_json::Value),
}

/// A sub-workflow step.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildWorkflow {
    /// The workflow to start.
    pub workflow: WorkflowName,
    /// Its version (default: the highest registered when the step starts).
    pub version: Option<u32>,
}

/// A dynamic fan-out.
#[derive(Clone, Debug, PartialEq)]
pub struct ForEach {
    /// Gives the list, evaluated when the step becomes ready.
    pub items: Expr,
    /// Branches run at once, at most.
    pub max_concurrency: u32,
}

/// The default bound on the branches of a fan-out that run at once.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 10;

/// The default timeout of a sub-workflow step.
pub const DEFAULT_CHILD_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How a step is undone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compensation {
    /// The worker that undoes the step.
    pub worker: WorkerName,
    /// Attempts and back-off for the compensation.
    #[serde(default = "RetryPolicy::compensation_default")]
    pub retry: RetryPolicy,
    /// How long one compensation attempt may take.
    #[serde(default = "default_timeout", with = "duration_serde")]
    pub timeout: Duration,
}

impl Compensation {
    /// A compensation by `worker` with the default policy and timeout.
    pub fn new(worker: impl Into<WorkerName>) -> Self {
        Self {
            worker: worker.into(),
            retry: RetryPolicy::compensation_default(),
            timeout: DEFAULT_STEP_TIMEOUT,
        }
    }
}

fn default_timeout() -> Duration {
    DEFAULT_STEP_TIMEOUT
}

impl WorkflowDefinition {
    /// Starts a builder.
    pub fn builder(name: impl Into<String>) -> WorkflowBuilder {
        WorkflowBuilder::new(name)
    }

    /// The workflow's name.
    pub fn name(&self) -> &WorkflowName {
        &self.name
    }

    /// Its version: running instances stay on the version they started with.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// A human description, if given.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// How long a whole run may take: past it, the workflow stops and
    /// compensates, and ends `timed_out`.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The workflows this one starts as sub-workflows.
    pub fn children(&self) -> impl Iterator<Item = &ChildWorkflow> {
        self.steps.iter().filter_map(|s| match &s.kind {
            StepKind::Workflow(c) => Some(c),
            _ => None,
        })
    }

    /// The signals this workflow waits for.
    pub fn signals(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|s| match &s.kind {
            StepKind::Signal(w) => Some(w.name.as_str()),
            _ => None,
        })
    }

    /// The steps, in declaration order.
    pub fn steps(&self) -> &[StepDefinition] {
        &self.steps
    }

    /// The index of a step by name.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Indexes of the steps that step `index` comes after.
    pub fn dependencies(&self, index: usize) -> &[usize] {
        &self.deps[index]
    }

    /// Indexes of the steps that come after step `index`.
    pub fn dependents(&self, index: usize) -> &[usize] {
        &self.dependents[index]
    }

    /// Indexes of the steps that no step comes after: the workflow has
    /// completed once these have (every other step finished before them).
    pub fn sinks(&self) -> &[usize] {
        &self.sinks
    }

    /// Every worker name the definition uses (steps and compensations).
    pub fn workers(&self) -> impl Iterator<Item = &WorkerName> {
        self.steps.iter().flat_map(|s| {
            s.worker()
                .into_iter()
                .chain(s.compensation.as_ref().map(|c| &c.worker))
        })
    }

    /// Parses and validates a JSON definition.
    pub fn from_json(text: &str) -> Result<Self, DefinitionError> {
        serde_json::from_str(text).map_err(|e| DefinitionError::from_parse(e.to_string()))
    }

    /// Parses and validates a YAML definition.
    pub fn from_yaml(text: &str) -> Result<Self, DefinitionError> {
        serde_yaml_ng::from_str(text).map_err(|e| DefinitionError::from_parse(e.to_string()))
    }

    /// The definition as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The definition as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

/// Why a definition was refused. Every variant names the culprit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    /// The workflow has no name.
    #[error("the workflow name is empty")]
    EmptyWorkflowName,
    /// The workflow has no steps.
    #[error("workflow `{workflow}` has no steps; add at least one with .step(name, worker)")]
    EmptyWorkflow {
        /// The workflow.
        workflow: String,
    },
    /// Version 0 is reserved.
    #[error("workflow `{workflow}` has version 0; versions start at 1")]
    ZeroVersion {
        /// The workflow.
        workflow: String,
    },
    /// A step has no name.
    #[error("step #{position} of workflow `{workflow}` has an empty name")]
    EmptyStepName {
        /// The workflow.
        workflow: String,
        /// 1-based position of the step.
        position: usize,
    },
    /// Two steps share a name.
    #[error("workflow `{workflow}` declares step `{step}` twice")]
    DuplicateStep {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
    },
    /// A step or its compensation names no worker.
    #[error("step `{step}` of workflow `{workflow}` has an empty {what} worker name")]
    EmptyWorkerName {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// `step` or `compensation`.
        what: &'static str,
    },
    /// A retry policy that cannot work.
    #[error("step `{step}` of workflow `{workflow}` has an invalid {what} retry policy: {problem}")]
    InvalidRetry {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// `step` or `compensation`.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A zero timeout.
    #[error("step `{step}` of workflow `{workflow}` has a zero {what} timeout")]
    ZeroTimeout {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// `step` or `compensation`.
        what: &'static str,
    },
    /// A step comes after a step that does not exist.
    #[error(
        "step `{step}` of workflow `{workflow}` comes after `{missing}`, which is not a step of this workflow"
    )]
    UnknownDependency {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// The unknown name.
        missing: String,
    },
    /// A step takes its input from a step that is not before it.
    #[error(
        "step `{step}` of workflow `{workflow}` takes its input from `{source_step}`, which {reason}"
    )]
    BadInputSource {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// The named source.
        source_step: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// The `after` relations form a cycle.
    #[error("workflow `{workflow}` has a cycle through steps {}", .steps.join(" → "))]
    Cycle {
        /// The workflow.
        workflow: String,
        /// Steps on the cycle, in order, the first repeated at the end.
        steps: Vec<String>,
    },
    /// A step's kind is missing, doubled or used with something it cannot have.
    #[error("step `{step}` of workflow `{workflow}` {problem}")]
    StepKind {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// What is wrong.
        problem: String,
    },
    /// A `when` or `for_each` expression does not parse or reads something
    /// that is not there.
    #[error("{0}")]
    Expression(Box<ExpressionProblem>),
    /// The steps of a parallel group are not declared together.
    #[error(
        "workflow `{workflow}`: the steps of parallel group `{group}` must be declared one after another, but step `{step}` comes between them"
    )]
    SplitGroup {
        /// The workflow.
        workflow: String,
        /// The group.
        group: String,
        /// The step in between.
        step: String,
    },
    /// A builder method was used out of place.
    #[error("workflow `{workflow}`: {message}")]
    Builder {
        /// The workflow.
        workflow: String,
        /// What was wrong.
        message: String,
    },
    /// The text could not be parsed (JSON/YAML syntax, wrong type, unknown key).
    #[error("invalid workflow definition: {0}")]
    Parse(String),
}

impl DefinitionError {
    fn from_parse(message: String) -> Self {
        // Validation errors travel through serde as strings; keep them readable.
        Self::Parse(message)
    }
}

/// Where a `when` or `for_each` expression went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "step `{step}` of workflow `{workflow}`: `{field}` expression `{source_text}` at {line}:{column}: {message}"
)]
pub struct ExpressionProblem {
    /// The workflow.
    pub workflow: String,
    /// The step.
    pub step: String,
    /// `when` or `for_each`.
    pub field: &'static str,
    /// The expression.
    pub source_text: String,
    /// 1-based line in the expression.
    pub line: usize,
    /// 1-based column in the expression.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// The serialized form: what users write in JSON or YAML.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    #[serde(default = "one")]
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    deadline: Option<Duration>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    sleep: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<RawSignal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workflow: Option<RawChild>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    when: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    for_each: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compensation: Option<RawCompensation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<RetryPolicy>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    timeout: Option<Duration>,
    /// Absent: after the step declared before it (or its group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_from: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum RawCompensation {
    Worker(String),
    Full(Compensation),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum RawSignal {
    Name(String),
    Full(RawSignalFull),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignalFull {
    name: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    timeout: Option<Duration>,
    /// `fail`, or `{default: <output>}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_timeout: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum RawChild {
    Name(String),
    Full {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
}

mod opt_duration {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration_serde::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration_serde::deserialize(d).map(Some)
    }
}

/// The steps each step comes after when it does not say: the step declared
/// before it, or — for the steps of a parallel group — the step before the
/// group, and for the step after a group, every step of the group.
pub(crate) fn implicit_after<'a>(
    steps: impl IntoIterator<Item = (&'a StepName, Option<&'a str>)>,
) -> Vec<Vec<StepName>> {
    let mut out = Vec::new();
    // What a plain step comes after.
    let mut frontier: Vec<StepName> = Vec::new();
    // The open group: its name, what its steps come after, its steps so far.
    let mut open: Option<(&str, Vec<StepName>, Vec<StepName>)> = None;
    for (name, group) in steps {
        match (group, &mut open) {
            (Some(g), Some((current, base, members))) if *current == g => {
                out.push(base.clone());
                members.push(name.clone());
                frontier = members.clone();
            }
            (Some(g), _) => {
                out.push(frontier.clone());
                open = Some((g, frontier.clone(), vec![name.clone()]));
                frontier = vec![name.clone()];
            }
            (None, _) => {
                out.push(frontier.clone());
                open = None;
                frontier = vec![name.clone()];
            }
        }
    }
    out
}

fn expression(
    workflow: &str,
    step: &str,
    field: &'static str,
    source: String,
) -> Result<Expr, DefinitionError> {
    Expr::parse(&source).map_err(|e| {
        DefinitionError::Expression(Box::new(ExpressionProblem {
            workflow: workflow.to_string(),
            step: step.to_string(),
            field,
            source_text: source.clone(),
            line: e.line,
            column: e.column,
            message: e.message,
        }))
    })
}

impl TryFrom<RawWorkflow> for WorkflowDefinition {
    type Error = DefinitionError;

    fn try_from(raw: RawWorkflow) -> Result<Self, DefinitionError> {
        let names: Vec<StepName> = raw
            .steps
            .iter()
            .map(|s| StepName::from(s.name.as_str()))
            .collect();
        let implicit = implicit_after(
            names
                .iter()
                .zip(raw.steps.iter().map(|s| s.group.as_deref())),
        );
        let mut steps = Vec::with_capacity(raw.steps.len());
        for (s, implicit) in raw.steps.into_iter().zip(implicit) {
            let step = s.name.clone();
            let problem = |problem: String| DefinitionError::StepKind {
                workflow: raw.name.clone(),
                step: step.clone(),
                problem,
            };
            let mut kinds = Vec::new();
            if let Some(worker) = s.worker {
                kinds.push((
                    "worker",
                    StepKind::Task {
                        worker: WorkerName::from(worker),
                    },
                ));
            }
            if let Some(duration) = s.sleep {
                kinds.push(("sleep", StepKind::Sleep { duration }));
            }
            if let Some(signal) = s.signal {
                kinds.push(("signal", StepKind::Signal(match signal {
                    RawSignal::Name(name) => SignalWait {
                        name,
                        timeout: None,
                        on_timeout: OnTimeout::Fail,
                    },
                    RawSignal::Full(f) => SignalWait {
                        on_timeout: match f.on_timeout {
                            None => OnTimeout::Fail,
                            Some(serde_json::Value::String(s)) if s == "fail" => OnTimeout::Fail,
                            Some(serde_json::Value::Object(mut m))
                                if m.len() == 1 && m.contains_key("default") =>
                            {
                                OnTimeout::Default(m.remove("default").unwrap_or_default())
                            }
                            Some(other) => {
                                return Err(problem(format!(
                                    "has signal `on_timeout: {other}`; it must be `fail` or `{{default: <output>}}`"
                                )));
                            }
                        },
                        name: f.name,
                        timeout: f.timeout,
                    },
                })));
            }
            if let Some(child) = s.workflow {
                let (name, version) = match child {
                    RawChild::Name(name) => (name, None),
                    RawChild::Full { name, version } => (name, version),
                };
                kinds.push((
                    "workflow",
                    StepKind::Workflow(ChildWorkflow {
                        workflow: WorkflowName::from(name),
                        version,
                    }),
                ));
            }
            let kind = match kinds.len() {
                1 => kinds.pop().map(|(_, k)| k).expect("one kind"),
                0 => {
                    return Err(problem(
                        "says neither what it runs nor what it waits for; give it one of `worker`, `sleep`, `signal` or `workflow`".into(),
                    ));
                }
                _ => {
                    let keys: Vec<String> = kinds.iter().map(|(k, _)| format!("`{k}`")).collect();
                    return Err(problem(format!(
                        "has {}; a step has exactly one of them",
                        keys.join(" and ")
                    )));
                }
            };
            if s.max_concurrency.is_some() && s.for_each.is_none() {
                return Err(problem("has `max_concurrency` without `for_each`".into()));
            }
            let when = s
                .when
                .map(|w| expression(&raw.name, &step, "when", w))
                .transpose()?;
            let for_each = s
                .for_each
                .map(|f| {
                    expression(&raw.name, &step, "for_each", f).map(|items| ForEach {
                        items,
                        max_concurrency: s.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY),
                    })
                })
                .transpose()?;
            let after = match s.after {
                Some(after) => after.into_iter().map(StepName::from).collect(),
                None => implicit,
            };
            let timeout = s.timeout.unwrap_or_else(|| default_timeout_of(&kind));
            steps.push(StepDefinition {
                name: StepName::from(s.name),
                kind,
                compensation: s.compensation.map(|c| match c {
                    RawCompensation::Worker(w) => Compensation::new(w),
                    RawCompensation::Full(c) => c,
                }),
                retry: s.retry.unwrap_or_default(),
                timeout,
                after,
                input_from: s.input_from.map(StepName::from),
                when,
                for_each,
                group: s.group,
            });
        }
        validate(raw.name, raw.version, raw.description, raw.deadline, steps)
    }
}

/// A step's timeout when it does not set one.
pub(crate) fn default_timeout_of(kind: &StepKind) -> Duration {
    match kind {
        StepKind::Workflow(_) => DEFAULT_CHILD_TIMEOUT,
        _ => DEFAULT_STEP_TIMEOUT,
    }
}

impl From<WorkflowDefinition> for RawWorkflow {
    fn from(def: WorkflowDefinition) -> Self {
        let implicit = implicit_after(def.steps.iter().map(|s| (&s.name, s.group.as_deref())));
        let steps = def
            .steps
            .into_iter()
            .zip(implicit)
            .map(|(s, implicit)| {
                let default_timeout = default_timeout_of(&s.kind);
                let mut raw = RawStep {
                    name: s.name.to_string(),
                    group: s.group,
                    when: s.when.map(|w| w.as_str().to_string()),
                    max_concurrency: s
                        .for_each
                        .as_ref()
                        .map(|f| f.max_concurrency)
                        .filter(|&m| m != DEFAULT_MAX_CONCURRENCY),
                    for_each: s.for_each.map(|f| f.items.as_str().to_string()),
                    compensation: s.compensation.map(|c| {
                        if c == Compensation::new(c.worker.clone()) {
                            RawCompensation::Worker(c.worker.to_string())
                        } else {
                            RawCompensation::Full(c)
                        }
                    }),
                    retry: (s.retry != RetryPolicy::default()).then_some(s.retry),
                    timeout: (s.timeout != default_timeout).then_some(s.timeout),
                    after: (s.after != implicit)
                        .then(|| s.after.iter().map(|a| a.to_string()).collect()),
                    input_from: s.input_from.map(|i| i.to_string()),
                    ..RawStep::default()
                };
                match s.kind {
                    StepKind::Task { worker } => raw.worker = Some(worker.to_string()),
                    StepKind::Sleep { duration } => raw.sleep = Some(duration),
                    StepKind::Signal(w) => {
                        raw.signal =
                            Some(if w.timeout.is_none() && w.on_timeout == OnTimeout::Fail {
                                RawSignal::Name(w.name)
                            } else {
                                RawSignal::Full(RawSignalFull {
                                    name: w.name,
                                    timeout: w.timeout,
                                    on_timeout: match w.on_timeout {
                                        OnTimeout::Fail => None,
                                        OnTimeout::Default(v) => {
                                            Some(serde_json::json!({ "default": v }))
                                        }
                                    },
                                })
                            })
                    }
                    StepKind::Workflow(c) => {
                        raw.workflow = Some(match c.version {
                            None => RawChild::Name(c.workflow.to_string()),
                            Some(version) => RawChild::Full {
                                name: c.workflow.to_string(),
                                version: Some(version),
                            },
                        })
                    }
                }
                raw
            })
            .collect();
        RawWorkflow {
            name: def.name.to_string(),
            version: def.version,
            description: def.description,
            deadline: def.deadline,
            steps,
        }
    }
}

/// Checks a definition and computes its graph.
pub(crate) fn validate(
    name: String,
    version: u32,
    description: Option<String>,
    deadline: Option<Duration>,
    steps: Vec<StepDefinition>,
) -> Result<WorkflowDefinition, DefinitionError> {
    let workflow = name.clone();
    if name.trim().is_empty() {
        return Err(DefinitionError::EmptyWorkflowName);
    }
    if version == 0 {
        return Err(DefinitionError::ZeroVersion { workflow });
    }
    if steps.is_empty() {
        return Err(DefinitionError::EmptyWorkflow { workflow });
    }
    if deadline.is_some_and(|d| d.is_zero()) {
        return Err(DefinitionError::Builder {
            workflow,
            message: "the workflow deadline is zero".into(),
        });
    }
    let mut seen = HashSet::new();
    for (i, s) in steps.iter().enumerate() {
        let step = s.name.to_string();
        if step.trim().is_empty() {
            return Err(DefinitionError::EmptyStepName {
                workflow,
                position: i + 1,
            });
        }
        if step.contains(['[', ']']) {
            return Err(DefinitionError::StepKind {
                workflow,
                step,
                problem: "has `[` or `]` in its name; those mark the branches of a fan-out".into(),
            });
        }
        if !seen.insert(s.name.clone()) {
            return Err(DefinitionError::DuplicateStep { workflow, step });
        }
        let kind_problem = match &s.kind {
            StepKind::Task { worker } if worker.as_str().trim().is_empty() => {
                return Err(DefinitionError::EmptyWorkerName {
                    workflow,
                    step,
                    what: "step",
                });
            }
            StepKind::Task { .. } => None,
            StepKind::Sleep { duration } if duration.is_zero() => {
                Some("sleeps for zero time".to_string())
            }
            StepKind::Signal(w) if w.name.trim().is_empty() => {
                Some("waits for a signal with an empty name".to_string())
            }
            StepKind::Signal(w) if w.timeout.is_some_and(|t| t.is_zero()) => {
                Some(format!("waits for signal `{}` with a zero timeout", w.name))
            }
            StepKind::Workflow(c) if c.workflow.as_str().trim().is_empty() => {
                Some("starts a sub-workflow with an empty name".to_string())
            }
            StepKind::Workflow(c) if c.workflow.as_str() == name => Some(format!(
                "starts workflow `{name}` as a sub-workflow of itself; that would never end"
            )),
            _ => None,
        }
        .or_else(|| match (&s.kind, &s.compensation) {
            (StepKind::Task { .. }, _) | (_, None) => None,
            (StepKind::Workflow(_), Some(_)) => Some(
                "has a `compensation`, but a sub-workflow step is undone by compensating the child workflow; remove it".to_string(),
            ),
            (_, Some(_)) => Some(
                "has a `compensation`, but sleeping and waiting for a signal have nothing to undo; remove it".to_string(),
            ),
        })
        .or_else(|| match (&s.kind, &s.for_each) {
            (_, None) | (StepKind::Task { .. }, Some(_)) => None,
            (_, Some(_)) => Some("has `for_each`, which only worker steps can have".to_string()),
        })
        .or_else(|| {
            s.for_each
                .as_ref()
                .filter(|f| f.max_concurrency == 0)
                .map(|_| "has `max_concurrency` 0; at least one branch must run".to_string())
        });
        if let Some(problem) = kind_problem {
            return Err(DefinitionError::StepKind {
                workflow,
                step,
                problem,
            });
        }
        if let Some(problem) = s.retry.problem() {
            return Err(DefinitionError::InvalidRetry {
                workflow,
                step,
                what: "step",
                problem,
            });
        }
        if s.timeout.is_zero() {
            return Err(DefinitionError::ZeroTimeout {
                workflow,
                step,
                what: "step",
            });
        }
        if let Some(c) = &s.compensation {
            if c.worker.as_str().trim().is_empty() {
                return Err(DefinitionError::EmptyWorkerName {
                    workflow,
                    step,
                    what: "compensation",
                });
            }
            if let Some(problem) = c.retry.problem() {
                return Err(DefinitionError::InvalidRetry {
                    workflow,
                    step,
                    what: "compensation",
                    problem,
                });
            }
            if c.timeout.is_zero() {
                return Err(DefinitionError::ZeroTimeout {
                    workflow,
                    step,
                    what: "compensation",
                });
            }
        }
    }
    // The steps of a group are declared together.
    let mut closed: Vec<&str> = Vec::new();
    let mut current: Option<&str> = None;
    for s in &steps {
        let g = s.group.as_deref();
        if g != current {
            if let Some(c) = current {
                closed.push(c);
            }
            if let Some(g) = g
                && closed.contains(&g)
            {
                let between = steps
                    .iter()
                    .skip_while(|x| x.group.as_deref() != Some(g))
                    .find(|x| x.group.as_deref() != Some(g))
                    .map_or_else(String::new, |x| x.name.to_string());
                return Err(DefinitionError::SplitGroup {
                    workflow,
                    group: g.to_string(),
                    step: between,
                });
            }
            current = g;
        }
    }
    let by_name: std::collections::HashMap<String, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.to_string(), i))
        .collect();
    let index_of = |n: &StepName| by_name.get(n.as_str()).copied();
    let mut deps = Vec::with_capacity(steps.len());
    for s in &steps {
        let mut d = Vec::with_capacity(s.after.len());
        for a in &s.after {
            match index_of(a) {
                Some(j) if !d.contains(&j) => d.push(j),
                Some(_) => {}
                None => {
                    return Err(DefinitionError::UnknownDependency {
                        workflow,
                        step: s.name.to_string(),
                        missing: a.to_string(),
                    });
                }
            }
        }
        deps.push(d);
    }
    if let Some(cycle) = find_cycle(&deps) {
        return Err(DefinitionError::Cycle {
            workflow,
            steps: cycle
                .into_iter()
                .map(|i| steps[i].name.to_string())
                .collect(),
        });
    }
    let mut dependents = vec![Vec::new(); steps.len()];
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            dependents[j].push(i);
        }
    }
    for (i, s) in steps.iter().enumerate() {
        if let Some(source) = &s.input_from {
            let reason = match index_of(source) {
                None => Some("is not a step of this workflow"),
                Some(j) if !is_ancestor(&deps, j, i) => {
                    Some("does not always finish before it (add it to `after`)")
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                return Err(DefinitionError::BadInputSource {
                    workflow,
                    step: s.name.to_string(),
                    source_step: source.to_string(),
                    reason,
                });
            }
        }
        let exprs = s
            .when
            .iter()
            .map(|e| ("when", e))
            .chain(s.for_each.iter().map(|f| ("for_each", &f.items)));
        for (field, expr) in exprs {
            for (reference, line, column) in expr.references() {
                let message = match reference {
                    Reference::Input | Reference::AllSteps => continue,
                    Reference::Other(var) => format!(
                        "unknown variable `{var}`; an expression reads `input` (the workflow input) and `steps` (the outputs of earlier steps)"
                    ),
                    Reference::Step(other) => match by_name.get(other.as_str()).copied() {
                        None => {
                            format!("`steps.{other}`: there is no step `{other}` in this workflow")
                        }
                        Some(j) if j == i => format!(
                            "`steps.{other}` is this step's own output, which does not exist yet"
                        ),
                        Some(j) if !is_ancestor(&deps, j, i) => format!(
                            "`steps.{other}`: step `{other}` does not always finish before `{}` (add it to `after`)",
                            s.name
                        ),
                        Some(_) => continue,
                    },
                };
                return Err(DefinitionError::Expression(Box::new(ExpressionProblem {
                    workflow,
                    step: s.name.to_string(),
                    field,
                    source_text: expr.as_str().to_string(),
                    line,
                    column,
                    message,
                })));
            }
        }
    }
    Ok(WorkflowDefinition {
        name: WorkflowName::from(name),
        version,
        description,
        deadline,
        steps,
        sinks: (0..dependents.len())
            .filter(|&i| dependents[i].is_empty())
            .collect(),
        deps,
        dependents,
        by_name,
    })
}

/// True when `ancestor` must complete before `step` can start.
fn is_ancestor(deps: &[Vec<usize>], ancestor: usize, step: usize) -> bool {
    let mut stack = deps[step].clone();
    let mut seen = vec![false; deps.len()];
    while let Some(n) = stack.pop() {
        if n == ancestor {
            return true;
        }
        if !std::mem::replace(&mut seen[n], true) {
            stack.extend_from_slice(&deps[n]);
        }
    }
    false
}

/// A cycle in the "comes after" graph, as step indexes with the first repeated.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: usize,
        deps: &[Vec<usize>],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[n] = Mark::Open;
        path.push(n);
        for &d in &deps[n] {
            match marks[d] {
                Mark::Open => {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    // `path` runs from dependents to dependencies; report it in
                    // execution order (dependency first).
                    let mut cycle: Vec<usize> = path[start..].iter().rev().copied().collect();
                    cycle.insert(0, n);
                    cycle.dedup();
                    let first = cycle[0];
                    cycle.push(first);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(d, deps, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[n] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; deps.len()];
    let mut path = Vec::new();
    for n in 0..deps.len() {
        if marks[n] == Mark::New
            && let Some(c) = visit(n, deps, &mut marks, &mut path)
        {
            return Some(c);
        }
    }
    None
}

/// A cycle among `defs` of workflows that start each other as
/// sub-workflows, as names with the first repeated at the end. The runtime
/// refuses to start with one, and `multiagents workflow deploy` to register
/// one.
///
/// ```
/// use multiagents_core::WorkflowBuilder;
/// use multiagents_core::workflow::child_cycle;
///
/// let a = WorkflowBuilder::new("a").sub_workflow("b", "b").build()?;
/// let b = WorkflowBuilder::new("b").sub_workflow("a", "a").build()?;
/// assert_eq!(child_cycle(&[a.clone()]), None);
/// assert_eq!(child_cycle(&[a, b]), Some(vec!["a".into(), "b".into(), "a".into()]));
/// # Ok::<(), multiagents_core::DefinitionError>(())
/// ```
pub fn child_cycle(defs: &[WorkflowDefinition]) -> Option<Vec<String>> {
    use std::collections::{HashMap, HashSet};
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for d in defs {
        children
            .entry(d.name().as_str())
            .or_default()
            .extend(d.children().map(|c| c.workflow.as_str()));
    }
    fn visit<'a>(
        n: &'a str,
        children: &HashMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut HashSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|p| *p == n) {
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if !done.insert(n) {
            return None;
        }
        path.push(n);
        for c in children.get(n).into_iter().flatten() {
            if let Some(cycle) = visit(c, children, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut names: Vec<&str> = children.keys().copied().collect();
    names.sort_unstable();
    let mut done = HashSet::new();
    for n in names {
        if let Some(c) = visit(n, &children, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests;

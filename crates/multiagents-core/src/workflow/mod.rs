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
//! * `steps` holds the output of every step completed so far, by step name.
//!   A worker reads one with `ctx.output::<T>("reserve")`.
//!
//! A compensation receives the same document: the workflow input (or its
//! step's `input_from`) as `input`, and every completed output — including
//! the output of the step it undoes — under `steps`.

mod builder;
pub mod diagram;
mod retry;

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use builder::WorkflowBuilder;
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
    steps: Vec<StepDefinition>,
    /// `deps[i]`: indexes of the steps step `i` comes after.
    deps: Vec<Vec<usize>>,
    /// `dependents[i]`: indexes of the steps that come after step `i`.
    dependents: Vec<Vec<usize>>,
}

/// One step of a workflow.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDefinition {
    /// Unique within the workflow.
    pub name: StepName,
    /// The worker type that runs it.
    pub worker: WorkerName,
    /// How to undo it, if it can be undone.
    pub compensation: Option<Compensation>,
    /// Attempts and back-off.
    pub retry: RetryPolicy,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// The steps it comes after.
    pub after: Vec<StepName>,
    /// Where its `input` comes from.
    pub input_from: Option<StepName>,
}

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

    /// The steps, in declaration order.
    pub fn steps(&self) -> &[StepDefinition] {
        &self.steps
    }

    /// The index of a step by name.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name.as_str() == name)
    }

    /// Indexes of the steps that step `index` comes after.
    pub fn dependencies(&self, index: usize) -> &[usize] {
        &self.deps[index]
    }

    /// Indexes of the steps that come after step `index`.
    pub fn dependents(&self, index: usize) -> &[usize] {
        &self.dependents[index]
    }

    /// Every worker name the definition uses (steps and compensations).
    pub fn workers(&self) -> impl Iterator<Item = &WorkerName> {
        self.steps.iter().flat_map(|s| {
            std::iter::once(&s.worker).chain(s.compensation.as_ref().map(|c| &c.worker))
        })
    }

    /// Parses and validates a JSON definition.
    pub fn from_json(text: &str) -> Result<Self, DefinitionError> {
        serde_json::from_str(text).map_err(|e| DefinitionError::from_parse(e.to_string()))
    }

    /// Parses and validates a YAML definition.
    pub fn from_yaml(text: &str) -> Result<Self, DefinitionError> {
        serde_yaml::from_str(text).map_err(|e| DefinitionError::from_parse(e.to_string()))
    }

    /// The definition as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The definition as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
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

/// The serialized form: what users write in JSON or YAML.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    #[serde(default = "one")]
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    worker: String,
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
    /// Absent: after the step declared before it.
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

impl TryFrom<RawWorkflow> for WorkflowDefinition {
    type Error = DefinitionError;

    fn try_from(raw: RawWorkflow) -> Result<Self, DefinitionError> {
        let mut previous: Option<String> = None;
        let mut steps = Vec::with_capacity(raw.steps.len());
        for s in raw.steps {
            let after = match s.after {
                Some(after) => after,
                None => previous.iter().cloned().collect(),
            };
            previous = Some(s.name.clone());
            steps.push(StepDefinition {
                name: StepName::from(s.name),
                worker: WorkerName::from(s.worker),
                compensation: s.compensation.map(|c| match c {
                    RawCompensation::Worker(w) => Compensation::new(w),
                    RawCompensation::Full(c) => c,
                }),
                retry: s.retry.unwrap_or_default(),
                timeout: s.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT),
                after: after.into_iter().map(StepName::from).collect(),
                input_from: s.input_from.map(StepName::from),
            });
        }
        validate(raw.name, raw.version, raw.description, steps)
    }
}

impl From<WorkflowDefinition> for RawWorkflow {
    fn from(def: WorkflowDefinition) -> Self {
        let mut previous: Option<StepName> = None;
        let steps = def
            .steps
            .into_iter()
            .map(|s| {
                let implicit = s.after.len() == previous.iter().count()
                    && s.after.iter().zip(previous.iter()).all(|(a, b)| a == b);
                previous = Some(s.name.clone());
                RawStep {
                    name: s.name.to_string(),
                    worker: s.worker.to_string(),
                    compensation: s.compensation.map(|c| {
                        if c == Compensation::new(c.worker.clone()) {
                            RawCompensation::Worker(c.worker.to_string())
                        } else {
                            RawCompensation::Full(c)
                        }
                    }),
                    retry: (s.retry != RetryPolicy::default()).then_some(s.retry),
                    timeout: (s.timeout != DEFAULT_STEP_TIMEOUT).then_some(s.timeout),
                    after: (!implicit).then(|| s.after.iter().map(|a| a.to_string()).collect()),
                    input_from: s.input_from.map(|i| i.to_string()),
                }
            })
            .collect();
        RawWorkflow {
            name: def.name.to_string(),
            version: def.version,
            description: def.description,
            steps,
        }
    }
}

/// Checks a definition and computes its graph.
pub(crate) fn validate(
    name: String,
    version: u32,
    description: Option<String>,
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
    let mut seen = HashSet::new();
    for (i, s) in steps.iter().enumerate() {
        let step = s.name.to_string();
        if step.trim().is_empty() {
            return Err(DefinitionError::EmptyStepName {
                workflow,
                position: i + 1,
            });
        }
        if !seen.insert(s.name.clone()) {
            return Err(DefinitionError::DuplicateStep { workflow, step });
        }
        if s.worker.as_str().trim().is_empty() {
            return Err(DefinitionError::EmptyWorkerName {
                workflow,
                step,
                what: "step",
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
    let index_of = |n: &StepName| steps.iter().position(|s| &s.name == n);
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
    }
    Ok(WorkflowDefinition {
        name: WorkflowName::from(name),
        version,
        description,
        steps,
        deps,
        dependents,
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

#[cfg(test)]
mod tests;

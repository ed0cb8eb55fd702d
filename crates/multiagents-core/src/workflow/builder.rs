//! The fluent builder. Step modifiers (`compensate_with`, `retry`, …) apply
//! to the step added last; nothing is checked until [`WorkflowBuilder::build`],
//! which reports the first problem found, naming the culprit.

use std::time::Duration;

use super::{
    Compensation, DEFAULT_STEP_TIMEOUT, DefinitionError, RetryPolicy, StepDefinition,
    WorkflowDefinition, validate,
};
use crate::ids::{StepName, WorkerName};

/// Builds a [`WorkflowDefinition`].
///
/// ```
/// use std::time::Duration;
/// use multiagents_core::workflow::{RetryPolicy, WorkflowBuilder};
///
/// let def = WorkflowBuilder::new("ecommerce_order")
///     .step("validate", "validate_order")
///     .step("reserve", "check_inventory")
///     .compensate_with("release_inventory")
///     .step("charge", "process_payment")
///     .compensate_with("refund_payment")
///     .retry(RetryPolicy::attempts(5))
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// assert_eq!(def.steps().len(), 3);
/// # Ok::<(), multiagents_core::workflow::DefinitionError>(())
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until .build() is called"]
pub struct WorkflowBuilder {
    name: String,
    version: u32,
    description: Option<String>,
    default_retry: RetryPolicy,
    default_timeout: Duration,
    steps: Vec<Draft>,
    misuse: Option<String>,
}

#[derive(Clone, Debug)]
struct Draft {
    name: StepName,
    worker: WorkerName,
    compensation: Option<Compensation>,
    retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
    after: Option<Vec<StepName>>,
    input_from: Option<StepName>,
}

impl WorkflowBuilder {
    /// A new, empty workflow called `name`, version 1.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: 1,
            description: None,
            default_retry: RetryPolicy::default(),
            default_timeout: DEFAULT_STEP_TIMEOUT,
            steps: Vec::new(),
            misuse: None,
        }
    }

    /// Sets the version (default 1).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets a description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// The retry policy of steps that do not set their own.
    pub fn default_retry(mut self, policy: RetryPolicy) -> Self {
        self.default_retry = policy;
        self
    }

    /// The timeout of steps that do not set their own.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// Adds a step that runs `worker`, after the step added before it.
    pub fn step(mut self, name: impl Into<StepName>, worker: impl Into<WorkerName>) -> Self {
        self.steps.push(Draft {
            name: name.into(),
            worker: worker.into(),
            compensation: None,
            retry: None,
            timeout: None,
            after: None,
            input_from: None,
        });
        self
    }

    fn last(&mut self, method: &str) -> Option<&mut Draft> {
        if self.steps.is_empty() && self.misuse.is_none() {
            self.misuse = Some(format!(".{method}() was called before any .step()"));
        }
        self.steps.last_mut()
    }

    /// The last step is undone by `worker`.
    pub fn compensate_with(mut self, worker: impl Into<WorkerName>) -> Self {
        let worker = worker.into();
        if let Some(s) = self.last("compensate_with") {
            s.compensation = Some(Compensation::new(worker));
        }
        self
    }

    /// The retry policy of the last step's compensation.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        let name = "compensation_retry";
        let misuse = match self.last(name) {
            Some(Draft {
                compensation: Some(c),
                ..
            }) => {
                c.retry = policy;
                None
            }
            Some(d) => Some(format!(
                ".{name}() on step `{}`, which has no compensation yet",
                d.name
            )),
            None => None,
        };
        self.misuse = self.misuse.or(misuse);
        self
    }

    /// The timeout of the last step's compensation.
    pub fn compensation_timeout(mut self, timeout: Duration) -> Self {
        let name = "compensation_timeout";
        let misuse = match self.last(name) {
            Some(Draft {
                compensation: Some(c),
                ..
            }) => {
                c.timeout = timeout;
                None
            }
            Some(d) => Some(format!(
                ".{name}() on step `{}`, which has no compensation yet",
                d.name
            )),
            None => None,
        };
        self.misuse = self.misuse.or(misuse);
        self
    }

    /// The last step's retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        if let Some(s) = self.last("retry") {
            s.retry = Some(policy);
        }
        self
    }

    /// How long one attempt of the last step may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        if let Some(s) = self.last("timeout") {
            s.timeout = Some(timeout);
        }
        self
    }

    /// The last step comes after exactly these steps (instead of the step
    /// declared before it). An empty list makes it start with the workflow.
    pub fn after<I, S>(mut self, steps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<StepName>,
    {
        let after = steps.into_iter().map(Into::into).collect();
        if let Some(s) = self.last("after") {
            s.after = Some(after);
        }
        self
    }

    /// The last step's `input` is the output of `step` rather than the
    /// workflow input.
    pub fn input_from(mut self, step: impl Into<StepName>) -> Self {
        let step = step.into();
        if let Some(s) = self.last("input_from") {
            s.input_from = Some(step);
        }
        self
    }

    /// Validates and returns the definition.
    pub fn build(self) -> Result<WorkflowDefinition, DefinitionError> {
        if let Some(message) = self.misuse {
            return Err(DefinitionError::Builder {
                workflow: self.name,
                message,
            });
        }
        let mut previous: Option<StepName> = None;
        let steps = self
            .steps
            .into_iter()
            .map(|d| {
                let after = d
                    .after
                    .unwrap_or_else(|| previous.iter().cloned().collect());
                previous = Some(d.name.clone());
                StepDefinition {
                    name: d.name,
                    worker: d.worker,
                    compensation: d.compensation,
                    retry: d.retry.unwrap_or_else(|| self.default_retry.clone()),
                    timeout: d.timeout.unwrap_or(self.default_timeout),
                    after,
                    input_from: d.input_from,
                }
            })
            .collect();
        validate(self.name, self.version, self.description, steps)
    }
}

//! The fluent builder. Step modifiers (`compensate_with`, `retry`, …) apply
//! to the step added last; nothing is checked until [`WorkflowBuilder::build`],
//! which reports the first problem found, naming the culprit.

use std::time::Duration;

use super::{
    ChildWorkflow, Compensation, DEFAULT_MAX_CONCURRENCY, DEFAULT_STEP_TIMEOUT, DefinitionError,
    ForEach, OnTimeout, RetryPolicy, SignalWait, StepDefinition, StepKind, WorkflowDefinition,
    default_timeout_of, expression, implicit_after, validate,
};
use crate::ids::{StepName, WorkerName, WorkflowName};

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
///
/// Parallel groups, conditions, fan-out, timers, signals and sub-workflows:
///
/// ```
/// use std::time::Duration;
/// use multiagents_core::workflow::{OnTimeout, WorkflowBuilder};
///
/// let def = WorkflowBuilder::new("order")
///     .deadline(Duration::from_secs(3600))
///     .step("validate", "validate_order")
///     .parallel("checks", |g| g.step("fraud", "fraud_check").step("address", "address_check"))
///     .step("wrap", "gift_wrap")
///     .when("has(input.gift_wrap) && input.gift_wrap")
///     .step("pack", "pack_item")
///     .for_each("input.items")
///     .max_concurrency(4)
///     .wait_for_signal("approval", "approve")
///     .signal_timeout(Duration::from_secs(600), OnTimeout::Fail)
///     .sleep("cool_off", Duration::from_secs(60))
///     .sub_workflow("ship", "shipping")
///     .build()?;
/// assert_eq!(def.dependencies(4), &[3]);
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
    deadline: Option<Duration>,
    steps: Vec<Draft>,
    misuse: Option<String>,
}

#[derive(Clone, Debug)]
struct Draft {
    name: StepName,
    kind: StepKind,
    compensation: Option<Compensation>,
    retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
    after: Option<Vec<StepName>>,
    input_from: Option<StepName>,
    when: Option<String>,
    for_each: Option<String>,
    max_concurrency: Option<u32>,
    group: Option<String>,
}

impl Draft {
    fn new(name: StepName, kind: StepKind) -> Self {
        Self {
            name,
            kind,
            compensation: None,
            retry: None,
            timeout: None,
            after: None,
            input_from: None,
            when: None,
            for_each: None,
            max_concurrency: None,
            group: None,
        }
    }
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
            deadline: None,
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

    /// The whole workflow must finish within `deadline`; past it, nothing
    /// new starts, steps in flight are told to stop, completed steps are
    /// compensated and the workflow ends `timed_out`.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Adds a step that runs `worker`, after the step added before it.
    pub fn step(mut self, name: impl Into<StepName>, worker: impl Into<WorkerName>) -> Self {
        let kind = StepKind::Task {
            worker: worker.into(),
        };
        self.steps.push(Draft::new(name.into(), kind));
        self
    }

    /// Adds a step that sleeps for `duration`. The timer is kept with the
    /// workflow's state, so it survives a restart of every process.
    pub fn sleep(mut self, name: impl Into<StepName>, duration: Duration) -> Self {
        self.steps
            .push(Draft::new(name.into(), StepKind::Sleep { duration }));
        self
    }

    /// Adds a step that waits for the signal `signal` (sent with
    /// `Client::signal` or `multiagents workflow signal`); its payload
    /// becomes the step's output. Waits forever unless
    /// [`signal_timeout`](Self::signal_timeout) says otherwise.
    pub fn wait_for_signal(mut self, name: impl Into<StepName>, signal: impl Into<String>) -> Self {
        let kind = StepKind::Signal(SignalWait {
            name: signal.into(),
            timeout: None,
            on_timeout: OnTimeout::Fail,
        });
        self.steps.push(Draft::new(name.into(), kind));
        self
    }

    /// How long the last step (a signal wait) waits, and what happens then.
    pub fn signal_timeout(mut self, timeout: Duration, on_timeout: OnTimeout) -> Self {
        let name = "signal_timeout";
        let misuse = match self.last(name) {
            Some(Draft {
                kind: StepKind::Signal(w),
                ..
            }) => {
                w.timeout = Some(timeout);
                w.on_timeout = on_timeout;
                None
            }
            Some(d) => Some(format!(
                ".{name}() on step `{}`, which does not wait for a signal",
                d.name
            )),
            None => None,
        };
        self.misuse = self.misuse.or(misuse);
        self
    }

    /// Adds a step that starts workflow `workflow` (its highest registered
    /// version) with this step's input and waits for it. The child's
    /// outputs become this step's output; if it fails, this step fails; if
    /// this step is compensated, the child is.
    pub fn sub_workflow(
        mut self,
        name: impl Into<StepName>,
        workflow: impl Into<WorkflowName>,
    ) -> Self {
        let kind = StepKind::Workflow(ChildWorkflow {
            workflow: workflow.into(),
            version: None,
        });
        self.steps.push(Draft::new(name.into(), kind));
        self
    }

    /// The version of the last step's sub-workflow.
    pub fn child_version(mut self, version: u32) -> Self {
        let name = "child_version";
        let misuse = match self.last(name) {
            Some(Draft {
                kind: StepKind::Workflow(c),
                ..
            }) => {
                c.version = Some(version);
                None
            }
            Some(d) => Some(format!(
                ".{name}() on step `{}`, which is not a sub-workflow step",
                d.name
            )),
            None => None,
        };
        self.misuse = self.misuse.or(misuse);
        self
    }

    /// Adds the steps `group` adds as a parallel group: they all start
    /// after the step before the group, and the step after the group waits
    /// for all of them. If one fails for good, the others still running are
    /// told to stop and every completed step is compensated.
    pub fn parallel(
        mut self,
        group: impl Into<String>,
        steps: impl FnOnce(WorkflowBuilder) -> WorkflowBuilder,
    ) -> Self {
        let group = group.into();
        let inner = steps(WorkflowBuilder::new(self.name.clone()));
        if inner.steps.is_empty() && self.misuse.is_none() {
            self.misuse = Some(format!("parallel group `{group}` has no steps"));
        }
        self.misuse = self.misuse.or(inner.misuse);
        for mut d in inner.steps {
            d.group = Some(group.clone());
            self.steps.push(d);
        }
        self
    }

    /// The last step runs only when the [expression](super::expr) holds;
    /// otherwise it is recorded as skipped and the workflow goes on.
    pub fn when(mut self, condition: impl Into<String>) -> Self {
        let condition = condition.into();
        if let Some(s) = self.last("when") {
            s.when = Some(condition);
        }
        self
    }

    /// The last step runs once per item of the list the
    /// [expression](super::expr) gives; each branch gets its item as
    /// `input` and is named `step[i]`; the step's output is the list of the
    /// branches' outputs, in order.
    pub fn for_each(mut self, items: impl Into<String>) -> Self {
        let items = items.into();
        if let Some(s) = self.last("for_each") {
            s.for_each = Some(items);
        }
        self
    }

    /// At most `n` branches of the last step's fan-out run at once
    /// (default 10).
    pub fn max_concurrency(mut self, n: u32) -> Self {
        if let Some(s) = self.last("max_concurrency") {
            s.max_concurrency = Some(n);
        }
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
        let implicit = implicit_after(self.steps.iter().map(|d| (&d.name, d.group.as_deref())));
        let mut steps = Vec::with_capacity(self.steps.len());
        for (d, implicit) in self.steps.into_iter().zip(implicit) {
            let step = d.name.to_string();
            if d.max_concurrency.is_some() && d.for_each.is_none() {
                return Err(DefinitionError::Builder {
                    workflow: self.name,
                    message: format!(
                        ".max_concurrency() on step `{step}`, which has no .for_each()"
                    ),
                });
            }
            let when = d
                .when
                .map(|w| expression(&self.name, &step, "when", w))
                .transpose()?;
            let for_each = d
                .for_each
                .map(|f| {
                    expression(&self.name, &step, "for_each", f).map(|items| ForEach {
                        items,
                        max_concurrency: d.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY),
                    })
                })
                .transpose()?;
            let timeout = d.timeout.unwrap_or(match d.kind {
                StepKind::Workflow(_) => default_timeout_of(&d.kind),
                _ => self.default_timeout,
            });
            steps.push(StepDefinition {
                name: d.name,
                kind: d.kind,
                compensation: d.compensation,
                retry: d.retry.unwrap_or_else(|| self.default_retry.clone()),
                timeout,
                after: d.after.unwrap_or(implicit),
                input_from: d.input_from,
                when,
                for_each,
                group: d.group,
            });
        }
        validate(
            self.name,
            self.version,
            self.description,
            self.deadline,
            steps,
        )
    }
}

//! Workers: the "how". A worker is a named piece of code that takes a step's
//! input and returns its output — usually a plain `async fn` with
//! `#[worker("name")]` on it, or any type implementing [`Worker`].
//!
//! Workers own no state about workflows: the orchestrator tells them what to
//! do through commands and they answer through results. They are delivered
//! commands at least once, so a worker with side effects uses
//! [`WorkerContext::idempotency_key`] (the same for every attempt and every
//! redelivery of one step) to make them happen once.
//!
//! Retries are the orchestrator's job, under the step's durable retry
//! policy; a worker only says how it failed, with a [`WorkerError`]:
//! [`WorkerError::retry`] (transient, the default for `?`),
//! [`WorkerError::retry_after`] or [`WorkerError::fatal`] (do not retry).

mod manager;
pub mod testing;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

pub use crate::core::health::{ErrorKind, WorkerHealth};
pub use manager::{WorkerHandle, WorkerManager, WorkerManagerConfig, WorkerOptions};

use crate::core::{
    CorrelationId, Payload, Phase, RetryDirective, StepError, StepErrorKind, StepName, Timestamp,
    TransactionId, WorkflowName,
};

/// What a worker gets besides its input.
#[derive(Clone)]
pub struct WorkerContext {
    /// The workflow instance.
    pub transaction_id: TransactionId,
    /// The request chain.
    pub correlation_id: CorrelationId,
    /// The workflow's name.
    pub workflow: WorkflowName,
    /// The step this call is for.
    pub step: StepName,
    /// Forward, or undoing the step.
    pub phase: Phase,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// When the attempt times out, if known.
    pub deadline: Option<Timestamp>,
    /// Cancelled when the worker must stop (shutdown past the drain time, or
    /// the deadline passed). Long work should watch it.
    pub cancellation: CancellationToken,
    /// Formatted on first use: most workers never ask.
    idempotency_key: std::sync::OnceLock<String>,
    attempt_key: std::sync::OnceLock<Arc<str>>,
    /// The command document, `{"input": …, "steps": {…}}`.
    steps: Option<Payload>,
    /// Where outputs the command does not carry are read from.
    source: Option<Arc<dyn crate::store::WorkflowStates>>,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("transaction_id", &self.transaction_id)
            .field("correlation_id", &self.correlation_id)
            .field("workflow", &self.workflow)
            .field("step", &self.step)
            .field("phase", &self.phase)
            .field("attempt", &self.attempt)
            .field("deadline", &self.deadline)
            .field("has_store", &self.source.is_some())
            .finish_non_exhaustive()
    }
}

impl WorkerContext {
    /// A context for tests and hand-made calls.
    pub fn new(workflow: impl Into<WorkflowName>, step: impl Into<StepName>) -> Self {
        let transaction_id = TransactionId::new();
        let step = step.into();
        Self {
            transaction_id,
            correlation_id: CorrelationId::new(),
            workflow: workflow.into(),
            step,
            phase: Phase::Forward,
            attempt: 1,
            deadline: None,
            cancellation: CancellationToken::new(),
            idempotency_key: std::sync::OnceLock::new(),
            attempt_key: std::sync::OnceLock::new(),
            steps: None,
            source: None,
        }
    }

    pub(crate) fn from_parts(
        event: &crate::core::Event,
        steps: Option<Payload>,
        cancellation: CancellationToken,
        source: Option<Arc<dyn crate::store::WorkflowStates>>,
    ) -> Self {
        Self {
            transaction_id: event.transaction_id,
            correlation_id: event.correlation_id,
            workflow: event.workflow.clone(),
            step: event.step.clone().unwrap_or_else(|| StepName::new("")),
            phase: event.phase,
            attempt: event.attempt,
            deadline: event.deadline,
            cancellation,
            idempotency_key: std::sync::OnceLock::new(),
            attempt_key: std::sync::OnceLock::new(),
            steps,
            source,
        }
    }

    /// `transaction/step/phase`: the same for every attempt and every
    /// redelivery of this step in this phase (a fan-out branch, `step[i]`,
    /// has its own). Hand it to the API you call (a payment provider's
    /// `Idempotency-Key`, a unique column) so that the effect happens once
    /// however often the step runs: a timed-out attempt whose call still
    /// went through and its retry then apply it once between them.
    ///
    /// ```
    /// use multiagents::WorkerContext;
    ///
    /// let first = WorkerContext::new("orders", "charge");
    /// let retry = first.clone().with_attempt(2);
    /// assert_eq!(first.idempotency_key(), retry.idempotency_key());
    /// assert_ne!(first.attempt_key(), retry.attempt_key());
    /// ```
    pub fn idempotency_key(&self) -> &str {
        self.idempotency_key.get_or_init(|| {
            crate::core::event::idempotency_key(self.transaction_id, self.step.as_str(), self.phase)
        })
    }

    /// `transaction/step/phase/attempt`: the same for every redelivery of
    /// this attempt, different for the next one. Only for an API that
    /// remembers a *failure* under its key and would answer every retry with
    /// it; anything with a side effect wants
    /// [`idempotency_key`](Self::idempotency_key).
    pub fn attempt_key(&self) -> &str {
        self.attempt_key.get_or_init(|| {
            Arc::from(crate::core::event::attempt_key(
                self.transaction_id,
                self.step.as_str(),
                self.phase,
                self.attempt,
            ))
        })
    }

    /// The output of an earlier, completed step, decoded.
    ///
    /// A command carries the outputs of the steps its step comes after (and
    /// of its `input_from` step, and its own when undoing it), up to
    /// [`CARRIED_BYTES`](crate::core::saga::CARRIED_BYTES) together, smallest
    /// first; any other is read from the store when asked for, so that a
    /// command does not grow with the steps before it.
    ///
    /// ```
    /// use multiagents::WorkerContext;
    /// use multiagents::core::Payload;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(async {
    /// let carried = Payload::from_json_str(r#"{"reserve":{"id":7}}"#).expect("json");
    /// let ctx = WorkerContext::new("orders", "charge").with_outputs(carried);
    /// let reservation: serde_json::Value = ctx.output("reserve").await.expect("carried");
    /// assert_eq!(reservation["id"], 7);
    /// // Not carried, and no store to read it from:
    /// assert!(ctx.output::<serde_json::Value>("ship").await.is_err());
    /// # });
    /// ```
    pub async fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, WorkerError> {
        let raw = self.output_raw(step).await?;
        serde_json::from_str(raw.get()).map_err(|e| {
            WorkerError::fatal(format!(
                "the output of step `{step}` does not decode as the expected type: {e}"
            ))
            .with_kind("invalid_input")
        })
    }

    /// The outputs this command carries, by step name.
    fn carried(&self) -> Result<std::collections::HashMap<&str, &RawValue>, WorkerError> {
        #[derive(serde::Deserialize)]
        struct Doc<'a> {
            #[serde(borrow, default)]
            steps: std::collections::HashMap<&'a str, &'a RawValue>,
        }
        match &self.steps {
            None => Ok(Default::default()),
            Some(doc) => serde_json::from_str::<Doc<'_>>(doc.as_str())
                .map(|d| d.steps)
                .map_err(|e| WorkerError::fatal(format!("malformed step outputs: {e}"))),
        }
    }

    /// Every earlier step's output, by step name (empty when there is
    /// none). With a store this reads the whole workflow state: prefer
    /// [`output`](Self::output) of the steps you need.
    pub async fn outputs(&self) -> Result<serde_json::Map<String, serde_json::Value>, WorkerError> {
        let mut out = serde_json::Map::new();
        if let Some(states) = &self.source {
            let state = states
                .get(self.transaction_id)
                .await
                .map_err(|e| store_failed("the outputs of earlier steps", e))?;
            for step in state.iter().flat_map(|v| v.state.steps.iter()) {
                if let Some(o) = &step.output
                    && step.name != self.step
                {
                    out.insert(step.name.to_string(), o.parse().unwrap_or_default());
                }
            }
        }
        for (name, raw) in self.carried()? {
            out.entry(name.to_string())
                .or_insert_with(|| serde_json::from_str(raw.get()).unwrap_or_default());
        }
        Ok(out)
    }

    /// The output of an earlier step as raw JSON (see [`output`](Self::output)).
    pub async fn output_raw(&self, step: &str) -> Result<Box<RawValue>, WorkerError> {
        if let Some(raw) = self.carried()?.get(step) {
            return Ok((*raw).to_owned());
        }
        let missing = || {
            WorkerError::fatal(format!(
                "step `{step}` has no output (it has not completed before this step)"
            ))
            .with_kind("invalid_input")
        };
        let Some(states) = &self.source else {
            return Err(if self.steps.is_some() {
                WorkerError::fatal(format!(
                    "step `{step}` has no output in this command, which carries the outputs of the steps this one comes after, and this worker has no store to read others from: give its worker manager the store (`WorkerManager::store`)"
                ))
                .with_kind("invalid_input")
            } else {
                missing()
            });
        };
        let found = states
            .step_output(self.transaction_id, step)
            .await
            .map_err(|e| store_failed(&format!("the output of step `{step}`"), e))?;
        match found {
            Some(p) => Ok(p.as_raw().to_owned()),
            None => Err(missing()),
        }
    }

    /// Reads outputs the command does not carry from `states` (hand-made
    /// calls; a worker manager given a store does this itself).
    pub fn with_store(mut self, states: Arc<dyn crate::store::WorkflowStates>) -> Self {
        self.source = Some(states);
        self
    }

    /// Sets the outputs of earlier steps (tests): `outputs` is a JSON object
    /// of outputs by step name.
    pub fn with_outputs(mut self, outputs: Payload) -> Self {
        #[derive(Serialize)]
        struct Doc<'a> {
            steps: &'a RawValue,
        }
        self.steps = Payload::to_json(&Doc {
            steps: outputs.as_raw(),
        })
        .ok();
        self
    }

    /// Sets the attempt (tests); the attempt key follows.
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self.attempt_key = std::sync::OnceLock::new();
        self
    }

    /// Time left before the deadline, if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.since(Timestamp::now()))
    }
}

/// How a worker failed, and whether it is worth trying again.
///
/// Any error converts into a retryable `WorkerError` with `?`; say
/// [`WorkerError::fatal`] for failures a retry cannot fix (a declined card,
/// invalid input).
pub struct WorkerError {
    message: String,
    retry: RetryDirective,
    kind: Option<StepErrorKind>,
}

impl WorkerError {
    /// A transient failure: retry under the step's policy.
    pub fn retry(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retry: RetryDirective::Retry,
            kind: None,
        }
    }

    /// A transient failure that should not be retried before `delay`.
    pub fn retry_after(message: impl fmt::Display, delay: Duration) -> Self {
        Self {
            message: message.to_string(),
            retry: RetryDirective::after(delay),
            kind: None,
        }
    }

    /// A permanent failure: the step fails for good and the workflow compensates.
    pub fn fatal(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retry: RetryDirective::Never,
            kind: None,
        }
    }

    /// Tags the error with a short machine-readable kind (`declined`, `timeout`…).
    pub fn with_kind(mut self, kind: impl Into<StepErrorKind>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The retry directive.
    pub fn directive(&self) -> RetryDirective {
        self.retry
    }

    /// The kind, if tagged.
    pub fn kind(&self) -> Option<&StepErrorKind> {
        self.kind.as_ref()
    }

    /// True unless the error is fatal.
    pub fn is_retryable(&self) -> bool {
        self.retry != RetryDirective::Never
    }

    /// The wire form.
    pub fn into_step_error(self) -> StepError {
        StepError {
            message: self.message,
            retry: self.retry,
            kind: self.kind,
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for WorkerError {
    fn from(e: E) -> Self {
        WorkerError::retry(e)
    }
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Some(k) => write!(f, "{k}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl fmt::Debug for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerError")
            .field("message", &self.message)
            .field("retry", &self.retry)
            .field("kind", &self.kind)
            .finish()
    }
}

/// A worker: what the `#[worker]` attribute generates, and what a worker
/// that holds resources (a connection pool, a model client) implements by hand.
///
/// ```
/// use multiagents::worker::{Worker, WorkerContext, WorkerError};
/// use multiagents::core::Payload;
///
/// struct Ledger { /* a pool, say */ }
///
/// #[multiagents::async_trait]
/// impl Worker for Ledger {
///     fn name(&self) -> &str { "record_entry" }
///     async fn run(&self, input: Payload, ctx: WorkerContext) -> Result<Payload, WorkerError> {
///         let amount: u64 = input.parse().map_err(WorkerError::fatal)?;
///         Payload::to_json(&serde_json::json!({"recorded": amount, "key": ctx.idempotency_key()}))
///             .map_err(WorkerError::fatal)
///     }
/// }
/// ```
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// The worker type's name: steps name it, and its commands arrive on the
    /// topic of that name.
    fn name(&self) -> &str;

    /// Runs one call. `input` is the step's input (see [`crate::core::workflow`]).
    async fn run(&self, input: Payload, ctx: WorkerContext) -> Result<Payload, WorkerError>;
}

/// A store read that failed: retryable, the store may be back soon.
fn store_failed(what: &str, e: crate::store::StoreError) -> WorkerError {
    WorkerError::retry(format!("reading {what} from the store failed: {e}")).with_kind("store")
}

/// Decodes a typed input, failing for good (no retry can fix bad input).
pub fn decode_input<T: DeserializeOwned>(worker: &str, input: &Payload) -> Result<T, WorkerError> {
    input.parse().map_err(|e| {
        WorkerError::fatal(format!(
            "input for worker `{worker}` does not decode: {e} (input: {})",
            truncate(input.as_str(), 200)
        ))
        .with_kind("invalid_input")
    })
}

/// Encodes a typed output.
pub fn encode_output<T: Serialize>(worker: &str, output: &T) -> Result<Payload, WorkerError> {
    Payload::to_json(output).map_err(|e| {
        WorkerError::fatal(format!("output of worker `{worker}` does not encode: {e}"))
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A worker from a closure over typed input and output.
///
/// ```
/// use multiagents::worker::{from_fn, WorkerError};
///
/// let double = from_fn("double", |n: u64, _ctx| async move { Ok::<_, WorkerError>(n * 2) });
/// # let _ = double;
/// ```
pub fn from_fn<I, O, F, Fut>(name: impl Into<String>, f: F) -> FnWorker<F, I, O>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I, WorkerContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<O, WorkerError>> + Send + 'static,
{
    FnWorker {
        name: name.into(),
        f,
        _types: std::marker::PhantomData,
    }
}

/// See [`from_fn`].
pub struct FnWorker<F, I, O> {
    name: String,
    f: F,
    _types: std::marker::PhantomData<fn(I) -> O>,
}

#[async_trait]
impl<I, O, F, Fut> Worker for FnWorker<F, I, O>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I, WorkerContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<O, WorkerError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, input: Payload, ctx: WorkerContext) -> Result<Payload, WorkerError> {
        let input: I = decode_input(&self.name, &input)?;
        let output = (self.f)(input, ctx).await?;
        encode_output(&self.name, &output)
    }
}

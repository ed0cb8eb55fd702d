//! LLM workers (feature `llm`): the programs of the `multiagents-llm`
//! crate — a client for OpenAI-compatible chat APIs, typed signatures,
//! `Predict`, `ChainOfThought`, `ReAct` with tools, few-shot optimisers and
//! replays — and [`LlmWorker`], which makes one a saga step with retries,
//! timeouts and compensation like any other.
//!
//! ```no_run
//! # async fn f() -> Result<(), multiagents::llm::LlmError> {
//! use multiagents::llm::{ChatRequest, LlmClient, LlmConfig, Message};
//!
//! let client = LlmClient::new(LlmConfig::from_env()?.model("gpt-4o-mini"));
//! let reply = client
//!     .chat(&ChatRequest::new(vec![Message::user("Say hello in French.")]))
//!     .await?;
//! println!("{} ({} tokens)", reply.content, reply.usage.total());
//! # Ok(()) }
//! ```

use async_trait::async_trait;
use serde_json::{Map, Value};

pub use multiagents_llm::*;
pub use multiagents_macros::{Signature, tool};

use crate::core::Payload;
use crate::worker::{Worker, WorkerContext, WorkerError};

/// A worker whose body is an LLM program.
///
/// The step's input must be a JSON object holding the signature's inputs
/// (other keys are ignored); the step's output is the object of its outputs.
/// A transient LLM failure (timeout, 429, 5xx) or a reply that could not be
/// used is a retryable error; inputs that do not fit the signature fail the
/// step for good.
///
/// ```no_run
/// use multiagents::llm::{LlmClient, LlmConfig, LlmWorker, Predict, Signature};
///
/// # fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let classify = LlmWorker::predict(
///     "classify_ticket",
///     LlmClient::new(LlmConfig::from_env()?),
///     Predict::new(Signature::parse("ticket -> category, urgent: bool")?),
/// );
/// // Runtime::builder().worker(classify) …
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LlmWorker {
    name: String,
    client: LlmClient,
    program: std::sync::Arc<dyn Program>,
    usage: UsageMeter,
    budget: Option<u64>,
}

/// The key under which an LLM step puts its token usage in its output, so
/// that later LLM steps of the same workflow can count against a budget.
pub const USAGE_KEY: &str = "_usage";

/// Tokens used by earlier LLM steps of this workflow, from their outputs
/// (fan-out outputs are lists: each branch counts).
fn used_so_far(outputs: &Map<String, Value>) -> u64 {
    fn of(v: &Value) -> u64 {
        match v {
            Value::Object(m) => m.get(USAGE_KEY).map_or(0, |u| {
                u["prompt_tokens"].as_u64().unwrap_or(0)
                    + u["completion_tokens"].as_u64().unwrap_or(0)
            }),
            Value::Array(items) => items.iter().map(of).sum(),
            _ => 0,
        }
    }
    outputs.values().map(of).sum()
}

/// Tokens a worker used in this process, shared with its clones: read it
/// with [`UsageMeter::total`] (the monitoring summary of the examples does).
#[derive(Clone, Debug, Default)]
pub struct UsageMeter(std::sync::Arc<[std::sync::atomic::AtomicU64; 3]>);

impl UsageMeter {
    fn add(&self, usage: &Usage) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0[0].fetch_add(usage.prompt_tokens, Relaxed);
        self.0[1].fetch_add(usage.completion_tokens, Relaxed);
        self.0[2].fetch_add(1, Relaxed);
    }

    /// Tokens so far.
    pub fn total(&self) -> Usage {
        use std::sync::atomic::Ordering::Relaxed;
        Usage {
            prompt_tokens: self.0[0].load(Relaxed),
            completion_tokens: self.0[1].load(Relaxed),
        }
    }

    /// Calls that answered so far.
    pub fn calls(&self) -> u64 {
        self.0[2].load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl std::fmt::Debug for LlmWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmWorker")
            .field("name", &self.name)
            .field("client", &self.client)
            .field("budget", &self.budget)
            .finish()
    }
}

impl LlmWorker {
    /// A worker named `name` that runs any [`Program`] (a module, modules
    /// composed with [`Program::then`], or your own type) against `client`.
    pub fn new(name: impl Into<String>, client: LlmClient, program: impl Program) -> Self {
        Self {
            name: name.into(),
            client,
            program: std::sync::Arc::new(program),
            usage: UsageMeter::default(),
            budget: None,
        }
    }

    /// A worker named `name` that runs `predict` against `client`.
    pub fn predict(name: impl Into<String>, client: LlmClient, predict: Predict) -> Self {
        Self::new(name, client, predict)
    }

    /// A worker named `name` that runs a chain of thought against `client`.
    pub fn chain_of_thought(
        name: impl Into<String>,
        client: LlmClient,
        program: ChainOfThought,
    ) -> Self {
        Self::new(name, client, program)
    }

    /// At most `tokens` for the whole workflow: the LLM steps before this
    /// one (their outputs carry `_usage`) and this one. Past it, the step
    /// fails for good (kind `token_budget`), and the workflow compensates.
    pub fn token_budget(mut self, tokens: u64) -> Self {
        self.budget = Some(tokens);
        self
    }

    /// Its token meter (keep a clone before registering the worker).
    pub fn usage(&self) -> UsageMeter {
        self.usage.clone()
    }

    async fn call(&self, inputs: &Map<String, Value>) -> Result<Prediction, PredictError> {
        self.program.run(&self.client, inputs).await
    }
}

#[async_trait]
impl Worker for LlmWorker {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, input: Payload, ctx: WorkerContext) -> Result<Payload, WorkerError> {
        let inputs: Map<String, Value> = match input.parse::<Value>() {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                return Err(WorkerError::fatal(format!(
                    "LLM worker `{}` needs a JSON object of inputs, not {}",
                    self.name,
                    other.to_string().chars().take(100).collect::<String>()
                ))
                .with_kind("invalid_input"));
            }
            Err(e) => {
                return Err(WorkerError::fatal(format!("input is not JSON: {e}"))
                    .with_kind("invalid_input"));
            }
        };
        // Only a budget needs every earlier step's usage (a read of the state).
        let before = match self.budget {
            Some(_) => used_so_far(&ctx.outputs().await?),
            None => 0,
        };
        if let Some(budget) = self.budget
            && before >= budget
        {
            return Err(WorkerError::fatal(format!(
                "the workflow's token budget of {budget} is spent: earlier LLM steps used {before}"
            ))
            .with_kind("token_budget"));
        }
        // The call stops when the step's context is cancelled (deadline,
        // shutdown, or the workflow no longer wants it).
        let outcome = tokio::select! {
            r = self.call(&inputs) => r,
            _ = ctx.cancellation.cancelled() => {
                return Err(WorkerError::retry("the LLM call was interrupted").with_kind("interrupted"));
            }
        };
        match outcome {
            Ok(prediction) => {
                self.usage.add(&prediction.usage);
                let total = before + prediction.usage.total();
                if let Some(budget) = self.budget
                    && total > budget
                {
                    return Err(WorkerError::fatal(format!(
                        "the workflow's token budget of {budget} is exceeded: {total} used, {} by this step",
                        prediction.usage.total()
                    ))
                    .with_kind("token_budget"));
                }
                let mut outputs = prediction.outputs.clone();
                let mut usage = serde_json::json!({
                    "prompt_tokens": prediction.usage.prompt_tokens,
                    "completion_tokens": prediction.usage.completion_tokens,
                });
                // With prices set, what the step cost (the dashboard shows it).
                if let Some(p) = self.client.config().prices {
                    usage["cost_usd"] = serde_json::json!(
                        prediction.usage.prompt_tokens as f64 * p.input_per_million / 1e6
                            + prediction.usage.completion_tokens as f64 * p.output_per_million
                                / 1e6
                    );
                }
                outputs.insert(USAGE_KEY.into(), usage);
                tracing::debug!(
                    worker = %self.name,
                    prompt_tokens = prediction.usage.prompt_tokens,
                    completion_tokens = prediction.usage.completion_tokens,
                    calls = prediction.calls,
                    "LLM step answered"
                );
                Payload::to_json(&Value::Object(outputs))
                    .map_err(|e| WorkerError::fatal(format!("outputs do not encode: {e}")))
            }
            Err(e @ PredictError::Input(_)) => {
                Err(WorkerError::fatal(e.to_string()).with_kind("invalid_input"))
            }
            Err(e @ PredictError::BadOutput { .. }) => {
                Err(WorkerError::retry(e.to_string()).with_kind("bad_llm_output"))
            }
            Err(PredictError::Llm(e)) if e.is_transient() => {
                Err(WorkerError::retry(e.to_string()).with_kind("llm_unavailable"))
            }
            Err(PredictError::Llm(e)) => {
                Err(WorkerError::fatal(e.to_string()).with_kind("llm_refused"))
            }
        }
    }
}

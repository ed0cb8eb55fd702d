//! Run one worker on one input, without a bus or an orchestrator.
//!
//! ```
//! use multiagents::worker::{from_fn, testing::WorkerTest, WorkerError};
//!
//! # tokio_test_block_on(async {
//! let double = from_fn("double", |n: u64, _ctx| async move { Ok::<_, WorkerError>(n * 2) });
//! let out: u64 = WorkerTest::new(double).input(&21).run().await.unwrap();
//! assert_eq!(out, 42);
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Worker, WorkerContext, WorkerError};
use crate::core::{Payload, Phase};

/// One call of one worker, set up by hand.
pub struct WorkerTest<W> {
    worker: W,
    input: Payload,
    outputs: serde_json::Map<String, serde_json::Value>,
    ctx: WorkerContext,
}

impl<W: Worker> WorkerTest<W> {
    /// A call of `worker` with `null` input, attempt 1.
    pub fn new(worker: W) -> Self {
        let ctx = WorkerContext::new("test", worker.name().to_string());
        Self {
            worker,
            input: Payload::null(),
            outputs: serde_json::Map::new(),
            ctx,
        }
    }

    /// Sets the input.
    pub fn input<T: Serialize>(mut self, input: &T) -> Self {
        self.input = Payload::to_json(input).unwrap_or_else(|_| Payload::null());
        self
    }

    /// Makes `step`'s output visible through `ctx.output(step)`.
    pub fn output<T: Serialize>(mut self, step: &str, output: &T) -> Self {
        self.outputs.insert(
            step.to_string(),
            serde_json::to_value(output).unwrap_or_default(),
        );
        self
    }

    /// Sets the attempt number.
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.ctx = self.ctx.with_attempt(attempt);
        self
    }

    /// Runs it as a compensation.
    pub fn compensation(mut self) -> Self {
        self.ctx.phase = Phase::Compensate;
        self
    }

    /// The context the worker will get (to inspect its idempotency key).
    pub fn context(&self) -> &WorkerContext {
        &self.ctx
    }

    /// Runs the worker and decodes its output.
    pub async fn run<O: DeserializeOwned>(self) -> Result<O, WorkerError> {
        let outputs = Payload::to_json(&self.outputs).unwrap_or_else(|_| Payload::null());
        let out = self
            .worker
            .run(self.input, self.ctx.with_outputs(outputs))
            .await?;
        out.parse()
            .map_err(|e| WorkerError::fatal(format!("output does not decode as expected: {e}")))
    }
}

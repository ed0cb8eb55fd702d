#![doc = include_str!("../docs/guide.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate self as multiagents;

pub mod bus;
mod client;
mod error;
#[cfg(feature = "llm")]
pub mod llm;
pub mod monitoring;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
pub mod runtime;
pub mod store;
pub mod timeline;
pub mod worker;

/// The pure core: events, definitions and the saga state machine.
pub use multiagents_core as core;

pub use async_trait::async_trait;
pub use client::{Client, Redriven, RetryOptions, StartOptions};
pub use error::Error;
pub use multiagents_core::{
    CorrelationId, Payload, RetryPolicy, StepName, TransactionId, WorkerName, WorkflowBuilder,
    WorkflowDefinition, WorkflowName, WorkflowState, WorkflowStatus,
};
/// Turns an `async fn(input, ctx) -> Result<output, WorkerError>` into a worker.
pub use multiagents_macros::worker;

pub use runtime::{OrchestratorConfig, Runtime, RuntimeBuilder};
/// For the code `#[tool]` writes.
#[doc(hidden)]
pub use serde_json as __serde_json;
pub use worker::{Worker, WorkerContext, WorkerError};

/// What most programs need, in one import.
pub mod prelude {
    pub use crate::worker::{Worker, WorkerContext, WorkerError, WorkerOptions};
    pub use crate::{Client, Runtime, WorkflowBuilder, WorkflowStatus, worker};
    pub use multiagents_core::{RetryPolicy, TransactionId};
}

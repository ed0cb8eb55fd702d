//! The pure core of multiagents: the event envelope, workflow definitions and
//! the saga state machine.
//!
//! Nothing in this crate does I/O, reads a clock inside a transition or draws
//! a random number: the runtime in the `multiagents` crate does that around it.

pub mod chunked;
pub mod event;
pub mod hash;
pub mod health;
pub mod ids;
pub mod payload;
pub mod saga;
pub mod time;
pub mod workflow;

pub use event::{
    Event, EventCodec, EventError, EventKind, Phase, RetryDirective, StepError, StepErrorKind,
    Timing,
};
pub use health::{ErrorKind, WorkerHealth};
pub use ids::{CorrelationId, EventId, StepName, TransactionId, WorkerName, WorkflowName};
pub use payload::Payload;
pub use saga::{
    Action, Dispatch, Input, Outcome, Priority, StatusUpdate, StepStatus, WorkflowState,
    WorkflowStatus,
};
pub use time::Timestamp;
pub use workflow::{DefinitionError, RetryPolicy, WorkflowBuilder, WorkflowDefinition};

//! The errors users of the runtime and client meet.

use std::time::Duration;

use crate::bus::BusError;
use crate::core::{DefinitionError, TransactionId, WorkflowStatus};
use crate::store::StoreError;

/// Everything that can go wrong in the runtime, the client and the workers'
/// plumbing. Each variant says what was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Talking to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A workflow definition was refused.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// No definition by that name (and version) is registered.
    #[error("no workflow definition `{name}`{} is registered; register it with .workflow(def) or client.register(&def)", .version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownWorkflow {
        /// The name asked for.
        name: String,
        /// The version asked for, if any.
        version: Option<u32>,
    },
    /// No workflow with that transaction id exists.
    #[error("no workflow {0} exists (it may have expired)")]
    NotFound(TransactionId),
    /// A wait ended before the workflow did.
    #[error("workflow {transaction_id} is still {status} after waiting {waited:?}")]
    Timeout {
        /// The workflow.
        transaction_id: TransactionId,
        /// How long we waited.
        waited: Duration,
        /// Where it was.
        status: WorkflowStatus,
    },
    /// A signal was not taken.
    #[error("signal `{name}` for workflow {transaction_id} was refused: {reason}")]
    Signal {
        /// The workflow.
        transaction_id: TransactionId,
        /// The signal.
        name: String,
        /// Why.
        reason: String,
    },
    /// The workflow input could not be encoded as JSON.
    #[error("the workflow input does not encode as JSON: {0}")]
    Input(String),
    /// A workflow's state kept changing under every attempt to update it
    /// (other writers won each compare-and-set). The input is left for
    /// redelivery; trying again later is right.
    #[error(
        "workflow {transaction_id} kept changing under {attempts} attempts to update it; is something looping?"
    )]
    Contended {
        /// The workflow.
        transaction_id: TransactionId,
        /// Compare-and-sets lost in a row.
        attempts: usize,
    },
    /// A retry (or the redrive of a failed compensation) was refused; the
    /// reason says why and what to do instead.
    #[error("run {transaction_id}: {refused}")]
    Retry {
        /// The run.
        transaction_id: TransactionId,
        /// Why.
        refused: crate::core::saga::RetryRefused,
    },
    /// No dead letter has that id (it may have been redriven or discarded).
    #[error("no dead letter `{0}` (it may have been redriven or discarded)")]
    NoDeadLetter(String),
    /// A dead letter could not be redriven as asked.
    #[error("dead letter `{id}` cannot be redriven: {reason}")]
    Redrive {
        /// The dead letter.
        id: String,
        /// Why.
        reason: String,
    },
    /// The runtime was set up wrongly.
    #[error("{0}")]
    Config(String),
    /// The monitoring settings were refused.
    #[error(transparent)]
    Monitoring(#[from] crate::monitoring::ConfigError),
}

impl Error {
    /// True when the bus or the store could not be reached or answered with
    /// an error — a server restarting, a connection lost — or the workflow
    /// was contended: the same call is worth trying again (a start with an explicit
    /// [`StartOptions::transaction_id`](crate::StartOptions::transaction_id)
    /// is idempotent).
    ///
    /// ```
    /// use multiagents::Error;
    /// use multiagents::bus::BusError;
    ///
    /// let lost = Error::Bus(BusError::Backend { address: "redis://127.0.0.1:6379".into(), message: "broken pipe".into() });
    /// assert!(lost.is_transient());
    /// assert!(!Error::Config("bad".into()).is_transient());
    /// let busy = Error::Contended { transaction_id: multiagents::TransactionId::new(), attempts: 64 };
    /// assert!(busy.is_transient());
    /// assert!(busy.to_string().contains("64 attempts"));
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Bus(e) => e.is_transient(),
            Error::Store(e) => matches!(e, StoreError::Io { .. }),
            Error::Contended { .. } => true,
            _ => false,
        }
    }
}

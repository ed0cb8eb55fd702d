//! The client: start a workflow, read its status and history, wait for it,
//! cancel it. Any process that can reach the bus and the store can be a
//! client; it applies the same state machine as the orchestrator, so a
//! cancellation from the client is as safe as a result from a worker.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::Error;
use crate::bus::{Bus, DeadLetter};
use crate::core::saga::Input;
use crate::core::{CorrelationId, Payload, TransactionId, WorkflowDefinition, WorkflowState};
use crate::runtime::Engine;
use crate::store::{ListQuery, Store, WorkflowSummary};

/// Options for [`Client::start_with`].
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Use this transaction id. Starting again with the same id returns it
    /// without starting a second workflow, so a client may retry a start.
    pub transaction_id: Option<TransactionId>,
    /// Join this request chain (default: a new one).
    pub correlation_id: Option<CorrelationId>,
    /// Run this version of the definition (default: the highest registered).
    pub version: Option<u32>,
    /// W3C trace context to continue.
    pub traceparent: Option<String>,
    /// Its priority: when workers are saturated, the commands of
    /// higher-priority workflows are taken first (default normal).
    pub priority: crate::core::Priority,
}

/// Starts, watches and cancels workflows.
#[derive(Clone)]
pub struct Client {
    engine: Arc<Engine>,
}

impl Client {
    /// A client on a bus and a store.
    pub fn new(bus: impl Into<Bus>, store: impl Into<Store>) -> Self {
        Self {
            engine: Arc::new(Engine::new(bus.into(), store.into())),
        }
    }

    pub(crate) fn from_engine(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// Registers a definition in the store, so that every orchestrator can run it.
    pub async fn register(&self, definition: &WorkflowDefinition) -> Result<(), Error> {
        self.engine.register(definition).await
    }

    /// Starts the highest registered version of `workflow` with `input`.
    pub async fn start<T: Serialize + ?Sized>(
        &self,
        workflow: &str,
        input: &T,
    ) -> Result<TransactionId, Error> {
        self.start_with(workflow, input, StartOptions::default())
            .await
    }

    /// Starts a workflow with options.
    pub async fn start_with<T: Serialize + ?Sized>(
        &self,
        workflow: &str,
        input: &T,
        options: StartOptions,
    ) -> Result<TransactionId, Error> {
        let input = Payload::to_json(input).map_err(|e| Error::Input(e.to_string()))?;
        self.engine.start(workflow, input, options).await
    }

    /// The state of a workflow, with every step and its history; `None` if
    /// there is no such workflow.
    pub async fn status(
        &self,
        transaction_id: TransactionId,
    ) -> Result<Option<Arc<WorkflowState>>, Error> {
        Ok(self
            .engine
            .store
            .states
            .get(transaction_id)
            .await?
            .map(|v| v.state))
    }

    /// Waits until the workflow is finished, for at most `timeout`.
    pub async fn wait(
        &self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Result<Arc<WorkflowState>, Error> {
        match self
            .engine
            .store
            .states
            .wait_terminal(transaction_id, timeout)
            .await?
        {
            None => Err(Error::NotFound(transaction_id)),
            Some(v) if v.state.is_terminal() => Ok(v.state),
            Some(v) => Err(Error::Timeout {
                transaction_id,
                waited: timeout,
                status: v.state.status,
            }),
        }
    }

    /// Cancels a running workflow: nothing new starts and completed steps
    /// are compensated; it ends `Cancelled`. Returns false if it had already
    /// finished (or was already being compensated).
    pub async fn cancel(&self, transaction_id: TransactionId, reason: &str) -> Result<bool, Error> {
        let input = Input::Cancel {
            reason: reason.to_string(),
        };
        match self.engine.drive(transaction_id, &input, None).await? {
            crate::runtime::engine_driven::Applied => Ok(true),
            crate::runtime::engine_driven::Unchanged => Ok(false),
            crate::runtime::engine_driven::Missing => Err(Error::NotFound(transaction_id)),
        }
    }

    /// Sends the signal `name` with `payload` to a workflow: the step
    /// waiting for it completes with the payload as its output. A signal
    /// sent before the step waits is kept for it. Refused (with the reason)
    /// when the workflow has finished, is compensating, or waits for no
    /// signal of that name.
    ///
    /// ```no_run
    /// # async fn f(client: multiagents::Client, tx: multiagents::core::TransactionId) -> Result<(), multiagents::Error> {
    /// client.signal(tx, "approve", &serde_json::json!({"by": "ana"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn signal<T: Serialize + ?Sized>(
        &self,
        transaction_id: TransactionId,
        name: &str,
        payload: &T,
    ) -> Result<(), Error> {
        let payload = Payload::to_json(payload).map_err(|e| Error::Input(e.to_string()))?;
        let input = Input::Signal {
            name: name.to_string(),
            payload,
        };
        match self.engine.drive(transaction_id, &input, None).await? {
            crate::runtime::engine_driven::Applied => Ok(()),
            crate::runtime::engine_driven::Missing => Err(Error::NotFound(transaction_id)),
            crate::runtime::engine_driven::Unchanged => {
                let refused = |reason: String| Error::Signal {
                    transaction_id,
                    name: name.to_string(),
                    reason,
                };
                let Some(current) = self.engine.store.states.get(transaction_id).await? else {
                    return Err(Error::NotFound(transaction_id));
                };
                let state = &current.state;
                if state.status != crate::core::WorkflowStatus::Running {
                    return Err(refused(format!("the workflow is {}", state.status)));
                }
                let def = self
                    .engine
                    .definition(&state.workflow, state.version)
                    .await?;
                let mut waits: Vec<&str> = def.signals().collect();
                waits.sort_unstable();
                waits.dedup();
                Err(refused(if waits.is_empty() {
                    format!("workflow `{}` waits for no signals", state.workflow)
                } else {
                    format!(
                        "workflow `{}` waits only for {}",
                        state.workflow,
                        waits
                            .iter()
                            .map(|w| format!("`{w}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }))
            }
        }
    }

    /// Lists workflows.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, Error> {
        Ok(self.engine.store.states.list(query).await?)
    }

    /// The most recent dead letters.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        Ok(self.engine.bus.topics.dead_letters(limit).await?)
    }
}

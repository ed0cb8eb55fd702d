//! The client: start a workflow, read its status and history, wait for it,
//! cancel it. Any process that can reach the bus and the store can be a
//! client; it applies the same state machine as the orchestrator, so a
//! cancellation from the client is as safe as a result from a worker.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::Error;
use crate::bus::{AuditedLetter, Bus, COMPENSATIONS, DeadLetter, SettleAction, Settlement};
use crate::core::saga::Input;
use crate::core::{
    CorrelationId, Payload, Timestamp, TransactionId, WorkflowDefinition, WorkflowState,
};
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

/// Options for [`Client::retry`].
#[derive(Clone, Debug, Default)]
pub struct RetryOptions {
    /// Run again from this step (default: the step that failed); see
    /// [`crate::core::saga::retry`] for which steps are kept.
    pub from_step: Option<String>,
    /// An RFC 7386 JSON merge patch for the input (default: the same input).
    pub input_patch: Option<serde_json::Value>,
    /// Run the latest version of the definition instead of the one the old
    /// run was pinned to.
    pub latest_definition: bool,
}

/// What [`Client::redrive_dead_letter`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Redriven {
    /// The dead letter, now in the audit log.
    pub id: String,
    /// Where it went: the topic it was published to again, or
    /// `compensations` for a failed compensation tried again.
    pub topic: String,
    /// The run it belongs to, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<TransactionId>,
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

    /// Retries a run that ended failed, compensated, timed out or
    /// cancelled: a new run (whose id this returns) that keeps what the old
    /// one finished and still stands and runs the rest again, from the
    /// failed step or [`RetryOptions::from_step`]. Both runs' histories say
    /// so. Refused ([`Error::Retry`], with the reason) for a run that is
    /// running, completed, a sub-workflow, or retried already.
    ///
    /// ```no_run
    /// # async fn f(client: multiagents::Client, tx: multiagents::core::TransactionId) -> Result<(), multiagents::Error> {
    /// use multiagents::RetryOptions;
    /// let retry = client
    ///     .retry(tx, RetryOptions {
    ///         input_patch: Some(serde_json::json!({"card": "4242"})),
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn retry(
        &self,
        transaction_id: TransactionId,
        options: RetryOptions,
    ) -> Result<TransactionId, Error> {
        let input = match &options.input_patch {
            None => None,
            Some(patch) => {
                let old = self
                    .status(transaction_id)
                    .await?
                    .ok_or(Error::NotFound(transaction_id))?;
                let mut input: serde_json::Value = old.input.parse().unwrap_or_default();
                crate::core::payload::merge_patch(&mut input, patch);
                Some(Payload::to_json(&input).map_err(|e| Error::Input(e.to_string()))?)
            }
        };
        let plan = crate::core::saga::RetryPlan {
            from_step: options.from_step,
            input,
        };
        self.engine
            .retry(transaction_id, plan, options.latest_definition)
            .await
    }

    /// The most recent dead letters, newest last.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        Ok(self.engine.bus.topics.dead_letters(limit).await?)
    }

    /// One dead letter, by id.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, Error> {
        Ok(self.engine.bus.topics.dead_letter_by_id(id).await?)
    }

    /// Settled dead letters (redriven or discarded), newest last.
    pub async fn dead_letter_audit(&self, limit: usize) -> Result<Vec<AuditedLetter>, Error> {
        Ok(self.engine.bus.topics.dead_letter_audit(limit).await?)
    }

    /// Sends a dead letter back to be processed, once its cause is fixed,
    /// and moves it to the audit log (`by` says who). An event goes back to
    /// its topic, as it was or as `edited` (the event's JSON); a compensation
    /// that failed for good is tried again, and its workflow compensates
    /// again and ends as that goes. Of two redrives of one letter, one does
    /// it and the other is told it is gone.
    pub async fn redrive_dead_letter(
        &self,
        id: &str,
        edited: Option<&str>,
        by: &str,
    ) -> Result<Redriven, Error> {
        let letter = self
            .dead_letter(id)
            .await?
            .ok_or_else(|| Error::NoDeadLetter(id.to_string()))?;
        let refused = |reason: String| Error::Redrive {
            id: id.to_string(),
            reason,
        };
        let settlement = |note: String| Settlement {
            action: SettleAction::Redriven,
            by: by.to_string(),
            note,
            at: Timestamp::now(),
        };
        let topics = &self.engine.bus.topics;
        if letter.topic == COMPENSATIONS {
            if edited.is_some() {
                return Err(refused(
                    "a failed compensation is tried again as it is: its body only names the run and the step; fix the cause and redrive it unedited".into(),
                ));
            }
            let (tx, step) = compensation_of(&letter)
                .ok_or_else(|| refused("its body names no run and step".into()))?;
            let state = self.status(tx).await?.ok_or(Error::NotFound(tx))?;
            crate::core::saga::check_redrive(&state, &step).map_err(|e| refused(e.to_string()))?;
            let Some(letter) = topics
                .settle_dead_letter(
                    id,
                    &settlement(format!("compensation of `{step}` tried again")),
                )
                .await?
            else {
                return Err(Error::NoDeadLetter(id.to_string()));
            };
            let input = Input::RedriveCompensation {
                step: step.as_str().into(),
            };
            match self.engine.drive(tx, &input, None).await {
                Ok(crate::runtime::engine_driven::Applied) => {}
                Ok(_) => {
                    // Another redrive of the same failure won; nothing to undo.
                }
                Err(e) => {
                    let _ = topics.dead_letter(letter).await;
                    return Err(e);
                }
            }
            return Ok(Redriven {
                id: id.to_string(),
                topic: COMPENSATIONS.into(),
                transaction_id: Some(tx),
            });
        }
        let body = edited.unwrap_or(&letter.body);
        let event = crate::core::EventCodec::default()
            .decode(body.as_bytes())
            .map_err(|e| {
                refused(format!(
                    "its body does not decode as an event ({e}); send an edited body"
                ))
            })?;
        let transaction_id = Some(event.transaction_id);
        let note = match edited {
            Some(_) => format!("published to `{}`, edited", letter.topic),
            None => format!("published to `{}`", letter.topic),
        };
        let Some(letter) = topics.settle_dead_letter(id, &settlement(note)).await? else {
            return Err(Error::NoDeadLetter(id.to_string()));
        };
        if let Err(e) = topics.publish(&letter.topic, event).await {
            let _ = topics.dead_letter(letter).await;
            return Err(e.into());
        }
        Ok(Redriven {
            id: id.to_string(),
            topic: letter.topic,
            transaction_id,
        })
    }

    /// Drops a dead letter on purpose; it is kept in the audit log with
    /// `by` and `reason`.
    pub async fn discard_dead_letter(
        &self,
        id: &str,
        by: &str,
        reason: &str,
    ) -> Result<DeadLetter, Error> {
        let settlement = Settlement {
            action: SettleAction::Discarded,
            by: by.to_string(),
            note: reason.to_string(),
            at: Timestamp::now(),
        };
        self.engine
            .bus
            .topics
            .settle_dead_letter(id, &settlement)
            .await?
            .ok_or_else(|| Error::NoDeadLetter(id.to_string()))
    }
}

/// The run and step a failed compensation's dead letter names.
fn compensation_of(letter: &DeadLetter) -> Option<(TransactionId, String)> {
    let body: serde_json::Value = serde_json::from_str(&letter.body).ok()?;
    let tx = body.get("transaction_id")?.as_str()?.parse().ok()?;
    let step = body.get("step")?.as_str()?.to_string();
    Some((tx, step))
}

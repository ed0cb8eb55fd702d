//! The event bus: how commands reach workers and results reach the
//! orchestrator.
//!
//! A bus is three capabilities, each its own trait, put together in a
//! [`Bus`]:
//!
//! | trait | what | required methods |
//! | --- | --- | --- |
//! | [`Topics`] (+ [`Consumer`]) | what must arrive: commands, results, dead letters | 4 (+ 6) |
//! | [`Notifier`] | fire-and-forget: status broadcasts, interrupts | 4 |
//! | [`SharedLimits`] | places and rates shared by processes | 2 |
//!
//! A new backend implements [`Topics`] and its [`Consumer`]; [`Bus::new`]
//! gives it an in-process [`LocalNotifier`] and [`LocalLimits`] until it has
//! its own. The in-memory bus ([`MemoryBus`]) and Redis
//! ([`crate::redis`], with the `redis` feature) implement all three.
//!
//! The contract every topic bus meets:
//!
//! * **Topics and groups.** An event published to a topic is delivered to
//!   every consumer group of that topic, and within a group to one consumer.
//!   Events published before any group exists are kept for the first group.
//! * **At least once.** A delivery that is not acked within the visibility
//!   timeout is delivered again, to any consumer of the group.
//! * **Leases.** A consumer that is still working on a delivery extends it
//!   ([`Consumer::extend`]), so a call may run for hours and is never
//!   redelivered while its process lives; the worker manager and the
//!   orchestrator do so every [`Consumer::extend_every`]. A consumer
//!   whose deliveries have gone that long without being extended is taken to
//!   be dead, and a live peer of its group takes them over.
//! * **Dead letters.** After `max_deliveries` deliveries, or when a consumer
//!   rejects it (undecodable, oversized, for an unknown transaction), an
//!   event goes to the dead-letter list with the reason, and is counted.
//! * **Status broadcast** is separate and fire-and-forget: subscribers that
//!   are not listening miss events. Nothing that must arrive goes through it.

mod local;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::core::{Event, Timestamp, WorkerName};

#[cfg(feature = "postgres")]
pub use crate::postgres::{PostgresBus, PostgresBusConfig};
#[cfg(feature = "redis")]
pub use crate::redis::{RedisBusConfig, RedisPubSubBus, RedisStreamsBus};
pub use local::{LocalLimits, LocalNotifier};
pub use memory::{MemoryBus, MemoryBusConfig};

/// The topic results and errors go to.
pub const RESULTS_TOPIC: &str = "results";

/// The consumer group of orchestrators.
pub const ORCHESTRATOR_GROUP: &str = "orchestrators";

/// The consumer group of workers.
pub const WORKER_GROUP: &str = "workers";

/// The topic commands and compensations for `worker` go to.
pub fn command_topic(worker: &WorkerName) -> String {
    format!("commands.{worker}")
}

/// The topic the commands of workflows of `priority` for `worker` go to:
/// [`command_topic`] for normal priority, with `.high` or `.low` after it
/// otherwise. Workers take from the high topic first.
pub fn command_topic_at(worker: &WorkerName, priority: crate::core::Priority) -> String {
    match priority {
        crate::core::Priority::Normal => command_topic(worker),
        other => format!("commands.{worker}.{}", other.as_str()),
    }
}

/// A note to workers: the result of this attempt is no longer wanted (the
/// workflow was cancelled, or another step failed for good and it is being
/// compensated). Workers cancel the call's [`WorkerContext::cancellation`].
///
/// [`WorkerContext::cancellation`]: crate::WorkerContext::cancellation
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interrupt {
    /// The workflow.
    pub transaction_id: crate::core::TransactionId,
    /// The step (or fan-out branch, `step[i]`).
    pub step: crate::core::StepName,
    /// The attempt.
    pub attempt: u32,
}

/// Limits on one worker type shared by every process on a bus: calls at
/// once, and calls started per period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlaceLimits {
    /// Calls at once, across all processes.
    pub concurrency: Option<u32>,
    /// At most this many calls started per period, across all processes.
    pub rate: Option<(u32, Duration)>,
    /// How long a place is held at most: if its process dies, the place
    /// comes back after this.
    pub lease: Duration,
}

/// Places granted by [`SharedLimits::take_places`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Places {
    /// One lease per place; give each back with [`SharedLimits::give_back`].
    pub leases: Vec<String>,
    /// When none was granted: how long until one may be.
    pub retry_after: Option<Duration>,
}

/// Identifies one delivery within a consumer group (for acks).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryId {
    /// A sequence number (the in-memory bus).
    Seq(u64),
    /// A Redis stream entry id, `ms-seq`.
    Stream(u64, u64),
    /// An opaque token (an ack subject, say).
    Token(Arc<str>),
}

/// One event handed to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// What to ack.
    pub id: DeliveryId,
    /// The event.
    pub event: Arc<Event>,
    /// How many times it has been delivered, this time included.
    pub delivery_count: u32,
}

/// An event that could not be processed, with the reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id on the bus (empty until the bus has it): a stream entry id on
    /// Redis, a sequence number in memory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The topic it was on.
    pub topic: String,
    /// The consumer group that gave up on it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Why.
    pub reason: String,
    /// How many times it was delivered.
    pub delivery_count: u32,
    /// When it was dead-lettered.
    pub at: Timestamp,
    /// The event as JSON, or the raw bytes (lossily as text) when it did not decode.
    pub body: String,
}

/// Which dead letters a bulk redrive takes: every field given must hold
/// (`reason` as a part of the reason; `workflow` and `step` from the
/// letter's event).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterFilter {
    /// The topic it was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The workflow of its event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The step of its event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// A part of its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl DeadLetterFilter {
    /// True when `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let event: Option<serde_json::Value> = (self.workflow.is_some() || self.step.is_some())
            .then(|| serde_json::from_str(&letter.body).ok())
            .flatten();
        let field = |name: &str| event.as_ref().and_then(|e| e.get(name)?.as_str());
        self.topic.as_ref().is_none_or(|t| *t == letter.topic)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| letter.reason.contains(r.as_str()))
            && self
                .workflow
                .as_ref()
                .is_none_or(|w| field("workflow") == Some(w.as_str()))
            && self
                .step
                .as_ref()
                .is_none_or(|s| field("step") == Some(s.as_str()))
    }
}

/// What became of a dead letter taken off the list: kept in the audit log
/// with the letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settlement {
    /// `redriven` or `discarded`.
    pub action: SettleAction,
    /// Who did it (an API key's name, or `cli`).
    pub by: String,
    /// Why, or what was done (the topic it went back to).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// When.
    pub at: Timestamp,
}

/// How a dead letter was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleAction {
    /// Sent back to be processed again.
    Redriven,
    /// Dropped on purpose.
    Discarded,
}

impl SettleAction {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SettleAction::Redriven => "redriven",
            SettleAction::Discarded => "discarded",
        }
    }
}

/// One line of the dead-letter audit log: a letter and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditedLetter {
    /// The letter, as it was.
    pub letter: DeadLetter,
    /// What became of it.
    pub settlement: Settlement,
}

/// The topic of the dead letters of compensations that failed for good:
/// their body names the run and the step, and redriving one tries the
/// compensation again.
pub const COMPENSATIONS: &str = "compensations";

/// How many entries the dead-letter audit log keeps (the oldest go first).
pub const AUDIT_CAPACITY: usize = 10_000;

/// What went wrong talking to the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The event is over the size limit.
    #[error("event for topic `{topic}` is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The topic.
        topic: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The bus is shut down.
    #[error("the bus is closed")]
    Closed,
    /// The server could not be reached or answered with an error.
    #[error("bus backend at {address}: {message}")]
    Backend {
        /// Where.
        address: String,
        /// What it said.
        message: String,
    },
}

impl BusError {
    /// True for a failure that trying again may mend: the server could not
    /// be reached or answered with an error (it may be restarting). An
    /// oversized event or a closed bus stays so.
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Backend { .. })
    }
}

/// Runs `op` until it succeeds, fails for good (not
/// [`BusError::is_transient`]) or `limit` has passed, pausing 20 ms between
/// tries, doubling up to 200 ms: a lost connection comes back by itself.
/// Returns the last error when it gives up.
pub async fn retry_transient<T, F, Fut>(limit: Duration, mut op: F) -> Result<T, BusError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BusError>>,
{
    let until = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(20);
    loop {
        match op().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() < until => {
                tracing::debug!(error = %e, "the bus failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// A consumer in a group: takes batches, acks them, rejects poison.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Up to `max` deliveries, waiting at most `wait` for the first one.
    /// Returns an empty batch when nothing came.
    async fn next_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;

    /// Marks deliveries as done: they will not be delivered again.
    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), BusError>;

    /// Extends the lease of deliveries this consumer still holds: they are
    /// not delivered again for another visibility timeout. Deliveries that
    /// another consumer has taken over meanwhile (or that were acked) are
    /// left alone.
    async fn extend(&self, ids: &[DeliveryId]) -> Result<(), BusError>;

    /// How long a delivery stays this consumer's without being extended or
    /// acked. Holders extend every [`Consumer::extend_every`].
    fn visibility_timeout(&self) -> Duration;

    /// How often a holder extends what it holds: five eighths of the
    /// visibility timeout. A dead holder's deliveries are taken over one
    /// visibility timeout after its last extension, plus up to an eighth for
    /// the next look for abandoned entries: at most 1.8 beats after it died,
    /// and a live holder still has three eighths of the timeout to spare.
    fn extend_every(&self) -> Duration {
        (self.visibility_timeout() * 5 / 8).max(Duration::from_millis(5))
    }

    /// Gives up on a delivery: it goes to the dead-letter list with `reason`
    /// and is acked.
    async fn reject(&self, delivery: &Delivery, reason: &str) -> Result<(), BusError>;

    /// Publishes `events` (in order), then acks `ids`: what a consumer does
    /// when handling its deliveries produced new events. Backends do both in
    /// one round trip where they can, and never ack without publishing: on
    /// `Err`, nothing is acked (the deliveries come again).
    async fn publish_then_ack(
        &self,
        events: &[(String, Event)],
        ids: &[DeliveryId],
    ) -> Result<(), BusError>;
}

/// The topic bus: what must arrive. Publishing, consumer groups with
/// acks, leases and redelivery ([`Consumer`]), dead letters and lag.
///
/// A new backend implements this and [`Consumer`]; it gets an in-process
/// [`Notifier`] and [`SharedLimits`] from [`Bus::new`] until it has its own.
#[async_trait]
pub trait Topics: Send + Sync + 'static {
    /// Publishes one event. When this returns `Ok`, the bus has it.
    async fn publish(&self, topic: &str, event: Event) -> Result<(), BusError>;

    /// Publishes several events, in order, in as few round trips as the
    /// backend allows.
    async fn publish_many(&self, events: Vec<(String, Event)>) -> Result<(), BusError> {
        for (topic, event) in events {
            self.publish(&topic, event).await?;
        }
        Ok(())
    }

    /// Joins (creating if needed) consumer group `group` on `topic` as `consumer`.
    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
    ) -> Result<Arc<dyn Consumer>, BusError>;

    /// Records a dead letter that did not come from a delivery (for example
    /// a compensation that failed for good).
    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError>;

    /// The most recent dead letters, newest last.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError>;

    /// The dead letter with this id, if it is still on the list.
    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BusError>;

    /// Takes the dead letter `id` off the list and records it, with
    /// `settlement`, in the audit log, as one step: of two calls for the same
    /// letter, one gets it and the other `None`.
    async fn settle_dead_letter(
        &self,
        id: &str,
        settlement: &Settlement,
    ) -> Result<Option<DeadLetter>, BusError>;

    /// The audit log of settled dead letters, newest last.
    async fn dead_letter_audit(&self, limit: usize) -> Result<Vec<AuditedLetter>, BusError>;

    /// Entries of `topic` not yet delivered to `group`, when the backend can
    /// tell (for the bus-lag metric).
    async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        let _ = (topic, group);
        Ok(None)
    }
}

/// Fire-and-forget messages: status broadcasts and interrupts. Subscribers
/// that are not listening miss them, and nothing the workflow depends on
/// goes through here.
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Broadcasts a status event. Fire-and-forget: lost if nobody listens.
    fn broadcast(&self, event: Event);

    /// False when nobody listens to status broadcasts, so callers can skip
    /// building them.
    fn has_status_listeners(&self) -> bool {
        true
    }

    /// Listens to status broadcasts from now on.
    fn subscribe_status(&self) -> broadcast::Receiver<Arc<Event>>;

    /// Tells the workers running a command that its result is no longer
    /// wanted. The workflow does not depend on it (the step settles when its
    /// answer comes or its deadline passes), it only spares the work.
    async fn interrupt(&self, interrupt: Interrupt) -> Result<(), BusError>;

    /// Listens to interrupts from now on.
    fn subscribe_interrupts(&self) -> broadcast::Receiver<Interrupt>;
}

/// Limits shared by every process on a bus: calls at once and calls per
/// period, per worker type.
#[async_trait]
pub trait SharedLimits: Send + Sync + 'static {
    /// Takes up to `want` places for `key` (a worker type) under `limits`.
    /// `holder` names the taker (for unique lease ids).
    async fn take_places(
        &self,
        key: &str,
        want: u32,
        limits: &PlaceLimits,
        holder: &str,
    ) -> Result<Places, BusError>;

    /// Gives places back.
    async fn give_back(&self, key: &str, leases: &[String]) -> Result<(), BusError>;
}

/// A bus: one implementation per capability. Cheap to clone; every clone
/// is the same bus.
///
/// A backend that does all three ([`MemoryBus`], `RedisStreamsBus`)
/// converts with `into()`; one that has only topics gets an in-process
/// notifier and limits:
///
/// ```
/// use multiagents::bus::{Bus, LocalLimits, MemoryBus};
///
/// let whole: Bus = MemoryBus::new().into();
/// let mixed = Bus::new(MemoryBus::new()).with_limits(LocalLimits::new());
/// # let _ = (whole, mixed);
/// ```
#[derive(Clone)]
pub struct Bus {
    /// Commands and results.
    pub topics: Arc<dyn Topics>,
    /// Status broadcasts and interrupts.
    pub notifier: Arc<dyn Notifier>,
    /// Places and rates shared by processes.
    pub limits: Arc<dyn SharedLimits>,
}

impl Bus {
    /// Topics from `topics`, with a [`LocalNotifier`] and [`LocalLimits`]
    /// that reach only this process.
    pub fn new(topics: impl Topics) -> Self {
        Self {
            topics: Arc::new(topics),
            notifier: Arc::new(LocalNotifier::new()),
            limits: Arc::new(LocalLimits::new()),
        }
    }

    /// The same bus with another notifier.
    pub fn with_notifier(mut self, notifier: impl Notifier) -> Self {
        self.notifier = Arc::new(notifier);
        self
    }

    /// The same bus with other limits.
    pub fn with_limits(mut self, limits: impl SharedLimits) -> Self {
        self.limits = Arc::new(limits);
        self
    }
}

impl<B: Topics + Notifier + SharedLimits> From<B> for Bus {
    fn from(bus: B) -> Self {
        let bus = Arc::new(bus);
        Self {
            topics: bus.clone(),
            notifier: bus.clone(),
            limits: bus,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn backend() -> BusError {
        BusError::Backend {
            address: "redis://127.0.0.1:1".into(),
            message: "Connection refused".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_tried_again_until_it_passes() {
        let calls = AtomicU32::new(0);
        let out = retry_transient(Duration::from_secs(5), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=3 => Err(backend()),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(out.expect("passes"), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_for_good_is_not_tried_again_and_time_runs_out_on_the_rest() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry_transient(Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(BusError::TooLarge {
                topic: "results".into(),
                size: 2,
                limit: 1,
            })
        })
        .await;
        assert!(matches!(out, Err(BusError::TooLarge { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let started = tokio::time::Instant::now();
        let out: Result<(), _> =
            retry_transient(Duration::from_secs(1), || async { Err(backend()) }).await;
        assert!(out.expect_err("gives up").is_transient());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1300),
            "{waited:?}"
        );
    }
}

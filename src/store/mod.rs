//! The state store: where each workflow's state lives, versioned, so that
//! several orchestrators can share it without losing updates.
//!
//! Every write is a compare-and-set on the version read; a conflict means
//! someone else moved the workflow first, and the caller reloads and
//! re-applies. Stores also index workflows by their next wakeup (a retry or
//! a deadline), which is how timers fire from the store and not from tasks
//! that a crash would lose, and keep the workflow definitions by version.
//!
//! A store is four tables, each its own trait, put together in a [`Store`]:
//!
//! | trait | what | required methods |
//! | --- | --- | --- |
//! | [`WorkflowStates`] | states: create, get, compare-and-set, list, expire | 5 |
//! | [`TimerIndex`] | workflows by next wakeup | 1 |
//! | [`Definitions`] | definitions by name and version | 3 |
//! | [`HealthRecords`] | worker heartbeats | 2 |
//!
//! A new backend implements the first three; [`Store::new`] keeps worker
//! heartbeats in this process ([`LocalHealth`]) until it has its own.
//! [`MemoryStore`], `FileStore` (feature `embedded`) and `RedisStateStore`
//! (feature `redis`) implement all four.

pub mod memory;

#[cfg(feature = "embedded")]
pub mod file;

#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod fields;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod waiters;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::core::health::WorkerHealth;
use crate::core::{
    CorrelationId, Timestamp, TransactionId, WorkflowDefinition, WorkflowName, WorkflowState,
    WorkflowStatus,
};

#[cfg(feature = "postgres")]
pub use crate::postgres::{PostgresStateStore, PostgresStoreConfig};
#[cfg(feature = "redis")]
pub use crate::redis::{RedisStateStore, RedisStoreConfig};
#[cfg(feature = "embedded")]
pub use file::{FileStore, FileStoreConfig, Sync as FileSync};
pub use memory::MemoryStore;

/// The size from which stores that write parts (the file store, Redis) keep
/// a step's output or a fan-out item apart from its step, once, under its
/// SHA-256: 4 KiB. Smaller payloads stay in their step's part, where
/// reading them costs nothing more.
pub const LARGE_PAYLOAD_BYTES: usize = 4 * 1024;

/// A state version: 1 when created, +1 on every write.
pub type Version = u64;

/// A state with the version it was read at.
#[derive(Clone, Debug)]
pub struct Versioned {
    /// The version.
    pub version: Version,
    /// The state.
    pub state: Arc<WorkflowState>,
}

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only workflows in this status.
    pub status: Option<WorkflowStatus>,
    /// Only instances of this workflow.
    pub workflow: Option<WorkflowName>,
    /// Only workflows not changed since this time.
    pub updated_before: Option<Timestamp>,
    /// Only workflows changed at or after this time.
    pub updated_after: Option<Timestamp>,
    /// Only workflows of this request chain.
    pub correlation_id: Option<CorrelationId>,
    /// Only workflows started at or after this time.
    pub started_after: Option<Timestamp>,
    /// Only workflows started before this time.
    pub started_before: Option<Timestamp>,
    /// Only workflows that come after this one in the listing's order
    /// (newest first: started earlier, or at the same time with a lower
    /// id): the cursor of the next page, [`WorkflowSummary::cursor`] of the
    /// last one listed.
    pub after: Option<(Timestamp, TransactionId)>,
    /// At most this many (0 = no limit).
    pub limit: usize,
}

/// One line of a listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSummary {
    /// The instance.
    pub transaction_id: TransactionId,
    /// The definition.
    pub workflow: WorkflowName,
    /// Its version.
    pub version: u32,
    /// Where it is.
    pub status: WorkflowStatus,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl WorkflowSummary {
    /// Where a listing that ended with this workflow goes on from
    /// ([`ListQuery::after`]).
    pub fn cursor(&self) -> (Timestamp, TransactionId) {
        (self.started_at, self.transaction_id)
    }

    /// The summary of a state.
    pub fn of(state: &WorkflowState) -> Self {
        Self {
            transaction_id: state.transaction_id,
            workflow: state.workflow.clone(),
            version: state.version,
            status: state.status,
            started_at: state.started_at,
            updated_at: state.updated_at,
        }
    }
}

impl ListQuery {
    /// True when `state` is selected.
    pub fn matches(&self, state: &WorkflowState) -> bool {
        self.summary_matches(&WorkflowSummary::of(state))
            && self
                .correlation_id
                .is_none_or(|c| c == state.correlation_id)
    }

    /// True when a workflow with this summary is selected, judging by all
    /// but [`ListQuery::correlation_id`] (which a summary does not carry).
    pub fn summary_matches(&self, s: &WorkflowSummary) -> bool {
        self.status.is_none_or(|x| x == s.status)
            && self.workflow.as_ref().is_none_or(|w| *w == s.workflow)
            && self.updated_before.is_none_or(|t| s.updated_at <= t)
            && self.updated_after.is_none_or(|t| s.updated_at >= t)
            && self.started_after.is_none_or(|t| s.started_at >= t)
            && self.started_before.is_none_or(|t| s.started_at < t)
            && self.after.is_none_or(|c| s.cursor() < c)
    }
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The version was not the one expected: reload and re-apply.
    #[error(
        "workflow {transaction_id} changed concurrently (expected version {expected}, found {found})"
    )]
    Conflict {
        /// The workflow.
        transaction_id: TransactionId,
        /// The version the writer read.
        expected: Version,
        /// The version in the store.
        found: Version,
    },
    /// `create` for a workflow that exists.
    #[error("workflow {0} already exists")]
    AlreadyExists(TransactionId),
    /// A compare-and-set for a workflow that does not exist.
    #[error("workflow {0} does not exist")]
    NotFound(TransactionId),
    /// A definition with this name and version exists with other content.
    #[error(
        "workflow definition `{name}` version {version} is already registered with different steps; register the change as a new version"
    )]
    DefinitionChanged {
        /// The name.
        name: String,
        /// The version.
        version: u32,
    },
    /// Reading or writing the storage failed.
    #[error("store at {location}: {message}")]
    Io {
        /// Where (a path or an address).
        location: String,
        /// What happened.
        message: String,
    },
    /// Stored data could not be decoded.
    #[error("store at {location}: corrupt record: {message}")]
    Corrupt {
        /// Where.
        location: String,
        /// What was wrong.
        message: String,
    },
}

/// Workflow states, versioned: the table every orchestrator writes.
#[async_trait]
pub trait WorkflowStates: Send + Sync + 'static {
    /// Stores a new workflow at version 1.
    async fn create(&self, state: Arc<WorkflowState>) -> Result<Version, StoreError>;

    /// Reads a workflow.
    async fn get(&self, transaction_id: TransactionId) -> Result<Option<Versioned>, StoreError>;

    /// Writes `state` if the stored version is still `expected`; returns the
    /// new version.
    async fn compare_and_set(
        &self,
        expected: Version,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError>;

    /// Like [`WorkflowStates::compare_and_set`], given `before`, the state
    /// read at `expected` (that `state` was made from). A store that keeps
    /// a state as a head plus parts writes only what changed
    /// ([`Delta::between`](crate::core::saga::parts::Delta::between)): the
    /// changed steps and the new history entries, never the earlier outputs.
    /// The default writes the whole state.
    async fn compare_and_set_from(
        &self,
        expected: Version,
        before: &WorkflowState,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        let _ = before;
        self.compare_and_set(expected, state).await
    }

    /// True when this store can write a transition's events (commands,
    /// messages to other workflows) in the same transaction as its state,
    /// onto the bus that shares its database
    /// ([`WorkflowStates::compare_and_set_carrying`]). Then nothing is
    /// published after the write, no unpublished note is kept, and a crash
    /// cannot fall between the two.
    fn carries_events(&self) -> bool {
        false
    }

    /// Like [`WorkflowStates::compare_and_set_from`], and in the same
    /// transaction publishes `events` (by topic) on the bus this store
    /// carries for ([`WorkflowStates::carries_events`]) and acks
    /// `consumed`, the deliveries of that bus the transition applied: all
    /// happen or none. `Ok(None)` when the events cannot be carried (one is
    /// over the bus's size limit, say) and nothing was written: the caller
    /// writes, publishes and acks as usual. The default carries nothing.
    async fn compare_and_set_carrying(
        &self,
        expected: Version,
        before: &WorkflowState,
        state: Arc<WorkflowState>,
        events: &[(String, crate::core::Event)],
        consumed: &[crate::bus::DeliveryId],
    ) -> Result<Option<Version>, StoreError> {
        let _ = (expected, before, state, events, consumed);
        Ok(None)
    }

    /// Like [`WorkflowStates::create`], and in the same transaction
    /// publishes `events` (a new workflow's first commands) on the bus this
    /// store carries for. `Ok(None)` when they cannot be carried and
    /// nothing was written. The default carries nothing.
    async fn create_carrying(
        &self,
        state: Arc<WorkflowState>,
        events: &[(String, crate::core::Event)],
    ) -> Result<Option<Version>, StoreError> {
        let _ = (state, events);
        Ok(None)
    }

    /// The output of one completed step (or fan-out branch, `step[i]`):
    /// what a worker reads when its command does not carry it. The default
    /// reads the whole state; stores that keep parts read one.
    async fn step_output(
        &self,
        transaction_id: TransactionId,
        step: &str,
    ) -> Result<Option<crate::core::Payload>, StoreError> {
        Ok(self
            .get(transaction_id)
            .await?
            .and_then(|v| v.state.output(step).cloned()))
    }

    /// Lists workflows, most recently started first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError>;

    /// Deletes workflows that finished before `finished_before`; returns how many.
    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError>;

    /// Marks writes whose actions (commands, status, messages to other
    /// workflows) are now published. Stores that track unpublished writes
    /// ([`WorkflowStates::tracks_unpublished`]) note every write as
    /// unpublished until this is called for it — but for the last write of a
    /// finished top-level workflow, which leaves nothing that must arrive.
    async fn published(&self, writes: &[(TransactionId, Version)]) -> Result<(), StoreError> {
        let _ = writes;
        Ok(())
    }

    /// Writes made before `written_before` whose actions were never marked
    /// published: a process died between persisting a transition and
    /// publishing what it produced. Each returned write is leased to the
    /// caller until `lease_until`, so that one orchestrator heals it.
    async fn unpublished(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(TransactionId, Version)>, StoreError> {
        let _ = (written_before, lease_until, limit);
        Ok(Vec::new())
    }

    /// True when the store notes unpublished writes, so that the recovery
    /// sweep can find a transition whose actions never went out (a process
    /// died, or the bus failed, between the write and the publish). Every
    /// store here does; the default is for stores that cannot.
    fn tracks_unpublished(&self) -> bool {
        false
    }

    /// True when reads cross a network. The orchestrator then keeps the
    /// states it wrote and reads only when a write finds the version moved
    /// (another replica got there first) or an input changes nothing.
    fn is_remote(&self) -> bool {
        false
    }

    /// Bytes of workflow states this store has written since it was opened
    /// (to its file, or sent to its server), when it counts them: what the
    /// shape benchmarks divide by the steps run. `None` for a store that
    /// writes nothing out (the memory store).
    fn bytes_written(&self) -> Option<u64> {
        None
    }

    /// Waits until the workflow is terminal or `timeout` passes; returns its
    /// last state either way (`None` if it does not exist).
    ///
    /// The default polls; stores that can notify override it.
    async fn wait_terminal(
        &self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Result<Option<Versioned>, StoreError> {
        let until = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(1);
        loop {
            let current = self.get(transaction_id).await?;
            let done = current.as_ref().is_none_or(|v| v.state.is_terminal());
            if done || tokio::time::Instant::now() >= until {
                return Ok(current);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }
}

/// The timer index: workflows by their next wakeup (a retry, a deadline, a
/// durable sleep). A store keeps it in the same write as the state, from
/// [`WorkflowState::next_wakeup`], so that timers fire from the store and
/// not from tasks a crash would lose.
#[async_trait]
pub trait TimerIndex: Send + Sync + 'static {
    /// Workflows with a wakeup at or before `now`.
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError>;

    /// Called by the timer loop once a workflow returned by
    /// [`TimerIndex::due`] has been handled. Stores that lease due timers to
    /// one orchestrator (Redis) re-arm the timer at the workflow's real next
    /// wakeup here.
    async fn timer_handled(&self, transaction_id: TransactionId) -> Result<(), StoreError> {
        let _ = transaction_id;
        Ok(())
    }
}

/// Workflow definitions by name and version.
#[async_trait]
pub trait Definitions: Send + Sync + 'static {
    /// Registers a definition. Registering the same (name, version) again
    /// with the same content is fine; with other content it is refused.
    async fn put_definition(&self, definition: &WorkflowDefinition) -> Result<(), StoreError>;

    /// A definition by name and version.
    async fn get_definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<WorkflowDefinition>, StoreError>;

    /// The highest registered version of a definition.
    async fn latest_definition(&self, name: &str)
    -> Result<Option<WorkflowDefinition>, StoreError>;

    /// Every registered (name, version), sorted by name, then version.
    async fn definition_versions(&self) -> Result<Vec<(String, u32)>, StoreError>;
}

/// The latest heartbeat of each (worker type, process), for the worker
/// monitor of any process.
#[async_trait]
pub trait HealthRecords: Send + Sync + 'static {
    /// Keeps these heartbeats, each replacing the previous one of its
    /// (worker type, process).
    async fn record_worker_health(&self, beats: &[WorkerHealth]) -> Result<(), StoreError>;

    /// The latest heartbeats; those older than `max_age` are dropped.
    async fn worker_health(&self, max_age: Duration) -> Result<Vec<WorkerHealth>, StoreError>;
}

/// A store: one implementation per table. Cheap to clone; every clone is
/// the same store.
///
/// A backend that keeps all four ([`MemoryStore`], `FileStore`,
/// `RedisStateStore`) converts with `into()`; one without worker health
/// keeps heartbeats in this process:
///
/// ```
/// use multiagents::store::{LocalHealth, MemoryStore, Store};
///
/// let whole: Store = MemoryStore::new().into();
/// let mixed = Store::new(MemoryStore::new()).with_health(LocalHealth::default());
/// # let _ = (whole, mixed);
/// ```
#[derive(Clone)]
pub struct Store {
    /// Workflow states.
    pub states: Arc<dyn WorkflowStates>,
    /// Workflows by next wakeup.
    pub timers: Arc<dyn TimerIndex>,
    /// Workflow definitions.
    pub definitions: Arc<dyn Definitions>,
    /// Worker heartbeats.
    pub health: Arc<dyn HealthRecords>,
}

impl Store {
    /// States, timers and definitions from `backend`; worker heartbeats in
    /// this process only ([`LocalHealth`]).
    pub fn new(backend: impl WorkflowStates + TimerIndex + Definitions) -> Self {
        let backend = Arc::new(backend);
        Self {
            states: backend.clone(),
            timers: backend.clone(),
            definitions: backend,
            health: Arc::new(LocalHealth::default()),
        }
    }

    /// The same store with heartbeats kept elsewhere.
    pub fn with_health(mut self, health: impl HealthRecords) -> Self {
        self.health = Arc::new(health);
        self
    }
}

impl<S: WorkflowStates + TimerIndex + Definitions + HealthRecords> From<S> for Store {
    fn from(store: S) -> Self {
        let store = Arc::new(store);
        Self {
            states: store.clone(),
            timers: store.clone(),
            definitions: store.clone(),
            health: store,
        }
    }
}

/// Writes not yet marked published, in memory (the in-process stores): by
/// write, when it was made (or until when it is leased to a healer).
#[derive(Default)]
pub(crate) struct UnpublishedBoard {
    shards: [std::sync::Mutex<crate::core::hash::IdMap<(TransactionId, Version), u64>>; 16],
}

impl UnpublishedBoard {
    fn shard(
        &self,
        tx: TransactionId,
    ) -> std::sync::MutexGuard<'_, crate::core::hash::IdMap<(TransactionId, Version), u64>> {
        self.shards[(tx.0.as_u128() as usize) % 16]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn note(&self, tx: TransactionId, version: Version) {
        self.shard(tx)
            .insert((tx, version), Timestamp::now().as_millis());
    }

    pub(crate) fn published(&self, writes: &[(TransactionId, Version)]) {
        for w in writes {
            self.shard(w.0).remove(w);
        }
    }

    pub(crate) fn lease(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Vec<(TransactionId, Version)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (write, at) in shard.iter_mut() {
                if out.len() >= limit {
                    return out;
                }
                if *at <= written_before.as_millis() {
                    *at = lease_until.as_millis();
                    out.push(*write);
                }
            }
        }
        out
    }
}

/// Heartbeats kept in this process, by `worker@instance`: what the
/// in-process stores use, and any store without worker health.
#[derive(Default)]
pub struct LocalHealth {
    beats: std::sync::Mutex<std::collections::HashMap<String, WorkerHealth>>,
}

#[async_trait]
impl HealthRecords for LocalHealth {
    async fn record_worker_health(&self, beats: &[WorkerHealth]) -> Result<(), StoreError> {
        self.record(beats);
        Ok(())
    }

    async fn worker_health(&self, max_age: Duration) -> Result<Vec<WorkerHealth>, StoreError> {
        Ok(self.read(max_age))
    }
}

impl LocalHealth {
    pub(crate) fn record(&self, beats: &[WorkerHealth]) {
        let mut map = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        for b in beats {
            map.insert(format!("{}@{}", b.worker, b.instance), b.clone());
        }
    }

    pub(crate) fn read(&self, max_age: Duration) -> Vec<WorkerHealth> {
        let now = Timestamp::now();
        let mut map = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, b| now.since(b.at) <= max_age);
        let mut out: Vec<_> = map.values().cloned().collect();
        out.sort_by(|a, b| (&a.worker, &a.instance).cmp(&(&b.worker, &b.instance)));
        out
    }
}

/// Orders a listing most recently started first and applies its limit.
pub(crate) fn newest_first(out: &mut Vec<WorkflowSummary>, limit: usize) {
    out.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then(b.transaction_id.cmp(&a.transaction_id))
    });
    if limit > 0 {
        out.truncate(limit);
    }
}

/// Checks a definition against a stored one with the same name and version.
pub(crate) fn same_definition(
    stored: &WorkflowDefinition,
    new: &WorkflowDefinition,
) -> Result<(), StoreError> {
    if stored == new {
        Ok(())
    } else {
        Err(StoreError::DefinitionChanged {
            name: new.name().to_string(),
            version: new.version(),
        })
    }
}

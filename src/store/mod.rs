//! The state store: where each workflow's state lives, versioned, so that
//! several orchestrators can share it without losing updates.
//!
//! Every write is a compare-and-set on the version read; a conflict means
//! someone else moved the workflow first, and the caller reloads and
//! re-applies. Stores also index workflows by their next wakeup (a retry or
//! a deadline), which is how timers fire from the store and not from tasks
//! that a crash would lose, and keep the workflow definitions by version.

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "embedded")]
pub mod file;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::core::{
    Timestamp, TransactionId, WorkflowDefinition, WorkflowName, WorkflowState, WorkflowStatus,
};

#[cfg(feature = "redis")]
pub use self::redis::{RedisStateStore, RedisStoreConfig};
#[cfg(feature = "embedded")]
pub use file::{FileStore, FileStoreConfig, Sync as FileSync};
pub use memory::MemoryStore;

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
        self.status.is_none_or(|s| s == state.status)
            && self.workflow.as_ref().is_none_or(|w| *w == state.workflow)
            && self.updated_before.is_none_or(|t| state.updated_at <= t)
            && self.updated_after.is_none_or(|t| state.updated_at >= t)
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

/// A versioned store of workflow states and definitions.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
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

    /// Lists workflows, most recently started first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError>;

    /// Workflows with a wakeup (a retry or a deadline) at or before `now`.
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError>;

    /// Called by the timer loop once a workflow returned by [`StateStore::due`]
    /// has been handled. Stores that lease due timers to one orchestrator
    /// (Redis) re-arm the timer at the workflow's real next wakeup here.
    async fn timer_handled(&self, transaction_id: TransactionId) -> Result<(), StoreError> {
        let _ = transaction_id;
        Ok(())
    }

    /// Deletes workflows that finished before `finished_before`; returns how many.
    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError>;

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

    /// Keeps the latest heartbeat of each (worker type, instance), for the
    /// worker monitor of any process.
    async fn record_worker_health(
        &self,
        beats: &[crate::worker::WorkerHealth],
    ) -> Result<(), StoreError>;

    /// The latest heartbeats; those older than `max_age` are dropped.
    async fn worker_health(
        &self,
        max_age: Duration,
    ) -> Result<Vec<crate::worker::WorkerHealth>, StoreError>;

    /// Marks writes whose actions (commands, status, messages to other
    /// workflows) are now published. Stores that track unpublished writes
    /// ([`StateStore::tracks_unpublished`]) note every write as unpublished
    /// until this is called for it — but for the last write of a finished
    /// top-level workflow, which leaves nothing that must arrive.
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

/// Writes not yet marked published, in memory (the in-process stores): by
/// write, when it was made (or until when it is leased to a healer).
#[derive(Default)]
pub(crate) struct UnpublishedBoard {
    shards: [std::sync::Mutex<std::collections::HashMap<(TransactionId, Version), u64>>; 16],
}

impl UnpublishedBoard {
    fn shard(
        &self,
        tx: TransactionId,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(TransactionId, Version), u64>> {
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

/// Heartbeats kept in memory, by `worker@instance` (the in-process stores).
#[derive(Default)]
pub(crate) struct HealthBoard {
    beats: std::sync::Mutex<std::collections::HashMap<String, crate::worker::WorkerHealth>>,
}

impl HealthBoard {
    pub(crate) fn record(&self, beats: &[crate::worker::WorkerHealth]) {
        let mut map = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        for b in beats {
            map.insert(format!("{}@{}", b.worker, b.instance), b.clone());
        }
    }

    pub(crate) fn read(&self, max_age: Duration) -> Vec<crate::worker::WorkerHealth> {
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

//! The in-memory store: fast, shared by everything in one process, gone when
//! it ends. The file store keeps one of these as its index.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::newest_first;
use super::{
    Definitions, HealthRecords, ListQuery, StoreError, TimerIndex, Version, Versioned,
    WorkflowStates, WorkflowSummary, same_definition,
};
use crate::core::hash::IdMap;
use crate::core::{Timestamp, TransactionId, WorkflowDefinition, WorkflowState};

/// An in-process store of all four tables.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// Workflows are spread over shards by transaction id so that orchestrator
/// loops working on different workflows do not wait for one lock.
const SHARDS: usize = 16;

struct Inner {
    shards: Box<[Mutex<States>]>,
    definitions: Mutex<BTreeMap<(String, u32), WorkflowDefinition>>,
    health: super::LocalHealth,
    unpublished: super::UnpublishedBoard,
}

#[derive(Default)]
struct States {
    by_id: IdMap<TransactionId, Versioned>,
    wakeups: BTreeSet<(Timestamp, TransactionId)>,
    finished: BTreeSet<(Timestamp, TransactionId)>,
    waiters: IdMap<TransactionId, Vec<oneshot::Sender<Versioned>>>,
}

impl States {
    /// The version a write expecting `expected` (`None`: a create) would get.
    fn next_version(
        &self,
        expected: Option<Version>,
        tx: TransactionId,
    ) -> Result<Version, StoreError> {
        match (expected, self.by_id.get(&tx)) {
            (None, None) => Ok(1),
            (None, Some(_)) => Err(StoreError::AlreadyExists(tx)),
            (Some(_), None) => Err(StoreError::NotFound(tx)),
            (Some(e), Some(cur)) if cur.version == e => Ok(e + 1),
            (Some(e), Some(cur)) => Err(StoreError::Conflict {
                transaction_id: tx,
                expected: e,
                found: cur.version,
            }),
        }
    }

    fn index(&mut self, old: Option<&WorkflowState>, new: &WorkflowState) {
        let tx = new.transaction_id;
        let old_wakeup = old.and_then(|o| o.next_wakeup());
        let new_wakeup = new.next_wakeup();
        if old_wakeup != new_wakeup {
            if let Some(w) = old_wakeup {
                self.wakeups.remove(&(w, tx));
            }
            if let Some(w) = new_wakeup {
                self.wakeups.insert((w, tx));
            }
        }
        if let Some(f) = new.finished_at {
            self.finished.insert((f, tx));
        }
    }

    fn notify(&mut self, v: &Versioned) {
        if v.state.is_terminal()
            && let Some(waiters) = self.waiters.remove(&v.state.transaction_id)
        {
            for w in waiters {
                let _ = w.send(v.clone());
            }
        }
    }
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(States::default())).collect(),
            definitions: Mutex::default(),
            health: super::LocalHealth::default(),
            unpublished: super::UnpublishedBoard::default(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shard holding `tx`.
    fn states(&self, tx: TransactionId) -> std::sync::MutexGuard<'_, States> {
        // The low bytes of a UUIDv7 are random.
        let bytes = tx.as_uuid().as_bytes();
        let n = usize::from(bytes[15]) % SHARDS;
        self.inner.shards[n]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard in turn.
    fn each_shard(&self) -> impl Iterator<Item = std::sync::MutexGuard<'_, States>> {
        self.inner
            .shards
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Number of workflows held.
    pub fn len(&self) -> usize {
        self.each_shard().map(|s| s.by_id.len()).sum()
    }

    /// True when no workflow is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a write without making it: the new version, or why not.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))] // used by the file store
    pub(crate) fn check(
        &self,
        expected: Option<Version>,
        state: &WorkflowState,
    ) -> Result<Version, StoreError> {
        self.states(state.transaction_id)
            .next_version(expected, state.transaction_id)
    }

    /// The stored state of `tx`, now.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))] // used by the file store
    pub(crate) fn current(&self, tx: TransactionId) -> Option<Versioned> {
        self.states(tx).by_id.get(&tx).cloned()
    }

    /// Puts a state at a version without checks (used when loading a file).
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))] // used by the file store
    pub(crate) fn put_unchecked(&self, version: Version, state: Arc<WorkflowState>) {
        let mut s = self.states(state.transaction_id);
        let old = s.by_id.insert(
            state.transaction_id,
            Versioned {
                version,
                state: state.clone(),
            },
        );
        s.index(old.as_ref().map(|o| &*o.state), &state);
    }

    /// Removes a workflow without checks.
    pub(crate) fn remove_unchecked(&self, tx: TransactionId) {
        let mut s = self.states(tx);
        if let Some(old) = s.by_id.remove(&tx) {
            if let Some(w) = old.state.next_wakeup() {
                s.wakeups.remove(&(w, tx));
            }
            if let Some(f) = old.state.finished_at {
                s.finished.remove(&(f, tx));
            }
        }
    }

    /// Transaction ids of workflows that finished before `t`.
    pub(crate) fn finished_before(&self, t: Timestamp) -> Vec<TransactionId> {
        let mut out = Vec::new();
        for s in self.each_shard() {
            out.extend(
                s.finished
                    .range(..(t, TransactionId(uuid::Uuid::nil())))
                    .map(|(_, tx)| *tx),
            );
        }
        out
    }

    /// Every state, for snapshots.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))] // used by the file store
    pub(crate) fn all(&self) -> Vec<Versioned> {
        self.each_shard()
            .flat_map(|s| s.by_id.values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Every definition, for snapshots.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))] // used by the file store
    pub(crate) fn all_definitions(&self) -> Vec<WorkflowDefinition> {
        self.inner
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn write(
        &self,
        expected: Option<Version>,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        let tx = state.transaction_id;
        let mut s = self.states(tx);
        let version = s.next_version(expected, tx)?;
        let v = Versioned {
            version,
            state: state.clone(),
        };
        let old = s.by_id.insert(tx, v.clone());
        s.index(old.as_ref().map(|o| &*o.state), &state);
        s.notify(&v);
        drop(s);
        if !(state.is_terminal() && state.parent.is_none()) {
            self.note_unpublished(tx, version);
        }
        Ok(version)
    }

    /// Notes a write as unpublished (see [`WorkflowStates::unpublished`]).
    pub(crate) fn note_unpublished(&self, tx: TransactionId, version: Version) {
        self.inner.unpublished.note(tx, version);
    }

    /// Registers a definition (see [`Definitions::put_definition`]).
    pub(crate) fn insert_definition(
        &self,
        definition: &WorkflowDefinition,
    ) -> Result<(), StoreError> {
        let mut defs = self
            .inner
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (definition.name().to_string(), definition.version());
        match defs.get(&key) {
            Some(stored) => same_definition(stored, definition),
            None => {
                defs.insert(key, definition.clone());
                Ok(())
            }
        }
    }

    /// Notifies waiters of a state written through `put_unchecked`.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))] // used by the file store
    pub(crate) fn notify(&self, v: &Versioned) {
        self.states(v.state.transaction_id).notify(v);
    }
}

#[async_trait]
impl WorkflowStates for MemoryStore {
    async fn create(&self, state: Arc<WorkflowState>) -> Result<Version, StoreError> {
        self.write(None, state)
    }

    async fn get(&self, transaction_id: TransactionId) -> Result<Option<Versioned>, StoreError> {
        Ok(self
            .states(transaction_id)
            .by_id
            .get(&transaction_id)
            .cloned())
    }

    async fn compare_and_set(
        &self,
        expected: Version,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        self.write(Some(expected), state)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError> {
        let mut out: Vec<WorkflowSummary> = Vec::new();
        for s in self.each_shard() {
            out.extend(
                s.by_id
                    .values()
                    .filter(|v| query.matches(&v.state))
                    .map(|v| WorkflowSummary::of(&v.state)),
            );
        }
        newest_first(&mut out, query.limit);
        Ok(out)
    }

    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError> {
        let ids = self.finished_before(finished_before);
        for tx in &ids {
            self.remove_unchecked(*tx);
        }
        Ok(ids.len())
    }

    async fn published(&self, writes: &[(TransactionId, Version)]) -> Result<(), StoreError> {
        self.inner.unpublished.published(writes);
        Ok(())
    }

    async fn unpublished(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(TransactionId, Version)>, StoreError> {
        Ok(self
            .inner
            .unpublished
            .lease(written_before, lease_until, limit))
    }

    fn tracks_unpublished(&self) -> bool {
        true
    }

    async fn wait_terminal(
        &self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Result<Option<Versioned>, StoreError> {
        let rx = {
            let mut s = self.states(transaction_id);
            match s.by_id.get(&transaction_id) {
                None => return Ok(None),
                Some(v) if v.state.is_terminal() => return Ok(Some(v.clone())),
                Some(_) => {}
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.entry(transaction_id).or_default().push(tx);
            rx
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(Some(v)),
            _ => {
                // Forget this waiter (and any other that gave up).
                let mut s = self.states(transaction_id);
                if let Some(waiters) = s.waiters.get_mut(&transaction_id) {
                    waiters.retain(|w| !w.is_closed());
                    if waiters.is_empty() {
                        s.waiters.remove(&transaction_id);
                    }
                }
                Ok(s.by_id.get(&transaction_id).cloned())
            }
        }
    }
}

#[async_trait]
impl TimerIndex for MemoryStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError> {
        let mut due: Vec<(Timestamp, TransactionId)> = Vec::new();
        for s in self.each_shard() {
            due.extend(
                s.wakeups
                    .iter()
                    .take_while(|(t, _)| *t <= now)
                    .take(limit)
                    .copied(),
            );
        }
        // The earliest first, across shards.
        due.sort_unstable();
        due.truncate(limit);
        Ok(due.into_iter().map(|(_, tx)| tx).collect())
    }
}

#[async_trait]
impl Definitions for MemoryStore {
    async fn put_definition(&self, definition: &WorkflowDefinition) -> Result<(), StoreError> {
        self.insert_definition(definition)
    }

    async fn get_definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        let defs = self
            .inner
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(defs.get(&(name.to_string(), version)).cloned())
    }

    async fn latest_definition(
        &self,
        name: &str,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        let defs = self
            .inner
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(defs
            .range((name.to_string(), 0)..=(name.to_string(), u32::MAX))
            .next_back()
            .map(|(_, d)| d.clone()))
    }

    async fn definition_versions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let defs = self
            .inner
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(defs.keys().cloned().collect())
    }
}

#[async_trait]
impl HealthRecords for MemoryStore {
    async fn record_worker_health(
        &self,
        beats: &[crate::core::health::WorkerHealth],
    ) -> Result<(), StoreError> {
        self.inner.health.record(beats);
        Ok(())
    }

    async fn worker_health(
        &self,
        max_age: std::time::Duration,
    ) -> Result<Vec<crate::core::health::WorkerHealth>, StoreError> {
        Ok(self.inner.health.read(max_age))
    }
}

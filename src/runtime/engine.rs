//! The I/O shell around the saga core, shared by the orchestrator loops and
//! the client: load, apply, compare-and-set, publish.

use std::sync::{Arc, Mutex, RwLock};

use crate::bus::{Bus, DeadLetter, Interrupt, RESULTS_TOPIC, command_topic, command_topic_at};
use crate::core::hash::IdMap;
use crate::core::saga::{self, Action, Input};
use crate::core::{
    CorrelationId, Event, EventKind, Payload, Phase, Priority, StepError, Timestamp, TransactionId,
    WorkerName, WorkflowDefinition, WorkflowName, WorkflowState,
};
use crate::store::{Store, StoreError, Versioned, WorkflowStates};
use crate::{Error, StartOptions};

/// How many times a transition is re-applied after losing a compare-and-set.
const MAX_CONFLICT_RETRIES: usize = 64;

/// What transitions produced, to be published in one place after their
/// states are written: the events by topic, and the writes they belong to,
/// which are marked published once the events are out (a store that tracks
/// unpublished writes hands those never marked to the recovery sweep).
#[derive(Default)]
pub(crate) struct Outbox {
    pub(crate) events: Vec<(String, Event)>,
    pub(crate) written: Vec<(TransactionId, crate::store::Version)>,
    /// Deliveries acked by the writes that applied them (a store carrying
    /// the bus's events): not to be acked again.
    pub(crate) acked: Vec<crate::bus::DeliveryId>,
}

impl Outbox {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, event: (String, Event)) {
        self.events.push(event);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty() && self.written.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.events.clear();
        self.written.clear();
        self.acked.clear();
    }

    pub(crate) fn extend(&mut self, other: Outbox) {
        self.events.extend(other.events);
        self.written.extend(other.written);
        self.acked.extend(other.acked);
    }
}

/// The states this process wrote last, so that the next transition of a
/// workflow need not read it back from a remote store. An entry is only a
/// guess: the compare-and-set that follows checks its version, and an input
/// that changes nothing in a cached state is tried again on a fresh read.
struct StateCache {
    shards: [Mutex<IdMap<TransactionId, Versioned>>; 16],
}

/// Entries per shard before the shard is emptied.
const CACHE_SHARD_LIMIT: usize = 2048;

impl StateCache {
    fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(IdMap::default())),
        }
    }

    fn shard(
        &self,
        tx: TransactionId,
    ) -> std::sync::MutexGuard<'_, IdMap<TransactionId, Versioned>> {
        let i = (tx.0.as_u128() as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, tx: TransactionId) -> Option<Versioned> {
        self.shard(tx).get(&tx).cloned()
    }

    fn put(&self, version: u64, state: Arc<WorkflowState>) {
        let tx = state.transaction_id;
        let mut shard = self.shard(tx);
        if state.is_terminal() {
            shard.remove(&tx);
            return;
        }
        if shard.len() >= CACHE_SHARD_LIMIT && !shard.contains_key(&tx) {
            shard.clear();
        }
        shard.insert(tx, Versioned { version, state });
    }

    fn forget(&self, tx: TransactionId) {
        self.shard(tx).remove(&tx);
    }
}

/// One lock per workflow being changed in this process, so that the
/// transitions of one workflow taken by several consumers here (results, the
/// timer loop, the sweep) run one after the other instead of racing each
/// other's compare-and-set. Compare-and-set still guards against other
/// processes; this only stops a process from starving itself — a wide
/// fan-out's results, taken by two consumers, once lost 64 compare-and-sets
/// in a row and waited out the visibility timeout.
#[derive(Default)]
struct WorkflowLocks {
    shards: [Mutex<IdMap<TransactionId, Arc<tokio::sync::Mutex<()>>>>; 16],
}

impl WorkflowLocks {
    async fn lock(&self, tx: TransactionId) -> WorkflowGuard<'_> {
        let shard = &self.shards[(tx.0.as_u128() as usize) % 16];
        let lock = shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tx)
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        WorkflowGuard {
            shard,
            tx,
            lock,
            guard: Some(guard),
        }
    }
}

/// Held while a workflow is loaded, changed and written; the entry goes
/// when its last user lets go.
struct WorkflowGuard<'a> {
    shard: &'a Mutex<IdMap<TransactionId, Arc<tokio::sync::Mutex<()>>>>,
    tx: TransactionId,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for WorkflowGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut shard = self.shard.lock().unwrap_or_else(|e| e.into_inner());
        // Two references: the map's and ours. More means someone waits.
        if Arc::strong_count(&self.lock) <= 2 {
            shard.remove(&self.tx);
        }
    }
}

/// A transition's actions, while its state is written: to be carried out
/// after the write, or already turned into events (which the write may
/// carry) and the actions left.
enum Plan {
    Later(Vec<Action>),
    Built {
        events: Vec<(String, Event)>,
        rest: Vec<Action>,
    },
}

/// What [`Engine::drive`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Driven {
    /// The state changed and the actions were carried out.
    Applied,
    /// The input changed nothing (duplicate, stale, early).
    Unchanged,
    /// No such workflow.
    Missing,
}

pub(crate) struct Engine {
    pub(crate) bus: Bus,
    pub(crate) store: Store,
    definitions: RwLock<IdMap<(WorkflowName, u32), Arc<WorkflowDefinition>>>,
    /// Command topic names by worker and priority, so dispatching does not
    /// format one each time.
    topics: RwLock<IdMap<(WorkerName, Priority), Arc<str>>>,
    /// With a remote store only.
    cache: Option<StateCache>,
    locks: WorkflowLocks,
    /// To the task that marks writes published.
    marks: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<Written>>>,
    /// With a remote store only: writes of this process whose publishing
    /// (or marking) is still under way, which the recovery sweep must leave
    /// alone. A slow batch is not a crash: healing it would republish every
    /// command in flight of its workflows, and the copies would slow the
    /// next batches down until they too looked cut short.
    pending: Option<Arc<Pending>>,
    /// The nearest timer this process wrote, for the timer loop.
    pub(crate) timers: TimerHint,
    metrics: super::metrics::EngineMetrics,
}

/// The nearest wakeup (retry, deadline, sleep) among the states this
/// process wrote, so that the timer loop asks the store when one is due
/// rather than every few milliseconds. Timers other processes wrote are
/// found by the loop's slower regular look.
#[derive(Default)]
pub(crate) struct TimerHint {
    next: Mutex<Option<Timestamp>>,
    pub(crate) nearer: tokio::sync::Notify,
}

impl TimerHint {
    /// Notes the next wakeup of a state just written.
    fn note(&self, state: &WorkflowState) {
        let Some(at) = state.next_wakeup() else {
            return;
        };
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_none_or(|n| at < n) {
            *next = Some(at);
            drop(next);
            self.nearer.notify_one();
        }
    }

    /// How long until the nearest noted wakeup, at most `longest`.
    pub(crate) fn wait(&self, now: Timestamp, longest: std::time::Duration) -> std::time::Duration {
        let next = *self.next.lock().unwrap_or_else(|e| e.into_inner());
        match next {
            Some(at) if at.as_millis() <= now.as_millis() => std::time::Duration::ZERO,
            Some(at) => {
                std::time::Duration::from_millis(at.as_millis() - now.as_millis() + 1).min(longest)
            }
            None => longest,
        }
    }

    /// Forgets the noted wakeup if it is due by `now` (the store is about
    /// to be asked for it).
    pub(crate) fn take_due(&self, now: Timestamp) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_some_and(|at| at.as_millis() <= now.as_millis()) {
            *next = None;
        }
    }
}

/// Writes still being published by this process, with when each was
/// made. One that an error path dropped without publishing stops counting
/// after [`PENDING_AT_MOST`], so that the sweep heals it all the same.
#[derive(Default)]
pub(crate) struct Pending(std::sync::Mutex<IdMap<Written, std::time::Instant>>);

/// How long a write counts as being published by this process at most.
const PENDING_AT_MOST: std::time::Duration = std::time::Duration::from_secs(30);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<Written, std::time::Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, write: Written) {
        let mut map = self.lock();
        if map.len() >= 65_536 {
            map.retain(|_, at| at.elapsed() < PENDING_AT_MOST);
        }
        map.insert(write, std::time::Instant::now());
    }

    fn settle(&self, writes: &[Written]) {
        let mut map = self.lock();
        for w in writes {
            map.remove(w);
        }
    }

    fn contains(&self, write: &Written) -> bool {
        self.lock()
            .get(write)
            .is_some_and(|at| at.elapsed() < PENDING_AT_MOST)
    }
}

impl Engine {
    pub(crate) fn new(bus: Bus, store: Store) -> Self {
        Self {
            cache: store.states.is_remote().then(StateCache::new),
            pending: (store.states.is_remote() && store.states.tracks_unpublished())
                .then(Arc::default),
            locks: WorkflowLocks::default(),
            timers: TimerHint::default(),
            marks: std::sync::OnceLock::new(),
            metrics: super::metrics::EngineMetrics::new(),
            bus,
            store,
            definitions: RwLock::default(),
            topics: RwLock::default(),
        }
    }

    pub(crate) async fn register(&self, def: &WorkflowDefinition) -> Result<(), Error> {
        self.store.definitions.put_definition(def).await?;
        self.metrics.known(def);
        self.definitions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((def.name().clone(), def.version()), Arc::new(def.clone()));
        Ok(())
    }

    pub(crate) async fn definition(
        &self,
        name: &WorkflowName,
        version: u32,
    ) -> Result<Arc<WorkflowDefinition>, Error> {
        let key = (name.clone(), version);
        if let Some(d) = self
            .definitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(d.clone());
        }
        let def = self
            .store
            .definitions
            .get_definition(name.as_str(), version)
            .await?
            .ok_or_else(|| Error::UnknownWorkflow {
                name: name.to_string(),
                version: Some(version),
            })?;
        let def = Arc::new(def);
        self.metrics.known(&def);
        self.definitions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, def.clone());
        Ok(def)
    }

    /// Loads every registered definition (the latest version of each), so
    /// that their metrics exist from the first scrape. Best effort.
    pub(crate) async fn preload_definitions(&self) {
        let Ok(versions) = self.store.definitions.definition_versions().await else {
            return;
        };
        let mut latest: Vec<(String, u32)> = Vec::new();
        for (name, version) in versions {
            match latest.last_mut() {
                Some((n, v)) if *n == name => *v = (*v).max(version),
                _ => latest.push((name, version)),
            }
        }
        for (name, version) in latest {
            let _ = self.definition(&WorkflowName::new(&name), version).await;
        }
    }

    /// The command topic of a worker at a priority, formatted once.
    fn topic(&self, worker: &WorkerName, priority: Priority) -> Arc<str> {
        let key = (worker.clone(), priority);
        if let Some(t) = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return t.clone();
        }
        let topic: Arc<str> = Arc::from(command_topic_at(worker, priority));
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, topic.clone());
        topic
    }

    /// The command topics of every worker of every definition known here.
    pub(crate) fn command_topics(&self) -> Vec<String> {
        let defs: Vec<Arc<WorkflowDefinition>> = self
            .definitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut topics: Vec<String> = defs
            .iter()
            .flat_map(|d| d.workers().cloned().collect::<Vec<_>>())
            .map(|w| command_topic(&w))
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    async fn latest(&self, name: &str) -> Result<Arc<WorkflowDefinition>, Error> {
        let local = self
            .definitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((n, _), _)| n.as_str() == name)
            .max_by_key(|((_, v), _)| *v)
            .map(|(_, d)| d.clone());
        if let Some(d) = local {
            return Ok(d);
        }
        let def = self
            .store
            .definitions
            .latest_definition(name)
            .await?
            .ok_or_else(|| Error::UnknownWorkflow {
                name: name.to_string(),
                version: None,
            })?;
        self.definition(def.name(), def.version()).await
    }

    pub(crate) async fn start(
        &self,
        workflow: &str,
        input: Payload,
        options: StartOptions,
    ) -> Result<TransactionId, Error> {
        let def = match options.version {
            Some(v) => self.definition(&WorkflowName::new(workflow), v).await?,
            None => self.latest(workflow).await?,
        };
        let tx = options.transaction_id.unwrap_or_default();
        let correlation = options.correlation_id.unwrap_or_default();
        let (mut state, actions) = saga::start(&def, tx, correlation, input, Timestamp::now());
        state.priority = options.priority;
        let state = Arc::new(state);
        let mut outbox = Outbox::new();
        match self
            .create_run(&state, actions, options.traceparent.as_deref(), &mut outbox)
            .await?
        {
            Created::New => {}
            // Starting with a transaction id that exists is idempotent.
            Created::Existed if options.transaction_id.is_some() => return Ok(tx),
            Created::Existed => return Err(StoreError::AlreadyExists(tx).into()),
        }
        self.publish(outbox).await?;
        Ok(tx)
    }

    /// Creates the new run `state` and carries out its first `actions`. On
    /// a store that carries the bus's events, its first commands go in the
    /// statement that creates it, so that no crash can fall between the
    /// two; otherwise the write is noted unpublished and the commands go to
    /// `outbox`, for the caller to publish (the recovery sweep heals a
    /// crash between).
    async fn create_run(
        &self,
        state: &Arc<WorkflowState>,
        actions: Vec<Action>,
        traceparent: Option<&str>,
        outbox: &mut Outbox,
    ) -> Result<Created, Error> {
        if !self.store.states.carries_events() {
            match self.store.states.create(state.clone()).await {
                Ok(version) => self.created(state, version, outbox),
                Err(StoreError::AlreadyExists(_)) => return Ok(Created::Existed),
                Err(e) => return Err(e.into()),
            }
            self.execute(state, actions, None, traceparent, outbox)
                .await?;
            return Ok(Created::New);
        }
        let mut events = Vec::new();
        let rest = self.commands(state, actions, None, traceparent, &mut events);
        let created = match self
            .store
            .states
            .create_carrying(state.clone(), &events)
            .await
        {
            Ok(Some(version)) => Ok((version, true)),
            // Not carried (an event over the bus's limit): as usual.
            Ok(None) => self
                .store
                .states
                .create(state.clone())
                .await
                .map(|v| (v, false)),
            Err(e) => Err(e),
        };
        match created {
            Ok((version, true)) => {
                if let Some(cache) = &self.cache {
                    cache.put(version, state.clone());
                }
                self.timers.note(state);
            }
            Ok((version, false)) => {
                self.created(state, version, outbox);
                outbox.events.extend(events);
            }
            Err(StoreError::AlreadyExists(_)) => return Ok(Created::Existed),
            Err(e) => return Err(e.into()),
        }
        self.effects(state, rest, None).await?;
        Ok(Created::New)
    }

    /// A new run was written (its commands not carried): cached, its timer
    /// noted, the write noted unpublished.
    fn created(
        &self,
        state: &Arc<WorkflowState>,
        version: crate::store::Version,
        outbox: &mut Outbox,
    ) {
        if let Some(cache) = &self.cache {
            cache.put(version, state.clone());
        }
        self.timers.note(state);
        self.wrote(outbox, state.transaction_id, version);
    }

    /// Starts the run that retries `old` (see [`saga::retry`]): marks the
    /// old run retried, creates the new one and publishes its first
    /// commands. Asked twice at once, both calls make the same single run.
    pub(crate) async fn retry(
        &self,
        old: TransactionId,
        plan: saga::RetryPlan,
        latest: bool,
    ) -> Result<TransactionId, Error> {
        let refused = |refused| Error::Retry {
            transaction_id: old,
            refused,
        };
        let new = saga::retry_id(old);
        for attempt in 0..MAX_CONFLICT_RETRIES {
            let current = self
                .store
                .states
                .get(old)
                .await?
                .ok_or(Error::NotFound(old))?;
            saga::check_retryable(&current.state).map_err(refused)?;
            let marked = saga::retried_as(&current.state);
            if let Some(retry) = marked
                && self.store.states.get(retry).await?.is_some()
            {
                return Err(refused(saga::RetryRefused::AlreadyRetried { retry }));
            }
            let def = if latest {
                self.latest(current.state.workflow.as_str()).await?
            } else {
                self.definition(&current.state.workflow, current.state.version)
                    .await?
            };
            let now = Timestamp::now();
            let (state, actions) =
                saga::retry(&def, &current.state, plan.clone(), now).map_err(refused)?;
            if marked.is_none() {
                let mut old_state = WorkflowState::clone(&current.state);
                saga::mark_retried(&mut old_state, new, now);
                match self
                    .store
                    .states
                    .compare_and_set(current.version, Arc::new(old_state))
                    .await
                {
                    Ok(_) => {}
                    Err(StoreError::Conflict { .. }) => {
                        if attempt > 2 {
                            tokio::time::sleep(conflict_pause(attempt)).await;
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let state = Arc::new(state);
            let mut outbox = Outbox::new();
            // `Existed`: the other of two calls at once made it.
            self.create_run(&state, actions, None, &mut outbox).await?;
            self.publish(outbox).await?;
            return Ok(new);
        }
        Err(Error::Contended {
            transaction_id: old,
            attempts: MAX_CONFLICT_RETRIES,
        })
    }

    /// Applies `input` to a workflow, persisting with compare-and-set and
    /// re-applying on conflict, then carries out the actions.
    pub(crate) async fn drive(
        &self,
        tx: TransactionId,
        input: &Input,
        cause: Option<&Event>,
    ) -> Result<Driven, Error> {
        let mut outbox = Outbox::new();
        let driven = self.drive_into(tx, input, cause, None, &mut outbox).await?;
        self.publish(outbox).await?;
        Ok(driven)
    }

    /// Like [`Engine::drive`], but the commands go to `outbox` for the caller
    /// to publish (with its acks, in one round trip). `consumed` is the
    /// delivery of `cause`: a store that carries the bus's events acks it in
    /// the transaction of the write, and notes it in `outbox.acked`.
    pub(crate) async fn drive_into(
        &self,
        tx: TransactionId,
        input: &Input,
        cause: Option<&Event>,
        consumed: Option<&crate::bus::DeliveryId>,
        outbox: &mut Outbox,
    ) -> Result<Driven, Error> {
        let guard = self.locks.lock(tx).await;
        let mut cached = self.cache.as_ref().and_then(|c| c.get(tx));
        let mut attempts = 0;
        while attempts < MAX_CONFLICT_RETRIES {
            let from_cache = cached.is_some();
            let current = match cached.take() {
                Some(c) => c,
                None => match self.store.states.get(tx).await? {
                    Some(c) => c,
                    None => return Ok(Driven::Missing),
                },
            };
            let def = self
                .definition(&current.state.workflow, current.state.version)
                .await?;
            let mut state = WorkflowState::clone(&current.state);
            let now = Timestamp::now();
            let outcome = saga::apply(&def, &mut state, input.clone(), now);
            if !outcome.changed {
                if from_cache {
                    // The cached state may be behind: ask the store.
                    continue;
                }
                return Ok(Driven::Unchanged);
            }
            if let Some(timing) = cause.and_then(|c| c.timing.as_ref()) {
                annotate(&mut state, current.state.history.len(), input, timing);
            }
            if state.is_terminal() {
                // Kept as it is from now on (by the memory store, a cache,
                // waiters): without the room left for later transitions.
                state.shrink_to_fit();
            }
            let state = Arc::new(state);
            let traceparent = cause.and_then(|c| c.traceparent.clone());
            let (plan, written) = if self.store.states.carries_events() {
                // The events go with the state, in its transaction.
                let mut events = Vec::new();
                let rest = self.commands(
                    &state,
                    outcome.actions,
                    cause,
                    traceparent.as_deref(),
                    &mut events,
                );
                let written = match self
                    .store
                    .states
                    .compare_and_set_carrying(
                        current.version,
                        &current.state,
                        state.clone(),
                        &events,
                        consumed.map(std::slice::from_ref).unwrap_or_default(),
                    )
                    .await
                {
                    Ok(Some(version)) => Ok((version, true)),
                    // Not carried (an event over the bus's limit): as usual.
                    Ok(None) => self
                        .store
                        .states
                        .compare_and_set_from(current.version, &current.state, state.clone())
                        .await
                        .map(|v| (v, false)),
                    Err(e) => Err(e),
                };
                (Plan::Built { events, rest }, written)
            } else {
                let written = self
                    .store
                    .states
                    .compare_and_set_from(current.version, &current.state, state.clone())
                    .await
                    .map(|v| (v, false));
                (Plan::Later(outcome.actions), written)
            };
            match written {
                Ok((version, carried)) => {
                    if let Some(cache) = &self.cache {
                        cache.put(version, state.clone());
                    }
                    drop(guard);
                    if carried {
                        outbox.acked.extend(consumed.cloned());
                    }
                    self.timers.note(&state);
                    self.metrics.result(&current.state, input, now);
                    let counted = !matches!(input, Input::Redispatch { .. });
                    match plan {
                        Plan::Later(actions) => {
                            self.wrote(outbox, tx, version);
                            if counted {
                                for action in &actions {
                                    if let Action::Dispatch(d) = action {
                                        self.metrics.dispatch(&state, &d.step, d.phase, d.attempt);
                                    }
                                }
                            }
                            self.execute(&state, actions, cause, traceparent.as_deref(), outbox)
                                .await?;
                        }
                        Plan::Built { events, rest } => {
                            if counted {
                                for (_, e) in &events {
                                    if let (
                                        EventKind::Command | EventKind::Compensation,
                                        Some(step),
                                    ) = (e.kind, &e.step)
                                    {
                                        self.metrics.dispatch(&state, step, e.phase, e.attempt);
                                    }
                                }
                            }
                            if !carried {
                                self.wrote(outbox, tx, version);
                                outbox.events.extend(events);
                            }
                            self.effects(&state, rest, cause).await?;
                        }
                    }
                    return Ok(Driven::Applied);
                }
                Err(StoreError::Conflict { .. }) => {
                    if let Some(cache) = &self.cache {
                        cache.forget(tx);
                    }
                    attempts += 1;
                    // Another process changes it too: step aside a little
                    // (more each time, with jitter) rather than spin.
                    if attempts > 2 {
                        tokio::time::sleep(conflict_pause(attempts)).await;
                    }
                }
                Err(e) => {
                    if let Some(cache) = &self.cache {
                        cache.forget(tx);
                    }
                    return Err(e.into());
                }
            }
        }
        Err(Error::Contended {
            transaction_id: tx,
            attempts: MAX_CONFLICT_RETRIES,
        })
    }

    /// Publishes what transitions put in an outbox, then marks their writes
    /// published.
    pub(crate) async fn publish(&self, mut outbox: Outbox) -> Result<(), Error> {
        let sent = match outbox.events.len() {
            0 => Ok(()),
            1 => {
                let (topic, e) = outbox.events.pop().expect("one command");
                self.bus.topics.publish(&topic, e).await
            }
            _ => {
                self.bus
                    .topics
                    .publish_many(std::mem::take(&mut outbox.events))
                    .await
            }
        };
        match sent {
            Ok(()) => {
                self.mark_published(&outbox.written).await;
                Ok(())
            }
            Err(e) => {
                self.not_published(&outbox.written);
                Err(e.into())
            }
        }
    }

    /// Notes a write in `outbox`, and as pending until it is published.
    fn wrote(&self, outbox: &mut Outbox, tx: TransactionId, version: crate::store::Version) {
        outbox.written.push((tx, version));
        if let Some(pending) = &self.pending {
            pending.add((tx, version));
        }
    }

    /// Publishing these writes' actions failed: they are no longer pending,
    /// so that the recovery sweep heals them.
    pub(crate) fn not_published(&self, written: &[Written]) {
        if let Some(pending) = &self.pending {
            pending.settle(written);
        }
    }

    /// True while this process is still publishing (or marking) `write`.
    pub(crate) fn publishing(&self, write: &Written) -> bool {
        self.pending.as_ref().is_some_and(|p| p.contains(write))
    }

    /// Marks writes published. For a remote store it is off the caller's
    /// path: one task takes what every loop of this process published
    /// meanwhile and marks it in one call; an in-process store is marked at
    /// once. A mark that is lost (the process dies first, the call fails)
    /// only costs a republish by the recovery sweep, which is harmless (the
    /// same attempts, the same keys).
    pub(crate) async fn mark_published(&self, written: &[(TransactionId, crate::store::Version)]) {
        if written.is_empty() || !self.store.states.tracks_unpublished() {
            return;
        }
        if !self.store.states.is_remote() {
            // In process a mark is a map removal: cheaper done here than
            // sent to the marking task.
            if let Err(e) = self.store.states.published(written).await {
                tracing::warn!(error = %e, writes = written.len(), "marking writes published failed; the recovery sweep will publish their commands again");
            }
            return;
        }
        let marks = self.marks.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // A weak reference: the store closes (a file store lets go of
            // its lock) when the engine goes, not when this task notices.
            tokio::spawn(mark_published_loop(
                Arc::downgrade(&self.store.states),
                self.pending.clone(),
                rx,
            ));
            tx
        });
        if marks.send(written.to_vec()).is_err() {
            tracing::debug!("the marking task is gone; the recovery sweep republishes instead");
            self.not_published(written);
        }
    }

    /// Publishes a transition's commands, broadcasts its status changes and
    /// records its dead letters.
    async fn execute(
        &self,
        state: &WorkflowState,
        actions: Vec<Action>,
        cause: Option<&Event>,
        traceparent: Option<&str>,
        outbox: &mut Outbox,
    ) -> Result<(), Error> {
        let rest = self.commands(state, actions, cause, traceparent, &mut outbox.events);
        self.effects(state, rest, cause).await
    }

    /// The events a transition's actions send (commands, compensations,
    /// messages to sub-workflows and parents), put in `events`; the other
    /// actions (status, interrupts, dead letters) are returned, to be
    /// carried out by [`Engine::effects`] once the state is written.
    fn commands(
        &self,
        state: &WorkflowState,
        actions: Vec<Action>,
        cause: Option<&Event>,
        traceparent: Option<&str>,
        events: &mut Vec<(String, Event)>,
    ) -> Vec<Action> {
        let traceparent: Option<Arc<str>> = traceparent.map(Arc::from);
        let mut rest = Vec::new();
        for action in actions {
            match action {
                Action::Dispatch(d) => {
                    tracing::debug!(
                        transaction_id = %state.transaction_id,
                        correlation_id = %state.correlation_id,
                        workflow = %state.workflow,
                        step = %d.step,
                        attempt = d.attempt,
                        phase = %d.phase,
                        worker = %d.worker,
                        "step dispatched"
                    );
                    let kind = match d.phase {
                        Phase::Forward => EventKind::Command,
                        Phase::Compensate => EventKind::Compensation,
                    };
                    // The dispatch span's context when tracing, else the cause's.
                    let span = crate::monitoring::otel::dispatch(
                        state,
                        &d.step,
                        d.phase,
                        d.attempt,
                        d.worker.as_str(),
                    );
                    let mut e = Event::new(
                        kind,
                        state.transaction_id,
                        state.correlation_id,
                        state.workflow.clone(),
                        d.payload,
                    );
                    e.step = Some(d.step);
                    e.phase = d.phase;
                    e.attempt = d.attempt;
                    e.deadline = Some(d.deadline);
                    e.causation_id = cause.map(|c| c.id);
                    e.traceparent = span.map(Arc::from).or_else(|| traceparent.clone());
                    events.push((String::from(&*self.topic(&d.worker, state.priority)), e));
                }
                // A child is driven by a message, handled like a result:
                // with its own compare-and-set and ack, never inline.
                Action::StartChild(start) => {
                    let start = *start;
                    let control = ChildControl::Start {
                        parent: start.parent,
                        workflow: start.workflow,
                        version: start.version,
                        input: start.input,
                        priority: state.priority,
                    };
                    events.push(control_message(state, start.transaction_id, &control));
                }
                Action::CancelChild {
                    transaction_id,
                    reason,
                } => {
                    let control = ChildControl::Cancel { reason };
                    events.push(control_message(state, transaction_id, &control));
                }
                Action::UndoChild {
                    parent,
                    transaction_id,
                } => {
                    let control = ChildControl::Undo { parent: *parent };
                    events.push(control_message(state, transaction_id, &control));
                }
                Action::NotifyParent(outcome) => {
                    events.push(notify_parent(state.correlation_id, *outcome));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Carries out what [`Engine::commands`] left: broadcasts status
    /// changes, interrupts steps in flight, records dead letters.
    async fn effects(
        &self,
        state: &WorkflowState,
        actions: Vec<Action>,
        cause: Option<&Event>,
    ) -> Result<(), Error> {
        for action in actions {
            match action {
                Action::Status(update) => {
                    log_status(state, &update);
                    self.metrics.status(state, &update);
                    if matches!(update, saga::StatusUpdate::Finished { .. }) {
                        crate::monitoring::otel::workflow_finished(state);
                    }
                    if self.bus.notifier.has_status_listeners() {
                        let payload = Payload::to_json(&update).unwrap_or_else(|_| Payload::null());
                        let mut e = Event::new(
                            EventKind::Status,
                            state.transaction_id,
                            state.correlation_id,
                            state.workflow.clone(),
                            payload,
                        );
                        e.causation_id = cause.map(|c| c.id);
                        self.bus.notifier.broadcast(e);
                    }
                }
                Action::Interrupt {
                    step,
                    attempt,
                    worker,
                } => {
                    tracing::debug!(transaction_id = %state.transaction_id, step = %step, attempt, worker = %worker, "interrupting a step in flight");
                    let interrupt = Interrupt {
                        transaction_id: state.transaction_id,
                        step,
                        attempt,
                    };
                    if let Err(e) = self.bus.notifier.interrupt(interrupt).await {
                        tracing::warn!(transaction_id = %state.transaction_id, error = %e, "interrupting a step failed; it settles when it answers or times out");
                    }
                }
                Action::DeadLetter { step, reason } => {
                    tracing::error!(
                        transaction_id = %state.transaction_id,
                        correlation_id = %state.correlation_id,
                        step = %step,
                        "{reason}"
                    );
                    let body = serde_json::json!({
                        "transaction_id": state.transaction_id,
                        "workflow": state.workflow,
                        "step": step,
                        "last_error": state.step(step.as_str()).and_then(|s| s.last_error.clone()),
                    });
                    self.bus
                        .topics
                        .dead_letter(DeadLetter {
                            id: String::new(),
                            topic: crate::bus::COMPENSATIONS.into(),
                            group: None,
                            reason,
                            delivery_count: 0,
                            at: Timestamp::now(),
                            body: body.to_string(),
                        })
                        .await?;
                }
                // Turned into events by `commands`.
                Action::Dispatch(_)
                | Action::StartChild(_)
                | Action::CancelChild { .. }
                | Action::UndoChild { .. }
                | Action::NotifyParent(_) => {}
            }
        }
        Ok(())
    }
}

impl Engine {
    /// Heals writes of one workflow whose actions were never marked
    /// published (their process died between persisting and publishing):
    /// publishes the commands of every step of the workflow in flight again,
    /// and, for a finished sub-workflow, its answer to the parent. Then marks
    /// the writes (`versions`) published.
    pub(crate) async fn heal_unpublished(
        &self,
        tx: TransactionId,
        versions: &[crate::store::Version],
    ) -> Result<(), Error> {
        let mut outbox = Outbox::new();
        let input = Input::Redispatch {
            dispatched_before: Timestamp::now(),
        };
        let driven = self.drive_into(tx, &input, None, None, &mut outbox).await?;
        if driven == Driven::Unchanged
            && let Some(current) = self.store.states.get(tx).await?
            && let Some(outcome) = saga::parent_outcome(&current.state)
        {
            outbox.push(notify_parent(current.state.correlation_id, outcome));
        }
        outbox.written.extend(versions.iter().map(|&v| (tx, v)));
        self.publish(outbox).await
    }
}

/// A write: a workflow and the version written.
type Written = (TransactionId, crate::store::Version);

/// Marks what was published, as much at once as has come in.
async fn mark_published_loop(
    states: std::sync::Weak<dyn WorkflowStates>,
    pending: Option<Arc<Pending>>,
    mut marks: tokio::sync::mpsc::UnboundedReceiver<Vec<Written>>,
) {
    let mut batch: Vec<Written> = Vec::new();
    while let Some(first) = marks.recv().await {
        batch.extend(first);
        while batch.len() < 4096 {
            match marks.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let Some(states) = states.upgrade() else {
            return;
        };
        if let Err(e) = states.published(&batch).await {
            tracing::warn!(error = %e, writes = batch.len(), "marking writes published failed; the recovery sweep will publish their commands again");
        }
        if let Some(pending) = &pending {
            pending.settle(&batch);
        }
        drop(states);
        batch.clear();
    }
}

/// How long to wait after losing `attempts` compare-and-sets in a row: up to
/// 1 ms, doubling, capped at 50 ms, scaled by a jitter in [0.5, 1).
fn conflict_pause(attempts: usize) -> std::time::Duration {
    let base = (1u64 << attempts.min(6)).min(50) * 1000;
    let jitter = uuid::Uuid::new_v4().as_u128() as u64 % (base / 2 + 1);
    std::time::Duration::from_micros(base / 2 + jitter)
}

/// The deepest a sub-workflow may be nested.
pub const MAX_CHILD_DEPTH: u32 = 8;

impl Engine {
    /// Carries out a message to a sub-workflow from its parent (see
    /// [`ChildControl`]); what that produces goes to `outbox`.
    pub(crate) async fn control_child(
        &self,
        message: &Event,
        outbox: &mut Outbox,
    ) -> Result<(), Error> {
        let ControlDoc { control } = message
            .payload
            .parse()
            .map_err(|e| Error::Input(format!("not a message to a sub-workflow: {e}")))?;
        let tx = message.transaction_id;
        match control {
            ChildControl::Start {
                parent,
                workflow,
                version,
                input,
                priority,
            } => {
                let start = saga::StartChild {
                    parent,
                    transaction_id: tx,
                    workflow,
                    version,
                    input,
                };
                self.start_child(message.correlation_id, priority, start, outbox)
                    .await
            }
            ChildControl::Cancel { reason } => self
                .drive_into(tx, &Input::Cancel { reason }, Some(message), None, outbox)
                .await
                .map(|_| ()),
            ChildControl::Undo { parent } => {
                let input = Input::Undo {
                    reason: format!(
                        "step `{}` of workflow {} is compensated",
                        parent.step, parent.transaction_id
                    ),
                    parent_attempt: parent.attempt,
                };
                let driven = self
                    .drive_into(tx, &input, Some(message), None, outbox)
                    .await?;
                if driven != Driven::Applied {
                    // Undone already (a repeat), or gone: answer the parent now.
                    let outcome = match self.store.states.get(tx).await? {
                        Some(child) => saga::parent_outcome(&child.state)
                            .filter(|o| o.phase == Phase::Compensate),
                        None => Some(saga::ChildOutcome {
                            parent: parent.clone(),
                            phase: Phase::Compensate,
                            result: Err(StepError::fatal(format!(
                                "sub-workflow {tx} cannot be compensated: its state is gone (expired?)"
                            ))),
                        }),
                    };
                    if let Some(mut o) = outcome {
                        o.parent.attempt = parent.attempt;
                        outbox.push(notify_parent(message.correlation_id, o));
                    }
                }
                Ok(())
            }
        }
    }

    /// Starts a sub-workflow for a parent step (again, harmlessly, when
    /// recovering: the child's id is fixed by the parent step and attempt).
    async fn start_child(
        &self,
        correlation_id: CorrelationId,
        priority: Priority,
        start: saga::StartChild,
        outbox: &mut Outbox,
    ) -> Result<(), Error> {
        let refuse = |message: String, outbox: &mut Outbox| {
            let outcome = saga::ChildOutcome {
                parent: start.parent.clone(),
                phase: Phase::Forward,
                result: Err(StepError::fatal(message).with_kind("sub_workflow")),
            };
            outbox.push(notify_parent(correlation_id, outcome));
        };
        if start.parent.depth > MAX_CHILD_DEPTH {
            refuse(
                format!(
                    "sub-workflow `{}` would be nested {} deep; the limit is {MAX_CHILD_DEPTH}",
                    start.workflow, start.parent.depth
                ),
                outbox,
            );
            return Ok(());
        }
        let def = match start.version {
            Some(v) => self.definition(&start.workflow, v).await,
            None => self.latest(start.workflow.as_str()).await,
        };
        let def = match def {
            Ok(d) => d,
            Err(e @ Error::UnknownWorkflow { .. }) => {
                refuse(format!("cannot start the sub-workflow: {e}"), outbox);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let tx = start.transaction_id;
        let (mut state, actions) = saga::start_child(
            &def,
            tx,
            correlation_id,
            start.input,
            Timestamp::now(),
            Some(start.parent),
        );
        state.priority = priority;
        let state = Arc::new(state);
        if self.create_run(&state, actions, None, outbox).await? == Created::Existed {
            // Started before (a republished message): if it has finished,
            // tell the parent again.
            if let Some(child) = self.store.states.get(tx).await?
                && let Some(outcome) = saga::parent_outcome(&child.state)
            {
                outbox.push(notify_parent(correlation_id, outcome));
            }
        }
        Ok(())
    }
}

/// Whether [`Engine::create_run`] made the run or found it made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Created {
    New,
    Existed,
}

/// What a parent sends its sub-workflow, on the results topic as a
/// `Command` without a step, addressed by the child's transaction id.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChildControl {
    /// Start it (again, harmlessly: its id is fixed by the parent step).
    Start {
        parent: crate::core::saga::ParentLink,
        workflow: WorkflowName,
        version: Option<u32>,
        input: Payload,
        priority: Priority,
    },
    /// Cancel it: the parent stopped.
    Cancel { reason: String },
    /// Undo it: the parent step that ran it is compensated.
    Undo {
        parent: crate::core::saga::ParentLink,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct ControlDoc {
    control: ChildControl,
}

/// True when `event` is a parent's message to a sub-workflow.
pub(crate) fn is_control(event: &Event) -> bool {
    event.kind == EventKind::Command && event.step.is_none()
}

fn control_message(
    parent: &WorkflowState,
    child: TransactionId,
    control: &ChildControl,
) -> (String, Event) {
    let doc = serde_json::json!({ "control": control });
    let mut e = Event::new(
        EventKind::Command,
        child,
        parent.correlation_id,
        parent.workflow.clone(),
        Payload::to_json(&doc).unwrap_or_else(|_| Payload::null()),
    );
    e.causation_id = None;
    (RESULTS_TOPIC.to_string(), e)
}

/// The result (or error) event that answers a parent step for its child.
fn notify_parent(correlation_id: CorrelationId, outcome: saga::ChildOutcome) -> (String, Event) {
    let (kind, payload) = match outcome.result {
        Ok(output) => (EventKind::Result, output),
        Err(e) => (
            EventKind::Error,
            Payload::to_json(&e).unwrap_or_else(|_| Payload::null()),
        ),
    };
    let mut e = Event::new(
        kind,
        outcome.parent.transaction_id,
        correlation_id,
        outcome.parent.workflow.clone(),
        payload,
    );
    e.step = Some(outcome.parent.step);
    e.phase = outcome.phase;
    e.attempt = outcome.parent.attempt;
    (RESULTS_TOPIC.to_string(), e)
}

/// One log line per status change, with the workflow's fields, so that a
/// workflow's steps can be found in the logs by its transaction id.
fn log_status(state: &WorkflowState, update: &saga::StatusUpdate) {
    use saga::StatusUpdate as U;
    let (tx, corr, wf) = (
        &state.transaction_id,
        &state.correlation_id,
        &state.workflow,
    );
    match update {
        U::Started => tracing::info!(
            transaction_id = %tx, correlation_id = %corr, workflow = %wf,
            "workflow started"
        ),
        U::StepCompleted { step, attempt } => tracing::info!(
            transaction_id = %tx, correlation_id = %corr, workflow = %wf,
            step = %step, attempt,
            "step completed"
        ),
        U::StepFailed { step, error } => tracing::info!(
            transaction_id = %tx, correlation_id = %corr, workflow = %wf,
            step = %step,
            attempt = state.step(step.as_str()).map_or(0, |s| s.attempts),
            error = %error,
            "step failed for good"
        ),
        U::StepCompensated { step } => tracing::info!(
            transaction_id = %tx, correlation_id = %corr, workflow = %wf,
            step = %step,
            attempt = state.step(step.as_str()).map_or(0, |s| s.compensation_attempts),
            "step compensated"
        ),
        U::StepSkipped { step } => tracing::info!(
            transaction_id = %tx, correlation_id = %corr, workflow = %wf,
            step = %step,
            "step skipped: its condition did not hold"
        ),
        U::Finished { status } => tracing::info!(
            transaction_id = %tx, correlation_id = %corr, workflow = %wf,
            status = %status,
            "workflow finished"
        ),
    }
}

/// Puts a result's timing on the history entry its transition added for
/// that step and attempt.
fn annotate(state: &mut WorkflowState, before: usize, input: &Input, timing: &crate::core::Timing) {
    let (step, attempt) = match input {
        Input::Succeeded { step, attempt, .. } | Input::Failed { step, attempt, .. } => {
            (step, *attempt)
        }
        _ => return,
    };
    // By index from `before`: only the entries of this transition are
    // touched, so the shared chunks of the history before it stay shared.
    let hit = (before..state.history.len()).find(|&i| {
        let e = &state.history[i];
        e.step.as_ref() == Some(step) && e.attempt == attempt
    });
    if let Some(i) = hit {
        state.history[i].timing = Some(Arc::new(timing.clone()));
    }
}

//! The worker manager: registers workers, consumes their commands with a
//! bounded number in flight per worker, enforces deadlines, answers with
//! results or errors, reports health by heartbeat and drains in-flight work
//! on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Worker, WorkerContext, WorkerError};
use crate::bus::{
    Bus, Consumer, Delivery, DeliveryId, Interrupt, PlaceLimits, RESULTS_TOPIC, WORKER_GROUP,
    command_topic_at,
};
use crate::core::health::{ErrorKind, WorkerHealth};
use crate::core::{
    Event, EventKind, Payload, Phase, Priority, StepError, StepName, Timestamp, TransactionId,
    WorkerName,
};

/// How one worker type is run.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Calls in flight at once in this process.
    pub concurrency: usize,
    /// Limits shared by every process on the bus (none by default).
    pub shared: PlaceLimits,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            shared: PlaceLimits {
                concurrency: None,
                rate: None,
                lease: Duration::from_secs(60),
            },
        }
    }
}

impl WorkerOptions {
    /// Sets the concurrency limit of this process.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// At most `n` calls of this worker type at once across **all**
    /// processes on the bus (an API that allows so many connections, say).
    /// Give every process the same limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// use multiagents::worker::WorkerOptions;
    ///
    /// let options = WorkerOptions::default()
    ///     .global_concurrency(10)
    ///     .rate_limit(100, Duration::from_secs(1));
    /// assert_eq!(options.shared.concurrency, Some(10));
    /// ```
    pub fn global_concurrency(mut self, n: u32) -> Self {
        self.shared.concurrency = Some(n.max(1));
        self
    }

    /// At most `calls` calls of this worker type started per `period`
    /// across all processes on the bus.
    pub fn rate_limit(mut self, calls: u32, period: Duration) -> Self {
        self.shared.rate = Some((calls.max(1), period.max(Duration::from_millis(1))));
        self
    }

    /// How long a place under [`global_concurrency`](Self::global_concurrency)
    /// is held at most (default 60 s): a call should finish within it, and
    /// the places of a process that dies come back after it.
    pub fn place_lease(mut self, lease: Duration) -> Self {
        self.shared.lease = lease.max(Duration::from_millis(1));
        self
    }

    fn limited(&self) -> bool {
        self.shared.concurrency.is_some() || self.shared.rate.is_some()
    }
}

/// Settings of a [`WorkerManager`].
#[derive(Clone, Debug)]
pub struct WorkerManagerConfig {
    /// This process's name among the workers (consumer name on the bus).
    pub instance: String,
    /// How often a heartbeat is broadcast.
    pub heartbeat_interval: Duration,
    /// How long shutdown waits for calls in flight before cancelling them.
    pub drain_timeout: Duration,
    /// How many commands one consumer takes from the bus at once.
    pub batch_size: usize,
    /// Put when a command was picked up, started and finished on its answer,
    /// so that the event monitor can show each step's lifecycle
    /// (`event_monitoring.enabled`).
    pub record_timing: bool,
    /// Keep call durations and errors by kind for the worker monitor
    /// (`worker_monitoring.enabled`).
    pub monitor: bool,
}

impl Default for WorkerManagerConfig {
    fn default() -> Self {
        Self {
            instance: format!("worker-{}", std::process::id()),
            heartbeat_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            batch_size: 64,
            record_timing: true,
            monitor: true,
        }
    }
}

impl WorkerManagerConfig {
    /// Applies the monitoring settings: the heartbeat interval
    /// (`worker_monitoring.health_check_interval_seconds`), whether durations
    /// and errors are kept (`worker_monitoring.enabled`) and whether answers
    /// carry their timing (`event_monitoring.enabled`).
    pub fn with_monitoring(mut self, m: &crate::monitoring::MonitoringConfig) -> Self {
        self.heartbeat_interval =
            Duration::from_secs(m.worker_monitoring.health_check_interval_seconds.max(1));
        self.monitor = m.worker_monitoring.enabled;
        self.record_timing = m.event_monitoring.enabled;
        self
    }
}

/// Registers workers and runs them against a bus.
///
/// ```no_run
/// # async fn demo(bus: multiagents::bus::Bus) -> Result<(), multiagents::Error> {
/// use multiagents::worker::{from_fn, WorkerError, WorkerManager, WorkerOptions};
///
/// let handle = WorkerManager::new(bus)
///     .register(from_fn("double", |n: u64, _ctx| async move { Ok::<_, WorkerError>(n * 2) }))
///     .register_with(from_fn("slow", |n: u64, _ctx| async move { Ok::<_, WorkerError>(n) }), WorkerOptions::default().concurrency(4))
///     .start()
///     .await?;
/// // … later
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
pub struct WorkerManager {
    bus: Bus,
    config: WorkerManagerConfig,
    workers: Vec<(Arc<dyn Worker>, WorkerOptions)>,
    /// Where heartbeats are kept and redelivered commands are checked.
    store: Option<crate::store::Store>,
}

/// Error kinds kept per worker type.
const ERROR_KINDS_KEPT: usize = 16;

/// What the worker monitor needs that counters alone do not give. Calls
/// push their durations into a lock-free bucket; snapshots drain it into the
/// histogram, so the hot path takes no lock.
struct Detail {
    recent: metrics_util::storage::AtomicBucket<u64>,
    summary: std::sync::Mutex<Summary>,
}

struct Summary {
    durations: hdrhistogram::Histogram<u64>,
    errors: Vec<ErrorKind>,
    /// Counters at the previous snapshot.
    last: (u64, u64),
}

impl Detail {
    fn new() -> Self {
        Self {
            recent: metrics_util::storage::AtomicBucket::new(),
            summary: std::sync::Mutex::new(Summary {
                // 1 µs to 1 hour, 2 significant digits.
                durations: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("valid histogram bounds"),
                errors: Vec::new(),
                last: (0, 0),
            }),
        }
    }

    /// The summary, with the durations pushed since folded in.
    fn summary(&self) -> std::sync::MutexGuard<'_, Summary> {
        let mut s = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        let durations = &mut s.durations;
        self.recent.clear_with(|values| {
            for v in values {
                let _ = durations.record((*v).clamp(1, 3_600_000_000));
            }
        });
        s
    }
}

impl Summary {
    fn error(&mut self, kind: &str, message: &str, at: Timestamp) {
        match self.errors.iter_mut().find(|e| e.kind == kind) {
            Some(e) => {
                e.count += 1;
                e.last_message = message.to_string();
                e.last_at = at;
            }
            None => {
                if self.errors.len() >= ERROR_KINDS_KEPT {
                    // Forget the kind seen longest ago.
                    if let Some(i) = (0..self.errors.len()).min_by_key(|i| self.errors[*i].last_at)
                    {
                        self.errors.swap_remove(i);
                    }
                }
                self.errors.push(ErrorKind {
                    kind: kind.to_string(),
                    count: 1,
                    last_message: message.to_string(),
                    last_at: at,
                });
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    /// With worker monitoring on.
    detail: Option<Detail>,
}

impl WorkerManager {
    /// A manager on `bus` with default settings.
    pub fn new(bus: impl Into<Bus>) -> Self {
        Self {
            bus: bus.into(),
            config: WorkerManagerConfig::default(),
            workers: Vec::new(),
            store: None,
        }
    }

    /// Keeps each heartbeat in `store`'s health records too, where the
    /// worker monitor of any process (and `multiagents workers`) reads it,
    /// and looks up a redelivered command's workflow in its states first, so
    /// that a command whose step has settled meanwhile is dropped, not run.
    pub fn store(mut self, store: impl Into<crate::store::Store>) -> Self {
        self.store = Some(store.into());
        self
    }

    /// Replaces the settings.
    pub fn config(mut self, config: WorkerManagerConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers a worker with default options.
    pub fn register(self, worker: impl Worker) -> Self {
        self.register_with(worker, WorkerOptions::default())
    }

    /// Registers a worker.
    pub fn register_with(self, worker: impl Worker, options: WorkerOptions) -> Self {
        self.register_arc(Arc::new(worker), options)
    }

    /// Registers a shared worker.
    pub fn register_arc(mut self, worker: Arc<dyn Worker>, options: WorkerOptions) -> Self {
        self.workers.push((worker, options));
        self
    }

    /// Names of the registered workers.
    pub fn names(&self) -> Vec<String> {
        self.workers
            .iter()
            .map(|(w, _)| w.name().to_string())
            .collect()
    }

    /// Subscribes every worker and starts consuming.
    pub async fn start(self) -> Result<WorkerHandle, crate::Error> {
        let mut seen = HashMap::new();
        for (w, _) in &self.workers {
            if seen.insert(w.name().to_string(), ()).is_some() {
                return Err(crate::Error::Config(format!(
                    "worker `{}` is registered twice",
                    w.name()
                )));
            }
        }
        let stop = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut counters = Vec::new();
        let interrupts = Arc::new(Interrupts::default());
        {
            let mut rx = self.bus.notifier.subscribe_interrupts();
            let interrupts = interrupts.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                loop {
                    let received = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = rx.recv() => r,
                    };
                    match received {
                        Ok(i) => interrupts.interrupt(i),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(
                                missed = n,
                                "interrupts came faster than they were handled; some were missed"
                            );
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        for (worker, options) in self.workers {
            // One consumer per priority, highest first.
            let mut consumers = Vec::with_capacity(Priority::ALL.len());
            for priority in Priority::ALL {
                let topic = command_topic_at(&WorkerName::new(worker.name()), priority);
                consumers.push(
                    self.bus
                        .topics
                        .consumer(&topic, WORKER_GROUP, &self.config.instance)
                        .await?,
                );
            }
            let c = Arc::new(Counters {
                detail: self.config.monitor.then(Detail::new),
                ..Counters::default()
            });
            counters.push((worker.name().to_string(), options.concurrency, c.clone()));
            let runner = Runner {
                metrics: RunnerMetrics::new(worker.name()),
                instance: Arc::from(self.config.instance.as_str()),
                record_timing: self.config.record_timing,
                worker,
                consumers,
                limit: Arc::new(Semaphore::new(options.concurrency)),
                counters: c,
                batch_size: self.config.batch_size,
                hard_stop: hard_stop.clone(),
                interrupts: interrupts.clone(),
                shared: options.limited().then(|| options.shared.clone()),
                bus: self.bus.clone(),
                holder: Arc::from(self.config.instance.as_str()),
                states: self.store.as_ref().map(|s| s.states.clone()),
                held: Arc::default(),
            };
            tasks.spawn(runner.run(stop.clone()));
        }
        let handle = WorkerHandle {
            inner: Arc::new(HandleInner {
                health: self.store.as_ref().map(|s| s.health.clone()),
                heartbeat_interval: self.config.heartbeat_interval,
                instance: self.config.instance.clone(),
                counters,
                stop: stop.clone(),
                hard_stop,
                drain_timeout: self.config.drain_timeout,
                tasks: tokio::sync::Mutex::new(tasks),
            }),
        };
        let beat = handle.clone();
        let bus = self.bus.clone();
        let health = self.store.as_ref().map(|s| s.health.clone());
        let interval = self.config.heartbeat_interval;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticker.tick() => {
                        let beats = beat.heartbeat(interval);
                        for h in &beats {
                            if let Ok(payload) = Payload::to_json(h) {
                                let mut e = Event::new(
                                    EventKind::Status,
                                    Default::default(),
                                    Default::default(),
                                    "heartbeat".into(),
                                    payload,
                                );
                                e.step = Some(h.worker.as_str().into());
                                bus.notifier.broadcast(e);
                            }
                        }
                        if let Some(health) = &health
                            && let Err(e) = health.record_worker_health(&beats).await
                        {
                            tracing::warn!(error = %e, "recording a heartbeat failed");
                        }
                    }
                }
            }
        });
        Ok(handle)
    }
}

/// One worker type's metrics in this process (`None` when no recorder is
/// installed).
struct RunnerMetrics {
    ok: metrics::Counter,
    stale: metrics::Counter,
    failed: metrics::Counter,
    duration: metrics::Histogram,
    in_flight: metrics::Gauge,
}

impl RunnerMetrics {
    fn new(worker: &str) -> Option<Self> {
        use crate::monitoring::metrics::{
            STALE_COMMANDS, WORKER_CALL_DURATION, WORKER_CALLS, WORKER_IN_FLIGHT,
        };
        if !crate::monitoring::metrics::enabled() {
            return None;
        }
        let w = worker.to_string();
        Some(Self {
            ok: metrics::counter!(WORKER_CALLS, "worker" => w.clone(), "outcome" => "ok"),
            stale: metrics::counter!(STALE_COMMANDS, "worker" => w.clone()),
            failed: metrics::counter!(WORKER_CALLS, "worker" => w.clone(), "outcome" => "error"),
            duration: metrics::histogram!(WORKER_CALL_DURATION, "worker" => w.clone()),
            in_flight: metrics::gauge!(WORKER_IN_FLIGHT, "worker" => w),
        })
    }
}

struct Runner {
    metrics: Option<RunnerMetrics>,
    /// This process's name, on every answer's timing.
    instance: Arc<str>,
    record_timing: bool,
    worker: Arc<dyn Worker>,
    /// The command topics' consumers, by priority, highest first.
    consumers: Vec<Arc<dyn Consumer>>,
    limit: Arc<Semaphore>,
    counters: Arc<Counters>,
    batch_size: usize,
    hard_stop: CancellationToken,
    interrupts: Arc<Interrupts>,
    /// Limits shared with other processes, if any.
    shared: Option<PlaceLimits>,
    bus: Bus,
    /// Names this process's places.
    holder: Arc<str>,
    /// Where a redelivered command's workflow is looked up first, so that
    /// a stale one is dropped instead of run.
    states: Option<Arc<dyn crate::store::WorkflowStates>>,
    /// The commands this runner holds (running, or answered and not yet
    /// acked), by the priority level they came from: their leases are
    /// extended until they are acked.
    held: Arc<Held>,
}

/// Deliveries held by a runner, by consumer (priority level).
#[derive(Default)]
struct Held {
    ids: std::sync::Mutex<HashMap<DeliveryId, usize>>,
}

impl Held {
    fn insert(&self, id: DeliveryId, level: usize) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, level);
    }

    fn remove(&self, ids: &[DeliveryId]) {
        let mut held = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            held.remove(id);
        }
    }

    /// The ids held, by level.
    fn by_level(&self, levels: usize) -> Vec<Vec<DeliveryId>> {
        let mut out = vec![Vec::new(); levels];
        for (id, level) in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(ids) = out.get_mut(*level) {
                ids.push(id.clone());
            }
        }
        out
    }
}

/// Extends the leases of every command a runner holds, every
/// [`Consumer::extend_every`], until aborted: a call may take as long as it
/// needs and is never redelivered while this process lives.
async fn extend_leases(consumers: Vec<Arc<dyn Consumer>>, held: Arc<Held>, worker: String) {
    let every = consumers
        .first()
        .map_or(Duration::from_secs(1), |c| c.extend_every());
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for (ids, consumer) in held.by_level(consumers.len()).iter().zip(&consumers) {
            if ids.is_empty() {
                continue;
            }
            if let Err(e) = consumer.extend(ids).await {
                tracing::warn!(worker, error = %e, commands = ids.len(), "extending command leases failed; retrying at the next beat");
            }
        }
    }
}

/// The calls of this process that take more than one poll, by (workflow,
/// step, attempt), so that an [`Interrupt`] can cancel their context. Calls
/// that finish on their first poll (most) are never registered.
#[derive(Default)]
struct Interrupts {
    inner: std::sync::Mutex<InterruptsInner>,
    /// How many calls are registered, so that the duplicate check of every
    /// command takes no lock while none is.
    registered: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct InterruptsInner {
    /// Calls still running after their first poll, with the delivery each
    /// came in.
    running: HashMap<(TransactionId, StepName, u32), (CancellationToken, DeliveryId)>,
    /// Interrupts for calls not (yet) registered here, newest last: a call
    /// registered just after its interrupt came is still cancelled.
    recent: std::collections::VecDeque<Interrupt>,
}

/// How many unmatched interrupts are remembered.
const RECENT_INTERRUPTS: usize = 256;

impl Interrupts {
    fn lock(&self) -> std::sync::MutexGuard<'_, InterruptsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn interrupt(&self, i: Interrupt) {
        let mut inner = self.lock();
        let key = (i.transaction_id, i.step.clone(), i.attempt);
        match inner.running.get(&key) {
            Some((token, _)) => {
                tracing::info!(transaction_id = %i.transaction_id, step = %i.step, attempt = i.attempt, "call interrupted: its result is no longer wanted");
                token.cancel();
            }
            None => {
                if inner.recent.len() >= RECENT_INTERRUPTS {
                    inner.recent.pop_front();
                }
                inner.recent.push_back(i);
            }
        }
    }

    fn register(
        &self,
        key: (TransactionId, StepName, u32),
        token: &CancellationToken,
        delivery: &DeliveryId,
    ) {
        let mut inner = self.lock();
        let early = inner
            .recent
            .iter()
            .any(|i| i.transaction_id == key.0 && i.step == key.1 && i.attempt == key.2);
        if early {
            token.cancel();
        }
        if inner
            .running
            .insert(key, (token.clone(), delivery.clone()))
            .is_none()
        {
            self.registered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unregister(&self, key: &(TransactionId, StepName, u32)) {
        if self.lock().running.remove(key).is_some() {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The delivery of a call of this attempt running here, if any: a
    /// second command for it is a copy (republished by the recovery sweep,
    /// or redelivered while the first still runs).
    fn running(&self, event: &Event) -> Option<DeliveryId> {
        if self.registered.load(Ordering::Relaxed) == 0 || event.phase != Phase::Forward {
            return None;
        }
        let step = event.step.clone()?;
        self.lock()
            .running
            .get(&(event.transaction_id, step, event.attempt))
            .map(|(_, id)| id.clone())
    }
}

impl Runner {
    async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mut calls = JoinSet::new();
        // Answers go through one flusher, which publishes those that finished
        // meanwhile and acks their commands together.
        let (answers, queue) = tokio::sync::mpsc::unbounded_channel();
        let flusher = tokio::spawn(flush(
            this.consumers.clone(),
            queue,
            this.worker.name().to_string(),
            this.held.clone(),
        ));
        let extender = tokio::spawn(extend_leases(
            this.consumers.clone(),
            this.held.clone(),
            this.worker.name().to_string(),
        ));
        let mut look = Look::default();
        loop {
            // Take no more than we can start.
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = this.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut room = (this.limit.available_permits() + 1).min(this.batch_size);
            // Under shared limits, take places before taking commands.
            let mut leases = Vec::new();
            if let Some(limits) = &this.shared {
                match this.take_places(limits, room, &stop).await {
                    Some(l) => leases = l,
                    None => break,
                }
                room = room.min(leases.len());
            }
            let batch = tokio::select! {
                _ = stop.cancelled() => {
                    this.give_back(leases).await;
                    break;
                }
                b = this.take_commands(room, &mut look) => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    this.give_back(leases).await;
                    tracing::warn!(worker = this.worker.name(), error = %e, "taking commands failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if leases.len() > batch.len() {
                let unused = leases.split_off(batch.len());
                this.give_back(unused).await;
            }
            let mut leases = leases.into_iter();
            let picked_up_at = Timestamp::now();
            let mut first = Some(permit);
            for (level, delivery) in batch {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match this.limit.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let me = this.clone();
                let answers = answers.clone();
                let lease = leases.next();
                me.held.insert(delivery.id.clone(), level);
                calls.spawn(async move {
                    match me.handle(&delivery, level, picked_up_at).await {
                        Handled::Answer(reply) => {
                            let _ = answers.send((level, delivery.id, Some(*reply)));
                        }
                        Handled::Stale => {
                            let _ = answers.send((level, delivery.id, None));
                        }
                        Handled::Nothing => me.held.remove(std::slice::from_ref(&delivery.id)),
                        Handled::Held => {}
                    }
                    if let Some(lease) = lease {
                        me.give_back(vec![lease]).await;
                    }
                    drop(permit);
                });
            }
            while calls.try_join_next().is_some() {}
        }
        // Drain: calls in flight finish (or are cancelled by the handle), then
        // the last answers are flushed.
        while calls.join_next().await.is_some() {}
        drop(answers);
        let _ = flusher.await;
        extender.abort();
    }

    /// Takes up to `room` commands, higher priorities first. The high and
    /// low topics are looked at whenever the last look found work in them,
    /// and otherwise every [`LOOK_AROUND`]; in between, only the normal
    /// topic is read (one read per batch, as without priorities). A command
    /// of higher priority so waits at most [`LOOK_AROUND`] behind normal
    /// ones.
    async fn take_commands(
        &self,
        room: usize,
        look: &mut Look,
    ) -> Result<Vec<(usize, Delivery)>, crate::bus::BusError> {
        let normal = Priority::ALL
            .iter()
            .position(|p| *p == Priority::Normal)
            .unwrap_or(0);
        let around = look.others_busy || look.last.is_none_or(|t| t.elapsed() >= LOOK_AROUND);
        let mut out = Vec::new();
        if around {
            look.last = Some(std::time::Instant::now());
            look.others_busy = false;
            for (level, consumer) in self.consumers.iter().enumerate() {
                let left = room - out.len();
                if left == 0 {
                    break;
                }
                let got = consumer.next_batch(left, Duration::ZERO).await?;
                look.others_busy |= level != normal && !got.is_empty();
                out.extend(got.into_iter().map(|d| (level, d)));
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
        let got = self.consumers[normal].next_batch(room, IDLE_WAIT).await?;
        Ok(got.into_iter().map(|d| (normal, d)).collect())
    }

    /// Takes up to `want` shared places, waiting while none is free; `None`
    /// when stopped meanwhile.
    async fn take_places(
        &self,
        limits: &PlaceLimits,
        want: usize,
        stop: &CancellationToken,
    ) -> Option<Vec<String>> {
        let name = self.worker.name();
        loop {
            let pause = match self
                .bus
                .limits
                .take_places(name, want as u32, limits, &self.holder)
                .await
            {
                Ok(places) if !places.leases.is_empty() => return Some(places.leases),
                Ok(places) => places
                    .retry_after
                    .unwrap_or(Duration::from_millis(10))
                    .clamp(Duration::from_millis(2), Duration::from_millis(250)),
                Err(e) => {
                    tracing::warn!(worker = name, error = %e, "taking a shared place failed; retrying");
                    Duration::from_millis(200)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn give_back(&self, leases: Vec<String>) {
        if leases.is_empty() {
            return;
        }
        if let Err(e) = self.bus.limits.give_back(self.worker.name(), &leases).await {
            tracing::warn!(worker = self.worker.name(), error = %e, "giving shared places back failed; they come back when their lease ends");
        }
    }

    /// True when a redelivered command is stale: its workflow no longer
    /// waits for this attempt (it was given up on, answered meanwhile, or
    /// the workflow finished). One store read, only for redeliveries; when
    /// the store cannot tell, the command runs (the idempotency key keeps
    /// its effect single).
    async fn stale(&self, delivery: &Delivery) -> bool {
        let (Some(states), Some(step)) = (&self.states, &delivery.event.step) else {
            return false;
        };
        if delivery.delivery_count < 2 {
            return false;
        }
        let event = &delivery.event;
        match states.get(event.transaction_id).await {
            Ok(Some(current)) => !current
                .state
                .awaits(step.as_str(), event.phase, event.attempt),
            Ok(None) => true,
            Err(e) => {
                tracing::debug!(transaction_id = %event.transaction_id, error = %e, "could not check a redelivered command; running it");
                false
            }
        }
    }

    /// Runs one command; returns the answer to publish, if any.
    async fn handle(&self, delivery: &Delivery, level: usize, picked_up_at: Timestamp) -> Handled {
        let event = &delivery.event;
        let name = self.worker.name();
        if !matches!(event.kind, EventKind::Command | EventKind::Compensation)
            || event.step.is_none()
        {
            let reason = format!(
                "worker `{name}` received a {:?} event, which is not a command",
                event.kind
            );
            let _ = self.consumers[level].reject(delivery, &reason).await;
            return Handled::Nothing;
        }
        if let Some(running) = self.interrupts.running(event) {
            tracing::info!(
                worker = name,
                transaction_id = %event.transaction_id,
                step = ?event.step,
                attempt = event.attempt,
                "command dropped: this attempt is running here already, and its answer will serve"
            );
            // The same delivery taken again: the running call acks it.
            if running == delivery.id {
                return Handled::Held;
            }
            return Handled::Stale;
        }
        if self.stale(delivery).await {
            tracing::info!(
                worker = name,
                transaction_id = %event.transaction_id,
                step = ?event.step,
                attempt = event.attempt,
                deliveries = delivery.delivery_count,
                "redelivered command dropped: its workflow no longer waits for this attempt"
            );
            if let Some(m) = &self.metrics {
                m.stale.increment(1);
            }
            return Handled::Stale;
        }
        #[derive(Deserialize)]
        struct Doc<'a> {
            #[serde(borrow)]
            input: &'a RawValue,
        }
        // Only the input is copied out; the step outputs stay in the command
        // and are read when the worker asks for one.
        let input = match serde_json::from_str::<Doc<'_>>(event.payload.as_str()) {
            Ok(doc) => Payload::from_raw(doc.input.to_owned()),
            Err(e) => {
                let reason = format!("command payload is not {{\"input\": …, \"steps\": …}}: {e}");
                let _ = self.consumers[level].reject(delivery, &reason).await;
                return Handled::Nothing;
            }
        };
        let steps = Some(event.payload.clone());
        let token = self.hard_stop.child_token();
        let ctx = WorkerContext::from_parts(event, steps, token.clone());
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.in_flight.increment(1.0);
        }
        let began = (self.metrics.is_some() || self.counters.detail.is_some())
            .then(std::time::Instant::now);
        // The worker's own log lines carry the workflow's fields.
        let started_at = Timestamp::now();
        let otel = crate::monitoring::otel::CallSpan::start(event, name, &self.instance);
        let span = tracing::info_span!(
            "step",
            transaction_id = %event.transaction_id,
            correlation_id = %event.correlation_id,
            step = %event.step.as_ref().map_or("", |s| s.as_str()),
            attempt = event.attempt,
            worker = name,
        );
        let mut run = std::pin::pin!(tracing::Instrument::instrument(
            self.worker.run(input, ctx),
            span
        ));
        // Most calls finish on their first poll: only arm a deadline timer
        // (a timer-wheel insert and removal) for those that do not.
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(run.as_mut().poll(cx))).await;
        // Only calls still running can be interrupted: register those.
        let key = (first.is_pending() && event.phase == Phase::Forward).then(|| {
            (
                event.transaction_id,
                event.step.clone().unwrap_or_else(|| "".into()),
                event.attempt,
            )
        });
        if let Some(key) = &key {
            self.interrupts.register(key.clone(), &token, &delivery.id);
        }
        let outcome = match (first, event.deadline.map(|d| d.since(Timestamp::now()))) {
            (std::task::Poll::Ready(r), _) => r,
            (std::task::Poll::Pending, Some(left)) => match tokio::time::timeout(left, run).await {
                Ok(r) => r,
                Err(_) => {
                    token.cancel();
                    Err(
                        WorkerError::retry(format!("worker `{name}` passed its deadline"))
                            .with_kind("timeout"),
                    )
                }
            },
            (std::task::Poll::Pending, None) => run.await,
        };
        if let Some(key) = &key {
            self.interrupts.unregister(key);
        }
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let (Some(m), Some(began)) = (&self.metrics, began) {
            m.in_flight.decrement(1.0);
            m.duration.record(began.elapsed().as_secs_f64());
        }
        if let (Some(detail), Some(began)) = (&self.counters.detail, began) {
            detail.recent.push(began.elapsed().as_micros() as u64);
            if let Err(e) = &outcome {
                detail.summary().error(
                    e.kind().unwrap_or("error"),
                    &e.to_string(),
                    Timestamp::now(),
                );
            }
        }

        if outcome.is_err() && self.hard_stop.is_cancelled() {
            // Stopped by shutdown, not failed: leave the command unacked so
            // that another worker gets it, as the same attempt.
            tracing::info!(worker = name, transaction_id = %event.transaction_id, "call cancelled by shutdown; its command will be redelivered");
            return Handled::Nothing;
        }
        let (kind, payload) = match outcome {
            Ok(output) => {
                self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.ok.increment(1);
                }
                (EventKind::Result, output)
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.failed.increment(1);
                }
                tracing::debug!(
                    worker = name,
                    transaction_id = %event.transaction_id,
                    step = ?event.step,
                    attempt = event.attempt,
                    error = %e,
                    "worker call failed"
                );
                let err: StepError = e.into_step_error();
                (
                    EventKind::Error,
                    Payload::to_json(&err).unwrap_or_else(|_| Payload::null()),
                )
            }
        };
        let mut reply = Event::new(
            kind,
            event.transaction_id,
            event.correlation_id,
            event.workflow.clone(),
            payload,
        );
        reply.causation_id = Some(event.id);
        reply.step = event.step.clone();
        reply.phase = event.phase;
        reply.attempt = event.attempt;
        reply.traceparent = match otel {
            Some(span) => {
                let tp = Arc::from(span.traceparent());
                span.end(match &reply.kind {
                    EventKind::Error => Some("the call failed"),
                    _ => None,
                });
                Some(tp)
            }
            None => event.traceparent.clone(),
        };
        if self.record_timing {
            reply.timing = Some(crate::core::Timing {
                instance: self.instance.clone(),
                picked_up_at,
                started_at,
                finished_at: Timestamp::now(),
            });
        }
        Handled::Answer(Box::new(reply))
    }
}

/// What became of a command.
enum Handled {
    /// Ran: publish this answer and ack the command.
    Answer(Box<Event>),
    /// Stale: ack it without an answer.
    Stale,
    /// Rejected (dead-lettered) or left for redelivery: nothing to flush.
    Nothing,
    /// Held by a call still running, which will answer and ack it.
    Held,
}

/// Answers taken at once by the flusher.
const FLUSH_BATCH: usize = 256;

/// Where the runner is in looking at the high and low topics.
#[derive(Default)]
struct Look {
    /// The last look found work in the high or low topic.
    others_busy: bool,
    /// When the high and low topics were last looked at.
    last: Option<std::time::Instant>,
}

/// How often an idle worker looks at the high and low topics.
const LOOK_AROUND: Duration = Duration::from_millis(50);

/// How long an idle worker waits on the normal topic per take.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Answers to publish, and the commands they ack.
type Answers = (Vec<DeliveryId>, Vec<(String, Event)>);

/// Publishes answers and acks their commands (a stale command is acked
/// without one), as many as are ready in one go. The ack comes only with the
/// answer: a crash before it redelivers the command, and the idempotency key
/// keeps the side effect single.
async fn flush(
    consumers: Vec<Arc<dyn Consumer>>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<(usize, DeliveryId, Option<Event>)>,
    worker: String,
    held: Arc<Held>,
) {
    let mut taken = Vec::with_capacity(FLUSH_BATCH);
    while let Some(first) = queue.recv().await {
        taken.push(first);
        while taken.len() < FLUSH_BATCH {
            match queue.try_recv() {
                Ok(next) => taken.push(next),
                Err(_) => break,
            }
        }
        // Each answer is acked on the topic its command came from (almost
        // always the normal one: then the batch goes as it is).
        let mut by_level: Vec<Answers> = consumers.iter().map(|_| Answers::default()).collect();
        for (level, id, reply) in taken.drain(..) {
            let (ids, events) = &mut by_level[level];
            ids.push(id);
            events.extend(reply.map(|r| (RESULTS_TOPIC.to_string(), r)));
        }
        for ((ids, events), consumer) in by_level.iter().zip(&consumers) {
            if !ids.is_empty() {
                publish_answers(consumer.as_ref(), events, ids, &worker).await;
                // Acked, or left to be redelivered: either way no longer ours.
                held.remove(ids);
            }
        }
    }
}

async fn publish_answers(
    consumer: &dyn Consumer,
    events: &[(String, Event)],
    ids: &[DeliveryId],
    worker: &str,
) {
    // A lost connection comes back by itself (a restarting server within
    // seconds): keep trying — the commands stay held, and their leases are
    // extended again as soon as the server answers — before leaving them to
    // be redelivered (and run again). A failure for good (an answer over the
    // size limit) is not tried again.
    let sent =
        crate::bus::retry_transient(ANSWER_RETRY, || consumer.publish_then_ack(events, ids)).await;
    if let Err(e) = sent {
        tracing::warn!(worker, error = %e, answers = ids.len(), "publishing answers failed; their commands will be redelivered");
    }
}

/// How long a worker keeps trying to publish its answers.
const ANSWER_RETRY: Duration = Duration::from_secs(30);

/// A running [`WorkerManager`].
#[derive(Clone)]
pub struct WorkerHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    health: Option<Arc<dyn crate::store::HealthRecords>>,
    heartbeat_interval: Duration,
    instance: String,
    counters: Vec<(String, usize, Arc<Counters>)>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    drain_timeout: Duration,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

impl WorkerHandle {
    /// A snapshot of every worker type's counters.
    pub fn health(&self) -> Vec<WorkerHealth> {
        self.snapshot(None)
    }

    /// Snapshots for a heartbeat: with the calls since the previous one.
    fn heartbeat(&self, interval: Duration) -> Vec<WorkerHealth> {
        self.snapshot(Some(interval))
    }

    fn snapshot(&self, beat: Option<Duration>) -> Vec<WorkerHealth> {
        let at = Timestamp::now();
        self.inner
            .counters
            .iter()
            .map(|(name, concurrency, c)| {
                let succeeded = c.succeeded.load(Ordering::Relaxed);
                let failed = c.failed.load(Ordering::Relaxed);
                let mut h = WorkerHealth {
                    worker: name.clone(),
                    instance: self.inner.instance.clone(),
                    succeeded,
                    failed,
                    in_flight: c.in_flight.load(Ordering::Relaxed),
                    concurrency: *concurrency as u64,
                    at,
                    interval_ms: beat.map_or(0, |d| d.as_millis() as u64),
                    ..Default::default()
                };
                if let Some(detail) = &c.detail {
                    let mut d = detail.summary();
                    h.recent_succeeded = succeeded - d.last.0.min(succeeded);
                    h.recent_failed = failed - d.last.1.min(failed);
                    if beat.is_some() {
                        d.last = (succeeded, failed);
                    }
                    h.durations_us = d
                        .durations
                        .iter_recorded()
                        .map(|v| (v.value_iterated_to(), v.count_at_value()))
                        .collect();
                    h.errors = d.errors.clone();
                }
                h
            })
            .collect()
    }

    /// Stops taking commands, lets calls in flight finish for up to the
    /// drain timeout, then cancels the rest (their commands are redelivered).
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        let mut tasks = self.inner.tasks.lock().await;
        let drained = tokio::time::timeout(self.inner.drain_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("worker drain timed out; cancelling calls still in flight");
            self.inner.hard_stop.cancel();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        drop(tasks);
        // A last heartbeat, with every call counted.
        if let Some(health) = &self.inner.health {
            let beats = self.heartbeat(self.inner.heartbeat_interval);
            if let Err(e) = health.record_worker_health(&beats).await {
                tracing::warn!(error = %e, "recording the last heartbeat failed");
            }
        }
    }
}

//! The worker manager: registers workers, consumes their commands with a
//! bounded number in flight per worker, enforces deadlines, answers with
//! results or errors, reports health by heartbeat and drains in-flight work
//! on shutdown.
//!
//! Its parts: `options` (how a worker type is run), `health` (counters and
//! heartbeats), `interrupts` (calls that can be cancelled, copies of a
//! running attempt), `leases` (what a runner holds and extends), `runner`
//! (takes commands within the limits), `call` (decode → run bounded →
//! record → answer) and `flusher` (publishes answers and acks together).

mod call;
mod flusher;
mod health;
mod interrupts;
mod leases;
mod options;
mod runner;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Worker, WorkerContext, WorkerError};
use crate::bus::{Bus, WORKER_GROUP, command_topic_at};
use crate::core::health::WorkerHealth;
use crate::core::{Event, EventKind, Payload, Priority, Timestamp, WorkerName};

use call::*;
use flusher::*;
use health::*;
use interrupts::*;
use leases::*;
pub use options::{WorkerManagerConfig, WorkerOptions};
use runner::*;

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
                max_output_bytes: self.config.max_output_bytes,
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

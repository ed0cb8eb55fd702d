//! The event monitor: each command's lifecycle — dispatch → pickup →
//! processing → completion, failure or timeout — read from the workflow's
//! stored history, so it shows what every process did; a transaction's whole
//! trace; and counts, rates, success rate and latency percentiles over a
//! window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::EventMonitoringConfig;
use crate::core::saga::HistoryEvent;
use crate::core::{Phase, StepName, Timestamp, TransactionId, WorkflowState, WorkflowStatus};
use crate::store::{ListQuery, Store, StoreError, WorkflowStates};

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still out.
    InFlight,
    /// Done (a step succeeded or a compensation undid it).
    Completed,
    /// The worker reported an error (retried or not).
    Failed,
    /// No answer before the deadline.
    TimedOut,
}

/// One command's life, from its dispatch to its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// The step.
    pub step: StepName,
    /// Forward or compensation.
    pub phase: Phase,
    /// The attempt.
    pub attempt: u32,
    /// When the orchestrator published the command.
    pub dispatched_at: Timestamp,
    /// When a worker took it from the bus.
    pub picked_up_at: Option<Timestamp>,
    /// When the worker body started.
    pub started_at: Option<Timestamp>,
    /// When the worker body finished.
    pub finished_at: Option<Timestamp>,
    /// When the orchestrator recorded the outcome.
    pub ended_at: Option<Timestamp>,
    /// The worker process that ran it.
    pub instance: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// The error, for failures and timeouts.
    pub error: Option<String>,
}

impl Lifecycle {
    /// Dispatch → pickup: time waiting on the bus.
    pub fn queued(&self) -> Option<Duration> {
        self.picked_up_at.map(|p| p.since(self.dispatched_at))
    }

    /// Start → finish: time in the worker body.
    pub fn processing(&self) -> Option<Duration> {
        Some(self.finished_at?.since(self.started_at?))
    }

    /// Dispatch → outcome recorded: the whole round.
    pub fn total(&self) -> Option<Duration> {
        self.ended_at.map(|e| e.since(self.dispatched_at))
    }
}

/// Every command's lifecycle in a workflow's history, in dispatch order.
pub fn lifecycles(state: &WorkflowState) -> Vec<Lifecycle> {
    let mut out: Vec<Lifecycle> = Vec::new();
    // Open attempts: (step, phase) → index in `out`.
    let mut open: HashMap<(StepName, Phase), usize> = HashMap::new();
    for entry in &state.history {
        let Some(step) = entry.step.clone() else {
            continue;
        };
        let begin = |phase: Phase| Lifecycle {
            step: step.clone(),
            phase,
            attempt: entry.attempt,
            dispatched_at: entry.at,
            picked_up_at: None,
            started_at: None,
            finished_at: None,
            ended_at: None,
            instance: None,
            outcome: Outcome::InFlight,
            error: None,
        };
        let (phase, end) = match &entry.event {
            HistoryEvent::Dispatched => {
                open.insert((step.clone(), Phase::Forward), out.len());
                out.push(begin(Phase::Forward));
                continue;
            }
            HistoryEvent::CompensationDispatched => {
                open.insert((step.clone(), Phase::Compensate), out.len());
                out.push(begin(Phase::Compensate));
                continue;
            }
            HistoryEvent::Succeeded => (Phase::Forward, (Outcome::Completed, None)),
            HistoryEvent::Compensated => (Phase::Compensate, (Outcome::Completed, None)),
            HistoryEvent::RetryScheduled { phase, error, .. } => (*phase, failure(error)),
            HistoryEvent::Failed { error } => (Phase::Forward, failure(error)),
            HistoryEvent::CompensationFailed { error } => (Phase::Compensate, failure(error)),
            _ => continue,
        };
        if let Some(i) = open.remove(&(step, phase)) {
            let l = &mut out[i];
            l.ended_at = Some(entry.at);
            (l.outcome, l.error) = end;
            if let Some(t) = &entry.timing {
                l.picked_up_at = Some(t.picked_up_at);
                l.started_at = Some(t.started_at);
                l.finished_at = Some(t.finished_at);
                l.instance = Some(t.instance.to_string());
            }
        }
    }
    out
}

fn failure(error: &str) -> (Outcome, Option<String>) {
    // The orchestrator's deadline, or the worker's own (whichever came first).
    let outcome = if error.contains("timed out after") || error.contains("passed its deadline") {
        Outcome::TimedOut
    } else {
        Outcome::Failed
    };
    (outcome, Some(error.to_string()))
}

/// Counts and latencies over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    /// The window's length.
    pub window_seconds: f64,
    /// Workflows that changed in the window and were looked at.
    pub workflows: u64,
    /// Workflows that finished in the window, by status.
    pub finished: HashMap<String, u64>,
    /// Commands whose outcome was recorded in the window.
    pub events: u64,
    /// Of those: completed.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Timed out.
    pub timed_out: u64,
    /// Commands with an outcome per second.
    pub rate_per_second: f64,
    /// Completed ÷ (completed + failed + timed out), in percent; 100 when
    /// nothing failed (and when nothing happened).
    pub success_rate_percent: f64,
    /// Dispatch → outcome, milliseconds: p50, p95, p99.
    pub latency_ms: Percentiles,
    /// Time in worker bodies, milliseconds.
    pub processing_ms: Percentiles,
    /// Dispatch → pickup, milliseconds.
    pub queued_ms: Percentiles,
}

/// Three percentiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (sorted here).
    pub fn of(values: &mut [f64]) -> Self {
        values.sort_by(|a, b| a.total_cmp(b));
        let at = |p: f64| {
            if values.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Self {
            p50: at(50.0),
            p95: at(95.0),
            p99: at(99.0),
        }
    }
}

/// Aggregates lifecycles of the given workflows whose outcome falls in
/// `[since, now]`.
pub fn window_stats(
    states: &[Arc<WorkflowState>],
    since: Timestamp,
    now: Timestamp,
) -> WindowStats {
    let mut stats = WindowStats {
        window_seconds: now.since(since).as_secs_f64(),
        workflows: states.len() as u64,
        ..Default::default()
    };
    let (mut latency, mut processing, mut queued) = (Vec::new(), Vec::new(), Vec::new());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for state in states {
        if let Some(done) = state.finished_at
            && done >= since
        {
            *stats
                .finished
                .entry(state.status.as_str().to_string())
                .or_default() += 1;
        }
        for l in lifecycles(state) {
            let Some(ended) = l.ended_at else { continue };
            if ended < since || ended > now {
                continue;
            }
            stats.events += 1;
            match l.outcome {
                Outcome::Completed => stats.completed += 1,
                Outcome::Failed => stats.failed += 1,
                Outcome::TimedOut => stats.timed_out += 1,
                Outcome::InFlight => {}
            }
            latency.extend(l.total().map(ms));
            processing.extend(l.processing().map(ms));
            queued.extend(l.queued().map(ms));
        }
    }
    let settled = stats.completed + stats.failed + stats.timed_out;
    stats.success_rate_percent = if settled == 0 {
        100.0
    } else {
        stats.completed as f64 * 100.0 / settled as f64
    };
    stats.rate_per_second = if stats.window_seconds > 0.0 {
        stats.events as f64 / stats.window_seconds
    } else {
        0.0
    };
    stats.latency_ms = Percentiles::of(&mut latency);
    stats.processing_ms = Percentiles::of(&mut processing);
    stats.queued_ms = Percentiles::of(&mut queued);
    stats
}

/// Reads lifecycles from the store (so every process's part shows), keeping
/// up to `max_trace_history` finished traces in memory for
/// `trace_retention_hours`, swept every `cleanup_interval_minutes`.
pub struct EventMonitor {
    states: Arc<dyn WorkflowStates>,
    config: EventMonitoringConfig,
    /// Finished workflows' states: they no longer change.
    cache: Mutex<TraceCache>,
}

#[derive(Default)]
struct TraceCache {
    by_tx: HashMap<TransactionId, Arc<WorkflowState>>,
    order: VecDeque<TransactionId>,
    last_sweep: Option<Timestamp>,
}

/// What the event monitor could not do.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// `event_monitoring.enabled` is false.
    #[error("event monitoring is off (event_monitoring.enabled: false)")]
    Disabled,
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EventMonitor {
    /// A monitor reading the workflow states of `store`.
    pub fn new(store: impl Into<Store>, config: EventMonitoringConfig) -> Self {
        Self {
            states: store.into().states,
            config,
            cache: Mutex::new(TraceCache::default()),
        }
    }

    fn retention(&self) -> Duration {
        Duration::from_secs(self.config.trace_retention_hours.saturating_mul(3600))
    }

    /// The lifecycle of every command of one transaction; `None` when it
    /// does not exist or its trace is past the retention.
    pub async fn trace(&self, tx: TransactionId) -> Result<Option<Vec<Lifecycle>>, MonitorError> {
        Ok(self.state(tx).await?.map(|s| lifecycles(&s)))
    }

    async fn state(&self, tx: TransactionId) -> Result<Option<Arc<WorkflowState>>, MonitorError> {
        if !self.config.enabled {
            return Err(MonitorError::Disabled);
        }
        let now = Timestamp::now();
        self.sweep(now);
        if let Some(s) = self.cache().by_tx.get(&tx) {
            return Ok(Some(s.clone()));
        }
        let Some(v) = self.states.get(tx).await? else {
            return Ok(None);
        };
        if now.since(v.state.updated_at) > self.retention() {
            return Ok(None);
        }
        if v.state.is_terminal() {
            self.remember(v.state.clone());
        }
        Ok(Some(v.state))
    }

    /// Counts, rates, success rate and latency percentiles of the commands
    /// whose outcome was recorded in the last `window` (at most the
    /// retention), over at most `max_trace_history` workflows.
    pub async fn window(&self, window: Duration) -> Result<WindowStats, MonitorError> {
        if !self.config.enabled {
            return Err(MonitorError::Disabled);
        }
        let now = Timestamp::now();
        let since = Timestamp(
            now.0
                .saturating_sub(window.min(self.retention()).as_millis() as u64),
        );
        let mut states = Vec::new();
        for status in [
            WorkflowStatus::Running,
            WorkflowStatus::Compensating,
            WorkflowStatus::Completed,
            WorkflowStatus::Compensated,
            WorkflowStatus::Failed,
            WorkflowStatus::CompensationFailed,
            WorkflowStatus::Cancelled,
        ] {
            let query = ListQuery {
                status: Some(status),
                updated_after: Some(since),
                limit: self.config.max_trace_history,
                ..Default::default()
            };
            for summary in self.states.list(&query).await? {
                if states.len() >= self.config.max_trace_history {
                    break;
                }
                if let Some(s) = self.state(summary.transaction_id).await? {
                    states.push(s);
                }
            }
        }
        Ok(window_stats(&states, since, now))
    }

    /// Traces held in memory now.
    pub fn cached(&self) -> usize {
        self.cache().by_tx.len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TraceCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, state: Arc<WorkflowState>) {
        let mut cache = self.cache();
        if cache
            .by_tx
            .insert(state.transaction_id, state.clone())
            .is_none()
        {
            cache.order.push_back(state.transaction_id);
        }
        while cache.by_tx.len() > self.config.max_trace_history {
            let Some(old) = cache.order.pop_front() else {
                break;
            };
            cache.by_tx.remove(&old);
        }
    }

    /// Drops traces past the retention, at most once per cleanup interval.
    fn sweep(&self, now: Timestamp) {
        let every = Duration::from_secs(self.config.cleanup_interval_minutes.saturating_mul(60));
        let retention = self.retention();
        let mut cache = self.cache();
        if cache.last_sweep.is_some_and(|t| now.since(t) < every) {
            return;
        }
        cache.last_sweep = Some(now);
        let TraceCache { by_tx, order, .. } = &mut *cache;
        by_tx.retain(|_, s| now.since(s.updated_at) <= retention);
        order.retain(|tx| by_tx.contains_key(tx));
    }
}

//! The worker monitor: per worker type and per instance — calls, successes,
//! failures, rates, processing time percentiles (merged HDR histograms),
//! health, and the latest errors by kind — from the heartbeats every worker
//! process keeps in the store.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::WorkerMonitoringConfig;
use super::events::Percentiles;
use crate::core::Timestamp;
use crate::store::{HealthRecords, Store, StoreError};
use crate::worker::{ErrorKind, WorkerHealth};

/// How a worker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Failures below the degraded threshold.
    Healthy,
    /// Failures at or above `degraded_failure_rate`.
    Degraded,
    /// Failures at or above `failing_failure_rate`.
    Failing,
    /// No heartbeat for `inactive_after_missed_heartbeats` intervals.
    Inactive,
}

impl Health {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failing => "failing",
            Health::Inactive => "inactive",
        }
    }
}

/// One worker type in one process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Its latest heartbeat.
    pub heartbeat: WorkerHealth,
    /// How it reads.
    pub health: Health,
    /// Share of recent calls that failed (all calls when none were recent).
    pub failure_rate: f64,
    /// Calls per second since the previous heartbeat.
    pub calls_per_second: f64,
    /// Call duration, milliseconds.
    pub duration_ms: Percentiles,
}

/// One worker type over every process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerTypeReport {
    /// The worker type.
    pub worker: String,
    /// Its instances.
    pub instances: Vec<InstanceReport>,
    /// Calls that succeeded.
    pub succeeded: u64,
    /// Calls that failed.
    pub failed: u64,
    /// Calls in flight.
    pub in_flight: u64,
    /// Calls per second, summed over active instances.
    pub calls_per_second: f64,
    /// Share of recent calls that failed, over active instances.
    pub failure_rate: f64,
    /// Call duration over every instance, milliseconds.
    pub duration_ms: Percentiles,
    /// How the type reads: by its failure rate, inactive when no instance
    /// is active.
    pub health: Health,
    /// The latest errors by kind, over every instance, most frequent first.
    pub errors: Vec<ErrorKind>,
}

/// Reads heartbeats from the store and judges them.
pub struct WorkerMonitor {
    health: Arc<dyn HealthRecords>,
    config: WorkerMonitoringConfig,
}

impl WorkerMonitor {
    /// A monitor reading the heartbeats `store` keeps.
    pub fn new(store: impl Into<Store>, config: WorkerMonitoringConfig) -> Self {
        Self {
            health: store.into().health,
            config,
        }
    }

    /// Every worker type seen within `metrics_retention_hours`.
    pub async fn report(&self) -> Result<Vec<WorkerTypeReport>, StoreError> {
        let beats = self
            .health
            .worker_health(Duration::from_secs(
                self.config.metrics_retention_hours.saturating_mul(3600),
            ))
            .await?;
        Ok(report(&beats, &self.config, Timestamp::now()))
    }
}

/// Judges heartbeats as of `now`.
pub fn report(
    beats: &[WorkerHealth],
    config: &WorkerMonitoringConfig,
    now: Timestamp,
) -> Vec<WorkerTypeReport> {
    let mut types: Vec<WorkerTypeReport> = Vec::new();
    for beat in beats {
        let instance = judge(beat, config, now);
        match types.iter_mut().find(|t| t.worker == beat.worker) {
            Some(t) => t.instances.push(instance),
            None => types.push(WorkerTypeReport {
                worker: beat.worker.clone(),
                instances: vec![instance],
                succeeded: 0,
                failed: 0,
                in_flight: 0,
                calls_per_second: 0.0,
                failure_rate: 0.0,
                duration_ms: Percentiles::default(),
                health: Health::Inactive,
                errors: Vec::new(),
            }),
        }
    }
    for t in &mut types {
        let mut merged = histogram();
        let (mut recent_ok, mut recent_failed) = (0u64, 0u64);
        for i in &t.instances {
            let b = &i.heartbeat;
            t.succeeded += b.succeeded;
            t.failed += b.failed;
            for (value, count) in &b.durations_us {
                let _ = merged.record_n(*value, *count);
            }
            for e in &b.errors {
                match t.errors.iter_mut().find(|x| x.kind == e.kind) {
                    Some(x) => {
                        x.count += e.count;
                        if e.last_at > x.last_at {
                            x.last_at = e.last_at;
                            x.last_message = e.last_message.clone();
                        }
                    }
                    None => t.errors.push(e.clone()),
                }
            }
            if i.health != Health::Inactive {
                t.in_flight += b.in_flight;
                t.calls_per_second += i.calls_per_second;
                recent_ok += b.recent_succeeded;
                recent_failed += b.recent_failed;
            }
        }
        t.errors
            .sort_by(|a, b| b.count.cmp(&a.count).then(b.last_at.cmp(&a.last_at)));
        t.duration_ms = percentiles(&merged);
        let active = t.instances.iter().any(|i| i.health != Health::Inactive);
        let (ok, failed) = if recent_ok + recent_failed > 0 {
            (recent_ok, recent_failed)
        } else {
            (t.succeeded, t.failed)
        };
        t.failure_rate = rate(ok, failed);
        t.health = if active {
            by_failures(t.failure_rate, config)
        } else {
            Health::Inactive
        };
    }
    types.sort_by(|a, b| a.worker.cmp(&b.worker));
    types
}

fn judge(beat: &WorkerHealth, config: &WorkerMonitoringConfig, now: Timestamp) -> InstanceReport {
    let interval = if beat.interval_ms > 0 {
        Duration::from_millis(beat.interval_ms)
    } else {
        Duration::from_secs(config.health_check_interval_seconds)
    };
    let silent = now.since(beat.at);
    let (ok, failed) = if beat.recent_succeeded + beat.recent_failed > 0 {
        (beat.recent_succeeded, beat.recent_failed)
    } else {
        (beat.succeeded, beat.failed)
    };
    let failure_rate = rate(ok, failed);
    let health = if silent > interval * config.inactive_after_missed_heartbeats {
        Health::Inactive
    } else {
        by_failures(failure_rate, config)
    };
    let mut h = histogram();
    for (value, count) in &beat.durations_us {
        let _ = h.record_n(*value, *count);
    }
    InstanceReport {
        calls_per_second: (beat.recent_succeeded + beat.recent_failed) as f64
            / interval.as_secs_f64().max(0.001),
        heartbeat: beat.clone(),
        health,
        failure_rate,
        duration_ms: percentiles(&h),
    }
}

fn rate(ok: u64, failed: u64) -> f64 {
    if ok + failed == 0 {
        0.0
    } else {
        failed as f64 / (ok + failed) as f64
    }
}

fn by_failures(rate: f64, config: &WorkerMonitoringConfig) -> Health {
    if rate >= config.failing_failure_rate && rate > 0.0 {
        Health::Failing
    } else if rate >= config.degraded_failure_rate && rate > 0.0 {
        Health::Degraded
    } else {
        Health::Healthy
    }
}

fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

fn percentiles(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        p50: ms(0.50),
        p95: ms(0.95),
        p99: ms(0.99),
    }
}

//! Heartbeats for HTTP workers: the service counts, per worker type, the
//! tasks it hands out and the answers it gets, and records them in the
//! store as a worker process would (instance `http-PID`), so that
//! `/v1/workers`, `multiagents workers` and the dashboard show HTTP workers
//! beside the others.

use std::collections::BTreeMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use multiagents::core::health::{ErrorKind, WorkerHealth};
use multiagents::core::{StepError, Timestamp};
use multiagents::store::HealthRecords;

/// How often the heartbeat is recorded.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// Error kinds kept per worker type.
const KINDS_KEPT: usize = 16;

struct Counters {
    succeeded: u64,
    failed: u64,
    in_flight: u64,
    /// Counters at the previous heartbeat.
    last: (u64, u64),
    durations: hdrhistogram::Histogram<u64>,
    errors: Vec<ErrorKind>,
}

impl Counters {
    fn new() -> Self {
        Self {
            succeeded: 0,
            failed: 0,
            in_flight: 0,
            last: (0, 0),
            // 1 µs to 1 hour, 2 significant digits, as worker processes keep them.
            durations: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                .expect("valid histogram bounds"),
            errors: Vec::new(),
        }
    }
}

/// The HTTP workers' counters, by worker type.
#[derive(Default)]
pub(crate) struct HttpHealth {
    by_worker: Mutex<BTreeMap<String, Counters>>,
}

impl HttpHealth {
    fn counters(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Counters>> {
        self.by_worker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Someone polls for `worker`: it shows from now on, calls or not.
    pub(crate) fn polled(&self, worker: &str) {
        let mut c = self.counters();
        if !c.contains_key(worker) {
            c.insert(worker.to_string(), Counters::new());
        }
    }

    /// A task of `worker` was handed out.
    pub(crate) fn handed_out(&self, worker: &str) {
        let mut all = self.counters();
        match all.get_mut(worker) {
            Some(c) => c.in_flight += 1,
            None => {
                let mut c = Counters::new();
                c.in_flight = 1;
                all.insert(worker.to_string(), c);
            }
        }
    }

    /// A task of `worker` went back to the bus unanswered (its lease lapsed).
    pub(crate) fn let_go(&self, worker: &str) {
        if let Some(c) = self.counters().get_mut(worker) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    /// A task of `worker` was answered after `took`: with an error, or not.
    pub(crate) fn answered(&self, worker: &str, took: Duration, error: Option<&StepError>) {
        let mut all = self.counters();
        if !all.contains_key(worker) {
            all.insert(worker.to_string(), Counters::new());
        }
        let Some(c) = all.get_mut(worker) else { return };
        c.in_flight = c.in_flight.saturating_sub(1);
        let _ = c
            .durations
            .record((took.as_micros() as u64).clamp(1, 3_600_000_000));
        let Some(e) = error else {
            c.succeeded += 1;
            return;
        };
        c.failed += 1;
        let kind = e.kind.as_ref().map_or("error", |k| k.as_str()).to_string();
        let now = Timestamp::now();
        match c.errors.iter_mut().find(|k| k.kind == kind) {
            Some(k) => {
                k.count += 1;
                k.last_message.clone_from(&e.message);
                k.last_at = now;
            }
            None => {
                if c.errors.len() == KINDS_KEPT {
                    // The oldest kind makes room.
                    if let Some(oldest) = c
                        .errors
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, k)| k.last_at)
                        .map(|(i, _)| i)
                    {
                        c.errors.remove(oldest);
                    }
                }
                c.errors.push(ErrorKind {
                    kind,
                    count: 1,
                    last_message: e.message.clone(),
                    last_at: now,
                });
            }
        }
    }

    /// One heartbeat per worker type, with the calls since the last one.
    pub(crate) fn beat(&self, instance: &str) -> Vec<WorkerHealth> {
        let at = Timestamp::now();
        self.counters()
            .iter_mut()
            .map(|(worker, c)| {
                let h = WorkerHealth {
                    worker: worker.clone(),
                    instance: instance.to_string(),
                    succeeded: c.succeeded,
                    failed: c.failed,
                    in_flight: c.in_flight,
                    concurrency: 0,
                    at,
                    interval_ms: INTERVAL.as_millis() as u64,
                    recent_succeeded: c.succeeded - c.last.0,
                    recent_failed: c.failed - c.last.1,
                    durations_us: c
                        .durations
                        .iter_recorded()
                        .map(|v| (v.value_iterated_to(), v.count_at_value()))
                        .collect(),
                    errors: c.errors.clone(),
                };
                c.last = (c.succeeded, c.failed);
                h
            })
            .collect()
    }

    /// Records a heartbeat every [`INTERVAL`] while the service lives.
    pub(crate) fn start(
        health: Weak<Self>,
        records: std::sync::Arc<dyn HealthRecords>,
        instance: String,
    ) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(h) = health.upgrade() else { return };
                let beats = h.beat(&instance);
                drop(h);
                if beats.is_empty() {
                    continue;
                }
                if let Err(e) = records.record_worker_health(&beats).await {
                    tracing::warn!(error = %e, "recording the HTTP workers' heartbeat failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_counts_calls_failures_by_kind_and_what_is_in_flight() {
        let h = HttpHealth::default();
        h.polled("idle");
        for _ in 0..3 {
            h.handed_out("pay");
        }
        h.answered("pay", Duration::from_millis(4), None);
        let declined = StepError {
            message: "card declined".into(),
            retry: multiagents::core::RetryDirective::Never,
            kind: Some("declined".into()),
        };
        h.answered("pay", Duration::from_millis(9), Some(&declined));
        let beats = h.beat("http-1");
        assert_eq!(beats.len(), 2);
        let idle = beats.iter().find(|b| b.worker == "idle").expect("idle");
        assert_eq!((idle.succeeded, idle.failed, idle.in_flight), (0, 0, 0));
        let pay = beats.iter().find(|b| b.worker == "pay").expect("pay");
        assert_eq!((pay.succeeded, pay.failed, pay.in_flight), (1, 1, 1));
        assert_eq!((pay.recent_succeeded, pay.recent_failed), (1, 1));
        assert_eq!(pay.instance, "http-1");
        assert_eq!(pay.errors.len(), 1);
        assert_eq!(pay.errors[0].kind, "declined");
        assert_eq!(pay.durations_us.iter().map(|(_, n)| n).sum::<u64>(), 2);
        // The next beat: nothing recent.
        let again = h.beat("http-1");
        let pay = again.iter().find(|b| b.worker == "pay").expect("pay");
        assert_eq!((pay.recent_succeeded, pay.recent_failed), (0, 0));
    }
}

//! The service's own recent history, for the dashboard's charts: workflows
//! started and finished per second and step latency percentiles over the
//! last hour (`GET /v1/stats`), sampled from this process's metrics every
//! few seconds, so that no Prometheus is needed to see them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use multiagents::core::Timestamp;
use multiagents::monitoring::metrics::{
    STEP_DURATION, WORKFLOWS_FINISHED, WORKFLOWS_STARTED, render_prometheus, sum_series,
};
use serde_json::{Value, json};

use crate::{Problem, Service};

/// How often the metrics are sampled.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// Samples kept: an hour's.
const KEPT: usize = 720;

/// The step-duration buckets' upper bounds, in seconds (as the recorder is
/// set up), then +Inf.
const BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, PartialEq)]
struct Sample {
    at: Timestamp,
    started: f64,
    finished: f64,
    /// Cumulative counts per bucket of [`BOUNDS`], then +Inf.
    buckets: Vec<f64>,
}

fn sample(text: &str, at: Timestamp) -> Sample {
    let bucket = format!("{STEP_DURATION}_bucket");
    let mut buckets: Vec<f64> = BOUNDS
        .iter()
        .map(|b| sum_series(text, &bucket, &[("le", &b.to_string())]))
        .collect();
    buckets.push(sum_series(text, &bucket, &[("le", "+Inf")]));
    Sample {
        at,
        started: sum_series(text, WORKFLOWS_STARTED, &[]),
        finished: sum_series(text, WORKFLOWS_FINISHED, &[]),
        buckets,
    }
}

/// The recent samples.
#[derive(Default)]
pub(crate) struct Stats {
    samples: Mutex<VecDeque<Sample>>,
}

impl Stats {
    /// Starts sampling, for as long as the service lives.
    pub(crate) fn start() -> Arc<Self> {
        let stats = Arc::new(Self::default());
        let weak: Weak<Self> = Arc::downgrade(&stats);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(stats) = weak.upgrade() else { return };
                // Nothing to sample until a recorder is installed.
                let Some(text) = render_prometheus() else {
                    continue;
                };
                stats.push(sample(&text, Timestamp::now()));
            }
        });
        stats
    }

    fn push(&self, s: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(s);
    }

    /// One point per interval: the rates and percentiles between two samples.
    fn series(&self) -> Vec<Value> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| point(a, b))
            .collect()
    }
}

/// What happened between samples `a` and `b`.
fn point(a: &Sample, b: &Sample) -> Value {
    let secs = (b.at.as_millis().saturating_sub(a.at.as_millis()) as f64 / 1000.0).max(0.001);
    // Counters only grow; a smaller value means the process restarted them.
    let delta = |x: f64, y: f64| (y - x).max(0.0);
    let counts: Vec<f64> = a
        .buckets
        .iter()
        .zip(&b.buckets)
        .map(|(x, y)| delta(*x, *y))
        .collect();
    let steps = counts.last().copied().unwrap_or(0.0);
    let pct = |q: f64| percentile(&counts, q).map(|s| (s * 1000.0 * 1000.0).round() / 1000.0);
    json!({
        "at": b.at,
        "started_per_second": delta(a.started, b.started) / secs,
        "finished_per_second": delta(a.finished, b.finished) / secs,
        "steps": steps,
        "step_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)},
    })
}

/// The `q` quantile, in seconds, of the observations counted in cumulative
/// buckets `counts` (of [`BOUNDS`], then +Inf), interpolated within its
/// bucket as Prometheus's `histogram_quantile` does; `None` when empty.
fn percentile(counts: &[f64], q: f64) -> Option<f64> {
    let total = *counts.last()?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = 0.0;
    let mut lower = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        let Some(&upper) = BOUNDS.get(i) else {
            // In +Inf: the highest finite bound is all that can be said.
            return BOUNDS.last().copied();
        };
        if c >= rank {
            let inside = c - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * frac);
        }
        below = c;
        lower = upper;
    }
    BOUNDS.last().copied()
}

/// `GET /v1/stats`: the last hour, a point per interval.
pub(crate) async fn route(State(service): State<Service>) -> Result<Response, Problem> {
    let points = service.stats().series();
    Ok(Json(json!({
        "interval_ms": INTERVAL.as_millis() as u64,
        "metrics": render_prometheus().is_some(),
        "points": points,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(per_bucket: &[(usize, f64)]) -> Vec<f64> {
        let mut c = vec![0.0; BOUNDS.len() + 1];
        for &(i, n) in per_bucket {
            c[i] += n;
        }
        let mut acc = 0.0;
        c.iter_mut().for_each(|x| {
            acc += *x;
            *x = acc;
        });
        c
    }

    #[test]
    fn percentiles_interpolate_within_their_bucket() {
        // 100 observations between 1 ms and 2.5 ms (bucket 4).
        let c = counts(&[(4, 100.0)]);
        let p50 = percentile(&c, 0.5).expect("observations");
        assert!((p50 - 0.00175).abs() < 1e-9, "{p50}");
        // 90 fast, 10 slow: p95 is in the slow bucket (0.5 s .. 1 s).
        let c = counts(&[(0, 90.0), (12, 10.0)]);
        let p95 = percentile(&c, 0.95).expect("observations");
        assert!((0.5..=1.0).contains(&p95), "{p95}");
        assert!(percentile(&c, 0.5).expect("observations") <= 0.0001);
        assert_eq!(percentile(&counts(&[]), 0.5), None);
        // Beyond the last bound: the last bound.
        assert_eq!(percentile(&counts(&[(18, 5.0)]), 0.5), Some(60.0));
    }

    #[test]
    fn samples_read_the_recorders_text() {
        let text = "\
multiagents_workflows_started_total{workflow=\"a\"} 7
multiagents_workflows_started_total{workflow=\"b\"} 3
multiagents_workflows_finished_total{workflow=\"a\",status=\"completed\"} 4
multiagents_step_duration_seconds_bucket{workflow=\"a\",step=\"x\",le=\"0.001\"} 2
multiagents_step_duration_seconds_bucket{workflow=\"a\",step=\"x\",le=\"+Inf\"} 5
";
        let s = sample(text, Timestamp(1000));
        assert_eq!((s.started, s.finished), (10.0, 4.0));
        assert_eq!(s.buckets[3], 2.0);
        assert_eq!(s.buckets[BOUNDS.len()], 5.0);
        let earlier = Sample {
            at: Timestamp(0),
            started: 5.0,
            finished: 4.0,
            buckets: vec![0.0; BOUNDS.len() + 1],
        };
        let p = point(&earlier, &s);
        assert_eq!(p["started_per_second"], 5.0);
        assert_eq!(p["finished_per_second"], 0.0);
        assert_eq!(p["steps"], 5.0);
    }
}

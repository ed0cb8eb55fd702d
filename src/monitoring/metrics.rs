//! Metric names, each described, and the Prometheus endpoint.
//!
//! Metrics go through the [`metrics`] facade: nothing is recorded until a
//! recorder is installed (`install_prometheus`, feature `prometheus`, or
//! your own and [`enable`]), and the hot paths hold
//! their handles, so a process that does not export pays next to nothing.

#[cfg(feature = "http")]
use std::net::SocketAddr;
#[cfg(feature = "http")]
use std::sync::Arc;
#[cfg(feature = "prometheus")]
use std::sync::OnceLock;

#[cfg(feature = "prometheus")]
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[cfg(feature = "prometheus")]
use super::config::ConfigError;

/// Workflows started, by `workflow`.
pub const WORKFLOWS_STARTED: &str = "multiagents_workflows_started_total";
/// Workflows that ended, by `workflow` and `status` (`completed`,
/// `compensated`, `failed`, `compensation_failed`, `cancelled`).
pub const WORKFLOWS_FINISHED: &str = "multiagents_workflows_finished_total";
/// Seconds from a step's dispatch to its result reaching the orchestrator,
/// by `workflow`, `step`, `phase` and `outcome` (`ok`, `error`).
pub const STEP_DURATION: &str = "multiagents_step_duration_seconds";
/// Steps dispatched again after a failure (retries), by `workflow`, `step`
/// and `phase`.
pub const STEP_RETRIES: &str = "multiagents_step_retries_total";
/// Events dead-lettered, by `topic` (`compensations` for compensations that
/// failed for good).
pub const DEAD_LETTERS: &str = "multiagents_dead_letters_total";
#[cfg(feature = "prometheus")]
const COMPENSATIONS_TOPIC: &str = crate::bus::COMPENSATIONS;
/// Worker calls finished in this process, by `worker` and `outcome`.
pub const WORKER_CALLS: &str = "multiagents_worker_calls_total";
/// Seconds a worker call took in this process, by `worker`.
pub const WORKER_CALL_DURATION: &str = "multiagents_worker_call_duration_seconds";
/// Worker calls in flight in this process, by `worker`.
pub const WORKER_IN_FLIGHT: &str = "multiagents_worker_in_flight";
/// Redelivered commands dropped unrun because their workflow no longer
/// waited for that attempt, by `worker`.
pub const STALE_COMMANDS: &str = "multiagents_stale_commands_total";
/// Entries of a topic not yet delivered to a consumer group, by `topic` and
/// `group` (sampled by the orchestrator).
pub const BUS_LAG: &str = "multiagents_bus_lag";

#[cfg(feature = "llm")]
pub use multiagents_llm::metric_names::{LLM_CALLS, LLM_COST, LLM_TOKENS};

/// Every metric of the runtime: name, kind and what it means (the LLM
/// metrics, with the `llm` feature, are in `multiagents_llm::metric_names`).
pub const METRICS: &[(&str, &str, &str)] = &[
    (WORKFLOWS_STARTED, "counter", "Workflows started."),
    (
        WORKFLOWS_FINISHED,
        "counter",
        "Workflows that ended, by final status.",
    ),
    (
        STEP_DURATION,
        "histogram",
        "Seconds from a step's dispatch to its result.",
    ),
    (
        STEP_RETRIES,
        "counter",
        "Steps dispatched again after a failure.",
    ),
    (DEAD_LETTERS, "counter", "Events dead-lettered."),
    (
        WORKER_CALLS,
        "counter",
        "Worker calls finished in this process, by outcome.",
    ),
    (
        WORKER_CALL_DURATION,
        "histogram",
        "Seconds a worker call took.",
    ),
    (
        WORKER_IN_FLIGHT,
        "gauge",
        "Worker calls in flight in this process.",
    ),
    (
        STALE_COMMANDS,
        "counter",
        "Redelivered commands dropped unrun: their attempt was no longer awaited.",
    ),
    (
        BUS_LAG,
        "gauge",
        "Entries not yet delivered to a consumer group.",
    ),
];

#[cfg(feature = "prometheus")]
/// Histogram buckets, in seconds: 100 µs to 60 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

#[cfg(feature = "prometheus")]
static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Set once a recorder is installed: until then the hot paths skip even
/// looking up their handles.
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether metrics are being recorded by this process (a recorder was
/// installed through `install_prometheus` or [`enable`]).
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Tells the runtime that a recorder of your own is installed (with
/// [`metrics::set_global_recorder`]), so that it records into it. Call it
/// before starting runtimes and workers.
pub fn enable() {
    ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "prometheus")]
/// Installs the Prometheus recorder as this process's metrics recorder (once;
/// later calls return the same handle) and describes every metric.
pub fn install_prometheus() -> Result<PrometheusHandle, ConfigError> {
    if let Some(h) = PROMETHEUS.get() {
        return Ok(h.clone());
    }
    let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid {
        origin: "metrics".into(),
        message: e.to_string(),
    };
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| invalid(&e))?
        .install_recorder()
        .map_err(|e| invalid(&format!("cannot install the Prometheus recorder: {e}")))?;
    #[cfg(feature = "llm")]
    let catalogue = METRICS
        .iter()
        .chain(multiagents_llm::metric_names::CATALOGUE);
    #[cfg(not(feature = "llm"))]
    let catalogue = METRICS.iter();
    for (name, kind, help) in catalogue {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *help),
            "gauge" => metrics::describe_gauge!(*name, *help),
            _ => metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help),
        }
    }
    enable();
    // Series whose labels are known from the start exist at zero from the
    // first scrape (the runtime adds each workflow's as it learns of them).
    metrics::counter!(DEAD_LETTERS, "topic" => COMPENSATIONS_TOPIC).increment(0);
    Ok(PROMETHEUS.get_or_init(|| handle).clone())
}

#[cfg(feature = "prometheus")]
/// The Prometheus text of every metric, if the recorder is installed.
pub fn render_prometheus() -> Option<String> {
    PROMETHEUS.get().map(|h| {
        h.run_upkeep();
        h.render()
    })
}

/// The sum of the samples of metric `name` (a counter or gauge) in
/// Prometheus text whose labels include every pair of `labels`.
///
/// ```
/// use multiagents::monitoring::metrics::sum_series;
///
/// let text = "# TYPE x counter\nx{status=\"ok\",w=\"a\"} 3\nx{status=\"ok\",w=\"b\"} 4\nx{status=\"bad\"} 1\nxy 9\n";
/// assert_eq!(sum_series(text, "x", &[("status", "ok")]), 7.0);
/// assert_eq!(sum_series(text, "x", &[]), 8.0);
/// ```
pub fn sum_series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            if !(series.is_empty() || series.starts_with('{')) {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(feature = "http")]
/// What `/healthz` reports: `ok` (200) or why not (503).
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[cfg(feature = "http")]
/// A running `/metrics` + `/healthz` server.
pub struct HttpServer {
    /// Where it listens (the port chosen when asked for port 0).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(feature = "http")]
impl HttpServer {
    /// Stops serving.
    pub fn stop(self) {
        self.task.abort();
    }
}

#[cfg(feature = "http")]
/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` on `addr`,
/// installing the recorder if needed. The error names the address.
pub async fn serve_metrics(addr: &str, health: HealthCheck) -> Result<HttpServer, ConfigError> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let handle = install_prometheus()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError::Invalid {
            origin: "metrics.prometheus_addr".into(),
            message: format!("cannot listen on {addr}: {e}"),
        })?;
    let bound = listener.local_addr().map_err(|e| ConfigError::Invalid {
        origin: "metrics.prometheus_addr".into(),
        message: format!("{addr}: {e}"),
    })?;
    let render = handle.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = render.clone();
                async move {
                    handle.run_upkeep();
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    match health() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    // Histograms are drained into their buckets now and then, not only on scrape.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    Ok(HttpServer { addr: bound, task })
}

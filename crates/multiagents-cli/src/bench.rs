//! `multiagents bench orders`: the workload of BENCH.md — five sequential
//! steps, two of them compensable, a configurable share of orders declined
//! in `charge_payment` — on a chosen backend.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multiagents::store::FileStore;
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{
    Error, RetryPolicy, Runtime, RuntimeBuilder, WorkflowBuilder, WorkflowDefinition,
    WorkflowStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum Workload {
    /// Five-step order saga (validate, reserve, charge, invoice, notify).
    Orders(OrdersArgs),
}

#[derive(clap::Args, Debug)]
pub struct OrdersArgs {
    /// Where bus and state live.
    #[arg(long, value_enum, default_value_t = Backend::Memory)]
    backend: Backend,
    /// Workflows to run.
    #[arg(long, default_value_t = 20_000)]
    workflows: u64,
    /// Workflows in flight at once (1 = the latency run).
    #[arg(long, default_value_t = 500)]
    concurrency: u64,
    /// Fraction of orders declined for good in charge_payment (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Seed choosing which orders are declined.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Store file for the embedded backend (default: a temporary file, removed after).
    #[arg(long)]
    store: Option<PathBuf>,
    /// How long one workflow may take before it counts as stuck.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stuck_after: Duration,
    /// Print only the JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    multiagents::core::time::parse_duration(s)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// In-memory bus and store.
    Memory,
    /// In-memory bus, embedded file store.
    Embedded,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Embedded => "embedded",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Order {
    n: u64,
    decline: bool,
}

/// The figures BENCH.md asks for, plus the correctness counts.
#[derive(Serialize, Debug)]
struct Report {
    backend: &'static str,
    workflows: u64,
    concurrency: u64,
    fail_rate: f64,
    completed: u64,
    compensated: u64,
    failed: u64,
    compensation_failed: u64,
    stuck: u64,
    declined: u64,
    compensations: u64,
    duplicate_compensations: u64,
    seconds: f64,
    workflows_per_sec: f64,
    steps_per_sec: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    peak_rss_mb: f64,
}

pub fn definition() -> Result<WorkflowDefinition, multiagents::core::DefinitionError> {
    WorkflowBuilder::new("orders")
        .default_retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(10)))
        .step("validate", "validate_order")
        .step("reserve", "reserve_inventory")
        .compensate_with("release_inventory")
        .step("charge", "charge_payment")
        .compensate_with("refund_payment")
        .step("invoice", "create_invoice")
        .step("notify", "notify_customer")
        .build()
}

/// Which releases ran, by transaction, to check "exactly once".
#[derive(Default)]
struct Releases {
    seen: Mutex<HashSet<String>>,
    duplicates: AtomicU64,
}

fn with_workers(builder: RuntimeBuilder, releases: Arc<Releases>) -> RuntimeBuilder {
    builder
        .worker(from_fn("validate_order", |_: Order, _| async {
            Ok::<_, WorkerError>(json!({"step": "validate", "ok": true}))
        }))
        .worker(from_fn("reserve_inventory", |_: Order, _| async {
            Ok::<_, WorkerError>(json!({"step": "reserve", "ok": true}))
        }))
        .worker(from_fn("release_inventory", move |_: Order, ctx| {
            let releases = releases.clone();
            async move {
                let fresh = releases
                    .seen
                    .lock()
                    .map(|mut s| s.insert(ctx.transaction_id.to_string()))
                    .unwrap_or(true);
                if !fresh {
                    releases.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, WorkerError>(json!({"step": "release", "ok": true}))
            }
        }))
        .worker(from_fn("charge_payment", |o: Order, _| async move {
            if o.decline {
                return Err(WorkerError::fatal("card declined").with_kind("declined"));
            }
            Ok(json!({"step": "charge", "ok": true, "amount": 100 + o.n % 900}))
        }))
        .worker(from_fn("refund_payment", |_: Order, _| async {
            Ok::<_, WorkerError>(json!({"step": "refund", "ok": true}))
        }))
        .worker(from_fn("create_invoice", |_: Order, _| async {
            Ok::<_, WorkerError>(json!({"step": "invoice", "ok": true}))
        }))
        .worker(from_fn("notify_customer", |_: Order, _| async {
            Ok::<_, WorkerError>(json!({"step": "notify", "ok": true}))
        }))
}

/// splitmix64, to pick declined orders reproducibly.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn declined(seed: u64, n: u64, rate: f64) -> bool {
    ((mix(seed ^ mix(n)) >> 11) as f64 / (1u64 << 53) as f64) < rate
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn run(workload: Workload) -> Result<ExitCode, Error> {
    match workload {
        Workload::Orders(args) => orders(args).await,
    }
}

async fn orders(args: OrdersArgs) -> Result<ExitCode, Error> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err(Error::Config(format!(
            "--fail-rate must be between 0 and 1, not {}",
            args.fail_rate
        )));
    }
    if args.workflows == 0 || args.concurrency == 0 {
        return Err(Error::Config(
            "--workflows and --concurrency must be at least 1".into(),
        ));
    }
    let releases = Arc::new(Releases::default());
    let mut builder = with_workers(Runtime::builder().workflow(definition()?), releases.clone());
    let mut temp_store = None;
    if args.backend == Backend::Embedded {
        let path = match &args.store {
            Some(p) => p.clone(),
            None => {
                let p = std::env::temp_dir()
                    .join(format!("multiagents-bench-{}.db", std::process::id()));
                temp_store = Some(p.clone());
                p
            }
        };
        builder = builder.store(FileStore::open(&path)?);
    }
    let runtime = builder.start().await?;
    let client = runtime.client();

    let progress =
        ProgressBar::with_draw_target(Some(args.workflows), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} workflows {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.min(args.workflows) {
        let client = client.clone();
        let next = next.clone();
        let progress = progress.clone();
        let (seed, rate, total, stuck_after) =
            (args.seed, args.fail_rate, args.workflows, args.stuck_after);
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t0 = Instant::now();
                let order = Order {
                    n,
                    decline: declined(seed, n, rate),
                };
                let status = match client.start("orders", &order).await {
                    Ok(tx) => match client.wait(tx, stuck_after).await {
                        Ok(state) => Some(state.status),
                        Err(Error::Timeout { .. }) => None,
                        Err(e) => return Err(e),
                    },
                    Err(e) => return Err(e),
                };
                outcomes.push((status, order.decline, t0.elapsed().as_secs_f64() * 1000.0));
                progress.inc(1);
            }
            Ok::<_, Error>(outcomes)
        });
    }
    let mut outcomes = Vec::with_capacity(args.workflows as usize);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(o)) => outcomes.extend(o),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(Error::Config(format!("a client task failed: {e}"))),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    runtime.shutdown().await;
    if let Some(p) = temp_store {
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("lock"));
    }

    let count =
        |s: WorkflowStatus| outcomes.iter().filter(|(o, _, _)| *o == Some(s)).count() as u64;
    let mut latencies: Vec<f64> = outcomes.iter().map(|(_, _, l)| *l).collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let completed = count(WorkflowStatus::Completed);
    let report = Report {
        backend: args.backend.name(),
        workflows: args.workflows,
        concurrency: args.concurrency,
        fail_rate: args.fail_rate,
        completed,
        compensated: count(WorkflowStatus::Compensated),
        failed: count(WorkflowStatus::Failed),
        compensation_failed: count(WorkflowStatus::CompensationFailed),
        stuck: outcomes.iter().filter(|(o, _, _)| o.is_none()).count() as u64,
        declined: outcomes.iter().filter(|(_, d, _)| *d).count() as u64,
        compensations: releases.seen.lock().map(|s| s.len() as u64).unwrap_or(0),
        duplicate_compensations: releases.duplicates.load(Ordering::Relaxed),
        seconds,
        workflows_per_sec: args.workflows as f64 / seconds,
        // BENCH.md: five steps per workflow; compensations are not steps.
        steps_per_sec: args.workflows as f64 * 5.0 / seconds,
        latency_p50_ms: percentile(&latencies, 50.0),
        latency_p99_ms: percentile(&latencies, 99.0),
        peak_rss_mb: peak_rss_mb(),
    };
    let ok = report.completed + report.compensated == report.workflows
        && report.stuck == 0
        && report.compensations == report.declined
        && report.duplicate_compensations == 0;
    if !args.json {
        eprintln!(
            "{} workflows on {} in {:.2}s: {:.0} workflows/s, {:.0} steps/s, p50 {:.3} ms, p99 {:.3} ms, peak RSS {:.1} MB",
            report.workflows,
            report.backend,
            report.seconds,
            report.workflows_per_sec,
            report.steps_per_sec,
            report.latency_p50_ms,
            report.latency_p99_ms,
            report.peak_rss_mb
        );
        eprintln!(
            "completed {} + compensated {} of {}; stuck {}; declined {}, compensations {} (duplicates {})",
            report.completed,
            report.compensated,
            report.workflows,
            report.stuck,
            report.declined,
            report.compensations,
            report.duplicate_compensations
        );
    }
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if !ok {
        eprintln!("error: the run was not correct (see the counts above)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

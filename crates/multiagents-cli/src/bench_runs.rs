//! `multiagents bench runs-page`: how fast the dashboard's runs page
//! answers with many finished runs in the store. It fills a store with
//! `--runs` finished orders (completed, and a tenth compensated), serves the
//! API over it, and times over loopback HTTP what the page asks for:
//! - its first render: the definitions, then the first page of runs and the
//!   counts by status at once;
//! - each next page, by cursor, `--pages` deep;
//! - the first page filtered by status (the compensated tenth).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multiagents::Runtime;
use multiagents::bus::{Bus, MemoryBus};
use multiagents::core::saga::{HistoryEntry, HistoryEvent};
use multiagents::core::{
    CorrelationId, Payload, StepStatus, Timestamp, TransactionId, WorkflowStatus,
};
use multiagents::store::{FileStore, MemoryStore, Store};
use serde_json::{Value, json};

use crate::error::{CliError, Result};

/// Where the runs are kept.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageBackend {
    /// In this process.
    Memory,
    /// A file (`--store`, or a temporary one), as `serve` keeps them by default.
    Embedded,
    /// On Redis (`--redis-url`).
    Redis,
}

#[derive(clap::Args, Debug)]
pub struct RunsPageArgs {
    /// Where the runs are kept.
    #[arg(long, value_enum, default_value_t = PageBackend::Memory)]
    backend: PageBackend,
    /// How many finished runs to fill the store with.
    #[arg(long, default_value_t = 100_000)]
    runs: u64,
    /// How many next pages to follow.
    #[arg(long, default_value_t = 20)]
    pages: usize,
    /// How many times the first render is timed.
    #[arg(long, default_value_t = 20)]
    renders: usize,
    /// Runs per page, as the dashboard asks for.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// The store file for `--backend embedded` (default: a temporary one).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Redis server for `--backend redis`.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Key prefix in Redis.
    #[arg(long, default_value = "bench-runs-page")]
    prefix: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn get(http: &HttpClient, url: &str) -> Result<Value> {
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| CliError::process("the bench client", e))?;
    let res = http
        .request(req)
        .await
        .map_err(|e| CliError::process("the bench client", format!("{url}: {e}")))?;
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| CliError::process("the bench client", e))?
        .to_bytes();
    if !status.is_success() {
        return Err(CliError::process(
            "the bench service",
            format!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| CliError::process("the bench client", e))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        (v[i] * 1000.0).round() / 1000.0
    };
    json!({"p50": at(0.5), "p99": at(0.99), "max": at(1.0), "n": v.len()})
}

/// A finished order `n`, started `age_ms` ago: its state as the runtime
/// leaves it (every step completed, or the payment declined and the steps
/// before it compensated), with its history.
fn finished(
    def: &multiagents::core::WorkflowDefinition,
    n: u64,
    now: Timestamp,
) -> multiagents::core::WorkflowState {
    let started = Timestamp(now.as_millis().saturating_sub(3_600_000 - n % 3_600_000));
    let id = TransactionId::new();
    let input = Payload::to_json(&json!({"n": n})).unwrap_or_else(|_| Payload::null());
    let (mut state, _) =
        multiagents::core::saga::start(def, id, CorrelationId::new(), input, started);
    let compensated = n % 10 == 9;
    let end = started.plus(Duration::from_millis(5));
    for (i, step) in state.steps.iter_mut().enumerate() {
        let undone = compensated && i < 2;
        step.attempts = 1;
        step.status = if undone {
            StepStatus::Compensated
        } else if compensated {
            StepStatus::Pending
        } else {
            StepStatus::Completed
        };
        if !compensated {
            step.output = Payload::to_json(&json!({"ok": i})).ok();
        }
    }
    state.status = if compensated {
        WorkflowStatus::Compensated
    } else {
        WorkflowStatus::Completed
    };
    state.history.push(HistoryEntry {
        at: end,
        step: None,
        attempt: 0,
        event: HistoryEvent::Finished {
            status: state.status,
        },
        timing: None,
    });
    state.updated_at = end;
    state.finished_at = Some(end);
    state
}

pub async fn run(args: RunsPageArgs) -> Result<ExitCode> {
    if args.runs == 0 || args.limit == 0 || args.limit > 1000 || args.renders == 0 {
        return Err(CliError::usage(
            "--runs",
            "runs and renders must be at least 1, and limit between 1 and 1000",
        ));
    }
    let mut temp = None;
    let (bus, store): (Bus, Store) = match args.backend {
        PageBackend::Memory => (MemoryBus::new().into(), MemoryStore::new().into()),
        PageBackend::Embedded => {
            let path = args.store.clone().unwrap_or_else(|| {
                let p = std::env::temp_dir()
                    .join(format!("multiagents-runs-page-{}.db", std::process::id()));
                temp = Some(p.clone());
                p
            });
            (MemoryBus::new().into(), FileStore::open(&path)?.into())
        }
        PageBackend::Redis => crate::bench_http::on_redis(&args.redis_url, &args.prefix).await?,
    };
    let def = crate::bench::definition()?;
    store.definitions.put_definition(&def).await?;

    // Fill, many writes in flight.
    let progress = ProgressBar::with_draw_target(Some(args.runs), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} finished runs written {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let now = Timestamp::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (store, def, next, progress) =
            (store.clone(), def.clone(), next.clone(), progress.clone());
        let total = args.runs;
        writers.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, CliError>(());
                }
                store
                    .states
                    .create(Arc::new(finished(&def, n, now)))
                    .await?;
                progress.inc(1);
            }
        });
    }
    while let Some(j) = writers.join_next().await {
        j.map_err(|e| CliError::process("a writer", e))??;
    }
    progress.finish_and_clear();
    let fill_seconds = t0.elapsed().as_secs_f64();

    let runtime = Runtime::builder()
        .bus(bus.clone())
        .store(store.clone())
        .external_workers()
        .start()
        .await?;
    let service = multiagents_server::Service::new(runtime.client(), bus, store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::process("the bench service", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::process("the bench service", e))?;
    tokio::spawn(multiagents_server::serve(
        listener,
        service,
        std::future::pending(),
    ));
    let base = format!("http://{addr}");
    let http: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let limit = args.limit;

    // The first render, as the page makes it.
    let mut renders = Vec::new();
    let mut lists = Vec::new();
    let mut counts_ms = Vec::new();
    let mut total = 0;
    for _ in 0..args.renders {
        let t = Instant::now();
        get(&http, &format!("{base}/v1/definitions")).await?;
        let l = Instant::now();
        let (list, counts) = tokio::join!(
            async {
                let r = get(&http, &format!("{base}/v1/runs?limit={limit}")).await;
                (r, l.elapsed())
            },
            async {
                let r = get(&http, &format!("{base}/v1/runs/counts")).await;
                (r, l.elapsed())
            },
        );
        let (list, list_took) = list;
        let (counts, counts_took) = counts;
        let (list, counts) = (list?, counts?);
        renders.push(ms(t.elapsed()));
        lists.push(ms(list_took));
        counts_ms.push(ms(counts_took));
        total = counts["total"].as_u64().unwrap_or(0);
        if list["runs"].as_array().map_or(0, Vec::len) != limit.min(args.runs as usize) {
            return Err(CliError::process(
                "the bench",
                format!("the first page has not {limit} runs: {list}"),
            ));
        }
    }
    if total != args.runs {
        return Err(CliError::process(
            "the bench",
            format!("the counts say {total} runs, not {}", args.runs),
        ));
    }

    // Next pages, by cursor.
    let mut pages = Vec::new();
    let mut cursor = get(&http, &format!("{base}/v1/runs?limit={limit}")).await?["next"].clone();
    let mut seen = 0;
    while let Some(c) = cursor.as_str().map(str::to_string) {
        if pages.len() == args.pages {
            break;
        }
        let t = Instant::now();
        let page = get(&http, &format!("{base}/v1/runs?limit={limit}&cursor={c}")).await?;
        pages.push(ms(t.elapsed()));
        seen += page["runs"].as_array().map_or(0, Vec::len);
        cursor = page["next"].clone();
    }

    // The first page of the compensated tenth.
    let mut filtered = Vec::new();
    for _ in 0..args.renders {
        let t = Instant::now();
        get(
            &http,
            &format!("{base}/v1/runs?limit={limit}&status=compensated"),
        )
        .await?;
        filtered.push(ms(t.elapsed()));
    }
    runtime.shutdown().await;
    if let Some(p) = temp {
        let _ = std::fs::remove_file(p);
    }
    let backend = match args.backend {
        PageBackend::Memory => "memory",
        PageBackend::Embedded => "embedded",
        PageBackend::Redis => "redis",
    };
    let report = json!({
        "backend": backend,
        "runs": args.runs,
        "limit": limit,
        "fill_seconds": (fill_seconds * 100.0).round() / 100.0,
        "first_render_cold_ms": renders.first().copied().unwrap_or(0.0),
        "first_render_ms": percentiles(renders),
        "first_page_ms": percentiles(lists),
        // The service reuses a count for a while: the first is counted cold.
        "counts_cold_ms": counts_ms.first().copied().unwrap_or(0.0),
        "counts_ms": percentiles(counts_ms),
        "next_page_ms": percentiles(pages),
        "next_pages_runs": seen,
        "filtered_first_page_ms": percentiles(filtered),
    });
    let cold = |k: &str| report[k].as_f64().unwrap_or(0.0);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} finished runs on {backend} (written in {:.1} s), {limit} a page:",
            args.runs, fill_seconds
        );
        for (what, key) in [
            (
                "first render (definitions, then page and counts)",
                "first_render_ms",
            ),
            ("  first page", "first_page_ms"),
            ("  counts by status (reused for 5× their cost)", "counts_ms"),
            ("next page by cursor", "next_page_ms"),
            ("first page, status=compensated", "filtered_first_page_ms"),
        ] {
            let p = &report[key];
            println!(
                "  {what:<52} p50 {:>8.2} ms  p99 {:>8.2} ms  ({} times)",
                p["p50"].as_f64().unwrap_or(0.0),
                p["p99"].as_f64().unwrap_or(0.0),
                p["n"]
            );
        }
        println!(
            "  the very first render: {:.2} ms, its counts {:.2} ms",
            cold("first_render_cold_ms"),
            cold("counts_cold_ms")
        );
    }
    Ok(ExitCode::SUCCESS)
}

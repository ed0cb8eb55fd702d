//! `multiagents bench http`: the orders workload through the service's HTTP
//! API. Runs are started with `POST /v1/workflows/orders/runs` and their
//! steps done by HTTP workers (`/v1/tasks/poll` and `/v1/tasks/answers`),
//! in this process (`--workers rust`) or in another one (`--workers none`:
//! a Python worker, say, polling the address printed).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multiagents::Runtime;
use multiagents::bus::{Bus, MemoryBus, MemoryBusConfig, RedisStreamsBus};
use multiagents::store::{MemoryStore, RedisStateStore, Store};
use serde_json::{Value, json};

use crate::error::{CliError, Result};

/// Where the service keeps its bus and state.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpBackend {
    /// In this process.
    Memory,
    /// On Redis (`--redis-url`).
    Redis,
}

/// Who does the steps.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpWorkers {
    /// Rust HTTP workers in this process, polling over loopback.
    Rust,
    /// Nobody here: another process polls the printed address.
    None,
}

#[derive(clap::Args, Debug)]
pub struct HttpArgs {
    /// Where bus and state live.
    #[arg(long, value_enum, default_value_t = HttpBackend::Memory)]
    backend: HttpBackend,
    /// Who does the steps.
    #[arg(long, value_enum, default_value_t = HttpWorkers::Rust)]
    workers: HttpWorkers,
    /// Redis server for `--backend redis`.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Key prefix in Redis.
    #[arg(long, default_value = "bench-http")]
    prefix: String,
    /// Where the service listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// How many orders.
    #[arg(long, default_value_t = 5000)]
    workflows: u64,
    /// Starts in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Worker loops (`--workers rust`), each polling up to 100 tasks.
    #[arg(long, default_value_t = 4)]
    pollers: usize,
    /// Fraction of orders whose payment is declined (they compensate).
    #[arg(long, default_value_t = 0.1)]
    fail_rate: f64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

const WORKERS: [&str; 7] = [
    "validate_order",
    "reserve_inventory",
    "release_inventory",
    "charge_payment",
    "refund_payment",
    "create_invoice",
    "notify_customer",
];

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A bus and a store on the Redis at `url`, under `prefix`, as the
/// benchmarks of the service use them.
pub async fn on_redis(url: &str, prefix: &str) -> Result<(Bus, Store)> {
    let redis = crate::workflow::RedisArgs {
        redis_url: Some(url.to_string()),
        database_url: None,
        database_ca_file: None,
        schema: String::new(),
        redis_ca_file: None,
        prefix: prefix.to_string(),
    };
    Ok((
        RedisStreamsBus::connect(redis.bus_config()).await?.into(),
        RedisStateStore::connect(redis.store_config()).await?.into(),
    ))
}

async fn post(http: &HttpClient, base: &str, path: &str, body: String) -> Result<(u16, Value)> {
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| CliError::process("the bench client", e))?;
    let res = http
        .request(req)
        .await
        .map_err(|e| CliError::process("the bench client", format!("{base}{path}: {e}")))?;
    let status = res.status().as_u16();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| CliError::process("the bench client", e))?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Whether order `n` is paid with a declined card: `fail_rate` of them, the
/// same ones in every worker (the Python bench worker uses this formula too).
fn declined(n: u64, fail_rate: f64) -> bool {
    (n % 1000) < (fail_rate * 1000.0).round() as u64
}

/// One worker loop: poll up to 100 tasks, answer them all in one batch.
async fn poller(
    http: HttpClient,
    base: String,
    fail_rate: f64,
    done: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<u64> {
    let poll = json!({"workers": WORKERS, "max": 100, "wait_ms": 200}).to_string();
    let mut steps = 0;
    while !stop.load(Ordering::Relaxed) {
        let (status, body) = post(&http, &base, "/v1/tasks/poll", poll.clone()).await?;
        if status != 200 {
            return Err(CliError::process(
                "the bench poller",
                format!("poll answered {status}: {body}"),
            ));
        }
        let tasks = body["tasks"].as_array().cloned().unwrap_or_default();
        if tasks.is_empty() {
            continue;
        }
        let answers: Vec<Value> = tasks
            .iter()
            .map(|t| {
                let token = t["token"].clone();
                let n = t["input"]["n"].as_u64().unwrap_or(0);
                let declined = t["worker"] == "charge_payment" && declined(n, fail_rate);
                if declined {
                    json!({"token": token, "error": "card declined", "kind": "declined", "retry": "no"})
                } else {
                    json!({"token": token, "output": {"ok": true, "key": t["idempotency_key"]}})
                }
            })
            .collect();
        steps += answers.len() as u64;
        done.fetch_add(answers.len() as u64, Ordering::Relaxed);
        let (status, body) = post(
            &http,
            &base,
            "/v1/tasks/answers",
            json!({"answers": answers}).to_string(),
        )
        .await?;
        if status != 200 {
            return Err(CliError::process(
                "the bench poller",
                format!("answers answered {status}: {body}"),
            ));
        }
    }
    Ok(steps)
}

pub async fn run(args: HttpArgs) -> Result<ExitCode> {
    if args.workflows == 0 || args.concurrency == 0 || args.pollers == 0 {
        return Err(CliError::usage(
            "--workflows",
            "workflows, concurrency and pollers must be at least 1",
        ));
    }
    let (bus, store): (Bus, Store) = match args.backend {
        HttpBackend::Memory => (
            MemoryBus::with_config(MemoryBusConfig {
                visibility_timeout: Duration::from_secs(30),
                ..Default::default()
            })
            .into(),
            MemoryStore::new().into(),
        ),
        HttpBackend::Redis => on_redis(&args.redis_url, &args.prefix).await?,
    };
    // As `serve` runs it: many results in flight on Redis, where each costs
    // a few round trips.
    let config = multiagents::OrchestratorConfig {
        consumers: if args.backend == HttpBackend::Redis {
            16
        } else {
            2
        },
        parallel_results: true,
        ..Default::default()
    };
    let runtime = Runtime::builder()
        .bus(bus.clone())
        .store(store.clone())
        .workflow(crate::bench::definition()?)
        .external_workers()
        .orchestrator_config(config)
        .start()
        .await?;
    let service = multiagents_server::Service::new(runtime.client(), bus, store);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| {
            CliError::process(
                "the bench service",
                format!("cannot listen on {}: {e}", args.listen),
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::process("the bench service", e))?;
    let base = format!("http://{addr}");
    tokio::spawn(multiagents_server::serve(
        listener,
        service,
        std::future::pending(),
    ));
    eprintln!("bench service on {base}");
    let http: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build_http();

    // Phase 1: the starts, as fast as the API takes them.
    let progress =
        ProgressBar::with_draw_target(Some(args.workflows), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message("started");
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut starters = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (http, base, next, progress) =
            (http.clone(), base.clone(), next.clone(), progress.clone());
        let total = args.workflows;
        starters.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, CliError>(ids);
                }
                let (status, body) = post(
                    &http,
                    &base,
                    "/v1/workflows/orders/runs",
                    json!({"n": n}).to_string(),
                )
                .await?;
                if status != 201 {
                    return Err(CliError::process(
                        "a start",
                        format!("answered {status}: {body}"),
                    ));
                }
                ids.push(body["id"].as_str().unwrap_or_default().to_string());
                progress.inc(1);
            }
        });
    }
    let mut ids = Vec::with_capacity(args.workflows as usize);
    while let Some(j) = starters.join_next().await {
        ids.extend(j.map_err(|e| CliError::process("a starter", e))??);
    }
    let start_seconds = t0.elapsed().as_secs_f64();
    progress.finish_and_clear();

    // Phase 2: the steps, by HTTP workers, until every run has finished.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t1 = Instant::now();
    let mut pollers = tokio::task::JoinSet::new();
    if args.workers == HttpWorkers::Rust {
        for _ in 0..args.pollers {
            pollers.spawn(poller(
                http.clone(),
                base.clone(),
                args.fail_rate,
                done.clone(),
                stop.clone(),
            ));
        }
    } else {
        eprintln!(
            "waiting for HTTP workers on {base} (say: python clients/python/examples/bench_worker.py --server {base})"
        );
    }
    let finishing =
        ProgressBar::with_draw_target(Some(args.workflows), ProgressDrawTarget::stderr());
    finishing.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} finished {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let client = runtime.client();
    let mut statuses = std::collections::HashMap::<String, u64>::new();
    let mut first_step: Option<f64> = None;
    for id in &ids {
        let tx: multiagents::TransactionId = id
            .parse()
            .map_err(|e| CliError::process("a start", format!("`{id}` is not a run id: {e}")))?;
        let state = client.wait(tx, Duration::from_secs(600)).await?;
        if first_step.is_none() {
            first_step = Some(t1.elapsed().as_secs_f64());
        }
        *statuses.entry(state.status.to_string()).or_default() += 1;
        finishing.inc(1);
    }
    let step_seconds = t1.elapsed().as_secs_f64();
    finishing.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    let mut steps = 0;
    while let Some(j) = pollers.join_next().await {
        steps += j.map_err(|e| CliError::process("a poller", e))??;
    }
    runtime.shutdown().await;
    let completed = statuses.get("completed").copied().unwrap_or(0);
    let compensated = statuses.get("compensated").copied().unwrap_or(0);
    let steps = if args.workers == HttpWorkers::Rust {
        steps
    } else {
        // Counted from the runs: five steps a completed order; a declined one
        // ran validate, reserve, charge and the release.
        completed * 5 + compensated * 4
    };
    let report = json!({
        "backend": match args.backend { HttpBackend::Memory => "memory", HttpBackend::Redis => "redis" },
        "workers": match args.workers { HttpWorkers::Rust => "rust-http", HttpWorkers::None => "external-http" },
        "workflows": args.workflows,
        "concurrency": args.concurrency,
        "starts_per_second": args.workflows as f64 / start_seconds,
        "steps": steps,
        "steps_per_second": steps as f64 / step_seconds,
        "workflows_per_second": args.workflows as f64 / step_seconds,
        "completed": completed,
        "compensated": compensated,
        "other": args.workflows - completed - compensated,
        "start_seconds": start_seconds,
        "step_seconds": step_seconds,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} starts in {:.2} s: {:.0} starts/s\n{} steps in {:.2} s: {:.0} steps/s ({} completed, {} compensated)",
            args.workflows,
            start_seconds,
            report["starts_per_second"].as_f64().unwrap_or(0.0),
            steps,
            step_seconds,
            report["steps_per_second"].as_f64().unwrap_or(0.0),
            completed,
            compensated
        );
    }
    let ok = completed + compensated == args.workflows;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

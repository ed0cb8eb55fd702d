//! `multiagents bench chain` and `multiagents bench fanout`: how the cost of
//! one step grows with the shape of its workflow.
//!
//! `chain --steps N` runs workflows of N sequential steps, `fanout --items N`
//! workflows of one step fanned out over N items, one workflow at a time,
//! until at least `--min-steps` steps have run. Every step is a worker that
//! returns about `--output-bytes` bytes (distinct per step, so that nothing
//! is stored once for several; the same at every step with `--same-output`).
//! The report gives, per size: the time per
//! step, the bytes the store wrote per step, on Redis the bytes the server
//! received per step (bus and store), and the peak RSS. Several sizes
//! (`--steps 10,100,1000`) run each in its own process, so that each peak RSS
//! is its own, and print one table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multiagents::bus::{Bus, MemoryBus};
use multiagents::postgres::{
    PostgresBus, PostgresBusConfig, PostgresStateStore, PostgresStoreConfig,
};
use multiagents::store::{FileStore, MemoryStore, Store};
use multiagents::worker::from_fn;
use multiagents::{Runtime, WorkerContext, WorkerError, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

use crate::error::{CliError, Result};

/// Where bus and state live.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeBackend {
    /// In-memory bus and store.
    Memory,
    /// In-memory bus, embedded file store.
    Embedded,
    /// Redis Streams bus and Redis state store.
    Redis,
    /// Redis Streams bus, PostgreSQL state store (`--database-url`).
    Postgres,
    /// PostgreSQL alone: its bus and its state store (`--database-url`).
    PostgresOnly,
}

impl ShapeBackend {
    fn name(self) -> &'static str {
        match self {
            ShapeBackend::Memory => "memory",
            ShapeBackend::Embedded => "embedded",
            ShapeBackend::Redis => "redis",
            ShapeBackend::Postgres => "postgres",
            ShapeBackend::PostgresOnly => "postgres-only",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ShapeArgs {
    /// Where bus and state live.
    #[arg(long, value_enum, default_value_t = ShapeBackend::Embedded)]
    backend: ShapeBackend,
    /// About how many bytes each step returns.
    #[arg(long, default_value_t = 100)]
    output_bytes: usize,
    /// Every step returns the same output (a system prompt repeated), which
    /// stores of parts keep once; without it, each output is distinct.
    #[arg(long)]
    same_output: bool,
    /// Workflows run one after another until at least this many steps ran.
    #[arg(long, default_value_t = 2_000)]
    min_steps: u64,
    /// Redis server for `--backend redis`.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// PostgreSQL server for `--backend postgres` and `postgres-only`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Key prefix in Redis, and schema in PostgreSQL (the process id is
    /// appended; the keys and the schema are deleted afterwards).
    #[arg(long, default_value = "bench-shape")]
    prefix: String,
    /// Store file for `--backend embedded` (default: a temporary file,
    /// removed after).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Print one JSON object per size.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ChainArgs {
    /// Sequential steps per workflow; several, comma-separated, run each in
    /// its own process.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    steps: Vec<u64>,
    #[command(flatten)]
    common: ShapeArgs,
}

#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    /// Items the one step fans out over; several, comma-separated, run each
    /// in its own process.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    items: Vec<u64>,
    /// Branches in flight at once (`max_concurrency`).
    #[arg(long, default_value_t = 50)]
    concurrency: u32,
    #[command(flatten)]
    common: ShapeArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Chain,
    Fanout { concurrency: u32 },
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Chain => "chain",
            Shape::Fanout { .. } => "fanout",
        }
    }

    fn size_flag(self) -> &'static str {
        match self {
            Shape::Chain => "--steps",
            Shape::Fanout { .. } => "--items",
        }
    }

    fn definition(self, n: u64) -> Result<multiagents::WorkflowDefinition> {
        let name = format!("bench_{}_{n}", self.name());
        let def = match self {
            Shape::Chain => {
                let mut b = WorkflowBuilder::new(name);
                for i in 0..n {
                    b = b.step(format!("s{i}"), "noop");
                }
                b.build()?
            }
            Shape::Fanout { concurrency } => WorkflowBuilder::new(name)
                .step("each", "noop")
                .for_each("input.items")
                .max_concurrency(concurrency)
                .build()?,
        };
        Ok(def)
    }

    fn input(self, n: u64) -> Value {
        match self {
            Shape::Chain => json!({}),
            Shape::Fanout { .. } => json!({ "items": (0..n).collect::<Vec<_>>() }),
        }
    }
}

pub async fn chain(args: ChainArgs) -> Result<ExitCode> {
    run(Shape::Chain, args.steps, args.common).await
}

pub async fn fanout(args: FanoutArgs) -> Result<ExitCode> {
    if args.concurrency == 0 {
        return Err(CliError::usage("--concurrency", "must be at least 1"));
    }
    let shape = Shape::Fanout {
        concurrency: args.concurrency,
    };
    run(shape, args.items, args.common).await
}

async fn run(shape: Shape, sizes: Vec<u64>, args: ShapeArgs) -> Result<ExitCode> {
    if sizes.is_empty() || sizes.contains(&0) {
        return Err(CliError::usage(
            shape.size_flag(),
            "every size must be at least 1",
        ));
    }
    if sizes.len() == 1 {
        let report = one(shape, sizes[0], &args).await?;
        if args.json {
            println!("{report}");
        } else {
            table(shape, &args, &[report]);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Each size in its own process: a peak RSS is the process's own.
    let exe = std::env::current_exe().map_err(|e| CliError::process("the bench", e))?;
    let mut reports = Vec::new();
    for n in sizes {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("bench").arg(shape.name());
        cmd.arg(shape.size_flag()).arg(n.to_string());
        if let Shape::Fanout { concurrency } = shape {
            cmd.arg("--concurrency").arg(concurrency.to_string());
        }
        cmd.args(["--backend", args.backend.name()])
            .args(["--output-bytes", &args.output_bytes.to_string()])
            .args(["--min-steps", &args.min_steps.to_string()])
            .args(args.same_output.then_some("--same-output"))
            .args(["--redis-url", &args.redis_url])
            .args(["--database-url", &args.database_url])
            .args(["--prefix", &args.prefix])
            .arg("--json")
            .stderr(std::process::Stdio::inherit());
        let out = cmd
            .output()
            .map_err(|e| CliError::process("the bench", e))?;
        if !out.status.success() {
            return Err(CliError::process(
                "the bench",
                format!(
                    "{} {} {n} failed ({})",
                    shape.name(),
                    shape.size_flag(),
                    out.status
                ),
            ));
        }
        let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            CliError::process("the bench", format!("its report does not decode: {e}"))
        })?;
        if args.json {
            println!("{report}");
        }
        reports.push(report);
    }
    if !args.json {
        table(shape, &args, &reports);
    }
    Ok(ExitCode::SUCCESS)
}

fn table(shape: Shape, args: &ShapeArgs, reports: &[Value]) {
    let what = match shape {
        Shape::Chain => "sequential steps".to_string(),
        Shape::Fanout { concurrency } => format!("items (max_concurrency {concurrency})"),
    };
    println!(
        "{} on {}, outputs of about {} B, at least {} steps per size:",
        shape.name(),
        args.backend.name(),
        args.output_bytes,
        args.min_steps
    );
    println!("  size = {what}");
    println!(
        "  {:>8} {:>6} {:>12} {:>14} {:>17} {:>10} {:>12}",
        "size",
        "runs",
        "µs per step",
        "store B/step",
        "server in B/step",
        "state KB",
        "peak RSS MB"
    );
    let dash = |v: &Value| match v.as_f64() {
        Some(x) => format!("{x:.0}"),
        None => "—".to_string(),
    };
    for r in reports {
        println!(
            "  {:>8} {:>6} {:>12.1} {:>14} {:>17} {:>10.1} {:>12.1}",
            r["size"].as_u64().unwrap_or(0),
            r["runs"].as_u64().unwrap_or(0),
            r["per_step_us"].as_f64().unwrap_or(0.0),
            dash(&r["store_bytes_per_step"]),
            dash(&r["server_bytes_in_per_step"]),
            r["state_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            r["peak_rss_mb"].as_f64().unwrap_or(0.0),
        );
    }
}

/// The bytes the Redis server has received so far (`INFO stats`).
async fn server_bytes_in(conn: &mut multiagents::redis::RedisConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Deletes every key under `prefix`.
async fn clear_prefix(conn: &mut multiagents::redis::RedisConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let reply: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await;
        let Ok((next, keys)) = reply else { return };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(&keys).query_async(conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

async fn one(shape: Shape, n: u64, args: &ShapeArgs) -> Result<Value> {
    let prefix = format!("{}-{}", args.prefix, std::process::id());
    let mut temp = None;
    let mut redis = None;
    let (bus, store): (Bus, Store) = match args.backend {
        ShapeBackend::Memory => (MemoryBus::new().into(), MemoryStore::new().into()),
        ShapeBackend::Embedded => {
            let path = args.store.clone().unwrap_or_else(|| {
                let p = std::env::temp_dir()
                    .join(format!("multiagents-bench-shape-{}.db", std::process::id()));
                temp = Some(p.clone());
                p
            });
            (MemoryBus::new().into(), FileStore::open(&path)?.into())
        }
        ShapeBackend::Redis => {
            redis = Some(multiagents::redis::connect_with(&args.redis_url, None).await?);
            crate::bench_http::on_redis(&args.redis_url, &prefix).await?
        }
        ShapeBackend::Postgres => {
            redis = Some(multiagents::redis::connect_with(&args.redis_url, None).await?);
            let (bus, _) = crate::bench_http::on_redis(&args.redis_url, &prefix).await?;
            let config = PostgresStoreConfig::new(&args.database_url).schema(schema(&prefix));
            (bus, PostgresStateStore::connect(config).await?.into())
        }
        ShapeBackend::PostgresOnly => {
            let bus = PostgresBus::connect(
                PostgresBusConfig::new(&args.database_url).schema(schema(&prefix)),
            )
            .await?;
            let config = PostgresStoreConfig::new(&args.database_url).schema(schema(&prefix));
            let store = PostgresStateStore::connect(config).await?;
            store.carry_events_of(&bus)?;
            (Bus::new(bus), store.into())
        }
    };
    let runs = args.min_steps.div_ceil(n).max(1);
    let total = runs * n;
    let progress = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template(&format!(
            "{} {n}: {{bar:40}} {{pos}}/{{len}} steps {{per_sec}} eta {{eta}}",
            shape.name()
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let pad = args.output_bytes.saturating_sub(40);
    let counter = progress.clone();
    let same = args.same_output;
    let noop = from_fn(
        "noop",
        move |_input: serde::de::IgnoredAny, ctx: WorkerContext| {
            let counter = counter.clone();
            async move {
                counter.inc(1);
                if same {
                    return Ok(json!({ "prompt": "x".repeat(pad) }));
                }
                // Distinct per step and run: nothing is stored once for two.
                let head = format!("{}/{}", ctx.transaction_id, ctx.step);
                let fill = pad.saturating_sub(head.len());
                Ok::<_, WorkerError>(json!({ "step": head, "pad": "x".repeat(fill) }))
            }
        },
    );
    let def = shape.definition(n)?;
    let runtime = Runtime::builder()
        .bus(bus)
        .store(store.clone())
        .workflow(def.clone())
        .worker(noop)
        .start()
        .await?;
    let client = runtime.client();
    let input = shape.input(n);
    let bytes_before = store.states.bytes_written();
    let server_before = match redis.as_mut() {
        Some(c) => server_bytes_in(c).await,
        None => None,
    };
    let started = Instant::now();
    let mut last = None;
    for _ in 0..runs {
        let tx = client.start(def.name().as_str(), &input).await?;
        let state = client
            .wait(tx, std::time::Duration::from_secs(3600))
            .await?;
        if state.status != WorkflowStatus::Completed {
            return Err(CliError::process(
                "the bench",
                format!("workflow {tx} ended {}, not completed", state.status),
            ));
        }
        last = Some(state);
    }
    let seconds = started.elapsed().as_secs_f64();
    // Measured after the clock: the size of the last state, as JSON.
    let state_bytes = last
        .as_ref()
        .and_then(|s| serde_json::to_vec(&**s).ok())
        .map_or(0, |v| v.len());
    progress.finish_and_clear();
    let written = match (bytes_before, store.states.bytes_written()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let server_in = match (server_before, redis.as_mut()) {
        (Some(a), Some(c)) => server_bytes_in(c).await.map(|b| b.saturating_sub(a)),
        _ => None,
    };
    runtime.shutdown().await;
    drop(store);
    if let Some(p) = temp {
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("lock"));
    }
    if let Some(c) = redis.as_mut() {
        clear_prefix(c, &prefix).await;
    }
    if matches!(
        args.backend,
        ShapeBackend::Postgres | ShapeBackend::PostgresOnly
    ) {
        drop_schema(&args.database_url, &schema(&prefix)).await;
    }
    let per_step = |b: Option<u64>| b.map(|b| (b as f64 / total as f64).round());
    Ok(json!({
        "workload": shape.name(),
        "backend": args.backend.name(),
        "size": n,
        "runs": runs,
        "steps": total,
        "output_bytes": args.output_bytes,
        "same_output": args.same_output,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "per_step_us": (seconds * 1e6 / total as f64 * 10.0).round() / 10.0,
        "store_bytes_per_step": per_step(written),
        "server_bytes_in_per_step": per_step(server_in),
        "state_bytes": state_bytes,
        "peak_rss_mb": (crate::bench::peak_rss_mb() * 10.0).round() / 10.0,
    }))
}

/// The PostgreSQL schema of a run with key prefix `prefix`.
fn schema(prefix: &str) -> String {
    prefix.replace('-', "_")
}

/// Deletes a run's schema, with everything the bus and store kept there; a
/// failure is only reported (the run's figures stand).
async fn drop_schema(url: &str, schema: &str) {
    let dropped = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
    };
    if let Err(e) = dropped.await {
        eprintln!(
            "could not drop the schema {schema} on {}: {e}",
            multiagents::postgres::redacted(url)
        );
    }
}

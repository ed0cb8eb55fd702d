//! `multiagents bench orders`: the workload of `docs/benchmarks.md` — five sequential
//! steps, two of them compensable, a configurable share of orders declined
//! in `charge_payment` — on a chosen backend, with every role in one process
//! or each in its own (`--role`).
//!
//! Every step body records its side effect under its idempotency key (in
//! Redis for the Redis backend, in memory otherwise) as an idempotent store
//! would — the first run under a key applies it — and counts its run by
//! attempt, so the report can say how often step bodies ran
//! (`step_executions`), whether any effect was applied twice
//! (`duplicate_effects`, must be 0), how many runs were for attempts the
//! orchestrator had given up on (`stale_runs`) and how many were
//! redeliveries (`redelivered_runs`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multiagents::bus::{
    Bus, MemoryBus, PostgresBus, PostgresBusConfig, RedisBusConfig, RedisStreamsBus,
};
use multiagents::core::{Phase, StepName, TransactionId};
use multiagents::store::{
    FileStore, MemoryStore, PostgresStateStore, PostgresStoreConfig, RedisStateStore,
    RedisStoreConfig, Store,
};
use multiagents::worker::{Worker, WorkerError, WorkerManager, WorkerManagerConfig, from_fn};
use multiagents::{
    Client, Error, OrchestratorConfig, RetryPolicy, Runtime, WorkerContext, WorkflowBuilder,
    WorkflowDefinition, WorkflowStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::CliError;

#[derive(Subcommand, Debug)]
pub enum Workload {
    /// Five-step order saga (validate, reserve, charge, invoice, notify).
    Orders(OrdersArgs),
    /// How soon a live consumer takes over the deliveries of a process
    /// killed with SIGKILL (Redis), in milliseconds and in lease beats.
    Takeover(crate::takeover::TakeoverArgs),
    /// The orders through the HTTP API: starts per second over
    /// `POST /v1/workflows/orders/runs`, then steps per second done by HTTP
    /// workers (Rust in this process, or another process's, e.g. Python).
    Http(crate::bench_http::HttpArgs),
    /// The dashboard's runs page over many finished runs: its first render
    /// (definitions, a page of runs, the counts by status) and each next
    /// page by cursor, timed over HTTP.
    RunsPage(crate::bench_runs::RunsPageArgs),
    /// Workflows of N sequential steps: the time and the bytes written per
    /// step as the chain grows (several sizes print one table).
    Chain(crate::bench_shape::ChainArgs),
    /// One step fanned out over N items: the time and the bytes written per
    /// branch as the fan-out grows.
    Fanout(crate::bench_shape::FanoutArgs),
}

#[derive(clap::Args, Debug)]
pub struct OrdersArgs {
    /// Where bus and state live.
    #[arg(long, value_enum, default_value_t = Backend::Memory)]
    backend: Backend,
    /// Which part of the system this process runs (redis and postgres backends only for
    /// anything but `all`). `orchestrator`, `workers` and `node` (both of
    /// them) run until SIGINT or SIGTERM, draining on the way out.
    #[arg(long, value_enum, default_value_t = Role::All)]
    role: Role,
    /// Redis server for `--backend redis`:
    /// `redis://[user:password@]host:port/db`, or `rediss://…` for TLS.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// `rediss://` server.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PEM")]
    redis_ca_file: Option<std::path::PathBuf>,
    /// Serve Prometheus `/metrics` and `/healthz` on this address while
    /// running (metrics are only recorded when this is set).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// PostgreSQL for `--backend postgres`:
    /// `postgres://[user[:password]@]host[:port]/database`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Key prefix in Redis (and the schema in PostgreSQL), so runs do not
    /// share state.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// How long a command or result may go without being acked or extended
    /// before another process takes it over (redis and postgres backends); also the timer
    /// lease.
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    visibility_timeout: Duration,
    /// Commands of steps in flight for this long without any change are
    /// published again (`--role orchestrator`).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    redispatch_after: Duration,
    /// Result consumers per orchestrator (redis and postgres backends).
    /// Default 16 on Redis, 64 with a PostgreSQL store, whose commits take
    /// longer: more batches in flight share them.
    #[arg(long)]
    consumers: Option<usize>,
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

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    multiagents::core::time::parse_duration(s)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
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

impl Backend {
    /// Whether other processes can reach its bus and store.
    fn shared(self) -> bool {
        matches!(
            self,
            Backend::Redis | Backend::Postgres | Backend::PostgresOnly
        )
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Embedded => "embedded",
            Backend::Redis => "redis",
            Backend::Postgres => "postgres",
            Backend::PostgresOnly => "postgres-only",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Orchestrator, workers and client in this process.
    All,
    /// Only the orchestrator.
    Orchestrator,
    /// Only the workers.
    Workers,
    /// The orchestrator and the workers, as the embedded service runs them:
    /// no client.
    Node,
    /// Only the client: submit, wait, report.
    Client,
}

#[derive(Serialize, Deserialize)]
struct Order {
    n: u64,
    decline: bool,
}

/// The figures of `docs/benchmarks.md`, plus the correctness counts.
#[derive(Serialize, Debug)]
struct Report {
    backend: &'static str,
    role: &'static str,
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
    step_executions: u64,
    /// Effects applied twice (under two idempotency keys): must be 0.
    duplicate_effects: u64,
    /// Step bodies that ran for an attempt the orchestrator had given up on
    /// or moved past (timed out, superseded).
    stale_runs: u64,
    /// Runs of the attempt that settled a step beyond its first
    /// (redeliveries: a process died holding the command, say).
    redelivered_runs: u64,
    seconds: f64,
    workflows_per_sec: f64,
    steps_per_sec: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    peak_rss_mb: f64,
    /// What this process's `/metrics` says at the end (with `--http`).
    #[serde(skip_serializing_if = "Option::is_none")]
    exported: Option<Exported>,
}

/// Counters read back from this process's Prometheus text.
#[derive(Serialize, Debug)]
struct Exported {
    workflows_started: f64,
    completed: f64,
    compensated: f64,
    worker_calls: f64,
}

impl Exported {
    fn read() -> Option<Self> {
        use multiagents::monitoring::metrics::{
            WORKER_CALLS, WORKFLOWS_FINISHED, WORKFLOWS_STARTED, render_prometheus, sum_series,
        };
        let text = render_prometheus()?;
        Some(Self {
            workflows_started: sum_series(&text, WORKFLOWS_STARTED, &[]),
            completed: sum_series(&text, WORKFLOWS_FINISHED, &[("status", "completed")]),
            compensated: sum_series(&text, WORKFLOWS_FINISHED, &[("status", "compensated")]),
            worker_calls: sum_series(&text, WORKER_CALLS, &[]),
        })
    }
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

/// Where step bodies record their side effects, as a real idempotent store
/// would: the first run under an idempotency key applies the effect, later
/// runs under it are no-ops. Each run adds one to a counter named by the key
/// it presents and by its own attempt (`transaction/step/phase/attempt`, from
/// the call itself, not from the key), so the report can tell effects
/// applied under more than one key, redeliveries, and runs of attempts the
/// orchestrator had given up on. One `HINCRBY` a run on Redis; one upsert
/// into an unlogged table on PostgreSQL alone (a ledger for the report, not
/// part of what is measured, so it writes no WAL; it survives a clean
/// restart of the server).
#[derive(Clone)]
enum Effects {
    Local(Arc<LocalEffects>),
    Redis {
        conn: multiagents::redis::RedisConnection,
        prefix: String,
        /// The server, for errors.
        address: String,
    },
    Postgres {
        pool: deadpool_postgres::Pool,
        /// `<schema>.effects`.
        table: String,
        /// The server, for errors.
        address: String,
    },
}

/// What PostgreSQL said of a failed statement, with its code (a
/// `tokio_postgres::Error` says only "db error").
fn pg_said(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// A failed call to the PostgreSQL holding the effect records: transient,
/// so the client tries again.
fn pg_effects_error(address: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Bus(multiagents::bus::BusError::Backend {
        address: address.to_string(),
        message: format!("{what}: {e}"),
    })
}

impl Effects {
    /// Effect records in `<schema>.effects` of the server at `url`.
    async fn postgres(url: &str, schema: &str) -> Result<Self, Error> {
        let address = multiagents::postgres::redacted(url);
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| pg_effects_error(&address, "the database URL", e))?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(8)
            .build()
            .map_err(|e| pg_effects_error(&address, "the effects pool", e))?;
        let table = format!("{schema}.effects");
        let client = pool
            .get()
            .await
            .map_err(|e| pg_effects_error(&address, "connecting for the effect counts", e))?;
        // One transaction, under a lock: processes starting together would
        // otherwise race to create the schema and the table.
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_xact_lock(hashtext('{table}'));
                 CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE UNLOGGED TABLE IF NOT EXISTS {table} (field text PRIMARY KEY, n bigint NOT NULL)"
            ))
            .await
            .map_err(|e| pg_effects_error(&address, "creating the effects table", pg_said(&e)))?;
        drop(client);
        Ok(Effects::Postgres {
            pool,
            table,
            address,
        })
    }
}

/// A failed call to the Redis holding the effect records: transient, so the
/// client tries again.
fn effects_error(address: &str, what: &str, e: redis::RedisError) -> Error {
    Error::Bus(multiagents::bus::BusError::Backend {
        address: address.to_string(),
        message: format!("{what}: {e}"),
    })
}

/// In-process effect records, so that recording costs the trivial bench
/// workers little: each run is appended to a log (of a shard, by workflow),
/// 32 bytes and no strings, and the logs are sorted by workflow once, at the
/// end. (A map of a record per workflow, looked up for every run, cost a
/// cache miss or two a run: 3 % of a memory run's CPU.)
#[derive(Default)]
struct LocalEffects {
    shards: [Mutex<Vec<LocalRun>>; 16],
    /// Runs of steps that are not in [`STEPS`] (none in the workload).
    others: Mutex<Ledger>,
}

/// One run of a step in [`STEPS`], in process.
#[derive(Clone, Copy, Debug)]
struct LocalRun {
    tx: TransactionId,
    /// The hash of its idempotency key.
    key: u64,
    attempt: u32,
    /// By [`slot_of`].
    slot: u8,
}

impl LocalEffects {
    /// Logs sized for `workflows` orders (five runs each, and some more),
    /// so that none grows (and holds two copies at once) mid-run.
    fn sized(workflows: u64) -> Effects {
        let per_shard = (workflows as usize * 11 / 2).div_ceil(16);
        Effects::Local(Arc::new(Self {
            shards: std::array::from_fn(|_| Mutex::new(Vec::with_capacity(per_shard))),
            others: Mutex::default(),
        }))
    }

    /// The shard of `tx`'s runs.
    fn shard(tx: TransactionId) -> usize {
        (tx.0.as_u128() % 16) as usize
    }
}

/// The hash of an idempotency key.
fn hash64(key: &str) -> u64 {
    multiagents::core::hash::fnv1a(key.bytes())
}

/// One attempt of one step of one workflow, in one phase.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Attempt {
    tx: TransactionId,
    step: StepName,
    phase: Phase,
    attempt: u32,
}

impl Attempt {
    /// From `tx/step/phase/attempt`.
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.rsplitn(4, '/');
        let (attempt, phase, step, tx) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        Some(Self {
            tx: tx.parse().ok()?,
            step: StepName::from(step),
            phase: match phase {
                "forward" => Phase::Forward,
                "compensate" => Phase::Compensate,
                _ => return None,
            },
            attempt: attempt.parse().ok()?,
        })
    }
}

/// The Redis counter one run adds to: `<idempotency key> <attempt>`.
fn run_field(ctx: &WorkerContext) -> String {
    format!(
        "{} {}/{}/{}/{}",
        ctx.idempotency_key(),
        ctx.transaction_id,
        ctx.step,
        ctx.phase,
        ctx.attempt
    )
}

/// An effect: one step of one workflow, in one phase.
#[cfg(test)]
type Effect = (TransactionId, StepName, Phase);

/// The steps of [`definition`], in order: a run record keeps the runs of
/// each step's effects at the step's index here.
const STEPS: [&str; 5] = ["validate", "reserve", "charge", "invoice", "notify"];

/// Where a step's effect in a phase is kept in a [`RunRecord`], when the
/// step is one of [`STEPS`].
fn slot_of(step: &str, phase: Phase) -> Option<usize> {
    let index = STEPS.iter().position(|s| *s == step)?;
    Some(2 * index + usize::from(phase == Phase::Compensate))
}

/// The step and phase of a [`RunRecord`] slot.
fn slot_name(slot: u8) -> (&'static str, Phase) {
    let phase = if slot % 2 == 1 {
        Phase::Compensate
    } else {
        Phase::Forward
    };
    (STEPS[usize::from(slot / 2)], phase)
}

/// The first key and attempt an effect ran under, and the runs of that
/// attempt under that key; `attempt` 0 (attempts count from 1): none yet.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: u64,
    attempt: u32,
    runs: u32,
}

/// Runs that are not a slot's first key and attempt (other keys, other
/// attempts), and runs of steps that are not in [`STEPS`].
#[derive(Debug)]
struct Extra {
    step: StepName,
    phase: Phase,
    key: u64,
    attempt: u32,
    runs: u64,
}

/// The runs of one workflow's effects, and the attempts it settled its
/// steps with once it finished. Nearly always every run is in `slots`: a
/// fixed record of 192 bytes a workflow, with no allocation but its own.
#[derive(Debug, Default)]
struct RunRecord {
    /// By [`slot_of`].
    slots: [Slot; 2 * STEPS.len()],
    // A thin pointer (8 bytes, where a `Vec` or a boxed slice takes 24 or
    // 16) in every record, for what is nearly always absent.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<Extra>>>,
    /// (forward attempts, compensation attempts) by step index, once the
    /// workflow finished.
    settled: Option<[(u16, u16); STEPS.len()]>,
}

const _: () = assert!(std::mem::size_of::<RunRecord>() <= 192);

impl RunRecord {
    /// Counts `n` runs of `attempt` under the key hashed to `key`.
    fn add(&mut self, key: u64, step: &StepName, phase: Phase, attempt: u32, n: u64) {
        if !self.add_slot(key, step.as_str(), phase, attempt, n) {
            self.add_extra(key, step, phase, attempt, n);
        }
    }

    /// Counts runs as [`RunRecord::add`] does, when they go in a slot (the
    /// step is one of [`STEPS`] and the slot is theirs or free); false
    /// otherwise, and nothing is counted.
    fn add_slot(&mut self, key: u64, step: &str, phase: Phase, attempt: u32, n: u64) -> bool {
        if let Some(slot) = slot_of(step, phase).map(|i| &mut self.slots[i]) {
            if slot.attempt == 0 {
                *slot = Slot {
                    key,
                    attempt,
                    runs: 0,
                };
            }
            if slot.key == key
                && slot.attempt == attempt
                && let Some(runs) = u32::try_from(n).ok().and_then(|n| slot.runs.checked_add(n))
            {
                slot.runs = runs;
                return true;
            }
        }
        false
    }

    /// Counts runs that have no slot of their own.
    fn add_extra(&mut self, key: u64, step: &StepName, phase: Phase, attempt: u32, n: u64) {
        let more = self.more.get_or_insert_default();
        if let Some(extra) = more
            .iter_mut()
            .find(|e| e.key == key && e.attempt == attempt && e.phase == phase && e.step == *step)
        {
            extra.runs += n;
            return;
        }
        more.push(Extra {
            step: step.clone(),
            phase,
            key,
            attempt,
            runs: n,
        });
    }

    /// Every effect with runs: its step, phase, and runs.
    fn effects(&self) -> Vec<(StepName, Phase, Runs)> {
        let mut effects: Vec<(StepName, Phase, Runs)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.attempt != 0 {
                let phase = if i % 2 == 1 {
                    Phase::Compensate
                } else {
                    Phase::Forward
                };
                effects.push((
                    StepName::from(STEPS[i / 2]),
                    phase,
                    vec![(slot.key, slot.attempt, u64::from(slot.runs))],
                ));
            }
        }
        for extra in self.more.iter().flat_map(|m| m.iter()) {
            let run = (extra.key, extra.attempt, extra.runs);
            match effects
                .iter_mut()
                .find(|(step, phase, _)| *phase == extra.phase && *step == extra.step)
            {
                Some((_, _, runs)) => runs.push(run),
                None => effects.push((extra.step.clone(), extra.phase, vec![run])),
            }
        }
        effects
    }
}

/// The runs of one effect: (hash of the key, attempt, runs).
type Runs = Vec<(u64, u32, u64)>;

/// Run records by workflow.
type Ledger = multiagents::core::hash::IdMap<TransactionId, Box<RunRecord>>;

/// Counts `n` runs of `attempt` under the key hashed to `key`.
fn add_runs(ledger: &mut Ledger, key: u64, attempt: &Attempt, n: u64) {
    ledger.entry(attempt.tx).or_default().add(
        key,
        &attempt.step,
        attempt.phase,
        attempt.attempt,
        n,
    );
}

/// The records of every run, by workflow: from Redis or PostgreSQL, a
/// record per workflow; in process, the logs the runs were appended to,
/// each sorted by workflow (a workflow is in one log only), so reading them
/// at the end copies and rehashes nothing.
#[derive(Debug, Default)]
struct Records {
    shards: Vec<Ledger>,
    logs: Vec<Vec<LocalRun>>,
    /// For the logs: the attempts each finished workflow settled with,
    /// sorted by workflow.
    settled: Vec<(TransactionId, [(u16, u16); STEPS.len()])>,
}

impl Records {
    /// Notes the attempts a finished workflow settled its steps with; a
    /// workflow no step body ran for has nothing to judge.
    fn settle(&mut self, tx: TransactionId, attempts: [(u16, u16); STEPS.len()]) {
        if let Some(record) = self.shards.iter_mut().find_map(|s| s.get_mut(&tx)) {
            record.settled = Some(attempts);
        }
    }

    /// Notes the attempts finished workflows settled their steps with, by
    /// workflow (see [`Records::settle`]).
    fn settle_all(&mut self, mut settled: Vec<(TransactionId, [(u16, u16); STEPS.len()])>) {
        if self.shards.iter().any(|s| !s.is_empty()) {
            for &(tx, attempts) in &settled {
                self.settle(tx, attempts);
            }
        }
        if !self.logs.is_empty() {
            // In process: the records are built from the logs when
            // counted, each finding its workflow's attempts here.
            settled.sort_unstable_by_key(|(tx, _)| *tx);
            self.settled = settled;
        }
    }

    /// Every workflow's record, built from the logs for those recorded in
    /// process (one at a time, on the stack), with the attempts it settled
    /// with.
    fn each_record(&self, mut f: impl FnMut(&RunRecord)) {
        for record in self.shards.iter().flat_map(|s| s.values()) {
            f(record);
        }
        for log in &self.logs {
            for runs in log.chunk_by(|a, b| a.tx == b.tx) {
                let tx = runs[0].tx;
                let mut record = RunRecord::default();
                for run in runs {
                    let (step, phase) = slot_name(run.slot);
                    if !record.add_slot(run.key, step, phase, run.attempt, 1) {
                        record.add_extra(run.key, &StepName::from(step), phase, run.attempt, 1);
                    }
                }
                record.settled = self
                    .settled
                    .binary_search_by_key(&tx, |(t, _)| *t)
                    .ok()
                    .map(|i| self.settled[i].1);
                f(&record);
            }
        }
    }

    /// How many times an effect was applied: the distinct keys it ran
    /// under.
    #[cfg(test)]
    fn applied(&self, (tx, step, phase): &Effect) -> Option<u64> {
        let record = self.shards.iter().find_map(|s| s.get(tx))?;
        let (_, _, runs) = record
            .effects()
            .into_iter()
            .find(|(s, p, _)| s == step && p == phase)?;
        Some(distinct_keys(&runs))
    }

    /// From the Redis counters by `<key> <tx/step/phase/attempt>`; fields
    /// that do not read so are left out.
    #[cfg(test)]
    fn from_fields(counters: std::collections::HashMap<String, u64>) -> Self {
        let mut ledger = Ledger::default();
        for (field, n) in counters {
            add_field(&mut ledger, &field, n);
        }
        Self {
            shards: vec![ledger],
            ..Default::default()
        }
    }
}

/// The distinct keys among an effect's runs.
fn distinct_keys(runs: &[(u64, u32, u64)]) -> u64 {
    let mut keys: Vec<u64> = runs.iter().map(|(key, _, _)| *key).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.len() as u64
}

/// Counts one Redis counter, `<key> <tx/step/phase/attempt>`; a field that
/// does not read so is left out.
fn add_field(ledger: &mut Ledger, field: &str, n: u64) {
    let Some((key, attempt)) = field.split_once(' ') else {
        return;
    };
    if let Some(attempt) = Attempt::parse(attempt) {
        add_runs(ledger, hash64(key), &attempt, n);
    }
}

#[derive(Debug, Default, PartialEq)]
struct Totals {
    executions: u64,
    duplicates: u64,
    releases: u64,
    stale_runs: u64,
    redelivered_runs: u64,
}

/// The attempts a finished workflow settled its steps with, by step index
/// in [`STEPS`]: (forward attempts, compensation attempts).
fn settled_attempts(state: &multiagents::core::WorkflowState) -> [(u16, u16); STEPS.len()] {
    let mut attempts = [(0, 0); STEPS.len()];
    for step in state.steps.iter() {
        if let Some(i) = STEPS.iter().position(|s| *s == step.name.as_str()) {
            let narrow = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
            attempts[i] = (narrow(step.attempts), narrow(step.compensation_attempts));
        }
    }
    attempts
}

impl Effects {
    fn key(prefix: &str) -> String {
        format!("{{{prefix}:fx}}:runs")
    }

    async fn record(&self, ctx: &WorkerContext) -> Result<(), WorkerError> {
        match self {
            Effects::Local(local) => {
                let key = hash64(ctx.idempotency_key());
                let tx = ctx.transaction_id;
                match slot_of(ctx.step.as_str(), ctx.phase).and_then(|s| u8::try_from(s).ok()) {
                    Some(slot) => local.shards[LocalEffects::shard(tx)]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(LocalRun {
                            tx,
                            key,
                            attempt: ctx.attempt,
                            slot,
                        }),
                    None => local
                        .others
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(tx)
                        .or_default()
                        .add(key, &ctx.step, ctx.phase, ctx.attempt, 1),
                }
                Ok(())
            }
            Effects::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let _: i64 = redis::cmd("HINCRBY")
                    .arg(Self::key(prefix))
                    .arg(run_field(ctx))
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .map_err(WorkerError::retry)?;
                Ok(())
            }
            Effects::Postgres { pool, table, .. } => {
                let client = pool.get().await.map_err(WorkerError::retry)?;
                // Prepared once per connection: one round trip a run, as
                // the one HINCRBY on Redis (a statement given as text is
                // parsed in a round trip of its own every time).
                let statement = client
                    .prepare_cached(&format!(
                        "INSERT INTO {table} (field, n) VALUES ($1, 1)
                         ON CONFLICT (field) DO UPDATE SET n = {table}.n + 1"
                    ))
                    .await
                    .map_err(WorkerError::retry)?;
                client
                    .execute(&statement, &[&run_field(ctx)])
                    .await
                    .map_err(WorkerError::retry)?;
                Ok(())
            }
        }
    }

    async fn records(&self) -> Result<Records, Error> {
        match self {
            Effects::Local(local) => {
                // Read once, at the end: taken, not copied, and sorted in
                // place.
                let logs = local
                    .shards
                    .iter()
                    .map(|shard| {
                        let mut log =
                            std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
                        log.sort_by_key(|run| run.tx);
                        log
                    })
                    .collect();
                let others =
                    std::mem::take(&mut *local.others.lock().unwrap_or_else(|e| e.into_inner()));
                Ok(Records {
                    shards: vec![others],
                    logs,
                    settled: Vec::new(),
                })
            }
            Effects::Redis {
                conn,
                prefix,
                address,
            } => Ok(Records {
                shards: vec![hscan(conn, address, &Self::key(prefix)).await?],
                ..Default::default()
            }),
            Effects::Postgres {
                pool,
                table,
                address,
            } => {
                let read = |e: &dyn std::fmt::Display| {
                    pg_effects_error(address, "reading the effect counts", e)
                };
                let client = pool.get().await.map_err(|e| read(&e))?;
                let rows = client
                    .query(&format!("SELECT field, n FROM {table}"), &[])
                    .await
                    .map_err(|e| read(&pg_said(&e)))?;
                let mut ledger = Ledger::default();
                for row in rows {
                    add_field(&mut ledger, row.get(0), row.get::<_, i64>(1).max(0) as u64);
                }
                Ok(Records {
                    shards: vec![ledger],
                    ..Default::default()
                })
            }
        }
    }

    async fn clear(&self) -> Result<(), Error> {
        if let Effects::Redis {
            conn,
            prefix,
            address,
        } = self
        {
            let mut conn = conn.clone();
            // UNLINK: a big hash from an earlier run is freed in the background.
            let _: () = redis::cmd("UNLINK")
                .arg(Self::key(prefix))
                .query_async(&mut conn)
                .await
                .map_err(|e| effects_error(address, "clearing the effect counts", e))?;
        }
        if let Effects::Postgres {
            pool,
            table,
            address,
        } = self
        {
            let clear = |e: &dyn std::fmt::Display| {
                pg_effects_error(address, "clearing the effect counts", e)
            };
            let client = pool.get().await.map_err(|e| clear(&e))?;
            client
                .batch_execute(&format!("TRUNCATE {table}"))
                .await
                .map_err(|e| clear(&pg_said(&e)))?;
        }
        Ok(())
    }
}

/// The effect counters, read a page at a time and counted as they come (a
/// run's hundreds of thousands of fields are never all held as strings). A
/// field HSCAN returns twice is counted once.
async fn hscan(
    conn: &multiagents::redis::RedisConnection,
    address: &str,
    key: &str,
) -> Result<Ledger, Error> {
    let mut conn = conn.clone();
    let mut ledger = Ledger::default();
    let mut seen = multiagents::core::hash::IdSet::default();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<(String, u64)>) = redis::cmd("HSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await
            .map_err(|e| effects_error(address, "reading the effect counts", e))?;
        for (field, n) in page {
            if seen.insert(hash64(&field)) {
                add_field(&mut ledger, &field, n);
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(ledger);
        }
    }
}

/// The counts from the records and the attempts each workflow settled
/// with: executions are all runs; an effect applied more than once (under
/// more than one key) is a duplicate; a run of an attempt other than the one
/// its step settled with is stale (the orchestrator had given up on it or
/// moved past it); a run of the settling attempt beyond its first is a
/// redelivery.
fn totals(records: &Records) -> Totals {
    let mut totals = Totals::default();
    records.each_record(|record| {
        for (step, phase, runs) in record.effects() {
            totals.executions += runs.iter().map(|(_, _, n)| n).sum::<u64>();
            if distinct_keys(&runs) > 1 {
                totals.duplicates += 1;
            }
            if step.as_str() == "reserve" && phase == Phase::Compensate {
                totals.releases += 1;
            }
            let Some((forward, undo)) = record.settled.and_then(|settled| {
                let i = STEPS.iter().position(|s| *s == step.as_str())?;
                Some(settled[i])
            }) else {
                // A workflow that did not finish in time (counted as stuck).
                continue;
            };
            let settling = u32::from(if phase == Phase::Compensate {
                undo
            } else {
                forward
            });
            let mut by_attempt: Vec<(u32, u64)> = Vec::new();
            for (_, attempt, n) in runs {
                match by_attempt.iter_mut().find(|(a, _)| *a == attempt) {
                    Some((_, runs)) => *runs += n,
                    None => by_attempt.push((attempt, n)),
                }
            }
            for (attempt, n) in by_attempt {
                if attempt == settling {
                    totals.redelivered_runs += n - 1;
                } else {
                    totals.stale_runs += n;
                }
            }
        }
    });
    totals
}

fn workers(effects: &Effects) -> Vec<Arc<dyn Worker>> {
    let step = |name: &'static str, out: &'static str| -> Arc<dyn Worker> {
        let effects = effects.clone();
        Arc::new(from_fn(name, move |_: Order, ctx| {
            let effects = effects.clone();
            async move {
                effects.record(&ctx).await?;
                Ok::<_, WorkerError>(json!({"step": out, "ok": true}))
            }
        }))
    };
    let charge_effects = effects.clone();
    vec![
        step("validate_order", "validate"),
        step("reserve_inventory", "reserve"),
        step("release_inventory", "release"),
        Arc::new(from_fn("charge_payment", move |o: Order, ctx| {
            let effects = charge_effects.clone();
            async move {
                if o.decline {
                    return Err(WorkerError::fatal("card declined").with_kind("declined"));
                }
                effects.record(&ctx).await?;
                Ok(json!({"step": "charge", "ok": true, "amount": 100 + o.n % 900}))
            }
        })),
        step("refund_payment", "refund"),
        step("create_invoice", "invoice"),
        step("notify_customer", "notify"),
    ]
}

/// splitmix64, to pick declined orders reproducibly.
fn mix(x: u64) -> u64 {
    multiagents::core::hash::splitmix64(x)
}

fn declined(seed: u64, n: u64, rate: f64) -> bool {
    ((mix(seed ^ mix(n)) >> 11) as f64 / (1u64 << 53) as f64) < rate
}

pub(crate) fn peak_rss_mb() -> f64 {
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

pub async fn run(
    workload: Workload,
    monitoring: &multiagents::monitoring::MonitoringConfig,
) -> crate::error::Result<ExitCode> {
    match workload {
        Workload::Orders(args) => orders(args, monitoring).await,
        Workload::Takeover(args) => crate::takeover::run(args).await,
        Workload::Http(args) => crate::bench_http::run(args).await,
        Workload::RunsPage(args) => crate::bench_runs::run(args).await,
        Workload::Chain(args) => crate::bench_shape::chain(args).await,
        Workload::Fanout(args) => crate::bench_shape::fanout(args).await,
    }
}

/// Runs `call` again while it fails for a transient reason (the server is
/// restarting), for up to `limit`.
async fn retrying<T, F, Fut>(limit: Duration, mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let until = Instant::now() + limit;
    let mut pause = Duration::from_millis(50);
    loop {
        match call().await {
            Err(e) if e.is_transient() && Instant::now() < until => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The bus and store of a backend.
async fn backend(args: &OrdersArgs) -> Result<(Bus, Store, Effects, Option<PathBuf>), Error> {
    match args.backend {
        Backend::Memory => Ok((
            MemoryBus::new().into(),
            MemoryStore::new().into(),
            LocalEffects::sized(args.workflows),
            None,
        )),
        Backend::Embedded => {
            let (path, temp) = match &args.store {
                Some(p) => (p.clone(), None),
                None => {
                    let p = std::env::temp_dir()
                        .join(format!("multiagents-bench-{}.db", std::process::id()));
                    (p.clone(), Some(p))
                }
            };
            Ok((
                MemoryBus::new().into(),
                FileStore::open(&path)?.into(),
                LocalEffects::sized(args.workflows),
                temp,
            ))
        }
        Backend::PostgresOnly => {
            let schema = args.prefix.replace('-', "_");
            let bus = PostgresBus::connect(
                PostgresBusConfig::new(&args.database_url)
                    .schema(&schema)
                    .visibility_timeout(args.visibility_timeout),
            )
            .await?;
            let mut config = PostgresStoreConfig::new(&args.database_url).schema(&schema);
            config.timer_lease = args.visibility_timeout;
            let store = PostgresStateStore::connect(config).await?;
            store.carry_events_of(&bus)?;
            Ok((
                Bus::new(bus),
                store.into(),
                Effects::postgres(&args.database_url, &schema).await?,
                None,
            ))
        }
        Backend::Redis | Backend::Postgres => {
            let mut bus_config = RedisBusConfig::new(&args.redis_url)
                .prefix(&args.prefix)
                .visibility_timeout(args.visibility_timeout);
            bus_config.ca_file = args.redis_ca_file.clone();
            let bus = RedisStreamsBus::connect(bus_config).await?;
            let mut store_config = RedisStoreConfig::new(&args.redis_url).prefix(&args.prefix);
            store_config.timer_lease = args.visibility_timeout;
            store_config.ca_file = args.redis_ca_file.clone();
            let store: Store = match args.backend {
                Backend::Postgres => {
                    let mut config = PostgresStoreConfig::new(&args.database_url)
                        .schema(args.prefix.replace('-', "_"));
                    config.timer_lease = args.visibility_timeout;
                    PostgresStateStore::connect(config).await?.into()
                }
                _ => RedisStateStore::connect(store_config).await?.into(),
            };
            let conn =
                multiagents::redis::connect_with(&args.redis_url, args.redis_ca_file.as_deref())
                    .await?;
            Ok((
                bus.into(),
                store,
                Effects::Redis {
                    conn,
                    prefix: args.prefix.clone(),
                    address: multiagents::redis::redacted(&args.redis_url),
                },
                None,
            ))
        }
    }
}

async fn orders(
    args: OrdersArgs,
    monitoring: &multiagents::monitoring::MonitoringConfig,
) -> crate::error::Result<ExitCode> {
    let worker_config = WorkerManagerConfig::default().with_monitoring(monitoring);
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err(CliError::usage(
            "--fail-rate",
            format!("must be between 0 and 1, not {}", args.fail_rate),
        ));
    }
    if args.workflows == 0 || args.concurrency == 0 {
        return Err(CliError::usage(
            if args.workflows == 0 {
                "--workflows"
            } else {
                "--concurrency"
            },
            "must be at least 1",
        ));
    }
    if args.role != Role::All && !args.backend.shared() {
        return Err(CliError::usage(
            "--role",
            format!(
                "{:?} needs a backend other processes can reach: use --backend redis, postgres or postgres-only",
                args.role
            ),
        ));
    }
    let metrics_server = match &args.http {
        Some(addr) => {
            let server =
                multiagents::monitoring::metrics::serve_metrics(addr, Arc::new(|| Ok(()))).await?;
            eprintln!("metrics on http://{}/metrics", server.addr);
            Some(server)
        }
        None => None,
    };
    // A server that is restarting is waited for, as a supervisor would.
    let (bus, store, effects, temp_store) = match retrying(Duration::ZERO, || backend(&args)).await
    {
        Err(e) if e.is_transient() => {
            eprintln!("waiting for the backend: {e}");
            retrying(Duration::from_secs(60), || backend(&args)).await?
        }
        other => other?,
    };
    let orchestrator_config = OrchestratorConfig {
        // The in-process bus loses what it held with the process; Redis does not.
        redispatch_on_start: !args.backend.shared(),
        // Each result costs a few Redis round trips: keep many in flight.
        consumers: match args.backend {
            Backend::Memory | Backend::Embedded => 2,
            Backend::Redis => args.consumers.unwrap_or(16),
            Backend::Postgres | Backend::PostgresOnly => args.consumers.unwrap_or(64),
        },
        ..Default::default()
    };
    match args.role {
        Role::Orchestrator | Role::Node => {
            let config = OrchestratorConfig {
                redispatch_after: Some(args.redispatch_after),
                ..orchestrator_config
            };
            let node = args.role == Role::Node;
            let rt = retrying(Duration::from_secs(60), || {
                let mut builder = Runtime::builder()
                    .bus(bus.clone())
                    .store(store.clone())
                    .orchestrator_config(config.clone());
                builder = match node {
                    true => {
                        builder = builder.worker_config(worker_config.clone());
                        for w in workers(&effects) {
                            builder = builder.worker_with_arc(w, Default::default());
                        }
                        builder
                    }
                    false => builder.external_workers(),
                };
                async move { builder.workflow(definition()?).start().await }
            })
            .await?;
            eprintln!(
                "{} running (prefix {}); stop with Ctrl-C or SIGTERM",
                if node {
                    "orchestrator and workers"
                } else {
                    "orchestrator"
                },
                args.prefix
            );
            stopped().await;
            rt.shutdown().await;
            return Ok(ExitCode::SUCCESS);
        }
        Role::Workers => {
            let handle = retrying(Duration::from_secs(60), || {
                let mut manager = WorkerManager::new(bus.clone())
                    .config(worker_config.clone())
                    .store(store.clone());
                for w in workers(&effects) {
                    manager = manager.register_arc(w, Default::default());
                }
                manager.start()
            })
            .await?;
            eprintln!(
                "workers running on {} (prefix {}); stop with Ctrl-C or SIGTERM",
                multiagents::redis::redacted(&args.redis_url),
                args.prefix
            );
            stopped().await;
            eprintln!("draining workers");
            handle.shutdown().await;
            return Ok(ExitCode::SUCCESS);
        }
        Role::All | Role::Client => {}
    }

    let (client, runtime) = if args.role == Role::All {
        let mut builder = Runtime::builder()
            .bus(bus)
            .store(store)
            .workflow(definition()?)
            .orchestrator_config(orchestrator_config)
            .worker_config(worker_config);
        for w in workers(&effects) {
            builder = builder.worker_with_arc(w, Default::default());
        }
        let rt = builder.start().await?;
        (rt.client(), Some(rt))
    } else {
        let client = Client::new(bus, store);
        client.register(&definition()?).await?;
        (client, None)
    };
    retrying(Duration::from_secs(60), || effects.clear()).await?;

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
            let mut settled = Vec::new();
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
                // A start with its own id may be retried (a server restarting).
                let options = multiagents::StartOptions {
                    transaction_id: Some(multiagents::core::TransactionId::new()),
                    ..Default::default()
                };
                let tx = retrying(stuck_after, || {
                    client.start_with("orders", &order, options.clone())
                })
                .await?;
                let waited = retrying(stuck_after, || client.wait(tx, stuck_after)).await;
                let (status, attempts) = match waited {
                    Ok(state) => (Some(state.status), Some((tx, settled_attempts(&state)))),
                    Err(Error::Timeout { .. }) => (None, None),
                    Err(e) => return Err(e),
                };
                outcomes.push((status, order.decline, t0.elapsed().as_secs_f64() * 1000.0));
                settled.extend(attempts);
                progress.inc(1);
            }
            Ok::<_, Error>((outcomes, settled))
        });
    }
    let mut outcomes = Vec::with_capacity(args.workflows as usize);
    let mut settled = Vec::with_capacity(args.workflows as usize);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((o, s))) => {
                outcomes.extend(o);
                settled.extend(s);
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(CliError::process("a client task", e)),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    // Every effect, compensations included, is recorded before its workflow
    // finishes, so the counts are complete once the last wait returns.
    let mut records = retrying(Duration::from_secs(60), || effects.records()).await?;
    records.settle_all(settled);
    let totals = totals(&records);
    if let Some(rt) = runtime {
        rt.shutdown().await;
    }
    if let Some(p) = temp_store {
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("lock"));
    }

    let count =
        |s: WorkflowStatus| outcomes.iter().filter(|(o, _, _)| *o == Some(s)).count() as u64;
    let mut latencies: Vec<f64> = outcomes.iter().map(|(_, _, l)| *l).collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let report = Report {
        backend: args.backend.name(),
        role: match args.role {
            Role::All => "all",
            _ => "client",
        },
        workflows: args.workflows,
        concurrency: args.concurrency,
        fail_rate: args.fail_rate,
        completed: count(WorkflowStatus::Completed),
        compensated: count(WorkflowStatus::Compensated),
        failed: count(WorkflowStatus::Failed),
        compensation_failed: count(WorkflowStatus::CompensationFailed),
        stuck: outcomes.iter().filter(|(o, _, _)| o.is_none()).count() as u64,
        declined: outcomes.iter().filter(|(_, d, _)| *d).count() as u64,
        compensations: totals.releases,
        step_executions: totals.executions,
        duplicate_effects: totals.duplicates,
        stale_runs: totals.stale_runs,
        redelivered_runs: totals.redelivered_runs,
        seconds,
        workflows_per_sec: args.workflows as f64 / seconds,
        // Five steps per workflow (docs/benchmarks.md); compensations are not steps.
        steps_per_sec: args.workflows as f64 * 5.0 / seconds,
        latency_p50_ms: percentile(&latencies, 50.0),
        latency_p99_ms: percentile(&latencies, 99.0),
        peak_rss_mb: peak_rss_mb(),
        exported: metrics_server.as_ref().and_then(|_| Exported::read()),
    };
    let ok = report.completed + report.compensated == report.workflows
        && report.stuck == 0
        && report.compensations == report.declined
        && report.duplicate_effects == 0;
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
            "completed {} + compensated {} of {}; stuck {}; declined {}, compensations {}; step executions {}, duplicate effects {}, stale runs {}, redelivered runs {}",
            report.completed,
            report.compensated,
            report.workflows,
            report.stuck,
            report.declined,
            report.compensations,
            report.step_executions,
            report.duplicate_effects,
            report.stale_runs,
            report.redelivered_runs
        );
    }
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if !ok {
        eprintln!("error: the run was not correct (see the counts above)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_runs_duplicates_stale_runs_and_redeliveries() {
        let (t1, t2) = (TransactionId::new(), TransactionId::new());
        let field = |key: &str, tx: TransactionId, rest: &str, n: u64| {
            (
                format!("{} {tx}/{rest}", key.replace("T", &tx.to_string())),
                n,
            )
        };
        let records = Records::from_fields(
            [
                field("T/validate/forward", t1, "validate/forward/1", 1),
                // Redelivered: two runs of the settling attempt, one effect.
                field("T/reserve/forward", t1, "reserve/forward/1", 2),
                // Attempt 1 was given up on; attempt 2 settled the step. Under a
                // key per attempt, the effect is applied twice: a duplicate.
                field("T/charge/forward/1", t1, "charge/forward/1", 1),
                field("T/charge/forward/2", t1, "charge/forward/2", 1),
                field("T/reserve/compensate", t1, "reserve/compensate/1", 1),
                // Not finished: not judged.
                field("T/validate/forward", t2, "validate/forward/1", 3),
            ]
            .into_iter()
            .collect(),
        );
        let effect = |step: &str, phase| (t1, StepName::from(step), phase);
        assert_eq!(
            records
                .applied(&effect("reserve", Phase::Forward))
                .expect("recorded"),
            1
        );
        assert_eq!(
            records
                .applied(&effect("charge", Phase::Forward))
                .expect("recorded"),
            2
        );
        let mut records = records;
        // By step index: validate, reserve, charge (invoice and notify did not run).
        records.settle(t1, [(1, 0), (1, 1), (2, 0), (0, 0), (0, 0)]);
        assert_eq!(
            totals(&records),
            Totals {
                executions: 9,
                duplicates: 1,
                releases: 1,
                stale_runs: 1,
                redelivered_runs: 1,
            }
        );
    }

    #[test]
    fn runs_logged_in_process_count_as_the_same_runs_read_from_a_server() {
        let (t1, t2) = (TransactionId::new(), TransactionId::new());
        let run = |tx: TransactionId, key: &str, step: &str, phase, attempt: u32| LocalRun {
            tx,
            key: hash64(&key.replace("T", &tx.to_string())),
            attempt,
            slot: slot_of(step, phase).expect("a bench step") as u8,
        };
        use Phase::{Compensate, Forward};
        // The runs of the test above, one entry a run, out of order; a
        // workflow is in one log only.
        let first = vec![
            run(t2, "T/validate/forward", "validate", Forward, 1),
            run(t2, "T/validate/forward", "validate", Forward, 1),
            run(t2, "T/validate/forward", "validate", Forward, 1),
        ];
        let second = vec![
            run(t1, "T/charge/forward/1", "charge", Forward, 1),
            run(t1, "T/reserve/forward", "reserve", Forward, 1),
            run(t1, "T/reserve/compensate", "reserve", Compensate, 1),
            run(t1, "T/charge/forward/2", "charge", Forward, 2),
            run(t1, "T/validate/forward", "validate", Forward, 1),
            run(t1, "T/reserve/forward", "reserve", Forward, 1),
        ];
        let mut logs = vec![first, second];
        for log in &mut logs {
            log.sort_by_key(|r| r.tx);
        }
        let mut records = Records {
            logs,
            ..Default::default()
        };
        records.settle_all(vec![(t1, [(1, 0), (1, 1), (2, 0), (0, 0), (0, 0)])]);
        assert_eq!(
            totals(&records),
            Totals {
                executions: 9,
                duplicates: 1,
                releases: 1,
                stale_runs: 1,
                redelivered_runs: 1,
            }
        );
        // Unsettled, nothing is judged stale or redelivered.
        records.settled.clear();
        let unsettled = totals(&records);
        assert_eq!(
            (
                unsettled.executions,
                unsettled.stale_runs,
                unsettled.redelivered_runs
            ),
            (9, 0, 0)
        );
    }

    #[test]
    fn runs_of_a_step_the_bench_does_not_have_are_counted_not_left_out() {
        let t = TransactionId::new();
        let records = Records::from_fields(
            [
                (format!("k1 {t}/audit/forward/1"), 2),
                (format!("k2 {t}/audit/forward/1"), 1),
                (format!("k3 {t}/validate/forward/1"), 1),
            ]
            .into_iter()
            .collect(),
        );
        assert_eq!(
            records.applied(&(t, StepName::from("audit"), Phase::Forward)),
            Some(2)
        );
        let totals = totals(&records);
        assert_eq!((totals.executions, totals.duplicates), (4, 1));
    }
}

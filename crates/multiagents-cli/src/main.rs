//! The `multiagents` command.

mod bench;
mod bench_http;
mod bench_runs;
mod bench_shape;
mod error;
mod init;
mod remote;
mod runs;
mod takeover;
mod workflow;

// The bench measures the framework, not glibc's malloc: a saga step makes a
// few dozen small allocations across threads, where mimalloc is markedly faster.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// multiagents: fault-tolerant multi-step workflows (sagas) — benchmarks and operations.
#[derive(Parser, Debug)]
#[command(name = "multiagents", version, about, long_about = None)]
struct Cli {
    /// Monitoring settings (YAML or JSON; see docs/monitoring.md). The
    /// MULTIAGENTS_LOG_* and other MULTIAGENTS_* variables override it. The
    /// command logs warnings and errors to stderr unless told otherwise.
    #[arg(long, global = true, value_name = "FILE")]
    monitoring: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service until SIGINT or SIGTERM: the HTTP API and an
    /// orchestrator, embedded (a file store, no server needed) or on Redis
    /// (`--redis-url`, where several replicas share the work). Workflow
    /// definitions come from the store (`POST /v1/definitions`).
    Serve(ServeArgs),
    /// Worker health: per worker type and process, calls, failures, rates,
    /// durations and the latest errors, from the heartbeats in Redis.
    Workers(workflow::WorkersArgs),
    /// Operations on workflows: deploy, start, list, status, signal,
    /// cancel, retry; on a service (`--server`) or straight on Redis.
    Workflow {
        #[command(subcommand)]
        command: workflow::WorkflowCommand,
    },
    /// Dead letters: list, show, redrive (one, or all that match, with a dry
    /// run first), discard; on a service (`--server`) or straight on Redis.
    Dlq {
        #[command(subcommand)]
        command: runs::DlqCommand,
    },
    /// A new project from a template: a workflow YAML, its workers and a
    /// README, that `cargo run` builds and runs.
    Init(init::InitArgs),
    /// API keys for `serve --api-keys`: `keys new NAME --scopes read,operate`
    /// prints a fresh key once, and the line of the keys file that accepts it.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Run a benchmark workload and report throughput, latency and memory.
    Bench {
        #[command(subcommand)]
        workload: bench::Workload,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// A fresh random key. The key is printed once, on stdout; the line for
    /// the keys file (`NAME SCOPES SHA256HEX`, no key in it) on stderr, or
    /// appended to `--file`.
    New {
        /// The key's name, shown in the audit log.
        name: String,
        /// Comma-separated: read, operate, admin, worker.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<multiagents_server::Scope>,
        /// Append the line to this keys file.
        #[arg(long, value_name = "FILE")]
        file: Option<std::path::PathBuf>,
    },
}

fn keys(command: KeysCommand) -> error::Result<std::process::ExitCode> {
    let KeysCommand::New { name, scopes, file } = command;
    let (key, line) = multiagents_server::ApiKeys::generate(&name, &scopes)
        .map_err(|problem| error::CliError::usage("NAME", problem))?;
    match file {
        Some(path) => {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| error::CliError::Read {
                    path: path.clone(),
                    source,
                })?;
            writeln!(f, "{line}").map_err(|source| error::CliError::Read {
                path: path.clone(),
                source,
            })?;
            eprintln!(
                "added key `{name}` to {}; it is shown once:",
                path.display()
            );
        }
        None => eprintln!("add this line to the keys file; the key below is shown once:\n{line}"),
    }
    println!("{key}");
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Serve the HTTP API (and `/metrics`, `/healthz`, `/readyz`) here.
    /// Without API keys, only a loopback address is allowed.
    #[arg(long, default_value = multiagents_server::DEFAULT_LISTEN, value_name = "ADDR")]
    listen: String,
    /// Require API keys: a file of `NAME SCOPES SHA256HEX` lines (make
    /// them with `multiagents keys new`). Every route but /healthz and
    /// /readyz then needs `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE")]
    api_keys: Option<std::path::PathBuf>,
    /// Listen on a non-loopback address without API keys: anyone who can
    /// reach it may start, cancel and repair workflows.
    #[arg(long)]
    allow_unauthenticated: bool,
    /// The longest a request may wait (`?wait=`, a task poll's `wait_ms`);
    /// longer waits end at it. Keep it under the timeouts of the proxies in
    /// front.
    #[arg(long, default_value = "5m", value_parser = multiagents::core::time::parse_duration)]
    max_wait: std::time::Duration,
    /// On Redis: keep status changes in the replica that made them (one
    /// Pub/Sub message less per step), so that a replica's `/v1/events`
    /// shows only the runs its own orchestrator moved.
    #[arg(long)]
    local_status: bool,
    /// How long an HTTP worker keeps a task without a heartbeat or an
    /// answer; then its command goes back to the bus for another worker.
    #[arg(long, default_value = "30s", value_parser = multiagents::core::time::parse_duration)]
    task_lease: std::time::Duration,
    /// Embedded mode (no `--redis-url` or `--database-url`): the file holding the state.
    #[arg(long, default_value = ".multiagents/store.db", value_name = "PATH")]
    store: std::path::PathBuf,
    /// Run on Redis instead of embedded: `redis://[user:password@]host:port/db`,
    /// or `rediss://…` for TLS. Several replicas share the work.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// A PEM file of CA certificates to trust, for a `rediss://` server.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PEM")]
    redis_ca_file: Option<std::path::PathBuf>,
    /// Key prefix in Redis.
    #[arg(long, default_value = "ma")]
    prefix: String,
    /// Run on PostgreSQL instead of embedded:
    /// `postgres://[user[:password]@]host[:port]/database`. Alone, it is
    /// the bus and the store, and the service needs nothing else; with
    /// `--redis-url`, Redis is the bus and PostgreSQL the store. Several
    /// replicas share the work.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// A PEM file of CA certificates to trust, for PostgreSQL over TLS; with it,
    /// `sslmode=prefer` and `require` check the server's chain as `verify-ca` does.
    #[arg(long, value_name = "PEM")]
    database_ca_file: Option<std::path::PathBuf>,
    /// The PostgreSQL schema holding the tables, created if missing.
    #[arg(long, default_value = "multiagents")]
    schema: String,
    /// Result consumers in this process: default 16, or 64 with
    /// `--database-url` (a PostgreSQL commit takes longer than a Redis
    /// write: more batches in flight share the commits).
    #[arg(long)]
    consumers: Option<usize>,
    /// This process's name among the orchestrators.
    #[arg(long)]
    instance: Option<String>,
    /// How long a result or command may go without being acked or
    /// extended (its process died, say) before another process takes it
    /// over; live processes extend what they hold every five eighths of it. Also
    /// the lease of a timer being fired.
    #[arg(long, default_value = "1500ms", value_parser = multiagents::core::time::parse_duration)]
    visibility_timeout: std::time::Duration,
    /// Commands of steps in flight for this long without any change are
    /// published again (heals a crash between persisting a transition and
    /// publishing its commands).
    #[arg(long, default_value = "30s", value_parser = multiagents::core::time::parse_duration)]
    redispatch_after: std::time::Duration,
    /// Also serve Prometheus `/metrics` and `/healthz` on this address
    /// (overrides `metrics.prometheus_addr` of the monitoring settings).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

async fn serve(
    args: ServeArgs,
    monitoring: &multiagents::monitoring::MonitoringConfig,
) -> error::Result<std::process::ExitCode> {
    use multiagents::bus::{Bus, MemoryBus, RedisStreamsBus};
    use multiagents::store::{FileStore, RedisStateStore, Store};
    let listen: std::net::SocketAddr = args.listen.parse().map_err(|e| {
        error::CliError::usage(
            "--listen",
            format!("`{}` is not host:port: {e}", args.listen),
        )
    })?;
    let keys = match &args.api_keys {
        Some(path) => {
            let keys = multiagents_server::ApiKeys::load(path)
                .map_err(|e| error::CliError::usage("--api-keys", e.to_string()))?;
            if keys.is_empty() {
                return Err(error::CliError::usage(
                    "--api-keys",
                    format!(
                        "{} holds no key; add one with `multiagents keys new NAME --scopes admin --file {}`",
                        path.display(),
                        path.display()
                    ),
                ));
            }
            Some(keys)
        }
        None => None,
    };
    if !listen.ip().is_loopback() && keys.is_none() && !args.allow_unauthenticated {
        return Err(error::CliError::usage(
            "--listen",
            format!(
                "{listen} is not a loopback address and no --api-keys are given: \
                 anyone on the network could start and cancel workflows. \
                 Give --api-keys FILE, or --allow-unauthenticated if that is what you want"
            ),
        ));
    }
    // Before anything records a metric: handles bind to the recorder.
    let http = args
        .http
        .clone()
        .or_else(|| monitoring.metrics.prometheus_addr.clone())
        .filter(|_| monitoring.metrics.enabled);
    let _metrics = match http {
        Some(addr) => {
            let server = multiagents::monitoring::metrics::serve_metrics(
                &addr,
                std::sync::Arc::new(|| Ok(())),
            )
            .await?;
            eprintln!("metrics on http://{}/metrics", server.addr);
            Some(server)
        }
        None => {
            multiagents::monitoring::metrics::install_prometheus()?;
            None
        }
    };
    let shared = workflow::RedisArgs {
        redis_url: args.redis_url.clone(),
        redis_ca_file: args.redis_ca_file.clone(),
        prefix: args.prefix.clone(),
        database_url: args.database_url.clone(),
        database_ca_file: args.database_ca_file.clone(),
        schema: args.schema.clone(),
    };
    let (bus, store, place): (Bus, Store, String) = match (&args.redis_url, &args.database_url) {
        (None, Some(_)) => {
            let bus = multiagents::bus::PostgresBus::connect(
                shared
                    .postgres_bus_config()
                    .visibility_timeout(args.visibility_timeout),
            )
            .await?;
            let mut store_config = shared.postgres_config();
            store_config.timer_lease = args.visibility_timeout;
            let store = multiagents::store::PostgresStateStore::connect(store_config).await?;
            // A transition's commands commit with its state.
            store.carry_events_of(&bus)?;
            (Bus::new(bus), store.into(), shared.place())
        }
        (Some(_), _) => {
            let redis = shared;
            let mut bus_config = redis
                .bus_config()
                .visibility_timeout(args.visibility_timeout);
            // Every replica's status changes reach every replica's event
            // streams (`/v1/events`), whichever orchestrator made them.
            bus_config.broadcast_status = !args.local_status;
            let bus = RedisStreamsBus::connect(bus_config).await?;
            // Listening only once other replicas' status changes arrive.
            if !bus
                .status_subscribed(std::time::Duration::from_secs(10))
                .await
            {
                tracing::warn!(address = %redis.address(), "the status subscription is not up yet; this replica's /v1/events may miss other replicas' changes until it is");
            }
            let store: Store = if args.database_url.is_some() {
                let mut store_config = redis.postgres_config();
                store_config.timer_lease = args.visibility_timeout;
                multiagents::store::PostgresStateStore::connect(store_config)
                    .await?
                    .into()
            } else {
                let mut store_config = redis.store_config();
                store_config.timer_lease = args.visibility_timeout;
                RedisStateStore::connect(store_config).await?.into()
            };
            let place = match &args.database_url {
                Some(_) => format!(
                    "{} (prefix {}), state in {}",
                    redis.address(),
                    args.prefix,
                    redis.place()
                ),
                None => redis.place(),
            };
            (bus.into(), store, place)
        }
        (None, None) => {
            if let Some(dir) = args.store.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| error::CliError::Read {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let store = FileStore::open(&args.store)?;
            let bus = MemoryBus::with_config(multiagents::bus::MemoryBusConfig {
                visibility_timeout: args.visibility_timeout,
                ..Default::default()
            });
            (
                bus.into(),
                store.into(),
                format!("{} (embedded)", args.store.display()),
            )
        }
    };
    let mut config = multiagents::OrchestratorConfig {
        consumers: args
            .consumers
            .unwrap_or(if args.database_url.is_some() { 64 } else { 16 }),
        parallel_results: true,
        redispatch_on_start: args.redis_url.is_none() && args.database_url.is_none(),
        redispatch_after: Some(args.redispatch_after),
        ..Default::default()
    };
    if let Some(name) = args.instance {
        config.instance = name;
    }
    let runtime = multiagents::Runtime::builder()
        .bus(bus.clone())
        .store(store.clone())
        .external_workers()
        .orchestrator_config(config)
        .start()
        .await?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        error::CliError::process(
            "the API listener",
            format!("cannot listen on {listen}: {e}"),
        )
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| error::CliError::process("the API listener", e))?;
    let tasks = multiagents_server::TaskOptions {
        lease: args.task_lease,
        ..Default::default()
    };
    let mut service = multiagents_server::Service::with_tasks(runtime.client(), bus, store, tasks)
        .with_max_wait(args.max_wait);
    let access = match keys {
        Some(keys) => {
            let access = format!("{} API key(s) required", keys.len());
            service = service.with_api_keys(keys);
            access
        }
        None if bound.ip().is_loopback() => "loopback only, no API keys".to_string(),
        None => "NO API KEYS: anyone who can reach it may use it".to_string(),
    };
    let api = tokio::spawn(multiagents_server::serve(
        listener,
        service,
        bench::stopped(),
    ));
    eprintln!(
        "multiagents serving http://{bound} on {place}; {access}; stop with Ctrl-C or SIGTERM"
    );
    eprintln!("the dashboard: http://{bound}/ui/");
    let served = api.await;
    eprintln!("stopping");
    runtime.shutdown().await;
    match served {
        Ok(Ok(())) => Ok(std::process::ExitCode::SUCCESS),
        Ok(Err(e)) => Err(error::CliError::process("the API server", e)),
        Err(e) => Err(error::CliError::process("the API server", e)),
    }
}

/// Transparent huge pages back a sparse heap (many small states, kept for
/// their retention time) with 2 MiB pages: 20,000 finished orders in memory
/// peak at 104 MiB with them and 90 without (docs/benchmarks.md). This process does
/// without them, unless `MIMALLOC_ALLOW_THP` (mimalloc's own switch) says
/// otherwise.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Not allowed (a seccomp profile, say): the pages stay as they are.
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

fn main() -> std::process::ExitCode {
    without_huge_pages();
    let cli = Cli::parse();
    // A tool: quiet below warnings, and its stdout is its output.
    let mut base = multiagents::monitoring::MonitoringConfig::default();
    base.logging.level = "warn".into();
    base.logging.console_min_level = "warn".into();
    let monitoring = match base.overlay(cli.monitoring.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = multiagents::monitoring::init_logging(
        &monitoring.logging,
        multiagents::monitoring::ConsoleStreams::Stderr,
    ) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Spans to `tracing.otlp_endpoint` (MULTIAGENTS_OTLP_ENDPOINT), flushed on the way out.
        let tracing = multiagents::monitoring::otel::init_tracing(&monitoring.tracing)
            .map_err(error::CliError::from)?;
        let result = match cli.command {
            Command::Bench { workload } => bench::run(workload, &monitoring).await,
            Command::Serve(args) => serve(args, &monitoring).await,
            Command::Keys { command } => keys(command),
            Command::Dlq { command } => runs::dlq(command).await,
            Command::Init(args) => init::init(args),
            Command::Workflow { command } => workflow::run(command).await,
            Command::Workers(args) => workflow::workers(args, &monitoring).await,
        };
        if let Some(guard) = tracing {
            tokio::task::spawn_blocking(move || guard.shutdown())
                .await
                .ok();
        }
        result
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

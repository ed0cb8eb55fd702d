//! The `multiagents` command.

mod bench;
mod error;
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
    /// Run an orchestrator against Redis until SIGINT or SIGTERM. Several may
    /// run at once and share the work; workflow definitions come from the
    /// store (registered by the code that starts workflows).
    Serve(ServeArgs),
    /// Worker health: per worker type and process, calls, failures, rates,
    /// durations and the latest errors, from the heartbeats in Redis.
    Workers(workflow::WorkersArgs),
    /// Operations on workflows: `deploy` definitions, `status` of one.
    Workflow {
        #[command(subcommand)]
        command: workflow::WorkflowCommand,
    },
    /// Run a benchmark workload and report throughput, latency and memory.
    Bench {
        #[command(subcommand)]
        workload: bench::Workload,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    redis: workflow::RedisArgs,
    /// Result consumers in this process.
    #[arg(long, default_value_t = 16)]
    consumers: usize,
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
    /// Serve Prometheus `/metrics` and `/healthz` on this address (overrides
    /// `metrics.prometheus_addr` of the monitoring settings).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

async fn serve(
    args: ServeArgs,
    monitoring: &multiagents::monitoring::MonitoringConfig,
) -> error::Result<std::process::ExitCode> {
    use multiagents::bus::RedisStreamsBus;
    use multiagents::store::RedisStateStore;
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
        None => None,
    };
    let bus = RedisStreamsBus::connect(
        args.redis
            .bus_config()
            .visibility_timeout(args.visibility_timeout),
    )
    .await?;
    let mut store_config = args.redis.store_config();
    store_config.timer_lease = args.visibility_timeout;
    let store = RedisStateStore::connect(store_config).await?;
    let mut config = multiagents::OrchestratorConfig {
        consumers: args.consumers,
        parallel_results: true,
        redispatch_on_start: false,
        redispatch_after: Some(args.redispatch_after),
        ..Default::default()
    };
    if let Some(name) = args.instance {
        config.instance = name;
    }
    let runtime = multiagents::Runtime::builder()
        .bus(bus)
        .store(store)
        .external_workers()
        .orchestrator_config(config)
        .start()
        .await?;
    eprintln!(
        "orchestrator serving {} (prefix {}); stop with Ctrl-C or SIGTERM",
        args.redis.address(),
        args.redis.prefix
    );
    bench::stopped().await;
    eprintln!("stopping");
    runtime.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

fn main() -> std::process::ExitCode {
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

//! `multiagents workflow …`: operations on workflow definitions.

use std::path::PathBuf;
use std::process::ExitCode;

use multiagents::store::{Definitions, RedisStateStore, RedisStoreConfig, Store};
use multiagents::{Error, WorkflowDefinition};

use crate::error::{CliError, Result};

/// Where the state lives.
#[derive(clap::Args, Debug, Clone)]
pub struct RedisArgs {
    /// The Redis server (or any node of a Redis Cluster) holding the state:
    /// `redis://[user:password@]host:port/db`, or `rediss://…` for TLS.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// `rediss://` server.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PEM")]
    pub redis_ca_file: Option<PathBuf>,
    /// Key prefix in Redis.
    #[arg(long, default_value = "ma")]
    pub prefix: String,
}

impl RedisArgs {
    async fn store(&self) -> Result<RedisStateStore, Error> {
        Ok(RedisStateStore::connect(self.store_config()).await?)
    }

    /// The store's configuration for this Redis.
    pub fn store_config(&self) -> RedisStoreConfig {
        let config = RedisStoreConfig::new(&self.redis_url).prefix(&self.prefix);
        match &self.redis_ca_file {
            Some(path) => config.ca_file(path),
            None => config,
        }
    }

    /// The bus's configuration for this Redis.
    pub fn bus_config(&self) -> multiagents::bus::RedisBusConfig {
        let config = multiagents::bus::RedisBusConfig::new(&self.redis_url).prefix(&self.prefix);
        match &self.redis_ca_file {
            Some(path) => config.ca_file(path),
            None => config,
        }
    }

    /// The server's address without the password, for messages.
    pub fn address(&self) -> String {
        multiagents::redis::redacted(&self.redis_url)
    }
}

/// What to do with workflow definitions.
#[derive(clap::Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Register definitions (JSON, or YAML for `.yaml`/`.yml` files) in the
    /// store, so that any orchestrator replica can run them. Registering the
    /// same name and version again with the same steps is a no-op; with other
    /// steps it is refused: bump the version instead. Workflows already
    /// running stay on the version they started with.
    Deploy(DeployArgs),
    /// Draw a definition, from a file (JSON/YAML) or by name from the store:
    /// the step graph, parallel groups, conditions, fan-outs, sleeps, signal
    /// waits, sub-workflows, workers, retries, timeouts and compensations.
    Diagram(DiagramArgs),
    /// Cancel a running workflow: the steps it completed are compensated and
    /// it ends `cancelled`. Needs no orchestrator of its own: the running
    /// orchestrators and workers carry it out.
    Cancel(CancelArgs),
    /// Send a signal to a running workflow: the step waiting for it (a human
    /// approval, say) completes with the data as its output. A signal sent
    /// before the step waits is kept for it.
    Signal(SignalArgs),
    /// Print one workflow's step timeline and each command's lifecycle
    /// (dispatch → pickup → processing → outcome, and which worker process).
    Status(StatusArgs),
    /// Start a run: `start NAME --input JSON [--wait 30s]
    /// [--idempotency-key K]`; with `--wait`, the outcome.
    Start(crate::runs::StartArgs),
    /// List runs, newest first, by status, workflow or request chain.
    List(crate::runs::ListArgs),
    /// Retry a failed, compensated, timed-out or cancelled run as a new run
    /// that keeps what stands: `retry ID [--from STEP] [--patch JSON]`.
    Retry(crate::runs::RetryArgs),
}

/// How to draw.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DiagramFormat {
    /// A Mermaid flowchart (paste into Markdown, GitHub renders it).
    Mermaid,
    /// Plain text for a terminal.
    Ascii,
}

#[derive(clap::Args, Debug)]
pub struct DiagramArgs {
    /// A definition file, or the name of a definition registered in Redis.
    definition: String,
    /// The drawing.
    #[arg(long, value_enum, default_value_t = DiagramFormat::Ascii)]
    format: DiagramFormat,
    /// The version to draw, for a name (the latest when absent).
    #[arg(long)]
    version: Option<u32>,
    #[command(flatten)]
    redis: RedisArgs,
}

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The workflow's transaction id.
    id: String,
    /// Why, kept in its history.
    #[arg(long, default_value = "cancelled from the command line")]
    reason: String,
    /// Wait this long for it to finish compensating (e.g. `30s`).
    #[arg(long, value_parser = multiagents::core::time::parse_duration)]
    wait: Option<std::time::Duration>,
    #[command(flatten)]
    server: crate::remote::ServerArgs,
    #[command(flatten)]
    redis: RedisArgs,
}

#[derive(clap::Args, Debug)]
pub struct SignalArgs {
    /// The workflow's transaction id.
    id: String,
    /// The signal's name (what the step waits for).
    name: String,
    /// Its payload, as JSON (`null` when absent).
    #[arg(long, default_value = "null")]
    data: String,
    #[command(flatten)]
    server: crate::remote::ServerArgs,
    #[command(flatten)]
    redis: RedisArgs,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The workflow's transaction id.
    id: String,
    #[command(flatten)]
    redis: RedisArgs,
    /// Print the state and lifecycles as JSON instead.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Definition files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    server: crate::remote::ServerArgs,
    #[command(flatten)]
    redis: RedisArgs,
}

pub async fn run(command: WorkflowCommand) -> Result<ExitCode> {
    match command {
        WorkflowCommand::Deploy(args) => deploy(args).await,
        WorkflowCommand::Status(args) => status(args).await,
        WorkflowCommand::Diagram(args) => diagram(args).await,
        WorkflowCommand::Cancel(args) => cancel(args).await,
        WorkflowCommand::Signal(args) => signal(args).await,
        WorkflowCommand::Start(args) => crate::runs::start(args).await,
        WorkflowCommand::List(args) => crate::runs::list(args).await,
        WorkflowCommand::Retry(args) => crate::runs::retry(args).await,
    }
}

/// Reads a definition file, checking it as the builder does.
pub fn read_definition(path: &std::path::Path) -> Result<WorkflowDefinition> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let parsed = if yaml {
        WorkflowDefinition::from_yaml(&text)
    } else {
        WorkflowDefinition::from_json(&text)
    };
    parsed.map_err(|source| CliError::Definition {
        path: path.to_path_buf(),
        source,
    })
}

async fn deploy(args: DeployArgs) -> Result<ExitCode> {
    // Check every file before registering any.
    let definitions = args
        .files
        .iter()
        .map(|f| read_definition(f))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(http) = server(&args.server)? {
        for def in &definitions {
            let body = serde_json::to_value(def).unwrap_or_default();
            http.post("/v1/definitions", &body, std::time::Duration::ZERO)
                .await?;
            println!("deployed {}@{}", def.name(), def.version());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let store = args.redis.store().await?;
    // Sub-workflows that would start each other in a cycle are refused: look
    // at these definitions and every child they reach, here or registered.
    let mut known = definitions.clone();
    let mut queue: Vec<String> = definitions
        .iter()
        .flat_map(|d| d.children().map(|c| c.workflow.to_string()))
        .collect();
    while let Some(name) = queue.pop() {
        if known.iter().any(|d| d.name().as_str() == name) {
            continue;
        }
        if let Some(def) = store.latest_definition(&name).await? {
            queue.extend(def.children().map(|c| c.workflow.to_string()));
            known.push(def);
        }
    }
    if let Some(cycle) = multiagents::core::workflow::child_cycle(&known) {
        return Err(CliError::Refused(format!(
            "nothing deployed: workflows would start each other as sub-workflows in a cycle, which would never end: {}",
            cycle.join(" → ")
        )));
    }
    for def in &definitions {
        store.put_definition(def).await?;
        println!("deployed {}@{}", def.name(), def.version());
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(args: StatusArgs) -> Result<ExitCode> {
    use multiagents::monitoring::lifecycles;
    let tx: multiagents::TransactionId = args.id.parse().map_err(|e| {
        CliError::usage(
            "<ID>",
            format!("`{}` is not a transaction id: {e}", args.id),
        )
    })?;
    let store: Store = args.redis.store().await?.into();
    let Some(current) = store.states.get(tx).await? else {
        eprintln!(
            "no workflow {tx} in {} (prefix {}); it may have expired",
            args.redis.address(),
            args.redis.prefix
        );
        return Ok(ExitCode::FAILURE);
    };
    let state = &current.state;
    let commands = lifecycles(state);
    if args.json {
        let out = serde_json::json!({ "state": &**state, "lifecycles": commands });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", multiagents::timeline::render(state));
    println!();
    println!(
        "{:<16} {:<10} {:>3}  {:>9} {:>9} {:>9}  {:<10} worker process",
        "step", "phase", "try", "queued", "working", "total", "outcome"
    );
    let ms = |d: Option<std::time::Duration>| {
        d.map_or("-".to_string(), |d| {
            format!("{:.1}ms", d.as_secs_f64() * 1000.0)
        })
    };
    for l in &commands {
        println!(
            "{:<16} {:<10} {:>3}  {:>9} {:>9} {:>9}  {:<10} {}",
            l.step.as_str(),
            l.phase.to_string(),
            l.attempt,
            ms(l.queued()),
            ms(l.processing()),
            ms(l.total()),
            serde_json::to_value(&l.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            l.instance.as_deref().unwrap_or("-"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `multiagents workers`: the worker health table.
#[derive(clap::Args, Debug)]
pub struct WorkersArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Print the report as JSON instead.
    #[arg(long)]
    json: bool,
}

pub async fn workers(
    args: WorkersArgs,
    monitoring: &multiagents::monitoring::MonitoringConfig,
) -> Result<ExitCode> {
    use multiagents::monitoring::WorkerMonitor;
    let store = args.redis.store().await?;
    let report = WorkerMonitor::new(store, monitoring.worker_monitoring.clone())
        .report()
        .await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if report.is_empty() {
        println!(
            "no worker heartbeats in {} (prefix {}) within the retention",
            args.redis.address(),
            args.redis.prefix
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<22} {:<20} {:<9} {:>9} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "worker", "instance", "health", "ok", "failed", "fail%", "calls/s", "p50", "p95", "p99"
    );
    let row = |worker: &str,
               instance: &str,
               health: &str,
               ok: u64,
               failed: u64,
               rate: f64,
               cps: f64,
               d: &multiagents::monitoring::events::Percentiles| {
        println!(
            "{:<22} {:<20} {:<9} {:>9} {:>7} {:>5.1}% {:>8.1} {:>6.2}ms {:>6.2}ms {:>6.2}ms",
            worker,
            instance,
            health,
            ok,
            failed,
            rate * 100.0,
            cps,
            d.p50,
            d.p95,
            d.p99
        );
    };
    for t in &report {
        row(
            &t.worker,
            "(all)",
            t.health.as_str(),
            t.succeeded,
            t.failed,
            t.failure_rate,
            t.calls_per_second,
            &t.duration_ms,
        );
        for i in &t.instances {
            let b = &i.heartbeat;
            row(
                "",
                &b.instance,
                i.health.as_str(),
                b.succeeded,
                b.failed,
                i.failure_rate,
                i.calls_per_second,
                &i.duration_ms,
            );
        }
        for e in t.errors.iter().take(3) {
            println!("{:<22}   {} × {}: {}", "", e.count, e.kind, e.last_message);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn diagram(args: DiagramArgs) -> Result<ExitCode> {
    use multiagents::core::workflow::diagram;
    let path = std::path::Path::new(&args.definition);
    let def = if path.is_file() {
        read_definition(path)?
    } else {
        let store = args.redis.store().await?;
        let found = match args.version {
            Some(v) => store.get_definition(&args.definition, v).await?,
            None => store.latest_definition(&args.definition).await?,
        };
        found.ok_or_else(|| {
            CliError::NotFound(format!(
                "`{}` is neither a file nor a definition registered in {} (prefix {}){}",
                args.definition,
                args.redis.address(),
                args.redis.prefix,
                args.version
                    .map(|v| format!(" at version {v}"))
                    .unwrap_or_default()
            ))
        })?
    };
    print!(
        "{}",
        match args.format {
            DiagramFormat::Mermaid => diagram::mermaid(&def),
            DiagramFormat::Ascii => diagram::ascii(&def),
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn transaction_id(id: &str) -> Result<multiagents::TransactionId> {
    id.parse()
        .map_err(|e| CliError::usage("<ID>", format!("`{id}` is not a transaction id: {e}")))
}

impl RedisArgs {
    /// A client on this Redis.
    async fn client(&self) -> Result<multiagents::Client, Error> {
        use multiagents::bus::RedisStreamsBus;
        let bus = RedisStreamsBus::connect(self.bus_config()).await?;
        let store = self.store().await?;
        Ok(multiagents::Client::new(bus, store))
    }
}

async fn signal(args: SignalArgs) -> Result<ExitCode> {
    let tx = transaction_id(&args.id)?;
    let data: serde_json::Value = serde_json::from_str(&args.data)
        .map_err(|e| CliError::usage("--data", format!("`{}` is not JSON: {e}", args.data)))?;
    if let Some(http) = server(&args.server)? {
        http.post(
            &format!(
                "/v1/runs/{tx}/signals/{}",
                crate::remote::encode(&args.name)
            ),
            &data,
            std::time::Duration::ZERO,
        )
        .await?;
        println!("{tx}: signal `{}` delivered", args.name);
        return Ok(ExitCode::SUCCESS);
    }
    let client = args.redis.client().await?;
    client.signal(tx, &args.name, &data).await?;
    println!("{tx}: signal `{}` delivered", args.name);
    Ok(ExitCode::SUCCESS)
}

async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let tx = transaction_id(&args.id)?;
    if let Some(http) = server(&args.server)? {
        let body = serde_json::json!({"reason": args.reason});
        let (_, answer) = http
            .post(
                &format!("/v1/runs/{tx}/cancel"),
                &body,
                std::time::Duration::ZERO,
            )
            .await?;
        if answer["cancelled"] == false {
            println!("{tx} has already finished or is compensating: nothing to cancel");
            return Ok(ExitCode::SUCCESS);
        }
        println!("{tx}: cancellation requested ({})", args.reason);
        if let Some(wait) = args.wait {
            let (_, outcome) = http
                .call(
                    "GET",
                    &format!("/v1/runs/{tx}/result?wait={}ms", wait.as_millis()),
                    None,
                    "application/json",
                    wait + std::time::Duration::from_secs(30),
                )
                .await?;
            println!("{tx} ended {}", outcome["status"].as_str().unwrap_or("?"));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let client = args.redis.client().await?;
    if !client.cancel(tx, &args.reason).await? {
        let status = client
            .status(tx)
            .await?
            .map(|s| s.status.to_string())
            .unwrap_or_default();
        println!("{tx} is already {status}: nothing to cancel");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{tx}: cancellation requested ({})", args.reason);
    if let Some(wait) = args.wait {
        let state = client.wait(tx, wait).await?;
        println!("{tx} ended {}", state.status);
    }
    Ok(ExitCode::SUCCESS)
}

/// The service to talk to, when one is named.
fn server(args: &crate::remote::ServerArgs) -> Result<Option<crate::remote::Http>> {
    let target = crate::remote::TargetArgs {
        server: args.clone(),
        redis: RedisArgs {
            redis_url: String::new(),
            redis_ca_file: None,
            prefix: String::new(),
        },
    };
    target.http()
}

//! `multiagents workflow …`: operations on workflow definitions.

use std::path::PathBuf;
use std::process::ExitCode;

use multiagents::store::{RedisStateStore, RedisStoreConfig, Store};
use multiagents::{Error, WorkflowDefinition};

use crate::error::{CliError, Result};

/// Where the state lives.
#[derive(clap::Args, Debug, Clone)]
pub struct RedisArgs {
    /// The Redis server (or any node of a Redis Cluster) holding the state:
    /// `redis://[user:password@]host:port/db`, or `rediss://…` for TLS.
    /// Default `redis://127.0.0.1:6379/` unless `--database-url` is given;
    /// with both, Redis is the bus and PostgreSQL the store.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// `rediss://` server.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PEM")]
    pub redis_ca_file: Option<PathBuf>,
    /// Key prefix in Redis.
    #[arg(long, default_value = "ma")]
    pub prefix: String,
    /// PostgreSQL holding the state (and, without `--redis-url`, the bus
    /// too): `postgres://[user[:password]@]host[:port]/database`.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// A PEM file of CA certificates to trust, for PostgreSQL over TLS; with it,
    /// `sslmode=prefer` and `require` check the server's chain as `verify-ca` does.
    #[arg(long, value_name = "PEM")]
    pub database_ca_file: Option<PathBuf>,
    /// The PostgreSQL schema holding the tables.
    #[arg(long, default_value = "multiagents")]
    pub schema: String,
}

/// Where Redis is when nothing says.
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/";

impl RedisArgs {
    /// The Redis to use: the one named, or the default when no PostgreSQL
    /// is named either; `None` for PostgreSQL alone.
    pub fn redis(&self) -> Option<&str> {
        match (&self.redis_url, &self.database_url) {
            (Some(url), _) => Some(url),
            (None, None) => Some(DEFAULT_REDIS),
            (None, Some(_)) => None,
        }
    }

    /// The store: PostgreSQL when named, else Redis.
    pub async fn store(&self) -> Result<Store, Error> {
        Ok(match &self.database_url {
            Some(_) => multiagents::store::PostgresStateStore::connect(self.postgres_config())
                .await?
                .into(),
            None => RedisStateStore::connect(self.store_config()).await?.into(),
        })
    }

    /// The bus: Redis when named (or nothing else is), else PostgreSQL.
    pub async fn bus(&self) -> Result<multiagents::bus::Bus, Error> {
        Ok(match self.redis() {
            Some(_) => multiagents::bus::RedisStreamsBus::connect(self.bus_config())
                .await?
                .into(),
            None => multiagents::bus::Bus::new(
                multiagents::bus::PostgresBus::connect(self.postgres_bus_config()).await?,
            ),
        })
    }

    /// The store's configuration for this Redis.
    pub fn store_config(&self) -> RedisStoreConfig {
        let config =
            RedisStoreConfig::new(self.redis().unwrap_or(DEFAULT_REDIS)).prefix(&self.prefix);
        match &self.redis_ca_file {
            Some(path) => config.ca_file(path),
            None => config,
        }
    }

    /// The bus's configuration for this Redis.
    pub fn bus_config(&self) -> multiagents::bus::RedisBusConfig {
        let config = multiagents::bus::RedisBusConfig::new(self.redis().unwrap_or(DEFAULT_REDIS))
            .prefix(&self.prefix);
        match &self.redis_ca_file {
            Some(path) => config.ca_file(path),
            None => config,
        }
    }

    /// The PostgreSQL store's configuration.
    pub fn postgres_config(&self) -> multiagents::store::PostgresStoreConfig {
        let config = multiagents::store::PostgresStoreConfig::new(
            self.database_url.as_deref().unwrap_or(""),
        )
        .schema(&self.schema);
        match &self.database_ca_file {
            Some(path) => config.ca_file(path),
            None => config,
        }
    }

    /// The PostgreSQL bus's configuration.
    pub fn postgres_bus_config(&self) -> multiagents::bus::PostgresBusConfig {
        let config =
            multiagents::bus::PostgresBusConfig::new(self.database_url.as_deref().unwrap_or(""))
                .schema(&self.schema);
        match &self.database_ca_file {
            Some(path) => config.ca_file(path),
            None => config,
        }
    }

    /// The store's server and its prefix or schema, without the password,
    /// for messages: `redis://host:6379/ (prefix ma)`.
    pub fn place(&self) -> String {
        match &self.database_url {
            Some(url) => format!(
                "{} (schema {})",
                multiagents::postgres::redacted(url),
                self.schema
            ),
            None => format!("{} (prefix {})", self.address(), self.prefix),
        }
    }

    /// The Redis server's address without the password, for messages.
    pub fn address(&self) -> String {
        multiagents::redis::redacted(self.redis().unwrap_or(DEFAULT_REDIS))
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
        if let Some(def) = store.definitions.latest_definition(&name).await? {
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
        store.definitions.put_definition(def).await?;
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
    let store: Store = args.redis.store().await?;
    let Some(current) = store.states.get(tx).await? else {
        eprintln!(
            "no workflow {tx} in {}; it may have expired",
            args.redis.place()
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
            "no worker heartbeats in {} within the retention",
            args.redis.place()
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
            Some(v) => {
                store
                    .definitions
                    .get_definition(&args.definition, v)
                    .await?
            }
            None => {
                store
                    .definitions
                    .latest_definition(&args.definition)
                    .await?
            }
        };
        found.ok_or_else(|| {
            CliError::NotFound(format!(
                "`{}` is neither a file nor a definition registered in {}{}",
                args.definition,
                args.redis.place(),
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
    /// A client on this bus and store.
    async fn client(&self) -> Result<multiagents::Client, Error> {
        Ok(multiagents::Client::new(
            self.bus().await?,
            self.store().await?,
        ))
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
            redis_url: None,
            redis_ca_file: None,
            prefix: String::new(),
            database_url: None,
            database_ca_file: None,
            schema: String::new(),
        },
    };
    target.http()
}

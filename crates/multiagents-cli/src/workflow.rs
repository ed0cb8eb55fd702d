//! `multiagents workflow …`: operations on workflow definitions.

use std::path::PathBuf;
use std::process::ExitCode;

use multiagents::store::{RedisStateStore, RedisStoreConfig, StateStore};
use multiagents::{Error, WorkflowDefinition};

/// What to do with workflow definitions.
#[derive(clap::Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Register definitions (JSON, or YAML for `.yaml`/`.yml` files) in the
    /// store, so that any orchestrator replica can run them. Registering the
    /// same name and version again with the same steps is a no-op; with other
    /// steps it is refused: bump the version instead. Workflows already
    /// running stay on the version they started with.
    Deploy(DeployArgs),
}

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Definition files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The Redis server (or any node of a Redis Cluster) holding the state.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Key prefix in Redis.
    #[arg(long, default_value = "ma")]
    prefix: String,
}

pub async fn run(command: WorkflowCommand) -> Result<ExitCode, Error> {
    match command {
        WorkflowCommand::Deploy(args) => deploy(args).await,
    }
}

/// Reads a definition file, checking it as the builder does.
pub fn read_definition(path: &std::path::Path) -> Result<WorkflowDefinition, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let parsed = if yaml {
        WorkflowDefinition::from_yaml(&text)
    } else {
        WorkflowDefinition::from_json(&text)
    };
    parsed.map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

async fn deploy(args: DeployArgs) -> Result<ExitCode, Error> {
    // Check every file before registering any.
    let definitions = args
        .files
        .iter()
        .map(|f| read_definition(f))
        .collect::<Result<Vec<_>, _>>()?;
    let store =
        RedisStateStore::connect(RedisStoreConfig::new(&args.redis_url).prefix(&args.prefix))
            .await?;
    for def in &definitions {
        store.put_definition(def).await?;
        println!("deployed {}@{}", def.name(), def.version());
    }
    Ok(ExitCode::SUCCESS)
}

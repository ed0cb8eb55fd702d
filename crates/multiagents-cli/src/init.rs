//! `multiagents init DIR`: a new project from a template, a worker, a
//! workflow YAML and a README, that builds and runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::error::{CliError, Result};

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The new project's directory (created; it must be empty if it exists).
    dir: PathBuf,
    /// The multiagents checkout the project depends on (by path); by default
    /// the one this command was built from.
    #[arg(long, value_name = "PATH")]
    framework: Option<PathBuf>,
}

const WORKFLOW: &str = r#"# The workflow: steps, their workers, and how each is undone.
# See docs/concepts.md and docs/workflows.md of multiagents.
name: greeting
version: 1
steps:
  - name: prepare
    worker: prepare_greeting
  - name: send
    worker: send_greeting
    compensation: retract_greeting
    retry: {max_attempts: 3, initial_delay: 100ms}
"#;

const MAIN: &str = r#"//! One workflow, its workers, run embedded: the state is kept in
//! `.multiagents/app.db`, and no server is needed.

use std::time::Duration;

use multiagents::WorkflowDefinition;
use multiagents::prelude::*;
use serde_json::{Value, json};

#[worker("prepare_greeting")]
async fn prepare(input: Value, _ctx: WorkerContext) -> Result<Value, WorkerError> {
    let name = input["name"].as_str().unwrap_or("world");
    Ok(json!({"text": format!("Hello, {name}!")}))
}

#[worker("send_greeting")]
async fn send(input: Value, ctx: WorkerContext) -> Result<Value, WorkerError> {
    // The key is the same for every attempt of this step: give it to the API
    // you call, and a retried send is applied once.
    let key = ctx.idempotency_key().to_string();
    if input["name"] == "nobody" {
        return Err(WorkerError::fatal("there is nobody to greet"));
    }
    Ok(json!({"sent": true, "key": key}))
}

#[worker("retract_greeting")]
async fn retract(_input: Value, _ctx: WorkerContext) -> Result<Value, WorkerError> {
    Ok(json!({"retracted": true}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(".multiagents")?;
    let workflow = WorkflowDefinition::from_yaml(include_str!("../workflow.yaml"))?;
    let runtime = Runtime::builder()
        .store(multiagents::store::FileStore::open(".multiagents/app.db")?)
        .workflow(workflow)
        .worker(prepare)
        .worker(send)
        .worker(retract)
        .start()
        .await?;
    let client = runtime.client();
    let name = std::env::args().nth(1).unwrap_or_else(|| "world".into());
    let tx = client.start("greeting", &json!({"name": name})).await?;
    let state = client.wait(tx, Duration::from_secs(30)).await?;
    println!("{}", multiagents::timeline::render(&state));
    println!("{}: {}", state.workflow, state.status);
    runtime.shutdown().await;
    Ok(())
}
"#;

const README: &str = r#"# {name}

A multiagents project: the workflow in `workflow.yaml`, its workers in
`src/main.rs`, run embedded (state in `.multiagents/app.db`, no server).

```sh
cargo run                 # greets the world: prepare, then send
cargo run -- nobody       # `send` fails for good: the run ends failed
```

Next:
- add a step to `workflow.yaml` and a `#[worker]` for it;
- give a step a `compensation`, so that it is undone when a later step
  fails for good;
- run the workflow as a service instead: `multiagents serve`, deploy
  `workflow.yaml` with `multiagents workflow deploy workflow.yaml`, and do the
  steps with workers in any language (the service's `docs/api.md`).
"#;

fn cargo_toml(name: &str, framework: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
multiagents = {{ path = "{}", default-features = false, features = ["embedded"] }}
serde_json = "1"
tokio = {{ version = "1", features = ["rt-multi-thread", "macros"] }}

# A project of its own, not a member of the framework's workspace.
[workspace]
"#,
        framework.display().to_string().replace('\\', "/")
    )
}

/// A crate name from a directory name: lowercase letters, digits, `_` and `-`.
fn crate_name(dir: &Path) -> Result<String> {
    let base = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        CliError::usage(
            "DIR",
            format!("{} has no name to make a crate of", dir.display()),
        )
    })?;
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return Err(CliError::usage(
            "DIR",
            format!("`{base}` must start with a letter to name a crate"),
        ));
    }
    Ok(name)
}

pub fn init(args: InitArgs) -> Result<ExitCode> {
    let framework = match args.framework {
        Some(p) => p,
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    let framework = framework.canonicalize().map_err(|e| {
        CliError::usage(
            "--framework",
            format!("{} is not a multiagents checkout: {e}", framework.display()),
        )
    })?;
    if !framework.join("Cargo.toml").is_file()
        || !framework.join("crates/multiagents-core").is_dir()
    {
        return Err(CliError::usage(
            "--framework",
            format!(
                "{} is not a multiagents checkout (no Cargo.toml and crates/multiagents-core)",
                framework.display()
            ),
        ));
    }
    let name = crate_name(&args.dir)?;
    if args.dir.exists()
        && std::fs::read_dir(&args.dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(CliError::Refused(format!(
            "{} exists and is not empty: give a new directory",
            args.dir.display()
        )));
    }
    let write = |path: PathBuf, text: &str| {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| CliError::Read {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, text).map_err(|source| CliError::Read { path, source })
    };
    write(args.dir.join("Cargo.toml"), &cargo_toml(&name, &framework))?;
    write(args.dir.join("workflow.yaml"), WORKFLOW)?;
    write(args.dir.join("src/main.rs"), MAIN)?;
    write(args.dir.join("README.md"), &README.replace("{name}", &name))?;
    write(args.dir.join(".gitignore"), "/target\n/.multiagents\n")?;
    println!(
        "created {} ({name}): workflow.yaml, src/main.rs, README.md",
        args.dir.display()
    );
    println!("next: cd {} && cargo run", args.dir.display());
    Ok(ExitCode::SUCCESS)
}

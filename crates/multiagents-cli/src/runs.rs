//! `multiagents workflow start|list|retry` and `multiagents dlq …`: the
//! service's operations from the command line, over `--server` or straight
//! on Redis.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use multiagents::core::{Timestamp, WorkflowStatus};
use serde_json::{Value, json};

use crate::error::{CliError, Result};
use crate::remote::{Target, TargetArgs, encode};

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// The workflow (its latest version unless `--version`).
    name: String,
    /// The input, as JSON.
    #[arg(long, default_value = "null")]
    input: String,
    /// Wait this long for the outcome (e.g. `30s`), showing progress.
    #[arg(long, value_parser = multiagents::core::time::parse_duration)]
    wait: Option<Duration>,
    /// The same key gives the same run, however often it is started.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Run this version of the definition.
    #[arg(long)]
    version: Option<u32>,
    /// high, normal or low.
    #[arg(long)]
    priority: Option<String>,
    /// Join this request chain (a UUID).
    #[arg(long)]
    correlation_id: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only runs in this status.
    #[arg(long)]
    status: Option<String>,
    /// Only runs of this workflow.
    #[arg(long)]
    workflow: Option<String>,
    /// Only runs of this request chain.
    #[arg(long)]
    correlation_id: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print the runs as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(clap::Args, Debug)]
pub struct RetryArgs {
    /// The run to retry (failed, compensated, timed out or cancelled).
    id: String,
    /// Run again from this step (default: the one that failed).
    #[arg(long = "from")]
    from_step: Option<String>,
    /// An RFC 7386 JSON merge patch for the input.
    #[arg(long)]
    patch: Option<String>,
    /// Run the latest version of the definition, not the pinned one.
    #[arg(long)]
    latest: bool,
    /// Wait this long for the new run's outcome, showing progress.
    #[arg(long, value_parser = multiagents::core::time::parse_duration)]
    wait: Option<Duration>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
}

fn json_arg(flag: &'static str, text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| CliError::usage(flag, format!("`{text}` is not JSON: {e}")))
}

/// `--correlation-id`, when given, as a request chain.
fn correlation(text: Option<&str>) -> Result<Option<multiagents::core::CorrelationId>> {
    text.map(|c| {
        c.parse()
            .map(multiagents::core::CorrelationId)
            .map_err(|e| CliError::usage("--correlation-id", format!("`{c}` is not a UUID: {e}")))
    })
    .transpose()
}

fn run_id(id: &str) -> Result<multiagents::TransactionId> {
    id.parse()
        .map_err(|e| CliError::usage("<ID>", format!("`{id}` is not a run id: {e}")))
}

/// A spinner on stderr while a run is waited for.
fn waiting(id: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(format!("waiting for run {id}"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Waits for a run over the service, a slice at a time so the spinner can
/// say where it is.
async fn wait_over_http(http: &crate::remote::Http, id: &str, wait: Duration) -> Result<Value> {
    let bar = waiting(id);
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let slice = left.min(Duration::from_secs(5));
        let (status, body) = http
            .call(
                "GET",
                &format!("/v1/runs/{id}/result?wait={}ms", slice.as_millis()),
                None,
                "application/json",
                slice + Duration::from_secs(30),
            )
            .await?;
        bar.set_message(format!(
            "waiting for run {id}: {}",
            body["status"].as_str().unwrap_or("?")
        ));
        if status == 200 || left.is_zero() {
            bar.finish_and_clear();
            return Ok(body);
        }
    }
}

/// Waits for a run on Redis, showing its status meanwhile.
async fn wait_on_redis(
    client: &multiagents::Client,
    id: multiagents::TransactionId,
    wait: Duration,
) -> Result<Value> {
    let bar = waiting(&id.to_string());
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match client.wait(id, left.min(Duration::from_millis(500))).await {
            Ok(state) => {
                bar.finish_and_clear();
                return Ok(outcome(&state));
            }
            Err(multiagents::Error::Timeout { status, .. }) => {
                bar.set_message(format!("waiting for run {id}: {status}"));
                if left.is_zero() {
                    bar.finish_and_clear();
                    return Ok(json!({"id": id, "status": status}));
                }
            }
            Err(e) => {
                bar.finish_and_clear();
                return Err(e.into());
            }
        }
    }
}

fn outcome(state: &multiagents::core::WorkflowState) -> Value {
    json!({
        "id": state.transaction_id,
        "workflow": state.workflow,
        "status": state.status,
        "output": if state.status == WorkflowStatus::Completed {
            multiagents::core::saga::outputs(&state.steps).parse::<Value>().unwrap_or(Value::Null)
        } else {
            Value::Null
        },
        "failure": state.failure,
    })
}

/// Prints an answer and picks the exit code: success unless a waited run
/// ended other than completed, or is still running.
fn report(answer: &Value, waited: bool, as_json: bool, verb: &str) -> ExitCode {
    let status = answer["status"].as_str().unwrap_or("?");
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        );
    } else {
        let id = answer["id"].as_str().unwrap_or("?");
        println!("{verb} run {id}: {status}");
        if !answer["output"].is_null() {
            println!("output: {}", answer["output"]);
        }
        if !answer["failure"].is_null() {
            println!("failure: {}", answer["failure"]);
        }
    }
    if waited && status != "completed" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub async fn start(args: StartArgs) -> Result<ExitCode> {
    let input = json_arg("--input", &args.input)?;
    match args.target.connect().await? {
        Target::Server(http) => {
            let mut query = Vec::new();
            if let Some(v) = args.version {
                query.push(format!("version={v}"));
            }
            if let Some(p) = &args.priority {
                query.push(format!("priority={}", encode(p)));
            }
            if let Some(c) = &args.correlation_id {
                query.push(format!("correlation_id={}", encode(c)));
            }
            let path = format!(
                "/v1/workflows/{}/runs{}{}",
                encode(&args.name),
                if query.is_empty() { "" } else { "?" },
                query.join("&")
            );
            let mut req = hyper_headers(args.idempotency_key.as_deref());
            req.push(("content-type", "application/json".to_string()));
            let (_, started) = http
                .call_with(
                    "POST",
                    &path,
                    Some(input.to_string()),
                    &req,
                    Duration::from_secs(30),
                )
                .await?;
            let id = started["id"].as_str().unwrap_or_default().to_string();
            let answer = match args.wait {
                Some(wait) => wait_over_http(&http, &id, wait).await?,
                None => started,
            };
            Ok(report(&answer, args.wait.is_some(), args.json, "started"))
        }
        Target::Redis(client) => {
            let mut options = multiagents::StartOptions {
                version: args.version,
                ..Default::default()
            };
            if let Some(p) = &args.priority {
                options.priority = p
                    .parse()
                    .map_err(|e: String| CliError::usage("--priority", e))?;
            }
            options.correlation_id = correlation(args.correlation_id.as_deref())?;
            if let Some(key) = &args.idempotency_key {
                options.transaction_id = Some(multiagents_server::run_id_for_key(&args.name, key));
            }
            let id = client.start_with(&args.name, &input, options).await?;
            let answer = match args.wait {
                Some(wait) => wait_on_redis(&client, id, wait).await?,
                None => {
                    let status = client
                        .status(id)
                        .await?
                        .map_or(WorkflowStatus::Running, |s| s.status);
                    json!({"id": id, "status": status})
                }
            };
            Ok(report(&answer, args.wait.is_some(), args.json, "started"))
        }
    }
}

fn hyper_headers(idempotency_key: Option<&str>) -> Vec<(&'static str, String)> {
    idempotency_key
        .map(|k| vec![("idempotency-key", k.to_string())])
        .unwrap_or_default()
}

pub async fn list(args: ListArgs) -> Result<ExitCode> {
    if args.limit == 0 || args.limit > 1000 {
        return Err(CliError::usage(
            "--limit",
            format!("must be between 1 and 1000, not {}", args.limit),
        ));
    }
    let runs: Vec<Value> = match args.target.connect().await? {
        Target::Server(http) => {
            let mut query = vec![format!("limit={}", args.limit)];
            for (k, v) in [
                ("status", &args.status),
                ("workflow", &args.workflow),
                ("correlation_id", &args.correlation_id),
            ] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", encode(v)));
                }
            }
            let body = http.get(&format!("/v1/runs?{}", query.join("&"))).await?;
            body["runs"].as_array().cloned().unwrap_or_default()
        }
        Target::Redis(client) => {
            let status = match &args.status {
                None => None,
                Some(s) => Some(
                    s.parse::<WorkflowStatus>()
                        .map_err(|e| CliError::usage("--status", e))?,
                ),
            };
            let correlation_id = correlation(args.correlation_id.as_deref())?;
            let query = multiagents::store::ListQuery {
                status,
                workflow: args
                    .workflow
                    .as_deref()
                    .map(multiagents::core::WorkflowName::new),
                correlation_id,
                limit: args.limit,
                ..Default::default()
            };
            client
                .list(&query)
                .await?
                .iter()
                .map(|s| {
                    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                    v["id"] = json!(s.transaction_id);
                    v
                })
                .collect()
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&runs).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if runs.is_empty() {
        println!("no runs match");
        return Ok(ExitCode::SUCCESS);
    }
    let now = Timestamp::now().as_millis();
    println!(
        "{:<36}  {:<20} {:<20} {:>10}",
        "id", "workflow", "status", "started"
    );
    for r in &runs {
        let age = now.saturating_sub(r["started_at"].as_u64().unwrap_or(now));
        println!(
            "{:<36}  {:<20} {:<20} {:>10}",
            r["id"].as_str().unwrap_or("?"),
            r["workflow"].as_str().unwrap_or("?"),
            r["status"].as_str().unwrap_or("?"),
            format!(
                "{} ago",
                multiagents::core::time::format_duration(Duration::from_millis(age))
            ),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn retry(args: RetryArgs) -> Result<ExitCode> {
    let patch = args
        .patch
        .as_deref()
        .map(|p| json_arg("--patch", p))
        .transpose()?;
    match args.target.connect().await? {
        Target::Server(http) => {
            let mut body = json!({});
            if let Some(step) = &args.from_step {
                body["from_step"] = json!(step);
            }
            if let Some(patch) = patch {
                body["input"] = patch;
            }
            if args.latest {
                body["definition"] = json!("latest");
            }
            let (_, started) = http
                .post(
                    &format!("/v1/runs/{}/retry", encode(&args.id)),
                    &body,
                    Duration::ZERO,
                )
                .await?;
            let id = started["id"].as_str().unwrap_or_default().to_string();
            let answer = match args.wait {
                Some(wait) => wait_over_http(&http, &id, wait).await?,
                None => started,
            };
            Ok(report(
                &answer,
                args.wait.is_some(),
                args.json,
                "retried as",
            ))
        }
        Target::Redis(client) => {
            let old = run_id(&args.id)?;
            let options = multiagents::RetryOptions {
                from_step: args.from_step.clone(),
                input_patch: patch,
                latest_definition: args.latest,
            };
            let id = client.retry(old, options).await?;
            let answer = match args.wait {
                Some(wait) => wait_on_redis(&client, id, wait).await?,
                None => json!({"id": id, "status": "running"}),
            };
            Ok(report(
                &answer,
                args.wait.is_some(),
                args.json,
                "retried as",
            ))
        }
    }
}

/// What to do with dead letters.
#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// The newest dead letters: id, age, topic, origin and reason.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// One dead letter, whole (as JSON).
    Show {
        /// Its id.
        id: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Send dead letters back to be processed, once their cause is fixed:
    /// one by id (optionally with its event's payload edited), or `--all`
    /// that match the filters, with a progress bar (`--dry-run` counts them).
    Redrive {
        /// The letter's id (or `--all`).
        id: Option<String>,
        /// The event's payload, edited (JSON).
        #[arg(long)]
        payload: Option<String>,
        /// Every letter that matches the filters below.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Only letters of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only letters of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only letters of this step.
        #[arg(long)]
        step: Option<String>,
        /// Only letters whose reason contains this.
        #[arg(long)]
        reason: Option<String>,
        /// Count what would be redriven; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Drop a dead letter on purpose; it is kept in the audit log.
    Discard {
        /// Its id.
        id: String,
        /// Why, kept in the audit log.
        #[arg(long, default_value = "discarded from the command line")]
        reason: String,
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// A dead letter's origin, in a few words.
fn origin_of(body: &str) -> String {
    let Ok(e) = serde_json::from_str::<Value>(body) else {
        return "-".into();
    };
    let part = |k: &str| e[k].as_str().unwrap_or("?").to_string();
    format!(
        "{} {} {}",
        part("workflow"),
        part("transaction_id"),
        part("step")
    )
}

pub async fn dlq(command: DlqCommand) -> Result<ExitCode> {
    match command {
        DlqCommand::List {
            limit,
            json: as_json,
            target,
        } => {
            let letters: Vec<Value> = match target.connect().await? {
                Target::Server(http) => {
                    http.get(&format!("/v1/dead-letters?limit={limit}")).await?["dead_letters"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                }
                Target::Redis(client) => {
                    let mut l = client.dead_letters(limit).await?;
                    l.reverse();
                    l.iter()
                        .map(|d| serde_json::to_value(d).unwrap_or(Value::Null))
                        .collect()
                }
            };
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&letters).unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if letters.is_empty() {
                println!("no dead letters");
                return Ok(ExitCode::SUCCESS);
            }
            let now = Timestamp::now().as_millis();
            for d in &letters {
                let age = now.saturating_sub(d["at"].as_u64().unwrap_or(now));
                println!(
                    "{:<18} {:>8} ago  {:<28} {}\n{:<18} {}",
                    d["id"].as_str().unwrap_or("?"),
                    multiagents::core::time::format_duration(Duration::from_millis(age)),
                    d["topic"].as_str().unwrap_or("?"),
                    origin_of(d["body"].as_str().unwrap_or("")),
                    "",
                    d["reason"].as_str().unwrap_or(""),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id, target } => {
            let letter = match target.connect().await? {
                Target::Server(http) => {
                    http.get(&format!("/v1/dead-letters/{}", encode(&id)))
                        .await?
                }
                Target::Redis(client) => {
                    let d = client
                        .dead_letter(&id)
                        .await?
                        .ok_or_else(|| CliError::NotFound(format!("no dead letter `{id}`")))?;
                    serde_json::to_value(d).unwrap_or(Value::Null)
                }
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&letter).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Redrive {
            id,
            payload,
            all,
            topic,
            workflow,
            step,
            reason,
            dry_run,
            target,
        } => {
            let payload = payload
                .as_deref()
                .map(|p| json_arg("--payload", p))
                .transpose()?;
            if !all && id.is_none() {
                return Err(CliError::usage(
                    "<ID>",
                    "name a dead letter, or give --all with filters",
                ));
            }
            if all && payload.is_some() {
                return Err(CliError::usage(
                    "--payload",
                    "an edited payload is for one letter, not --all",
                ));
            }
            let target = target.connect().await?;
            if let Some(id) = id {
                let done = match &target {
                    Target::Server(http) => {
                        let body = payload.map_or_else(|| json!({}), |p| json!({"payload": p}));
                        http.post(
                            &format!("/v1/dead-letters/{}/redrive", encode(&id)),
                            &body,
                            Duration::ZERO,
                        )
                        .await?
                        .1
                    }
                    Target::Redis(client) => {
                        let edited = match payload {
                            None => None,
                            Some(p) => {
                                let letter = client.dead_letter(&id).await?.ok_or_else(|| {
                                    CliError::NotFound(format!("no dead letter `{id}`"))
                                })?;
                                let mut event: Value =
                                    serde_json::from_str(&letter.body).map_err(|e| {
                                        CliError::Refused(format!(
                                            "its body is not an event ({e}); it cannot be edited"
                                        ))
                                    })?;
                                event["payload"] = p;
                                Some(event.to_string())
                            }
                        };
                        json!(
                            client
                                .redrive_dead_letter(&id, edited.as_deref(), "cli")
                                .await?
                        )
                    }
                };
                println!("redriven {id} to {}", done["topic"].as_str().unwrap_or("?"));
                return Ok(ExitCode::SUCCESS);
            }
            let filter = multiagents::bus::DeadLetterFilter {
                topic,
                workflow,
                step,
                reason,
            };
            match &target {
                Target::Server(http) => {
                    let bar = indicatif::ProgressBar::new_spinner();
                    bar.set_message("redriving");
                    bar.enable_steady_tick(Duration::from_millis(120));
                    let (_, body) = http
                        .post(
                            "/v1/dead-letters/redrive",
                            &json!({"filter": filter, "dry_run": dry_run}),
                            Duration::from_secs(300),
                        )
                        .await?;
                    bar.finish_and_clear();
                    let redriven = body["redriven"].as_array().map_or(0, Vec::len);
                    let failed = body["failed"].as_array().cloned().unwrap_or_default();
                    summarize(
                        dry_run,
                        body["matched"].as_u64().unwrap_or(0),
                        redriven,
                        &failed,
                    )
                }
                Target::Redis(client) => {
                    let letters = client.dead_letters(10_000).await?;
                    let matched: Vec<_> = letters.iter().filter(|d| filter.matches(d)).collect();
                    if dry_run {
                        return summarize(true, matched.len() as u64, 0, &[]);
                    }
                    let bar = indicatif::ProgressBar::new(matched.len() as u64);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "redriving {bar:40} {pos}/{len} ({eta})",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    let mut redriven = 0;
                    let mut failed = Vec::new();
                    for d in &matched {
                        match client.redrive_dead_letter(&d.id, None, "cli").await {
                            Ok(_) => redriven += 1,
                            Err(e) => failed.push(json!({"id": d.id, "detail": e.to_string()})),
                        }
                        bar.inc(1);
                    }
                    bar.finish_and_clear();
                    summarize(false, matched.len() as u64, redriven, &failed)
                }
            }
        }
        DlqCommand::Discard { id, reason, target } => {
            match target.connect().await? {
                Target::Server(http) => {
                    http.call(
                        "DELETE",
                        &format!("/v1/dead-letters/{}", encode(&id)),
                        Some(json!({"reason": reason}).to_string()),
                        "application/json",
                        Duration::from_secs(30),
                    )
                    .await?;
                }
                Target::Redis(client) => {
                    client.discard_dead_letter(&id, "cli", &reason).await?;
                }
            }
            println!("discarded {id}; it is kept in the audit log");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn summarize(dry_run: bool, matched: u64, redriven: usize, failed: &[Value]) -> Result<ExitCode> {
    if dry_run {
        println!("{matched} dead letter(s) match; nothing redriven (--dry-run)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{matched} matched, {redriven} redriven, {} failed",
        failed.len()
    );
    for f in failed {
        println!(
            "  {}: {}",
            f["id"].as_str().unwrap_or("?"),
            f["detail"].as_str().unwrap_or("")
        );
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

//! Support tickets through a saga with an LLM step, run embedded.
//!
//! `triage` is an LLM program (a typed signature: ticket → category, urgent,
//! a drafted reply); `open_case` is a plain worker, undone by `close_case`;
//! `send_reply` refuses to mail an address on the blocklist, which fails the
//! ticket for good and compensates: the case opened for it is closed.
//!
//! ```text
//! # from the recorded replies that ship with the example (no server needed):
//! cargo run --example support_ticket -- --replay examples/support_ticket.replay.jsonl
//!
//! # against a live OpenAI-compatible server:
//! OPENAI_API_KEY=… cargo run --features llm-tls --example support_ticket   # OpenAI
//! OPENAI_BASE_URL=http://localhost:11434/v1 MULTIAGENTS_LLM_MODEL=llama3.1 \
//!     cargo run --example support_ticket                                   # Ollama
//! OPENAI_BASE_URL=http://localhost:8000/v1 cargo run --example support_ticket   # vLLM
//! ```
//!
//! `--record FILE` keeps every live reply in FILE for later playback.

use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use multiagents::llm::{LlmClient, LlmConfig, LlmWorker, Predict, Replay, Signature};
use multiagents::{RetryPolicy, Runtime, WorkerContext, WorkerError, WorkflowBuilder, worker};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Triage support tickets with an LLM step inside a compensating saga.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Play the model's replies back from this file instead of calling a server.
    #[arg(long, value_name = "FILE")]
    replay: Option<std::path::PathBuf>,
    /// Call the server and keep its replies in this file.
    #[arg(long, value_name = "FILE", conflicts_with = "replay")]
    record: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ticket {
    id: u32,
    email: String,
    ticket: String,
}

const TICKETS: [(&str, &str); 4] = [
    (
        "ana@example.com",
        "I was charged twice for my May subscription. Please refund one of them.",
    ),
    (
        "bo@example.com",
        "The app crashes every time I upload a photo larger than 10 MB.",
    ),
    (
        "spam@blocked.example",
        "URGENT!!! The export button does nothing and my boss needs the report now.",
    ),
    (
        "chen@example.com",
        "How do I change the email address on my account?",
    ),
];

fn triage_program() -> Result<Predict, multiagents::llm::SignatureError> {
    Ok(Predict::new(
        Signature::parse("ticket -> category: String, urgent: bool, reply: String")?
            .instructions("Triage a customer support ticket and draft a short, friendly reply.")
            .describe("category", "one of: billing, bug, account, question")
            .describe(
                "urgent",
                "true when the customer is blocked or losing money",
            )
            .describe("reply", "two or three sentences, signed 'The Support Team'"),
    ))
}

/// Cases opened and closed, to print at the end.
static CASES: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[worker("open_case")]
async fn open_case(t: Ticket, ctx: WorkerContext) -> Result<Value, WorkerError> {
    let triage: Value = ctx.output("triage").await?;
    let case = format!(
        "CASE-{}-{}",
        t.id,
        triage["category"].as_str().unwrap_or("other")
    );
    if let Ok(mut c) = CASES.lock() {
        c.push(format!("opened {case}"));
    }
    Ok(json!({"case": case, "priority": if triage["urgent"] == true { "high" } else { "normal" }}))
}

#[worker("close_case")]
async fn close_case(_t: Ticket, ctx: WorkerContext) -> Result<Value, WorkerError> {
    let case: Value = ctx.output("open_case").await?;
    if let Ok(mut c) = CASES.lock() {
        c.push(format!("closed {}", case["case"].as_str().unwrap_or("?")));
    }
    Ok(json!({"closed": case["case"]}))
}

#[worker("send_reply")]
async fn send_reply(t: Ticket, ctx: WorkerContext) -> Result<Value, WorkerError> {
    if t.email.ends_with("@blocked.example") {
        return Err(
            WorkerError::fatal(format!("{} is on the mail blocklist", t.email))
                .with_kind("blocked_address"),
        );
    }
    let triage: Value = ctx.output("triage").await?;
    Ok(json!({"sent_to": t.email, "chars": triage["reply"].as_str().map_or(0, str::len)}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let config = match (&args.replay, LlmConfig::from_env()) {
        // Playing back needs no endpoint; the model name is part of each
        // recorded request.
        (Some(_), _) => LlmConfig::new("http://127.0.0.1:9/v1"),
        (None, Ok(c)) => c,
        (None, Err(e)) => {
            eprintln!("{e}");
            eprintln!();
            eprintln!("To run this example:");
            eprintln!("  from the recorded replies (no server):");
            eprintln!(
                "    cargo run --example support_ticket -- --replay examples/support_ticket.replay.jsonl"
            );
            eprintln!(
                "  with Ollama:  OPENAI_BASE_URL=http://localhost:11434/v1 MULTIAGENTS_LLM_MODEL=llama3.1 cargo run --example support_ticket"
            );
            eprintln!(
                "  with vLLM:    OPENAI_BASE_URL=http://localhost:8000/v1 MULTIAGENTS_LLM_MODEL=<model> cargo run --example support_ticket"
            );
            eprintln!(
                "  with OpenAI:  OPENAI_API_KEY=sk-… cargo run --features llm-tls --example support_ticket"
            );
            std::process::exit(2);
        }
    };
    let config = if std::env::var("MULTIAGENTS_LLM_MODEL").is_err() {
        config.model("gpt-4o-mini")
    } else {
        config
    };
    let mut client = LlmClient::new(config.timeout(Duration::from_secs(60)));
    if let Some(path) = &args.replay {
        client = client.with_replay(Replay::playback(path)?);
    } else if let Some(path) = &args.record {
        client = client.with_replay(Replay::record(path)?);
    }

    let definition = WorkflowBuilder::new("support_ticket")
        .description("triage with an LLM, open a case, send the reply")
        .step("triage", "triage_ticket")
        .retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(200)))
        .timeout(Duration::from_secs(120))
        .step("open_case", "open_case")
        .compensate_with("close_case")
        .step("send_reply", "send_reply")
        .build()?;
    let triage = LlmWorker::predict("triage_ticket", client, triage_program()?);
    let tokens = triage.usage();
    let runtime = Runtime::builder()
        .workflow(definition)
        .worker(triage)
        .worker(open_case)
        .worker(close_case)
        .worker(send_reply)
        .start()
        .await?;
    let rt_client = runtime.client();
    let mut txs = Vec::new();
    for (i, (email, text)) in TICKETS.iter().enumerate() {
        let t = Ticket {
            id: i as u32 + 1,
            email: email.to_string(),
            ticket: text.to_string(),
        };
        txs.push((t.clone(), rt_client.start("support_ticket", &t).await?));
    }
    let mut failed_llm = 0;
    for (t, tx) in &txs {
        let state = rt_client.wait(*tx, Duration::from_secs(300)).await?;
        println!("ticket #{} from {} → {}", t.id, t.email, state.status);
        match state.output("triage").map(|p| p.parse::<Value>()) {
            Some(Ok(triage)) => {
                println!(
                    "  category {}, urgent {}",
                    triage["category"], triage["urgent"]
                );
                println!(
                    "  draft: {}",
                    triage["reply"]
                        .as_str()
                        .unwrap_or_default()
                        .replace('\n', " ")
                );
            }
            _ => {
                failed_llm += 1;
                if let Some(e) = state.step("triage").and_then(|s| s.last_error.as_ref()) {
                    println!("  triage failed: {e}");
                }
            }
        }
        if state.status != multiagents::WorkflowStatus::Completed
            && let Some(f) = &state.failure
        {
            println!("  why: {f:?}");
        }
    }
    println!();
    let cases = CASES.lock().map(|c| c.clone()).unwrap_or_default();
    println!("cases: {}", cases.join(", "));
    let used = tokens.total();
    println!(
        "LLM: {} call(s), {} tokens in, {} out",
        tokens.calls(),
        used.prompt_tokens,
        used.completion_tokens
    );
    runtime.shutdown().await;
    if failed_llm > 0 {
        return Err(format!("{failed_llm} ticket(s) could not be triaged").into());
    }
    Ok(())
}

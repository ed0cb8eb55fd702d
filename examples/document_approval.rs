//! Publishing a document: a sub-workflow and a human approval with a
//! deadline, run embedded (no server).
//!
//! `publish_document` drafts the document, runs the `legal_review`
//! sub-workflow (check the claims, redact personal data — undone by putting
//! it back), then waits for a person to send the `approve` signal, for at
//! most `--approval-timeout`. Approved documents are published. A rejection
//! fails the publish step; a document nobody answers for fails its wait;
//! either way everything done is undone, the sub-workflow included.
//!
//! ```text
//! cargo run --example document_approval -- --documents 6 --approval-timeout 2s
//! ```
//!
//! Here the "person" is this program: it approves most documents, rejects
//! one in four and leaves one in six unanswered. With the Redis backend a
//! person (or a webhook) would send the signal from anywhere:
//!
//! ```text
//! multiagents workflow signal <transaction id> approve --data '{"approved": true, "by": "ana"}'
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use multiagents::core::workflow::{OnTimeout, diagram};
use multiagents::store::FileStore;
use multiagents::{
    Runtime, TransactionId, WorkerContext, WorkerError, WorkflowBuilder, WorkflowDefinition,
    WorkflowStatus, worker,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Publishes documents through a sub-workflow and a human approval.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// How many documents.
    #[arg(long, default_value_t = 6)]
    documents: u64,
    /// How long a document waits for its approval.
    #[arg(long, default_value = "2s", value_parser = multiagents::core::time::parse_duration)]
    approval_timeout: Duration,
    /// The embedded store file.
    #[arg(long, default_value = ".multiagents/document_approval.db")]
    store: std::path::PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Document {
    id: u64,
    title: String,
    author_email: String,
}

/// What an approver sends with the `approve` signal.
#[derive(Debug, Serialize, Deserialize)]
struct Approval {
    approved: bool,
    by: String,
}

fn legal_review() -> Result<WorkflowDefinition, multiagents::core::DefinitionError> {
    WorkflowBuilder::new("legal_review")
        .description("check the claims, redact personal data")
        .step("claims", "check_claims")
        .step("redact", "redact_personal_data")
        .compensate_with("restore_personal_data")
        .build()
}

fn publish_document(
    approval_timeout: Duration,
) -> Result<WorkflowDefinition, multiagents::core::DefinitionError> {
    WorkflowBuilder::new("publish_document")
        .description("draft, legal review (a sub-workflow), human approval, publish")
        .step("draft", "draft_document")
        .compensate_with("discard_draft")
        .sub_workflow("review", "legal_review")
        .wait_for_signal("approval", "approve")
        .signal_timeout(approval_timeout, OnTimeout::Fail)
        .step("publish", "publish_document")
        .input_from("approval")
        .build()
}

/// What the workers did, to print at the end.
#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    fn count(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .map(|j| j.iter().filter(|l| l.starts_with(prefix)).count())
            .unwrap_or(0)
    }
}

static JOURNAL: std::sync::OnceLock<Journal> = std::sync::OnceLock::new();

fn note(line: String) {
    if let Some(j) = JOURNAL.get()
        && let Ok(mut j) = j.0.lock()
    {
        j.push(line);
    }
}

#[worker("draft_document")]
async fn draft_document(doc: Document) -> Result<Value, WorkerError> {
    note(format!("drafted {}", doc.id));
    Ok(json!({"draft": format!("drafts/{}.md", doc.id)}))
}

#[worker("discard_draft")]
async fn discard_draft(doc: Document) -> Result<Value, WorkerError> {
    note(format!("discarded {}", doc.id));
    Ok(json!({"discarded": doc.id}))
}

#[worker("check_claims")]
async fn check_claims(doc: Document) -> Result<Value, WorkerError> {
    Ok(json!({"claims_checked": doc.title}))
}

#[worker("redact_personal_data")]
async fn redact_personal_data(doc: Document) -> Result<Value, WorkerError> {
    note(format!("redacted {}", doc.id));
    Ok(json!({"redacted": [doc.author_email]}))
}

#[worker("restore_personal_data")]
async fn restore_personal_data(doc: Document) -> Result<Value, WorkerError> {
    note(format!("restored {}", doc.id));
    Ok(json!({"restored": doc.id}))
}

#[worker("publish_document")]
async fn publish(approval: Approval, ctx: WorkerContext) -> Result<Value, WorkerError> {
    if !approval.approved {
        return Err(
            WorkerError::fatal(format!("rejected by {}", approval.by)).with_kind("rejected")
        );
    }
    let draft: Value = ctx.output("draft").await?;
    note(format!("published {}", draft["draft"]));
    Ok(
        json!({"url": draft["draft"].as_str().map(|d| d.replace("drafts/", "https://example.com/"))}),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let _ = JOURNAL.set(Journal::default());
    let def = publish_document(args.approval_timeout)?;
    print!("{}", diagram::ascii(&def));
    println!();
    if let Some(dir) = args.store.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let runtime = Runtime::builder()
        .store(FileStore::open(&args.store)?)
        .workflow(legal_review()?)
        .workflow(def)
        .worker(draft_document)
        .worker(discard_draft)
        .worker(check_claims)
        .worker(redact_personal_data)
        .worker(restore_personal_data)
        .worker(publish)
        .start()
        .await?;
    let client = runtime.client();

    let mut started: Vec<(u64, TransactionId)> = Vec::new();
    for id in 1..=args.documents {
        let doc = Document {
            id,
            title: format!("Quarterly report #{id}"),
            author_email: format!("author{id}@example.com"),
        };
        started.push((id, client.start("publish_document", &doc).await?));
    }
    // The approver: most are approved, every fourth rejected, every sixth
    // left unanswered (its wait times out). A signal may come before the
    // document even waits for it: it is kept.
    for &(id, tx) in &started {
        let answer = match id {
            id if id % 6 == 0 => None,
            id if id % 4 == 0 => Some(Approval {
                approved: false,
                by: "legal@example.com".into(),
            }),
            _ => Some(Approval {
                approved: true,
                by: "editor@example.com".into(),
            }),
        };
        if let Some(approval) = answer {
            client.signal(tx, "approve", &approval).await?;
        }
    }
    let mut finished = Vec::new();
    for &(_, tx) in &started {
        finished.push(
            client
                .wait(tx, args.approval_timeout + Duration::from_secs(30))
                .await?,
        );
    }
    for state in finished
        .iter()
        .filter(|s| s.status != WorkflowStatus::Completed)
        .take(2)
    {
        print!("{}", multiagents::timeline::render(state));
        println!();
    }
    let count = |s: WorkflowStatus| finished.iter().filter(|x| x.status == s).count();
    let journal = JOURNAL.get().cloned().unwrap_or_default();
    println!("summary: {} document(s)", finished.len());
    println!(
        "  published                {}",
        count(WorkflowStatus::Completed)
    );
    println!(
        "  undone (rejected or not answered in {})  {}",
        multiagents::core::time::format_duration(args.approval_timeout),
        count(WorkflowStatus::Compensated)
    );
    println!(
        "  legal reviews undone     {}  (personal data restored in the sub-workflow)",
        journal.count("restored")
    );
    println!("  drafts discarded         {}", journal.count("discarded"));
    runtime.shutdown().await;
    Ok(())
}

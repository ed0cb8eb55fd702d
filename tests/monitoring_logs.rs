//! With a JSON file logger, every step of every workflow can be found in the
//! log by its transaction id: the orchestrator's lines carry it as a field,
//! and lines logged by worker code carry it through the step's span.

use std::collections::HashSet;
use std::time::Duration;

use multiagents::monitoring::{MonitoringConfig, log_layers};
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn every_step_of_every_workflow_is_in_the_json_log_by_transaction_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("orders.jsonl");
    let config = MonitoringConfig::from_yaml(&format!(
        "logging: {{default_logger: json, level: info, file_path: '{}'}}",
        path.display()
    ))
    .expect("valid");
    let subscriber =
        tracing_subscriber::registry().with(log_layers(&config.logging).expect("layers"));
    let _default = tracing::subscriber::set_default(subscriber);
    // One thread: the default subscriber covers every task.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (ok, declined) = rt.block_on(async {
        let runtime = Runtime::builder()
            .workflow(
                WorkflowBuilder::new("orders")
                    .step("reserve", "reserve")
                    .compensate_with("release")
                    .step("charge", "charge")
                    .step("notify", "notify")
                    .build()
                    .expect("valid"),
            )
            .worker(from_fn("reserve", |_: bool, _| async {
                Ok::<_, WorkerError>("r")
            }))
            .worker(from_fn("release", |_: bool, _| async {
                Ok::<_, WorkerError>("released")
            }))
            .worker(from_fn("charge", |decline: bool, _| async move {
                tracing::info!(decline, "charging the card");
                if decline {
                    Err(WorkerError::fatal("card declined"))
                } else {
                    Ok("charged")
                }
            }))
            .worker(from_fn("notify", |_: bool, _| async {
                Ok::<_, WorkerError>("sent")
            }))
            .start()
            .await
            .expect("starts");
        let client = runtime.client();
        let mut ok = Vec::new();
        let mut declined = Vec::new();
        for n in 0..6 {
            let decline = n % 3 == 0;
            let tx = client.start("orders", &decline).await.expect("start");
            if decline {
                declined.push(tx)
            } else {
                ok.push(tx)
            }
        }
        for tx in ok.iter().chain(&declined) {
            client
                .wait(*tx, Duration::from_secs(10))
                .await
                .expect("ends");
        }
        assert_eq!(
            client
                .status(declined[0])
                .await
                .expect("status")
                .expect("exists")
                .status,
            WorkflowStatus::Compensated
        );
        runtime.shutdown().await;
        (ok, declined)
    });
    let lines: Vec<Value> = std::fs::read_to_string(&path)
        .expect("log written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let about = |tx: String| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| {
                l["transaction_id"] == tx.as_str()
                    || l["spans"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["transaction_id"] == tx.as_str()))
            })
            .collect()
    };
    let steps = |lines: &[&Value], message: &str| -> HashSet<String> {
        lines
            .iter()
            .filter(|l| l["message"] == message)
            .filter_map(|l| l["step"].as_str().map(str::to_string))
            .collect()
    };
    for tx in ok {
        let mine = about(tx.to_string());
        assert_eq!(
            steps(&mine, "step completed"),
            HashSet::from(["reserve".into(), "charge".into(), "notify".into()]),
            "{tx}: {mine:#?}"
        );
        assert!(mine.iter().any(|l| l["message"] == "charging the card"
            && l["spans"][0]["step"] == "charge"
            && l["spans"][0]["attempt"] == 1));
        assert!(
            mine.iter()
                .any(|l| l["message"] == "workflow finished" && l["status"] == "completed")
        );
        assert!(mine.iter().all(
            |l| l["correlation_id"].is_string() || l["spans"][0]["correlation_id"].is_string()
        ));
    }
    for tx in declined {
        let mine = about(tx.to_string());
        assert_eq!(
            steps(&mine, "step completed"),
            HashSet::from(["reserve".into()])
        );
        assert_eq!(
            steps(&mine, "step failed for good"),
            HashSet::from(["charge".into()])
        );
        assert_eq!(
            steps(&mine, "step compensated"),
            HashSet::from(["reserve".into()])
        );
        assert!(
            mine.iter()
                .any(|l| l["message"] == "workflow finished" && l["status"] == "compensated")
        );
    }
}

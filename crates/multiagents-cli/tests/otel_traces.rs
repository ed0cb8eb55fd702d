//! OpenTelemetry across processes: an orchestrator process and a worker
//! process export spans over OTLP/HTTP to a receiver in this test. One order
//! is one trace: the orchestrator's `dispatch <step>` spans are children of
//! the workflow span, and the worker process's `run <step>` spans are
//! children of those dispatch spans.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

/// Every span in the OTLP/JSON bodies received.
fn spans(bodies: &[Value]) -> Vec<Span> {
    let mut out = Vec::new();
    for body in bodies {
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let text = |k: &str| s[k].as_str().unwrap_or_default().to_lowercase();
                    out.push(Span {
                        service: service.clone(),
                        name: text("name"),
                        trace: text("traceId"),
                        id: text("spanId"),
                        parent: text("parentSpanId"),
                    });
                }
            }
        }
    }
    out
}

fn role(url: &str, prefix: &str, role: &str, endpoint: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args([
            "bench",
            "orders",
            "--backend",
            "redis",
            "--redis-url",
            url,
            "--prefix",
            prefix,
        ])
        .args(["--role", role])
        .args(extra)
        .env("MULTIAGENTS_OTLP_ENDPOINT", endpoint)
        .env("MULTIAGENTS_SERVICE_NAME", role)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_processes() {
    let Some(url) = common::redis_url() else {
        return;
    };
    // The receiver: keeps every request body.
    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    kept.lock().expect("lock").push(v);
                }
                ([("content-type", "application/json")], "{}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let prefix = format!("otel-{}", std::process::id());
    let orchestrator = role(&url, &prefix, "orchestrator", &endpoint, &[]);
    let workers = role(&url, &prefix, "workers", &endpoint, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = role(
        &url,
        &prefix,
        "client",
        &endpoint,
        &["--workflows", "3", "--concurrency", "1"],
    );
    let status = tokio::task::spawn_blocking(move || {
        let mut client = client;
        client.wait()
    })
    .await
    .expect("join")
    .expect("client ends");
    assert!(status.success());
    // SIGTERM: both drain and flush their spans.
    for child in [&orchestrator, &workers] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    for mut child in [orchestrator, workers] {
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("ends");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let all = spans(&bodies.lock().expect("lock"));
    let workflows: Vec<&Span> = all.iter().filter(|s| s.name == "workflow orders").collect();
    assert_eq!(workflows.len(), 3, "one workflow span per order: {all:#?}");
    let by_id: HashMap<&str, &Span> = all.iter().map(|s| (s.id.as_str(), s)).collect();
    for wf in workflows {
        assert_eq!(wf.service, "orchestrator");
        assert!(wf.parent.is_empty(), "the workflow span is the root");
        let trace: Vec<&Span> = all.iter().filter(|s| s.trace == wf.trace).collect();
        let dispatches: Vec<&&Span> = trace
            .iter()
            .filter(|s| s.name.starts_with("dispatch "))
            .collect();
        assert_eq!(dispatches.len(), 5, "five steps dispatched: {trace:#?}");
        assert!(dispatches.iter().all(|d| d.parent == wf.id));
        // The first dispatch happens where the order is placed (the client).
        assert!(dispatches.iter().any(|d| d.service == "client"));
        assert!(dispatches.iter().any(|d| d.service == "orchestrator"));
        let runs: Vec<&&Span> = trace
            .iter()
            .filter(|s| s.name.starts_with("run "))
            .collect();
        assert_eq!(runs.len(), 5, "{trace:#?}");
        for run in runs {
            assert_eq!(run.service, "workers", "run in the worker process");
            let parent = by_id
                .get(run.parent.as_str())
                .expect("the parent span was exported");
            assert!(parent.name.starts_with("dispatch "), "{parent:?}");
            assert_eq!(
                parent.name.trim_start_matches("dispatch "),
                run.name.trim_start_matches("run "),
                "a run is the child of its own step's dispatch"
            );
        }
    }
}

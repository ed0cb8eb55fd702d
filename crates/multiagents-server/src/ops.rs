//! What operators look at: dead letters and worker health.

use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use multiagents::bus::{WORKER_GROUP, command_topic};
use multiagents::core::{Timestamp, WorkerName};
use multiagents::monitoring::WorkerMonitoringConfig;
use multiagents::monitoring::workers::WorkerMonitor;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Problem, Service};

#[derive(Deserialize)]
pub(crate) struct LimitQuery {
    limit: Option<usize>,
}

/// Where a dead letter came from: its workflow, run and step, when its body
/// is an event.
fn origin(body: &str) -> Value {
    let Ok(event) = serde_json::from_str::<Value>(body) else {
        return Value::Null;
    };
    json!({
        "kind": event.get("kind"),
        "workflow": event.get("workflow"),
        "transaction_id": event.get("transaction_id"),
        "step": event.get("step"),
        "attempt": event.get("attempt"),
    })
}

/// `GET /v1/dead-letters?limit=N`: the newest first, with the reason, the
/// origin and the age.
pub(crate) async fn dead_letters(
    State(service): State<Service>,
    Query(q): Query<LimitQuery>,
) -> Result<Response, Problem> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(Problem::bad_request(
            "query.limit",
            format!("must be between 1 and 1000, not {limit}"),
        ));
    }
    let now = Timestamp::now();
    let letters: Vec<Value> = service
        .client()
        .dead_letters(limit)
        .await?
        .into_iter()
        .map(|d| {
            json!({
                "topic": d.topic,
                "group": d.group,
                "reason": d.reason,
                "delivery_count": d.delivery_count,
                "at": d.at,
                "age_ms": now.as_millis().saturating_sub(d.at.as_millis()),
                "origin": origin(&d.body),
                "body": d.body,
            })
        })
        .collect();
    Ok(Json(json!({"dead_letters": letters})).into_response())
}

/// `GET /v1/workers`: health per worker type and process, from their
/// heartbeats, and the commands waiting for each type.
pub(crate) async fn workers(State(service): State<Service>) -> Result<Response, Problem> {
    let monitor = WorkerMonitor::new(service.store().clone(), WorkerMonitoringConfig::default());
    let reports = monitor.report().await.map_err(multiagents::Error::from)?;
    let mut out = Vec::new();
    for report in reports {
        let topic = command_topic(&WorkerName::new(&report.worker));
        let lag = tokio::time::timeout(
            Duration::from_secs(2),
            service.tasks().bus().topics.lag(&topic, WORKER_GROUP),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
        let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("lag".into(), json!({ topic: lag }));
        }
        out.push(v);
    }
    Ok(Json(json!({"workers": out})).into_response())
}

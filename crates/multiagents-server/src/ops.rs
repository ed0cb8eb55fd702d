//! What operators look at: dead letters and worker health.

use std::time::Duration;

use crate::extract::{Path, Query, Text};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use multiagents::bus::{DeadLetter, DeadLetterFilter, WORKER_GROUP, command_topic};
use multiagents::core::{Timestamp, WorkerName};
use multiagents::monitoring::WorkerMonitoringConfig;
use multiagents::monitoring::workers::WorkerMonitor;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::{Problem, Service, json_body_or_default};

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

/// A dead letter as the API shows it.
fn letter_view(d: &DeadLetter, now: Timestamp) -> Value {
    json!({
        "id": d.id,
        "url": format!("/v1/dead-letters/{}", d.id),
        "topic": d.topic,
        "group": d.group,
        "reason": d.reason,
        "delivery_count": d.delivery_count,
        "at": d.at,
        "age_ms": now.as_millis().saturating_sub(d.at.as_millis()),
        "origin": origin(&d.body),
        "body": d.body,
    })
}

fn limit_of(limit: Option<usize>, default: usize, max: usize) -> Result<usize, Problem> {
    let limit = limit.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(Problem::bad_request(
            "query.limit",
            format!("must be between 1 and {max}, not {limit}"),
        ));
    }
    Ok(limit)
}

/// `GET /v1/dead-letters?limit=N`: the newest first, with the reason, the
/// origin and the age.
pub(crate) async fn dead_letters(
    State(service): State<Service>,
    Query(q): Query<LimitQuery>,
) -> Result<Response, Problem> {
    let limit = limit_of(q.limit, 100, 1000)?;
    let now = Timestamp::now();
    let mut letters = service.client().dead_letters(limit).await?;
    letters.reverse();
    let letters: Vec<Value> = letters.iter().map(|d| letter_view(d, now)).collect();
    Ok(Json(json!({"dead_letters": letters})).into_response())
}

/// `GET /v1/dead-letters/{id}`.
pub(crate) async fn dead_letter(
    State(service): State<Service>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    match service.client().dead_letter(&id).await? {
        Some(d) => Ok(Json(letter_view(&d, Timestamp::now())).into_response()),
        None => Err(multiagents::Error::NoDeadLetter(id).into()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedriveBody {
    /// The whole event, edited (a JSON object or its text).
    body: Option<Value>,
    /// Only the event's payload, edited.
    payload: Option<Value>,
}

/// The edited event text a redrive asks for, if any.
async fn edited_body(
    service: &Service,
    id: &str,
    edit: RedriveBody,
) -> Result<Option<String>, Problem> {
    match (edit.body, edit.payload) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Problem::bad_request(
            "body",
            "send `body` (the whole event) or `payload` (the event's payload), not both",
        )),
        (Some(Value::String(text)), None) => Ok(Some(text)),
        (Some(event), None) => Ok(Some(event.to_string())),
        (None, Some(payload)) => {
            let letter = service
                .client()
                .dead_letter(id)
                .await?
                .ok_or_else(|| multiagents::Error::NoDeadLetter(id.to_string()))?;
            let mut event: Value = serde_json::from_str(&letter.body).map_err(|e| {
                Problem::unprocessable(
                    "body.payload",
                    format!("the dead letter's body is not an event ({e}); send the whole `body`"),
                )
            })?;
            event["payload"] = payload;
            Ok(Some(event.to_string()))
        }
    }
}

/// `POST /v1/dead-letters/{id}/redrive`, optionally with
/// `{"payload": …}` or `{"body": …}` edited.
pub(crate) async fn redrive(
    State(service): State<Service>,
    Path(id): Path<String>,
    caller: Caller,
    Text(body): Text,
) -> Result<Response, Problem> {
    let edit: RedriveBody = json_body_or_default(&body, "not {\"payload\": …} or {\"body\": …}")?;
    let edited = edited_body(&service, &id, edit).await?;
    let done = service
        .client()
        .redrive_dead_letter(&id, edited.as_deref(), caller.name())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!(done))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkBody {
    #[serde(default)]
    filter: DeadLetterFilter,
    #[serde(default)]
    dry_run: bool,
    limit: Option<usize>,
}

/// How many of the newest dead letters a bulk redrive looks at.
const BULK_SCAN: usize = 10_000;

/// `POST /v1/dead-letters/redrive` with `{"filter": {topic, workflow, step,
/// reason}, "dry_run": true|false, "limit": N}`: redrives every match
/// (oldest first), or with `dry_run` only counts them.
pub(crate) async fn redrive_bulk(
    State(service): State<Service>,
    caller: Caller,
    Text(body): Text,
) -> Result<Response, Problem> {
    let bulk: BulkBody = json_body_or_default(
        &body,
        "not {\"filter\": {\"topic\", \"workflow\", \"step\", \"reason\"}, \"dry_run\": bool, \"limit\": N}",
    )?;
    let limit = limit_of(bulk.limit, 1000, BULK_SCAN)?;
    let letters = service.client().dead_letters(BULK_SCAN).await?;
    let matched: Vec<&DeadLetter> = letters.iter().filter(|d| bulk.filter.matches(d)).collect();
    if bulk.dry_run {
        return Ok(Json(json!({
            "dry_run": true,
            "matched": matched.len(),
            "scanned": letters.len(),
            "ids": matched.iter().take(limit).map(|d| &d.id).collect::<Vec<_>>(),
        }))
        .into_response());
    }
    let mut redriven = Vec::new();
    let mut failed = Vec::new();
    for letter in matched.iter().take(limit) {
        match service
            .client()
            .redrive_dead_letter(&letter.id, None, caller.name())
            .await
        {
            Ok(done) => redriven.push(json!(done)),
            Err(e) => failed.push(json!({"id": letter.id, "detail": e.to_string()})),
        }
    }
    Ok(Json(json!({
        "dry_run": false,
        "matched": matched.len(),
        "scanned": letters.len(),
        "redriven": redriven,
        "failed": failed,
    }))
    .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiscardBody {
    reason: Option<String>,
}

/// `DELETE /v1/dead-letters/{id}` with an optional `{"reason": …}`: the
/// letter goes to the audit log.
pub(crate) async fn discard(
    State(service): State<Service>,
    Path(id): Path<String>,
    caller: Caller,
    Text(body): Text,
) -> Result<Response, Problem> {
    let body: DiscardBody = json_body_or_default(&body, "not {\"reason\": …}")?;
    let reason = body
        .reason
        .unwrap_or_else(|| "discarded over the API".into());
    let letter = service
        .client()
        .discard_dead_letter(&id, caller.name(), &reason)
        .await?;
    Ok(Json(json!({"id": letter.id, "discarded": true, "reason": reason})).into_response())
}

/// `GET /v1/dead-letters/audit?limit=N`: settled letters, newest first.
pub(crate) async fn audit(
    State(service): State<Service>,
    Query(q): Query<LimitQuery>,
) -> Result<Response, Problem> {
    let limit = limit_of(q.limit, 100, 1000)?;
    let now = Timestamp::now();
    let mut log = service.client().dead_letter_audit(limit).await?;
    log.reverse();
    let entries: Vec<Value> = log
        .iter()
        .map(|a| {
            let mut v = letter_view(&a.letter, now);
            v["settlement"] = json!(a.settlement);
            v
        })
        .collect();
    Ok(Json(json!({"audit": entries})).into_response())
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

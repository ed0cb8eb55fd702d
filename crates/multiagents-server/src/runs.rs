//! Runs: start (idempotently), read, list, wait for, signal, cancel.

use std::time::Duration;

use crate::extract::{Path, Query, Text};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use multiagents::StartOptions;
use multiagents::core::{
    CorrelationId, Priority, TransactionId, WorkflowName, WorkflowState, WorkflowStatus,
};
use multiagents::store::ListQuery;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Problem, Service, json_body_or_default};

fn url(id: TransactionId) -> String {
    format!("/v1/runs/{id}")
}

fn wait_of(service: &Service, wait: Option<&str>) -> Result<Option<Duration>, Problem> {
    let Some(text) = wait else { return Ok(None) };
    let d = multiagents::core::time::parse_duration(text).map_err(|e| {
        Problem::bad_request(
            "query.wait",
            format!("`{text}` is not a duration (say 30s or 500ms): {e}"),
        )
    })?;
    Ok(Some(d.min(service.max_wait())))
}

pub(crate) fn run_id(id: &str) -> Result<TransactionId, Problem> {
    id.parse()
        .map_err(|e| Problem::bad_request("path.id", format!("`{id}` is not a run id: {e}")))
}

/// The transaction id an idempotency key stands for: the same for the same
/// workflow and key, in every replica, after every restart.
pub(crate) fn idempotent_id(workflow: &str, key: &str) -> TransactionId {
    use multiagents::core::hash::{fnv1a, splitmix64};
    let bytes = workflow.bytes().chain([0]).chain(key.bytes());
    let high = fnv1a(bytes);
    let low = splitmix64(high ^ fnv1a(key.bytes().rev()));
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&high.to_be_bytes());
    raw[8..].copy_from_slice(&low.to_be_bytes());
    TransactionId(uuid::Builder::from_custom_bytes(raw).into_uuid())
}

/// A run as the API shows it: its state with its id and URL.
fn view(state: &WorkflowState) -> Value {
    let mut v = serde_json::to_value(state).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), json!(state.transaction_id));
        m.insert("url".into(), json!(url(state.transaction_id)));
        if state.status == WorkflowStatus::Completed {
            m.insert("output".into(), state_output(state));
        }
    }
    v
}

fn state_output(state: &WorkflowState) -> Value {
    multiagents::core::saga::outputs(&state.steps)
        .parse()
        .unwrap_or(Value::Null)
}

/// The outcome of a finished run.
fn outcome(state: &WorkflowState) -> Value {
    json!({
        "id": state.transaction_id,
        "url": url(state.transaction_id),
        "workflow": state.workflow,
        "status": state.status,
        "output": if state.status == WorkflowStatus::Completed { state_output(state) } else { Value::Null },
        "failure": state.failure,
    })
}

#[derive(Deserialize, Default)]
pub(crate) struct StartQuery {
    wait: Option<String>,
    version: Option<u32>,
    correlation_id: Option<String>,
    priority: Option<String>,
    on_conflict: Option<String>,
}

/// `POST /v1/workflows/{name}/runs`: the body is the input.
pub(crate) async fn start(
    State(service): State<Service>,
    Path(name): Path<String>,
    Query(q): Query<StartQuery>,
    headers: HeaderMap,
    Text(body): Text,
) -> Result<Response, Problem> {
    let input: Value = json_body_or_default(&body, "the input is not JSON")?;
    let wait = wait_of(&service, q.wait.as_deref())?;
    let fail_on_conflict = match q.on_conflict.as_deref() {
        None | Some("return_existing") => false,
        Some("fail") => true,
        Some(other) => {
            return Err(Problem::bad_request(
                "query.on_conflict",
                format!("`{other}` is not return_existing or fail"),
            ));
        }
    };
    let mut options = StartOptions {
        version: q.version,
        ..Default::default()
    };
    if let Some(p) = &q.priority {
        options.priority = p
            .parse::<Priority>()
            .map_err(|e| Problem::bad_request("query.priority", e))?;
    }
    if let Some(c) = &q.correlation_id {
        options.correlation_id = Some(CorrelationId(c.parse().map_err(|e| {
            Problem::bad_request("query.correlation_id", format!("`{c}` is not a UUID: {e}"))
        })?));
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    Problem::bad_request(
                        "header.Idempotency-Key",
                        "the key must be 1 to 255 visible ASCII characters",
                    )
                })?,
        ),
    };
    let client = service.client();
    let mut existed = false;
    if let Some(key) = key {
        let id = idempotent_id(&name, key);
        if let Some(state) = client.status(id).await? {
            if fail_on_conflict {
                return Err(Problem::conflict(format!(
                    "a run with this Idempotency-Key exists: {}",
                    url(id)
                ))
                .field("header.Idempotency-Key"));
            }
            if state.workflow.as_str() != name {
                return Err(Problem::conflict(format!(
                    "this Idempotency-Key was used for a run of `{}`",
                    state.workflow
                ))
                .field("header.Idempotency-Key"));
            }
            existed = true;
        }
        options.transaction_id = Some(id);
    }
    let id = client.start_with(&name, &input, options).await?;
    let created = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    answer_run(&service, id, created, wait, None).await
}

/// The answer to a start or a retry of run `id`: with `wait`, its outcome
/// if it ends in time (`code`) or else `202`; without, `{id, status, url}`
/// (`code`). `retry_of` is added to either when given.
async fn answer_run(
    service: &Service,
    id: TransactionId,
    code: StatusCode,
    wait: Option<Duration>,
    retry_of: Option<TransactionId>,
) -> Result<Response, Problem> {
    let client = service.client();
    let location = [(header::LOCATION, url(id))];
    let (code, mut body) = match wait {
        Some(wait) => match client.wait(id, wait).await {
            Ok(state) => (code, outcome(&state)),
            Err(multiagents::Error::Timeout { status, .. }) => (
                StatusCode::ACCEPTED,
                json!({"id": id, "status": status, "url": url(id)}),
            ),
            Err(e) => return Err(e.into()),
        },
        None => {
            let status = client
                .status(id)
                .await?
                .map_or(WorkflowStatus::Running, |s| s.status);
            (code, json!({"id": id, "status": status, "url": url(id)}))
        }
    };
    if let Some(old) = retry_of {
        body["retry_of"] = json!(old);
    }
    Ok((code, location, Json(body)).into_response())
}

/// `GET /v1/runs/{id}`: the run's state, steps and history.
pub(crate) async fn get(
    State(service): State<Service>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = run_id(&id)?;
    match service.client().status(id).await? {
        Some(state) => Ok(Json(view(&state)).into_response()),
        None => Err(Problem::not_found(format!(
            "no run {id} (it may have expired)"
        ))),
    }
}

/// `GET /v1/runs/{id}/outputs/{step}`: one completed step's output (or a
/// fan-out branch's, `step[i]`), as the step returned it: what an HTTP
/// worker reads when its task does not carry it.
pub(crate) async fn output(
    State(service): State<Service>,
    Path((id, step)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let id = run_id(&id)?;
    let states = &service.store().states;
    let found = states
        .step_output(id, &step)
        .await
        .map_err(multiagents::Error::from)?;
    match found {
        Some(p) => Ok((
            [(header::CONTENT_TYPE, "application/json")],
            p.as_str().to_string(),
        )
            .into_response()),
        None => match service.client().status(id).await? {
            None => Err(Problem::not_found(format!(
                "no run {id} (it may have expired)"
            ))),
            Some(state) if state.step(&step).is_none() => Err(Problem::not_found(format!(
                "run {id} has no step `{step}` (workflow `{}` version {})",
                state.workflow, state.version
            ))),
            Some(_) => Err(Problem::not_found(format!(
                "step `{step}` of run {id} has no output: it has not completed"
            ))),
        },
    }
}

#[derive(Deserialize)]
pub(crate) struct WaitQuery {
    wait: Option<String>,
}

/// `GET /v1/runs/{id}/result?wait=30s`: the outcome once the run has
/// finished, waiting for it at most `wait`; `202` while it runs.
pub(crate) async fn result(
    State(service): State<Service>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, Problem> {
    let id = run_id(&id)?;
    let wait = wait_of(&service, q.wait.as_deref())?.unwrap_or(Duration::ZERO);
    match service.client().wait(id, wait).await {
        Ok(state) => Ok(Json(outcome(&state)).into_response()),
        Err(multiagents::Error::Timeout { status, .. }) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": status, "url": url(id)})),
        )
            .into_response()),
        Err(multiagents::Error::NotFound(_)) => Err(Problem::not_found(format!(
            "no run {id} (it may have expired)"
        ))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
pub(crate) struct ListParams {
    status: Option<String>,
    workflow: Option<String>,
    correlation_id: Option<String>,
    started_after: Option<u64>,
    started_before: Option<u64>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// The cursor of the page after `summary`: opaque to clients.
fn cursor_of(summary: &multiagents::store::WorkflowSummary) -> String {
    format!(
        "{}.{}",
        summary.started_at.as_millis(),
        summary.transaction_id
    )
}

fn parse_cursor(text: &str) -> Result<(multiagents::core::Timestamp, TransactionId), Problem> {
    let bad = || {
        Problem::bad_request(
            "query.cursor",
            format!("`{text}` is not a cursor from a listing's `next`"),
        )
    };
    let (ms, id) = text.split_once('.').ok_or_else(bad)?;
    let ms = ms.parse::<u64>().map_err(|_| bad())?;
    let id = id.parse::<TransactionId>().map_err(|_| bad())?;
    Ok((multiagents::core::Timestamp(ms), id))
}

/// `GET /v1/runs?status=…&workflow=…&correlation_id=…&started_after=MS&
/// started_before=MS&cursor=…&limit=…`, newest first; `next` is the cursor
/// of the next page (null on the last).
pub(crate) async fn list(
    State(service): State<Service>,
    Query(q): Query<ListParams>,
) -> Result<Response, Problem> {
    let status = match &q.status {
        None => None,
        Some(s) => Some(
            s.parse::<WorkflowStatus>()
                .map_err(|e| Problem::bad_request("query.status", e.to_string()))?,
        ),
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(Problem::bad_request(
            "query.limit",
            format!("must be between 1 and 1000, not {limit}"),
        ));
    }
    let correlation_id = correlation_of(q.correlation_id.as_deref())?;
    let query = ListQuery {
        status,
        workflow: q.workflow.as_deref().map(WorkflowName::new),
        correlation_id,
        started_after: q.started_after.map(multiagents::core::Timestamp),
        started_before: q.started_before.map(multiagents::core::Timestamp),
        after: q.cursor.as_deref().map(parse_cursor).transpose()?,
        limit: limit + 1,
        ..Default::default()
    };
    let mut found = service.client().list(&query).await?;
    let next = (found.len() > limit).then(|| {
        found.truncate(limit);
        found.last().map(cursor_of)
    });
    let runs: Vec<Value> = found
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("id".into(), json!(s.transaction_id));
                m.insert("url".into(), json!(url(s.transaction_id)));
            }
            v
        })
        .collect();
    Ok(Json(json!({"runs": runs, "next": next.flatten()})).into_response())
}

#[derive(Deserialize)]
pub(crate) struct CountParams {
    workflow: Option<String>,
    correlation_id: Option<String>,
    started_after: Option<u64>,
    started_before: Option<u64>,
}

/// `GET /v1/runs/counts?workflow=…&correlation_id=…&started_after=MS&
/// started_before=MS`: how many runs there are in each status, and in all.
pub(crate) async fn counts(
    State(service): State<Service>,
    Query(q): Query<CountParams>,
) -> Result<Response, Problem> {
    let query = ListQuery {
        workflow: q.workflow.as_deref().map(WorkflowName::new),
        correlation_id: correlation_of(q.correlation_id.as_deref())?,
        started_after: q.started_after.map(multiagents::core::Timestamp),
        started_before: q.started_before.map(multiagents::core::Timestamp),
        ..Default::default()
    };
    // A count reads every run that matches: on a big store (Redis, say)
    // that is slow, and the dashboard asks again on every status change. An
    // answer is reused for five times what it took to make, at least 1 s.
    let key = format!(
        "{:?}/{:?}/{:?}/{:?}",
        q.workflow, q.correlation_id, q.started_after, q.started_before
    );
    if let Some(hit) = service.counts_cache().get(&key) {
        return Ok(Json(hit).into_response());
    }
    let began = std::time::Instant::now();
    let found = service.client().list(&query).await?;
    let mut by_status: serde_json::Map<String, Value> = WorkflowStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), json!(0)))
        .collect();
    for s in &found {
        if let Some(Value::Number(n)) = by_status.get_mut(s.status.as_str()) {
            *n = (n.as_u64().unwrap_or(0) + 1).into();
        }
    }
    let answer = json!({
        "total": found.len(),
        "by_status": by_status,
        "as_of": multiagents::core::Timestamp::now(),
    });
    service
        .counts_cache()
        .put(key, answer.clone(), began.elapsed());
    Ok(Json(answer).into_response())
}

/// Recent answers of `GET /v1/runs/counts`, by filter.
#[derive(Default)]
pub(crate) struct CountsCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Value)>>,
}

impl CountsCache {
    fn get(&self, key: &str) -> Option<Value> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (until, v) = entries.get(key)?;
        (std::time::Instant::now() < *until).then(|| v.clone())
    }

    fn put(&self, key: String, value: Value, took: Duration) {
        let keep = (took * 5).max(Duration::from_secs(1));
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        entries.retain(|_, (until, _)| *until > now);
        entries.insert(key, (now + keep, value));
    }
}

fn correlation_of(text: Option<&str>) -> Result<Option<CorrelationId>, Problem> {
    text.map(|c| {
        c.parse().map(CorrelationId).map_err(|e| {
            Problem::bad_request("query.correlation_id", format!("`{c}` is not a UUID: {e}"))
        })
    })
    .transpose()
}

#[derive(Deserialize, Default)]
pub(crate) struct CancelBody {
    reason: Option<String>,
}

/// `POST /v1/runs/{id}/cancel` with an optional `{"reason": …}`.
pub(crate) async fn cancel(
    State(service): State<Service>,
    Path(id): Path<String>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let id = run_id(&id)?;
    let body: CancelBody = json_body_or_default(&body, "not {\"reason\": …}")?;
    if service.client().status(id).await?.is_none() {
        return Err(Problem::not_found(format!("no run {id}")));
    }
    let reason = body
        .reason
        .unwrap_or_else(|| "cancelled over the API".into());
    let cancelled = service.client().cancel(id, &reason).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "cancelled": cancelled, "url": url(id)})),
    )
        .into_response())
}

/// `POST /v1/runs/{id}/signals/{name}`: the body is the signal's data.
pub(crate) async fn signal(
    State(service): State<Service>,
    Path((id, name)): Path<(String, String)>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let id = run_id(&id)?;
    let data: Value = json_body_or_default(&body, "the signal's data is not JSON")?;
    service.client().signal(id, &name, &data).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "signal": name, "url": url(id)})),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryBody {
    from_step: Option<String>,
    /// An RFC 7386 merge patch for the input.
    input: Option<Value>,
    /// `pinned` (the default) or `latest`.
    definition: Option<String>,
}

/// `POST /v1/runs/{id}/retry` with an optional
/// `{"from_step", "input": merge patch, "definition": "pinned|latest"}`:
/// a new run that keeps what stands of the old one and runs the rest again.
pub(crate) async fn retry(
    State(service): State<Service>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let id = run_id(&id)?;
    let body: RetryBody = json_body_or_default(
        &body,
        "not {\"from_step\": …, \"input\": merge patch, \"definition\": \"pinned|latest\"}",
    )?;
    let wait = wait_of(&service, q.wait.as_deref())?;
    let latest_definition = match body.definition.as_deref() {
        None | Some("pinned") => false,
        Some("latest") => true,
        Some(other) => {
            return Err(Problem::bad_request(
                "body.definition",
                format!("`{other}` is not pinned or latest"),
            ));
        }
    };
    let options = multiagents::RetryOptions {
        from_step: body.from_step,
        input_patch: body.input,
        latest_definition,
    };
    let new = service.client().retry(id, options).await?;
    answer_run(&service, new, StatusCode::CREATED, wait, Some(id)).await
}

//! Workers over HTTP, in any language: long-poll for tasks, heartbeat the
//! long ones, answer with an output or an error.
//!
//! A task is a command taken from the bus on the worker's behalf and held
//! under a lease: while the worker heartbeats (or answers) within
//! [`TaskOptions::lease`], the service extends the command's visibility on
//! the bus as a worker manager does; when the worker goes quiet, the service
//! stops extending, and the bus redelivers the command to the next poll, as
//! the same attempt under the same idempotency key. Tokens live in the
//! service's memory, so after a restart the bus redelivers every command
//! that was out, and the old tokens answer 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::extract::{Path, Text};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use multiagents::bus::{
    Bus, Consumer, Delivery, DeliveryId, RESULTS_TOPIC, WORKER_GROUP, command_topic_at,
};
use multiagents::core::{
    EventKind, Payload, Priority, RetryDirective, StepError, StepErrorKind, Timestamp, WorkerName,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::{Problem, Service, json_body};

/// How HTTP workers' tasks are leased.
#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// How long a task stays a worker's without a heartbeat or an answer
    /// (default 30 s). Past it, the command goes back to the bus.
    pub lease: Duration,
    /// The most tasks one poll returns (default 100).
    pub max_batch: usize,
    /// The longest a poll waits for a task (default 60 s).
    pub max_wait: Duration,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            max_batch: 100,
            max_wait: Duration::from_secs(60),
        }
    }
}

/// One worker type's consumers, highest priority first.
type Levels = Arc<Vec<Arc<dyn Consumer>>>;

struct Held {
    /// The worker type it was polled for.
    worker: Arc<str>,
    consumer: Arc<dyn Consumer>,
    delivery: Delivery,
    until: Instant,
    picked_up_at: Timestamp,
}

pub(crate) struct Tasks {
    bus: Bus,
    instance: String,
    options: TaskOptions,
    consumers: tokio::sync::Mutex<HashMap<String, Levels>>,
    held: Mutex<HashMap<String, Held>>,
    extender: std::sync::OnceLock<()>,
    /// What the HTTP workers did, for their heartbeats.
    health: Arc<crate::http_health::HttpHealth>,
}

impl Tasks {
    pub(crate) fn new(bus: Bus, options: TaskOptions) -> Arc<Self> {
        Arc::new(Self {
            bus,
            instance: format!("http-{}", std::process::id()),
            options,
            consumers: tokio::sync::Mutex::default(),
            held: Mutex::default(),
            extender: std::sync::OnceLock::new(),
            health: Arc::default(),
        })
    }

    /// Records the HTTP workers' heartbeats in `records` while this lives.
    pub(crate) fn heartbeat_into(&self, records: Arc<dyn multiagents::store::HealthRecords>) {
        crate::http_health::HttpHealth::start(
            Arc::downgrade(&self.health),
            records,
            self.instance.clone(),
        );
    }

    pub(crate) fn bus(&self) -> &Bus {
        &self.bus
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn levels(&self, worker: &str) -> Result<Levels, Problem> {
        let mut consumers = self.consumers.lock().await;
        if let Some(levels) = consumers.get(worker) {
            return Ok(levels.clone());
        }
        let name = WorkerName::new(worker);
        let mut levels = Vec::new();
        for priority in Priority::ALL {
            let consumer = self
                .bus
                .topics
                .consumer(
                    &command_topic_at(&name, priority),
                    WORKER_GROUP,
                    &self.instance,
                )
                .await
                .map_err(multiagents::Error::from)?;
            levels.push(consumer);
        }
        let levels = Arc::new(levels);
        consumers.insert(worker.to_string(), levels.clone());
        Ok(levels)
    }

    /// Extends, every beat, the visibility of every task whose lease holds,
    /// and lets go of the others.
    fn start_extender(self: &Arc<Self>, beat: Duration) {
        self.extender.get_or_init(|| {
            let tasks: Weak<Self> = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(beat).await;
                    let Some(tasks) = tasks.upgrade() else { return };
                    let now = Instant::now();
                    let mut by_consumer: Vec<(Arc<dyn Consumer>, Vec<multiagents::bus::DeliveryId>)> =
                        Vec::new();
                    {
                        let mut held = tasks.held();
                        held.retain(|token, h| {
                            if h.until <= now {
                                tasks.health.let_go(&h.worker);
                                tracing::info!(token = %&token[..8], transaction_id = %h.delivery.event.transaction_id, "an HTTP worker's lease lapsed; its command goes back to the bus");
                                return false;
                            }
                            match by_consumer.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &h.consumer)) {
                                Some((_, ids)) => ids.push(h.delivery.id.clone()),
                                None => by_consumer.push((h.consumer.clone(), vec![h.delivery.id.clone()])),
                            }
                            true
                        });
                    }
                    for (consumer, ids) in by_consumer {
                        if let Err(e) = consumer.extend(&ids).await {
                            tracing::warn!(error = %e, tasks = ids.len(), "extending HTTP workers' tasks failed");
                        }
                    }
                }
            });
        });
    }
}

#[derive(Deserialize)]
pub(crate) struct PollBody {
    workers: Vec<String>,
    #[serde(default)]
    max: Option<usize>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// The command's input and the outputs of the steps before it.
fn split_payload(payload: &str) -> Result<(Value, Value), String> {
    #[derive(Deserialize)]
    struct Doc<'a> {
        #[serde(borrow)]
        input: &'a RawValue,
        #[serde(borrow, default)]
        steps: Option<&'a RawValue>,
    }
    let doc: Doc<'_> = serde_json::from_str(payload).map_err(|e| e.to_string())?;
    let input = serde_json::from_str(doc.input.get()).map_err(|e| e.to_string())?;
    let steps = match doc.steps {
        Some(s) => serde_json::from_str(s.get()).map_err(|e| e.to_string())?,
        None => json!({}),
    };
    Ok((input, steps))
}

/// `POST /v1/tasks/poll`: `{"workers": [names], "max": N, "wait_ms": N}`.
pub(crate) async fn poll(
    State(service): State<Service>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let tasks = service.tasks();
    let body: PollBody = json_body(&body, r#"not {"workers": [names], "max": N, "wait_ms": N}"#)?;
    if body.workers.is_empty() || body.workers.iter().any(|w| w.trim().is_empty()) {
        return Err(Problem::bad_request(
            "body.workers",
            "name at least one worker, and no empty names",
        ));
    }
    let max = body.max.unwrap_or(1);
    if max == 0 || max > tasks.options.max_batch {
        return Err(Problem::bad_request(
            "body.max",
            format!(
                "must be between 1 and {}, not {max}",
                tasks.options.max_batch
            ),
        ));
    }
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(0))
        .min(tasks.options.max_wait)
        .min(service.max_wait());
    let deadline = Instant::now() + wait;
    let mut workers = Vec::new();
    for name in &body.workers {
        workers.push((name.clone(), tasks.levels(name).await?));
        tasks.health.polled(name);
    }
    if let Some((_, levels)) = workers.first() {
        tasks.start_extender(levels[0].extend_every().min(tasks.options.lease / 3));
    }
    let mut taken: Vec<(String, Arc<dyn Consumer>, Delivery)> = Vec::new();
    loop {
        for (name, levels) in &workers {
            for consumer in levels.iter() {
                let room = max - taken.len();
                if room == 0 {
                    break;
                }
                let batch = consumer
                    .next_batch(room, Duration::ZERO)
                    .await
                    .map_err(multiagents::Error::from)?;
                taken.extend(
                    batch
                        .into_iter()
                        .map(|d| (name.clone(), consumer.clone(), d)),
                );
            }
        }
        let now = Instant::now();
        if !taken.is_empty() || now >= deadline {
            break;
        }
        // Nothing yet: wait on each worker's normal topic in turn.
        let slice = (deadline - now).min(Duration::from_millis(50));
        for (name, levels) in &workers {
            let batch = levels[1]
                .next_batch(max - taken.len(), slice / workers.len() as u32)
                .await
                .map_err(multiagents::Error::from)?;
            taken.extend(
                batch
                    .into_iter()
                    .map(|d| (name.clone(), levels[1].clone(), d)),
            );
            if taken.len() >= max {
                break;
            }
        }
        if !taken.is_empty() {
            break;
        }
    }
    let picked_up_at = Timestamp::now();
    let mut out = Vec::new();
    for (worker, consumer, delivery) in taken {
        let event = &delivery.event;
        let command = matches!(event.kind, EventKind::Command | EventKind::Compensation);
        let parts = split_payload(event.payload.as_str());
        let (Some(step), true, Ok((input, steps))) = (event.step.clone(), command, parts) else {
            let reason = format!(
                "an HTTP worker for `{worker}` was handed a {:?} event that is not a command with {{\"input\", \"steps\"}}",
                event.kind
            );
            let _ = consumer.reject(&delivery, &reason).await;
            continue;
        };
        // A redelivered command whose workflow no longer waits for this
        // attempt (given up on, answered meanwhile, finished) is acked and
        // not handed out: one store read, only on redeliveries.
        if delivery.delivery_count > 1 {
            let awaited = match service.client().status(event.transaction_id).await {
                Ok(Some(state)) => state.awaits(step.as_str(), event.phase, event.attempt),
                Ok(None) => false,
                // The store cannot tell: hand it out; the key keeps the effect single.
                Err(_) => true,
            };
            if !awaited {
                tracing::info!(transaction_id = %event.transaction_id, step = %step, attempt = event.attempt, "redelivered command dropped: its workflow no longer waits for this attempt");
                let _ = consumer.ack(std::slice::from_ref(&delivery.id)).await;
                continue;
            }
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        out.push(json!({
            "token": token,
            "worker": worker,
            "workflow": event.workflow,
            "transaction_id": event.transaction_id,
            "correlation_id": event.correlation_id,
            "step": step,
            "phase": event.phase,
            "attempt": event.attempt,
            "delivery_count": delivery.delivery_count,
            "idempotency_key": event.idempotency_key(),
            "attempt_key": event.attempt_key(),
            "deadline": event.deadline,
            "lease_ms": tasks.options.lease.as_millis() as u64,
            "input": input,
            "steps": steps,
        }));
        tasks.health.handed_out(&worker);
        tasks.held().insert(
            token,
            Held {
                worker: Arc::from(worker.as_str()),
                consumer,
                delivery,
                until: Instant::now() + tasks.options.lease,
                picked_up_at,
            },
        );
    }
    Ok(Json(json!({"tasks": out})).into_response())
}

fn lapsed(token: &str) -> Problem {
    Problem::not_found(format!(
        "no task holds token `{token}`: it was answered, or its lease lapsed and its command went back to the bus"
    ))
    .field("path.token")
}

/// `POST /v1/tasks/{token}/heartbeat`: the task stays this worker's.
pub(crate) async fn heartbeat(
    State(service): State<Service>,
    Path(token): Path<String>,
) -> Result<Response, Problem> {
    let tasks = service.tasks();
    let mut held = tasks.held();
    let h = held.get_mut(&token).ok_or_else(|| lapsed(&token))?;
    h.until = Instant::now() + tasks.options.lease;
    Ok(Json(json!({"lease_ms": tasks.options.lease.as_millis() as u64})).into_response())
}

async fn answer(
    service: &Service,
    token: &str,
    kind: EventKind,
    payload: Payload,
) -> Result<Response, Problem> {
    let tasks = service.tasks();
    let held = tasks.held().remove(token).ok_or_else(|| lapsed(token))?;
    let reply = tasks.reply(&held, kind, payload);
    // A lost connection comes back by itself: keep trying a little, as a
    // worker process does, before answering 503.
    let answers = [(RESULTS_TOPIC.to_string(), reply)];
    let ids = std::slice::from_ref(&held.delivery.id);
    let sent = multiagents::bus::retry_transient(PUBLISH_RETRY, || {
        held.consumer.publish_then_ack(&answers, ids)
    })
    .await;
    match sent {
        Ok(()) => {
            tasks.answered(&held, &answers[0].1);
            Ok((StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response())
        }
        Err(e) => {
            // Not published: the task stays the worker's (its lease runs on),
            // so the same answer may be sent again with the same token.
            tasks.held().insert(token.to_string(), held);
            Err(multiagents::Error::from(e).into())
        }
    }
}

impl Tasks {
    /// Counts a held task's answer, once the bus has taken it (an answer
    /// sent again after a failed publish counts once).
    fn answered(&self, held: &Held, reply: &multiagents::core::Event) {
        let error = (reply.kind == EventKind::Error)
            .then(|| reply.payload.parse::<StepError>().ok())
            .flatten();
        let took = Timestamp::now()
            .as_millis()
            .saturating_sub(held.picked_up_at.as_millis());
        self.health
            .answered(&held.worker, Duration::from_millis(took), error.as_ref());
    }

    /// The answer to a held task's command.
    fn reply(&self, held: &Held, kind: EventKind, payload: Payload) -> multiagents::core::Event {
        let mut reply = held.delivery.event.answer(kind, payload);
        reply.timing = Some(multiagents::core::Timing {
            instance: Arc::from(self.instance.as_str()),
            picked_up_at: held.picked_up_at,
            started_at: held.picked_up_at,
            finished_at: Timestamp::now(),
        });
        reply
    }
}

/// How long an answer is retried against a bus that does not answer.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
pub(crate) struct CompleteBody {
    output: Option<Box<RawValue>>,
}

/// `POST /v1/tasks/{token}/complete` with `{"output": …}`.
pub(crate) async fn complete(
    State(service): State<Service>,
    Path(token): Path<String>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let body: CompleteBody = json_body(&body, r#"not {"output": …}"#)?;
    let output = match body.output {
        Some(raw) => Payload::from_raw(raw),
        None => Payload::null(),
    };
    answer(&service, &token, EventKind::Result, output).await
}

#[derive(Deserialize)]
pub(crate) struct FailBody {
    error: String,
    kind: Option<String>,
    retry: Option<String>,
    retry_after_ms: Option<u64>,
}

/// `POST /v1/tasks/{token}/fail` with `{"error", "kind", "retry":
/// "yes|no|after", "retry_after_ms"}`.
pub(crate) async fn fail(
    State(service): State<Service>,
    Path(token): Path<String>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let body: FailBody = json_body(
        &body,
        r#"not {"error": "…", "kind", "retry", "retry_after_ms"}"#,
    )?;
    let payload = failure_payload(body, "body")?;
    answer(&service, &token, EventKind::Error, payload).await
}

/// The error a worker reports, as the payload of its answer; `at` is where
/// in the request the failure is (`body`, `body.answers[3]`).
fn failure_payload(body: FailBody, at: &str) -> Result<Payload, Problem> {
    let retry = match (body.retry.as_deref().unwrap_or("yes"), body.retry_after_ms) {
        ("yes", _) => RetryDirective::Retry,
        ("no", _) => RetryDirective::Never,
        ("after", Some(ms)) => RetryDirective::RetryAfter(ms),
        ("after", None) => {
            return Err(Problem::bad_request(
                &format!("{at}.retry_after_ms"),
                "`retry: after` needs retry_after_ms",
            ));
        }
        (other, _) => {
            return Err(Problem::bad_request(
                &format!("{at}.retry"),
                format!("`{other}` is not yes, no or after"),
            ));
        }
    };
    let error = StepError {
        message: body.error,
        retry,
        kind: body.kind.map(StepErrorKind::from),
    };
    Payload::to_json(&error).map_err(|e| Problem::bad_request(at, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnswerItem {
    token: String,
    output: Option<Box<RawValue>>,
    error: Option<String>,
    kind: Option<String>,
    retry: Option<String>,
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnswersBody {
    answers: Vec<AnswerItem>,
}

/// An answer ready to go: its token, its task and the event.
type Answered = (String, Held, multiagents::core::Event);

/// The most answers one batch may carry.
const MAX_ANSWERS: usize = 1000;

/// `POST /v1/tasks/answers` with `{"answers": [{"token", "output"} |
/// {"token", "error", "kind", "retry", "retry_after_ms"}]}`: many tasks
/// answered at once, in one bus round trip per topic. The reply says, per
/// token, what `complete` or `fail` would have: `202`, or a problem's status
/// and detail (the other answers still go).
pub(crate) async fn answers(
    State(service): State<Service>,
    Text(body): Text,
) -> Result<Response, Problem> {
    let body: AnswersBody = json_body(
        &body,
        r#"not {"answers": [{"token", "output"} or {"token", "error", "kind", "retry", "retry_after_ms"}]}"#,
    )?;
    if body.answers.len() > MAX_ANSWERS {
        return Err(Problem::bad_request(
            "body.answers",
            format!(
                "at most {MAX_ANSWERS} answers a batch, not {}",
                body.answers.len()
            ),
        ));
    }
    let tasks = service.tasks();
    let mut results: Vec<Value> = Vec::with_capacity(body.answers.len());
    // Answers by the consumer that holds their task.
    let mut groups: Vec<(Arc<dyn Consumer>, Vec<Answered>)> = Vec::new();
    for (i, item) in body.answers.into_iter().enumerate() {
        let token = item.token.clone();
        let built = match item.error {
            None => Ok((
                EventKind::Result,
                item.output.map_or_else(Payload::null, Payload::from_raw),
            )),
            Some(error) => failure_payload(
                FailBody {
                    error,
                    kind: item.kind,
                    retry: item.retry,
                    retry_after_ms: item.retry_after_ms,
                },
                &format!("body.answers[{i}]"),
            )
            .map(|p| (EventKind::Error, p)),
        };
        let (kind, payload) = match built {
            Ok(b) => b,
            Err(p) => {
                results.push(json!({"token": token, "status": p.status, "detail": p.detail, "field": p.field}));
                continue;
            }
        };
        let Some(held) = tasks.held().remove(&token) else {
            let p = lapsed(&token);
            results.push(json!({"token": token, "status": p.status, "detail": p.detail}));
            continue;
        };
        let reply = tasks.reply(&held, kind, payload);
        results.push(json!({"token": token, "status": 202}));
        match groups
            .iter_mut()
            .find(|(c, _)| Arc::ptr_eq(c, &held.consumer))
        {
            Some((_, list)) => list.push((token, held, reply)),
            None => groups.push((held.consumer.clone(), vec![(token, held, reply)])),
        }
    }
    for (consumer, list) in groups {
        let events: Vec<(String, multiagents::core::Event)> = list
            .iter()
            .map(|(_, _, reply)| (RESULTS_TOPIC.to_string(), reply.clone()))
            .collect();
        let ids: Vec<DeliveryId> = list.iter().map(|(_, h, _)| h.delivery.id.clone()).collect();
        let sent = multiagents::bus::retry_transient(PUBLISH_RETRY, || {
            consumer.publish_then_ack(&events, &ids)
        })
        .await;
        if sent.is_ok() {
            for (_, h, reply) in &list {
                tasks.answered(h, reply);
            }
        }
        if let Err(e) = sent {
            let p = Problem::from(multiagents::Error::from(e));
            let mut held = tasks.held();
            for (token, h, _) in list {
                if let Some(r) = results.iter_mut().find(|r| r["token"] == token.as_str()) {
                    *r = json!({"token": token, "status": p.status, "detail": p.detail});
                }
                held.insert(token, h);
            }
        }
    }
    Ok(Json(json!({"results": results})).into_response())
}

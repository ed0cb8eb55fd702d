//! The route table: every operation of the API with its handler and its
//! description. The router and the OpenAPI 3.1 document (`/openapi.json`)
//! are both made from it, so the document cannot leave a route out or
//! describe one that is not there.

use axum::Router;
use axum::routing::{MethodRouter, delete, get, post};
use serde_json::{Map, Value, json};

use crate::{Service, auth, events, ops, runs, stats, tasks, timeline};

/// One operation: a method on a path, its handler and what the document
/// says of it.
pub(crate) struct Op {
    method: &'static str,
    path: &'static str,
    handler: MethodRouter<Service>,
    doc: Map<String, Value>,
}

impl Op {
    fn new(
        method: &'static str,
        path: &'static str,
        handler: MethodRouter<Service>,
        id: &str,
        tag: &str,
        summary: &str,
    ) -> Self {
        let mut doc = Map::new();
        doc.insert("operationId".into(), json!(id));
        doc.insert("tags".into(), json!([tag]));
        doc.insert("summary".into(), json!(summary));
        doc.insert("responses".into(), json!({}));
        // Path parameters, from the template.
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                let schema = if name == "id" && path.starts_with("/v1/runs") {
                    json!({"type": "string", "format": "uuid"})
                } else {
                    json!({"type": "string", "minLength": 1})
                };
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        if !params.is_empty() {
            doc.insert("parameters".into(), Value::Array(params));
        }
        Self {
            method,
            path,
            handler,
            doc,
        }
    }

    /// Says what the operation does, at more length.
    fn describe(mut self, text: &str) -> Self {
        self.doc.insert("description".into(), json!(text));
        self
    }

    fn param(mut self, place: &str, name: &str, schema: Value, text: &str) -> Self {
        let list = self.doc.entry("parameters").or_insert_with(|| json!([]));
        if let Value::Array(l) = list {
            l.push(json!({"name": name, "in": place, "schema": schema, "description": text}));
        }
        self
    }

    fn query(self, name: &str, schema: Value, text: &str) -> Self {
        self.param("query", name, schema, text)
    }

    fn header(self, name: &str, schema: Value, text: &str) -> Self {
        self.param("header", name, schema, text)
    }

    /// A JSON body of `schema`; `required` when it may not be empty.
    fn body(mut self, schema: Value, required: bool) -> Self {
        self.doc.insert(
            "requestBody".into(),
            json!({"required": required, "content": {"application/json": {"schema": schema}}}),
        );
        self
    }

    fn raw_body(mut self, content: Value) -> Self {
        self.doc.insert(
            "requestBody".into(),
            json!({"required": true, "content": content}),
        );
        self
    }

    /// A response of `status` with a JSON body of `schema`.
    fn answers(self, status: u16, text: &str, schema: Value) -> Self {
        self.respond(
            status,
            json!({"description": text, "content": {"application/json": {"schema": schema}}}),
        )
    }

    fn text(self, status: u16, text: &str, media: &str) -> Self {
        self.respond(
            status,
            json!({"description": text, "content": {media: {"schema": {"type": "string"}}}}),
        )
    }

    /// A problem+json response of `status`: when it happens.
    fn problem(self, status: u16, text: &str) -> Self {
        self.respond(
            status,
            json!({"$ref": format!("#/components/responses/Problem{status}"), "description": text}),
        )
    }

    fn respond(mut self, status: u16, response: Value) -> Self {
        if let Some(Value::Object(r)) = self.doc.get_mut("responses") {
            r.insert(status.to_string(), response);
        }
        self
    }

    fn public(mut self) -> Self {
        self.doc.insert("security".into(), json!([]));
        self
    }
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn wait_param() -> Value {
    json!({"type": "string", "pattern": "^[0-9]+(ms|s|m)$", "examples": ["30s", "500ms"]})
}

/// Every operation, in the order the document lists them.
pub(crate) fn operations() -> Vec<Op> {
    let name = json!({"type": "string", "minLength": 1});
    let limit = |max: u32, default: u32| json!({"type": "integer", "minimum": 1, "maximum": max, "default": default});
    vec![
        Op::new("get", "/healthz", get(|| async { "ok" }), "healthz", "operations", "Liveness: the process answers")
            .public()
            .text(200, "ok", "text/plain"),
        Op::new("get", "/readyz", get(crate::readyz), "readyz", "operations", "Readiness: the store answers")
            .public()
            .text(200, "ready", "text/plain")
            .problem(503, "the store does not answer"),
        Op::new("get", "/metrics", get(crate::metrics), "metrics", "operations", "Prometheus metrics")
            .text(200, "the metrics, in the Prometheus text format", "text/plain"),
        Op::new("get", "/openapi.json", get(document_route), "openapi", "operations", "This document")
            .public()
            .answers(200, "the OpenAPI 3.1 document", json!({"type": "object"})),
        Op::new("get", "/v1/me", get(auth::me), "me", "operations", "The caller's key name and scopes")
            .answers(200, "who is calling", schema("Me")),
        // Definitions.
        Op::new("post", "/v1/definitions", post(crate::deploy), "deployDefinition", "definitions", "Deploy a workflow definition")
            .describe("The body is the definition as JSON, or as YAML (Content-Type application/yaml, or any body that is not a JSON object).")
            .raw_body(json!({
                "application/json": {"schema": schema("Definition")},
                "application/yaml": {"schema": {"type": "string"}},
            }))
            .answers(201, "deployed", json!({"type": "object", "required": ["name", "version"], "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}}))
            .problem(400, "the body is empty")
            .problem(409, "another definition is deployed under this version")
            .problem(422, "the definition is invalid; the detail names the culprit"),
        Op::new("get", "/v1/definitions", get(crate::definitions), "listDefinitions", "definitions", "Every deployed definition, with its versions")
            .answers(200, "the definitions", schema("DefinitionList")),
        Op::new("get", "/v1/definitions/{name}", get(crate::definition), "getDefinition", "definitions", "One definition: the latest version, or ?version=N")
            .query("version", json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}), "a version (default: the latest)")
            .answers(200, "the definition", schema("Definition"))
            .problem(400, "the version is not a number")
            .problem(404, "no such definition"),
        Op::new("get", "/v1/definitions/{name}/diagram", get(crate::diagram), "getDefinitionDiagram", "definitions", "A definition's diagram, as Mermaid or ASCII")
            .query("format", json!({"type": "string", "enum": ["mermaid", "ascii"], "default": "mermaid"}), "the drawing's format")
            .query("version", json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}), "a version (default: the latest)")
            .text(200, "the diagram", "text/plain")
            .problem(400, "an unknown format")
            .problem(404, "no such definition"),
        // Runs.
        Op::new("post", "/v1/workflows/{name}/runs", post(runs::start), "startRun", "runs", "Start a run; the body is its input")
            .describe("With an Idempotency-Key, the same key (for the same workflow) gives the same run: 200 instead of 201. With ?wait, the answer is the outcome when the run ends in time, else 202.")
            .header("Idempotency-Key", json!({"type": "string", "minLength": 1, "maxLength": 255}), "makes the start idempotent")
            .query("wait", wait_param(), "wait this long for the outcome (at most 5 minutes)")
            .query("version", json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}), "run this version (default: the latest)")
            .query("priority", json!({"type": "string", "enum": ["high", "normal", "low"]}), "its priority")
            .query("correlation_id", json!({"type": "string", "format": "uuid"}), "join this request chain")
            .query("on_conflict", json!({"type": "string", "enum": ["return_existing", "fail"]}), "what a known Idempotency-Key does")
            .body(json!({}), false)
            .answers(201, "started (with ?wait: finished)", schema("RunOutcome"))
            .answers(200, "the run of this Idempotency-Key", schema("RunOutcome"))
            .answers(202, "started, and still running after ?wait", schema("RunRef"))
            .problem(400, "a malformed query, header or body")
            .problem(404, "no such workflow")
            .problem(409, "the Idempotency-Key is taken (on_conflict=fail, or another workflow)")
            .problem(413, "the input is over the size limit"),
        Op::new("get", "/v1/runs", get(runs::list), "listRuns", "runs", "List runs, newest first, a page at a time")
            .query("status", schema("Status"), "only runs in this status")
            .query("workflow", name.clone(), "only runs of this workflow")
            .query("correlation_id", json!({"type": "string", "format": "uuid"}), "only runs of this request chain")
            .query("started_after", json!({"type": "integer", "minimum": 0}), "only runs started at or after this time (ms since the epoch)")
            .query("started_before", json!({"type": "integer", "minimum": 0}), "only runs started before this time (ms since the epoch)")
            .query("cursor", json!({"type": "string", "pattern": "^[0-9]{1,19}\\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"}), "the `next` of the previous page")
            .query("limit", limit(1000, 100), "at most this many")
            .answers(200, "a page of runs", schema("RunList"))
            .problem(400, "a malformed filter, cursor or limit"),
        Op::new("get", "/v1/runs/counts", get(runs::counts), "countRuns", "runs", "How many runs there are in each status")
            .query("workflow", name.clone(), "only runs of this workflow")
            .query("correlation_id", json!({"type": "string", "format": "uuid"}), "only runs of this request chain")
            .query("started_after", json!({"type": "integer", "minimum": 0}), "only runs started at or after this time (ms since the epoch)")
            .query("started_before", json!({"type": "integer", "minimum": 0}), "only runs started before this time (ms since the epoch)")
            .answers(200, "the counts", json!({"type": "object", "required": ["total", "by_status"], "properties": {"total": {"type": "integer"}, "by_status": {"type": "object", "additionalProperties": {"type": "integer"}}}}))
            .problem(400, "a malformed filter"),
        Op::new("get", "/v1/runs/{id}", get(runs::get), "getRun", "runs", "A run: its state, steps and history")
            .answers(200, "the run", schema("Run"))
            .problem(400, "not a run id")
            .problem(404, "no such run"),
        Op::new("get", "/v1/runs/{id}/result", get(runs::result), "getRunResult", "runs", "A run's outcome, waiting for it with ?wait")
            .query("wait", wait_param(), "wait this long for the run to finish")
            .answers(200, "the outcome", schema("RunOutcome"))
            .answers(202, "still running", schema("RunRef"))
            .problem(400, "not a run id, or a malformed wait")
            .problem(404, "no such run"),
        Op::new("get", "/v1/runs/{id}/outputs/{step}", get(runs::output), "getRunOutput", "runs", "One completed step's output, as the step returned it")
            .describe("A task carries the outputs of the steps its step comes after (and of its `input_from` step, and its own when undoing it). An HTTP worker reads any other earlier output here. `step` may be a fan-out branch, `step[i]`.")
            .answers(200, "the output (any JSON)", json!({}))
            .problem(400, "not a run id")
            .problem(404, "no such run, no such step, or the step has not completed"),
        Op::new("get", "/v1/runs/{id}/timeline", get(timeline::route), "getRunTimeline", "runs", "A run as a timeline: a lane per step, a bar per attempt, wait, sub-workflow and compensation")
            .describe("Each lane has the step's kind, status, input, output, token use (LLM steps) and bars; each bar its kind (attempt, wait, workflow, compensation, skipped), phase, attempt, start and end (ms since the epoch), outcome, error and, once answered, the worker process and its pickup, start and finish times.")
            .answers(200, "the timeline", schema("Timeline"))
            .problem(400, "not a run id")
            .problem(404, "no such run"),
        Op::new("post", "/v1/runs/{id}/cancel", post(runs::cancel), "cancelRun", "runs", "Cancel a run: completed steps are compensated")
            .body(json!({"type": "object", "properties": {"reason": {"type": "string"}}}), false)
            .answers(202, "asked", json!({"type": "object", "properties": {"id": {"type": "string"}, "cancelled": {"type": "boolean"}, "url": {"type": "string"}}}))
            .problem(400, "not a run id, or a malformed body")
            .problem(404, "no such run"),
        Op::new("post", "/v1/runs/{id}/signals/{name}", post(runs::signal), "signalRun", "runs", "Send a signal; the body is its data")
            .body(json!({}), false)
            .answers(202, "taken", json!({"type": "object"}))
            .problem(400, "not a run id, or a malformed body")
            .problem(404, "no such run")
            .problem(409, "the run waits for no such signal, or has finished"),
        Op::new("post", "/v1/runs/{id}/retry", post(runs::retry), "retryRun", "runs", "Retry a failed, compensated, timed-out or cancelled run")
            .describe("A new run that keeps what the old one finished and still stands, and runs the rest again from the failed step (or from_step), with the input patched by an RFC 7386 merge patch.")
            .query("wait", wait_param(), "wait this long for the new run's outcome")
            .body(schema("RetryRequest"), false)
            .answers(201, "the new run (with ?wait: finished)", schema("RunOutcome"))
            .answers(202, "the new run, still running after ?wait", schema("RunRef"))
            .problem(400, "not a run id, or a malformed body")
            .problem(404, "no such run")
            .problem(409, "the run cannot be retried: the detail says why")
            .problem(422, "from_step names no step"),
        Op::new("get", "/v1/runs/{id}/events", get(events::run), "streamRunEvents", "events", "A run's history as Server-Sent Events, live")
            .describe("Event `history` per history entry (id = its index), then `end`. Resume with Last-Event-ID.")
            .header("Last-Event-ID", json!({"type": "string", "pattern": "^[0-9]+$"}), "the last entry seen")
            .text(200, "the stream", "text/event-stream")
            .problem(400, "not a run id, or a malformed Last-Event-ID")
            .problem(404, "no such run"),
        Op::new("get", "/v1/events", get(events::all), "streamEvents", "events", "Every run's status changes as Server-Sent Events, live")
            .describe("Event `status` per change (id = BOOT-SEQ); `reset` when the stream cannot resume from Last-Event-ID; `gap` when broadcasts were missed.")
            .query("workflow", name.clone(), "only runs of this workflow")
            .header("Last-Event-ID", json!({"type": "string"}), "the last event seen")
            .text(200, "the stream", "text/event-stream"),
        // Dead letters.
        Op::new("get", "/v1/dead-letters", get(ops::dead_letters), "listDeadLetters", "dead-letters", "Dead letters, newest first")
            .query("limit", limit(1000, 100), "at most this many")
            .answers(200, "the dead letters", json!({"type": "object", "required": ["dead_letters"], "properties": {"dead_letters": {"type": "array", "items": schema("DeadLetter")}}}))
            .problem(400, "a limit out of range"),
        Op::new("post", "/v1/dead-letters/redrive", post(ops::redrive_bulk), "redriveDeadLetters", "dead-letters", "Redrive every dead letter that matches a filter, or count them")
            .body(schema("BulkRedrive"), false)
            .answers(200, "what was (or would be) redriven", json!({"type": "object", "required": ["dry_run", "matched"]}))
            .problem(400, "a malformed body"),
        Op::new("get", "/v1/dead-letters/audit", get(ops::audit), "listDeadLetterAudit", "dead-letters", "Settled dead letters, newest first")
            .query("limit", limit(1000, 100), "at most this many")
            .answers(200, "the audit log", json!({"type": "object", "required": ["audit"]}))
            .problem(400, "a limit out of range"),
        Op::new("get", "/v1/dead-letters/{id}", get(ops::dead_letter), "getDeadLetter", "dead-letters", "One dead letter")
            .answers(200, "the dead letter", schema("DeadLetter"))
            .problem(404, "no such dead letter"),
        Op::new("delete", "/v1/dead-letters/{id}", delete(ops::discard), "discardDeadLetter", "dead-letters", "Discard a dead letter; it is kept in the audit log")
            .body(json!({"type": "object", "additionalProperties": false, "properties": {"reason": {"type": "string"}}}), false)
            .answers(200, "discarded", json!({"type": "object"}))
            .problem(400, "a malformed body")
            .problem(404, "no such dead letter"),
        Op::new("post", "/v1/dead-letters/{id}/redrive", post(ops::redrive), "redriveDeadLetter", "dead-letters", "Send a dead letter back to be processed, optionally edited")
            .body(json!({"type": "object", "additionalProperties": false, "maxProperties": 1, "properties": {"payload": {}, "body": {}}}), false)
            .answers(202, "redriven", json!({"type": "object", "required": ["id", "topic"]}))
            .problem(400, "a malformed body")
            .problem(404, "no such dead letter")
            .problem(409, "it cannot be redriven as it is: the detail says why")
            .problem(422, "the edit cannot be applied"),
        Op::new("get", "/v1/stats", get(stats::route), "getStats", "operations", "The last hour of this process: workflows started and finished per second, step latency percentiles")
            .describe("One point per 5-second interval, sampled from this process's own metrics (empty until metrics are recorded).")
            .answers(200, "the points", json!({"type": "object", "required": ["interval_ms", "points"]})),
        // Workers.
        Op::new("get", "/v1/workers", get(ops::workers), "listWorkers", "workers", "Worker health per type and process, and lag per topic")
            .answers(200, "the workers", json!({"type": "object", "required": ["workers"]})),
        Op::new("post", "/v1/tasks/poll", post(tasks::poll), "pollTasks", "tasks", "Take tasks for these workers, long-polling")
            .body(schema("Poll"), true)
            .answers(200, "the tasks, leased to the caller", json!({"type": "object", "required": ["tasks"], "properties": {"tasks": {"type": "array", "items": schema("Task")}}}))
            .problem(400, "a malformed body"),
        Op::new("post", "/v1/tasks/answers", post(tasks::answers), "answerTasks", "tasks", "Answer many tasks at once")
            .body(json!({"type": "object", "additionalProperties": false, "required": ["answers"], "properties": {"answers": {"type": "array", "maxItems": 1000, "items": schema("Answer")}}}), true)
            .answers(200, "a status per answer", json!({"type": "object", "required": ["results"]}))
            .problem(400, "a malformed body"),
        Op::new("post", "/v1/tasks/{token}/heartbeat", post(tasks::heartbeat), "heartbeatTask", "tasks", "Keep a task for another lease")
            .answers(200, "kept", json!({"type": "object", "properties": {"lease_ms": {"type": "integer"}}}))
            .problem(404, "the token is spent or its lease lapsed"),
        Op::new("post", "/v1/tasks/{token}/complete", post(tasks::complete), "completeTask", "tasks", "Answer a task with its output")
            .body(json!({"type": "object", "properties": {"output": {}}}), true)
            .answers(202, "taken", json!({"type": "object"}))
            .problem(400, "a malformed body")
            .problem(404, "the token is spent or its lease lapsed")
            .problem(413, "the output is over the size limit")
            .problem(503, "the bus did not take the answer; send it again"),
        Op::new("post", "/v1/tasks/{token}/fail", post(tasks::fail), "failTask", "tasks", "Answer a task with an error and retry advice")
            .body(schema("Failure"), true)
            .answers(202, "taken", json!({"type": "object"}))
            .problem(400, "a malformed body")
            .problem(404, "the token is spent or its lease lapsed")
            .problem(503, "the bus did not take the answer; send it again"),
    ]
}

/// The router of every operation.
pub(crate) fn routes() -> Router<Service> {
    let mut router = Router::new();
    for op in operations() {
        router = router.route(op.path, op.handler);
    }
    router
}

async fn document_route() -> axum::Json<Value> {
    axum::Json(document())
}

/// The OpenAPI 3.1 document of the API.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in operations() {
        let mut doc = op.doc;
        // Any other problem (401, 403, 500, …) is the default.
        if let Some(Value::Object(r)) = doc.get_mut("responses") {
            r.insert(
                "default".into(),
                json!({"$ref": "#/components/responses/Problem"}),
            );
        }
        let entry = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        if let Value::Object(m) = entry {
            m.insert(op.method.to_string(), Value::Object(doc));
        }
    }
    let problem_response = |text: &str| json!({"description": text, "content": {"application/problem+json": {"schema": schema("Problem")}}});
    let mut responses = Map::new();
    responses.insert(
        "Problem".into(),
        problem_response("a problem: what was wrong, and which field"),
    );
    for (status, text) in [
        (400, "the request is malformed"),
        (404, "not found"),
        (409, "it conflicts with what is there"),
        (413, "over a size limit"),
        (422, "well formed, but refused"),
        (503, "a backend is unavailable; try again"),
    ] {
        responses.insert(format!("Problem{status}"), problem_response(text));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "multiagents",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Fault-tolerant multi-step workflows (sagas) as a service. Every error is an RFC 9457 application/problem+json body naming the field at fault. See docs/api.md.",
            "license": {"name": "MIT OR Apache-2.0", "identifier": "MIT OR Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": "runs"}, {"name": "definitions"}, {"name": "events"},
            {"name": "dead-letters"}, {"name": "workers"}, {"name": "tasks"}, {"name": "operations"},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key, when the service requires keys (serve --api-keys)."},
            },
            "responses": responses,
            "schemas": schemas(),
        },
    })
}

/// The schema of a run's timeline (apart: one `json!` of it all is too deep).
fn timeline_schema(id: &Value, ms: &Value) -> Value {
    let maybe_ms = json!({"type": ["integer", "null"], "minimum": 0, "description": "milliseconds since the epoch; null while it lasts"});
    let bar = json!({
        "type": "object",
        "required": ["kind", "phase", "attempt", "start", "outcome"],
        "properties": {
            "kind": {"type": "string", "enum": ["attempt", "wait", "workflow", "compensation", "skipped"]},
            "phase": {"type": "string", "enum": ["forward", "compensate"]},
            "attempt": {"type": "integer"}, "start": ms, "end": maybe_ms,
            "outcome": {"type": "string", "enum": ["in_flight", "completed", "failed", "cancelled", "signalled", "skipped"]},
            "error": {"type": "string"}, "instance": {"type": "string"}, "child": {"type": "string"},
        },
    });
    let lane = json!({
        "type": "object",
        "required": ["step", "kind", "bars"],
        "properties": {
            "step": {"type": "string"}, "kind": {"type": "string", "enum": ["task", "sleep", "signal", "workflow", "unknown"]},
            "branch_of": {"type": "string"}, "group": {"type": ["string", "null"]}, "signal": {"type": "string"},
            "input": {}, "output": {}, "usage": {},
            "bars": {"type": "array", "items": bar},
        },
    });
    json!({
        "type": "object",
        "required": ["id", "workflow", "status", "started_at", "now", "lanes", "markers"],
        "properties": {
            "id": id, "workflow": {"type": "string"}, "version": {"type": "integer"}, "status": schema("Status"),
            "started_at": ms, "finished_at": maybe_ms, "now": ms,
            "parent": {"type": ["string", "null"]}, "retry_of": {"type": ["string", "null"]}, "retried_as": {"type": ["string", "null"]},
            "lanes": {"type": "array", "items": lane},
            "markers": {"type": "array", "items": {"type": "object", "required": ["at", "what"]}},
        },
    })
}

fn schemas() -> Value {
    let id = json!({"type": "string", "format": "uuid"});
    let ms =
        json!({"type": "integer", "minimum": 0, "description": "milliseconds since the epoch"});
    json!({
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "field": {"type": "string", "description": "the request field at fault: body, body.from_step, query.wait, header.Idempotency-Key, …"},
            },
        },
        "Status": {
            "type": "string",
            "enum": ["running", "compensating", "completed", "compensated", "failed", "compensation_failed", "cancelled", "timed_out"],
        },
        "Me": {
            "type": "object",
            "required": ["name", "scopes", "keys_required"],
            "properties": {
                "name": {"type": "string"},
                "scopes": {"type": "array", "items": {"type": "string", "enum": ["read", "operate", "admin", "worker"]}},
                "keys_required": {"type": "boolean"},
            },
        },
        "Definition": {
            "type": "object",
            "required": ["name", "steps"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "integer"},
                "steps": {"type": "array", "items": {"type": "object"}},
            },
            "description": "A workflow definition; see docs/concepts.md and docs/workflows.md.",
        },
        "DefinitionList": {
            "type": "object",
            "required": ["definitions"],
            "properties": {"definitions": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "versions", "latest", "url"],
                "properties": {
                    "name": {"type": "string"},
                    "versions": {"type": "array", "items": {"type": "integer"}},
                    "latest": {"type": "integer"},
                    "url": {"type": "string"},
                },
            }}},
        },
        "RunRef": {
            "type": "object",
            "required": ["id", "status", "url"],
            "properties": {"id": id, "status": schema("Status"), "url": {"type": "string"}, "retry_of": id},
        },
        "RunOutcome": {
            "type": "object",
            "required": ["id", "status", "url"],
            "properties": {
                "id": id, "status": schema("Status"), "url": {"type": "string"},
                "workflow": {"type": "string"},
                "output": {"description": "every completed step's output by step name, once completed"},
                "failure": {"description": "why it did not complete"},
                "retry_of": id,
            },
        },
        "Run": {
            "type": "object",
            "required": ["id", "url", "transaction_id", "correlation_id", "workflow", "version", "status", "input", "steps", "history", "started_at", "updated_at"],
            "properties": {
                "id": id, "url": {"type": "string"}, "transaction_id": id, "correlation_id": id,
                "workflow": {"type": "string"}, "version": {"type": "integer"}, "status": schema("Status"),
                "input": {}, "output": {},
                "steps": {"type": "array", "items": {"type": "object", "required": ["name", "status", "attempts"]}},
                "history": {"type": "array", "items": {"type": "object", "required": ["at", "event"]}},
                "started_at": ms, "updated_at": ms, "finished_at": ms,
                "failure": {},
            },
        },
        "RunList": {
            "type": "object",
            "required": ["runs", "next"],
            "properties": {
                "runs": {"type": "array", "items": {
                    "type": "object",
                    "required": ["id", "url", "workflow", "status", "started_at", "updated_at"],
                    "properties": {"id": id, "url": {"type": "string"}, "workflow": {"type": "string"}, "version": {"type": "integer"}, "status": schema("Status"), "started_at": ms, "updated_at": ms},
                }},
                "next": {"type": ["string", "null"], "description": "the cursor of the next page; null on the last"},
            },
        },
        "Timeline": timeline_schema(&id, &ms),
        "RetryRequest": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "from_step": {"type": "string", "description": "run again from this step (default: the failed one)"},
                "input": {"description": "an RFC 7386 JSON merge patch for the input"},
                "definition": {"type": "string", "enum": ["pinned", "latest"], "default": "pinned"},
            },
        },
        "DeadLetter": {
            "type": "object",
            "required": ["id", "url", "topic", "reason", "delivery_count", "at", "age_ms", "body"],
            "properties": {
                "id": {"type": "string"}, "url": {"type": "string"}, "topic": {"type": "string"},
                "group": {"type": ["string", "null"]}, "reason": {"type": "string"},
                "delivery_count": {"type": "integer"}, "at": ms, "age_ms": {"type": "integer"},
                "origin": {"description": "the workflow, run and step, when the body is an event"},
                "body": {"type": "string"},
            },
        },
        "BulkRedrive": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "filter": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {"topic": {"type": "string"}, "workflow": {"type": "string"}, "step": {"type": "string"}, "reason": {"type": "string", "description": "a part of the reason"}},
                },
                "dry_run": {"type": "boolean", "default": false},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000},
            },
        },
        "Poll": {
            "type": "object",
            "required": ["workers"],
            "properties": {
                "workers": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "max": {"type": "integer", "minimum": 1, "maximum": 100, "description": "at most the service's batch (100 unless set otherwise)"},
                "wait_ms": {"type": "integer", "minimum": 0, "maximum": 3_600_000},
            },
        },
        "Task": {
            "type": "object",
            "required": ["token", "worker", "workflow", "transaction_id", "step", "phase", "attempt", "idempotency_key", "deadline", "lease_ms", "input"],
            "properties": {
                "token": {"type": "string"}, "worker": {"type": "string"}, "workflow": {"type": "string"},
                "transaction_id": id, "step": {"type": "string"},
                "phase": {"type": "string", "enum": ["forward", "compensate"]},
                "attempt": {"type": "integer"}, "delivery_count": {"type": "integer"},
                "idempotency_key": {"type": "string"}, "attempt_key": {"type": "string"},
                "deadline": ms, "lease_ms": {"type": "integer"},
                "input": {}, "steps": {"type": "object"},
            },
        },
        "Failure": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "kind": {"type": "string"},
                "retry": {"type": "string", "enum": ["yes", "no", "after"], "default": "yes"},
                "retry_after_ms": {"type": "integer", "minimum": 0},
            },
        },
        "Answer": {
            "type": "object",
            "additionalProperties": false,
            "required": ["token"],
            "properties": {
                "token": {"type": "string"},
                "output": {},
                "error": {"type": "string"},
                "kind": {"type": "string"},
                "retry": {"type": "string", "enum": ["yes", "no", "after"]},
                "retry_after_ms": {"type": "integer", "minimum": 0},
            },
        },
    })
}

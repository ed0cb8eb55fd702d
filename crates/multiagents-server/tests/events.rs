//! Server-Sent Events over real HTTP: a run's history as it grows, resumed
//! with `Last-Event-ID`, and every run's status changes.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Api, REFUNDS, problem};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use serde_json::{Value, json};

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A stream being read.
struct Stream {
    body: hyper::body::Incoming,
    buffer: String,
}

async fn open(api: &Api, path: &str, last_event_id: Option<&str>) -> Stream {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!("{}{path}", api.base))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let res = http
        .request(req.body(Empty::new()).expect("request"))
        .await
        .expect("the service answers");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    Stream {
        body: res.into_body(),
        buffer: String::new(),
    }
}

impl Stream {
    /// The next event (comments, such as keep-alives, skipped).
    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse {
                    event: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        sse.event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        sse.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() && sse.id.is_none() {
                    continue;
                }
                sse.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return sse;
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), self.body.frame())
                .await
                .expect("an event within 20 s")
                .expect("the stream goes on")
                .expect("a frame");
            if let Ok(bytes) = frame.into_data() {
                self.buffer.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }

    /// Every event up to and including the first of kind `kind`.
    async fn until(&mut self, kind: &str) -> Vec<Sse> {
        let mut out = Vec::new();
        loop {
            let e = self.next().await;
            let done = e.event == kind;
            out.push(e);
            if done {
                return out;
            }
        }
    }
}

const APPROVALS: &str = "name: approvals\nversion: 1\nsteps:\n  - name: check\n    worker: check_refund\n  - {name: approval, signal: approve}\n";

#[tokio::test]
async fn a_run_streams_its_history_live_and_resumes_where_it_left_off() {
    let api = Api::start().await;
    api.deploy(APPROVALS).await;
    let a = api
        .call(
            Method::POST,
            "/v1/workflows/approvals/runs",
            &[],
            r#"{"amount": 3}"#,
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let url = a.body["url"].as_str().expect("url").to_string();
    let mut stream = open(&api, &format!("{url}/events"), None).await;
    // Up to the wait for the signal, entry by entry, numbered from 0.
    let before = stream.until("history").await;
    assert_eq!(before[0].id.as_deref(), Some("0"));
    assert_eq!(before[0].data["event"]["event"], "started");
    let mut seen = vec![before[0].clone()];
    while seen.last().map(|e| e.data["event"]["event"].clone()) != Some(json!("wait_started")) {
        seen.push(stream.next().await);
    }
    // Live: the signal arrives while the stream is open.
    let s = api
        .call(
            Method::POST,
            &format!("{url}/signals/approve"),
            &[],
            r#"{"ok": true}"#,
        )
        .await;
    assert_eq!(s.status, 202, "{:?}", s.body);
    seen.extend(stream.until("end").await);
    let end = seen.last().expect("end");
    assert_eq!(end.data["status"], "completed", "{end:?}");
    let history: Vec<&Sse> = seen.iter().filter(|e| e.event == "history").collect();
    let ids: Vec<String> = history.iter().filter_map(|e| e.id.clone()).collect();
    let expected: Vec<String> = (0..history.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected, "every entry once, in order");
    let run = api.get(&url).await;
    assert_eq!(
        history.len(),
        run["history"].as_array().expect("history").len()
    );
    assert!(
        history
            .iter()
            .any(|e| e.data["event"]["event"] == "signal_received")
    );

    // Resumed after entry 2: entries 3.. and the end.
    let mut again = open(&api, &format!("{url}/events"), Some("2")).await;
    let rest = again.until("end").await;
    assert_eq!(rest[0].id.as_deref(), Some("3"), "{rest:?}");
    assert_eq!(rest.len() - 1, history.len() - 3);

    problem(
        &api.call(
            Method::GET,
            &format!("{url}/events"),
            &[("last-event-id", "soon")],
            "",
        )
        .await,
        400,
        Some("header.Last-Event-ID"),
    );
    let nobody = "/v1/runs/01a23589-c601-7c83-89ce-e2571642d33d/events";
    problem(&api.call(Method::GET, nobody, &[], "").await, 404, None);
}

#[tokio::test]
async fn every_run_s_status_changes_stream_and_resume_by_id() {
    let api = Api::start().await;
    api.deploy(REFUNDS).await;
    let mut all = open(&api, "/v1/events", None).await;
    let a = api.run_to_end("refunds", json!({"amount": 4})).await;
    let mut mine = Vec::new();
    loop {
        let e = all.next().await;
        assert_eq!(e.event, "status", "{e:?}");
        if e.data["transaction_id"] == a["id"] {
            let finished = e.data["update"]["event"] == "finished";
            mine.push(e);
            if finished {
                break;
            }
        }
    }
    let kinds: Vec<&Value> = mine.iter().map(|e| &e.data["update"]["event"]).collect();
    assert_eq!(
        kinds,
        [
            &json!("started"),
            &json!("step_completed"),
            &json!("step_completed"),
            &json!("finished")
        ]
    );
    assert_eq!(mine[3].data["update"]["status"], "completed");
    assert_eq!(mine[0].data["workflow"], "refunds");

    // Resumed from the first of them: the other three again, same ids.
    let first = mine[0].id.clone().expect("an id");
    let mut resumed = open(&api, "/v1/events", Some(&first)).await;
    for expected in &mine[1..] {
        let e = resumed.next().await;
        assert_eq!(e.id, expected.id);
    }
    // A filter by workflow; and an id from elsewhere gets a reset first.
    let mut other = open(&api, "/v1/events?workflow=refunds", Some("1-1")).await;
    let reset = other.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    let b = api.run_to_end("refunds", json!({"amount": 5})).await;
    let e = other.next().await;
    assert_eq!(e.data["transaction_id"], b["id"], "{e:?}");
}

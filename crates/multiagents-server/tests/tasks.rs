//! Workers over HTTP: a step whose worker is not in the process is polled,
//! answered, failed or let go over real HTTP, under the bus's leases.

mod common;

use std::time::Duration;

use common::{Api, REFUNDS, problem};
use hyper::Method;
use multiagents_server::TaskOptions;
use serde_json::{Value, json};

/// `pay_refund` is an HTTP worker; `check_refund` runs in process.
async fn api(visibility: Duration, lease: Duration) -> Api {
    let api = Api::with(
        |b| b.worker(common::check_refund()),
        visibility,
        TaskOptions {
            lease,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        api.call(Method::POST, "/v1/definitions", &[], REFUNDS)
            .await
            .status,
        201
    );
    api
}

async fn start(api: &Api, amount: i64) -> String {
    let a = api
        .call(
            Method::POST,
            "/v1/workflows/refunds/runs",
            &[],
            &json!({"amount": amount}).to_string(),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["url"].as_str().expect("url").to_string()
}

async fn poll(api: &Api, wait_ms: u64) -> Vec<Value> {
    let a = api
        .call(
            Method::POST,
            "/v1/tasks/poll",
            &[],
            &json!({"workers": ["pay_refund"], "max": 10, "wait_ms": wait_ms}).to_string(),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["tasks"].as_array().expect("tasks").clone()
}

/// `POST /v1/tasks/{token}/{action}`.
async fn on_task(api: &Api, token: &str, action: &str, body: &str) -> common::Answer {
    api.call(
        Method::POST,
        &format!("/v1/tasks/{token}/{action}"),
        &[],
        body,
    )
    .await
}

async fn result(api: &Api, url: &str) -> Value {
    let a = api
        .call(Method::GET, &format!("{url}/result?wait=10s"), &[], "")
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body
}

#[tokio::test]
async fn a_polled_task_carries_what_the_step_needs_and_its_answer_finishes_the_run() {
    let api = api(Duration::from_secs(30), Duration::from_secs(30)).await;
    let url = start(&api, 5).await;
    let tasks = poll(&api, 5_000).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let task = &tasks[0];
    let id = url.trim_start_matches("/v1/runs/");
    assert_eq!(task["worker"], "pay_refund");
    assert_eq!(task["workflow"], "refunds");
    assert_eq!(task["transaction_id"], id);
    assert_eq!(task["step"], "pay");
    assert_eq!(task["phase"], "forward");
    assert_eq!(task["attempt"], 1);
    assert_eq!(task["idempotency_key"], format!("{id}/pay/forward"));
    assert_eq!(task["input"], json!({"amount": 5}));
    assert_eq!(task["steps"]["check"], json!({"checked": 5}));
    let token = task["token"].as_str().expect("token");

    let beat = on_task(&api, token, "heartbeat", "").await;
    assert_eq!(beat.status, 200, "{:?}", beat.body);
    let done = on_task(&api, token, "complete", r#"{"output": {"paid": 5}}"#).await;
    assert_eq!(done.status, 202, "{:?}", done.body);
    let outcome = result(&api, &url).await;
    assert_eq!(outcome["status"], "completed");
    assert_eq!(outcome["output"]["pay"], json!({"paid": 5}));
    // Answered once: the token is spent.
    let again = on_task(&api, token, "complete", r#"{"output": 1}"#).await;
    problem(&again, 404, Some("path.token"));
    assert!(poll(&api, 0).await.is_empty());
}

#[tokio::test]
async fn a_failure_says_whether_to_retry_and_a_fatal_one_fails_the_run() {
    let api = api(Duration::from_secs(30), Duration::from_secs(30)).await;
    let url = start(&api, 7).await;
    let first = poll(&api, 5_000).await;
    let token = first[0]["token"].as_str().expect("token");
    let failed = on_task(
        &api,
        token,
        "fail",
        r#"{"error": "the bank is down", "retry": "after", "retry_after_ms": 10}"#,
    )
    .await;
    assert_eq!(failed.status, 202, "{:?}", failed.body);
    // Retried: attempt 2, the same idempotency key.
    let second = poll(&api, 5_000).await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0]["attempt"], 2);
    assert_eq!(second[0]["idempotency_key"], first[0]["idempotency_key"]);
    assert_ne!(second[0]["attempt_key"], first[0]["attempt_key"]);
    let token = second[0]["token"].as_str().expect("token");
    let fatal = on_task(
        &api,
        token,
        "fail",
        r#"{"error": "account closed", "kind": "declined", "retry": "no"}"#,
    )
    .await;
    assert_eq!(fatal.status, 202, "{:?}", fatal.body);
    let outcome = result(&api, &url).await;
    assert_eq!(outcome["status"], "failed");
    assert!(
        outcome["failure"].to_string().contains("account closed"),
        "{outcome:?}"
    );
    let run = api.call(Method::GET, &url, &[], "").await;
    assert_eq!(
        run.body["steps"][1]["last_error"]["kind"], "declined",
        "{:?}",
        run.body
    );
}

#[tokio::test]
async fn a_task_whose_worker_goes_quiet_goes_back_to_the_bus_as_the_same_attempt() {
    // A short lease and a short visibility: the quiet worker's command is
    // redelivered within a second.
    let api = api(Duration::from_millis(300), Duration::from_millis(200)).await;
    let url = start(&api, 9).await;
    let first = poll(&api, 5_000).await;
    assert_eq!(first.len(), 1);
    let stale = first[0]["token"].as_str().expect("token").to_string();
    let second = poll(&api, 5_000).await;
    assert_eq!(
        second.len(),
        1,
        "redelivered after the lease lapsed: {second:?}"
    );
    assert_eq!(second[0]["attempt"], 1);
    assert_eq!(second[0]["delivery_count"], 2);
    assert_eq!(second[0]["idempotency_key"], first[0]["idempotency_key"]);
    // The quiet worker's token is spent; the new one answers.
    let late = on_task(&api, &stale, "complete", r#"{"output": {"paid": 9}}"#).await;
    problem(&late, 404, Some("path.token"));
    let token = second[0]["token"].as_str().expect("token");
    let done = on_task(&api, token, "complete", r#"{"output": {"paid": 9}}"#).await;
    assert_eq!(done.status, 202);
    assert_eq!(result(&api, &url).await["status"], "completed");
}

#[tokio::test]
async fn a_live_worker_keeps_its_task_past_the_visibility_timeout() {
    let api = api(Duration::from_millis(300), Duration::from_millis(400)).await;
    let url = start(&api, 3).await;
    let tasks = poll(&api, 5_000).await;
    let token = tasks[0]["token"].as_str().expect("token");
    // Heartbeats for three visibility timeouts: nothing is redelivered.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let beat = on_task(&api, token, "heartbeat", "").await;
        assert_eq!(beat.status, 200, "{:?}", beat.body);
    }
    assert!(
        poll(&api, 0).await.is_empty(),
        "the task was not given to anyone else"
    );
    let done = on_task(&api, token, "complete", r#"{"output": {"paid": 3}}"#).await;
    assert_eq!(done.status, 202);
    assert_eq!(result(&api, &url).await["status"], "completed");
}

#[tokio::test]
async fn bad_task_requests_get_a_problem_naming_the_field() {
    let api = api(Duration::from_secs(30), Duration::from_secs(30)).await;
    let call = |body: &'static str| api.call(Method::POST, "/v1/tasks/poll", &[], body);
    problem(&call("{}").await, 400, Some("body"));
    problem(&call(r#"{"workers": []}"#).await, 400, Some("body.workers"));
    problem(
        &call(r#"{"workers": ["pay_refund"], "max": 0}"#).await,
        400,
        Some("body.max"),
    );
    problem(
        &call(r#"{"workers": ["pay_refund"], "max": 1000}"#).await,
        400,
        Some("body.max"),
    );
    let nobody = "/v1/tasks/0123/fail";
    problem(
        &api.call(Method::POST, nobody, &[], r#"{"error": "x"}"#)
            .await,
        404,
        Some("path.token"),
    );
    problem(
        &api.call(
            Method::POST,
            nobody,
            &[],
            r#"{"error": "x", "retry": "maybe"}"#,
        )
        .await,
        400,
        Some("body.retry"),
    );
    problem(
        &api.call(
            Method::POST,
            nobody,
            &[],
            r#"{"error": "x", "retry": "after"}"#,
        )
        .await,
        400,
        Some("body.retry_after_ms"),
    );
    problem(
        &api.call(Method::POST, "/v1/tasks/0123/complete", &[], "[")
            .await,
        400,
        Some("body"),
    );
}

#[tokio::test]
async fn a_redelivered_task_for_an_attempt_given_up_on_is_dropped_not_handed_out() {
    // The step times out (150 ms) long before the quiet worker's command
    // comes back from the bus (a 100 ms lease, then a 400 ms visibility).
    let api = api(Duration::from_millis(400), Duration::from_millis(100)).await;
    let slow = "name: slow\nversion: 1\nsteps:\n  - name: pay\n    worker: pay_refund\n    timeout: 150ms\n    retry: {max_attempts: 3, initial_delay: 10ms}\n";
    assert_eq!(
        api.call(Method::POST, "/v1/definitions", &[], slow)
            .await
            .status,
        201
    );
    let a = api
        .call(
            Method::POST,
            "/v1/workflows/slow/runs",
            &[],
            r#"{"amount": 1}"#,
        )
        .await;
    let url = a.body["url"].as_str().expect("url").to_string();
    let first = poll(&api, 5_000).await;
    assert_eq!(first[0]["attempt"], 1);
    // Attempt 2 comes after the timeout; then, for a while, nothing else:
    // attempt 1's redelivery is stale and is dropped.
    let mut handed = Vec::new();
    // At least 1.2 s (attempt 1 is redelivered after about 0.5 s), and
    // until attempt 2 has come, within 10 s on a loaded machine.
    let began = std::time::Instant::now();
    while began.elapsed() < Duration::from_millis(1_200)
        || (handed.is_empty() && began.elapsed() < Duration::from_secs(10))
    {
        for task in poll(&api, 100).await {
            handed.push((task["attempt"].clone(), task["delivery_count"].clone()));
            if task["attempt"] == 2 {
                // Held, heartbeating, so that attempt 2 neither times out nor comes back.
                let token = task["token"].as_str().expect("token").to_string();
                assert_eq!(on_task(&api, &token, "heartbeat", "").await.status, 200);
                assert_eq!(
                    on_task(&api, &token, "complete", r#"{"output": {"paid": 1}}"#)
                        .await
                        .status,
                    202
                );
            }
        }
    }
    assert_eq!(handed, vec![(json!(2), json!(1))], "only attempt 2, once");
    assert_eq!(result(&api, &url).await["status"], "completed");
}

#[tokio::test]
async fn many_tasks_are_answered_in_one_batch_each_getting_its_own_status() {
    let api = api(Duration::from_secs(30), Duration::from_secs(30)).await;
    let urls = [
        start(&api, 1).await,
        start(&api, 2).await,
        start(&api, 3).await,
    ];
    let mut tasks = Vec::new();
    while tasks.len() < 3 {
        tasks.extend(poll(&api, 5_000).await);
    }
    let token_of = |amount: i64| {
        tasks
            .iter()
            .find(|t| t["input"]["amount"] == amount)
            .and_then(|t| t["token"].as_str())
            .expect("a task per run")
            .to_string()
    };
    let (one, two, three) = (token_of(1), token_of(2), token_of(3));
    let body = json!({"answers": [
        {"token": one, "output": {"paid": 1}},
        {"token": two, "error": "account closed", "kind": "declined", "retry": "no"},
        {"token": three, "error": "x", "retry": "maybe"},
        {"token": "nope", "output": 1},
    ]});
    let a = api
        .call(Method::POST, "/v1/tasks/answers", &[], &body.to_string())
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let statuses: Vec<&Value> = a.body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| &r["status"])
        .collect();
    assert_eq!(
        statuses,
        [&json!(202), &json!(202), &json!(400), &json!(404)],
        "{:?}",
        a.body
    );
    assert_eq!(a.body["results"][2]["field"], "body.answers[2].retry");
    assert_eq!(result(&api, &urls[0]).await["status"], "completed");
    assert_eq!(result(&api, &urls[1]).await["status"], "failed");
    // The refused answer left its task with the worker: answered now.
    let done = on_task(&api, &three, "complete", r#"{"output": {"paid": 3}}"#).await;
    assert_eq!(done.status, 202, "{:?}", done.body);
    assert_eq!(result(&api, &urls[2]).await["status"], "completed");
    problem(
        &api.call(
            Method::POST,
            "/v1/tasks/answers",
            &[],
            r#"{"answers": [{"output": 1}]}"#,
        )
        .await,
        400,
        Some("body"),
    );
}

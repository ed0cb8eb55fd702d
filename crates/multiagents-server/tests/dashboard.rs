//! What the dashboard reads, over real HTTP: a run's timeline, the counts by
//! status, the last hour's points, and the page and its assets (public, and
//! nothing in them fetched from elsewhere). The browser tests in `ui-tests/`
//! drive the page itself.

mod common;

use std::time::Duration;

use common::{Api, REFUNDS, check_refund, pay_refund};
use hyper::Method;
use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use serde_json::{Value, json};

const SHOP: &str = "name: shop\nversion: 1\nsteps:\n  - name: check\n    worker: check_refund\n    compensation: uncheck\n  - name: pay\n    worker: pay_refund\n";

fn uncheck() -> impl multiagents::Worker {
    from_fn("uncheck", |_v: Value, _ctx: WorkerContext| async move {
        Ok::<_, WorkerError>(json!({"unchecked": true}))
    })
}

/// A step that fails twice (retried), then succeeds.
fn flaky() -> impl multiagents::Worker {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    from_fn("flaky", move |_v: Value, _ctx: WorkerContext| {
        let calls = calls.clone();
        async move {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                return Err(WorkerError::retry("not yet"));
            }
            Ok(json!({"ok": true}))
        }
    })
}

async fn api() -> Api {
    Api::with(
        |b| {
            b.worker(check_refund())
                .worker(pay_refund())
                .worker(uncheck())
                .worker(flaky())
        },
        Duration::from_secs(30),
        multiagents_server::TaskOptions::default(),
    )
    .await
}

#[tokio::test]
async fn a_compensated_runs_timeline_has_a_lane_per_step_and_its_compensation_after_the_failure() {
    let api = api().await;
    api.deploy(SHOP).await;
    let run = api.run_to_end("shop", json!({"amount": 500})).await;
    assert_eq!(run["status"], "compensated", "{run}");
    let t = api
        .get(&format!(
            "/v1/runs/{}/timeline",
            run["id"].as_str().expect("in the answer")
        ))
        .await;
    assert_eq!(t["status"], "compensated");
    let lanes = t["lanes"].as_array().expect("lanes");
    let names: Vec<&str> = lanes
        .iter()
        .map(|l| l["step"].as_str().expect("in the answer"))
        .collect();
    assert_eq!(names, ["check", "pay"]);
    let (check, pay) = (&lanes[0], &lanes[1]);
    assert_eq!(check["status"], "compensated");
    assert_eq!(check["kind"], "task");
    assert_eq!(check["worker"], "check_refund");
    assert_eq!(check["input"], json!({"amount": 500}));
    assert_eq!(check["output"], json!({"checked": 500}));
    let bars = check["bars"].as_array().expect("in the answer");
    assert_eq!(bars.len(), 2, "{bars:?}");
    assert_eq!(
        (&bars[0]["kind"], &bars[0]["outcome"]),
        (&json!("attempt"), &json!("completed"))
    );
    assert_eq!(
        (&bars[1]["kind"], &bars[1]["outcome"], &bars[1]["phase"]),
        (
            &json!("compensation"),
            &json!("completed"),
            &json!("compensate")
        )
    );
    // Each answered attempt names the worker process and its own times.
    assert!(bars[0]["instance"].as_str().is_some_and(|i| !i.is_empty()));
    assert!(bars[0]["picked_up_at"].as_u64() >= bars[0]["start"].as_u64());
    let failed = &pay["bars"][0];
    assert_eq!(failed["outcome"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .expect("in the answer")
            .contains("too much")
    );
    // The compensation starts once the failure is recorded.
    assert!(bars[1]["start"].as_u64() >= failed["end"].as_u64());
    let markers: Vec<&str> = t["markers"]
        .as_array()
        .expect("in the answer")
        .iter()
        .map(|m| m["what"].as_str().expect("in the answer"))
        .collect();
    assert!(markers.contains(&"step `pay` failed"), "{markers:?}");
    assert_eq!(markers.last(), Some(&"finished: compensated"));
    problem_404(
        &api,
        "/v1/runs/00000000-0000-0000-0000-000000000000/timeline",
    )
    .await;
}

async fn problem_404(api: &Api, path: &str) {
    common::problem(&api.call(Method::GET, path, &[], "").await, 404, None);
}

#[tokio::test]
async fn retries_are_separate_bars_with_their_errors_and_waits_are_waits() {
    let api = api().await;
    api.deploy(
        "name: gated\nversion: 1\nsteps:\n  - name: try\n    worker: flaky\n    retry: {max_attempts: 5, initial_delay: 1ms}\n  - name: gate\n    signal: open\n",
    )
    .await;
    let a = api
        .call(Method::POST, "/v1/workflows/gated/runs", &[], "{}")
        .await;
    let id = a.body["id"].as_str().expect("in the answer").to_string();
    let path = format!("/v1/runs/{id}/timeline");
    let mut t = Value::Null;
    for _ in 0..250 {
        t = api.get(&path).await;
        if t["lanes"][1]["bars"][0]["kind"] == "wait" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tries = t["lanes"][0]["bars"].as_array().expect("in the answer");
    let outcomes: Vec<&str> = tries
        .iter()
        .map(|b| b["outcome"].as_str().expect("in the answer"))
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "completed"], "{tries:?}");
    assert_eq!(tries[0]["error"], "not yet");
    assert_eq!(
        tries
            .iter()
            .map(|b| b["attempt"].as_u64().expect("in the answer"))
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let gate = &t["lanes"][1];
    assert_eq!(
        (&gate["kind"], &gate["signal"]),
        (&json!("signal"), &json!("open"))
    );
    assert_eq!(gate["bars"][0]["outcome"], "in_flight");
    assert!(gate["bars"][0]["end"].is_null());
    let a = api
        .call(
            Method::POST,
            &format!("/v1/runs/{id}/signals/open"),
            &[],
            "{\"by\": \"ada\"}",
        )
        .await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    api.get(&format!("/v1/runs/{id}/result?wait=10s")).await;
    let t = api.get(&path).await;
    let wait = &t["lanes"][1]["bars"][0];
    assert_ne!(wait["outcome"], "in_flight", "{wait}");
    assert!(wait["end"].as_u64() >= wait["start"].as_u64());
    assert_eq!(t["lanes"][1]["output"], json!({"by": "ada"}));
}

#[tokio::test]
async fn counts_by_status_follow_the_filters() {
    let api = api().await;
    api.deploy(REFUNDS).await;
    api.deploy(SHOP).await;
    for amount in [10, 20, 500] {
        api.run_to_end("refunds", json!({"amount": amount})).await;
    }
    api.run_to_end("shop", json!({"amount": 1})).await;
    let all = api.get("/v1/runs/counts").await;
    assert_eq!(all["total"], 4, "{all}");
    assert_eq!(all["by_status"]["completed"], 3);
    assert_eq!(all["by_status"]["failed"], 1);
    assert_eq!(all["by_status"]["running"], 0);
    let refunds = api.get("/v1/runs/counts?workflow=refunds").await;
    assert_eq!(refunds["total"], 3);
    assert_eq!(refunds["by_status"]["completed"], 2);
    let later = api
        .get("/v1/runs/counts?started_after=99999999999999")
        .await;
    assert_eq!(later["total"], 0);
    common::problem(
        &api.call(Method::GET, "/v1/runs/counts?correlation_id=nope", &[], "")
            .await,
        400,
        Some("query.correlation_id"),
    );
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_key_and_fetch_nothing_from_elsewhere() {
    let (_key, line) =
        multiagents_server::ApiKeys::generate("viewer", &[multiagents_server::Scope::Read])
            .expect("a key");
    let keys = multiagents_server::ApiKeys::parse(&line).expect("keys");
    let api = Api::secured(keys).await;
    let page = api.call(Method::GET, "/ui/", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    let html = page.body.as_str().expect("in the answer");
    assert!(html.contains("/ui/app.js") && html.contains("/ui/app.css"));
    for path in ["/ui/app.js", "/ui/app.css", "/ui/vendor/mermaid.min.js"] {
        let a = api.call(Method::GET, path, &[], "").await;
        assert_eq!(a.status, 200, "{path}");
        let text = a.body.as_str().unwrap_or_default().to_string();
        assert!(text.len() > 1000, "{path} is {} bytes", text.len());
    }
    // Nothing in the page or the app points at another host.
    for path in ["/ui/", "/ui/app.js", "/ui/app.css"] {
        let text = api.call(Method::GET, path, &[], "").await.body;
        let text = text.as_str().expect("in the answer");
        for scheme in ["http://", "https://", "//cdn"] {
            let found = text
                .match_indices(scheme)
                .map(|(i, _)| &text[i..(i + 40).min(text.len())])
                .find(|s| !s.starts_with("http://www.w3.org/2000/svg"));
            assert!(found.is_none(), "{path} refers to {found:?}");
        }
    }
    let a = api.call(Method::GET, "/ui", &[], "").await;
    assert_eq!((a.status, a.location.as_deref()), (308, Some("/ui/")));
    // The data behind it needs the key.
    assert_eq!(
        api.call(Method::GET, "/v1/runs/counts", &[], "")
            .await
            .status,
        401
    );
    assert_eq!(
        api.call(Method::GET, "/v1/stats", &[], "").await.status,
        401
    );
}

#[tokio::test]
async fn stats_answer_with_their_interval_and_points() {
    let api = api().await;
    let s = api.get("/v1/stats").await;
    assert_eq!(s["interval_ms"], 5000);
    assert!(s["points"].is_array(), "{s}");
}

#[tokio::test]
async fn fan_out_branches_follow_their_step_parallel_steps_name_their_group_and_a_child_run_is_linked()
 {
    let api = api().await;
    api.deploy(REFUNDS).await;
    api.deploy(
        "name: wide\nversion: 1\nsteps:\n  - {name: a, worker: check_refund, group: checks}\n  - {name: b, worker: check_refund, group: checks}\n  - {name: each, worker: check_refund, for_each: input.items}\n  - {name: child, workflow: refunds}\n",
    )
    .await;
    let run = api
        .run_to_end(
            "wide",
            json!({"amount": 3, "items": [{"amount": 1}, {"amount": 2}]}),
        )
        .await;
    assert_eq!(run["status"], "completed", "{run}");
    let t = api
        .get(&format!(
            "/v1/runs/{}/timeline",
            run["id"].as_str().expect("id")
        ))
        .await;
    let lanes = t["lanes"].as_array().expect("lanes");
    let names: Vec<&str> = lanes
        .iter()
        .map(|l| l["step"].as_str().expect("step"))
        .collect();
    assert_eq!(names, ["a", "b", "each", "each[0]", "each[1]", "child"]);
    assert_eq!(
        (&lanes[0]["group"], &lanes[1]["group"]),
        (&json!("checks"), &json!("checks"))
    );
    assert_eq!(lanes[3]["branch_of"], "each");
    assert_eq!(
        lanes[4]["input"],
        json!({"amount": 2}),
        "a branch gets its item"
    );
    assert_eq!(lanes[4]["bars"][0]["outcome"], "completed");
    let child = &lanes[5];
    assert_eq!(child["kind"], "workflow");
    let bar = &child["bars"][0];
    assert_eq!(
        (&bar["kind"], &bar["outcome"]),
        (&json!("workflow"), &json!("completed"))
    );
    let id = bar["child"].as_str().expect("the child's id");
    let ct = api.get(&format!("/v1/runs/{id}/timeline")).await;
    assert_eq!(ct["workflow"], "refunds");
    assert_eq!(ct["parent"], run["id"]);
}

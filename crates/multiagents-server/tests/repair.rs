//! Repairing runs over HTTP: retrying a failed run, redriving dead letters
//! (a failed compensation, an event no worker acked), discarding one, and
//! the audit log that keeps what was done.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Api, REFUNDS, problem};
use hyper::Method;
use multiagents::bus::MemoryBusConfig;
use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents_server::TaskOptions;
use serde_json::{Value, json};

#[tokio::test]
async fn a_failed_run_is_retried_from_its_failed_step_with_a_patched_input() {
    let api = Api::start().await;
    api.deploy(REFUNDS).await;
    let old = api.run_to_end("refunds", json!({"amount": 500})).await;
    assert_eq!(old["status"], "failed", "{old:?}");
    let old_url = old["url"].as_str().expect("url").to_string();

    let a = api
        .call(
            Method::POST,
            &format!("{old_url}/retry?wait=20s"),
            &[],
            &json!({"input": {"amount": 50}}).to_string(),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body["status"], "completed", "{:?}", a.body);
    assert_eq!(a.body["retry_of"], old["id"], "{:?}", a.body);
    assert_ne!(a.body["id"], old["id"]);
    // `check` completed in the old run and stands: kept, not run again
    // with the new amount; `pay` ran again with it.
    assert_eq!(a.body["output"]["check"], json!({"checked": 500}));
    assert_eq!(a.body["output"]["pay"], json!({"paid": 50}));

    let new = api.get(a.body["url"].as_str().expect("url")).await;
    assert_eq!(new["input"], json!({"amount": 50}));
    let first = &new["history"][0]["event"];
    assert_eq!(first["event"], "retried", "{new:?}");
    assert_eq!(first["transaction_id"], old["id"]);
    assert_eq!(first["from_step"], "pay");
    let old_now = api.get(&old_url).await;
    let last = old_now["history"]
        .as_array()
        .expect("history")
        .last()
        .cloned();
    let last = last.expect("an entry")["event"].clone();
    assert_eq!(last["event"], "retried_as", "{last:?}");
    assert_eq!(last["transaction_id"], a.body["id"], "{last:?}");

    // Once retried, the old run is not retried again.
    let again = api
        .call(Method::POST, &format!("{old_url}/retry"), &[], "")
        .await;
    problem(&again, 409, None);
    assert!(
        again.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("retried already")),
        "{:?}",
        again.body
    );
    // A completed run is not retried; a bad step or definition is named.
    let done = a.body["url"].as_str().expect("url");
    problem(
        &api.call(Method::POST, &format!("{done}/retry"), &[], "")
            .await,
        409,
        None,
    );
    let failed = api.run_to_end("refunds", json!({"amount": 700})).await;
    let failed_url = failed["url"].as_str().expect("url");
    problem(
        &api.call(
            Method::POST,
            &format!("{failed_url}/retry"),
            &[],
            r#"{"from_step": "nope"}"#,
        )
        .await,
        422,
        Some("body.from_step"),
    );
    problem(
        &api.call(
            Method::POST,
            &format!("{failed_url}/retry"),
            &[],
            r#"{"definition": "newest"}"#,
        )
        .await,
        400,
        Some("body.definition"),
    );
    problem(
        &api.call(
            Method::POST,
            &format!("{failed_url}/retry"),
            &[],
            r#"{"form_step": "pay"}"#,
        )
        .await,
        400,
        Some("body"),
    );
    // From an earlier step: both run again.
    let a = api
        .call(
            Method::POST,
            &format!("{failed_url}/retry?wait=20s"),
            &[],
            &json!({"from_step": "check", "input": {"amount": 70}}).to_string(),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        a.body["output"]["check"],
        json!({"checked": 70}),
        "{:?}",
        a.body
    );
}

const BOOKING: &str = "name: booking\nversion: 1\nsteps:\n  - name: reserve\n    worker: reserve_room\n    compensation: release_room\n  - name: charge\n    worker: charge_card\n";

#[tokio::test]
async fn a_failed_compensation_is_dead_lettered_and_redriven_once_fixed() {
    let broken = Arc::new(AtomicBool::new(true));
    let releases = Arc::new(AtomicUsize::new(0));
    let (b, r) = (broken.clone(), releases.clone());
    let api = Api::with(
        move |builder| {
            builder
                .worker(from_fn(
                    "reserve_room",
                    |_: Value, _: WorkerContext| async {
                        Ok::<_, WorkerError>(json!({"room": 12}))
                    },
                ))
                .worker(from_fn("charge_card", |_: Value, _: WorkerContext| async {
                    Err::<Value, _>(WorkerError::fatal("card declined").with_kind("declined"))
                }))
                .worker(from_fn(
                    "release_room",
                    move |_: Value, _: WorkerContext| {
                        let (b, r) = (b.clone(), r.clone());
                        async move {
                            if b.load(Ordering::SeqCst) {
                                return Err(WorkerError::fatal("the hotel API is down"));
                            }
                            r.fetch_add(1, Ordering::SeqCst);
                            Ok(json!({"released": 12}))
                        }
                    },
                ))
        },
        Duration::from_secs(30),
        TaskOptions::default(),
    )
    .await;
    api.deploy(BOOKING).await;
    let run = api.run_to_end("booking", json!({"guest": "ana"})).await;
    assert_eq!(run["status"], "compensation_failed", "{run:?}");

    let letter = api.dead_letter_of("compensations").await;
    assert_eq!(letter["origin"]["transaction_id"], run["id"], "{letter:?}");
    assert_eq!(letter["origin"]["step"], "reserve", "{letter:?}");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the hotel API is down")),
        "{letter:?}"
    );
    let url = letter["url"].as_str().expect("url").to_string();
    assert_eq!(api.get(&url).await["id"], letter["id"]);

    // Redriving before the cause is fixed fails again: a new letter.
    // Fixed, the dry run counts it, and the redrive finishes the run.
    broken.store(false, Ordering::SeqCst);
    let dry = api
        .call(
            Method::POST,
            "/v1/dead-letters/redrive",
            &[],
            &json!({"filter": {"topic": "compensations", "workflow": "booking"}, "dry_run": true})
                .to_string(),
        )
        .await;
    assert_eq!(dry.status, 200, "{:?}", dry.body);
    assert_eq!(dry.body["matched"], 1, "{:?}", dry.body);
    assert_eq!(dry.body["ids"], json!([letter["id"]]));
    // A dry run changes nothing.
    assert_eq!(api.get(&url).await["id"], letter["id"]);
    problem(
        &api.call(
            Method::POST,
            &format!("{url}/redrive"),
            &[],
            r#"{"payload": {}}"#,
        )
        .await,
        409,
        None,
    );

    let a = api
        .call(Method::POST, &format!("{url}/redrive"), &[], "")
        .await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    assert_eq!(a.body["transaction_id"], run["id"]);
    let result = api
        .get(&format!(
            "{}/result?wait=20s",
            run["url"].as_str().expect("url")
        ))
        .await;
    assert_eq!(result["status"], "compensated", "{result:?}");
    assert_eq!(releases.load(Ordering::SeqCst), 1);

    // Gone from the list, kept in the audit log; a second redrive is a 404.
    problem(&api.call(Method::GET, &url, &[], "").await, 404, None);
    problem(
        &api.call(Method::POST, &format!("{url}/redrive"), &[], "")
            .await,
        404,
        None,
    );
    let audit = api.get("/v1/dead-letters/audit").await;
    let entry = &audit["audit"][0];
    assert_eq!(entry["id"], letter["id"], "{audit:?}");
    assert_eq!(entry["settlement"]["action"], "redriven", "{audit:?}");
    assert_eq!(entry["settlement"]["by"], "anonymous", "{audit:?}");
    let state = api.get(run["url"].as_str().expect("url")).await;
    assert!(
        state["history"]
            .as_array()
            .expect("history")
            .iter()
            .any(|h| h["event"]["event"] == "compensation_redriven"),
        "{state:?}"
    );
}

#[tokio::test]
async fn a_command_no_worker_acked_is_redriven_and_the_run_finishes() {
    // `pay_refund` works over HTTP; its tasks are let go after 100 ms, and
    // after two deliveries a command is dead-lettered.
    let api = Api::on_bus(
        |b| b.worker(common::check_refund()),
        MemoryBusConfig {
            visibility_timeout: Duration::from_millis(100),
            max_deliveries: 2,
            ..Default::default()
        },
        TaskOptions {
            lease: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    api.deploy(REFUNDS).await;
    let a = api
        .call(
            Method::POST,
            "/v1/workflows/refunds/runs",
            &[],
            r#"{"amount": 30}"#,
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let run_url = a.body["url"].as_str().expect("url").to_string();
    let poll = || async {
        api.call(
            Method::POST,
            "/v1/tasks/poll",
            &[],
            &json!({"workers": ["pay_refund"], "max": 1, "wait_ms": 300}).to_string(),
        )
        .await
        .body["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    // Taken twice and never answered.
    let mut taken = 0;
    for _ in 0..50 {
        taken += poll().await.len();
        if taken >= 2 {
            break;
        }
    }
    assert_eq!(taken, 2);
    let letter = loop {
        let _ = poll().await;
        let letters = api.get("/v1/dead-letters").await;
        if let Some(l) = letters["dead_letters"].as_array().and_then(|l| {
            l.iter().find(|d| {
                d["topic"]
                    .as_str()
                    .is_some_and(|t| t.contains("pay_refund"))
            })
        }) {
            break l.clone();
        }
    };
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deliveries")),
        "{letter:?}"
    );
    assert_eq!(letter["origin"]["step"], "pay", "{letter:?}");
    let url = letter["url"].as_str().expect("url").to_string();

    // An edit that is not an event is refused; the letter stays.
    problem(
        &api.call(
            Method::POST,
            &format!("{url}/redrive"),
            &[],
            r#"{"body": {"nope": 1}}"#,
        )
        .await,
        409,
        None,
    );
    problem(
        &api.call(
            Method::POST,
            &format!("{url}/redrive"),
            &[],
            r#"{"body": {}, "payload": {}}"#,
        )
        .await,
        400,
        Some("body"),
    );
    let a = api
        .call(Method::POST, &format!("{url}/redrive"), &[], "")
        .await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    // This time a worker answers it.
    let tasks = loop {
        let t = poll().await;
        if !t.is_empty() {
            break t;
        }
    };
    let token = tasks[0]["token"].as_str().expect("token");
    let done = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{token}/complete"),
            &[],
            r#"{"output": {"paid": 30}}"#,
        )
        .await;
    assert_eq!(done.status, 202, "{:?}", done.body);
    let result = api.get(&format!("{run_url}/result?wait=20s")).await;
    assert_eq!(result["status"], "completed", "{result:?}");
    assert_eq!(result["output"]["pay"], json!({"paid": 30}));
}

#[tokio::test]
async fn a_discarded_dead_letter_goes_to_the_audit_log_with_its_reason() {
    use multiagents::bus::Topics;
    use multiagents::core::{
        CorrelationId, Event, EventKind, Payload, TransactionId, WorkflowName,
    };
    let api = Api::start().await;
    let event = Event::new(
        EventKind::Result,
        TransactionId::new(),
        CorrelationId::new(),
        WorkflowName::new("refunds"),
        Payload::null(),
    );
    api.bus.publish("results", event).await.expect("published");
    let letter = api.dead_letter_of("results").await;
    let url = letter["url"].as_str().expect("url");
    let a = api
        .call(Method::DELETE, url, &[], r#"{"reason": "a stray result"}"#)
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["discarded"], true);
    problem(&api.call(Method::DELETE, url, &[], "").await, 404, None);
    let audit = api.get("/v1/dead-letters/audit").await;
    assert_eq!(audit["audit"][0]["id"], letter["id"], "{audit:?}");
    assert_eq!(audit["audit"][0]["settlement"]["action"], "discarded");
    assert_eq!(audit["audit"][0]["settlement"]["note"], "a stray result");
    assert_eq!(audit["audit"][0]["body"], letter["body"]);
    problem(
        &api.call(Method::GET, "/v1/dead-letters/audit?limit=0", &[], "")
            .await,
        400,
        Some("query.limit"),
    );
}

#[tokio::test]
async fn definitions_are_listed_with_their_versions() {
    let api = Api::start().await;
    assert_eq!(api.get("/v1/definitions").await, json!({"definitions": []}));
    api.deploy(REFUNDS).await;
    api.deploy(&REFUNDS.replace("version: 1", "version: 2"))
        .await;
    api.deploy(&REFUNDS.replace("name: refunds", "name: audits"))
        .await;
    let list = api.get("/v1/definitions").await;
    assert_eq!(
        list["definitions"],
        json!([
            {"name": "audits", "versions": [1], "latest": 1, "url": "/v1/definitions/audits"},
            {"name": "refunds", "versions": [1, 2], "latest": 2, "url": "/v1/definitions/refunds"},
        ])
    );
}

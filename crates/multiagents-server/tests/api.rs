//! The API over real HTTP: a runtime with in-process workers behind the
//! router on a loopback port, called with an HTTP client.

mod common;

use common::{Api, REFUNDS, problem};
use hyper::Method;
use serde_json::json;

#[tokio::test]
async fn definitions_deploy_from_yaml_and_bad_ones_are_refused_naming_the_culprit() {
    let api = Api::start().await;
    let a = api
        .call(
            Method::POST,
            "/v1/definitions",
            &[("content-type", "application/yaml")],
            REFUNDS,
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body, json!({"name": "refunds", "version": 1}));
    assert_eq!(
        a.location.as_deref(),
        Some("/v1/definitions/refunds?version=1")
    );

    let a = api
        .call(Method::GET, "/v1/definitions/refunds", &[], "")
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["name"], "refunds");
    assert_eq!(a.body["steps"][1]["worker"], "pay_refund");
    problem(
        &api.call(Method::GET, "/v1/definitions/refunds?version=9", &[], "")
            .await,
        404,
        None,
    );
    problem(
        &api.call(Method::GET, "/v1/definitions/nothing", &[], "")
            .await,
        404,
        None,
    );
    let mermaid = api
        .call(Method::GET, "/v1/definitions/refunds/diagram", &[], "")
        .await;
    assert_eq!(mermaid.status, 200);
    let text = mermaid.body.as_str().expect("text");
    assert!(
        text.contains("check") && text.contains("pay_refund"),
        "{text}"
    );
    let ascii = api
        .call(
            Method::GET,
            "/v1/definitions/refunds/diagram?format=ascii&version=1",
            &[],
            "",
        )
        .await;
    assert!(
        ascii
            .body
            .as_str()
            .expect("text")
            .contains("pay    [pay_refund]"),
        "{:?}",
        ascii.body
    );
    problem(
        &api.call(
            Method::GET,
            "/v1/definitions/refunds/diagram?format=svg",
            &[],
            "",
        )
        .await,
        400,
        Some("query.format"),
    );

    // The same version with other steps: refused, the deployed one kept.
    let changed = REFUNDS.replace("pay_refund", "pay_twice");
    problem(
        &api.call(Method::POST, "/v1/definitions", &[], &changed)
            .await,
        409,
        None,
    );
    let kept = api
        .call(Method::GET, "/v1/definitions/refunds", &[], "")
        .await;
    assert_eq!(kept.body["steps"][1]["worker"], "pay_refund");

    let twice = "name: bad\nsteps:\n  - name: a\n    worker: w\n  - name: a\n    worker: w\n";
    let a = api.call(Method::POST, "/v1/definitions", &[], twice).await;
    problem(&a, 422, Some("body"));
    assert!(
        a.body["detail"].as_str().expect("detail").contains("`a`"),
        "{:?}",
        a.body
    );
    let a = api
        .call(
            Method::POST,
            "/v1/definitions",
            &[("content-type", "application/json")],
            "{\"name\": 3",
        )
        .await;
    problem(&a, 422, Some("body"));
    problem(
        &api.call(Method::POST, "/v1/definitions", &[], "  ").await,
        400,
        Some("body"),
    );
}

#[tokio::test]
async fn a_run_starts_once_per_idempotency_key_and_is_read_listed_and_waited_for() {
    let api = Api::start().await;
    assert_eq!(
        api.call(Method::POST, "/v1/definitions", &[], REFUNDS)
            .await
            .status,
        201
    );
    let key = [("idempotency-key", "refund-42")];
    let first = api
        .call(
            Method::POST,
            "/v1/workflows/refunds/runs?wait=10s",
            &key,
            r#"{"amount": 5}"#,
        )
        .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["status"], "completed");
    assert_eq!(first.body["output"]["pay"], json!({"paid": 5}));
    let id = first.body["id"].as_str().expect("id").to_string();
    assert_eq!(first.location, Some(format!("/v1/runs/{id}")));

    // The same key: the same run, not a second one.
    let again = api
        .call(
            Method::POST,
            "/v1/workflows/refunds/runs",
            &key,
            r#"{"amount": 5}"#,
        )
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["id"], id);
    assert_eq!(again.body["url"], format!("/v1/runs/{id}"));
    let refused = api
        .call(
            Method::POST,
            "/v1/workflows/refunds/runs?on_conflict=fail",
            &key,
            r#"{"amount": 5}"#,
        )
        .await;
    problem(&refused, 409, Some("header.Idempotency-Key"));

    let run = api
        .call(Method::GET, &format!("/v1/runs/{id}"), &[], "")
        .await;
    assert_eq!(run.status, 200);
    assert_eq!(run.body["status"], "completed");
    assert_eq!(run.body["input"], json!({"amount": 5}));
    assert!(
        run.body["history"].as_array().is_some_and(|h| h.len() >= 5),
        "{:?}",
        run.body
    );

    let listed = api
        .call(
            Method::GET,
            "/v1/runs?workflow=refunds&status=completed",
            &[],
            "",
        )
        .await;
    assert_eq!(listed.status, 200);
    let runs = listed.body["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["id"], id);

    // Without a key every start is a new run; a declined one ends failed.
    let declined = api
        .call(
            Method::POST,
            "/v1/workflows/refunds/runs",
            &[],
            r#"{"amount": 500}"#,
        )
        .await;
    assert_eq!(declined.status, 201);
    let url = declined.body["url"].as_str().expect("url").to_string();
    assert_ne!(declined.body["id"], id);
    let result = api
        .call(Method::GET, &format!("{url}/result?wait=10s"), &[], "")
        .await;
    assert_eq!(result.status, 200, "{:?}", result.body);
    assert_eq!(result.body["status"], "failed");
    assert!(
        result.body["failure"].to_string().contains("too much"),
        "{:?}",
        result.body
    );
}

#[tokio::test]
async fn bad_requests_get_a_problem_naming_the_field() {
    let api = Api::start().await;
    assert_eq!(api.call(Method::GET, "/healthz", &[], "").await.status, 200);
    assert_eq!(api.call(Method::GET, "/readyz", &[], "").await.status, 200);
    problem(
        &api.call(Method::GET, "/v1/runs/not-an-id", &[], "").await,
        400,
        Some("path.id"),
    );
    let unknown = format!("/v1/runs/{}", multiagents::TransactionId::new());
    problem(&api.call(Method::GET, &unknown, &[], "").await, 404, None);
    problem(
        &api.call(Method::GET, &format!("{unknown}/result?wait=1ms"), &[], "")
            .await,
        404,
        None,
    );
    problem(
        &api.call(Method::POST, "/v1/workflows/nothing/runs", &[], "{}")
            .await,
        404,
        None,
    );
    problem(
        &api.call(Method::POST, "/v1/workflows/refunds/runs", &[], "{not json")
            .await,
        400,
        Some("body"),
    );
    assert_eq!(
        api.call(Method::POST, "/v1/definitions", &[], REFUNDS)
            .await
            .status,
        201
    );
    problem(
        &api.call(
            Method::POST,
            "/v1/workflows/refunds/runs?wait=soon",
            &[],
            "{}",
        )
        .await,
        400,
        Some("query.wait"),
    );
    problem(
        &api.call(
            Method::POST,
            "/v1/workflows/refunds/runs?priority=urgent",
            &[],
            "{}",
        )
        .await,
        400,
        Some("query.priority"),
    );
    problem(
        &api.call(
            Method::POST,
            "/v1/workflows/refunds/runs?on_conflict=maybe",
            &[],
            "{}",
        )
        .await,
        400,
        Some("query.on_conflict"),
    );
    problem(
        &api.call(Method::GET, "/v1/runs?status=sleepy", &[], "")
            .await,
        400,
        Some("query.status"),
    );
    problem(
        &api.call(Method::GET, "/v1/nowhere", &[], "").await,
        404,
        None,
    );
}

#[test]
fn idempotency_keys_map_to_stable_distinct_run_ids() {
    // Same workflow and key: the same id; another key or workflow: another.
    let ids = [
        multiagents_server::run_id_for_key("refunds", "a"),
        multiagents_server::run_id_for_key("refunds", "b"),
        multiagents_server::run_id_for_key("orders", "a"),
        multiagents_server::run_id_for_key("refundsa", ""),
    ];
    assert_eq!(ids[0], multiagents_server::run_id_for_key("refunds", "a"));
    for i in 0..ids.len() {
        for j in i + 1..ids.len() {
            assert_ne!(ids[i], ids[j]);
        }
    }
}

#[tokio::test]
async fn a_poison_result_shows_in_the_dead_letters_with_its_reason_origin_and_age() {
    use multiagents::bus::Topics;
    use multiagents::core::{
        CorrelationId, Event, EventKind, Payload, TransactionId, WorkflowName,
    };
    let api = Api::start().await;
    let stray = TransactionId::new();
    let mut event = Event::new(
        EventKind::Result,
        stray,
        CorrelationId::new(),
        WorkflowName::new("refunds"),
        Payload::null(),
    );
    event.step = Some("pay".into());
    api.bus.publish("results", event).await.expect("published");
    let mut letters = serde_json::Value::Null;
    for _ in 0..100 {
        let a = api.call(Method::GET, "/v1/dead-letters", &[], "").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        if a.body["dead_letters"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
        {
            letters = a.body["dead_letters"].clone();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let letter = &letters[0];
    assert_eq!(letter["topic"], "results", "{letters:?}");
    assert!(
        letter["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{letter:?}"
    );
    assert_eq!(
        letter["origin"]["transaction_id"],
        stray.to_string(),
        "{letter:?}"
    );
    assert_eq!(letter["origin"]["step"], "pay", "{letter:?}");
    assert!(letter["age_ms"].as_u64().is_some(), "{letter:?}");
    problem(
        &api.call(Method::GET, "/v1/dead-letters?limit=0", &[], "")
            .await,
        400,
        Some("query.limit"),
    );
}

#[tokio::test]
async fn workers_report_their_health_from_their_heartbeats() {
    let api = Api::start().await;
    let mut seen = Vec::new();
    for _ in 0..100 {
        let a = api.call(Method::GET, "/v1/workers", &[], "").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        seen = a.body["workers"].as_array().cloned().unwrap_or_default();
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let names: Vec<&str> = seen.iter().filter_map(|w| w["worker"].as_str()).collect();
    assert!(
        names.contains(&"check_refund") && names.contains(&"pay_refund"),
        "{seen:?}"
    );
    let check = seen
        .iter()
        .find(|w| w["worker"] == "check_refund")
        .expect("check_refund");
    assert_eq!(
        check["instances"].as_array().map(Vec::len),
        Some(1),
        "{check:?}"
    );
    assert!(
        check["lag"].get("commands.check_refund").is_some(),
        "{check:?}"
    );
}

#[tokio::test]
async fn runs_are_listed_a_page_at_a_time_by_cursor_and_filtered() {
    let api = Api::start().await;
    api.deploy(REFUNDS).await;
    let chain = "8f0c3f7e-2f37-4c6e-9a7e-1d2b3c4d5e6f";
    let mut ids = Vec::new();
    for n in 0..5 {
        let path = if n % 2 == 0 {
            format!("/v1/workflows/refunds/runs?wait=10s&correlation_id={chain}")
        } else {
            "/v1/workflows/refunds/runs?wait=10s".to_string()
        };
        let a = api
            .call(Method::POST, &path, &[], &json!({"amount": n}).to_string())
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        ids.push(a.body["id"].clone());
    }
    let mut seen = Vec::new();
    let mut path = "/v1/runs?limit=2".to_string();
    loop {
        let page = api.get(&path).await;
        let runs = page["runs"].as_array().expect("runs").clone();
        assert!(runs.len() <= 2, "{page:?}");
        seen.extend(runs.iter().map(|r| r["id"].clone()));
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/runs?limit=2&cursor={next}"),
            None => break,
        }
    }
    // Newest first; runs started in the same millisecond by id, highest first.
    let mut order = Vec::new();
    for id in &ids {
        let run = api
            .get(&format!("/v1/runs/{}", id.as_str().expect("in the answer")))
            .await;
        order.push((
            run["started_at"].as_u64().expect("in the answer"),
            id.as_str().expect("in the answer").to_string(),
        ));
    }
    order.sort();
    order.reverse();
    let ids: Vec<serde_json::Value> = order.into_iter().map(|(_, id)| json!(id)).collect();
    assert_eq!(seen, ids, "every run once, newest first");
    let chained = api.get(&format!("/v1/runs?correlation_id={chain}")).await;
    assert_eq!(
        chained["runs"].as_array().map(Vec::len),
        Some(3),
        "{chained:?}"
    );
    assert_eq!(chained["next"], serde_json::Value::Null);
    let none = api.get("/v1/runs?started_after=1&started_before=2").await;
    assert_eq!(none["runs"], json!([]));
    problem(
        &api.call(Method::GET, "/v1/runs?cursor=nope", &[], "").await,
        400,
        Some("query.cursor"),
    );
    problem(
        &api.call(Method::GET, "/v1/runs?limit=0", &[], "").await,
        400,
        Some("query.limit"),
    );
    problem(
        &api.call(Method::GET, "/v1/runs?correlation_id=x", &[], "")
            .await,
        400,
        Some("query.correlation_id"),
    );
}

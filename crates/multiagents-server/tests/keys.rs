//! API keys over real HTTP: each scope, a wrong key, a missing key, and
//! the routes that need none.

mod common;

use common::{Api, REFUNDS, problem};
use hyper::Method;
use multiagents_server::{ApiKeys, Scope};
use serde_json::json;

struct Keys {
    read: String,
    operate: String,
    admin: String,
    worker: String,
}

async fn secured() -> (Api, Keys) {
    let mut lines = Vec::new();
    let mut key = |name: &str, scope: Scope| {
        let (key, line) = ApiKeys::generate(name, &[scope]).expect("a key");
        lines.push(line);
        key
    };
    let keys = Keys {
        read: key("reader", Scope::Read),
        operate: key("operator", Scope::Operate),
        admin: key("root", Scope::Admin),
        worker: key("py-worker", Scope::Worker),
    };
    let api = Api::secured(ApiKeys::parse(&lines.join("\n")).expect("valid")).await;
    (api, keys)
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn each_scope_allows_its_routes_and_no_others() {
    let (api, k) = secured().await;
    let as_ = |key: &str| vec![("authorization", bearer(key))];
    let call = |method: Method, path: &'static str, key: &str, body: &'static str| {
        let headers = as_(key);
        let api = &api;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(a, b)| (*a, b.as_str())).collect();
            api.call(method, path, &h, body).await
        }
    };
    // Deploying is admin's.
    problem(
        &call(Method::POST, "/v1/definitions", &k.operate, REFUNDS).await,
        403,
        Some("header.Authorization"),
    );
    assert_eq!(
        call(Method::POST, "/v1/definitions", &k.admin, REFUNDS)
            .await
            .status,
        201
    );
    // Starting is operate's (and admin's), not read's or worker's.
    for key in [&k.read, &k.worker] {
        let a = call(
            Method::POST,
            "/v1/workflows/refunds/runs",
            key,
            r#"{"amount": 1}"#,
        )
        .await;
        problem(&a, 403, Some("header.Authorization"));
        assert!(
            a.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("`operate` scope")),
            "{:?}",
            a.body
        );
    }
    let started = call(
        Method::POST,
        "/v1/workflows/refunds/runs?wait=10s",
        &k.operate,
        r#"{"amount": 1}"#,
    )
    .await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    // Reading is everyone's but the worker's.
    for key in [&k.read, &k.operate, &k.admin] {
        assert_eq!(call(Method::GET, "/v1/runs", key, "").await.status, 200);
        assert_eq!(call(Method::GET, "/metrics", key, "").await.status, 200);
    }
    problem(
        &call(Method::GET, "/v1/runs", &k.worker, "").await,
        403,
        Some("header.Authorization"),
    );
    // Tasks are the worker's (and admin's).
    let poll = r#"{"workers": ["nobody"], "wait_ms": 0}"#;
    assert_eq!(
        call(Method::POST, "/v1/tasks/poll", &k.worker, poll)
            .await
            .status,
        200
    );
    assert_eq!(
        call(Method::POST, "/v1/tasks/poll", &k.admin, poll)
            .await
            .status,
        200
    );
    problem(
        &call(Method::POST, "/v1/tasks/poll", &k.operate, poll).await,
        403,
        Some("header.Authorization"),
    );
    // Discarding a dead letter is admin's; the audit log names the key.
    let a = call(Method::DELETE, "/v1/dead-letters/1-0", &k.operate, "").await;
    problem(&a, 403, Some("header.Authorization"));
    assert_eq!(
        call(Method::DELETE, "/v1/dead-letters/1-0", &k.admin, "")
            .await
            .status,
        404
    );
    // Who am I.
    let me = call(Method::GET, "/v1/me", &k.worker, "").await;
    assert_eq!(me.status, 200, "{:?}", me.body);
    assert_eq!(
        me.body,
        json!({"name": "py-worker", "scopes": ["worker"], "keys_required": true})
    );
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_refused_and_never_echoed() {
    let (api, k) = secured().await;
    let a = api.call(Method::GET, "/v1/runs", &[], "").await;
    problem(&a, 401, Some("header.Authorization"));
    let wrong = format!("{}x", k.admin);
    for header in [bearer(&wrong), format!("Basic {}", k.admin), bearer("")] {
        let a = api
            .call(Method::GET, "/v1/runs", &[("authorization", &header)], "")
            .await;
        problem(&a, 401, Some("header.Authorization"));
        assert!(
            !a.body.to_string().contains(&k.admin),
            "the key must not be echoed"
        );
    }
    // Health needs no key.
    assert_eq!(api.call(Method::GET, "/healthz", &[], "").await.status, 200);
    assert_eq!(api.call(Method::GET, "/readyz", &[], "").await.status, 200);
    assert_eq!(
        api.call(Method::GET, "/openapi.json", &[], "").await.status,
        200
    );
    // The key is in no metric.
    let metrics = api
        .call(
            Method::GET,
            "/metrics",
            &[("authorization", &bearer(&k.read))],
            "",
        )
        .await;
    assert_eq!(metrics.status, 200);
    assert!(!metrics.body.to_string().contains(&k.read));
}

#[tokio::test]
async fn without_keys_every_scope_is_granted() {
    let api = Api::start().await;
    let me = api.get("/v1/me").await;
    assert_eq!(
        me,
        json!({"name": "anonymous", "scopes": ["read", "operate", "admin", "worker"], "keys_required": false})
    );
}

//! The harness: a runtime behind the router on a loopback port, and an
//! HTTP client to call it.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use multiagents::bus::{MemoryBus, MemoryBusConfig};
use multiagents::store::MemoryStore;
use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents::{Runtime, RuntimeBuilder};
use serde_json::{Value, json};

pub const REFUNDS: &str = "name: refunds\nversion: 1\nsteps:\n  - name: check\n    worker: check_refund\n  - name: pay\n    worker: pay_refund\n";

pub fn check_refund() -> impl multiagents::Worker {
    from_fn("check_refund", |v: Value, _ctx: WorkerContext| async move {
        Ok::<_, WorkerError>(json!({"checked": v["amount"]}))
    })
}

pub fn pay_refund() -> impl multiagents::Worker {
    from_fn("pay_refund", |v: Value, _ctx: WorkerContext| async move {
        if v["amount"].as_i64().unwrap_or(0) > 100 {
            return Err(WorkerError::fatal("too much").with_kind("declined"));
        }
        Ok(json!({"paid": v["amount"]}))
    })
}

pub struct Api {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    _runtime: Runtime,
    /// The bus the service takes tasks from.
    pub bus: MemoryBus,
}

pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub location: Option<String>,
    pub body: Value,
}

impl Api {
    /// Both refund workers in process.
    pub async fn start() -> Self {
        Self::with(
            |b| b.worker(check_refund()).worker(pay_refund()),
            Duration::from_secs(30),
            multiagents_server::TaskOptions::default(),
        )
        .await
    }

    /// The runtime `workers` makes, on a bus with this visibility timeout,
    /// with HTTP workers' tasks leased as `tasks` says.
    pub async fn with(
        workers: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
        visibility: Duration,
        tasks: multiagents_server::TaskOptions,
    ) -> Self {
        let config = MemoryBusConfig {
            visibility_timeout: visibility,
            ..Default::default()
        };
        Self::on_bus(workers, config, tasks).await
    }

    /// The same on a bus set up as `config` says.
    pub async fn on_bus(
        workers: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
        config: MemoryBusConfig,
        tasks: multiagents_server::TaskOptions,
    ) -> Self {
        Self::build(workers, config, tasks, None).await
    }

    /// Both refund workers in process, and the service requiring `keys`.
    pub async fn secured(keys: multiagents_server::ApiKeys) -> Self {
        Self::build(
            |b| b.worker(check_refund()).worker(pay_refund()),
            MemoryBusConfig::default(),
            multiagents_server::TaskOptions::default(),
            Some(keys),
        )
        .await
    }

    async fn build(
        workers: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
        config: MemoryBusConfig,
        tasks: multiagents_server::TaskOptions,
        keys: Option<multiagents_server::ApiKeys>,
    ) -> Self {
        let bus = MemoryBus::with_config(config);
        let store = MemoryStore::new();
        let runtime = workers(Runtime::builder().bus(bus.clone()).store(store.clone()))
            .external_workers()
            .start()
            .await
            .expect("runtime");
        let mut service =
            multiagents_server::Service::with_tasks(runtime.client(), bus.clone(), store, tasks);
        if let Some(keys) = keys {
            service = service.with_api_keys(keys);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(multiagents_server::serve(
            listener,
            service,
            std::future::pending(),
        ));
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Self {
            base,
            http,
            _runtime: runtime,
            bus,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let res = self.http.request(req).await.expect("the service answers");
        let status = res.status().as_u16();
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type").unwrap_or_default();
        let location = header("location");
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            content_type,
            location,
            body,
        }
    }
}

/// The answer is a problem of `status` naming `field`.
pub fn problem(a: &Answer, status: u16, field: Option<&str>) {
    assert_eq!(a.status, status, "{:?}", a.body);
    assert_eq!(a.content_type, "application/problem+json", "{:?}", a.body);
    assert_eq!(a.body["status"], status);
    assert!(
        a.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{:?}",
        a.body
    );
    assert_eq!(a.body["field"].as_str(), field, "{:?}", a.body);
}

impl Api {
    /// Deploys a YAML definition; it must be accepted.
    pub async fn deploy(&self, yaml: &str) {
        let a = self.call(Method::POST, "/v1/definitions", &[], yaml).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
    }

    /// Starts a run of `workflow` with `input` and waits for its outcome.
    pub async fn run_to_end(&self, workflow: &str, input: Value) -> Value {
        let a = self
            .call(
                Method::POST,
                &format!("/v1/workflows/{workflow}/runs?wait=20s"),
                &[],
                &input.to_string(),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        a.body
    }

    /// `GET path`, which must answer 200.
    pub async fn get(&self, path: &str) -> Value {
        let a = self.call(Method::GET, path, &[], "").await;
        assert_eq!(a.status, 200, "GET {path}: {:?}", a.body);
        a.body
    }

    /// Polls `GET /v1/dead-letters` until one letter of `topic` shows.
    pub async fn dead_letter_of(&self, topic: &str) -> Value {
        for _ in 0..250 {
            let letters = self.get("/v1/dead-letters").await;
            if let Some(l) = letters["dead_letters"]
                .as_array()
                .and_then(|l| l.iter().find(|d| d["topic"] == topic))
            {
                return l.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no dead letter of `{topic}` showed");
    }
}

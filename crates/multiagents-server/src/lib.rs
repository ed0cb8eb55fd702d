//! The multiagents service: the HTTP API (v1) over a runtime's client and
//! store, as `multiagents serve` runs it.
//!
//! JSON in and out; every error is an RFC 9457 `application/problem+json`
//! body that says what was wrong and which request field. See
//! `docs/api.md` for every route with curl.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use multiagents::Runtime;
//! use multiagents::bus::MemoryBus;
//! use multiagents::store::MemoryStore;
//!
//! let (bus, store) = (MemoryBus::new(), MemoryStore::new());
//! let runtime = Runtime::builder().bus(bus.clone()).store(store.clone()).start().await?;
//! let service = multiagents_server::Service::new(runtime.client(), bus, store);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! multiagents_server::serve(listener, service, std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod auth;
mod events;
mod extract;
mod http_health;
mod openapi;
mod ops;
mod problem;
mod runs;
mod stats;
mod tasks;
mod timeline;
mod ui;

use std::future::Future;
use std::sync::Arc;

use crate::extract::{Path, Query, Text};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use multiagents::Client;
use multiagents::bus::Bus;
use multiagents::core::WorkflowDefinition;
use multiagents::store::Store;
use serde::Deserialize;
use serde_json::json;

pub use auth::{ApiKeys, KeysError, Scope};
pub use openapi::document as openapi_document;
pub use problem::Problem;
pub use tasks::TaskOptions;

/// The default address of `multiagents serve`: loopback, port 7430.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7430";

/// What the API works on: a client (to start, watch, signal and cancel
/// runs), the bus HTTP workers take their tasks from, and the store.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
    keys: Option<Arc<ApiKeys>>,
    max_wait: std::time::Duration,
}

/// The longest `?wait=` a service honours unless told otherwise
/// ([`Service::with_max_wait`]).
pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

struct Inner {
    client: Client,
    store: Store,
    tasks: Arc<tasks::Tasks>,
    feed: Arc<events::Feed>,
    stats: Arc<stats::Stats>,
    counts: runs::CountsCache,
}

impl Service {
    /// A service over `client` and the `bus` and `store` it uses.
    pub fn new(client: Client, bus: impl Into<Bus>, store: impl Into<Store>) -> Self {
        Self::with_tasks(client, bus, store, TaskOptions::default())
    }

    /// The same, with HTTP workers' tasks leased as `options` says.
    pub fn with_tasks(
        client: Client,
        bus: impl Into<Bus>,
        store: impl Into<Store>,
        options: TaskOptions,
    ) -> Self {
        let bus = bus.into();
        let store: Store = store.into();
        let tasks = tasks::Tasks::new(bus.clone(), options);
        tasks.heartbeat_into(store.health.clone());
        Self {
            inner: Arc::new(Inner {
                client,
                store,
                feed: events::Feed::start(&bus),
                stats: stats::Stats::start(),
                counts: runs::CountsCache::default(),
                tasks,
            }),
            keys: None,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }

    /// Caps every `?wait=` (and a task poll's `wait_ms`) at `max`: a wait
    /// asked for beyond it ends at it (default 5 minutes). Keep it under the
    /// timeouts of the proxies in front.
    pub fn with_max_wait(mut self, max: std::time::Duration) -> Self {
        self.max_wait = max;
        self
    }

    fn max_wait(&self) -> std::time::Duration {
        self.max_wait
    }

    /// Requires one of `keys` on every request but `/healthz` and
    /// `/readyz`, each allowed what its scopes allow (see [`Scope`]).
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.keys = Some(Arc::new(keys));
        self
    }

    fn keys(&self) -> Option<&ApiKeys> {
        self.keys.as_deref()
    }

    fn feed(&self) -> &Arc<events::Feed> {
        &self.inner.feed
    }

    fn counts_cache(&self) -> &runs::CountsCache {
        &self.inner.counts
    }

    fn stats(&self) -> &stats::Stats {
        &self.inner.stats
    }

    fn tasks(&self) -> &Arc<tasks::Tasks> {
        &self.inner.tasks
    }

    fn client(&self) -> &Client {
        &self.inner.client
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }
}

/// Every route of the API, v1 (the table in `openapi.rs`, which the
/// document at `/openapi.json` is made from too), and the dashboard at
/// `/ui`.
pub fn router(service: Service) -> Router {
    openapi::routes()
        .merge(ui::routes())
        .fallback(|| async {
            Problem::not_found("no such route; see /openapi.json and docs/api.md")
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not take this method; see /openapi.json",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            service.clone(),
            auth::require_key,
        ))
        .with_state(service)
}

/// The run id an `Idempotency-Key` stands for, for runs of `workflow`: the
/// same in every replica and after every restart, so a retried start finds
/// the run the first one made.
pub fn run_id_for_key(workflow: &str, key: &str) -> multiagents::TransactionId {
    runs::idempotent_id(workflow, key)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The body read as JSON, or a 400 naming the body: `expected` says what
/// it should have been.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: &str,
    expected: &str,
) -> Result<T, Problem> {
    serde_json::from_str(body).map_err(|e| Problem::bad_request("body", format!("{expected}: {e}")))
}

/// The same, where an empty body stands for `T::default()` (`null`, no
/// options).
pub(crate) fn json_body_or_default<T: serde::de::DeserializeOwned + Default>(
    body: &str,
    expected: &str,
) -> Result<T, Problem> {
    if body.trim().is_empty() {
        return Ok(T::default());
    }
    json_body(body, expected)
}

pub(crate) async fn readyz(State(service): State<Service>) -> Response {
    // One store read: the service is ready when its store answers.
    match service
        .store()
        .definitions
        .latest_definition("readyz")
        .await
    {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(e) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "The store does not answer",
            e.to_string(),
        )
        .into_response(),
    }
}

pub(crate) async fn metrics() -> Response {
    match multiagents::monitoring::metrics::install_prometheus() {
        Ok(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        Err(e) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Metrics are unavailable",
            e.to_string(),
        )
        .into_response(),
    }
}

/// `POST /v1/definitions`: a definition as JSON, or YAML (by its
/// `Content-Type`, or when the body is not a JSON object).
pub(crate) async fn deploy(
    State(service): State<Service>,
    headers: HeaderMap,
    Text(body): Text,
) -> Result<Response, Problem> {
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("yaml"))
        || !body.trim_start().starts_with('{');
    if body.trim().is_empty() {
        return Err(Problem::bad_request(
            "body",
            "the body is empty: send a workflow definition as JSON or YAML",
        ));
    }
    let parsed = if yaml {
        WorkflowDefinition::from_yaml(&body)
    } else {
        WorkflowDefinition::from_json(&body)
    };
    let definition = parsed.map_err(|e| Problem::unprocessable("body", e.to_string()))?;
    service.client().register(&definition).await?;
    let name = definition.name().to_string();
    let version = definition.version();
    Ok((
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/v1/definitions/{name}?version={version}"),
        )],
        axum::Json(json!({"name": name, "version": version})),
    )
        .into_response())
}

/// `GET /v1/definitions`: every deployed definition, with its versions.
pub(crate) async fn definitions(State(service): State<Service>) -> Result<Response, Problem> {
    let versions = service
        .store()
        .definitions
        .definition_versions()
        .await
        .map_err(multiagents::Error::from)?;
    let mut out: Vec<serde_json::Value> = Vec::new();
    for (name, version) in versions {
        match out.last_mut() {
            Some(last) if last["name"] == name.as_str() => {
                if let Some(v) = last["versions"].as_array_mut() {
                    v.push(json!(version));
                }
                last["latest"] = json!(version);
            }
            _ => out.push(json!({
                "name": name,
                "versions": [version],
                "latest": version,
                "url": format!("/v1/definitions/{name}"),
            })),
        }
    }
    Ok(axum::Json(json!({"definitions": out})).into_response())
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u32>,
    format: Option<String>,
}

/// `GET /v1/definitions/{name}`: the latest version, or `?version=N`.
pub(crate) async fn definition(
    State(service): State<Service>,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Response, Problem> {
    Ok(axum::Json(find_definition(&service, &name, q.version).await?).into_response())
}

/// `GET /v1/definitions/{name}/diagram?format=mermaid|ascii` (Mermaid by
/// default), as text.
pub(crate) async fn diagram(
    State(service): State<Service>,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Response, Problem> {
    use multiagents::core::workflow::diagram;
    let render = match q.format.as_deref().unwrap_or("mermaid") {
        "mermaid" => diagram::mermaid,
        "ascii" => diagram::ascii,
        other => {
            return Err(Problem::bad_request(
                "query.format",
                format!("`{other}` is not mermaid or ascii"),
            ));
        }
    };
    let def = find_definition(&service, &name, q.version).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        render(&def),
    )
        .into_response())
}

async fn find_definition(
    service: &Service,
    name: &str,
    version: Option<u32>,
) -> Result<WorkflowDefinition, Problem> {
    let definitions = &service.store().definitions;
    let found = match version {
        Some(v) => definitions.get_definition(name, v).await,
        None => definitions.latest_definition(name).await,
    }
    .map_err(multiagents::Error::from)?;
    match found {
        Some(d) => Ok(d),
        None => Err(Problem::not_found(match version {
            Some(v) => format!("no definition `{name}` version {v} is deployed"),
            None => format!("no definition `{name}` is deployed"),
        })),
    }
}

//! LLM workers, first part: a client for the OpenAI-compatible chat API
//! (OpenAI, vLLM, Ollama and llama.cpp all speak it).
//!
//! * Configured per worker, never process-wide: an [`LlmConfig`] holds the
//!   base URL, key, model, timeout, retries and prices, and is read from the
//!   environment with [`LlmConfig::from_env`] (`OPENAI_BASE_URL`,
//!   `OPENAI_API_KEY`, `MULTIAGENTS_LLM_MODEL`).
//! * Calls never block the runtime: the client is async (hyper).
//! * A `429` or `5xx` is retried, honouring `retry-after` (seconds) or
//!   `retry-after-ms`, else with exponential back-off; a reply that takes
//!   longer than the timeout is an error that says so.
//! * Token usage is recorded per call, returned with the reply and exported
//!   as metrics (`multiagents_llm_tokens_total`, and
//!   `multiagents_llm_cost_total` when prices are configured).
//! * The key never appears in logs, errors or `Debug` output.
//!
//! ```no_run
//! # async fn f() -> Result<(), multiagents::llm::LlmError> {
//! use multiagents::llm::{ChatRequest, LlmClient, LlmConfig, Message};
//!
//! let client = LlmClient::new(LlmConfig::from_env()?.model("gpt-4o-mini"));
//! let reply = client
//!     .chat(&ChatRequest::new(vec![Message::user("Say hello in French.")]))
//!     .await?;
//! println!("{} ({} tokens)", reply.content, reply.usage.total());
//! # Ok(()) }
//! ```
//!
//! `https://` endpoints (OpenAI) need the `llm-tls` feature: TLS with
//! rustls on ring, trusting the Mozilla roots (and any extra root given with
//! [`LlmConfig::extra_root_pem`]). Without it they are refused with an error
//! that says so.

pub mod metric_names;
mod optimize;
mod predict;
mod program;
mod react;
mod replay;
mod signature;

pub use optimize::{
    BootstrapFewShot, Evaluation, LabeledFewShot, Metric, SavedProgram, evaluate, exact_match,
};
pub use predict::{ChainOfThought, Example, Predict, PredictError, Prediction};
pub use program::{Program, Then};
pub use react::{ReAct, ReActOutcome, Tool, ToolStep};
pub use replay::Replay;
pub use signature::{Field, FieldType, Signature, SignatureError, TypedSignature};

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// An API key: shown as `***` everywhere.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "(none)" } else { "***" })
    }
}

/// Prices per million tokens, for the cost metric.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prices {
    /// Per million prompt tokens.
    pub input_per_million: f64,
    /// Per million completion tokens.
    pub output_per_million: f64,
}

/// How to reach a model. Each worker has its own.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    /// The API's base URL, up to and including `/v1`.
    pub base_url: String,
    /// The key, if the server wants one.
    pub api_key: ApiKey,
    /// The model name.
    pub model: String,
    /// How long one HTTP attempt may take, reply included.
    pub timeout: Duration,
    /// Attempts after the first, on `429` and `5xx`.
    pub max_retries: u32,
    /// First back-off when the server says nothing (doubles each time).
    pub backoff: Duration,
    /// Prices, for the cost metric.
    pub prices: Option<Prices>,
    /// Extra trusted root certificates, PEM (a private CA, a test server).
    pub extra_root_pem: Option<String>,
}

impl LlmConfig {
    /// A configuration for `base_url` with no key, model `default`, a 60 s
    /// timeout and 3 retries.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            api_key: ApiKey::default(),
            model: "default".into(),
            timeout: Duration::from_secs(60),
            max_retries: 3,
            backoff: Duration::from_millis(500),
            prices: None,
            extra_root_pem: None,
        }
    }

    /// Also trusts these root certificates (PEM) for `https://`.
    pub fn extra_root_pem(mut self, pem: impl Into<String>) -> Self {
        self.extra_root_pem = Some(pem.into());
        self
    }

    /// From `OPENAI_BASE_URL` (default `https://api.openai.com/v1`),
    /// `OPENAI_API_KEY` and `MULTIAGENTS_LLM_MODEL`. Fails, saying how to fix
    /// it, when neither a base URL nor a key is set.
    pub fn from_env() -> Result<Self, LlmError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let base = var("OPENAI_BASE_URL");
        let key = var("OPENAI_API_KEY");
        if base.is_none() && key.is_none() {
            return Err(LlmError::NotConfigured(
                "set OPENAI_BASE_URL (e.g. http://localhost:11434/v1 for Ollama, http://localhost:8000/v1 for vLLM) or OPENAI_API_KEY for OpenAI".into(),
            ));
        }
        let mut config = Self::new(base.unwrap_or_else(|| "https://api.openai.com/v1".to_string()));
        if let Some(key) = key {
            config.api_key = ApiKey::new(key);
        }
        if let Some(model) = var("MULTIAGENTS_LLM_MODEL") {
            config.model = model;
        }
        Ok(config)
    }

    /// Sets the model.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Sets the key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = ApiKey::new(key);
        self
    }

    /// Sets the timeout of one attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the retries on `429` and `5xx`, and the first back-off.
    pub fn retries(mut self, max_retries: u32, backoff: Duration) -> Self {
        self.max_retries = max_retries;
        self.backoff = backoff;
        self
    }

    /// Sets prices per million tokens, for the cost metric.
    pub fn prices(mut self, input_per_million: f64, output_per_million: f64) -> Self {
        self.prices = Some(Prices {
            input_per_million,
            output_per_million,
        });
        self
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// Tools the assistant asks to call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A tool call the model asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, echoed in the answer.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function")]
    pub kind: String,
    /// What to call.
    pub function: FunctionCall,
}

/// The function part of a [`ToolCall`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments, as JSON text.
    #[serde(default)]
    pub arguments: String,
}

fn function() -> String {
    "function".into()
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    fn text(role: &str, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(text: impl Into<String>) -> Self {
        Self::text("system", text)
    }

    /// A user message.
    pub fn user(text: impl Into<String>) -> Self {
        Self::text("user", text)
    }

    /// An assistant message.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::text("assistant", text)
    }

    /// The answer to a tool call.
    pub fn tool(call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::text("tool", text)
        }
    }
}

/// A chat request.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Most tokens to generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Structured output: `{"type": "json_schema", "json_schema": {…}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<serde_json::Value>,
    /// Tools the model may call: `[{"type": "function", "function": {…}}]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<serde_json::Value>,
}

impl ChatRequest {
    /// A request with these messages.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }
}

/// Tokens used by one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

impl Usage {
    /// Both together.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    /// The first choice's text.
    pub content: String,
    /// Tools it asks to call.
    pub tool_calls: Vec<ToolCall>,
    /// Why generation stopped (`stop`, `length`, …).
    pub finish_reason: Option<String>,
    /// Tokens used.
    pub usage: Usage,
    /// The model that answered.
    pub model: String,
    /// HTTP attempts it took.
    pub attempts: u32,
}

/// What went wrong calling a model. No variant ever holds the key.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// Not configured: the message says how.
    #[error("no LLM endpoint is configured: {0}")]
    NotConfigured(String),
    /// The URL cannot be used.
    #[error("LLM endpoint `{url}`: {problem}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        problem: String,
    },
    /// No answer within the timeout.
    #[error("LLM endpoint {url} did not answer within {timeout:?} (attempt {attempt})")]
    Timeout {
        /// Where.
        url: String,
        /// The limit.
        timeout: Duration,
        /// Which attempt.
        attempt: u32,
    },
    /// The server could not be reached.
    #[error("LLM endpoint {url} cannot be reached: {message}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// The server answered with an error status (after the retries, for 429
    /// and 5xx).
    #[error("LLM endpoint {url} answered {status} after {attempts} attempt(s): {body}")]
    Status {
        /// Where.
        url: String,
        /// The HTTP status.
        status: u16,
        /// Attempts made.
        attempts: u32,
        /// The start of the body.
        body: String,
    },
    /// A replay file has no reply for this request, or cannot be used.
    #[error("replay: {0}")]
    Replay(String),
    /// The reply is not a chat completion.
    #[error(
        "LLM endpoint {url} sent a reply that is not a chat completion: {problem}; it began: {start}"
    )]
    BadReply {
        /// Where.
        url: String,
        /// What is wrong.
        problem: String,
        /// The start of the reply.
        start: String,
    },
}

impl LlmError {
    /// True for failures another attempt may fix (a timeout, an unreachable
    /// server, 429 and 5xx): a worker turns them into retryable errors.
    pub fn is_transient(&self) -> bool {
        match self {
            LlmError::Timeout { .. } | LlmError::Unreachable { .. } => true,
            LlmError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// A client for one [`LlmConfig`]. Cheap to clone.
#[derive(Clone)]
pub struct LlmClient {
    config: std::sync::Arc<LlmConfig>,
    http: Client<Connector, Full<Bytes>>,
    replay: Option<std::sync::Arc<Replay>>,
    /// Why https cannot be used, when it cannot.
    tls_problem: Option<String>,
}

impl fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmClient")
            .field("config", &self.config)
            .finish()
    }
}

/// How much of a body goes into an error message.
const BODY_IN_ERRORS: usize = 300;

fn start_of(text: &str) -> String {
    let mut s: String = text.chars().take(BODY_IN_ERRORS).collect();
    if text.chars().count() > BODY_IN_ERRORS {
        s.push('…');
    }
    s
}

impl LlmClient {
    /// A client for `config`.
    pub fn new(config: LlmConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.set_nodelay(true);
        let (connector, tls_problem) = tls(connector, &config);
        Self {
            config: std::sync::Arc::new(config),
            http: Client::builder(TokioExecutor::new()).build(connector),
            replay: None,
            tls_problem,
        }
    }

    /// Replies come from (or go to) `replay`: a response cache, a recording
    /// to a file, or a playback from one (see [`Replay`]).
    pub fn with_replay(mut self, replay: Replay) -> Self {
        self.replay = Some(std::sync::Arc::new(replay));
        self
    }

    /// Its configuration.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    fn url(&self) -> String {
        format!("{}/chat/completions", self.config.base_url)
    }

    /// Sends a chat request (with the configured model), retrying `429` and
    /// `5xx` under the configured policy.
    pub async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        let url = self.url();
        if url.starts_with("https://")
            && let Some(problem) = &self.tls_problem
        {
            return Err(LlmError::BadUrl {
                url,
                problem: problem.clone(),
            });
        }
        let uri: hyper::Uri = url.parse().map_err(|e| LlmError::BadUrl {
            url: url.clone(),
            problem: format!("{e}"),
        })?;
        #[derive(Serialize)]
        struct Body<'a> {
            model: &'a str,
            #[serde(flatten)]
            request: &'a ChatRequest,
        }
        let body = serde_json::to_vec(&Body {
            model: &self.config.model,
            request,
        })
        .map_err(|e| LlmError::BadUrl {
            url: url.clone(),
            problem: format!("the request does not encode: {e}"),
        })?;
        let key = replay::key(&body);
        if let Some(r) = &self.replay
            && let Some(reply) = r.lookup(&key)?
        {
            self.count("replayed");
            return Ok(reply);
        }
        let body = Bytes::from(body);
        let mut attempt = 0;
        let mut pause = self.config.backoff;
        loop {
            attempt += 1;
            let outcome = self.send(&uri, &url, body.clone(), attempt).await;
            let (status, headers, text) = match outcome {
                Ok(reply) => reply,
                Err(e) if e.is_transient() && attempt <= self.config.max_retries => {
                    tracing::warn!(url = %url, attempt, error = %e, "LLM call failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    continue;
                }
                Err(e) => {
                    self.count("error");
                    return Err(e);
                }
            };
            if status.is_success() {
                let reply = self.parse(&url, &text, attempt);
                self.count(if reply.is_ok() { "ok" } else { "error" });
                if let Ok(r) = &reply {
                    self.record_usage(&r.usage);
                    if let Some(replay) = &self.replay {
                        replay.store(&key, r)?;
                    }
                }
                return reply;
            }
            let retryable = status.as_u16() == 429 || status.is_server_error();
            if retryable && attempt <= self.config.max_retries {
                let wait = retry_after(&headers).unwrap_or(pause);
                tracing::warn!(url = %url, attempt, status = status.as_u16(), wait_ms = wait.as_millis() as u64, "LLM endpoint asked to retry");
                tokio::time::sleep(wait).await;
                pause *= 2;
                continue;
            }
            self.count("error");
            return Err(LlmError::Status {
                url,
                status: status.as_u16(),
                attempts: attempt,
                body: start_of(&text),
            });
        }
    }

    async fn send(
        &self,
        uri: &hyper::Uri,
        url: &str,
        body: Bytes,
        attempt: u32,
    ) -> Result<(hyper::StatusCode, hyper::HeaderMap, String), LlmError> {
        let mut builder = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json");
        if !self.config.api_key.expose().is_empty() {
            builder = builder.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.config.api_key.expose()),
            );
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| LlmError::BadUrl {
                url: url.to_string(),
                problem: e.to_string(),
            })?;
        let timeout = self.config.timeout;
        let started = Instant::now();
        let timed_out = || LlmError::Timeout {
            url: url.to_string(),
            timeout,
            attempt,
        };
        let response = tokio::time::timeout(timeout, self.http.request(request))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| LlmError::Unreachable {
                url: url.to_string(),
                message: error_chain(&e),
            })?;
        let (parts, body) = response.into_parts();
        let left = timeout.saturating_sub(started.elapsed());
        let bytes = tokio::time::timeout(left, body.collect())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| LlmError::Unreachable {
                url: url.to_string(),
                message: format!("the reply broke off: {}", error_chain(&e)),
            })?
            .to_bytes();
        Ok((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    }

    fn parse(&self, url: &str, text: &str, attempts: u32) -> Result<ChatResponse, LlmError> {
        #[derive(Deserialize)]
        struct Completion {
            #[serde(default)]
            model: String,
            choices: Vec<Choice>,
            #[serde(default)]
            usage: Usage,
        }
        #[derive(Deserialize)]
        struct Choice {
            message: Message,
            #[serde(default)]
            finish_reason: Option<String>,
        }
        let bad = |problem: String| LlmError::BadReply {
            url: url.to_string(),
            problem,
            start: start_of(text),
        };
        let completion: Completion = serde_json::from_str(text).map_err(|e| bad(format!("{e}")))?;
        let choice = completion
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| bad("it has no choices".into()))?;
        Ok(ChatResponse {
            content: choice.message.content,
            tool_calls: choice.message.tool_calls,
            finish_reason: choice.finish_reason,
            usage: completion.usage,
            model: if completion.model.is_empty() {
                self.config.model.clone()
            } else {
                completion.model
            },
            attempts,
        })
    }

    // No recorder installed: the `metrics` crate drops these at the cost of
    // a label clone, next to nothing beside an LLM call.
    fn count(&self, outcome: &'static str) {
        metrics::counter!(metric_names::LLM_CALLS, "model" => self.config.model.clone(), "outcome" => outcome)
            .increment(1);
    }

    fn record_usage(&self, usage: &Usage) {
        use metric_names::{LLM_COST, LLM_TOKENS};
        let model = self.config.model.clone();
        metrics::counter!(LLM_TOKENS, "model" => model.clone(), "direction" => "in")
            .increment(usage.prompt_tokens);
        metrics::counter!(LLM_TOKENS, "model" => model.clone(), "direction" => "out")
            .increment(usage.completion_tokens);
        if let Some(p) = self.config.prices {
            let cost = usage.prompt_tokens as f64 * p.input_per_million / 1e6
                + usage.completion_tokens as f64 * p.output_per_million / 1e6;
            // Counters are whole numbers: cost is counted in millionths.
            metrics::counter!(LLM_COST, "model" => model, "unit" => "micro")
                .increment((cost * 1e6).round() as u64);
        }
    }
}

#[cfg(not(feature = "tls"))]
fn tls(connector: HttpConnector, _config: &LlmConfig) -> (Connector, Option<String>) {
    (
        connector,
        Some(
            "https needs the `llm-tls` feature of multiagents (`tls` of multiagents-llm), or a local http endpoint or proxy"
                .into(),
        ),
    )
}

#[cfg(feature = "tls")]
fn tls(mut connector: HttpConnector, config: &LlmConfig) -> (Connector, Option<String>) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    connector.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots_certs());
    let mut problem = None;
    if let Some(pem) = &config.extra_root_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            match cert
                .map_err(|e| e.to_string())
                .and_then(|c| roots.add(c).map_err(|e| e.to_string()))
            {
                Ok(()) => {}
                Err(e) => problem = Some(format!("an extra root certificate is unusable: {e}")),
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            problem = Some(format!("TLS cannot be set up: {e}"));
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("TLS 1.2 with ring")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        }
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    (https, problem)
}

#[cfg(feature = "tls")]
fn webpki_roots_certs() -> impl Iterator<Item = rustls::pki_types::TrustAnchor<'static>> {
    webpki_roots::TLS_SERVER_ROOTS.iter().cloned()
}

/// `retry-after-ms`, or `retry-after` in seconds.
fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    get("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| get("retry-after").map(Duration::from_secs_f64))
        .map(|d| d.min(Duration::from_secs(60)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows() {
        let config = LlmConfig::new("http://localhost:1/v1").api_key("sk-secret-123");
        assert!(!format!("{config:?}").contains("sk-secret"));
        let client = LlmClient::new(config);
        assert!(!format!("{client:?}").contains("sk-secret"));
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = hyper::HeaderMap::new();
        h.insert("retry-after", "2".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        h.clear();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("header"),
        );
        assert_eq!(retry_after(&h), None);
    }
}

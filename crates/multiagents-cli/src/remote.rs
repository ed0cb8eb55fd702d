//! Where a command acts: a multiagents service over HTTP (`--server`,
//! `MULTIAGENTS_SERVER`), or straight on Redis as the orchestrators do.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::error::{CliError, Result};
use crate::workflow::RedisArgs;

/// The service to talk to, if any.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Talk to this multiagents service (`http://host:7430`) instead of
    /// straight to Redis.
    #[arg(long, env = "MULTIAGENTS_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The service's API key, sent as `Authorization: Bearer KEY`.
    #[arg(
        long,
        env = "MULTIAGENTS_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
}

/// Both ways a command can reach the state.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// What a command talks to.
pub enum Target {
    /// A service, over HTTP.
    Server(Box<Http>),
    /// Redis or PostgreSQL, with a client of its own.
    Redis(multiagents::Client),
}

impl TargetArgs {
    /// The service, when one is named.
    pub fn http(&self) -> Result<Option<Http>> {
        match &self.server.server {
            Some(url) => Ok(Some(Http::new(url, self.server.api_key.clone())?)),
            None => Ok(None),
        }
    }

    /// The service when one is named, else Redis or PostgreSQL.
    pub async fn connect(&self) -> Result<Target> {
        match &self.server.server {
            Some(url) => Ok(Target::Server(Box::new(Http::new(
                url,
                self.server.api_key.clone(),
            )?))),
            None => Ok(Target::Redis(multiagents::Client::new(
                self.redis.bus().await?,
                self.redis.store().await?,
            ))),
        }
    }
}

/// A small HTTP/1.1 client for one service.
pub struct Http {
    base: String,
    key: Option<String>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
}

impl Http {
    fn new(url: &str, key: Option<String>) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(CliError::usage(
                "--server",
                format!("`{url}` is not an http:// URL (say http://127.0.0.1:7430)"),
            ));
        }
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self { base, key, client })
    }

    /// Calls the service: `Ok` with the status and the JSON body for a
    /// success, or the problem it answered as the error (404 as
    /// [`CliError::NotFound`], others as [`CliError::Refused`]).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        content_type: &str,
        timeout: Duration,
    ) -> Result<(u16, Value)> {
        let headers = [("content-type", content_type.to_string())];
        self.call_with(method, path, body, &headers, timeout).await
    }

    /// The same, with these headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(u16, Value)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(key) = &self.key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CliError::usage("--server", e.to_string()))?;
        let unreachable = |e: String| {
            CliError::process(
                "the service",
                format!("{} cannot be reached: {e}", self.base),
            )
        };
        let res = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = res.status().as_u16();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status < 400 {
            return Ok((status, body));
        }
        let detail = body["detail"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string());
        let field = body["field"]
            .as_str()
            .map(|f| format!(" ({f})"))
            .unwrap_or_default();
        let message = format!("{} answered {status}: {detail}{field}", self.base);
        Err(match status {
            404 => CliError::NotFound(message),
            _ => CliError::Refused(message),
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .call(
                "GET",
                path,
                None,
                "application/json",
                Duration::from_secs(30),
            )
            .await?
            .1)
    }

    /// `POST path` with a JSON body, waiting at most `wait` beyond the
    /// usual for the answer.
    pub async fn post(&self, path: &str, body: &Value, wait: Duration) -> Result<(u16, Value)> {
        self.call(
            "POST",
            path,
            Some(body.to_string()),
            "application/json",
            Duration::from_secs(30) + wait,
        )
        .await
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

//! The LLM client against a real local HTTP server that speaks the OpenAI
//! chat API (an axum app playing back scripted replies): success with usage,
//! 429 with retry-after, 5xx, a client error, a slow reply past the timeout,
//! a reply that is not JSON, an unreachable server; the key never leaks.
#![cfg(feature = "llm")]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use multiagents::llm::{ChatRequest, LlmClient, LlmConfig, LlmError, Message};
use serde_json::{Value, json};

/// One scripted reply: status, extra headers, body, delay.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn ok(content: &str) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body: json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "fake-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
            })
            .to_string(),
            delay: Duration::ZERO,
        }
    }

    fn status(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
}

#[derive(Clone, Default)]
struct Fake {
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    arrivals: Arc<Mutex<Vec<std::time::Instant>>>,
}

async fn completions(
    State(fake): State<Fake>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    fake.arrivals
        .lock()
        .expect("lock")
        .push(std::time::Instant::now());
    fake.seen.lock().expect("lock").push((headers, request));
    let reply = fake
        .script
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or_else(|| Reply::status(500, "script ran out"));
    tokio::time::sleep(reply.delay).await;
    let mut out = HeaderMap::new();
    for (k, v) in reply.headers {
        out.insert(k, v.parse().expect("header"));
    }
    (
        StatusCode::from_u16(reply.status).expect("status"),
        out,
        reply.body,
    )
}

async fn serve(script: Vec<Reply>) -> (String, Fake) {
    let fake = Fake {
        script: Arc::new(Mutex::new(script.into())),
        ..Fake::default()
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), fake)
}

fn hello() -> ChatRequest {
    ChatRequest::new(vec![Message::system("Be brief."), Message::user("Hello?")])
}

#[tokio::test]
async fn a_reply_comes_back_with_its_usage_and_the_request_carries_model_and_key() {
    let (url, fake) = serve(vec![Reply::ok("Bonjour.")]).await;
    let client = LlmClient::new(LlmConfig::new(&url).model("tiny").api_key("sk-test-key"));
    let reply = client.chat(&hello()).await.expect("reply");
    assert_eq!(reply.content, "Bonjour.");
    assert_eq!(reply.usage.prompt_tokens, 12);
    assert_eq!(reply.usage.total(), 17);
    assert_eq!(reply.finish_reason.as_deref(), Some("stop"));
    assert_eq!(reply.attempts, 1);
    let seen = fake.seen.lock().expect("lock");
    let (headers, body) = &seen[0];
    assert_eq!(headers["authorization"], "Bearer sk-test-key");
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["messages"][1]["content"], "Hello?");
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_it_asks_for() {
    let mut limited = Reply::status(429, r#"{"error": {"message": "rate limited"}}"#);
    limited.headers.push(("retry-after-ms", "120".into()));
    let (url, fake) = serve(vec![limited, Reply::ok("ok")]).await;
    let client = LlmClient::new(LlmConfig::new(&url).retries(3, Duration::from_secs(30)));
    let reply = client.chat(&hello()).await.expect("reply");
    assert_eq!(reply.attempts, 2);
    // The second request came after the 120 ms the server asked for, not
    // after the client's own 30 s back-off.
    let arrivals = fake.arrivals.lock().expect("lock").clone();
    let gap = arrivals[1].duration_since(arrivals[0]);
    assert!(gap >= Duration::from_millis(120), "{gap:?}");
    assert!(gap < Duration::from_secs(30), "{gap:?}");
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_with_the_body() {
    let (url, _fake) = serve(vec![
        Reply::status(503, "overloaded"),
        Reply::status(502, "bad gateway"),
        Reply::ok("fine"),
    ])
    .await;
    let client = LlmClient::new(LlmConfig::new(&url).retries(2, Duration::from_millis(10)));
    assert_eq!(client.chat(&hello()).await.expect("reply").attempts, 3);

    let (url, _fake) = serve(vec![
        Reply::status(500, "boom 1"),
        Reply::status(500, "boom 2"),
    ])
    .await;
    let client = LlmClient::new(LlmConfig::new(&url).retries(1, Duration::from_millis(10)));
    let err = client.chat(&hello()).await.expect_err("fails");
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        text.contains("answered 500 after 2 attempt(s): boom 2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_the_key_never_shows() {
    let (url, fake) = serve(vec![
        Reply::status(401, r#"{"error": "invalid api key"}"#),
        Reply::ok("never"),
    ])
    .await;
    let client = LlmClient::new(LlmConfig::new(&url).api_key("sk-very-secret"));
    let err = client.chat(&hello()).await.expect_err("fails");
    assert!(!err.is_transient());
    assert_eq!(fake.seen.lock().expect("lock").len(), 1, "not retried");
    let text = format!("{err} {err:?}");
    assert!(text.contains("401"), "{text}");
    assert!(!text.contains("sk-very-secret"), "{text}");
}

#[tokio::test]
async fn a_slow_reply_past_the_timeout_is_an_error_that_says_so() {
    let mut slow = Reply::ok("late");
    slow.delay = Duration::from_secs(5);
    let (url, _fake) = serve(vec![slow]).await;
    let client = LlmClient::new(
        LlmConfig::new(&url)
            .timeout(Duration::from_millis(200))
            .retries(0, Duration::ZERO),
    );
    let err = client.chat(&hello()).await.expect_err("times out");
    assert!(matches!(err, LlmError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("did not answer within 200ms"),
        "{err}"
    );
}

#[tokio::test]
async fn a_reply_that_is_not_a_completion_is_quoted() {
    let (url, _fake) = serve(vec![Reply::status(200, "<html>proxy error page</html>")]).await;
    let client = LlmClient::new(LlmConfig::new(&url));
    let err = client.chat(&hello()).await.expect_err("bad reply");
    assert!(matches!(err, LlmError::BadReply { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("it began: <html>proxy error page</html>"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_reported_with_its_address() {
    let client = LlmClient::new(LlmConfig::new("http://127.0.0.1:1/v1").retries(0, Duration::ZERO));
    let err = client.chat(&hello()).await.expect_err("unreachable");
    assert!(
        err.to_string()
            .contains("http://127.0.0.1:1/v1/chat/completions cannot be reached"),
        "{err}"
    );
    // Without the `llm-tls` feature, https is refused saying which feature
    // it needs (with it, tests/llm_tls.rs covers https).
    if !cfg!(feature = "llm-tls") {
        let https = LlmClient::new(LlmConfig::new("https://api.example.com/v1"));
        let err = https.chat(&hello()).await.expect_err("https");
        assert!(
            err.to_string()
                .contains("https needs the `llm-tls` feature"),
            "{err}"
        );
    }
}

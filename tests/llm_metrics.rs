//! LLM token, call and cost counters reach `/metrics` (one test: the
//! Prometheus recorder is process-wide).
#![cfg(all(feature = "llm", feature = "prometheus"))]
#![cfg(feature = "llm")]

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use multiagents::llm::{ChatRequest, LlmClient, LlmConfig, Message};
use serde_json::json;

#[tokio::test]
async fn token_and_cost_counters_are_exported() {
    let server = multiagents::monitoring::metrics::serve_metrics(
        "127.0.0.1:0",
        std::sync::Arc::new(|| Ok(())),
    )
    .await
    .expect("metrics server");
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            json!({
                "model": "m",
                "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 250}
            })
            .to_string()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = LlmClient::new(
        LlmConfig::new(format!("http://{addr}/v1"))
            .model("priced-model")
            .prices(2.0, 8.0)
            .timeout(Duration::from_secs(5)),
    );
    for _ in 0..2 {
        client
            .chat(&ChatRequest::new(vec![Message::user("hello")]))
            .await
            .expect("reply");
    }
    let body = http_get(&format!("http://{}/metrics", server.addr)).await;
    let line = |needle: &str| {
        body.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{body}"))
            .to_string()
    };
    assert!(
        line("multiagents_llm_tokens_total{model=\"priced-model\",direction=\"in\"}")
            .ends_with(" 2000")
    );
    assert!(
        line("multiagents_llm_tokens_total{model=\"priced-model\",direction=\"out\"}")
            .ends_with(" 500")
    );
    assert!(
        line("multiagents_llm_calls_total{model=\"priced-model\",outcome=\"ok\"}").ends_with(" 2")
    );
    // 2 × (1000 × 2.0 + 250 × 8.0) / 1e6 = 0.008, counted in millionths.
    assert!(
        line("multiagents_llm_cost_total{model=\"priced-model\",unit=\"micro\"}")
            .ends_with(" 8000")
    );
}

/// A plain HTTP GET on a blocking socket, so the test needs no HTTP client.
async fn http_get(url: &str) -> String {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").expect("http url");
        let (host, path) = rest.split_once('/').expect("path");
        let mut s = std::net::TcpStream::connect(host).expect("connect");
        s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(out)
    })
    .await
    .expect("joined")
}

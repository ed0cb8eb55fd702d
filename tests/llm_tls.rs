//! `https://` endpoints: a local TLS server with a self-signed certificate
//! answers when its root is trusted, and is refused, saying why, when not.
#![cfg(feature = "llm-tls")]

use std::sync::Arc;
use std::time::Duration;

use multiagents::llm::{ChatRequest, LlmClient, LlmConfig, Message};

/// A TLS server that answers every request with one chat completion.
async fn tls_server() -> (u16, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let pem = cert.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    let body = serde_json::json!({
                        "model": "tls-model",
                        "choices": [{"message": {"role": "assistant", "content": "over TLS"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2}
                    })
                    .to_string();
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, pem)
}

#[tokio::test]
async fn an_https_endpoint_answers_when_its_root_is_trusted() {
    let (port, pem) = tls_server().await;
    let url = format!("https://localhost:{port}/v1");
    let request = ChatRequest::new(vec![Message::user("hi")]);
    let trusted = LlmClient::new(
        LlmConfig::new(&url)
            .extra_root_pem(pem)
            .timeout(Duration::from_secs(5)),
    );
    let reply = trusted.chat(&request).await.expect("reply over TLS");
    assert_eq!(reply.content, "over TLS");

    let untrusted = LlmClient::new(
        LlmConfig::new(&url)
            .retries(0, Duration::ZERO)
            .timeout(Duration::from_secs(5)),
    );
    let err = untrusted.chat(&request).await.expect_err("untrusted");
    let text = err.to_string();
    assert!(text.contains("cannot be reached"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

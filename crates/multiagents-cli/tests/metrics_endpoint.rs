//! `/metrics` during a Redis bench: the counters move while it runs, and at
//! the end the exported counters match the bench's own totals.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` over plain HTTP/1.1; the status code and the body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

fn finished(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("multiagents_workflows_finished_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_move_during_a_redis_bench_and_match_its_totals() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let port = free_port();
    let workflows = 4000;
    let child = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["bench", "orders", "--backend", "redis", "--redis-url", &url])
        .args(["--prefix", &format!("metrics-{}", std::process::id())])
        .args(["--workflows", &workflows.to_string(), "--concurrency", "50"])
        .args([
            "--fail-rate",
            "0.1",
            "--json",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bench starts");
    let until = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut healthy = false;
    while Instant::now() < until {
        if let Some((200, body)) = get(port, "/metrics") {
            seen.push(finished(&body));
            if !healthy {
                healthy = get(port, "/healthz").is_some_and(|(s, b)| s == 200 && b.trim() == "ok");
            }
        } else if !seen.is_empty() {
            break; // the bench finished and stopped serving
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("bench ends");
    assert!(out.status.success());
    assert!(healthy, "/healthz answered ok");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "counters never go back: {seen:?}"
    );
    assert!(
        seen.iter().any(|n| *n > 0.0 && *n < workflows as f64),
        "seen moving mid-run: {seen:?}"
    );
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a report"),
    )
    .expect("JSON");
    let exported = &report["exported"];
    assert_eq!(exported["workflows_started"], workflows as f64);
    assert_eq!(
        exported["completed"],
        report["completed"].as_f64().expect("n")
    );
    assert_eq!(
        exported["compensated"],
        report["compensated"].as_f64().expect("n")
    );
    assert_eq!(
        exported["worker_calls"],
        (report["step_executions"].as_u64().expect("n") + report["declined"].as_u64().expect("n"))
            as f64,
        "every call counted: step bodies (compensations included) and the declined charges"
    );
}

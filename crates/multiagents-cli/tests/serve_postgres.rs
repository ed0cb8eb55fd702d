//! `multiagents serve --database-url` with nothing but PostgreSQL: the API
//! over real HTTP, an HTTP worker doing the step, the service killed with
//! SIGKILL and started again on the same database, and the command line
//! reading the same runs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(url: &str, schema: &str) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", url])
        .args(["--schema", schema, "--consumers", "2"])
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the multiagents binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("serve says where it listens")
            .expect("utf-8");
        if let Some(rest) = line.split("serving http://").nth(1) {
            assert!(
                line.contains("schema"),
                "names where it keeps state: {line}"
            );
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Served { child, addr }
}

/// One HTTP/1.1 request; the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connects");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("sends");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("reads");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

const FLOW: &str = r#"{"name": "greet", "version": 1, "steps": [
  {"name": "hello", "worker": "say_hello"},
  {"name": "bye", "worker": "say_bye"}]}"#;

/// Polls for one task of `worker` and completes it with `output`.
fn work(addr: &str, worker: &str, output: serde_json::Value) -> serde_json::Value {
    let poll = format!(r#"{{"workers": ["{worker}"], "wait_ms": 5000}}"#);
    let (status, body) = http(addr, "POST", "/v1/tasks/poll", &poll);
    assert_eq!(status, 200, "{body}");
    let task = json(&body)["tasks"][0].clone();
    assert_eq!(task["worker"], worker, "{body}");
    let token = task["token"].as_str().expect("token");
    let done = serde_json::json!({ "output": output }).to_string();
    let (status, body) = http(addr, "POST", &format!("/v1/tasks/{token}/complete"), &done);
    assert_eq!(status, 202, "{body}");
    task
}

#[test]
fn a_service_on_postgres_alone_runs_workflows_through_a_kill_and_the_cli_reads_them() {
    let Some(url) = common::database_url() else {
        return;
    };
    let schema = format!("serve{}", std::process::id());
    let served = serve(&url, &schema);
    let addr = served.addr.clone();
    assert_eq!(http(&addr, "GET", "/readyz", "").0, 200);
    let (status, body) = http(&addr, "POST", "/v1/definitions", FLOW);
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/workflows/greet/runs",
        r#"{"who":"ada"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let run = json(&body);
    let url_of_run = run["url"].as_str().expect("url").to_string();
    let tx = run["id"].as_str().expect("id").to_string();
    let task = work(&addr, "say_hello", serde_json::json!({"greeted": "ada"}));
    assert_eq!(task["input"]["who"], "ada");

    // Killed between the steps, started again on the same database.
    drop(served);
    let served = serve(&url, &schema);
    let addr = served.addr.clone();
    let task = work(&addr, "say_bye", serde_json::json!("bye"));
    assert_eq!(task["steps"]["hello"]["greeted"], "ada", "{task}");
    let (status, body) = http(&addr, "GET", &format!("{url_of_run}/result?wait=10s"), "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["status"], "completed", "{body}");

    // The command line reads the same run from PostgreSQL.
    let (ok, out, err) = common::cli(&[
        "workflow",
        "status",
        &tx,
        "--database-url",
        &url,
        "--schema",
        &schema,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("completed"), "{out}");
    let (ok, _, err) = common::cli(&[
        "workflow",
        "status",
        "00000000-0000-0000-0000-000000000001",
        "--database-url",
        &url,
        "--schema",
        &schema,
    ]);
    assert!(!ok);
    assert!(
        err.contains(&format!("(schema {schema})")),
        "says where it looked: {err}"
    );
}

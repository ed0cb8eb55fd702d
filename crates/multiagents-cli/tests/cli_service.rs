//! The command against a real `multiagents serve` (`--server`) and straight
//! on Redis: deploy, start (idempotently), list, retry, signal, dead letters
//! listed, counted, redriven and discarded; and `init`, whose project builds
//! and runs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

struct Served {
    child: Child,
    url: String,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("store.db"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines.next().expect("serve says where").expect("utf-8");
        if let Some(rest) = line.split("serving http://").nth(1) {
            break rest.split_whitespace().next().expect("addr").to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Served {
        child,
        url: format!("http://{addr}"),
        addr,
        _dir: dir,
    }
}

/// One HTTP request to the service: the JSON body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Value {
    let mut stream = TcpStream::connect(addr).expect("connects");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("sends");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("reads");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// Takes the next task for `worker` and answers it with `action` and `body`.
fn work(addr: &str, worker: &str, action: &str, body: Value) -> Value {
    let poll = json!({"workers": [worker], "wait_ms": 10_000}).to_string();
    let tasks = http(addr, "POST", "/v1/tasks/poll", &poll);
    let task = tasks["tasks"][0].clone();
    let token = task["token"]
        .as_str()
        .unwrap_or_else(|| panic!("a task for {worker}: {tasks}"));
    http(
        addr,
        "POST",
        &format!("/v1/tasks/{token}/{action}"),
        &body.to_string(),
    );
    task
}

fn cli(args: &[&str]) -> (bool, String, String) {
    common::cli(args)
}

fn ok(args: &[&str]) -> String {
    let (success, out, err) = cli(args);
    assert!(success, "multiagents {}: {out}{err}", args.join(" "));
    out
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

const FLOWS: &str = "name: gate\nversion: 1\nsteps:\n  - {name: approval, signal: approve}\n";
const REFUNDS: &str = "name: refunds\nversion: 1\nsteps:\n  - name: pay\n    worker: pay_refund\n";
const BOOKING: &str = "name: booking\nversion: 1\nsteps:\n  - name: reserve\n    worker: reserve_room\n    compensation: release_room\n  - name: charge\n    worker: charge_card\n";

#[test]
fn the_command_starts_lists_retries_and_repairs_runs_over_a_service() {
    let served = serve();
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, text) in [
        ("gate.yaml", FLOWS),
        ("refunds.yaml", REFUNDS),
        ("booking.yaml", BOOKING),
    ] {
        std::fs::write(dir.path().join(file), text).expect("write");
    }
    let s = served.url.as_str();
    let files: Vec<String> = ["gate.yaml", "refunds.yaml", "booking.yaml"]
        .iter()
        .map(|f| dir.path().join(f).display().to_string())
        .collect();
    let out = ok(&[
        "workflow", "deploy", &files[0], &files[1], &files[2], "--server", s,
    ]);
    assert!(
        out.contains("deployed gate@1") && out.contains("deployed booking@1"),
        "{out}"
    );

    // Idempotent starts, a signal, a listing.
    let first = json_of(&ok(&[
        "workflow",
        "start",
        "gate",
        "--input",
        "{}",
        "--idempotency-key",
        "k1",
        "--server",
        s,
        "--json",
    ]));
    let again = json_of(&ok(&[
        "workflow",
        "start",
        "gate",
        "--input",
        "{}",
        "--idempotency-key",
        "k1",
        "--server",
        s,
        "--json",
    ]));
    assert_eq!(first["id"], again["id"]);
    let id = first["id"].as_str().expect("id").to_string();
    ok(&[
        "workflow",
        "signal",
        &id,
        "approve",
        "--data",
        r#"{"ok": true}"#,
        "--server",
        s,
    ]);
    let listed = json_of(&ok(&[
        "workflow",
        "list",
        "--workflow",
        "gate",
        "--status",
        "completed",
        "--server",
        s,
        "--json",
    ]));
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    let table = ok(&["workflow", "list", "--server", s]);
    assert!(
        table.contains(&id) && table.contains("completed"),
        "{table}"
    );

    // A failed run retried with a patch; --wait reports the outcome.
    let failed = json_of(&ok(&[
        "workflow",
        "start",
        "refunds",
        "--input",
        r#"{"amount": 500}"#,
        "--server",
        s,
        "--json",
    ]));
    work(
        &served.addr,
        "pay_refund",
        "fail",
        json!({"error": "too much", "retry": "no"}),
    );
    let (done, out, _) = cli(&[
        "workflow", "start", "gate", "--input", "{}", "--wait", "200ms", "--server", s,
    ]);
    assert!(!done, "a waited run still running is not a success: {out}");
    let old = failed["id"].as_str().expect("id");
    let retried = json_of(&ok(&[
        "workflow",
        "retry",
        old,
        "--patch",
        r#"{"amount": 50}"#,
        "--server",
        s,
        "--json",
    ]));
    assert_eq!(retried["retry_of"], old, "{retried}");
    let task = work(
        &served.addr,
        "pay_refund",
        "complete",
        json!({"output": {"paid": 50}}),
    );
    assert_eq!(task["input"], json!({"amount": 50}));
    let (refused, _, err) = cli(&["workflow", "retry", old, "--server", s]);
    assert!(!refused && err.contains("retried already"), "{err}");

    // A failed compensation: listed, counted, redriven.
    json_of(&ok(&[
        "workflow", "start", "booking", "--input", "{}", "--server", s, "--json",
    ]));
    work(
        &served.addr,
        "reserve_room",
        "complete",
        json!({"output": {"room": 1}}),
    );
    work(
        &served.addr,
        "charge_card",
        "fail",
        json!({"error": "declined", "retry": "no"}),
    );
    work(
        &served.addr,
        "release_room",
        "fail",
        json!({"error": "the hotel is down", "retry": "no"}),
    );
    let mut letters = Value::Null;
    for _ in 0..100 {
        letters = json_of(&ok(&["dlq", "list", "--server", s, "--json"]));
        if letters.as_array().is_some_and(|l| !l.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let letter = letters[0]["id"]
        .as_str()
        .expect("a dead letter")
        .to_string();
    assert!(ok(&["dlq", "list", "--server", s]).contains("the hotel is down"));
    assert!(ok(&["dlq", "show", &letter, "--server", s]).contains("compensations"));
    let dry = ok(&[
        "dlq",
        "redrive",
        "--all",
        "--topic",
        "compensations",
        "--dry-run",
        "--server",
        s,
    ]);
    assert!(dry.contains("1 dead letter(s) match"), "{dry}");
    ok(&["dlq", "redrive", &letter, "--server", s]);
    work(
        &served.addr,
        "release_room",
        "complete",
        json!({"output": {"released": 1}}),
    );
    let (gone, _, err) = cli(&["dlq", "discard", &letter, "--server", s]);
    assert!(!gone && err.contains("no dead letter"), "{err}");
    let compensated = json_of(&ok(&[
        "workflow",
        "list",
        "--workflow",
        "booking",
        "--server",
        s,
        "--json",
    ]));
    assert_eq!(compensated[0]["status"], "compensated", "{compensated}");

    // An unreachable service is named.
    let (reached, _, err) = cli(&["workflow", "list", "--server", "http://127.0.0.1:9"]);
    assert!(!reached && err.contains("http://127.0.0.1:9"), "{err}");
}

#[test]
fn the_command_starts_lists_and_signals_straight_on_redis() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("cli-{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gate.yaml");
    std::fs::write(&file, FLOWS).expect("write");
    let redis = ["--redis-url", url.as_str(), "--prefix", prefix.as_str()];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(redis.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: &[&str]| {
        let v = with(args);
        ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    run(&["workflow", "deploy", file.to_str().expect("path")]);
    let first = json_of(&run(&[
        "workflow",
        "start",
        "gate",
        "--idempotency-key",
        "k1",
        "--json",
    ]));
    let again = json_of(&run(&[
        "workflow",
        "start",
        "gate",
        "--idempotency-key",
        "k1",
        "--json",
    ]));
    assert_eq!(first["id"], again["id"]);
    assert_eq!(
        first["id"],
        multiagents_server::run_id_for_key("gate", "k1").to_string(),
        "the same run id as the service gives the key"
    );
    let id = first["id"].as_str().expect("id").to_string();
    run(&["workflow", "signal", &id, "approve"]);
    let listed = json_of(&run(&[
        "workflow",
        "list",
        "--status",
        "completed",
        "--json",
    ]));
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert!(run(&["dlq", "list"]).contains("no dead letters"));
}

#[test]
fn init_makes_a_project_that_builds_and_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("hello-flow");
    let out = ok(&["init", project.to_str().expect("path")]);
    assert!(out.contains("cargo run"), "{out}");
    for file in ["Cargo.toml", "workflow.yaml", "src/main.rs", "README.md"] {
        assert!(project.join(file).is_file(), "{file}");
    }
    let (again, _, err) = cli(&["init", project.to_str().expect("path")]);
    assert!(!again && err.contains("not empty"), "{err}");
    // Built with the workspace's compiler, in a target directory of its own
    // kept between runs.
    let target =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/init-template");
    let run = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--offline"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("greeting: completed"), "{stdout}");
}

/// `serve` on Redis, at any free port; its address.
fn serve_on_redis(url: &str, prefix: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            url,
            "--prefix",
            prefix,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines.next().expect("serve says where").expect("utf-8");
        if let Some(rest) = line.split("serving http://").nth(1) {
            break rest.split_whitespace().next().expect("addr").to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[test]
fn a_replica_streams_the_status_changes_another_replica_made() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("sse-{}", std::process::id());
    let (mut a, addr_a) = serve_on_redis(&url, &prefix);
    let (mut b, addr_b) = serve_on_redis(&url, &prefix);
    let mut stream = TcpStream::connect(&addr_b).expect("connects");
    stream
        .write_all(
            format!(
                "GET /v1/events HTTP/1.1\r\nHost: {addr_b}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("sends");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    // The stream is open once its headers came.
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).expect("headers") > 0 && line != "\r\n" {
        line.clear();
    }
    http(
        &addr_a,
        "POST",
        "/v1/definitions",
        &serde_json::to_string(&serde_json::json!({
            "name": "gate", "version": 1, "steps": [{"name": "approval", "signal": "approve"}]
        }))
        .expect("json"),
    );
    let run = http(&addr_a, "POST", "/v1/workflows/gate/runs", "{}");
    let id = run["id"].as_str().expect("a run").to_string();
    let mut seen = String::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !seen.contains(&id) {
        assert!(
            std::time::Instant::now() < until,
            "replica B never streamed the run replica A started: {seen}"
        );
        let mut chunk = String::new();
        let n = reader
            .read_line(&mut chunk)
            .expect("the stream of replica B goes on");
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&chunk);
    }
    assert!(seen.contains("event: status"), "{seen}");
    let _ = (a.kill(), b.kill(), a.wait(), b.wait());
}

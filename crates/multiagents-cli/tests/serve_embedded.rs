//! `multiagents serve` with no server: the embedded service answers the API
//! over real HTTP, keeps what it was given in its file across a restart,
//! and refuses to listen beyond loopback without API keys.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
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

fn serve(store: &Path) -> Served {
    serve_with(store, &[])
}

fn serve_with(store: &Path, extra: &[&str]) -> Served {
    serve_with_env(store, extra, &[])
}

fn serve_with_env(store: &Path, extra: &[&str], env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(store)
        .args(extra)
        .env_remove("REDIS_URL")
        .env_remove("MIMALLOC_ALLOW_THP")
        .envs(env.iter().copied())
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
            break rest.split_whitespace().next().expect("address").to_string();
        }
    };
    // Keep draining stderr so that the service never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Served { child, addr }
}

/// One HTTP/1.1 request; the status and the body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connects");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
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

const FLOW: &str = "name: greet\nversion: 1\nsteps:\n  - name: hello\n    worker: say_hello\n";

#[test]
fn the_embedded_service_answers_the_api_and_keeps_its_state_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("state/store.db");
    let served = serve(&store);
    let addr = served.addr.clone();
    assert_eq!(http(&addr, "GET", "/healthz", &[], "").0, 200);
    assert_eq!(http(&addr, "GET", "/readyz", &[], "").0, 200);
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/definitions",
        &[("Content-Type", "application/yaml")],
        FLOW,
    );
    assert_eq!(status, 201, "{body}");
    // Its series exist at zero before any run (alerts need them present).
    let (_, metrics) = http(&addr, "GET", "/metrics", &[], "");
    for series in [
        r#"multiagents_workflows_started_total{workflow="greet"} 0"#,
        r#"multiagents_workflows_finished_total{workflow="greet",status="compensated"} 0"#,
        r#"multiagents_step_retries_total{workflow="greet",step="hello",phase="forward"} 0"#,
        r#"multiagents_dead_letters_total{topic="compensations"} 0"#,
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    // No worker serves `say_hello` yet: the run is started and waits.
    let key = [("Idempotency-Key", "greet-1")];
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/workflows/greet/runs",
        &key,
        r#"{"who":"ada"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let run: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(run["status"], "running");
    let url = run["url"].as_str().expect("url").to_string();
    let (status, body) = http(&addr, "GET", &format!("{url}/result?wait=50ms"), &[], "");
    assert_eq!(status, 202, "{body}");
    let (status, body) = http(&addr, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert!(body.contains("multiagents_"), "{body}");
    // An HTTP worker takes the step, and the service is killed (SIGKILL)
    // while the task is leased.
    let poll = r#"{"workers": ["say_hello"], "wait_ms": 5000}"#;
    let (status, body) = http(&addr, "POST", "/v1/tasks/poll", &[], poll);
    assert_eq!(status, 200, "{body}");
    let tasks: serde_json::Value = serde_json::from_str(&body).expect("json");
    let leased = tasks["tasks"][0].clone();
    assert_eq!(leased["input"]["who"], "ada", "{body}");
    drop(served);

    // Killed and started again on the same file: the definition and the
    // run are there, and the same key still finds the same run.
    let served = serve(&store);
    let addr = served.addr.clone();
    // The first scrape after the restart has the deployed workflow's series.
    let (_, metrics) = http(&addr, "GET", "/metrics", &[], "");
    assert!(
        metrics.contains(
            r#"multiagents_workflows_finished_total{workflow="greet",status="failed"} 0"#
        ),
        "{metrics}"
    );
    let (status, body) = http(&addr, "GET", "/v1/definitions/greet", &[], "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(&addr, "GET", &url, &[], "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/workflows/greet/runs",
        &key,
        r#"{"who":"ada"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&url), "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        &format!("{url}/cancel"),
        &[],
        r#"{"reason":"test"}"#,
    );
    assert_eq!(status, 202, "{body}");
}

#[test]
fn listening_beyond_loopback_without_keys_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--store",
            "/nonexistent/never.db",
        ])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen 0.0.0.0:0 is not a loopback address"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
}

#[test]
fn keys_made_by_keys_new_are_required_by_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys");
    let new = |name: &str, scopes: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_multiagents"))
            .args(["keys", "new", name, "--scopes", scopes, "--file"])
            .arg(&file)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    };
    let reader = new("dashboard", "read");
    let operator = new("ops", "operate,read");
    let text = std::fs::read_to_string(&file).expect("the keys file");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        !text.contains(&reader) && !text.contains(&operator),
        "no key is stored"
    );
    let served = serve_with(
        &dir.path().join("store.db"),
        &["--api-keys", file.to_str().expect("path")],
    );
    let addr = served.addr.clone();
    assert_eq!(http(&addr, "GET", "/healthz", &[], "").0, 200);
    assert_eq!(http(&addr, "GET", "/v1/runs", &[], "").0, 401);
    let read = format!("Bearer {reader}");
    assert_eq!(
        http(&addr, "GET", "/v1/runs", &[("Authorization", &read)], "").0,
        200
    );
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/workflows/greet/runs",
        &[("Authorization", &read)],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    let operate = format!("Bearer {operator}");
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/workflows/greet/runs",
        &[("Authorization", &operate)],
        "{}",
    );
    assert_eq!(
        status, 404,
        "past the key check, to the unknown workflow: {body}"
    );
    drop(served);

    // A bad keys file is refused, naming the line.
    std::fs::write(&file, format!("{text}broken line\n")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["serve", "--listen", "127.0.0.1:0", "--api-keys"])
        .arg(&file)
        .arg("--store")
        .arg(dir.path().join("store.db"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
    // And so is a scope that does not exist.
    let out = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["keys", "new", "x", "--scopes", "write"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scope `write`"));
}

/// Whether a running process may get transparent huge pages
/// (`THP_enabled` in `/proc/PID/status`), when the kernel says.
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"))?;
    Some(line.split_whitespace().nth(1)? == "1")
}

#[test]
fn the_service_does_without_transparent_huge_pages_unless_mimalloc_is_told_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = serve(&dir.path().join("thp.db"));
    let Some(enabled) = thp_enabled(served.child.id()) else {
        eprintln!("skipped: this kernel does not say whether a process may get huge pages");
        return;
    };
    assert!(!enabled, "the service may get transparent huge pages");
    drop(served);
    let served = serve_with_env(
        &dir.path().join("thp.db"),
        &[],
        &[("MIMALLOC_ALLOW_THP", "1")],
    );
    assert_eq!(thp_enabled(served.child.id()), Some(true));
}

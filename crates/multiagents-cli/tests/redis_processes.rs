//! Separate processes on one Redis: two orchestrators and two worker
//! processes, one of each killed with SIGKILL mid-run and restarted. The
//! client's own report must show every order finished, none stuck, every
//! declined order compensated once, and no side effect applied twice.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Fleet {
    url: String,
    prefix: String,
}

impl Fleet {
    fn spawn(&self, role: &str, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_multiagents"))
            .args([
                "bench",
                "orders",
                "--backend",
                "redis",
                "--redis-url",
                &self.url,
                "--prefix",
                &self.prefix,
            ])
            .args(["--role", role, "--visibility-timeout", "1s"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the multiagents binary starts")
    }
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(child);
}

#[test]
fn killing_an_orchestrator_and_a_worker_mid_run_loses_nothing() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("kill{}", std::process::id());
    let fleet = Fleet { url, prefix };
    let mut orchestrators = common::KillOnDrop(vec![
        fleet.spawn("orchestrator", &[]),
        fleet.spawn("orchestrator", &[]),
    ]);
    let mut workers = common::KillOnDrop(vec![
        fleet.spawn("workers", &[]),
        fleet.spawn("workers", &[]),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let client = fleet.spawn(
        "client",
        &[
            "--workflows",
            "3000",
            "--concurrency",
            "100",
            "--fail-rate",
            "0.1",
            "--json",
            "--stuck-after",
            "60s",
        ],
    );
    // Mid-run: kill one of each with SIGKILL, then start replacements.
    std::thread::sleep(Duration::from_millis(700));
    kill9(&mut orchestrators[0]);
    kill9(&mut workers[0]);
    std::thread::sleep(Duration::from_millis(300));
    orchestrators[0] = fleet.spawn("orchestrator", &[]);
    workers[0] = fleet.spawn("workers", &[]);

    let output = client.wait_with_output().expect("the client finishes");
    for c in orchestrators.iter_mut().chain(workers.iter_mut()) {
        terminate(c);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .expect("the client prints a JSON report");
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "the client judged the run incorrect: {report}"
    );
    assert_eq!(
        report["completed"].as_u64().unwrap_or(0) + report["compensated"].as_u64().unwrap_or(0),
        3000
    );
    assert_eq!(report["stuck"], 0);
    assert_eq!(report["duplicate_effects"], 0);
    assert_eq!(report["compensations"], report["declined"]);
}

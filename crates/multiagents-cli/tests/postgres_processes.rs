//! Separate processes on PostgreSQL: two orchestrators and two worker
//! processes, one of each killed with SIGKILL mid-run and restarted, three
//! times over, on PostgreSQL alone and on PostgreSQL beside a Redis bus;
//! two processes each running an orchestrator and the workers (whose rows
//! are handed over in memory, and whose acks wait for a write), killed in
//! turn; and PostgreSQL itself restarted mid-run, twice. The client's own report
//! must show every order finished, none stuck, every declined order
//! compensated once, and no side effect applied twice.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Fleet {
    backend: &'static str,
    database_url: String,
    redis_url: Option<String>,
    prefix: String,
}

impl Fleet {
    fn spawn(&self, role: &str, extra: &[&str]) -> Child {
        let mut c = Command::new(env!("CARGO_BIN_EXE_multiagents"));
        c.args(["bench", "orders", "--backend", self.backend])
            .args(["--database-url", &self.database_url])
            .args(["--prefix", &self.prefix]);
        if let Some(url) = &self.redis_url {
            c.args(["--redis-url", url]);
        }
        c.args(["--role", role, "--visibility-timeout", "1s"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the multiagents binary starts")
    }

    fn client(&self, workflows: u32) -> Child {
        self.spawn(
            "client",
            &[
                "--workflows",
                &workflows.to_string(),
                "--concurrency",
                "100",
                "--fail-rate",
                "0.1",
                "--json",
                "--stuck-after",
                "60s",
            ],
        )
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

/// The client's report, checked: every order finished once, none stuck,
/// each declined one compensated, no effect applied twice.
fn judge(client: Child, workflows: u64) {
    let output = client.wait_with_output().expect("the client finishes");
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
        workflows
    );
    assert_eq!(report["stuck"], 0);
    assert_eq!(report["duplicate_effects"], 0);
    assert_eq!(report["compensations"], report["declined"]);
}

fn kill_and_restart_three_times(fleet: &Fleet) {
    let mut orchestrators = common::KillOnDrop(vec![
        fleet.spawn("orchestrator", &[]),
        fleet.spawn("orchestrator", &[]),
    ]);
    let mut workers = common::KillOnDrop(vec![
        fleet.spawn("workers", &[]),
        fleet.spawn("workers", &[]),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let mut client = fleet.client(2000);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        if client.try_wait().expect("wait").is_some() {
            break;
        }
        let i = round % 2;
        kill9(&mut orchestrators[i]);
        kill9(&mut workers[i]);
        std::thread::sleep(Duration::from_millis(300));
        orchestrators[i] = fleet.spawn("orchestrator", &[]);
        workers[i] = fleet.spawn("workers", &[]);
    }
    judge(client, 2000);
    for c in orchestrators.iter_mut().chain(workers.iter_mut()) {
        terminate(c);
    }
}

#[test]
fn killing_orchestrators_and_workers_again_and_again_loses_nothing_on_postgres_alone() {
    let Some(database_url) = common::database_url() else {
        return;
    };
    kill_and_restart_three_times(&Fleet {
        backend: "postgres-only",
        database_url,
        redis_url: None,
        prefix: format!("pgkill{}", std::process::id()),
    });
}

#[test]
fn killing_orchestrators_and_workers_again_and_again_loses_nothing_on_postgres_with_a_redis_bus() {
    let (Some(database_url), Some(redis_url)) = (common::database_url(), common::redis_url())
    else {
        return;
    };
    kill_and_restart_three_times(&Fleet {
        backend: "postgres",
        database_url,
        redis_url: Some(redis_url),
        prefix: format!("pgrkill{}", std::process::id()),
    });
}

/// Processes that run an orchestrator and the workers together lease the
/// rows they publish for themselves and hand them over in memory, and their
/// acks wait for the next write: killed with rows handed over and acks
/// waiting, they lose nothing (the leases run out, the other process
/// claims the rows; results acked too late are applied once).
#[test]
fn killing_processes_that_hand_rows_to_themselves_loses_nothing_on_postgres_alone() {
    let Some(database_url) = common::database_url() else {
        return;
    };
    let fleet = Fleet {
        backend: "postgres-only",
        database_url,
        redis_url: None,
        prefix: format!("pgnode{}", std::process::id()),
    };
    let mut nodes = common::KillOnDrop(vec![fleet.spawn("node", &[]), fleet.spawn("node", &[])]);
    std::thread::sleep(Duration::from_millis(500));
    let mut client = fleet.client(2000);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(600));
        if client.try_wait().expect("wait").is_some() {
            break;
        }
        let i = round % 2;
        kill9(&mut nodes[i]);
        std::thread::sleep(Duration::from_millis(300));
        nodes[i] = fleet.spawn("node", &[]);
    }
    judge(client, 2000);
    for c in nodes.iter_mut() {
        terminate(c);
    }
}

#[test]
fn restarting_postgres_mid_run_loses_nothing_and_every_process_reconnects() {
    let Some(cluster) = common::PgCluster::start() else {
        return;
    };
    let fleet = Fleet {
        backend: "postgres-only",
        database_url: cluster.url(),
        redis_url: None,
        prefix: "restart".into(),
    };
    let mut orchestrators = common::KillOnDrop(vec![
        fleet.spawn("orchestrator", &[]),
        fleet.spawn("orchestrator", &[]),
    ]);
    let mut workers = common::KillOnDrop(vec![
        fleet.spawn("workers", &[]),
        fleet.spawn("workers", &[]),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    // Two restarts, each while a client's run is under way. A run that ends
    // before the next restart (a restart can take seconds on a busy
    // machine) is judged, and the next restart falls in a new
    // run; every run is judged.
    let mut restarts = 0;
    let mut runs = 0;
    while restarts < 2 {
        runs += 1;
        assert!(runs <= 4, "no run lasted long enough for a restart");
        let mut client = fleet.client(1500);
        while restarts < 2 {
            std::thread::sleep(Duration::from_millis(800));
            if client.try_wait().expect("wait").is_some() {
                break;
            }
            let began = Instant::now();
            cluster.stop();
            std::thread::sleep(Duration::from_millis(500));
            cluster.start_again();
            restarts += 1;
            eprintln!("restart {restarts} took {:?}", began.elapsed());
        }
        judge(client, 1500);
    }
    assert_eq!(restarts, 2, "both restarts fell mid-run");
    for c in orchestrators.iter_mut().chain(workers.iter_mut()) {
        assert!(
            c.try_wait().expect("wait").is_none(),
            "every process lived through the restarts"
        );
    }
    for c in orchestrators.iter_mut().chain(workers.iter_mut()) {
        terminate(c);
    }
}

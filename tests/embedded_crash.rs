//! kill -9 in the middle of an embedded run, restart, and count: nothing
//! lost, nothing stuck, every declined order compensated exactly once.
//!
//! The test runs its own binary again as the child process (selected by an
//! environment variable), kills it with SIGKILL while workflows are in
//! flight, then resumes from the same store file in this process.
#![cfg(feature = "embedded")]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use multiagents::store::{FileStore, ListQuery};
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{Runtime, RuntimeBuilder, WorkflowBuilder, WorkflowDefinition, WorkflowStatus};
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "MULTIAGENTS_CRASH_CHILD_DIR";
const ORDERS: u64 = 3000;

#[derive(Serialize, Deserialize)]
struct Order {
    n: u64,
    decline: bool,
}

fn definition() -> WorkflowDefinition {
    WorkflowBuilder::new("orders")
        .step("validate", "validate_order")
        .step("reserve", "reserve_inventory")
        .compensate_with("release_inventory")
        .step("charge", "charge_payment")
        .compensate_with("refund_payment")
        .step("notify", "notify_customer")
        .build()
        .expect("valid")
}

/// Appends `worker key transaction` to the effects file: each side effect,
/// durably, as it happens.
fn record(dir: &Path, worker: &str, key: &str, tx: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("effects.log"))
        .expect("effects file");
    f.write_all(format!("{worker} {key} {tx}\n").as_bytes())
        .expect("record effect");
}

fn workers(builder: RuntimeBuilder, dir: PathBuf) -> RuntimeBuilder {
    let mut b = builder;
    for name in [
        "validate_order",
        "reserve_inventory",
        "release_inventory",
        "refund_payment",
        "notify_customer",
    ] {
        let dir = dir.clone();
        b = b.worker(from_fn(name, move |_: Order, ctx| {
            let dir = dir.clone();
            async move {
                record(
                    &dir,
                    name,
                    ctx.idempotency_key(),
                    &ctx.transaction_id.to_string(),
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
                Ok::<_, WorkerError>(serde_json::json!({"ok": true}))
            }
        }));
    }
    let dir2 = dir.clone();
    b.worker(from_fn("charge_payment", move |o: Order, ctx| {
        let dir = dir2.clone();
        async move {
            if o.decline {
                return Err(WorkerError::fatal("declined"));
            }
            record(
                &dir,
                "charge_payment",
                ctx.idempotency_key(),
                &ctx.transaction_id.to_string(),
            );
            Ok(serde_json::json!({"charged": true}))
        }
    }))
}

/// The child: starts every order and keeps running until it is killed.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let rt = workers(
        Runtime::builder().store(FileStore::open(dir.join("state.db")).expect("store")),
        dir.clone(),
    )
    .workflow(definition())
    .start()
    .await
    .expect("starts");
    // Many submitters at once, so that many workflows are in flight at the kill.
    let mut submitters = tokio::task::JoinSet::new();
    for lane in 0..100 {
        let client = rt.client();
        submitters.spawn(async move {
            for n in (lane..ORDERS).step_by(100) {
                client
                    .start(
                        "orders",
                        &Order {
                            n,
                            decline: n % 5 == 0,
                        },
                    )
                    .await
                    .expect("start");
            }
        });
    }
    while submitters.join_next().await.is_some() {}
    std::fs::write(dir.join("started"), b"").expect("marker");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

fn effects(dir: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(dir.join("effects.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split(' ');
            Some((
                p.next()?.to_string(),
                p.next()?.to_string(),
                p.next()?.to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_killed_midway_finishes_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    // Kill it once work is well under way but not done.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = effects(&dir).len();
        if done > 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the child made no progress ({done} effects)"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the child exited by itself"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let before_restart = effects(&dir).len();

    let store = FileStore::open(dir.join("state.db")).expect("the store reopens after kill -9");
    let rt = workers(Runtime::builder().store(store), dir.clone())
        .workflow(definition())
        .start()
        .await
        .expect("restarts");
    let client = rt.client();
    let all = client.list(&ListQuery::default()).await.expect("list");
    assert!(!all.is_empty());
    let unfinished = all.iter().filter(|s| !s.status.is_terminal()).count();
    assert!(
        unfinished > 0,
        "the kill landed after the run finished; nothing was tested"
    );
    let mut outcome = HashMap::new();
    for s in &all {
        let state = client
            .wait(s.transaction_id, Duration::from_secs(30))
            .await
            .expect("nothing stuck");
        let order: Order = state.input.parse().expect("order");
        let expected = if order.decline {
            WorkflowStatus::Compensated
        } else {
            WorkflowStatus::Completed
        };
        assert_eq!(
            state.status,
            expected,
            "{}",
            multiagents::timeline::render(&state)
        );
        outcome.insert(s.transaction_id.to_string(), order.decline);
    }
    // Every declined order had its reservation released exactly once (by
    // idempotency key: a redelivered command carries the same key); no
    // completed order was released or refunded.
    let effects = effects(&dir);
    let mut releases: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (worker, key, tx) in &effects {
        if worker == "release_inventory" {
            releases
                .entry(tx.as_str())
                .or_default()
                .insert(key.as_str());
        }
        if worker == "refund_payment" {
            panic!("refund ran for {tx}, but declined charges are never compensated");
        }
    }
    for (tx, declined) in &outcome {
        let n = releases.get(tx.as_str()).map_or(0, |k| k.len());
        assert_eq!(n, usize::from(*declined), "releases of {tx}");
    }
    eprintln!(
        "{} workflows in the store, {unfinished} unfinished at the kill; {before_restart} effects before, {} after",
        all.len(),
        effects.len()
    );
    rt.shutdown().await;
}

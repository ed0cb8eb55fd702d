//! The orchestrator (`multiagents serve`) is killed with SIGKILL three
//! times — while a workflow sleeps, while its parallel group runs, and while
//! it waits for a signal (which is sent, with `multiagents workflow signal`,
//! while no orchestrator runs) — and restarted each time. The workflow still
//! finishes correctly: every step once, the signal's payload passed on.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multiagents::bus::{Bus, RedisBusConfig, RedisStreamsBus};
use multiagents::core::{StepStatus, TransactionId, WorkflowState};
use multiagents::store::{RedisStateStore, RedisStoreConfig, Store};
use multiagents::worker::{WorkerContext, WorkerError, WorkerManager, from_fn};
use multiagents::{Client, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

fn orchestrator(url: &str, prefix: &str, n: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["serve", "--redis-url", url, "--prefix", prefix])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--consumers", "2", "--visibility-timeout", "1s"])
        .args(["--instance", &format!("orch-{n}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the multiagents binary starts")
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

async fn wait_until(
    client: &Client,
    tx: TransactionId,
    what: &str,
    done: impl Fn(&WorkflowState) -> bool,
) -> Arc<WorkflowState> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = client.status(tx).await.expect("read").expect("exists");
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_of(state: &WorkflowState, step: &str) -> StepStatus {
    state.step(step).expect("step").status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_survives_its_orchestrator_dying_in_a_sleep_a_group_and_a_signal_wait() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("okill{}", std::process::id());
    // The workers' bus keeps the default visibility timeout (2 s, extended
    // while a call runs); the orchestrators take over quickly.
    let bus: Bus = RedisStreamsBus::connect(RedisBusConfig::new(&url).prefix(&prefix))
        .await
        .expect("bus")
        .into();
    let store: Store = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store")
        .into();
    let client = Client::new(bus.clone(), store.clone());
    let def = WorkflowBuilder::new("resilient")
        .step("prepare", "prepare")
        .compensate_with("unprepare")
        .sleep("nap", Duration::from_millis(1500))
        .parallel("checks", |g| {
            g.step("fraud", "fraud").step("address", "address")
        })
        .wait_for_signal("approval", "approve")
        .step("finish", "finish")
        .input_from("approval")
        .build()
        .expect("valid");
    client.register(&def).await.expect("registered");

    // Every call, by step name.
    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let fraud_started = Arc::new(AtomicU32::new(0));
    let record = |name: &'static str, calls: &Arc<Mutex<Vec<String>>>| {
        let calls = calls.clone();
        from_fn(name, move |input: Value, ctx: WorkerContext| {
            let calls = calls.clone();
            async move {
                calls.lock().expect("lock").push(ctx.step.to_string());
                Ok::<_, WorkerError>(input)
            }
        })
    };
    let (c, started) = (calls.clone(), fraud_started.clone());
    let fraud = from_fn("fraud", move |_input: Value, ctx: WorkerContext| {
        let (c, started) = (c.clone(), started.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c.lock().expect("lock").push(ctx.step.to_string());
            Ok::<_, WorkerError>(json!({"score": 0.1}))
        }
    });
    let workers = WorkerManager::new(bus.clone())
        .register(record("prepare", &calls))
        .register(record("unprepare", &calls))
        .register(record("address", &calls))
        .register(record("finish", &calls))
        .register(fraud)
        .start()
        .await
        .expect("workers");

    let mut orch = orchestrator(&url, &prefix, 1);
    let tx = client
        .start("resilient", &json!({"order": 1}))
        .await
        .expect("start");

    // 1. Killed while the workflow sleeps.
    wait_until(&client, tx, "it sleeps", |s| {
        matches!(status_of(s, "nap"), StepStatus::Waiting { .. })
    })
    .await;
    kill9(&mut orch);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut orch = orchestrator(&url, &prefix, 2);

    // 2. Killed while the group runs (fraud takes 1.5 s).
    wait_until(&client, tx, "the group runs", |s| {
        matches!(status_of(s, "fraud"), StepStatus::Running { .. })
    })
    .await;
    while fraud_started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill9(&mut orch);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut orch = orchestrator(&url, &prefix, 3);

    // 3. Killed while it waits for the signal; the signal comes while no
    // orchestrator runs.
    wait_until(&client, tx, "it waits for the signal", |s| {
        matches!(status_of(s, "approval"), StepStatus::Waiting { .. })
    })
    .await;
    kill9(&mut orch);
    // A signal it does not wait for is refused, saying which it waits for.
    let (ok, _, stderr) = common::cli(&[
        "workflow",
        "signal",
        &tx.to_string(),
        "aprove",
        "--redis-url",
        &url,
        "--prefix",
        &prefix,
    ]);
    assert!(!ok, "a wrong signal name was accepted");
    assert!(stderr.contains("waits only for `approve`"), "{stderr}");
    let (ok, stdout, stderr) = common::cli(&[
        "workflow",
        "signal",
        &tx.to_string(),
        "approve",
        "--data",
        r#"{"approved_by": "ana"}"#,
        "--redis-url",
        &url,
        "--prefix",
        &prefix,
    ]);
    assert!(ok, "signal failed: {stdout}{stderr}");
    assert!(stdout.contains("signal `approve` delivered"), "{stdout}");
    let mut orch = orchestrator(&url, &prefix, 4);

    let state = client
        .wait(tx, Duration::from_secs(30))
        .await
        .expect("finishes");
    kill9(&mut orch);
    workers.shutdown().await;
    assert_eq!(state.status, WorkflowStatus::Completed, "{state:?}");
    let finish: Value = state
        .output("finish")
        .expect("finish")
        .parse()
        .expect("json");
    assert_eq!(finish, json!({"approved_by": "ana"}));
    let mut calls = calls.lock().expect("lock").clone();
    calls.sort();
    assert_eq!(
        calls,
        vec!["address", "finish", "fraud", "prepare"],
        "every step ran once, nothing was undone"
    );
    // The sleep lasted at least its time, across the restart.
    let nap: Vec<_> = state
        .history
        .iter()
        .filter(|h| h.step.as_ref().is_some_and(|s| s == "nap"))
        .map(|h| h.at)
        .collect();
    assert!(nap.last().expect("nap ended").since(nap[0]) >= Duration::from_millis(1500));
}

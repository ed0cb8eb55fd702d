//! `multiagents workflow status ID` and `multiagents workers` read what a
//! run left in Redis: one workflow's timeline with each command's lifecycle
//! and worker process, and the worker health table.

mod common;

use std::time::Duration;

use multiagents::bus::{RedisBusConfig, RedisStreamsBus};
use multiagents::store::{RedisStateStore, RedisStoreConfig};
use multiagents::worker::{WorkerError, WorkerManagerConfig, from_fn};
use multiagents::{Runtime, RuntimeBuilder, WorkflowBuilder, WorkflowStatus};

/// A runtime builder on Redis under `prefix`, with a workflow `orders` of
/// `reserve` (undone by `release_inventory`) then `second` on worker
/// `second`, and the reserve and release workers.
async fn on_redis(url: &str, prefix: &str, second: &str) -> RuntimeBuilder {
    let bus = RedisStreamsBus::connect(RedisBusConfig::new(url).prefix(prefix))
        .await
        .expect("bus");
    let store = RedisStateStore::connect(RedisStoreConfig::new(url).prefix(prefix))
        .await
        .expect("store");
    Runtime::builder()
        .bus(bus)
        .store(store)
        .workflow(
            WorkflowBuilder::new("orders")
                .step("reserve", "reserve_inventory")
                .compensate_with("release_inventory")
                .step(second, second)
                .build()
                .expect("valid"),
        )
        .worker(from_fn("reserve_inventory", |_: bool, _| async {
            Ok::<_, WorkerError>("r")
        }))
        .worker(from_fn("release_inventory", |_: bool, _| async {
            Ok::<_, WorkerError>("released")
        }))
}

#[tokio::test]
async fn status_and_workers_show_what_a_run_left_in_redis() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("cli-mon-{}", std::process::id());
    let rt = on_redis(&url, &prefix, "charge_payment")
        .await
        .worker(from_fn("charge_payment", |decline: bool, _| async move {
            if decline {
                Err(WorkerError::fatal("card declined").with_kind("declined"))
            } else {
                Ok("charged")
            }
        }))
        .worker_config(WorkerManagerConfig {
            instance: "shop-worker-7".into(),
            ..Default::default()
        })
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let ok = client.start("orders", &false).await.expect("start");
    let declined = client.start("orders", &true).await.expect("start");
    for tx in [ok, declined] {
        client
            .wait(tx, Duration::from_secs(10))
            .await
            .expect("ends");
    }
    assert_eq!(
        client
            .status(declined)
            .await
            .expect("status")
            .expect("exists")
            .status,
        WorkflowStatus::Compensated
    );
    rt.shutdown().await;

    let (success, out, err) = common::cli(&[
        "workflow",
        "status",
        &declined.to_string(),
        "--redis-url",
        &url,
        "--prefix",
        &prefix,
    ]);
    assert!(success, "{err}");
    for expected in [
        "reserve",
        "charge",
        "compensate",
        "card declined",
        "shop-worker-7",
        "completed",
        "failed",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from:\n{out}");
    }

    let (success, out, err) = common::cli(&["workers", "--redis-url", &url, "--prefix", &prefix]);
    assert!(success, "{err}");
    let charge = out
        .lines()
        .find(|l| l.starts_with("charge_payment"))
        .unwrap_or_else(|| panic!("no charge_payment row in:\n{out}"));
    // One success, one failure: 50% fails, which reads as failing.
    assert!(charge.contains("failing"), "{charge}");
    assert!(out.contains("shop-worker-7"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("1 × declined:") && l.contains("card declined")),
        "{out}"
    );

    let (success, _, err) = common::cli(&["workflow", "status", "not-an-id", "--redis-url", &url]);
    assert!(!success);
    assert!(err.contains("not a transaction id"), "{err}");
}

#[tokio::test]
async fn workflow_cancel_compensates_what_was_done() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("cli-cancel-{}", std::process::id());
    let rt = on_redis(&url, &prefix, "ship")
        .await
        .worker(from_fn("ship", |_: bool, _| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, WorkerError>("shipped")
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client.start("orders", &false).await.expect("start");
    // Wait until the reserve step is done and shipping is under way.
    for _ in 0..200 {
        let state = client.status(tx).await.expect("status").expect("exists");
        if state.step("reserve").is_some_and(|s| s.output.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tx_text = tx.to_string();
    let (success, out, err) = tokio::task::spawn_blocking({
        let url = url.clone();
        let prefix = prefix.clone();
        move || {
            common::cli(&[
                "workflow",
                "cancel",
                &tx_text,
                "--reason",
                "customer asked",
                "--wait",
                "20s",
                "--redis-url",
                &url,
                "--prefix",
                &prefix,
            ])
        }
    })
    .await
    .expect("join");
    assert!(success, "{err}");
    assert!(
        out.contains("cancellation requested (customer asked)"),
        "{out}"
    );
    assert!(out.contains("ended cancelled"), "{out}");
    let state = client.status(tx).await.expect("status").expect("exists");
    assert_eq!(state.status, WorkflowStatus::Cancelled);
    assert_eq!(
        state.step("reserve").map(|s| s.status),
        Some(multiagents::core::StepStatus::Compensated),
        "{}",
        multiagents::timeline::render(&state)
    );
    // Cancelling again changes nothing.
    let (success, out, _) = common::cli(&[
        "workflow",
        "cancel",
        &tx.to_string(),
        "--redis-url",
        &url,
        "--prefix",
        &prefix,
    ]);
    assert!(success);
    assert!(out.contains("already cancelled"), "{out}");
    rt.shutdown().await;
}

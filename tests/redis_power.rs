//! Groups, fan-out, sub-workflows, signals and interrupts on Redis: the
//! interrupt crosses Redis Pub/Sub to a worker in another runtime.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use multiagents::bus::{RedisBusConfig, RedisStreamsBus};
use multiagents::store::{RedisStateStore, RedisStoreConfig};
use multiagents::worker::{WorkerContext, WorkerError, WorkerManager, from_fn};
use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

#[tokio::test]
async fn a_fan_out_a_sub_workflow_and_an_interrupt_work_across_redis() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = common::unique_prefix("power");
    let bus = || async {
        RedisStreamsBus::connect(RedisBusConfig::new(&url).prefix(&prefix))
            .await
            .expect("bus")
    };
    let store = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store");
    let child = WorkflowBuilder::new("ship")
        .step("label", "label")
        .build()
        .expect("valid");
    let parent = WorkflowBuilder::new("order")
        .step("pack", "pack")
        .for_each("input.items")
        .max_concurrency(2)
        .sub_workflow("ship", "ship")
        .parallel("final", |g| g.step("slow", "slow").step("fail", "fail"))
        .build()
        .expect("valid");

    // The slow worker runs in a process of its own (its own bus connection):
    // it learns of the interrupt only through Redis.
    let interrupted = Arc::new(AtomicBool::new(false));
    let seen = interrupted.clone();
    let remote = WorkerManager::new(bus().await)
        .register(from_fn("slow", move |_i: Value, ctx: WorkerContext| {
            let seen = seen.clone();
            async move {
                tokio::select! {
                    _ = ctx.cancellation.cancelled() => {
                        seen.store(true, Ordering::SeqCst);
                        Err(WorkerError::fatal("interrupted"))
                    }
                    _ = tokio::time::sleep(Duration::from_secs(20)) => Ok(json!("done")),
                }
            }
        }))
        .start()
        .await
        .expect("remote workers");

    let rt = Runtime::builder()
        .bus(bus().await)
        .store(store)
        .workflow(child)
        .workflow(parent)
        .external_workers()
        .worker(from_fn(
            "pack",
            |item: Value, _ctx: WorkerContext| async move {
                Ok::<_, WorkerError>(json!({"packed": item}))
            },
        ))
        .worker(from_fn(
            "label",
            |_i: Value, _ctx: WorkerContext| async move { Ok::<_, WorkerError>(json!("L")) },
        ))
        .worker(from_fn(
            "fail",
            |_i: Value, _ctx: WorkerContext| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Err::<Value, _>(WorkerError::fatal("no"))
            },
        ))
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let tx = client
        .start("order", &json!({"items": [1, 2, 3]}))
        .await
        .expect("start");
    let state = client
        .wait(tx, Duration::from_secs(20))
        .await
        .expect("finished");
    // The sub-workflow step is undone (by undoing the child): compensated.
    assert_eq!(state.status, WorkflowStatus::Compensated, "{state:?}");
    assert!(
        interrupted.load(Ordering::SeqCst),
        "the remote worker was not interrupted"
    );
    let packed: Value = state.output("pack").expect("pack").parse().expect("json");
    assert_eq!(packed, json!([{"packed": 1}, {"packed": 2}, {"packed": 3}]));
    let shipped: Value = state.output("ship").expect("ship").parse().expect("json");
    assert_eq!(shipped, json!({"label": "L"}));
    rt.shutdown().await;
    remote.shutdown().await;
}

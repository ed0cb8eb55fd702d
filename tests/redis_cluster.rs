//! The Redis backend on a Redis Cluster: the same code, with commands routed
//! to the node owning each key. `scripts/test.sh` starts a three-node cluster
//! and sets `REDIS_CLUSTER_URL` to one of its nodes.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use multiagents::bus::{RedisBusConfig, RedisStreamsBus, Topics};
use multiagents::store::{ListQuery, RedisStateStore, RedisStoreConfig, WorkflowStates};
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{RetryPolicy, Runtime, WorkflowBuilder, WorkflowStatus};

#[tokio::test]
async fn sagas_retry_compensate_and_list_on_a_cluster() {
    let Some(url) = common::redis_cluster_url() else {
        return;
    };
    let prefix = common::unique_prefix("cluster");
    let bus = RedisStreamsBus::connect(RedisBusConfig::new(&url).prefix(&prefix))
        .await
        .expect("bus connects to the cluster");
    let store = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store connects to the cluster");
    // The first call of `flaky` fails: its retry is fired from the timer index.
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let rt = Runtime::builder()
        .bus(bus.clone())
        .store(store.clone())
        .workflow(
            WorkflowBuilder::new("orders")
                .step("reserve", "reserve")
                .compensate_with("release")
                .step("flaky", "flaky")
                .retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(50)))
                .step("charge", "charge")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("reserve", |_: bool, _| async {
            Ok::<_, WorkerError>("r-1")
        }))
        .worker(from_fn("release", |_: bool, ctx| async move {
            let r: String = ctx.output("reserve").await?;
            Ok::<_, WorkerError>(format!("released {r}"))
        }))
        .worker(from_fn("flaky", move |_: bool, _| {
            let seen = seen.clone();
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(WorkerError::retry("first call fails"))
                } else {
                    Ok("ok")
                }
            }
        }))
        .worker(from_fn("charge", |decline: bool, _| async move {
            if decline {
                Err(WorkerError::fatal("declined"))
            } else {
                Ok("charged")
            }
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let mut ok = Vec::new();
    for _ in 0..20 {
        ok.push(client.start("orders", &false).await.expect("start"));
    }
    let declined = client.start("orders", &true).await.expect("start");
    for tx in &ok {
        let state = client
            .wait(*tx, Duration::from_secs(20))
            .await
            .expect("ends");
        assert_eq!(
            state.status,
            WorkflowStatus::Completed,
            "{}",
            multiagents::timeline::render(&state)
        );
    }
    let state = client
        .wait(declined, Duration::from_secs(20))
        .await
        .expect("ends");
    assert_eq!(
        state.status,
        WorkflowStatus::Compensated,
        "{}",
        multiagents::timeline::render(&state)
    );
    assert!(
        calls.load(Ordering::SeqCst) >= 22,
        "the failed call was retried"
    );
    // Listing reads the index and each workflow's hash, on whichever nodes.
    let all = store.list(&ListQuery::default()).await.expect("list");
    assert_eq!(all.len(), 21);
    let compensated = store
        .list(&ListQuery {
            status: Some(WorkflowStatus::Compensated),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(compensated.len(), 1);
    assert_eq!(compensated[0].transaction_id, declined);
    assert!(bus.dead_letters(10).await.expect("dead letters").is_empty());
    rt.shutdown().await;
}

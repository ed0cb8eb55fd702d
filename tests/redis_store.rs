//! The Redis state store against a real Redis, alone and under the runtime
//! with the Redis Streams bus: two orchestrators and two worker managers
//! sharing one Redis.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use multiagents::bus::{RedisBusConfig, RedisStreamsBus};
use multiagents::core::saga;
use multiagents::core::{CorrelationId, Payload, Phase, Timestamp, TransactionId};
use multiagents::store::{
    Definitions, ListQuery, RedisStateStore, RedisStoreConfig, StoreError, TimerIndex,
    WorkflowStates,
};
use multiagents::worker::{WorkerError, WorkerManager, from_fn};
use multiagents::{RetryPolicy, Runtime, WorkflowBuilder, WorkflowDefinition, WorkflowStatus};
use redis::AsyncCommands;

fn def() -> WorkflowDefinition {
    WorkflowBuilder::new("orders")
        .step("reserve", "reserve")
        .compensate_with("release")
        .step("charge", "charge")
        .retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(20)))
        .build()
        .expect("valid")
}

async fn store(name: &str) -> Option<(RedisStateStore, String, String)> {
    let url = common::redis_url()?;
    let prefix = common::unique_prefix(name);
    let s = RedisStateStore::connect(
        RedisStoreConfig::new(&url)
            .prefix(&prefix)
            .finished_ttl(Duration::from_secs(60)),
    )
    .await
    .expect("connects");
    Some((s, url, prefix))
}

#[tokio::test]
async fn compare_and_set_lists_timers_and_definitions() {
    let Some((store, url, prefix)) = store("contract").await else {
        return;
    };
    let d = def();
    store.put_definition(&d).await.expect("definition");
    store
        .put_definition(&d)
        .await
        .expect("the same definition again is fine");
    let changed = WorkflowBuilder::new("orders")
        .step("other", "x")
        .build()
        .expect("valid");
    assert!(matches!(
        store.put_definition(&changed).await,
        Err(StoreError::DefinitionChanged { .. })
    ));
    let v2 = WorkflowBuilder::new("orders")
        .version(2)
        .step("other", "x")
        .build()
        .expect("valid");
    store.put_definition(&v2).await.expect("a new version");
    assert_eq!(
        store
            .latest_definition("orders")
            .await
            .expect("latest")
            .map(|d| d.version()),
        Some(2)
    );
    assert_eq!(
        store.get_definition("orders", 1).await.expect("get"),
        Some(d.clone())
    );

    let now = Timestamp::now();
    let (state, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        now,
    );
    let state = Arc::new(state);
    let tx = state.transaction_id;
    assert_eq!(store.create(state.clone()).await.expect("create"), 1);
    assert!(matches!(
        store.create(state.clone()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let mut next = (*state).clone();
    let input = saga::Input::Succeeded {
        step: "reserve".into(),
        phase: Phase::Forward,
        attempt: 1,
        output: Payload::null(),
    };
    assert!(saga::apply(&d, &mut next, input, now).changed);
    let next = Arc::new(next);
    assert_eq!(
        store.compare_and_set(1, next.clone()).await.expect("cas"),
        2
    );
    assert!(matches!(
        store.compare_and_set(1, next.clone()).await,
        Err(StoreError::Conflict {
            expected: 1,
            found: 2,
            ..
        })
    ));
    let got = store.get(tx).await.expect("get").expect("exists");
    assert_eq!((got.version, &*got.state), (2, &*next));

    let listed = store
        .list(&ListQuery {
            status: Some(WorkflowStatus::Running),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|s| s.transaction_id).collect::<Vec<_>>(),
        vec![tx]
    );
    assert!(
        store
            .list(&ListQuery {
                status: Some(WorkflowStatus::Completed),
                ..Default::default()
            })
            .await
            .expect("list")
            .is_empty()
    );

    // The deadline of the running step is due 30 s on; leased to one caller.
    assert!(store.due(now, 10).await.expect("due").is_empty());
    let later = now.plus(Duration::from_secs(31));
    assert_eq!(store.due(later, 10).await.expect("due"), vec![tx]);
    assert!(
        store.due(later, 10).await.expect("due").is_empty(),
        "leased: a second replica does not get it"
    );
    store.timer_handled(tx).await.expect("rearm");
    assert_eq!(
        store.due(later, 10).await.expect("due"),
        vec![tx],
        "re-armed at the real wakeup"
    );

    // Finishing sets the TTL.
    let mut done = (*next).clone();
    let input = saga::Input::Succeeded {
        step: "charge".into(),
        phase: Phase::Forward,
        attempt: 1,
        output: Payload::null(),
    };
    assert!(saga::apply(&d, &mut done, input, now).changed);
    assert_eq!(done.status, WorkflowStatus::Completed);
    store.compare_and_set(2, Arc::new(done)).await.expect("cas");
    let mut raw = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let ttl: i64 = raw
        .pttl(format!("{{{prefix}:wf:{tx}}}"))
        .await
        .expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "ttl {ttl}");
    let waited = store
        .wait_terminal(tx, Duration::from_secs(1))
        .await
        .expect("wait")
        .expect("exists");
    assert_eq!(waited.state.status, WorkflowStatus::Completed);
    // Writing a workflow that does not exist is refused. (Its timer entry,
    // written first, is harmless: firing it finds nothing and removes it.)
    let (ghost, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        now,
    );
    assert!(matches!(
        store.compare_and_set(1, Arc::new(ghost)).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn an_unreachable_store_is_reported_with_its_address() {
    let err = RedisStateStore::connect(RedisStoreConfig::new("redis://127.0.0.1:1/"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("redis://127.0.0.1:1/"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_and_two_worker_pools_share_one_redis() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = common::unique_prefix("shared");
    let bus_config = RedisBusConfig::new(&url).prefix(&prefix);
    let store_config = RedisStoreConfig::new(&url).prefix(&prefix);
    let mut runtimes = Vec::new();
    let mut pools = Vec::new();
    for i in 0..2 {
        let bus = RedisStreamsBus::connect(bus_config.clone())
            .await
            .expect("bus");
        let store = RedisStateStore::connect(store_config.clone())
            .await
            .expect("store");
        runtimes.push(
            Runtime::builder()
                .bus(bus.clone())
                .store(store)
                .workflow(def())
                .external_workers()
                .orchestrator_config(multiagents::OrchestratorConfig {
                    instance: format!("orch-{i}"),
                    redispatch_on_start: false,
                    ..Default::default()
                })
                .start()
                .await
                .expect("orchestrator starts"),
        );
        pools.push(
            WorkerManager::new(bus)
                .config(multiagents::worker::WorkerManagerConfig {
                    instance: format!("pool-{i}"),
                    ..Default::default()
                })
                .register(from_fn("reserve", |_: u64, _| async {
                    Ok::<_, WorkerError>("r")
                }))
                .register(from_fn("release", |_: u64, _| async {
                    Ok::<_, WorkerError>("released")
                }))
                .register(from_fn("charge", |n: u64, ctx| async move {
                    if n.is_multiple_of(10) {
                        Err(WorkerError::fatal("declined"))
                    } else if n.is_multiple_of(7) && ctx.attempt == 1 {
                        Err(WorkerError::retry("flaky"))
                    } else {
                        Ok("charged")
                    }
                }))
                .start()
                .await
                .expect("workers start"),
        );
    }
    let mut ids = Vec::new();
    for n in 0..200u64 {
        let client = runtimes[(n % 2) as usize].client();
        ids.push((n, client.start("orders", &n).await.expect("start")));
    }
    let client = runtimes[0].client();
    let reader = RedisStateStore::connect(store_config.clone())
        .await
        .expect("store");
    for (n, tx) in ids {
        let state = client
            .wait(tx, Duration::from_secs(20))
            .await
            .expect("finishes");
        // Whichever orchestrator finished it (this process's, handing the
        // state to its waiter, or the other's, announcing it), the state
        // waited for is the one stored.
        let stored = reader.get(tx).await.expect("get").expect("stored");
        assert_eq!(
            *stored.state, *state,
            "the stored state is the one waited for"
        );
        let expected = if n % 10 == 0 {
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
        if n % 7 == 0 && n % 10 != 0 {
            assert_eq!(
                state.step("charge").expect("step").attempts,
                2,
                "retried through a Redis timer"
            );
        }
    }
    for p in pools {
        p.shutdown().await;
    }
    for r in runtimes {
        r.shutdown().await;
    }
}

/// A process that wrote a transition and died before publishing its
/// commands: the write stays noted as unpublished, and an orchestrator's
/// recovery sweep publishes the commands again — no timeout, no
/// `redispatch_after`.
#[tokio::test]
async fn a_write_whose_commands_were_never_published_is_healed_by_the_sweep() {
    let Some((store, url, prefix)) = store("unpublished").await else {
        return;
    };
    let d = def();
    store.put_definition(&d).await.expect("definition");
    // What `start` writes, without its publish.
    let tx = TransactionId::new();
    let (state, actions) = saga::start(
        &d,
        tx,
        CorrelationId::new(),
        Payload::to_json(&false).expect("json"),
        Timestamp::now(),
    );
    assert!(!actions.is_empty());
    store.create(Arc::new(state)).await.expect("create");
    let unpublished = store
        .unpublished(Timestamp(Timestamp::now().0 + 1), Timestamp::now(), 10)
        .await
        .expect("unpublished");
    assert_eq!(unpublished, vec![(tx, 1)]);

    let bus = RedisStreamsBus::connect(RedisBusConfig::new(&url).prefix(&prefix))
        .await
        .expect("bus");
    let rt = Runtime::builder()
        .bus(bus)
        .store(store.clone())
        .workflow(d)
        .orchestrator_config(multiagents::OrchestratorConfig {
            redispatch_on_start: false,
            redispatch_after: None,
            unpublished_after: Duration::from_millis(300),
            ..Default::default()
        })
        .worker(from_fn("reserve", |_: bool, _| async {
            Ok::<_, WorkerError>("r-1")
        }))
        .worker(from_fn("release", |_: bool, _| async {
            Ok::<_, WorkerError>("released")
        }))
        .worker(from_fn("charge", |_: bool, _| async {
            Ok::<_, WorkerError>("charged")
        }))
        .start()
        .await
        .expect("starts");
    let done = rt
        .client()
        .wait(tx, Duration::from_secs(10))
        .await
        .expect("healed and finished");
    assert_eq!(done.status, WorkflowStatus::Completed);
    // Every write since was published and marked so (marks go out a
    // moment after the publish).
    let mut left = Vec::new();
    for _ in 0..50 {
        left = store
            .unpublished(Timestamp(Timestamp::now().0 + 1), Timestamp::now(), 10)
            .await
            .expect("unpublished");
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left.is_empty(), "{left:?}");
    rt.shutdown().await;
}

//! The worker manager: redelivery after a worker dies, idempotency keys,
//! draining on shutdown, health counters, concurrency limits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Effects;
use multiagents::bus::{MemoryBus, MemoryBusConfig, Notifier, Topics, WORKER_GROUP, command_topic};
use multiagents::worker::{
    WorkerError, WorkerManager, WorkerManagerConfig, WorkerOptions, from_fn,
};
use multiagents::{Runtime, WorkerName, WorkflowBuilder, WorkflowStatus};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_command_taken_by_a_worker_that_dies_is_redelivered_with_the_same_idempotency_key() {
    let bus = MemoryBus::with_config(MemoryBusConfig {
        visibility_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    // A worker process that takes the command and dies before acking it.
    let doomed = bus
        .consumer(
            &command_topic(&WorkerName::new("charge")),
            WORKER_GROUP,
            "doomed",
        )
        .await
        .expect("consumer");
    let rt = Runtime::builder()
        .bus(bus.clone())
        .workflow(
            WorkflowBuilder::new("pay")
                .step("charge", "charge")
                .build()
                .expect("valid"),
        )
        .external_workers()
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client
        .start("pay", &json!({"amount": 5}))
        .await
        .expect("start");
    let taken = doomed.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(taken.len(), 1);
    let first_key = taken[0].event.idempotency_key();
    drop(doomed);

    // A healthy worker joins the group; it gets the command once it is seen as lost.
    let effects = Effects::default();
    let e = effects.clone();
    let workers = WorkerManager::new(bus.clone())
        .register(from_fn("charge", move |_: serde_json::Value, ctx| {
            let e = e.clone();
            async move {
                e.record(ctx.idempotency_key());
                Ok::<_, WorkerError>(ctx.idempotency_key().to_string())
            }
        }))
        .start()
        .await
        .expect("workers start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(done.status, WorkflowStatus::Completed);
    assert_eq!(
        done.output("charge")
            .expect("output")
            .parse::<String>()
            .expect("string"),
        first_key
    );
    assert_eq!(effects.total(), 1);
    workers.shutdown().await;
    rt.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_calls_in_flight() {
    let bus = MemoryBus::new();
    let finished = Arc::new(AtomicUsize::new(0));
    let f = finished.clone();
    let rt = Runtime::builder()
        .bus(bus.clone())
        .workflow(
            WorkflowBuilder::new("slow")
                .step("s", "slow")
                .build()
                .expect("valid"),
        )
        .external_workers()
        .start()
        .await
        .expect("starts");
    let workers = WorkerManager::new(bus.clone())
        .register(from_fn("slow", move |_: serde_json::Value, _| {
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<_, WorkerError>(())
            }
        }))
        .start()
        .await
        .expect("workers start");
    let client = rt.client();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(client.start("slow", &json!(null)).await.expect("start"));
    }
    // Let the calls begin, then shut down in the middle of them.
    for _ in 0..100 {
        if workers.health()[0].in_flight == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(workers.health()[0].in_flight, 5);
    workers.shutdown().await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        5,
        "every call in flight finished"
    );
    for tx in ids {
        assert_eq!(
            client.wait(tx, WAIT).await.expect("finishes").status,
            WorkflowStatus::Completed
        );
    }
    rt.shutdown().await;
}

#[tokio::test]
async fn a_call_past_the_drain_timeout_is_cancelled_and_redelivered() {
    let bus = MemoryBus::with_config(MemoryBusConfig {
        visibility_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let rt = Runtime::builder()
        .bus(bus.clone())
        .workflow(
            WorkflowBuilder::new("stuck")
                .step("s", "stuck")
                .build()
                .expect("valid"),
        )
        .external_workers()
        .start()
        .await
        .expect("starts");
    let cancelled = Arc::new(AtomicUsize::new(0));
    let c = cancelled.clone();
    let first = WorkerManager::new(bus.clone())
        .config(WorkerManagerConfig {
            drain_timeout: Duration::from_millis(50),
            ..Default::default()
        })
        .register(from_fn("stuck", move |_: serde_json::Value, ctx| {
            let c = c.clone();
            async move {
                ctx.cancellation.cancelled().await;
                c.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(WorkerError::retry("cancelled"))
            }
        }))
        .start()
        .await
        .expect("workers start");
    let client = rt.client();
    let tx = client.start("stuck", &json!(null)).await.expect("start");
    while first.health()[0].in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.shutdown().await;
    // The second worker process finishes the job.
    let second = WorkerManager::new(bus.clone())
        .register(from_fn("stuck", |_: serde_json::Value, ctx| async move {
            Ok::<_, WorkerError>(ctx.attempt)
        }))
        .start()
        .await
        .expect("workers start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(done.status, WorkflowStatus::Completed);
    assert_eq!(
        done.steps[0].attempts, 1,
        "a redelivery is the same attempt"
    );
    second.shutdown().await;
    rt.shutdown().await;
}

#[tokio::test]
async fn concurrency_is_bounded_per_worker_and_health_counts_calls() {
    let bus = MemoryBus::new();
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let rt = Runtime::builder()
        .bus(bus.clone())
        .workflow(
            WorkflowBuilder::new("w")
                .step("s", "limited")
                .build()
                .expect("valid"),
        )
        .external_workers()
        .start()
        .await
        .expect("starts");
    let workers = WorkerManager::new(bus.clone())
        .register_with(
            from_fn("limited", move |fail: bool, _| {
                let (n, p) = (n.clone(), p.clone());
                async move {
                    let cur = n.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(cur, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    if fail {
                        Err(WorkerError::fatal("asked to fail"))
                    } else {
                        Ok(())
                    }
                }
            }),
            WorkerOptions::default().concurrency(3),
        )
        .start()
        .await
        .expect("workers start");
    let client = rt.client();
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(client.start("w", &(i % 10 == 0)).await.expect("start"));
    }
    for tx in ids {
        client.wait(tx, WAIT).await.expect("finishes");
    }
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    let h = &workers.health()[0];
    assert_eq!(
        (
            h.worker.as_str(),
            h.succeeded,
            h.failed,
            h.in_flight,
            h.concurrency
        ),
        ("limited", 27, 3, 0, 3)
    );
    workers.shutdown().await;
    rt.shutdown().await;
}

#[tokio::test]
async fn registering_a_worker_twice_is_refused() {
    let err = WorkerManager::new(MemoryBus::new())
        .register(from_fn("a", |_: (), _| async { Ok::<_, WorkerError>(()) }))
        .register(from_fn("a", |_: (), _| async { Ok::<_, WorkerError>(()) }))
        .start()
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("worker `a` is registered twice"),
        "{err}"
    );
}

#[tokio::test]
async fn heartbeats_carry_the_health_counters() {
    let bus = MemoryBus::new();
    let mut status = bus.subscribe_status();
    let workers = WorkerManager::new(bus.clone())
        .config(WorkerManagerConfig {
            instance: "box-1".into(),
            heartbeat_interval: Duration::from_millis(20),
            ..Default::default()
        })
        .register(from_fn("beating", |_: (), _| async {
            Ok::<_, WorkerError>(())
        }))
        .start()
        .await
        .expect("workers start");
    let beat = tokio::time::timeout(WAIT, status.recv())
        .await
        .expect("a heartbeat in time")
        .expect("received");
    assert_eq!(beat.workflow.as_str(), "heartbeat");
    let health: multiagents::worker::WorkerHealth = beat.payload.parse().expect("health");
    assert_eq!(
        (health.worker.as_str(), health.instance.as_str()),
        ("beating", "box-1")
    );
    workers.shutdown().await;
}

/// A payment provider that keeps the first charge under each key, as Stripe
/// does with `Idempotency-Key`.
#[derive(Clone, Default)]
struct Provider {
    charges: Arc<std::sync::Mutex<Vec<(String, String, u32)>>>,
}

#[tokio::test]
async fn an_attempt_that_timed_out_and_its_retry_share_the_idempotency_key() {
    let provider = Provider::default();
    let p = provider.clone();
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("pay")
                .step("charge", "charge")
                .timeout(Duration::from_millis(150))
                .retry(
                    multiagents::RetryPolicy::attempts(3)
                        .with_initial_delay(Duration::from_millis(1)),
                )
                .build()
                .expect("valid"),
        )
        .worker(from_fn("charge", move |_: serde_json::Value, ctx| {
            let p = p.clone();
            async move {
                // The provider takes the charge…
                p.charges.lock().expect("lock").push((
                    ctx.idempotency_key().to_string(),
                    ctx.attempt_key().to_string(),
                    ctx.attempt,
                ));
                // …but the first answer is slow: the orchestrator gives up
                // on that attempt and retries.
                if ctx.attempt == 1 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                Ok::<_, WorkerError>(json!({"charged": true}))
            }
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client.start("pay", &json!(null)).await.expect("start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(done.status, WorkflowStatus::Completed);
    assert!(done.step("charge").expect("step").attempts >= 2, "{done:?}");
    let charges = provider.charges.lock().expect("lock").clone();
    assert!(charges.len() >= 2, "{charges:?}");
    let keys: std::collections::HashSet<&str> = charges.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        keys.len(),
        1,
        "one idempotency key for every attempt: {charges:?}"
    );
    assert_eq!(charges[0].0, format!("{tx}/charge/forward"));
    let attempt_keys: std::collections::HashSet<&str> =
        charges.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(attempt_keys.len(), charges.len(), "{charges:?}");
    for (_, attempt_key, attempt) in &charges {
        assert_eq!(attempt_key, &format!("{tx}/charge/forward/{attempt}"));
    }
    rt.shutdown().await;
}

#[tokio::test]
async fn a_redelivered_command_whose_attempt_was_given_up_on_is_dropped_unrun() {
    let bus = MemoryBus::with_config(MemoryBusConfig {
        visibility_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let store = multiagents::store::MemoryStore::new();
    // A worker process that takes attempt 1 and hangs without extending it.
    let doomed = bus
        .consumer(
            &command_topic(&WorkerName::new("charge")),
            WORKER_GROUP,
            "doomed",
        )
        .await
        .expect("consumer");
    let rt = Runtime::builder()
        .bus(bus.clone())
        .store(store.clone())
        .workflow(
            WorkflowBuilder::new("pay")
                .step("charge", "charge")
                .timeout(Duration::from_millis(100))
                .retry(
                    multiagents::RetryPolicy::attempts(2)
                        .with_initial_delay(Duration::from_millis(1)),
                )
                .build()
                .expect("valid"),
        )
        .external_workers()
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client.start("pay", &json!(null)).await.expect("start");
    let taken = doomed.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(taken[0].event.attempt, 1);
    // Attempt 1 times out and attempt 2 is dispatched; only then does a
    // healthy worker (which knows the store) join.
    let mut retried = false;
    for _ in 0..100 {
        let s = client.status(tx).await.expect("status").expect("state");
        if s.awaits("charge", multiagents::core::Phase::Forward, 2) {
            retried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(retried, "attempt 2 was dispatched");
    let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = runs.clone();
    let workers = WorkerManager::new(bus.clone())
        .store(store.clone())
        .register(from_fn("charge", move |_: serde_json::Value, ctx| {
            let r = r.clone();
            async move {
                r.lock().expect("lock").push(ctx.attempt);
                Ok::<_, WorkerError>(json!("charged"))
            }
        }))
        .start()
        .await
        .expect("workers start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(done.status, WorkflowStatus::Completed);
    // Attempt 1's command comes back once its lease lapses: dropped, acked.
    for _ in 0..100 {
        if bus.depth(&command_topic(&WorkerName::new("charge")), WORKER_GROUP) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        bus.depth(&command_topic(&WorkerName::new("charge")), WORKER_GROUP),
        0,
        "the stale command was acked"
    );
    assert_eq!(
        *runs.lock().expect("lock"),
        vec![2],
        "attempt 1 never ran here"
    );
    drop(doomed);
    workers.shutdown().await;
    rt.shutdown().await;
}

#[tokio::test]
async fn a_copy_of_a_command_whose_attempt_runs_here_is_dropped_not_run_again() {
    let bus = MemoryBus::new();
    // Another group on the command topic sees every command, to copy one.
    let topic = command_topic(&WorkerName::new("slow"));
    let spy = bus.consumer(&topic, "spy", "spy").await.expect("consumer");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let rt = Runtime::builder()
        .bus(bus.clone())
        .workflow(
            WorkflowBuilder::new("once")
                .step("slow", "slow")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("slow", move |_: serde_json::Value, _ctx| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, WorkerError>(json!("done"))
            }
        }))
        .start()
        .await
        .expect("starts");
    let tx = rt.client().start("once", &json!({})).await.expect("start");
    let seen = spy.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(seen.len(), 1);
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The recovery sweep's republish, as it looks to the worker: the same
    // command again while the first call still runs.
    bus.publish(&topic, (*seen[0].event).clone())
        .await
        .expect("publish");
    let done = rt.client().wait(tx, WAIT).await.expect("wait");
    assert_eq!(done.status, WorkflowStatus::Completed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the copy ran again");
    assert_eq!(
        bus.depth(&topic, WORKER_GROUP),
        0,
        "the copy was left unacked"
    );
    rt.shutdown().await;
}

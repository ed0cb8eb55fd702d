//! Limits shared by every worker process on a bus: calls at once and calls
//! started per period, on the in-memory bus and on Redis, with two worker
//! managers standing for two processes.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multiagents::bus::{Bus, MemoryBus};
use multiagents::store::MemoryStore;
use multiagents::worker::{WorkerContext, WorkerError, WorkerManager, WorkerOptions, from_fn};
use multiagents::{Client, Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

#[derive(Default)]
struct Gauge {
    now: AtomicU32,
    max: AtomicU32,
    starts: Mutex<Vec<Instant>>,
}

/// Two "processes" (worker managers) running `call`, each allowed 8 at
/// once locally, under `options`; 24 workflows of one `call` step.
async fn run(bus: Bus, options: WorkerOptions) -> Arc<Gauge> {
    let gauge = Arc::new(Gauge::default());
    let worker = |g: Arc<Gauge>| {
        from_fn("call", move |_i: Value, _ctx: WorkerContext| {
            let g = g.clone();
            async move {
                g.starts.lock().expect("lock").push(Instant::now());
                let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
                g.max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                g.now.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, WorkerError>(json!(null))
            }
        })
    };
    let options = options.concurrency(8);
    let mut managers = Vec::new();
    for _ in 0..2 {
        managers.push(
            WorkerManager::new(bus.clone())
                .register_with(worker(gauge.clone()), options.clone())
                .start()
                .await
                .expect("workers"),
        );
    }
    let store = MemoryStore::new();
    let rt = Runtime::builder()
        .bus(bus.clone())
        .store(store.clone())
        .workflow(
            WorkflowBuilder::new("limited")
                .step("call", "call")
                .build()
                .expect("valid"),
        )
        .external_workers()
        .start()
        .await
        .expect("runtime");
    let client: Client = rt.client();
    let mut txs = Vec::new();
    for _ in 0..24 {
        txs.push(client.start("limited", &json!({})).await.expect("start"));
    }
    for tx in txs {
        let state = client
            .wait(tx, Duration::from_secs(30))
            .await
            .expect("finished");
        assert_eq!(state.status, WorkflowStatus::Completed);
    }
    rt.shutdown().await;
    for m in managers {
        m.shutdown().await;
    }
    gauge
}

/// The most starts in any window of `window`.
fn busiest(starts: &[Instant], window: Duration) -> usize {
    let mut s = starts.to_vec();
    s.sort();
    (0..s.len())
        .map(|i| {
            s[i..]
                .iter()
                .take_while(|t| t.duration_since(s[i]) < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn without_shared_limits_both_processes_run_at_full_width() {
    let gauge = run(MemoryBus::new().into(), WorkerOptions::default()).await;
    assert!(
        gauge.max.load(Ordering::SeqCst) > 8,
        "the test could not tell"
    );
}

#[tokio::test]
async fn a_global_concurrency_limit_holds_across_processes() {
    let gauge = run(
        MemoryBus::new().into(),
        WorkerOptions::default().global_concurrency(3),
    )
    .await;
    assert_eq!(gauge.max.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_rate_limit_holds_across_processes() {
    let gauge = run(
        MemoryBus::new().into(),
        WorkerOptions::default().rate_limit(8, Duration::from_millis(400)),
    )
    .await;
    let starts = gauge.starts.lock().expect("lock").clone();
    assert_eq!(starts.len(), 24);
    // Starts are granted before the worker body notes them: allow that
    // much slack (100 ms) at the window's edge, no more.
    assert!(
        busiest(&starts, Duration::from_millis(300)) <= 8,
        "{starts:?}"
    );
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use multiagents::bus::{RedisBusConfig, RedisStreamsBus};

    async fn bus(url: &str, name: &str) -> Bus {
        RedisStreamsBus::connect(RedisBusConfig::new(url).prefix(common::unique_prefix(name)))
            .await
            .expect("bus")
            .into()
    }

    #[tokio::test]
    async fn shared_limits_hold_on_redis() {
        let Some(url) = common::redis_url() else {
            return;
        };
        let gauge = run(
            bus(&url, "limits-c").await,
            WorkerOptions::default().global_concurrency(3),
        )
        .await;
        assert_eq!(gauge.max.load(Ordering::SeqCst), 3);

        let gauge = run(
            bus(&url, "limits-r").await,
            WorkerOptions::default().rate_limit(8, Duration::from_millis(400)),
        )
        .await;
        let starts = gauge.starts.lock().expect("lock").clone();
        assert!(
            busiest(&starts, Duration::from_millis(300)) <= 8,
            "{starts:?}"
        );
    }
}

/// One worker that runs one call at a time, held on a gate first: while it
/// is held, low, normal and high workflows queue up; released, it takes
/// them high first, then normal, then low.
#[tokio::test]
async fn a_saturated_worker_takes_higher_priorities_first() {
    use multiagents::StartOptions;
    use multiagents::core::Priority;

    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (o, g) = (order.clone(), gate.clone());
    let worker = from_fn("call", move |input: Value, _ctx: WorkerContext| {
        let (o, g) = (o.clone(), g.clone());
        async move {
            let label = input.as_str().unwrap_or_default().to_string();
            if label == "gate" {
                g.notified().await;
            } else {
                o.lock().expect("lock").push(label);
            }
            Ok::<_, WorkerError>(json!(null))
        }
    });
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("prioritised")
                .step("call", "call")
                .build()
                .expect("valid"),
        )
        .worker_with(worker, WorkerOptions::default().concurrency(1))
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let gate_tx = client.start("prioritised", &"gate").await.expect("start");
    // Wait until the gate call holds the only place.
    loop {
        let s = client.status(gate_tx).await.expect("read").expect("exists");
        if s.history.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut txs = Vec::new();
    for (priority, label) in [
        (Priority::Low, "low"),
        (Priority::Normal, "normal"),
        (Priority::High, "high"),
    ] {
        for n in 0..3 {
            let options = StartOptions {
                priority,
                ..Default::default()
            };
            txs.push(
                client
                    .start_with("prioritised", &format!("{label}{n}"), options)
                    .await
                    .expect("start"),
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    for tx in txs.into_iter().chain([gate_tx]) {
        client
            .wait(tx, Duration::from_secs(10))
            .await
            .expect("finished");
    }
    let order = order.lock().expect("lock").clone();
    let rank = |l: &String| match &l[..l.len() - 1] {
        "high" => 0,
        "normal" => 1,
        _ => 2,
    };
    let ranks: Vec<u8> = order.iter().map(rank).collect();
    assert_eq!(ranks, vec![0, 0, 0, 1, 1, 1, 2, 2, 2], "{order:?}");
    rt.shutdown().await;
}

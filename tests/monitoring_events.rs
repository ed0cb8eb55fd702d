//! The event monitor: each command's lifecycle from the stored history
//! (dispatch → pickup → processing → outcome), timeouts and retries told
//! apart, window statistics computed correctly, and the settings taking
//! effect.

use std::time::Duration;

use multiagents::monitoring::{
    EventMonitor, MonitorError, MonitoringConfig, Outcome, events::Percentiles,
};
use multiagents::store::{MemoryStore, Store};
use multiagents::worker::{WorkerError, WorkerManagerConfig, from_fn};
use multiagents::{RetryPolicy, Runtime, WorkflowBuilder, WorkflowStatus};

async fn runtime(store: Store, record_timing: bool) -> Runtime {
    Runtime::builder()
        .store(store)
        .workflow(
            WorkflowBuilder::new("orders")
                .default_retry(
                    RetryPolicy::attempts(2).with_initial_delay(Duration::from_millis(5)),
                )
                .step("reserve", "reserve")
                .compensate_with("release")
                .step("flaky", "flaky")
                .step("slow", "slow")
                .timeout(Duration::from_millis(100))
                .build()
                .expect("valid"),
        )
        .worker(from_fn("reserve", |_: bool, _| async {
            Ok::<_, WorkerError>("r")
        }))
        .worker(from_fn("release", |_: bool, _| async {
            Ok::<_, WorkerError>("x")
        }))
        .worker(from_fn("flaky", |_: bool, ctx| async move {
            if ctx.attempt == 1 {
                Err(WorkerError::retry("try again"))
            } else {
                Ok("ok")
            }
        }))
        .worker(from_fn("slow", |hang: bool, _| async move {
            if hang {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<_, WorkerError>("done")
        }))
        .worker_config(WorkerManagerConfig {
            instance: "worker-a".into(),
            record_timing,
            ..Default::default()
        })
        .start()
        .await
        .expect("starts")
}

#[tokio::test]
async fn the_trace_shows_each_commands_lifecycle_and_how_it_ended() {
    let store: Store = MemoryStore::new().into();
    let rt = runtime(store.clone(), true).await;
    let client = rt.client();
    let ok = client.start("orders", &false).await.expect("start");
    let hung = client.start("orders", &true).await.expect("start");
    for tx in [ok, hung] {
        client
            .wait(tx, Duration::from_secs(10))
            .await
            .expect("ends");
    }
    let monitor = EventMonitor::new(store.clone(), MonitoringConfig::default().event_monitoring);

    let trace = monitor.trace(ok).await.expect("trace").expect("exists");
    let shape: Vec<(&str, u32, Outcome)> = trace
        .iter()
        .map(|l| (l.step.as_str(), l.attempt, l.outcome.clone()))
        .collect();
    assert_eq!(
        shape,
        [
            ("reserve", 1, Outcome::Completed),
            ("flaky", 1, Outcome::Failed),
            ("flaky", 2, Outcome::Completed),
            ("slow", 1, Outcome::Completed),
        ]
    );
    for l in &trace {
        let (p, s, f, e) = (
            l.picked_up_at.expect("picked up"),
            l.started_at.expect("started"),
            l.finished_at.expect("finished"),
            l.ended_at.expect("ended"),
        );
        assert!(l.dispatched_at <= p && p <= s && s <= f && f <= e, "{l:?}");
        assert_eq!(l.instance.as_deref(), Some("worker-a"));
        assert!(l.total().expect("total") >= l.processing().expect("processing"));
    }
    assert_eq!(trace[1].error.as_deref(), Some("try again"));

    // The hung call times out on both attempts (at the orchestrator's
    // deadline or the worker's, whichever comes first), and the workflow
    // compensates.
    let trace = monitor.trace(hung).await.expect("trace").expect("exists");
    let timed_out: Vec<_> = trace
        .iter()
        .filter(|l| l.outcome == Outcome::TimedOut)
        .collect();
    assert_eq!(timed_out.len(), 2, "{trace:#?}");
    assert!(
        timed_out.iter().all(|l| l
            .error
            .as_deref()
            .is_some_and(|e| e.contains("timed out") || e.contains("deadline"))),
        "{trace:#?}"
    );
    assert!(trace.iter().any(
        |l| l.phase == multiagents::core::Phase::Compensate && l.outcome == Outcome::Completed
    ));

    let stats = monitor
        .window(Duration::from_secs(60))
        .await
        .expect("stats");
    assert_eq!(stats.workflows, 2);
    assert_eq!(stats.finished.get("completed"), Some(&1));
    assert_eq!(stats.finished.get("compensated"), Some(&1));
    // ok: 4 (1 failed); hung: reserve, flaky ×2 (1 failed), slow ×2 timed out, release.
    assert_eq!((stats.completed, stats.failed, stats.timed_out), (6, 2, 2));
    assert_eq!(stats.events, 10);
    assert!(
        (stats.success_rate_percent - 60.0).abs() < 1e-9,
        "{stats:?}"
    );
    assert!(stats.latency_ms.p99 >= stats.latency_ms.p50);
    assert!(
        stats.latency_ms.p99 >= 100.0,
        "a timeout takes the deadline"
    );
    rt.shutdown().await;
}

#[test]
fn percentiles_and_a_clean_window_read_right() {
    let p = Percentiles::of(&mut [5.0, 1.0, 3.0, 2.0, 4.0]);
    assert_eq!((p.p50, p.p95, p.p99), (3.0, 5.0, 5.0));
    let stats = multiagents::monitoring::events::window_stats(
        &[],
        multiagents::core::Timestamp(0),
        multiagents::core::Timestamp(1000),
    );
    assert_eq!(
        stats.success_rate_percent, 100.0,
        "nothing failed reads 100%"
    );
}

#[tokio::test]
async fn a_run_with_no_failures_reads_100_percent() {
    let store: Store = MemoryStore::new().into();
    let rt = Runtime::builder()
        .store(store.clone())
        .workflow(
            WorkflowBuilder::new("w")
                .step("a", "a")
                .step("b", "b")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("a", |_: u32, _| async { Ok::<_, WorkerError>(1) }))
        .worker(from_fn("b", |_: u32, _| async { Ok::<_, WorkerError>(2) }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    for n in 0..20u32 {
        let tx = client.start("w", &n).await.expect("start");
        assert_eq!(
            client
                .wait(tx, Duration::from_secs(5))
                .await
                .expect("ends")
                .status,
            WorkflowStatus::Completed
        );
    }
    let monitor = EventMonitor::new(store, MonitoringConfig::default().event_monitoring);
    let stats = monitor
        .window(Duration::from_secs(60))
        .await
        .expect("stats");
    assert_eq!((stats.events, stats.completed), (40, 40));
    assert_eq!(stats.success_rate_percent, 100.0);
    assert!(stats.rate_per_second > 0.0);
    rt.shutdown().await;
}

#[tokio::test]
async fn the_settings_take_effect() {
    let store: Store = MemoryStore::new().into();
    // Workers told not to record timing: the lifecycle has no pickup.
    let rt = runtime(store.clone(), false).await;
    let client = rt.client();
    let mut txs = Vec::new();
    for _ in 0..5 {
        let tx = client.start("orders", &false).await.expect("start");
        client
            .wait(tx, Duration::from_secs(10))
            .await
            .expect("ends");
        txs.push(tx);
    }
    let mut config = MonitoringConfig::default().event_monitoring;
    let trace = EventMonitor::new(store.clone(), config.clone())
        .trace(txs[0])
        .await
        .expect("trace")
        .expect("exists");
    assert!(
        trace
            .iter()
            .all(|l| l.picked_up_at.is_none() && l.ended_at.is_some())
    );

    // max_trace_history bounds the traces held and the workflows looked at.
    config.max_trace_history = 2;
    let monitor = EventMonitor::new(store.clone(), config.clone());
    for tx in &txs {
        monitor.trace(*tx).await.expect("trace");
    }
    assert_eq!(monitor.cached(), 2);
    assert_eq!(
        monitor
            .window(Duration::from_secs(60))
            .await
            .expect("stats")
            .workflows,
        2
    );

    // A retention of zero hours: nothing is old enough to show... or new
    // enough: every trace is past it.
    config.trace_retention_hours = 0;
    let monitor = EventMonitor::new(store.clone(), config.clone());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(monitor.trace(txs[0]).await.expect("trace").is_none());

    // Off: the monitor says so.
    config.enabled = false;
    let monitor = EventMonitor::new(store, config);
    assert!(matches!(
        monitor.trace(txs[0]).await,
        Err(MonitorError::Disabled)
    ));
    rt.shutdown().await;
}

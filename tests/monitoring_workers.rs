//! The worker monitor: health from failure rates and missed heartbeats
//! (thresholds configurable), instances merged per type (counts, durations,
//! errors by kind), and heartbeats kept in the store so any process sees
//! every worker.

mod common;

use std::time::Duration;

use multiagents::core::Timestamp;
use multiagents::monitoring::workers::report;
use multiagents::monitoring::{Health, MonitoringConfig, WorkerMonitor};
use multiagents::store::{MemoryStore, Store};
use multiagents::worker::{ErrorKind, WorkerError, WorkerHealth, WorkerManagerConfig, from_fn};
use multiagents::{Runtime, WorkflowBuilder};

fn beat(instance: &str, ok: u64, failed: u64, at: Timestamp) -> WorkerHealth {
    WorkerHealth {
        worker: "charge".into(),
        instance: instance.into(),
        succeeded: ok * 10,
        failed: failed * 10,
        recent_succeeded: ok,
        recent_failed: failed,
        interval_ms: 1000,
        at,
        durations_us: vec![(1000, ok), (9000, failed)],
        errors: vec![ErrorKind {
            kind: "declined".into(),
            count: failed,
            last_message: format!("declined at {instance}"),
            last_at: at,
        }],
        ..Default::default()
    }
}

#[test]
fn health_follows_the_thresholds_and_missed_heartbeats() {
    let config = MonitoringConfig::default().worker_monitoring;
    let now = Timestamp::now();
    let health = |b: WorkerHealth, c: &multiagents::monitoring::WorkerMonitoringConfig| {
        report(&[b], c, now)[0].instances[0].health
    };
    assert_eq!(health(beat("a", 90, 10, now), &config), Health::Healthy);
    assert_eq!(
        health(beat("a", 80, 20, now), &config),
        Health::Degraded,
        "20% is degraded"
    );
    assert_eq!(health(beat("a", 60, 40, now), &config), Health::Degraded);
    assert_eq!(
        health(beat("a", 50, 50, now), &config),
        Health::Failing,
        "50% is failing"
    );
    // Three missed heartbeats (of 1 s) make it inactive, failures or not.
    let old = Timestamp(now.0 - 3_500);
    assert_eq!(health(beat("a", 100, 0, old), &config), Health::Inactive);
    assert_eq!(
        health(beat("a", 100, 0, Timestamp(now.0 - 2_500)), &config),
        Health::Healthy
    );
    // Other thresholds.
    let strict = multiagents::monitoring::WorkerMonitoringConfig {
        degraded_failure_rate: 0.05,
        failing_failure_rate: 0.1,
        inactive_after_missed_heartbeats: 1,
        ..config.clone()
    };
    assert_eq!(health(beat("a", 90, 10, now), &strict), Health::Failing);
    assert_eq!(health(beat("a", 94, 6, now), &strict), Health::Degraded);
    assert_eq!(
        health(beat("a", 100, 0, Timestamp(now.0 - 1_500)), &strict),
        Health::Inactive
    );
}

#[test]
fn instances_merge_into_their_type() {
    let config = MonitoringConfig::default().worker_monitoring;
    let now = Timestamp::now();
    let types = report(
        &[
            beat("a", 90, 10, now),
            beat("b", 70, 30, now),
            beat("c", 5, 5, Timestamp(now.0 - 60_000)),
        ],
        &config,
        now,
    );
    assert_eq!(types.len(), 1);
    let t = &types[0];
    assert_eq!(t.instances.len(), 3);
    assert_eq!((t.succeeded, t.failed), (1650, 450));
    // Recent calls of active instances only: 40 failed of 200.
    assert!((t.failure_rate - 0.2).abs() < 1e-9, "{}", t.failure_rate);
    assert_eq!(t.health, Health::Degraded);
    assert!((t.calls_per_second - 200.0).abs() < 1e-9);
    // Durations merged exactly: 165 calls at 1 ms, 45 at 9 ms.
    assert!(
        (t.duration_ms.p50 - 1.0).abs() < 0.02,
        "{:?}",
        t.duration_ms
    );
    assert!((t.duration_ms.p99 - 9.0).abs() < 0.1, "{:?}", t.duration_ms);
    assert_eq!(t.errors.len(), 1);
    assert_eq!(t.errors[0].count, 45);
}

async fn run_and_report(store: Store, reader: Store) {
    let rt = Runtime::builder()
        .store(store)
        .workflow(
            WorkflowBuilder::new("w")
                .step("pay", "charge")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("charge", |n: u32, _| async move {
            if n.is_multiple_of(4) {
                Err(WorkerError::fatal(format!("card {n} declined")).with_kind("declined"))
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(n)
            }
        }))
        .worker_config(WorkerManagerConfig {
            instance: "pay-1".into(),
            heartbeat_interval: Duration::from_millis(50),
            ..Default::default()
        })
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    for n in 0..40u32 {
        let tx = client.start("w", &n).await.expect("start");
        client.wait(tx, Duration::from_secs(5)).await.expect("ends");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let monitor = WorkerMonitor::new(reader, MonitoringConfig::default().worker_monitoring);
    let types = monitor.report().await.expect("report");
    assert_eq!(types.len(), 1, "{types:#?}");
    let t = &types[0];
    assert_eq!(
        (t.worker.as_str(), t.succeeded, t.failed),
        ("charge", 30, 10)
    );
    assert_eq!(t.instances[0].heartbeat.instance, "pay-1");
    assert_eq!(t.errors[0].kind, "declined");
    assert_eq!(t.errors[0].count, 10);
    assert!(t.errors[0].last_message.contains("declined"));
    assert!(t.duration_ms.p50 >= 1.0, "{:?}", t.duration_ms);
    assert_eq!(t.health, Health::Degraded, "25% failures");
    rt.shutdown().await;
}

#[tokio::test]
async fn a_runs_workers_report_through_the_store() {
    let store: Store = MemoryStore::new().into();
    run_and_report(store.clone(), store).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn heartbeats_in_redis_are_seen_by_another_connection() {
    use multiagents::bus::{RedisBusConfig, RedisStreamsBus};
    use multiagents::store::{RedisStateStore, RedisStoreConfig};
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = common::unique_prefix("workers");
    let store = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store");
    let reader = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store");
    let _bus = RedisStreamsBus::connect(RedisBusConfig::new(&url).prefix(&prefix))
        .await
        .expect("bus");
    run_and_report(store.into(), reader.into()).await;
}

#[test]
fn the_monitoring_settings_reach_the_worker_manager() {
    let config = MonitoringConfig::from_yaml(
        "worker_monitoring: {enabled: false, health_check_interval_seconds: 7}\nevent_monitoring: {enabled: false}",
    )
    .expect("valid");
    let manager = WorkerManagerConfig::default().with_monitoring(&config);
    assert_eq!(manager.heartbeat_interval, Duration::from_secs(7));
    assert!(!manager.monitor);
    assert!(!manager.record_timing);
    let on = WorkerManagerConfig::default().with_monitoring(&MonitoringConfig::default());
    assert!(on.monitor && on.record_timing);
    assert_eq!(on.heartbeat_interval, Duration::from_secs(30));
}

#[tokio::test]
async fn heartbeats_past_the_retention_are_dropped_and_monitoring_off_keeps_no_durations() {
    let store: Store = MemoryStore::new().into();
    let now = Timestamp::now();
    store
        .health
        .record_worker_health(&[
            beat("fresh", 1, 0, now),
            beat("old", 1, 0, Timestamp(now.0 - 2 * 3_600_000)),
        ])
        .await
        .expect("record");
    let mut config = MonitoringConfig::default().worker_monitoring;
    config.metrics_retention_hours = 1;
    let types = WorkerMonitor::new(store.clone(), config)
        .report()
        .await
        .expect("report");
    let instances: Vec<&str> = types[0]
        .instances
        .iter()
        .map(|i| i.heartbeat.instance.as_str())
        .collect();
    assert_eq!(instances, ["fresh"]);

    // A manager with monitoring off reports counts but no durations or errors.
    let rt = Runtime::builder()
        .store(store.clone())
        .workflow(
            WorkflowBuilder::new("w")
                .step("pay", "charge")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("charge", |_: u32, _| async move {
            Err::<u32, _>(WorkerError::fatal("no").with_kind("declined"))
        }))
        .worker_config(WorkerManagerConfig {
            instance: "quiet".into(),
            monitor: false,
            ..Default::default()
        })
        .start()
        .await
        .expect("starts");
    let tx = rt.client().start("w", &1u32).await.expect("start");
    rt.client()
        .wait(tx, Duration::from_secs(5))
        .await
        .expect("ends");
    rt.shutdown().await;
    let beats = store
        .health
        .worker_health(Duration::from_secs(60))
        .await
        .expect("beats");
    let quiet = beats
        .iter()
        .find(|b| b.instance == "quiet")
        .expect("its last heartbeat");
    assert_eq!(quiet.failed, 1);
    assert!(quiet.durations_us.is_empty() && quiet.errors.is_empty());
}

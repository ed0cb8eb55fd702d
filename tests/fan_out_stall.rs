//! A wide fan-out never waits on a step timeout: every branch's command and
//! result arrives at once, on the embedded backend (file store, in-process
//! bus). Its results are taken by two consumers at once; before transitions
//! of one workflow were serialised in the process, one of them could lose 64
//! compare-and-sets in a row, leave its result unacked, and the branch then
//! waited out the visibility timeout (or timed out and ran again).
//!
//! `FAN_OUT_RUNS` sets how many runs (default 4 embedded, 2 on Redis; the
//! issue's check is 50 embedded and 20 on Redis, best taken with
//! `--release`).
#![cfg(feature = "embedded")]

mod common;

use std::time::Duration;

use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

fn runs(default: usize) -> usize {
    std::env::var("FAN_OUT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How long one run may take. A lost command or result is only rescued by
/// the 30 s step timeout, and then shows as an attempt 2 in the history,
/// which fails the run; the wait itself is generous, for debug builds on a
/// busy machine (a run takes 13 s there, 0.6 s in release).
const WAIT: Duration = Duration::from_secs(180);

fn wide() -> multiagents::WorkflowDefinition {
    WorkflowBuilder::new("wide")
        .step("fan", "noop")
        .for_each("input.items")
        .max_concurrency(50)
        .build()
        .expect("valid")
}

fn noop() -> impl multiagents::Worker {
    from_fn("noop", |v: Value, _ctx: WorkerContext| async move {
        Ok::<_, WorkerError>(v)
    })
}

async fn run_wide(client: &multiagents::Client, runs: usize, wait: Duration) {
    let items: Vec<u32> = (0..1000).collect();
    for run in 0..runs {
        let tx = client
            .start("wide", &json!({"items": items}))
            .await
            .expect("start");
        let state = client
            .wait(tx, wait)
            .await
            .unwrap_or_else(|e| panic!("run {run}: a branch waited: {e}"));
        assert_eq!(
            state.status,
            WorkflowStatus::Completed,
            "run {run}: {:?}",
            state.failure
        );
        let retried: Vec<String> = state
            .history
            .iter()
            .filter(|h| h.attempt > 1)
            .map(|h| format!("{:?} {:?}", h.step, h.event))
            .collect();
        assert!(
            retried.is_empty(),
            "run {run}: attempts after the first: {retried:?}"
        );
        let output: Vec<u32> = state.output("fan").expect("output").parse().expect("json");
        assert_eq!(output, items, "run {run}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_item_fan_out_never_times_a_branch_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::builder()
        .store(multiagents::store::FileStore::open(dir.path().join("s.db")).expect("store"))
        .workflow(wide())
        .worker(noop())
        .start()
        .await
        .expect("runtime");
    run_wide(&rt.client(), runs(4), WAIT).await;
    rt.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_item_fan_out_on_redis_never_times_a_branch_out() {
    use multiagents::bus::{RedisBusConfig, RedisStreamsBus};
    use multiagents::store::{RedisStateStore, RedisStoreConfig};
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = common::unique_prefix("wide");
    let rt = Runtime::builder()
        .bus(
            RedisStreamsBus::connect(RedisBusConfig::new(&url).prefix(&prefix))
                .await
                .expect("bus"),
        )
        .store(
            RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
                .await
                .expect("store"),
        )
        .workflow(wide())
        .worker(noop())
        .orchestrator_config(multiagents::OrchestratorConfig {
            redispatch_on_start: false,
            parallel_results: true,
            ..Default::default()
        })
        .start()
        .await
        .expect("runtime");
    run_wide(&rt.client(), runs(2), WAIT).await;
    rt.shutdown().await;
}

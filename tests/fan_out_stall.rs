//! A wide fan-out never waits on a step timeout: every branch's command and
//! result arrives at once, on the embedded backend (file store, in-process
//! bus). Its results are taken by two consumers at once; before transitions
//! of one workflow were serialised in the process, one of them could lose 64
//! compare-and-sets in a row, leave its result unacked, and the branch then
//! waited out the visibility timeout (or timed out and ran again).
//!
//! `FAN_OUT_RUNS` sets how many runs (default 6; the check is 50,
//! best taken with `--release`).

use std::time::Duration;

use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

fn runs() -> usize {
    std::env::var("FAN_OUT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_item_fan_out_never_times_a_branch_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = WorkflowBuilder::new("wide")
        .step("fan", "noop")
        .for_each("input.items")
        .max_concurrency(50)
        .build()
        .expect("valid");
    let rt = Runtime::builder()
        .store(multiagents::store::FileStore::open(dir.path().join("s.db")).expect("store"))
        .workflow(def)
        .worker(from_fn(
            "noop",
            |v: Value, _ctx: WorkerContext| async move { Ok::<_, WorkerError>(v) },
        ))
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let items: Vec<u32> = (0..1000).collect();
    for run in 0..runs() {
        let tx = client
            .start("wide", &json!({"items": items}))
            .await
            .expect("start");
        // Well under the 30 s visibility timeout and step timeout: a lost
        // command or result shows as a wait that ends here.
        let state = client
            .wait(tx, Duration::from_secs(25))
            .await
            .unwrap_or_else(|e| panic!("run {run}: a branch waited: {e}"));
        assert_eq!(state.status, WorkflowStatus::Completed, "run {run}");
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
    rt.shutdown().await;
}

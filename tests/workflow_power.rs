//! Groups, conditions, fan-out, sleeps, signals, deadlines, sub-workflows and
//! interrupts, end to end on the embedded runtime with real workers.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use multiagents::core::workflow::OnTimeout;
use multiagents::core::{StepStatus, TransactionId};
use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents::{Error, Runtime, RuntimeBuilder, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// Calls by worker name, in order.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<String>>>);

impl Calls {
    fn push(&self, what: impl Into<String>) {
        self.0.lock().expect("lock").push(what.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }
    fn count(&self, what: &str) -> usize {
        self.all().iter().filter(|c| c.as_str() == what).count()
    }
}

/// A worker that records its call and answers `output`.
fn echo(calls: &Calls, name: &'static str, output: Value) -> impl multiagents::Worker {
    let calls = calls.clone();
    from_fn(name, move |_input: Value, ctx: WorkerContext| {
        let calls = calls.clone();
        let output = output.clone();
        async move {
            calls.push(format!("{name}:{}", ctx.step));
            Ok::<_, WorkerError>(output)
        }
    })
}

#[tokio::test]
async fn a_group_a_condition_and_a_fan_out_run_and_join() {
    let calls = Calls::default();
    let def = WorkflowBuilder::new("order")
        .step("validate", "validate")
        .parallel("checks", |g| {
            g.step("fraud", "fraud").step("address", "address")
        })
        .step("wrap", "wrap")
        .when("has(input.gift_wrap) && input.gift_wrap")
        .step("pack", "pack")
        .for_each("input.items")
        .max_concurrency(2)
        .step("ship", "ship")
        .build()
        .expect("valid");
    let c = calls.clone();
    let pack = from_fn("pack", move |item: Value, ctx: WorkerContext| {
        let c = c.clone();
        async move {
            c.push(format!("pack:{}", ctx.step));
            Ok::<_, WorkerError>(json!({"packed": item}))
        }
    });
    let c = calls.clone();
    let ship = from_fn("ship", move |_input: Value, ctx: WorkerContext| {
        let c = c.clone();
        async move {
            // The join sees every branch; the fan-out's output is in item order.
            let fraud: Value = ctx.output("fraud").await?;
            let address: Value = ctx.output("address").await?;
            let packed: Value = ctx.output("pack").await?;
            c.push("ship".to_string());
            Ok::<_, WorkerError>(json!({"fraud": fraud, "address": address, "packed": packed}))
        }
    });
    let rt = Runtime::builder()
        .workflow(def)
        .worker(echo(&calls, "validate", json!("ok")))
        .worker(echo(&calls, "fraud", json!({"score": 0.1})))
        .worker(echo(&calls, "address", json!({"valid": true})))
        .worker(echo(&calls, "wrap", json!("wrapped")))
        .worker(pack)
        .worker(ship)
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let tx = client
        .start("order", &json!({"items": ["a", "b", "c"]}))
        .await
        .expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Completed, "{state:?}");
    assert_eq!(
        state.step("wrap").map(|s| s.status),
        Some(StepStatus::Skipped)
    );
    assert_eq!(calls.count("wrap:wrap"), 0);
    let ship: Value = state.output("ship").expect("ship").parse().expect("json");
    assert_eq!(ship["fraud"]["score"], 0.1);
    assert_eq!(ship["address"]["valid"], true);
    assert_eq!(
        ship["packed"],
        json!([{"packed": "a"}, {"packed": "b"}, {"packed": "c"}])
    );
    for k in 0..3 {
        assert_eq!(calls.count(&format!("pack:pack[{k}]")), 1);
    }

    // With gift_wrap, the step runs.
    let tx = client
        .start("order", &json!({"items": [], "gift_wrap": true}))
        .await
        .expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Completed);
    assert_eq!(calls.count("wrap:wrap"), 1);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_failed_branch_interrupts_a_running_one_and_completed_steps_are_undone() {
    let calls = Calls::default();
    let interrupted = Arc::new(AtomicBool::new(false));
    let def = WorkflowBuilder::new("checks")
        .step("reserve", "reserve")
        .compensate_with("release")
        .parallel("checks", |g| {
            g.step("slow", "slow")
                .compensate_with("undo_slow")
                .step("fraud", "fraud")
        })
        .step("charge", "charge")
        .build()
        .expect("valid");
    let seen = interrupted.clone();
    let slow = from_fn("slow", move |_i: Value, ctx: WorkerContext| {
        let seen = seen.clone();
        async move {
            tokio::select! {
                _ = ctx.cancellation.cancelled() => {
                    seen.store(true, Ordering::SeqCst);
                    Err(WorkerError::fatal("interrupted"))
                }
                _ = tokio::time::sleep(Duration::from_secs(20)) => Ok(json!("slow done")),
            }
        }
    });
    let fraud = from_fn("fraud", |_i: Value, _ctx: WorkerContext| async move {
        // Let `slow` start first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err::<Value, _>(WorkerError::fatal("fraud suspected"))
    });
    let rt = Runtime::builder()
        .workflow(def)
        .worker(echo(&calls, "reserve", json!("r1")))
        .worker(echo(&calls, "release", json!(null)))
        .worker(echo(&calls, "undo_slow", json!(null)))
        .worker(echo(&calls, "charge", json!(null)))
        .worker(slow)
        .worker(fraud)
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let tx = client.start("checks", &json!({})).await.expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert!(
        interrupted.load(Ordering::SeqCst),
        "the running branch was not told"
    );
    assert_eq!(state.status, WorkflowStatus::Compensated);
    assert_eq!(calls.count("release:reserve"), 1);
    assert_eq!(
        calls.count("undo_slow:slow"),
        0,
        "the interrupted branch never completed"
    );
    assert_eq!(calls.count("charge:charge"), 0);
    rt.shutdown().await;
}

fn approval_runtime(calls: &Calls) -> RuntimeBuilder {
    let def = WorkflowBuilder::new("publish")
        .step("draft", "draft")
        .compensate_with("discard")
        .sleep("cool_off", Duration::from_millis(200))
        .wait_for_signal("approval", "approve")
        .signal_timeout(Duration::from_secs(30), OnTimeout::Fail)
        .step("publish", "publish")
        .input_from("approval")
        .build()
        .expect("valid");
    let c = calls.clone();
    let publish = from_fn("publish", move |approval: Value, _ctx: WorkerContext| {
        let c = c.clone();
        async move {
            c.push(format!("publish:{approval}"));
            Ok::<_, WorkerError>(approval)
        }
    });
    Runtime::builder()
        .workflow(def)
        .worker(echo(calls, "draft", json!("d")))
        .worker(echo(calls, "discard", json!(null)))
        .worker(publish)
}

#[tokio::test]
async fn a_signal_sent_while_sleeping_is_kept_and_completes_the_wait() {
    let calls = Calls::default();
    let rt = approval_runtime(&calls).start().await.expect("runtime");
    let client = rt.client();
    let tx = client.start("publish", &json!({})).await.expect("start");
    // Sent while the workflow still sleeps, before any step waits for it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .signal(tx, "approve", &json!({"by": "ana"}))
        .await
        .expect("signal kept");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Completed);
    assert_eq!(
        calls.all().last().map(String::as_str),
        Some(r#"publish:{"by":"ana"}"#)
    );
    // The sleep really waited.
    let slept = state
        .history
        .iter()
        .filter(|h| h.step.as_ref().is_some_and(|s| s == "cool_off"))
        .map(|h| h.at)
        .collect::<Vec<_>>();
    assert!(slept.last().expect("ended").since(slept[0]) >= Duration::from_millis(200));

    // A finished workflow refuses signals, saying why.
    let err = client
        .signal(tx, "approve", &json!(1))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Signal { .. }), "{err}");
    assert!(
        err.to_string().contains("the workflow is completed"),
        "{err}"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_signal_nobody_waits_for_is_refused_with_the_names_that_are() {
    let calls = Calls::default();
    let rt = approval_runtime(&calls).start().await.expect("runtime");
    let client = rt.client();
    let tx = client.start("publish", &json!({})).await.expect("start");
    let err = client
        .signal(tx, "aprove", &json!(1))
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("waits only for `approve`"),
        "{err}"
    );
    let err = client
        .signal(TransactionId::new(), "approve", &json!(1))
        .await
        .expect_err("no such workflow");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    client.cancel(tx, "test over").await.expect("cancel");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Cancelled);
    assert_eq!(calls.count("discard:draft"), 1);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_passed_deadline_times_the_workflow_out_and_undoes_it() {
    let calls = Calls::default();
    let def = WorkflowBuilder::new("slow")
        .deadline(Duration::from_millis(300))
        .step("a", "a")
        .compensate_with("undo_a")
        .wait_for_signal("never", "never")
        .build()
        .expect("valid");
    let rt = Runtime::builder()
        .workflow(def)
        .worker(echo(&calls, "a", json!(1)))
        .worker(echo(&calls, "undo_a", json!(null)))
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let tx = client.start("slow", &json!({})).await.expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::TimedOut);
    assert_eq!(calls.count("undo_a:a"), 1);
    rt.shutdown().await;
}

#[tokio::test]
async fn cancelling_tells_the_running_step_through_its_context() {
    let started = Arc::new(AtomicU32::new(0));
    let interrupted = Arc::new(AtomicBool::new(false));
    let def = WorkflowBuilder::new("long")
        .step("work", "long_work")
        .build()
        .expect("valid");
    let (s, i) = (started.clone(), interrupted.clone());
    let worker = from_fn("long_work", move |_input: Value, ctx: WorkerContext| {
        let (s, i) = (s.clone(), i.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            ctx.cancellation.cancelled().await;
            i.store(true, Ordering::SeqCst);
            Err::<Value, _>(WorkerError::fatal("stopped"))
        }
    });
    let rt = Runtime::builder()
        .workflow(def)
        .worker(worker)
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let tx = client.start("long", &json!({})).await.expect("start");
    while started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(client.cancel(tx, "no longer needed").await.expect("cancel"));
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Cancelled);
    assert!(interrupted.load(Ordering::SeqCst));
    rt.shutdown().await;
}

#[tokio::test]
async fn a_sub_workflow_runs_under_the_parents_correlation_and_is_compensated_with_it() {
    let calls = Calls::default();
    let child = WorkflowBuilder::new("shipping")
        .step("label", "label")
        .compensate_with("void_label")
        .build()
        .expect("valid");
    let parent = WorkflowBuilder::new("parent")
        .step("pay", "pay")
        .compensate_with("refund")
        .sub_workflow("ship", "shipping")
        .step("notify", "notify")
        .build()
        .expect("valid");
    let fail_notify = Arc::new(AtomicBool::new(false));
    let f = fail_notify.clone();
    let notify = from_fn("notify", move |_i: Value, ctx: WorkerContext| {
        let f = f.clone();
        async move {
            let shipped: Value = ctx.output("ship").await?;
            if f.load(Ordering::SeqCst) {
                return Err(WorkerError::fatal("mail server gone"));
            }
            Ok(shipped)
        }
    });
    let rt = Runtime::builder()
        .workflow(child)
        .workflow(parent)
        .worker(echo(&calls, "pay", json!("paid")))
        .worker(echo(&calls, "refund", json!(null)))
        .worker(echo(&calls, "label", json!("L-1")))
        .worker(echo(&calls, "void_label", json!(null)))
        .worker(notify)
        .start()
        .await
        .expect("runtime");
    let client = rt.client();

    let tx = client
        .start("parent", &json!({"order": 1}))
        .await
        .expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Completed, "{state:?}");
    let notified: Value = state
        .output("notify")
        .expect("notify")
        .parse()
        .expect("json");
    assert_eq!(notified, json!({"label": "L-1"}));

    fail_notify.store(true, Ordering::SeqCst);
    let tx = client
        .start("parent", &json!({"order": 2}))
        .await
        .expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Compensated, "{state:?}");
    assert_eq!(calls.count("void_label:label"), 1, "{:?}", calls.all());
    assert_eq!(calls.count("refund:pay"), 1);
    let child_tx = common::child_of(&state).expect("child started");
    let child_state = client.status(child_tx).await.expect("read").expect("child");
    assert_eq!(child_state.correlation_id, state.correlation_id);
    assert_eq!(child_state.status, WorkflowStatus::Compensated);
    assert_eq!(
        child_state.parent.as_ref().map(|p| p.transaction_id),
        Some(tx)
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_sub_workflow_that_is_not_registered_fails_its_step_with_the_reason() {
    let calls = Calls::default();
    let parent = WorkflowBuilder::new("parent")
        .step("pay", "pay")
        .compensate_with("refund")
        .sub_workflow("ship", "nowhere")
        .build()
        .expect("valid");
    let rt = Runtime::builder()
        .workflow(parent)
        .worker(echo(&calls, "pay", json!("paid")))
        .worker(echo(&calls, "refund", json!(null)))
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let tx = client.start("parent", &json!({})).await.expect("start");
    let state = client.wait(tx, WAIT).await.expect("finished");
    assert_eq!(state.status, WorkflowStatus::Compensated);
    let error = state
        .step("ship")
        .and_then(|s| s.last_error.clone())
        .expect("error");
    assert!(
        error.message.contains("no workflow definition `nowhere`"),
        "{error}"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn sub_workflows_that_start_each_other_are_refused_at_start() {
    let a = WorkflowBuilder::new("a")
        .sub_workflow("b", "b")
        .build()
        .expect("valid");
    let b = WorkflowBuilder::new("b")
        .sub_workflow("a", "a")
        .build()
        .expect("valid");
    let err = Runtime::builder()
        .workflow(a)
        .workflow(b)
        .start()
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("a → b → a"), "{err}");
}

//! The embedded runtime end to end: in-memory bus, memory and file stores.
#![cfg(feature = "embedded")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Effects, Order};
use multiagents::bus::{MemoryBus, RESULTS_TOPIC, Topics};
use multiagents::core::{Event, EventKind, Payload, StepStatus};
use multiagents::store::{FileStore, MemoryStore};
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{
    RetryPolicy, Runtime, RuntimeBuilder, WorkflowBuilder, WorkflowDefinition, WorkflowStatus,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn orders_definition() -> WorkflowDefinition {
    WorkflowBuilder::new("orders")
        .default_retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(5)))
        .step("validate", "validate_order")
        .step("reserve", "reserve_inventory")
        .compensate_with("release_inventory")
        .step("charge", "charge_payment")
        .compensate_with("refund_payment")
        .step("notify", "notify_customer")
        .build()
        .expect("valid definition")
}

/// Workers that record every side effect under its idempotency key.
fn with_workers(builder: RuntimeBuilder, effects: &Effects) -> RuntimeBuilder {
    let e = effects.clone();
    let builder = builder.worker(from_fn("validate_order", move |o: Order, ctx| {
        let e = e.clone();
        async move {
            e.record(ctx.idempotency_key());
            if o.amount_cents == 0 {
                return Err(WorkerError::fatal("empty order").with_kind("invalid"));
            }
            Ok(json!({"valid": true}))
        }
    }));
    let e = effects.clone();
    let builder = builder.worker(from_fn("reserve_inventory", move |o: Order, ctx| {
        let e = e.clone();
        async move {
            e.record(ctx.idempotency_key());
            Ok::<_, WorkerError>(json!({"reservation": format!("r-{}", o.id)}))
        }
    }));
    let e = effects.clone();
    let builder = builder.worker(from_fn("release_inventory", move |_o: Order, ctx| {
        let e = e.clone();
        async move {
            let reservation: serde_json::Value = ctx.output("reserve").await?;
            e.record(&format!(
                "{} {}",
                ctx.idempotency_key(),
                reservation["reservation"]
            ));
            Ok::<_, WorkerError>(json!({"released": true}))
        }
    }));
    let e = effects.clone();
    let builder = builder.worker(from_fn("charge_payment", move |o: Order, ctx| {
        let e = e.clone();
        async move {
            e.record(ctx.idempotency_key());
            if o.decline {
                return Err(WorkerError::fatal("card declined").with_kind("declined"));
            }
            Ok(json!({"charged": o.amount_cents}))
        }
    }));
    let e = effects.clone();
    let builder = builder.worker(from_fn("refund_payment", move |_o: Order, ctx| {
        let e = e.clone();
        async move {
            e.record(ctx.idempotency_key());
            Ok::<_, WorkerError>(json!({"refunded": true}))
        }
    }));
    let e = effects.clone();
    builder.worker(from_fn("notify_customer", move |_o: Order, ctx| {
        let e = e.clone();
        async move {
            e.record(ctx.idempotency_key());
            Ok::<_, WorkerError>(json!({"sent": true}))
        }
    }))
}

#[tokio::test]
async fn completes_a_workflow_and_passes_outputs_along() {
    let effects = Effects::default();
    let rt = with_workers(Runtime::builder().workflow(orders_definition()), &effects)
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client
        .start(
            "orders",
            &Order {
                id: 1,
                amount_cents: 500,
                decline: false,
            },
        )
        .await
        .expect("start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(
        done.status,
        WorkflowStatus::Completed,
        "{}",
        multiagents::timeline::render(&done)
    );
    assert_eq!(
        done.output("charge").expect("output").as_str(),
        r#"{"charged":500}"#
    );
    assert_eq!(effects.total(), 4);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_declined_payment_releases_the_inventory_exactly_once() {
    let effects = Effects::default();
    let rt = with_workers(Runtime::builder().workflow(orders_definition()), &effects)
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client
        .start(
            "orders",
            &Order {
                id: 2,
                amount_cents: 500,
                decline: true,
            },
        )
        .await
        .expect("start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(
        done.status,
        WorkflowStatus::Compensated,
        "{}",
        multiagents::timeline::render(&done)
    );
    // The release saw the reservation made by the forward step.
    assert_eq!(effects.count_matching("/reserve/compensate \"r-2\""), 1);
    assert_eq!(
        effects.count_matching("/charge/compensate"),
        0,
        "a failed step is not compensated"
    );
    assert_eq!(
        effects.count_matching("/notify/"),
        0,
        "nothing runs after the failure"
    );
    assert_eq!(effects.duplicates(), 0);
    assert_eq!(
        done.step("reserve").expect("step").status,
        StepStatus::Compensated
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_flaky_step_is_retried_and_succeeds() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("flaky")
                .step("try", "sometimes")
                .retry(RetryPolicy::attempts(4).with_initial_delay(Duration::from_millis(5)))
                .build()
                .expect("valid"),
        )
        .worker(from_fn("sometimes", move |_: serde_json::Value, ctx| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if ctx.attempt < 3 {
                    Err(WorkerError::retry("not yet"))
                } else {
                    Ok(ctx.attempt)
                }
            }
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client.start("flaky", &json!({})).await.expect("start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(done.status, WorkflowStatus::Completed);
    assert_eq!(done.output("try").expect("output").as_str(), "3");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_step_past_its_timeout_is_retried_then_compensated() {
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("slow")
                .step("book", "book")
                .compensate_with("unbook")
                .step("wait", "sleepy")
                .timeout(Duration::from_millis(50))
                .retry(RetryPolicy::attempts(2).with_initial_delay(Duration::from_millis(5)))
                .build()
                .expect("valid"),
        )
        .worker(from_fn("book", |_: serde_json::Value, _| async {
            Ok::<_, WorkerError>(1)
        }))
        .worker(from_fn("unbook", |_: serde_json::Value, _| async {
            Ok::<_, WorkerError>(0)
        }))
        .worker(from_fn("sleepy", |_: serde_json::Value, ctx| async move {
            ctx.cancellation.cancelled().await;
            Ok::<_, WorkerError>(())
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client.start("slow", &json!({})).await.expect("start");
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(
        done.status,
        WorkflowStatus::Compensated,
        "{}",
        multiagents::timeline::render(&done)
    );
    let wait = done.step("wait").expect("step");
    assert_eq!(wait.attempts, 2);
    assert_eq!(
        wait.last_error
            .as_ref()
            .and_then(|e| e.kind.as_ref().map(|k| k.as_str())),
        Some("timeout")
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn cancelling_compensates_what_completed() {
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("long")
                .step("book", "book")
                .compensate_with("unbook")
                .step("wait", "sleepy")
                .timeout(Duration::from_secs(60))
                .build()
                .expect("valid"),
        )
        .worker(from_fn("book", |_: serde_json::Value, _| async {
            Ok::<_, WorkerError>(1)
        }))
        .worker(from_fn("unbook", |_: serde_json::Value, _| async {
            Ok::<_, WorkerError>(0)
        }))
        .worker(from_fn("sleepy", |_: serde_json::Value, _| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, WorkerError>(())
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let tx = client.start("long", &json!({})).await.expect("start");
    // Wait until `wait` is running.
    for _ in 0..200 {
        let s = client.status(tx).await.expect("status").expect("exists");
        if matches!(
            s.step("wait").expect("step").status,
            StepStatus::Running { .. }
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        client
            .cancel(tx, "customer changed their mind")
            .await
            .expect("cancel")
    );
    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(
        done.status,
        WorkflowStatus::Cancelled,
        "{}",
        multiagents::timeline::render(&done)
    );
    assert_eq!(
        done.step("book").expect("step").status,
        StepStatus::Compensated
    );
    assert!(!client.cancel(tx, "again").await.expect("cancel"));
    rt.shutdown().await;
}

#[tokio::test]
async fn refuses_to_start_without_the_workers_a_workflow_needs() {
    let err = Runtime::builder()
        .workflow(orders_definition())
        .worker(from_fn("validate_order", |_: serde_json::Value, _| async {
            Ok::<_, WorkerError>(())
        }))
        .start()
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("step `reserve` of workflow `orders` runs worker `reserve_inventory`, which is not registered"), "{msg}");
}

#[tokio::test]
async fn unknown_workflows_and_transactions_are_reported() {
    let rt = Runtime::builder().start().await.expect("starts");
    let client = rt.client();
    let err = client.start("nope", &json!({})).await.expect_err("unknown");
    assert!(
        err.to_string().contains("no workflow definition `nope`"),
        "{err}"
    );
    let missing = multiagents::TransactionId::new();
    assert!(matches!(
        client.wait(missing, WAIT).await,
        Err(multiagents::Error::NotFound(_))
    ));
    rt.shutdown().await;
}

#[tokio::test]
async fn bad_results_are_dead_lettered_and_nothing_else_is_disturbed() {
    let bus = MemoryBus::new();
    let effects = Effects::default();
    let rt = with_workers(
        Runtime::builder()
            .bus(bus.clone())
            .workflow(orders_definition()),
        &effects,
    )
    .start()
    .await
    .expect("starts");
    let client = rt.client();
    // A result for a transaction nobody started.
    let mut stray = Event::new(
        EventKind::Result,
        Default::default(),
        Default::default(),
        "orders".into(),
        Payload::null(),
    );
    stray.step = Some("charge".into());
    bus.publish(RESULTS_TOPIC, stray).await.expect("publish");
    // An error whose payload is not an error.
    let tx = client
        .start(
            "orders",
            &Order {
                id: 3,
                amount_cents: 100,
                decline: false,
            },
        )
        .await
        .expect("start");
    let mut garbage = Event::new(
        EventKind::Error,
        tx,
        Default::default(),
        "orders".into(),
        Payload::to_json(&[1, 2]).expect("json"),
    );
    garbage.step = Some("validate".into());
    bus.publish(RESULTS_TOPIC, garbage).await.expect("publish");
    // A command on the results topic.
    let mut wrong = Event::new(
        EventKind::Command,
        tx,
        Default::default(),
        "orders".into(),
        Payload::null(),
    );
    wrong.step = Some("validate".into());
    bus.publish(RESULTS_TOPIC, wrong).await.expect("publish");

    let done = client.wait(tx, WAIT).await.expect("finishes");
    assert_eq!(done.status, WorkflowStatus::Completed);
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = client
            .dead_letters(10)
            .await
            .expect("dead letters")
            .into_iter()
            .map(|d| d.reason)
            .collect();
        if reasons.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        reasons.iter().any(|r| r.starts_with("unknown transaction")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("error payload is not")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unexpected Command event")),
        "{reasons:?}"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn an_embedded_run_stopped_midway_resumes_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let def = orders_definition();
    let tx = {
        // First life: no workers run, so every workflow stops at its first step.
        let rt = Runtime::builder()
            .store(FileStore::open(&path).expect("opens"))
            .workflow(def.clone())
            .external_workers()
            .start()
            .await
            .expect("starts");
        let client = rt.client();
        let tx = client
            .start(
                "orders",
                &Order {
                    id: 9,
                    amount_cents: 900,
                    decline: true,
                },
            )
            .await
            .expect("start");
        let s = client.status(tx).await.expect("status").expect("exists");
        assert!(matches!(
            s.step("validate").expect("step").status,
            StepStatus::Running { .. }
        ));
        rt.shutdown().await;
        tx
    };
    let store = FileStore::open(&path).expect("reopens");
    let effects = Effects::default();
    let rt = with_workers(Runtime::builder().store(store).workflow(def), &effects)
        .start()
        .await
        .expect("restarts");
    let done = rt.client().wait(tx, WAIT).await.expect("finishes");
    assert_eq!(
        done.status,
        WorkflowStatus::Compensated,
        "{}",
        multiagents::timeline::render(&done)
    );
    assert_eq!(effects.duplicates(), 0);
    rt.shutdown().await;
}

#[tokio::test]
async fn the_file_store_refuses_a_second_opener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let _first = FileStore::open(&path).expect("opens");
    let err = FileStore::open(&path).err().expect("refused");
    assert!(err.to_string().contains("open in another process"), "{err}");
}

#[tokio::test]
async fn many_workflows_at_once_all_finish() {
    let effects = Effects::default();
    let rt = with_workers(
        Runtime::builder()
            .store(MemoryStore::new())
            .workflow(orders_definition()),
        &effects,
    )
    .start()
    .await
    .expect("starts");
    let client = rt.client();
    let mut ids = Vec::new();
    for i in 0..500u64 {
        let order = Order {
            id: i,
            amount_cents: 100,
            decline: i % 10 == 0,
        };
        ids.push((i, client.start("orders", &order).await.expect("start")));
    }
    for (i, tx) in ids {
        let done = client.wait(tx, WAIT).await.expect("finishes");
        let expected = if i % 10 == 0 {
            WorkflowStatus::Compensated
        } else {
            WorkflowStatus::Completed
        };
        assert_eq!(done.status, expected);
    }
    assert_eq!(effects.duplicates(), 0);
    assert_eq!(effects.count_matching("/reserve/compensate"), 50);
    rt.shutdown().await;
}

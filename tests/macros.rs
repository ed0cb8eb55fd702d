//! `#[worker]`: what it generates, and the errors it gives when misused.

use multiagents::worker::testing::WorkerTest;
use multiagents::{Worker, WorkerContext, WorkerError, worker};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    amount_cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Charge {
    charge_id: String,
    amount_cents: u64,
}

/// Charges the card.
#[worker("process_payment")]
async fn process_payment(order: Order, ctx: WorkerContext) -> Result<Charge, WorkerError> {
    if order.amount_cents > 10_000 {
        return Err(WorkerError::fatal("over the limit").with_kind("declined"));
    }
    Ok(Charge {
        charge_id: format!("ch-{}-{}", order.id, ctx.attempt),
        amount_cents: order.amount_cents,
    })
}

#[worker]
async fn shout(text: String) -> Result<String, std::num::ParseIntError> {
    let n: u32 = text.parse()?;
    Ok(format!("{}!", n))
}

#[tokio::test]
async fn the_attribute_makes_a_worker_named_by_its_argument() {
    assert_eq!(process_payment.name(), "process_payment");
    assert_eq!(process_payment::NAME, "process_payment");
    let charge: Charge = WorkerTest::new(process_payment)
        .input(&Order {
            id: 7,
            amount_cents: 250,
        })
        .attempt(2)
        .run()
        .await
        .expect("runs");
    assert_eq!(
        charge,
        Charge {
            charge_id: "ch-7-2".into(),
            amount_cents: 250
        }
    );
}

#[tokio::test]
async fn the_function_stays_callable() {
    let ctx = WorkerContext::new("w", "s");
    let charge = process_payment::call(
        Order {
            id: 1,
            amount_cents: 1,
        },
        ctx,
    )
    .await
    .expect("runs");
    assert_eq!(charge.charge_id, "ch-1-1");
}

#[tokio::test]
async fn errors_keep_their_retry_directive() {
    let err = WorkerTest::new(process_payment)
        .input(&Order {
            id: 7,
            amount_cents: 20_000,
        })
        .run::<Charge>()
        .await
        .expect_err("declined");
    assert!(!err.is_retryable());
    assert_eq!(err.kind().map(|k| k.as_str()), Some("declined"));
    // Any std error converts into a retryable one.
    assert_eq!(shout.name(), "shout");
    let err = WorkerTest::new(shout)
        .input(&"x")
        .run::<String>()
        .await
        .expect_err("not a number");
    assert!(err.is_retryable());
    let out: String = WorkerTest::new(shout)
        .input(&"41")
        .run()
        .await
        .expect("runs");
    assert_eq!(out, "41!");
}

#[tokio::test]
async fn bad_input_fails_for_good_and_says_why() {
    let err = WorkerTest::new(process_payment)
        .input(&"not an order")
        .run::<Charge>()
        .await
        .expect_err("bad input");
    assert!(!err.is_retryable());
    assert_eq!(
        err.kind(),
        Some(&multiagents::core::StepErrorKind::InvalidInput)
    );
    assert!(
        err.message()
            .contains("input for worker `process_payment` does not decode"),
        "{err}"
    );
}

// The compile-fail cases (misuse refused with a clear message) are in
// `crates/multiagents-ui-tests`, checked against a small dependency tree.

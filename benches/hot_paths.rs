#![allow(missing_docs)]
//! Criterion micro-benchmarks of the hot paths: event encode/decode and one
//! saga transition (`apply`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use multiagents::core::saga::{self, Input};
use multiagents::core::{
    CorrelationId, Event, EventCodec, EventKind, Payload, Phase, StepName, Timestamp,
    TransactionId, WorkflowBuilder, WorkflowDefinition,
};

fn orders() -> WorkflowDefinition {
    WorkflowBuilder::new("orders")
        .step("validate", "validate_order")
        .step("reserve", "reserve_inventory")
        .compensate_with("release_inventory")
        .step("charge", "charge_payment")
        .compensate_with("refund_payment")
        .step("invoice", "create_invoice")
        .step("notify", "notify_customer")
        .build()
        .expect("valid")
}

fn command() -> Event {
    let mut e = Event::new(
        EventKind::Command,
        TransactionId::new(),
        CorrelationId::new(),
        "orders".into(),
        Payload::from_json_str(
            r#"{"input":{"n":42,"decline":false},"steps":{"validate":{"step":"validate","ok":true},"reserve":{"step":"reserve","ok":true}}}"#,
        )
        .expect("json"),
    );
    e.step = Some(StepName::new("charge"));
    e.deadline = Some(Timestamp(1_700_000_030_000));
    e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    e
}

fn codec(c: &mut Criterion) {
    let codec = EventCodec::default();
    let event = command();
    let bytes = codec.encode(&event).expect("encodes");
    c.bench_function("event_encode", |b| {
        b.iter(|| codec.encode(black_box(&event)).expect("encodes"))
    });
    c.bench_function("event_decode", |b| {
        b.iter(|| codec.decode(black_box(&bytes)).expect("decodes"))
    });
}

fn transitions(c: &mut Criterion) {
    let def = orders();
    let now = Timestamp(1_700_000_000_000);
    let input = Payload::from_json_str(r#"{"n":42,"decline":false}"#).expect("json");
    let output = Payload::from_json_str(r#"{"step":"x","ok":true}"#).expect("json");
    c.bench_function("saga_start", |b| {
        b.iter(|| {
            saga::start(
                &def,
                TransactionId::new(),
                CorrelationId::new(),
                input.clone(),
                now,
            )
        })
    });
    // One step result applied to a workflow two steps in (the middle of a run),
    // including the clone the runtime makes before applying.
    let (mut mid, _) = saga::start(
        &def,
        TransactionId::new(),
        CorrelationId::new(),
        input.clone(),
        now,
    );
    for step in ["validate", "reserve"] {
        let r = Input::Succeeded {
            step: step.into(),
            phase: Phase::Forward,
            attempt: 1,
            output: output.clone(),
        };
        saga::apply(&def, &mut mid, r, now);
    }
    let result = Input::Succeeded {
        step: "charge".into(),
        phase: Phase::Forward,
        attempt: 1,
        output: output.clone(),
    };
    c.bench_function("saga_apply_step_result", |b| {
        b.iter(|| {
            let mut s = mid.clone();
            saga::apply(&def, &mut s, black_box(result.clone()), now)
        })
    });
    c.bench_function("saga_apply_duplicate", |b| {
        let mut done = mid.clone();
        saga::apply(&def, &mut done, result.clone(), now);
        b.iter(|| saga::apply(&def, &mut done, black_box(result.clone()), now))
    });
    c.bench_function("saga_whole_workflow", |b| {
        b.iter(|| {
            let (mut s, _) = saga::start(
                &def,
                TransactionId::new(),
                CorrelationId::new(),
                input.clone(),
                now,
            );
            for step in ["validate", "reserve", "charge", "invoice", "notify"] {
                let r = Input::Succeeded {
                    step: step.into(),
                    phase: Phase::Forward,
                    attempt: 1,
                    output: output.clone(),
                };
                saga::apply(&def, &mut s, r, now);
            }
            s
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = codec, transitions
}
criterion_main!(benches);

//! Table tests for each saga rule, then property tests over random
//! interleavings, duplications and delays.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::*;
use crate::event::RetryDirective;
use crate::workflow::{RetryPolicy, WorkflowBuilder};

const T0: Timestamp = Timestamp(1_000_000);

pub(super) fn orders() -> WorkflowDefinition {
    WorkflowBuilder::new("orders")
        .default_retry(
            RetryPolicy::attempts(3)
                .with_jitter(0.0)
                .with_initial_delay(Duration::from_millis(100)),
        )
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

pub(super) fn begin(def: &WorkflowDefinition) -> (WorkflowState, Vec<Action>) {
    start(
        def,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::from_json_str(r#"{"order":1}"#).expect("json"),
        T0,
    )
}

pub(super) fn dispatches(actions: &[Action]) -> Vec<(String, Phase, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Dispatch(d) => Some((d.step.to_string(), d.phase, d.attempt)),
            _ => None,
        })
        .collect()
}

pub(super) fn ok(step: &str, attempt: u32) -> Input {
    Input::Succeeded {
        step: step.into(),
        phase: Phase::Forward,
        attempt,
        output: Payload::from_json_str(format!(r#"{{"step":"{step}"}}"#)).expect("json"),
    }
}

pub(super) fn comp_ok(step: &str, attempt: u32) -> Input {
    Input::Succeeded {
        step: step.into(),
        phase: Phase::Compensate,
        attempt,
        output: Payload::null(),
    }
}

pub(super) fn fail(step: &str, attempt: u32, retry: RetryDirective) -> Input {
    Input::Failed {
        step: step.into(),
        phase: Phase::Forward,
        attempt,
        error: StepError {
            message: "boom".into(),
            retry,
            kind: None,
        },
    }
}

pub(super) fn comp_fail(step: &str, attempt: u32, retry: RetryDirective) -> Input {
    Input::Failed {
        step: step.into(),
        phase: Phase::Compensate,
        attempt,
        error: StepError {
            message: "still boom".into(),
            retry,
            kind: None,
        },
    }
}

pub(super) fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

#[test]
fn starts_with_the_first_step_only() {
    let def = orders();
    let (state, actions) = begin(&def);
    assert_eq!(
        dispatches(&actions),
        vec![("validate".into(), Phase::Forward, 1)]
    );
    assert_eq!(state.status, WorkflowStatus::Running);
    assert_eq!(state.next_wakeup(), Some(T0.plus(Duration::from_secs(30))));
    assert!(actions.contains(&Action::Status(StatusUpdate::Started)));
}

#[test]
fn runs_steps_in_order_to_completion_and_passes_outputs() {
    let def = orders();
    let (mut s, _) = begin(&def);
    let names = ["validate", "reserve", "charge", "invoice", "notify"];
    for (n, name) in names.iter().enumerate() {
        let out = apply(&def, &mut s, ok(name, 1), at(n as u64));
        assert!(out.changed);
        if let Some(next) = names.get(n + 1) {
            let d = match &out.actions[..] {
                [Action::Status(_), Action::Dispatch(d)] => d,
                other => panic!("unexpected actions {other:?}"),
            };
            assert_eq!(d.step, *next);
            let doc: serde_json::Value = d.payload.parse().expect("json");
            assert_eq!(doc["input"]["order"], 1);
            assert_eq!(doc["steps"][name]["step"], *name, "{doc}");
            // Only the step it comes after: a command does not carry every
            // output before it (those are read from the store on demand).
            assert_eq!(doc["steps"].as_object().expect("map").len(), 1, "{doc}");
        }
    }
    assert_eq!(s.status, WorkflowStatus::Completed);
    assert_eq!(s.finished_at, Some(at(4)));
    assert_eq!(s.next_wakeup(), None);
}

#[test]
fn input_from_passes_an_earlier_output_as_input() {
    let def = WorkflowBuilder::new("w")
        .step("a", "x")
        .step("b", "y")
        .input_from("a")
        .build()
        .expect("valid");
    let (mut s, _) = begin(&def);
    let out = apply(&def, &mut s, ok("a", 1), at(1));
    let Some(Action::Dispatch(d)) = out
        .actions
        .iter()
        .find(|a| matches!(a, Action::Dispatch(_)))
    else {
        panic!("no dispatch")
    };
    let doc: serde_json::Value = d.payload.parse().expect("json");
    assert_eq!(doc["input"]["step"], "a");
}

#[test]
fn a_state_awaits_exactly_the_attempt_in_flight() {
    let def = orders();
    let (mut s, _) = begin(&def);
    assert!(s.awaits("validate", Phase::Forward, 1));
    assert!(!s.awaits("validate", Phase::Forward, 2), "never dispatched");
    assert!(!s.awaits("validate", Phase::Compensate, 1), "wrong phase");
    assert!(
        !s.awaits("reserve", Phase::Forward, 1),
        "not dispatched yet"
    );
    assert!(!s.awaits("teleport", Phase::Forward, 1), "no such step");
    assert!(apply(&def, &mut s, ok("validate", 1), at(1)).changed);
    assert!(!s.awaits("validate", Phase::Forward, 1), "answered");
    assert!(s.awaits("reserve", Phase::Forward, 1));
    // Attempt 1 fails and is retried: a late command for it is stale.
    assert!(
        apply(
            &def,
            &mut s,
            fail("reserve", 1, RetryDirective::Retry),
            at(2)
        )
        .changed
    );
    assert!(!s.awaits("reserve", Phase::Forward, 1), "waiting to retry");
    assert!(apply(&def, &mut s, Input::Tick, at(10_000)).changed);
    assert!(s.awaits("reserve", Phase::Forward, 2));
    assert!(!s.awaits("reserve", Phase::Forward, 1), "superseded");
    // Charge fails for good: reserve is compensated, attempt 1 of that.
    assert!(apply(&def, &mut s, ok("reserve", 2), at(10_001)).changed);
    assert!(
        apply(
            &def,
            &mut s,
            fail("charge", 1, RetryDirective::Never),
            at(10_002)
        )
        .changed
    );
    assert!(s.awaits("reserve", Phase::Compensate, 1));
    assert!(!s.awaits("reserve", Phase::Forward, 2), "answered");
    assert!(apply(&def, &mut s, comp_ok("reserve", 1), at(10_003)).changed);
    assert!(s.is_terminal());
    assert!(!s.awaits("reserve", Phase::Compensate, 1), "finished");
}

#[test]
fn duplicates_and_stale_results_change_nothing() {
    let def = orders();
    let (mut s, _) = begin(&def);
    assert!(apply(&def, &mut s, ok("validate", 1), at(1)).changed);
    let before = s.clone();
    // The same result again.
    assert_eq!(
        apply(&def, &mut s, ok("validate", 1), at(2)),
        Outcome::default()
    );
    // A result for a step that has not been dispatched.
    assert_eq!(
        apply(&def, &mut s, ok("invoice", 1), at(2)),
        Outcome::default()
    );
    // A result for an attempt that was never dispatched.
    assert_eq!(
        apply(&def, &mut s, ok("reserve", 2), at(2)),
        Outcome::default()
    );
    // A failure for an attempt that is not current.
    assert_eq!(
        apply(
            &def,
            &mut s,
            fail("reserve", 7, RetryDirective::Retry),
            at(2)
        ),
        Outcome::default()
    );
    // A step name that does not exist.
    assert_eq!(
        apply(&def, &mut s, ok("teleport", 1), at(2)),
        Outcome::default()
    );
    // A compensation result when nothing is compensating.
    assert_eq!(
        apply(&def, &mut s, comp_ok("reserve", 1), at(2)),
        Outcome::default()
    );
    // A tick before anything is due.
    assert_eq!(apply(&def, &mut s, Input::Tick, at(3)), Outcome::default());
    assert_eq!(s, before);
}

#[test]
fn retries_with_backoff_then_succeeds() {
    let def = orders();
    let (mut s, _) = begin(&def);
    let out = apply(
        &def,
        &mut s,
        fail("validate", 1, RetryDirective::Retry),
        at(10),
    );
    assert!(out.changed && dispatches(&out.actions).is_empty());
    assert_eq!(
        s.steps[0].status,
        StepStatus::RetryWaiting {
            attempt: 2,
            due: at(110)
        }
    );
    assert_eq!(s.next_wakeup(), Some(at(110)));
    assert!(!apply(&def, &mut s, Input::Tick, at(109)).changed);
    let out = apply(&def, &mut s, Input::Tick, at(110));
    assert_eq!(
        dispatches(&out.actions),
        vec![("validate".into(), Phase::Forward, 2)]
    );
    // Second failure doubles the delay.
    apply(
        &def,
        &mut s,
        fail("validate", 2, RetryDirective::Retry),
        at(120),
    );
    assert_eq!(
        s.steps[0].status,
        StepStatus::RetryWaiting {
            attempt: 3,
            due: at(320)
        }
    );
    apply(&def, &mut s, Input::Tick, at(320));
    let out = apply(&def, &mut s, ok("validate", 3), at(330));
    assert_eq!(
        dispatches(&out.actions),
        vec![("reserve".into(), Phase::Forward, 1)]
    );
}

#[test]
fn retry_after_sets_the_delay() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(
        &def,
        &mut s,
        fail("validate", 1, RetryDirective::RetryAfter(5_000)),
        at(0),
    );
    assert_eq!(
        s.steps[0].status,
        StepStatus::RetryWaiting {
            attempt: 2,
            due: at(5_000)
        }
    );
}

#[test]
fn late_success_of_an_earlier_attempt_completes_the_step() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(
        &def,
        &mut s,
        fail("validate", 1, RetryDirective::Retry),
        at(0),
    );
    apply(&def, &mut s, Input::Tick, at(100));
    let out = apply(&def, &mut s, ok("validate", 1), at(101));
    assert!(out.changed);
    assert_eq!(s.steps[0].status, StepStatus::Completed);
    // The retry's own success is now a duplicate.
    assert!(!apply(&def, &mut s, ok("validate", 2), at(102)).changed);
}

#[test]
fn deadline_counts_as_a_retryable_failure() {
    let def = WorkflowBuilder::new("w")
        .step("a", "x")
        .timeout(Duration::from_millis(50))
        .retry(RetryPolicy::attempts(2).with_jitter(0.0))
        .build()
        .expect("valid");
    let (mut s, _) = begin(&def);
    assert!(!apply(&def, &mut s, Input::Tick, at(49)).changed);
    apply(&def, &mut s, Input::Tick, at(50));
    assert!(matches!(
        s.steps[0].status,
        StepStatus::RetryWaiting { attempt: 2, .. }
    ));
    assert_eq!(
        s.steps[0]
            .last_error
            .as_ref()
            .and_then(|e| e.kind.as_ref().map(|k| k.as_str())),
        Some("timeout")
    );
    apply(&def, &mut s, Input::Tick, at(150));
    apply(&def, &mut s, Input::Tick, at(200));
    assert_eq!(s.status, WorkflowStatus::Failed);
}

#[test]
fn a_fatal_failure_compensates_completed_steps_in_reverse_order() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    apply(&def, &mut s, ok("reserve", 1), at(2));
    apply(&def, &mut s, ok("charge", 1), at(3));
    let out = apply(
        &def,
        &mut s,
        fail("invoice", 1, RetryDirective::Never),
        at(4),
    );
    assert_eq!(s.status, WorkflowStatus::Compensating);
    // charge is undone first, reserve only after it.
    assert_eq!(
        dispatches(&out.actions),
        vec![("charge".into(), Phase::Compensate, 1)]
    );
    let out = apply(&def, &mut s, comp_ok("charge", 1), at(5));
    assert_eq!(
        dispatches(&out.actions),
        vec![("reserve".into(), Phase::Compensate, 1)]
    );
    let out = apply(&def, &mut s, comp_ok("reserve", 1), at(6));
    assert_eq!(s.status, WorkflowStatus::Compensated);
    assert!(
        out.actions
            .contains(&Action::Status(StatusUpdate::Finished {
                status: WorkflowStatus::Compensated
            }))
    );
    assert_eq!(s.steps[3].status, StepStatus::Failed);
    assert_eq!(s.steps[4].status, StepStatus::Cancelled);
    assert!(matches!(&s.failure, Some(Failure::StepFailed { step, .. }) if step == "invoice"));
    // Nothing more happens once terminal.
    assert_eq!(
        apply(&def, &mut s, comp_ok("reserve", 1), at(7)),
        Outcome::default()
    );
    assert_eq!(
        apply(&def, &mut s, Input::Tick, at(1_000_000)),
        Outcome::default()
    );
}

#[test]
fn exhausting_retries_fails_for_good() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    apply(&def, &mut s, ok("reserve", 1), at(2));
    for attempt in 1..=3 {
        apply(
            &def,
            &mut s,
            fail("charge", attempt, RetryDirective::Retry),
            at(10 * attempt as u64),
        );
        apply(&def, &mut s, Input::Tick, at(10_000 * attempt as u64));
    }
    assert_eq!(s.steps[2].status, StepStatus::Failed);
    assert_eq!(s.steps[2].attempts, 3);
    assert_eq!(
        s.steps[1].status,
        StepStatus::Compensating {
            attempt: 1,
            dispatched_at: at(30),
            deadline: at(30_030)
        }
    );
}

#[test]
fn failing_with_nothing_to_compensate_ends_failed() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(
        &def,
        &mut s,
        fail("validate", 1, RetryDirective::Never),
        at(1),
    );
    assert_eq!(s.status, WorkflowStatus::Failed);
    assert!(s.finished_at.is_some());
}

#[test]
fn compensation_is_retried_then_dead_lettered() {
    let def = WorkflowBuilder::new("w")
        .step("a", "x")
        .compensate_with("undo_x")
        .compensation_retry(RetryPolicy::attempts(2).with_jitter(0.0))
        .step("b", "y")
        .build()
        .expect("valid");
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("a", 1), at(1));
    apply(&def, &mut s, fail("b", 1, RetryDirective::Never), at(2));
    apply(
        &def,
        &mut s,
        comp_fail("a", 1, RetryDirective::Retry),
        at(3),
    );
    assert!(matches!(
        s.steps[0].status,
        StepStatus::CompensationRetryWaiting { attempt: 2, .. }
    ));
    let out = apply(&def, &mut s, Input::Tick, at(1_000));
    assert_eq!(
        dispatches(&out.actions),
        vec![("a".into(), Phase::Compensate, 2)]
    );
    let out = apply(
        &def,
        &mut s,
        comp_fail("a", 2, RetryDirective::Retry),
        at(1_001),
    );
    assert_eq!(s.status, WorkflowStatus::CompensationFailed);
    assert!(out.actions.iter().any(|a| matches!(a, Action::DeadLetter { step, reason } if step == "a" && reason.contains("still boom"))));
}

#[test]
fn compensation_goes_on_past_a_failed_one() {
    let def = orders();
    let (mut s, _) = begin(&def);
    for (n, step) in ["validate", "reserve", "charge"].iter().enumerate() {
        apply(&def, &mut s, ok(step, 1), at(n as u64));
    }
    apply(
        &def,
        &mut s,
        fail("invoice", 1, RetryDirective::Never),
        at(5),
    );
    let out = apply(
        &def,
        &mut s,
        comp_fail("charge", 1, RetryDirective::Never),
        at(6),
    );
    assert_eq!(
        dispatches(&out.actions),
        vec![("reserve".into(), Phase::Compensate, 1)]
    );
    apply(&def, &mut s, comp_ok("reserve", 1), at(7));
    assert_eq!(s.status, WorkflowStatus::CompensationFailed);
    assert_eq!(s.steps[1].status, StepStatus::Compensated);
}

#[test]
fn cancellation_compensates_and_ends_cancelled() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    apply(&def, &mut s, ok("reserve", 1), at(2));
    // charge is in flight: its compensation waits for its outcome.
    let out = apply(
        &def,
        &mut s,
        Input::Cancel {
            reason: "customer asked".into(),
        },
        at(3),
    );
    assert!(dispatches(&out.actions).is_empty());
    assert_eq!(s.status, WorkflowStatus::Compensating);
    let out = apply(&def, &mut s, ok("charge", 1), at(4));
    assert_eq!(
        dispatches(&out.actions),
        vec![("charge".into(), Phase::Compensate, 1)]
    );
    apply(&def, &mut s, comp_ok("charge", 1), at(5));
    apply(&def, &mut s, comp_ok("reserve", 1), at(6));
    assert_eq!(s.status, WorkflowStatus::Cancelled);
    assert!(
        !apply(
            &def,
            &mut s,
            Input::Cancel {
                reason: "again".into()
            },
            at(7)
        )
        .changed
    );
}

#[test]
fn a_step_failing_while_compensating_is_not_retried() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    apply(
        &def,
        &mut s,
        Input::Cancel {
            reason: "stop".into(),
        },
        at(2),
    );
    let out = apply(
        &def,
        &mut s,
        fail("reserve", 1, RetryDirective::Retry),
        at(3),
    );
    assert!(dispatches(&out.actions).is_empty());
    assert_eq!(s.status, WorkflowStatus::Cancelled);
}

#[test]
fn independent_branches_are_compensated_in_parallel() {
    // a → {b, c} → d
    let def = WorkflowBuilder::new("fan")
        .step("a", "x")
        .compensate_with("undo_a")
        .step("b", "x")
        .compensate_with("undo_b")
        .after(["a"])
        .step("c", "x")
        .compensate_with("undo_c")
        .after(["a"])
        .step("d", "x")
        .after(["b", "c"])
        .build()
        .expect("valid");
    let (mut s, _) = begin(&def);
    let out = apply(&def, &mut s, ok("a", 1), at(1));
    assert_eq!(dispatches(&out.actions).len(), 2, "b and c start together");
    apply(&def, &mut s, ok("b", 1), at(2));
    apply(&def, &mut s, ok("c", 1), at(3));
    let out = apply(&def, &mut s, fail("d", 1, RetryDirective::Never), at(4));
    let set: BTreeSet<_> = dispatches(&out.actions).into_iter().map(|d| d.0).collect();
    assert_eq!(set, ["b".to_string(), "c".to_string()].into());
    let out = apply(&def, &mut s, comp_ok("b", 1), at(5));
    assert!(dispatches(&out.actions).is_empty(), "a waits for c");
    let out = apply(&def, &mut s, comp_ok("c", 1), at(6));
    assert_eq!(
        dispatches(&out.actions),
        vec![("a".into(), Phase::Compensate, 1)]
    );
}

#[test]
fn redispatch_republishes_in_flight_commands_with_the_same_attempt() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    assert!(
        !apply(
            &def,
            &mut s,
            Input::Redispatch {
                dispatched_before: at(0)
            },
            at(5)
        )
        .changed
    );
    let out = apply(
        &def,
        &mut s,
        Input::Redispatch {
            dispatched_before: at(1),
        },
        at(5),
    );
    assert_eq!(
        dispatches(&out.actions),
        vec![("reserve".into(), Phase::Forward, 1)]
    );
    // Recorded as re-published now, so a sweep does not repeat it at once.
    assert!(
        !apply(
            &def,
            &mut s,
            Input::Redispatch {
                dispatched_before: at(4)
            },
            at(6)
        )
        .changed
    );
}

#[test]
fn a_null_output_survives_a_round_trip() {
    let def = orders();
    let (mut s, _) = begin(&def);
    let input = Input::Succeeded {
        step: "validate".into(),
        phase: Phase::Forward,
        attempt: 1,
        output: Payload::null(),
    };
    apply(&def, &mut s, input, at(1));
    let back: WorkflowState =
        serde_json::from_str(&serde_json::to_string(&s).expect("json")).expect("json");
    assert_eq!(back.steps[0].output, Some(Payload::null()));
    assert_eq!(back, s);
}

#[test]
fn state_round_trips_through_json() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    apply(
        &def,
        &mut s,
        fail("reserve", 1, RetryDirective::Retry),
        at(2),
    );
    let text = serde_json::to_string(&s).expect("serializes");
    let back: WorkflowState = serde_json::from_str(&text).expect("deserializes");
    assert_eq!(back, s);
}

// The property tests, over definitions that mix every kind of step (plain
// sequential and branching ones included), are in `power_tests.rs`.

#[test]
fn history_tells_the_whole_story() {
    let def = orders();
    let (mut s, _) = begin(&def);
    apply(&def, &mut s, ok("validate", 1), at(1));
    apply(
        &def,
        &mut s,
        fail("reserve", 1, RetryDirective::Retry),
        at(2),
    );
    apply(&def, &mut s, Input::Tick, at(200));
    apply(&def, &mut s, ok("reserve", 2), at(201));
    apply(
        &def,
        &mut s,
        fail("charge", 1, RetryDirective::Never),
        at(202),
    );
    apply(&def, &mut s, comp_ok("reserve", 1), at(203));
    let kinds: HashMap<String, usize> = s.history.iter().fold(HashMap::new(), |mut m, h| {
        let k = serde_json::to_value(&h.event).expect("json")["event"]
            .as_str()
            .unwrap_or("")
            .to_string();
        *m.entry(k).or_default() += 1;
        m
    });
    assert_eq!(kinds["started"], 1);
    assert_eq!(kinds["retry_scheduled"], 1);
    assert_eq!(kinds["failed"], 1);
    assert_eq!(kinds["compensated"], 1);
    assert_eq!(kinds["finished"], 1);
    assert_eq!(s.status, WorkflowStatus::Compensated);
}

#[test]
fn a_command_carries_the_outputs_it_comes_after_up_to_the_budget_smallest_first() {
    let def = WorkflowBuilder::new("fan-in")
        .step("a", "x")
        .step("b", "x")
        .after(Vec::<String>::new())
        .step("c", "x")
        .after(Vec::<String>::new())
        .step("join", "y")
        .after(["a", "b", "c"])
        .build()
        .expect("valid");
    let (mut s, actions) = begin(&def);
    assert_eq!(dispatches(&actions).len(), 3, "a, b and c start together");
    let big = |n: usize| Payload::to_json(&"x".repeat(n)).expect("json");
    let outputs = [("a", big(40_000)), ("b", big(100)), ("c", big(30_000))];
    let mut last = Vec::new();
    for (i, (step, output)) in outputs.iter().enumerate() {
        let input = Input::Succeeded {
            step: StepName::new(*step),
            phase: Phase::Forward,
            attempt: 1,
            output: output.clone(),
        };
        last = apply(&def, &mut s, input, at(1 + i as u64)).actions;
    }
    let d = last
        .iter()
        .find_map(|a| match a {
            Action::Dispatch(d) => Some(d),
            _ => None,
        })
        .expect("join is dispatched");
    assert_eq!(d.step, "join");
    let doc: serde_json::Value = d.payload.parse().expect("json");
    let carried = doc["steps"].as_object().expect("map");
    // 70 KB of outputs do not fit 64 KiB: the smallest that do are carried,
    // and `a` is read from the store when asked for.
    let mut names: Vec<&str> = carried.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["b", "c"], "{carried:?}");
    assert!(d.payload.len() <= CARRIED_BYTES + 1_000);
}

//! Table tests for parallel groups, conditions, fan-out, sleeps, signals,
//! deadlines, sub-workflows and interrupts.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::event::RetryDirective;
use crate::workflow::{OnTimeout, RetryPolicy, WorkflowBuilder};

const T0: Timestamp = Timestamp(5_000_000);

fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

fn begin_with(def: &WorkflowDefinition, input: serde_json::Value) -> (WorkflowState, Vec<Action>) {
    start(
        def,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::to_json(&input).expect("json"),
        T0,
    )
}

fn ok(step: &str, attempt: u32, output: serde_json::Value) -> Input {
    Input::Succeeded {
        step: step.into(),
        phase: Phase::Forward,
        attempt,
        output: Payload::to_json(&output).expect("json"),
    }
}

fn comp_ok(step: &str, attempt: u32) -> Input {
    Input::Succeeded {
        step: step.into(),
        phase: Phase::Compensate,
        attempt,
        output: Payload::null(),
    }
}

fn fatal(step: &str, attempt: u32) -> Input {
    Input::Failed {
        step: step.into(),
        phase: Phase::Forward,
        attempt,
        error: StepError {
            message: "no".into(),
            retry: RetryDirective::Never,
            kind: None,
        },
    }
}

fn dispatched(actions: &[Action]) -> Vec<(String, Phase)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Dispatch(d) => Some((d.step.to_string(), d.phase)),
            _ => None,
        })
        .collect()
}

fn fwd(names: &[&str]) -> Vec<(String, Phase)> {
    names
        .iter()
        .map(|n| (n.to_string(), Phase::Forward))
        .collect()
}

fn interrupts(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Interrupt { step, .. } => Some(step.to_string()),
            _ => None,
        })
        .collect()
}

fn order() -> WorkflowDefinition {
    WorkflowBuilder::new("order")
        .step("validate", "validate_order")
        .compensate_with("unvalidate")
        .parallel("checks", |g| {
            g.step("fraud", "fraud_check")
                .step("address", "address_check")
                .compensate_with("forget_address")
        })
        .step("wrap", "gift_wrap")
        .when("has(input.gift_wrap) && input.gift_wrap")
        .step("charge", "charge_payment")
        .build()
        .expect("valid")
}

#[test]
fn a_group_runs_at_once_and_the_join_sees_every_branch() {
    let def = order();
    let (mut s, _) = begin_with(&def, json!({}));
    let out = apply(&def, &mut s, ok("validate", 1, json!(1)), at(1));
    assert_eq!(dispatched(&out.actions), fwd(&["fraud", "address"]));
    let out = apply(&def, &mut s, ok("address", 1, json!("a")), at(2));
    assert!(
        dispatched(&out.actions).is_empty(),
        "the join waits for fraud"
    );
    let out = apply(&def, &mut s, ok("fraud", 1, json!("f")), at(3));
    // `wrap` is skipped (no gift_wrap), so `charge` goes out at once and sees both branches.
    let charge = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::Dispatch(d) => Some(d),
            _ => None,
        })
        .expect("charge dispatched");
    assert_eq!(charge.step, "charge");
    let doc: serde_json::Value = charge.payload.parse().expect("json");
    assert_eq!(doc["steps"]["fraud"], "f");
    assert_eq!(doc["steps"]["address"], "a");
    assert!(
        out.actions
            .contains(&Action::Status(StatusUpdate::StepSkipped {
                step: "wrap".into()
            }))
    );
    assert_eq!(s.step("wrap").map(|w| w.status), Some(StepStatus::Skipped));
    apply(&def, &mut s, ok("charge", 1, json!(null)), at(4));
    assert_eq!(s.status, WorkflowStatus::Completed);
}

#[test]
fn a_condition_that_holds_runs_the_step() {
    let def = order();
    let (mut s, _) = begin_with(&def, json!({"gift_wrap": true}));
    apply(&def, &mut s, ok("validate", 1, json!(1)), at(1));
    apply(&def, &mut s, ok("address", 1, json!("a")), at(2));
    let out = apply(&def, &mut s, ok("fraud", 1, json!("f")), at(3));
    assert_eq!(dispatched(&out.actions), fwd(&["wrap"]));
}

#[test]
fn a_condition_that_cannot_be_evaluated_fails_the_step_for_good() {
    let def = WorkflowBuilder::new("w")
        .step("a", "x")
        .when("input.flag")
        .build()
        .expect("valid");
    let (s, actions) = begin_with(&def, json!({"flag": "yes"}));
    assert!(dispatched(&actions).is_empty());
    assert_eq!(s.status, WorkflowStatus::Failed);
    let error = s.steps[0].last_error.as_ref().expect("error");
    assert_eq!(error.kind.as_ref().map(|k| k.as_str()), Some("condition"));
    assert!(error.message.contains("not true or false"), "{error}");
}

#[test]
fn a_failing_branch_interrupts_the_others_and_everything_completed_is_undone() {
    let def = order();
    let (mut s, _) = begin_with(&def, json!({}));
    apply(&def, &mut s, ok("validate", 1, json!(1)), at(1));
    let out = apply(&def, &mut s, fatal("fraud", 1), at(2));
    assert_eq!(interrupts(&out.actions), vec!["address".to_string()]);
    assert_eq!(s.status, WorkflowStatus::Compensating);
    // The interrupted branch finished anyway: it is undone, then validate.
    let out = apply(&def, &mut s, ok("address", 1, json!("a")), at(3));
    assert_eq!(
        dispatched(&out.actions),
        vec![("address".to_string(), Phase::Compensate)]
    );
    let out = apply(&def, &mut s, comp_ok("address", 1), at(4));
    assert_eq!(
        dispatched(&out.actions),
        vec![("validate".to_string(), Phase::Compensate)]
    );
    apply(&def, &mut s, comp_ok("validate", 1), at(5));
    assert_eq!(s.status, WorkflowStatus::Compensated);
}

fn packing(max: u32) -> WorkflowDefinition {
    WorkflowBuilder::new("packing")
        .step("pack", "pack_item")
        .compensate_with("unpack_item")
        .for_each("input.items")
        .max_concurrency(max)
        .step("ship", "ship")
        .build()
        .expect("valid")
}

#[test]
fn a_fan_out_runs_one_branch_per_item_within_its_bound_and_keeps_their_order() {
    let def = packing(2);
    let (mut s, actions) = begin_with(&def, json!({"items": ["a", "b", "c"]}));
    assert_eq!(dispatched(&actions), fwd(&["pack[0]", "pack[1]"]));
    let Some(Action::Dispatch(first)) = actions.iter().find(|a| matches!(a, Action::Dispatch(_)))
    else {
        panic!("no dispatch")
    };
    let doc: serde_json::Value = first.payload.parse().expect("json");
    assert_eq!(doc["input"], "a", "a branch gets its item as input");
    let out = apply(&def, &mut s, ok("pack[1]", 1, json!("B")), at(1));
    assert_eq!(dispatched(&out.actions), fwd(&["pack[2]"]));
    apply(&def, &mut s, ok("pack[2]", 1, json!("C")), at(2));
    let out = apply(&def, &mut s, ok("pack[0]", 1, json!("A")), at(3));
    assert_eq!(dispatched(&out.actions), fwd(&["ship"]));
    assert_eq!(
        s.output("pack")
            .map(|p| p.parse::<serde_json::Value>().expect("json")),
        Some(json!(["A", "B", "C"]))
    );
    assert_eq!(
        s.step("pack[1]").map(|b| b.status),
        Some(StepStatus::Completed)
    );
}

#[test]
fn an_empty_fan_out_completes_at_once() {
    let def = packing(2);
    let (s, actions) = begin_with(&def, json!({"items": []}));
    assert_eq!(dispatched(&actions), fwd(&["ship"]));
    assert_eq!(
        s.output("pack").map(|p| p.as_str().to_string()),
        Some("[]".into())
    );
}

#[test]
fn a_failed_branch_stops_the_fan_out_and_completed_branches_are_undone() {
    let def = packing(2);
    let (mut s, _) = begin_with(&def, json!({"items": ["a", "b", "c"]}));
    apply(&def, &mut s, ok("pack[0]", 1, json!("A")), at(1));
    let out = apply(&def, &mut s, fatal("pack[1]", 1), at(2));
    // pack[2] was running (started when pack[0] finished): interrupted; the
    // branches are independent, so pack[0] is undone at once.
    assert_eq!(interrupts(&out.actions), vec!["pack[2]".to_string()]);
    assert_eq!(
        dispatched(&out.actions),
        vec![("pack[0]".to_string(), Phase::Compensate)]
    );
    apply(&def, &mut s, comp_ok("pack[0]", 1), at(3));
    assert_eq!(
        s.status,
        WorkflowStatus::Compensating,
        "pack[2] is still out"
    );
    apply(&def, &mut s, fatal("pack[2]", 1), at(4));
    assert_eq!(s.status, WorkflowStatus::Compensated);
    assert_eq!(s.steps[0].status, StepStatus::Failed);
}

#[test]
fn a_sleep_is_a_durable_timer() {
    let def = WorkflowBuilder::new("w")
        .sleep("nap", Duration::from_secs(60))
        .step("after", "x")
        .build()
        .expect("valid");
    let (s, actions) = begin_with(&def, json!({}));
    assert!(dispatched(&actions).is_empty());
    assert_eq!(s.next_wakeup(), Some(at(60_000)));
    // The state survives a round trip (a restart) with its timer.
    let mut s: WorkflowState =
        serde_json::from_str(&serde_json::to_string(&s).expect("json")).expect("json");
    assert_eq!(
        apply(&def, &mut s, Input::Tick, at(59_999)),
        Outcome::default()
    );
    let out = apply(&def, &mut s, Input::Tick, at(60_000));
    assert_eq!(dispatched(&out.actions), fwd(&["after"]));
}

fn approval(on_timeout: OnTimeout) -> WorkflowDefinition {
    WorkflowBuilder::new("w")
        .step("draft", "draft")
        .compensate_with("discard")
        .wait_for_signal("approval", "approve")
        .signal_timeout(Duration::from_secs(600), on_timeout)
        .step("publish", "publish")
        .input_from("approval")
        .build()
        .expect("valid")
}

fn signal(name: &str, payload: serde_json::Value) -> Input {
    Input::Signal {
        name: name.into(),
        payload: Payload::to_json(&payload).expect("json"),
    }
}

#[test]
fn a_signal_completes_the_waiting_step_with_its_payload() {
    let def = approval(OnTimeout::Fail);
    let (mut s, _) = begin_with(&def, json!({}));
    apply(&def, &mut s, ok("draft", 1, json!(1)), at(1));
    assert!(matches!(s.steps[1].status, StepStatus::Waiting { .. }));
    assert_eq!(s.next_wakeup(), Some(at(1 + 600_000)));
    // A signal nobody waits for is refused.
    assert_eq!(
        apply(&def, &mut s, signal("nope", json!(1)), at(2)),
        Outcome::default()
    );
    let out = apply(&def, &mut s, signal("approve", json!({"by": "ana"})), at(3));
    let d = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::Dispatch(d) => Some(d),
            _ => None,
        })
        .expect("publish dispatched");
    let doc: serde_json::Value = d.payload.parse().expect("json");
    assert_eq!(doc["input"], json!({"by": "ana"}));
}

#[test]
fn a_signal_sent_before_the_wait_is_kept_for_it() {
    let def = approval(OnTimeout::Fail);
    let (mut s, _) = begin_with(&def, json!({}));
    assert!(apply(&def, &mut s, signal("approve", json!("early")), at(1)).changed);
    assert_eq!(s.signals.len(), 1);
    let out = apply(&def, &mut s, ok("draft", 1, json!(1)), at(2));
    assert_eq!(dispatched(&out.actions), fwd(&["publish"]));
    assert!(s.signals.is_empty());
    assert_eq!(
        s.output("approval").map(|p| p.as_str().to_string()),
        Some("\"early\"".into())
    );
}

#[test]
fn a_signal_wait_that_times_out_fails_or_takes_the_default() {
    let def = approval(OnTimeout::Fail);
    let (mut s, _) = begin_with(&def, json!({}));
    apply(&def, &mut s, ok("draft", 1, json!(1)), at(1));
    let out = apply(&def, &mut s, Input::Tick, at(1 + 600_000));
    assert_eq!(
        dispatched(&out.actions),
        vec![("draft".to_string(), Phase::Compensate)]
    );
    assert_eq!(
        s.steps[1]
            .last_error
            .as_ref()
            .and_then(|e| e.kind.as_ref().map(|k| k.as_str())),
        Some("signal_timeout")
    );

    let def = approval(OnTimeout::Default(json!({"approved": false})));
    let (mut s, _) = begin_with(&def, json!({}));
    apply(&def, &mut s, ok("draft", 1, json!(1)), at(1));
    let out = apply(&def, &mut s, Input::Tick, at(1 + 600_000));
    assert_eq!(dispatched(&out.actions), fwd(&["publish"]));
}

#[test]
fn a_passed_deadline_stops_the_workflow_and_undoes_it() {
    let def = WorkflowBuilder::new("w")
        .deadline(Duration::from_secs(10))
        .step("a", "x")
        .compensate_with("undo_a")
        .step("b", "y")
        .build()
        .expect("valid");
    let (mut s, _) = begin_with(&def, json!({}));
    apply(&def, &mut s, ok("a", 1, json!(1)), at(1));
    assert_eq!(s.next_wakeup(), Some(at(10_000)));
    let out = apply(&def, &mut s, Input::Tick, at(10_000));
    assert_eq!(interrupts(&out.actions), vec!["b".to_string()]);
    // b answers late; a is undone.
    let out = apply(&def, &mut s, ok("b", 1, json!(2)), at(10_001));
    assert_eq!(
        dispatched(&out.actions),
        vec![("a".to_string(), Phase::Compensate)]
    );
    apply(&def, &mut s, comp_ok("a", 1), at(10_002));
    assert_eq!(s.status, WorkflowStatus::TimedOut);
}

#[test]
fn cancelling_interrupts_steps_in_flight() {
    let def = order();
    let (mut s, _) = begin_with(&def, json!({}));
    apply(&def, &mut s, ok("validate", 1, json!(1)), at(1));
    let out = apply(
        &def,
        &mut s,
        Input::Cancel {
            reason: "user".into(),
        },
        at(2),
    );
    let mut stopped = interrupts(&out.actions);
    stopped.sort();
    assert_eq!(stopped, vec!["address".to_string(), "fraud".to_string()]);
}

fn parent_def() -> WorkflowDefinition {
    WorkflowBuilder::new("parent")
        .step("pay", "pay")
        .compensate_with("refund")
        .sub_workflow("ship", "shipping")
        .step("notify", "notify")
        .retry(RetryPolicy::attempts(1))
        .build()
        .expect("valid")
}

fn child_def() -> WorkflowDefinition {
    WorkflowBuilder::new("shipping")
        .step("label", "print_label")
        .compensate_with("void_label")
        .build()
        .expect("valid")
}

#[test]
fn a_sub_workflow_runs_and_is_undone_when_its_step_is_compensated() {
    let def = parent_def();
    let (mut s, _) = begin_with(&def, json!({"order": 7}));
    let out = apply(&def, &mut s, ok("pay", 1, json!("paid")), at(1));
    let start_child = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::StartChild(c) => Some(c.clone()),
            _ => None,
        })
        .expect("child started");
    assert_eq!(start_child.workflow, "shipping");
    assert_eq!(start_child.parent.step, "ship");
    assert_eq!(start_child.parent.depth, 1);
    assert_eq!(start_child.input.as_str(), r#"{"order":7}"#);

    // The child, on its own.
    let child = child_def();
    let (mut c, _) = start_child_state(&child, &start_child);
    let out = apply(&child, &mut c, ok("label", 1, json!("L1")), at(2));
    let Some(Action::NotifyParent(done)) = out.actions.last().cloned() else {
        panic!("the parent is not told: {:?}", out.actions)
    };
    assert_eq!(done.phase, Phase::Forward);
    let output = done.result.clone().expect("completed");
    assert_eq!(output.as_str(), r#"{"label":"L1"}"#);

    // Back in the parent: the step completes with the child's outputs.
    apply(
        &def,
        &mut s,
        Input::Succeeded {
            step: "ship".into(),
            phase: Phase::Forward,
            attempt: 1,
            output,
        },
        at(3),
    );
    // notify fails: ship is undone by undoing the child, then pay is refunded.
    let out = apply(&def, &mut s, fatal("notify", 1), at(4));
    let undo = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::UndoChild {
                transaction_id,
                parent,
            } => Some((*transaction_id, parent.clone())),
            _ => None,
        })
        .expect("child undone");
    assert_eq!(undo.0, start_child.transaction_id);
    let out = apply(
        &child,
        &mut c,
        Input::Undo {
            reason: "parent".into(),
            parent_attempt: undo.1.attempt,
        },
        at(5),
    );
    assert_eq!(
        dispatched(&out.actions),
        vec![("label".to_string(), Phase::Compensate)]
    );
    let out = apply(&child, &mut c, comp_ok("label", 1), at(6));
    assert_eq!(c.status, WorkflowStatus::Compensated);
    let Some(Action::NotifyParent(undone)) = out.actions.last().cloned() else {
        panic!("the parent is not told")
    };
    assert_eq!(undone.phase, Phase::Compensate);
    let out = apply(&def, &mut s, comp_ok("ship", undone.parent.attempt), at(7));
    assert_eq!(
        dispatched(&out.actions),
        vec![("pay".to_string(), Phase::Compensate)]
    );
}

#[test]
fn a_failed_sub_workflow_fails_its_step() {
    let def = parent_def();
    let (mut s, _) = begin_with(&def, json!({}));
    let out = apply(&def, &mut s, ok("pay", 1, json!(1)), at(1));
    let start_child = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::StartChild(c) => Some(c.clone()),
            _ => None,
        })
        .expect("child started");
    let child = child_def();
    let (mut c, _) = start_child_state(&child, &start_child);
    let out = apply(&child, &mut c, fatal("label", 1), at(2));
    let Some(Action::NotifyParent(done)) = out.actions.last().cloned() else {
        panic!("the parent is not told")
    };
    let error = done.result.expect_err("failed");
    assert!(
        error
            .message
            .contains("sub-workflow `shipping` ended failed"),
        "{error}"
    );
    let input = Input::Failed {
        step: "ship".into(),
        phase: Phase::Forward,
        attempt: 1,
        error,
    };
    let out = apply(&def, &mut s, input, at(3));
    assert_eq!(
        dispatched(&out.actions),
        vec![("pay".to_string(), Phase::Compensate)]
    );
}

#[test]
fn the_child_id_is_fixed_by_the_parent_step_and_attempt() {
    let def = parent_def();
    let (mut s, _) = begin_with(&def, json!({}));
    let out = apply(&def, &mut s, ok("pay", 1, json!(1)), at(1));
    let first = out.actions.iter().find_map(|a| match a {
        Action::StartChild(c) => Some(c.transaction_id),
        _ => None,
    });
    let out = apply(
        &def,
        &mut s,
        Input::Redispatch {
            dispatched_before: at(1),
        },
        at(2),
    );
    let again = out.actions.iter().find_map(|a| match a {
        Action::StartChild(c) => Some(c.transaction_id),
        _ => None,
    });
    assert!(first.is_some());
    assert_eq!(first, again);
}

fn start_child_state(
    child: &WorkflowDefinition,
    start: &StartChild,
) -> (WorkflowState, Vec<Action>) {
    start_child(
        child,
        start.transaction_id,
        CorrelationId::new(),
        start.input.clone(),
        at(1),
        Some(start.parent.clone()),
    )
}

// ---------------------------------------------------------------------------
// Property tests over definitions that mix every kind of step.

mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::workflow::StepKind;

    #[derive(Clone, Debug)]
    enum Kind {
        Task { compensable: bool },
        FanOut { compensable: bool, max: u32 },
        Sleep,
        Signal { timeout: bool, default: bool },
        Child,
    }

    fn arb_kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            4 => any::<bool>().prop_map(|compensable| Kind::Task { compensable }),
            2 => (any::<bool>(), 1u32..4).prop_map(|(compensable, max)| Kind::FanOut { compensable, max }),
            1 => Just(Kind::Sleep),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(timeout, default)| Kind::Signal { timeout, default }),
            2 => Just(Kind::Child),
        ]
    }

    /// Up to 6 steps of random kinds, some in parallel groups, some with a
    /// condition on the input's flag, with or without a workflow deadline.
    fn arb_definition() -> impl Strategy<Value = WorkflowDefinition> {
        (
            proptest::collection::vec((arb_kind(), 0u8..5, 0u8..3, 1u32..3, any::<u8>()), 1..7),
            any::<bool>(),
        )
            .prop_map(|(steps, deadline)| {
                let mut b = WorkflowBuilder::new("random");
                if deadline {
                    b = b.deadline(Duration::from_secs(20));
                }
                let mut group = 0;
                for (i, (kind, grouping, condition, attempts, deps_mask)) in
                    steps.into_iter().enumerate()
                {
                    let name = format!("s{i}");
                    let add = |b: WorkflowBuilder| -> WorkflowBuilder {
                        let b = match &kind {
                            Kind::Task { compensable } | Kind::FanOut { compensable, .. } => {
                                let b = b
                                    .step(name.as_str(), "work")
                                    .retry(
                                        RetryPolicy::attempts(attempts)
                                            .with_initial_delay(Duration::from_millis(10)),
                                    )
                                    .timeout(Duration::from_millis(1_000));
                                let b = if let Kind::FanOut { max, .. } = kind {
                                    b.for_each("input.items").max_concurrency(max)
                                } else {
                                    b
                                };
                                if *compensable {
                                    b.compensate_with("undo")
                                } else {
                                    b
                                }
                            }
                            Kind::Sleep => b.sleep(name.as_str(), Duration::from_millis(500)),
                            Kind::Signal { timeout, default } => {
                                let b = b.wait_for_signal(name.as_str(), format!("sig{}", i % 2));
                                match (timeout, default) {
                                    (false, _) => b,
                                    (true, false) => {
                                        b.signal_timeout(Duration::from_secs(2), OnTimeout::Fail)
                                    }
                                    (true, true) => b.signal_timeout(
                                        Duration::from_secs(2),
                                        OnTimeout::Default(json!("d")),
                                    ),
                                }
                            }
                            Kind::Child => b
                                .sub_workflow(name.as_str(), "child")
                                .timeout(Duration::from_secs(5)),
                        };
                        match condition {
                            1 => b.when("input.flag"),
                            2 => b.when("!input.flag"),
                            _ => b,
                        }
                    };
                    b = match grouping {
                        0 => {
                            group += 1;
                            b.parallel(format!("g{group}"), add)
                        }
                        // After a random subset of the earlier steps: any DAG.
                        4 => {
                            let after: Vec<String> = (0..i)
                                .filter(|j| deps_mask & (1 << j) != 0)
                                .map(|j| format!("s{j}"))
                                .collect();
                            add(b).after(after.iter().map(|s| s.as_str()))
                        }
                        _ => add(b),
                    };
                }
                b.build().expect("generated definitions are valid")
            })
    }

    #[derive(Clone, Debug)]
    enum Op {
        Answer(usize, Answer),
        Duplicate(usize),
        Advance(u64),
        Signal(u8),
        Cancel,
        Redispatch,
    }

    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Success,
        Transient,
        Fatal,
        Lost,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<usize>(), prop_oneof![6 => Just(Answer::Success), 2 => Just(Answer::Transient), 1 => Just(Answer::Fatal), 1 => Just(Answer::Lost)])
                .prop_map(|(i, a)| Op::Answer(i, a)),
            2 => any::<usize>().prop_map(Op::Duplicate),
            2 => (1u64..3_000).prop_map(Op::Advance),
            1 => (0u8..2).prop_map(Op::Signal),
            1 => Just(Op::Cancel),
            1 => Just(Op::Redispatch),
        ]
    }

    /// A command out: (step or branch, phase, attempt).
    type Out = (StepName, Phase, u32);

    struct Harness<'a> {
        def: &'a WorkflowDefinition,
        state: WorkflowState,
        now: Timestamp,
        outstanding: Vec<Out>,
        delivered: Vec<Input>,
        log: Vec<(Input, Timestamp)>,
        /// Steps and branches whose compensation was dispatched (first attempt).
        compensations: Vec<StepName>,
        interrupted: Vec<StepName>,
        terminal_seen: bool,
        /// The state as a store keeps it: the first full write, then one
        /// delta per transition, each through JSON.
        stored: WorkflowState,
    }

    /// `delta` written and read back as a store does.
    fn through_json(delta: &crate::saga::parts::Delta) -> crate::saga::parts::Delta {
        let text = serde_json::to_string(delta).expect("a delta encodes");
        serde_json::from_str(&text).expect("a delta decodes")
    }

    impl<'a> Harness<'a> {
        fn new(def: &'a WorkflowDefinition, input: serde_json::Value) -> Self {
            let (state, actions) = start(
                def,
                TransactionId::new(),
                CorrelationId::new(),
                Payload::to_json(&input).expect("json"),
                T0,
            );
            let stored = through_json(&crate::saga::parts::Delta::full(&state))
                .apply(None)
                .expect("a full delta applies");
            assert_eq!(stored, state, "a new state read back differs");
            let mut h = Self {
                def,
                stored,
                state,
                now: T0,
                outstanding: Vec::new(),
                delivered: Vec::new(),
                log: Vec::new(),
                compensations: Vec::new(),
                interrupted: Vec::new(),
                terminal_seen: false,
            };
            h.take(actions, false);
            h
        }

        fn step_of(&self, name: &str) -> usize {
            let base = name.split('[').next().unwrap_or(name);
            self.def.step_index(base).expect("known step")
        }

        fn compensable(&self, name: &str) -> bool {
            let def = &self.def.steps()[self.step_of(name)];
            let fan_out_parent = def.for_each.is_some() && !name.contains('[');
            !fan_out_parent
                && (def.compensation.is_some() || matches!(def.kind, StepKind::Workflow(_)))
        }

        fn take(&mut self, actions: Vec<Action>, redispatch: bool) {
            for a in actions {
                let out = match a {
                    Action::Dispatch(d) => (d.step, d.phase, d.attempt),
                    Action::StartChild(c) => (c.parent.step, Phase::Forward, c.parent.attempt),
                    Action::UndoChild { parent, .. } => {
                        (parent.step, Phase::Compensate, parent.attempt)
                    }
                    Action::Interrupt { step, .. } => {
                        assert!(
                            self.state.status != WorkflowStatus::Running,
                            "interrupt while running"
                        );
                        self.interrupted.push(step);
                        continue;
                    }
                    _ => continue,
                };
                assert!(!self.terminal_seen, "command after terminal: {out:?}");
                if out.1 == Phase::Compensate && out.2 == 1 && !redispatch {
                    let i = self.step_of(out.0.as_str());
                    // Every later step has settled.
                    for &dep in self.def.dependents(i) {
                        self.assert_settled_below(dep);
                    }
                    assert!(
                        !self.compensations.contains(&out.0),
                        "{} compensated twice",
                        out.0
                    );
                    self.compensations.push(out.0.clone());
                }
                self.outstanding.push(out);
            }
        }

        fn assert_settled_below(&self, i: usize) {
            let step = &self.state.steps[i];
            for s in std::iter::once(step).chain(step.items.iter()) {
                let busy = matches!(
                    s.status,
                    StepStatus::Running { .. }
                        | StepStatus::RetryWaiting { .. }
                        | StepStatus::Waiting { .. }
                        | StepStatus::Compensating { .. }
                        | StepStatus::CompensationRetryWaiting { .. }
                );
                let undo_pending =
                    s.status == StepStatus::Completed && self.compensable(s.name.as_str());
                assert!(
                    !busy && !undo_pending,
                    "{} is not settled ({:?}) when an earlier step is compensated",
                    s.name,
                    s.status
                );
            }
            for &d in self.def.dependents(i) {
                self.assert_settled_below(d);
            }
        }

        fn feed(&mut self, input: Input) {
            self.log.push((input.clone(), self.now));
            let before = self.state.clone();
            let out = apply(self.def, &mut self.state, input.clone(), self.now);
            if out.changed {
                // The persisted form, read back, is the state in memory.
                let delta = {
                    // Written as a store writes it (borrowed), read as a delta.
                    let changes = crate::saga::parts::Changes::between(&before, &self.state);
                    let text = serde_json::to_string(&changes).expect("changes encode");
                    let read: crate::saga::parts::Delta =
                        serde_json::from_str(&text).expect("changes decode as a delta");
                    assert_eq!(read, changes.to_delta());
                    // With payloads kept apart (even small ones) and put
                    // back by digest: the same.
                    let apart = changes.clone().keep_apart(8);
                    let text = serde_json::to_string(&apart).expect("changes encode");
                    let mut kept: crate::saga::parts::Delta =
                        serde_json::from_str(&text).expect("changes decode as a delta");
                    let found: std::collections::HashMap<String, Payload> = apart
                        .apart
                        .payloads()
                        .map(|(d, p)| (d.to_string(), p.clone()))
                        .collect();
                    kept.resolve(&mut |d| found.get(d).cloned())
                        .expect("every payload kept apart is found");
                    assert_eq!(kept, read);
                    read
                };
                assert!(!delta.full, "a transition wrote the whole state");
                self.stored = delta
                    .apply(Some(self.stored.clone()))
                    .expect("a delta applies to the stored state");
                assert_eq!(
                    self.stored, self.state,
                    "the state read back differs after {input:?}"
                );
            } else {
                assert_eq!(
                    before, self.state,
                    "an input that changed nothing changed the state"
                );
            }
            // Looking only at the steps an input changed (and those after
            // them) misses nothing: no step is left waiting that could run.
            if self.state.status == WorkflowStatus::Running {
                let settled =
                    |s: &StepState| matches!(s.status, StepStatus::Completed | StepStatus::Skipped);
                for (i, s) in self.state.steps.iter().enumerate() {
                    if s.status == StepStatus::Pending {
                        let ready = self
                            .def
                            .dependencies(i)
                            .iter()
                            .all(|&d| settled(&self.state.steps[d]));
                        assert!(
                            !ready,
                            "step {} could run but was left pending after {input:?}",
                            s.name
                        );
                    }
                }
                assert!(
                    !self.state.steps.iter().all(settled),
                    "every step finished but the workflow runs on"
                );
            }
            if self.terminal_seen {
                assert_eq!(out, Outcome::default(), "a terminal workflow changed");
            }
            if out.changed && matches!(input, Input::Succeeded { .. } | Input::Failed { .. }) {
                let mut again = self.state.clone();
                assert_eq!(
                    apply(self.def, &mut again, input.clone(), self.now),
                    Outcome::default()
                );
                assert_eq!(again, self.state);
            }
            let redispatch = matches!(input, Input::Redispatch { .. });
            self.take(out.actions, redispatch);
            if matches!(input, Input::Succeeded { .. } | Input::Failed { .. }) {
                self.delivered.push(input);
            }
            self.terminal_seen = self.state.is_terminal();
        }

        fn answer(&mut self, index: usize, answer: Answer) {
            if self.outstanding.is_empty() {
                return;
            }
            let (step, phase, attempt) = self.outstanding.remove(index % self.outstanding.len());
            let input = match answer {
                Answer::Success => Input::Succeeded {
                    step,
                    phase,
                    attempt,
                    output: Payload::null(),
                },
                Answer::Transient | Answer::Fatal => Input::Failed {
                    step,
                    phase,
                    attempt,
                    error: StepError {
                        message: "x".into(),
                        retry: if matches!(answer, Answer::Fatal) {
                            RetryDirective::Never
                        } else {
                            RetryDirective::Retry
                        },
                        kind: None,
                    },
                },
                Answer::Lost => return,
            };
            self.feed(input);
        }

        fn run(&mut self, op: Op) {
            match op {
                Op::Answer(i, a) => self.answer(i, a),
                Op::Duplicate(i) => {
                    if !self.delivered.is_empty() {
                        let input = self.delivered[i % self.delivered.len()].clone();
                        self.feed(input);
                    }
                }
                Op::Advance(ms) => {
                    self.now = Timestamp(self.now.0 + ms);
                    self.feed(Input::Tick);
                }
                Op::Signal(n) => self.feed(Input::Signal {
                    name: format!("sig{n}"),
                    payload: Payload::null(),
                }),
                Op::Cancel => self.feed(Input::Cancel {
                    reason: "test".into(),
                }),
                Op::Redispatch => self.feed(Input::Redispatch {
                    dispatched_before: self.now,
                }),
            }
        }

        /// Every command now succeeds, every signal comes and time moves on:
        /// the workflow must end.
        fn settle(&mut self) {
            for _ in 0..1_000 {
                if self.state.is_terminal() {
                    return;
                }
                while !self.outstanding.is_empty() {
                    self.answer(0, Answer::Success);
                }
                for n in 0..2 {
                    self.run(Op::Signal(n));
                }
                self.now = Timestamp(self.now.0 + 60_000);
                self.feed(Input::Tick);
            }
            panic!("workflow never reached a terminal status: {:?}", self.state);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn groups_conditions_fan_outs_timers_signals_and_children_end_and_undo_exactly_what_completed(
            def in arb_definition(),
            flag in any::<bool>(),
            items in 0usize..4,
            ops in proptest::collection::vec(arb_op(), 0..60),
        ) {
            let input = json!({"flag": flag, "items": (0..items).collect::<Vec<_>>()});
            let mut h = Harness::new(&def, input.clone());
            for op in ops {
                h.run(op);
            }
            h.settle();
            let s = &h.state;
            prop_assert!(s.is_terminal());
            // Which steps and branches completed (their forward phase), from the history.
            let completed: BTreeSet<String> = s
                .history
                .iter()
                .filter(|e| e.event == HistoryEvent::Succeeded)
                .filter_map(|e| e.step.as_ref().map(|n| n.to_string()))
                .filter(|n| h.compensable(n))
                .collect();
            let compensated: BTreeSet<String> = h.compensations.iter().map(|n| n.to_string()).collect();
            match s.status {
                WorkflowStatus::Completed => {
                    prop_assert!(s.steps.iter().all(|x| matches!(x.status, StepStatus::Completed | StepStatus::Skipped)));
                    prop_assert!(compensated.is_empty());
                    prop_assert!(h.interrupted.is_empty());
                }
                _ => {
                    prop_assert_eq!(&compensated, &completed);
                    prop_assert!(s.failure.is_some());
                }
            }
            if s.status == WorkflowStatus::TimedOut {
                prop_assert!(matches!(s.failure, Some(Failure::DeadlineExceeded { .. })), "timed out without a deadline failure");
            }
            // A condition on the flag decides, whatever else happened.
            for (i, step) in def.steps().iter().enumerate() {
                let Some(when) = &step.when else { continue };
                let holds = (when.as_str() == "input.flag") == flag;
                if !holds {
                    prop_assert!(matches!(s.steps[i].status, StepStatus::Skipped | StepStatus::Pending | StepStatus::Cancelled), "{:?}", s.steps[i]);
                } else {
                    prop_assert!(s.steps[i].status != StepStatus::Skipped);
                }
            }
            // A completed fan-out has one output per item, in order.
            for (i, step) in def.steps().iter().enumerate() {
                if step.for_each.is_some() && s.steps[i].status == StepStatus::Completed {
                    let out: serde_json::Value = s.steps[i].output.as_ref().expect("output").parse().expect("json");
                    prop_assert_eq!(out.as_array().map(Vec::len), Some(items));
                }
            }
            // No signal kept once the workflow ends is ever for a step still waiting.
            prop_assert!(s.steps.iter().all(|x| !matches!(x.status, StepStatus::Waiting { .. })), "a step still waits");
            // In a sequential chain of worker steps, compensations run in
            // exactly the reverse order of completion.
            let plain = def.steps().iter().all(|st| {
                matches!(st.kind, StepKind::Task { .. }) && st.for_each.is_none() && st.when.is_none()
            });
            let sequential = (1..def.steps().len()).all(|i| def.dependencies(i) == [i - 1]);
            if plain && sequential && s.status != WorkflowStatus::Completed {
                let expected: Vec<StepName> = s
                    .history
                    .iter()
                    .filter(|e| e.event == HistoryEvent::Succeeded)
                    .filter_map(|e| e.step.clone())
                    .filter(|n| h.compensable(n.as_str()))
                    .rev()
                    .collect();
                prop_assert_eq!(&h.compensations, &expected);
            }
            // Replaying the same inputs gives the same state.
            let (mut replay, _) = start(&def, s.transaction_id, s.correlation_id, Payload::to_json(&input).expect("json"), T0);
            for (input, now) in &h.log {
                apply(&def, &mut replay, input.clone(), *now);
            }
            prop_assert_eq!(&replay, s);
        }
    }
}

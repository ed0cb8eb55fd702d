use std::time::Duration;

use super::*;

fn orders() -> WorkflowBuilder {
    WorkflowBuilder::new("orders")
        .step("validate", "validate_order")
        .step("reserve", "reserve_inventory")
        .compensate_with("release_inventory")
        .step("charge", "charge_payment")
        .compensate_with("refund_payment")
        .retry(RetryPolicy::attempts(5).with_initial_delay(Duration::from_millis(20)))
        .timeout(Duration::from_secs(3))
        .step("invoice", "create_invoice")
        .input_from("charge")
}

#[test]
fn builds_a_sequential_graph() {
    let def = orders().build().expect("valid");
    assert_eq!(def.steps().len(), 4);
    assert_eq!(def.dependencies(0), &[] as &[usize]);
    assert_eq!(def.dependencies(2), &[1]);
    assert_eq!(def.dependents(1), &[2]);
    assert_eq!(def.steps()[2].retry.max_attempts, 5);
    assert_eq!(def.steps()[2].timeout, Duration::from_secs(3));
    assert_eq!(def.steps()[0].timeout, DEFAULT_STEP_TIMEOUT);
    let workers: Vec<_> = def.workers().map(|w| w.to_string()).collect();
    assert!(workers.contains(&"refund_payment".to_string()));
}

#[test]
fn round_trips_through_json_and_yaml() {
    let def = orders().description("an order").build().expect("valid");
    let json = def.to_json();
    assert_eq!(
        WorkflowDefinition::from_json(&json).expect("json parses"),
        def
    );
    let yaml = def.to_yaml();
    assert_eq!(
        WorkflowDefinition::from_yaml(&yaml).expect("yaml parses"),
        def
    );
    // The default ordering is implicit in the text.
    assert!(!json.contains("\"after\""), "{json}");
}

#[test]
fn reads_hand_written_yaml() {
    let def = WorkflowDefinition::from_yaml(
        r#"
name: orders
steps:
  - name: reserve
    worker: reserve_inventory
    compensation: release_inventory
  - name: charge
    worker: charge_payment
    timeout: 2s
    retry: {max_attempts: 4, initial_delay: 50ms, multiplier: 3, max_delay: 1s, jitter: 0}
    compensation:
      worker: refund_payment
      timeout: 500ms
  - name: audit
    worker: audit
    after: []
"#,
    )
    .expect("valid yaml");
    assert_eq!(def.steps()[1].timeout, Duration::from_secs(2));
    assert_eq!(def.steps()[1].retry.max_attempts, 4);
    let comp = def.steps()[1].compensation.as_ref().expect("compensation");
    assert_eq!(comp.timeout, Duration::from_millis(500));
    assert_eq!(comp.retry, RetryPolicy::compensation_default());
    assert_eq!(def.dependencies(2), &[] as &[usize]);
}

fn err(b: WorkflowBuilder) -> String {
    b.build().expect_err("must be refused").to_string()
}

#[test]
fn refuses_bad_definitions_naming_the_culprit() {
    assert_eq!(
        err(WorkflowBuilder::new("w")),
        "workflow `w` has no steps; add at least one with .step(name, worker)"
    );
    assert!(err(WorkflowBuilder::new("")).contains("name is empty"));
    assert_eq!(
        err(WorkflowBuilder::new("w").step("a", "x").step("a", "y")),
        "workflow `w` declares step `a` twice"
    );
    assert_eq!(
        err(WorkflowBuilder::new("w").step("a", "")),
        "step `a` of workflow `w` has an empty step worker name"
    );
    assert_eq!(
        err(WorkflowBuilder::new("w")
            .step("a", "x")
            .compensate_with(" ")),
        "step `a` of workflow `w` has an empty compensation worker name"
    );
    assert!(
        err(WorkflowBuilder::new("w")
            .step("a", "x")
            .retry(RetryPolicy::attempts(0)))
        .contains("step `a` of workflow `w` has an invalid step retry policy: max_attempts is 0")
    );
    assert!(
        err(WorkflowBuilder::new("w")
            .step("a", "x")
            .timeout(Duration::ZERO))
        .contains("zero step timeout")
    );
    assert!(err(WorkflowBuilder::new("w").step("", "x")).contains("step #1"));
    assert!(
        err(WorkflowBuilder::new("w").step("a", "x").after(["ghost"]))
            .contains("`ghost`, which is not a step")
    );
    assert!(
        err(WorkflowBuilder::new("w").retry(RetryPolicy::never()))
            .contains(".retry() was called before any .step()")
    );
    assert!(
        err(WorkflowBuilder::new("w")
            .step("a", "x")
            .compensation_retry(RetryPolicy::never()))
        .contains("step `a`, which has no compensation")
    );
    assert!(err(WorkflowBuilder::new("w").version(0).step("a", "x")).contains("version 0"));
}

#[test]
fn refuses_cycles_naming_the_steps() {
    let e = WorkflowBuilder::new("w")
        .step("a", "x")
        .after(["c"])
        .step("b", "x")
        .step("c", "x")
        .build()
        .expect_err("cycle");
    match e {
        DefinitionError::Cycle { steps, .. } => {
            assert_eq!(steps.first(), steps.last());
            for s in ["a", "b", "c"] {
                assert!(steps.iter().any(|x| x == s), "{steps:?}");
            }
        }
        other => panic!("expected a cycle, got {other}"),
    }
    let e = err(WorkflowBuilder::new("w").step("a", "x").after(["a"]));
    assert!(e.contains("cycle through steps a → a"), "{e}");
}

#[test]
fn refuses_input_from_a_step_that_is_not_before() {
    let e = err(WorkflowBuilder::new("w")
        .step("a", "x")
        .input_from("b")
        .step("b", "y"));
    assert!(
        e.contains("takes its input from `b`, which does not always finish before it"),
        "{e}"
    );
    let e = err(WorkflowBuilder::new("w").step("a", "x").input_from("zzz"));
    assert!(e.contains("`zzz`, which is not a step"), "{e}");
}

#[test]
fn refuses_bad_text_with_the_reason() {
    let e = WorkflowDefinition::from_json(
        r#"{"name":"w","steps":[{"name":"a","worker":"x","retires":3}]}"#,
    )
    .expect_err("unknown key");
    assert!(e.to_string().contains("retires"), "{e}");
    let e = WorkflowDefinition::from_json(
        r#"{"name":"w","steps":[{"name":"a","worker":"x"},{"name":"a","worker":"y"}]}"#,
    )
    .expect_err("duplicate");
    assert!(e.to_string().contains("declares step `a` twice"), "{e}");
    let e = WorkflowDefinition::from_yaml(
        "name: w\nsteps:\n  - name: a\n    worker: x\n    timeout: soon\n",
    )
    .expect_err("bad duration");
    assert!(e.to_string().contains("soon"), "{e}");
}

#[test]
fn a_partial_retry_policy_keeps_the_defaults_it_does_not_name() {
    let def = WorkflowDefinition::from_yaml(
        "name: w\nsteps:\n  - name: a\n    worker: a\n    retry: {max_attempts: 7}\n",
    )
    .expect("valid");
    let retry = &def.steps()[0].retry;
    assert_eq!(retry.max_attempts, 7);
    assert_eq!(retry.initial_delay, RetryPolicy::default().initial_delay);
    assert_eq!(retry.multiplier, RetryPolicy::default().multiplier);
}

const POWER_YAML: &str = r#"
name: order
deadline: 1h
steps:
  - name: validate
    worker: validate_order
  - name: fraud
    worker: fraud_check
    group: checks
  - name: address
    worker: address_check
    group: checks
  - name: wrap
    worker: gift_wrap
    when: has(input.gift_wrap) && input.gift_wrap
  - name: pack
    worker: pack_item
    for_each: input.items
    max_concurrency: 4
    compensation: unpack_item
  - name: approval
    signal: {name: approve, timeout: 10m, on_timeout: {default: {approved: false}}}
  - name: cool_off
    sleep: 30s
  - name: ship
    workflow: {name: shipping, version: 2}
  - name: notify
    worker: notify
    when: steps.fraud.score < 0.5
"#;

#[test]
fn reads_groups_conditions_fan_outs_timers_signals_and_children() {
    let def = WorkflowDefinition::from_yaml(POWER_YAML).expect("valid");
    assert_eq!(def.deadline(), Some(Duration::from_secs(3600)));
    // The group's steps both come after validate; wrap waits for both.
    assert_eq!(def.dependencies(1), &[0]);
    assert_eq!(def.dependencies(2), &[0]);
    assert_eq!(def.dependencies(3), &[1, 2]);
    assert_eq!(
        def.steps()[4].for_each.as_ref().map(|f| f.max_concurrency),
        Some(4)
    );
    assert!(matches!(
        &def.steps()[5].kind,
        StepKind::Signal(SignalWait { name, timeout: Some(t), on_timeout: OnTimeout::Default(_) })
            if name == "approve" && *t == Duration::from_secs(600)
    ));
    assert_eq!(
        def.steps()[6].kind,
        StepKind::Sleep {
            duration: Duration::from_secs(30)
        }
    );
    assert_eq!(def.steps()[7].timeout, DEFAULT_CHILD_TIMEOUT);
    assert_eq!(
        def.children().map(|c| c.version).collect::<Vec<_>>(),
        vec![Some(2)]
    );
    assert_eq!(def.signals().collect::<Vec<_>>(), vec!["approve"]);
    // Round trips through JSON and YAML, groups and implicit `after` included.
    let back = WorkflowDefinition::from_json(&def.to_json()).expect("json");
    assert_eq!(back, def);
    let back = WorkflowDefinition::from_yaml(&def.to_yaml()).expect("yaml");
    assert_eq!(back, def);
    assert!(!def.to_yaml().contains("after"), "{}", def.to_yaml());
}

fn yaml_err(text: &str) -> String {
    WorkflowDefinition::from_yaml(text)
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn refuses_bad_expressions_with_their_position() {
    let e = err(WorkflowBuilder::new("w").step("a", "x").when("input.a == "));
    assert!(
        e.contains(
            "step `a` of workflow `w`: `when` expression `input.a == ` at 1:11: syntax error"
        ),
        "{e}"
    );
    let e = err(WorkflowBuilder::new("w")
        .step("a", "x")
        .step("b", "y")
        .when("input.ok && steps.c.ok"));
    assert!(
        e.contains("at 1:13: `steps.c`: there is no step `c`"),
        "{e}"
    );
    let e = err(WorkflowBuilder::new("w")
        .step("a", "x")
        .step("b", "y")
        .after(Vec::<&str>::new())
        .when("steps.a.ok"));
    assert!(
        e.contains("step `a` does not always finish before `b`"),
        "{e}"
    );
    let e = err(WorkflowBuilder::new("w")
        .step("a", "x")
        .for_each("order.items"));
    assert!(
        e.contains("`for_each` expression `order.items` at 1:1: unknown variable `order`"),
        "{e}"
    );
    let e = err(WorkflowBuilder::new("w")
        .step("a", "x")
        .when("steps.a.done"));
    assert!(e.contains("this step's own output"), "{e}");
    // In a group, a sibling's output is not available.
    let e = err(WorkflowBuilder::new("w")
        .parallel("g", |g| g.step("a", "x").step("b", "y").when("steps.a.ok")));
    assert!(
        e.contains("step `a` does not always finish before `b`"),
        "{e}"
    );
}

#[test]
fn refuses_steps_of_no_kind_or_two_kinds_and_misplaced_parts() {
    let e = yaml_err("name: w\nsteps:\n  - name: a\n");
    assert!(
        e.contains("step `a` of workflow `w` says neither what it runs nor what it waits for"),
        "{e}"
    );
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    worker: x\n    sleep: 1s\n");
    assert!(e.contains("has `worker` and `sleep`"), "{e}");
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    sleep: 1s\n    compensation: undo\n");
    assert!(e.contains("nothing to undo"), "{e}");
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    workflow: w\n");
    assert!(e.contains("sub-workflow of itself"), "{e}");
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    workflow: other\n    compensation: undo\n");
    assert!(e.contains("undone by compensating the child"), "{e}");
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    signal: go\n    for_each: input.items\n");
    assert!(e.contains("only worker steps"), "{e}");
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    worker: x\n    max_concurrency: 2\n");
    assert!(e.contains("`max_concurrency` without `for_each`"), "{e}");
    let e = yaml_err(
        "name: w\nsteps:\n  - name: a\n    worker: x\n    for_each: input.items\n    max_concurrency: 0\n",
    );
    assert!(e.contains("`max_concurrency` 0"), "{e}");
    let e = yaml_err("name: w\nsteps:\n  - name: a\n    signal: {name: go, timeout: 0s}\n");
    assert!(e.contains("zero timeout"), "{e}");
    let e = yaml_err(
        "name: w\nsteps:\n  - name: a\n    worker: x\n    group: g\n  - name: b\n    worker: x\n  - name: c\n    worker: x\n    group: g\n",
    );
    assert!(
        e.contains(
            "parallel group `g` must be declared one after another, but step `b` comes between them"
        ),
        "{e}"
    );
    let e = yaml_err("name: w\nsteps:\n  - name: a[1]\n    worker: x\n");
    assert!(e.contains("branches of a fan-out"), "{e}");
    let e = err(WorkflowBuilder::new("w")
        .step("a", "x")
        .signal_timeout(Duration::from_secs(1), OnTimeout::Fail));
    assert!(
        e.contains(".signal_timeout() on step `a`, which does not wait for a signal"),
        "{e}"
    );
    let e = err(WorkflowBuilder::new("w").parallel("g", |g| g));
    assert!(e.contains("parallel group `g` has no steps"), "{e}");
}

//! Retrying finished runs and redriving failed compensations.

use super::tests_support::*;
use super::*;
use crate::event::RetryDirective;
use crate::workflow::WorkflowBuilder;

/// Runs `orders` until `invoice` fails for good, then compensates it fully.
fn compensated_orders() -> (WorkflowDefinition, WorkflowState) {
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
    apply(&def, &mut s, comp_ok("charge", 1), at(6));
    apply(&def, &mut s, comp_ok("reserve", 1), at(7));
    assert_eq!(s.status, WorkflowStatus::Compensated);
    (def, s)
}

#[test]
fn a_compensated_run_is_retried_from_the_first_undone_step() {
    let (def, old) = compensated_orders();
    let (new, actions) = retry(&def, &old, RetryPlan::default(), at(100)).expect("retryable");
    assert_eq!(new.transaction_id, retry_id(old.transaction_id));
    assert_ne!(new.transaction_id, old.transaction_id);
    assert_eq!(new.correlation_id, old.correlation_id);
    assert_eq!(new.status, WorkflowStatus::Running);
    // validate completed and had nothing to undo: kept with its output.
    assert_eq!(new.steps[0].status, StepStatus::Completed);
    assert_eq!(new.steps[0].output, old.steps[0].output);
    // reserve and charge were undone: they run again, reserve first.
    assert_eq!(
        dispatches(&actions),
        vec![("reserve".into(), Phase::Forward, 1)]
    );
    assert!(matches!(
        new.history[0].event,
        HistoryEvent::Retried { transaction_id, from_step: Some(ref s) }
            if transaction_id == old.transaction_id && s == "invoice"
    ));
}

#[test]
fn a_failed_run_keeps_what_stands_and_reruns_the_failed_step() {
    let def = WorkflowBuilder::new("w")
        .step("a", "x")
        .step("b", "y")
        .step("c", "z")
        .build()
        .expect("valid");
    let (mut old, _) = begin(&def);
    apply(&def, &mut old, ok("a", 1), at(1));
    apply(&def, &mut old, fail("b", 1, RetryDirective::Never), at(2));
    assert_eq!(old.status, WorkflowStatus::Failed);
    let patched = Payload::from_json_str(r#"{"order":2}"#).expect("json");
    let plan = RetryPlan {
        input: Some(patched.clone()),
        ..Default::default()
    };
    let (mut new, actions) = retry(&def, &old, plan, at(10)).expect("retryable");
    assert_eq!(new.input, patched);
    assert_eq!(dispatches(&actions), vec![("b".into(), Phase::Forward, 1)]);
    assert_eq!(new.steps[0].status, StepStatus::Completed);
    apply(&def, &mut new, ok("b", 1), at(11));
    apply(&def, &mut new, ok("c", 1), at(12));
    assert_eq!(new.status, WorkflowStatus::Completed);
}

#[test]
fn from_step_reruns_it_and_everything_after_it() {
    let (def, old) = compensated_orders();
    let plan = RetryPlan {
        from_step: Some("validate".into()),
        ..Default::default()
    };
    let (new, actions) = retry(&def, &old, plan, at(100)).expect("retryable");
    assert!(new.steps.iter().all(|s| s.status != StepStatus::Completed));
    assert_eq!(
        dispatches(&actions),
        vec![("validate".into(), Phase::Forward, 1)]
    );
}

#[test]
fn a_retry_is_refused_with_the_reason() {
    let def = orders();
    let (running, _) = begin(&def);
    assert_eq!(
        retry(&def, &running, RetryPlan::default(), at(1)).expect_err("refused"),
        RetryRefused::Status {
            status: WorkflowStatus::Running
        }
    );
    let (_, old) = compensated_orders();
    let plan = RetryPlan {
        from_step: Some("nope".into()),
        ..Default::default()
    };
    let refused = retry(&def, &old, plan, at(1)).expect_err("refused");
    assert!(refused.to_string().contains("no step `nope`"), "{refused}");
}

#[test]
fn the_old_run_records_its_retry() {
    let (_, mut old) = compensated_orders();
    assert_eq!(retried_as(&old), None);
    let new = retry_id(old.transaction_id);
    mark_retried(&mut old, new, at(100));
    assert_eq!(retried_as(&old), Some(new));
    // The id of a retry is stable, and differs for each run retried.
    assert_eq!(retry_id(old.transaction_id), new);
    assert_ne!(retry_id(new), new);
}

#[test]
fn a_redriven_compensation_finishes_the_workflow() {
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
    apply(
        &def,
        &mut s,
        comp_fail("charge", 1, RetryDirective::Never),
        at(6),
    );
    apply(&def, &mut s, comp_ok("reserve", 1), at(7));
    assert_eq!(s.status, WorkflowStatus::CompensationFailed);
    assert!(check_redrive(&s, "reserve").is_err());
    assert!(check_redrive(&s, "charge").is_ok());
    let out = apply(
        &def,
        &mut s,
        Input::RedriveCompensation {
            step: "charge".into(),
        },
        at(100),
    );
    assert!(out.changed);
    assert_eq!(s.status, WorkflowStatus::Compensating);
    assert_eq!(
        dispatches(&out.actions),
        vec![("charge".into(), Phase::Compensate, 2)]
    );
    // A second redrive while it runs changes nothing.
    let again = apply(
        &def,
        &mut s,
        Input::RedriveCompensation {
            step: "charge".into(),
        },
        at(101),
    );
    assert!(!again.changed);
    apply(&def, &mut s, comp_ok("charge", 2), at(102));
    assert_eq!(s.status, WorkflowStatus::Compensated);
    assert!(s.finished_at.is_some());
    assert!(
        s.history
            .iter()
            .any(|h| h.event == HistoryEvent::CompensationRedriven && h.attempt == 2)
    );
}

#[test]
fn a_redrive_of_a_compensation_that_did_not_fail_changes_nothing() {
    let (def, mut s) = compensated_orders();
    let out = apply(
        &def,
        &mut s,
        Input::RedriveCompensation {
            step: "charge".into(),
        },
        at(100),
    );
    assert!(!out.changed);
    assert_eq!(s.status, WorkflowStatus::Compensated);
}

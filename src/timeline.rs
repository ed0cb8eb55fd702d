//! A workflow's history as text people read: one line per event, with the
//! time since the workflow started.

use std::fmt::Write;

use crate::core::saga::{Failure, HistoryEvent, WorkflowState};

/// Renders the timeline of one workflow.
///
/// ```text
/// 0190f6c1-… ecommerce_order v1: compensated in 4 ms (step `payment` failed: declined: card declined)
///     +0ms  started
///     +0ms  validate        dispatched (attempt 1)
///     +1ms  validate        succeeded
///     …
/// ```
pub fn render(state: &WorkflowState) -> String {
    let mut out = String::new();
    let took = state
        .finished_at
        .map(|f| format!(" in {} ms", f.since(state.started_at).as_millis()))
        .unwrap_or_default();
    let why = match &state.failure {
        Some(Failure::StepFailed { step, error }) => format!(" (step `{step}` failed: {error})"),
        Some(Failure::Cancelled { reason }) => format!(" (cancelled: {reason})"),
        Some(Failure::DeadlineExceeded { .. }) => " (its deadline passed)".to_string(),
        Some(Failure::Undone { reason }) => format!(" (undone: {reason})"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "{} {} v{}: {}{took}{why}",
        state.transaction_id, state.workflow, state.version, state.status
    );
    let width = state
        .steps
        .iter()
        .map(|s| s.name.as_str().len())
        .max()
        .unwrap_or(0)
        .max(4);
    for h in &state.history {
        let offset = h.at.since(state.started_at).as_millis();
        let step = h.step.as_ref().map(|s| s.as_str()).unwrap_or("");
        let what = match &h.event {
            HistoryEvent::Started => "started".to_string(),
            HistoryEvent::Dispatched => format!("dispatched (attempt {})", h.attempt),
            HistoryEvent::Redispatched { phase } => {
                format!("{phase} command republished (attempt {})", h.attempt)
            }
            HistoryEvent::Succeeded => format!("succeeded (attempt {})", h.attempt),
            HistoryEvent::RetryScheduled { phase, error, at } => format!(
                "{} attempt {} failed: {error}; retry in {} ms",
                if *phase == crate::core::Phase::Compensate {
                    "compensation"
                } else {
                    "step"
                },
                h.attempt,
                at.since(h.at).as_millis()
            ),
            HistoryEvent::Failed { error } => {
                format!("FAILED for good (attempt {}): {error}", h.attempt)
            }
            HistoryEvent::Cancelled => "cancelled before it could finish".to_string(),
            HistoryEvent::CancelRequested { reason } => format!("cancellation requested: {reason}"),
            HistoryEvent::CompensationDispatched => format!("compensating (attempt {})", h.attempt),
            HistoryEvent::Compensated => "compensated".to_string(),
            HistoryEvent::CompensationFailed { error } => {
                format!("COMPENSATION FAILED for good: {error}")
            }
            HistoryEvent::Skipped => "skipped: its condition did not hold".to_string(),
            HistoryEvent::FannedOut { items } => format!("fanned out over {items} item(s)"),
            HistoryEvent::WaitStarted { until } => match until {
                Some(u) => format!("waiting {} ms", u.since(h.at).as_millis()),
                None => "waiting".to_string(),
            },
            HistoryEvent::SignalReceived { name } => format!("signal `{name}` received"),
            HistoryEvent::ChildStarted { transaction_id } => {
                format!(
                    "sub-workflow {transaction_id} started (attempt {})",
                    h.attempt
                )
            }
            HistoryEvent::DeadlineExceeded => "DEADLINE passed".to_string(),
            HistoryEvent::UndoRequested { reason } => format!("undo requested: {reason}"),
            HistoryEvent::Retried {
                transaction_id,
                from_step,
            } => match from_step {
                Some(step) => format!("retries run {transaction_id} from step `{step}`"),
                None => format!("retries run {transaction_id}"),
            },
            HistoryEvent::RetriedAs { transaction_id } => {
                format!("retried as run {transaction_id}")
            }
            HistoryEvent::CompensationRedriven => {
                format!("compensation redriven (attempt {})", h.attempt)
            }
            HistoryEvent::Finished { status } => format!("finished: {status}"),
        };
        let _ = writeln!(out, "    +{offset:>4}ms  {step:<width$}  {what}");
    }
    out
}

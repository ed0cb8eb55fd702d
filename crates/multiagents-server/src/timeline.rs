//! A run as a timeline (`GET /v1/runs/{id}/timeline`): one lane per step
//! (and per fan-out branch), each with its bars — an attempt, a wait, a
//! sub-workflow, a compensation — and what the step got and gave. The
//! dashboard draws it as a Gantt chart; a script can read it as it is.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use multiagents::core::saga::{HistoryEvent, StepState};
use multiagents::core::workflow::StepKind;
use multiagents::core::{Phase, StepName, Timestamp, WorkflowDefinition, WorkflowState};
use serde_json::{Value, json};

use crate::extract::Path;
use crate::{Problem, Service};

/// One bar of a lane.
#[derive(Debug, Clone, PartialEq)]
struct Bar {
    kind: &'static str,
    phase: Phase,
    attempt: u32,
    start: Timestamp,
    end: Option<Timestamp>,
    outcome: &'static str,
    error: Option<String>,
    timing: Option<multiagents::core::event::Timing>,
    until: Option<Timestamp>,
    child: Option<String>,
    redispatched: u32,
}

impl Bar {
    fn open(kind: &'static str, phase: Phase, attempt: u32, start: Timestamp) -> Self {
        Self {
            kind,
            phase,
            attempt,
            start,
            end: None,
            outcome: "in_flight",
            error: None,
            timing: None,
            until: None,
            child: None,
            redispatched: 0,
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "kind": self.kind,
            "phase": self.phase,
            "attempt": self.attempt,
            "start": self.start,
            "end": self.end,
            "outcome": self.outcome,
        });
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        if let Some(t) = &self.timing {
            v["instance"] = json!(t.instance);
            v["picked_up_at"] = json!(t.picked_up_at);
            v["started_at"] = json!(t.started_at);
            v["finished_at"] = json!(t.finished_at);
        }
        if let Some(u) = self.until {
            v["until"] = json!(u);
        }
        if let Some(c) = &self.child {
            v["child"] = json!(c);
            v["child_url"] = json!(format!("/v1/runs/{c}/timeline"));
        }
        if self.redispatched > 0 {
            v["redispatched"] = json!(self.redispatched);
        }
        v
    }
}

/// The bars of every lane, by step (or branch) name, in the order the
/// history first names them.
fn bars(state: &WorkflowState) -> Vec<(StepName, Vec<Bar>)> {
    let mut lanes: Vec<(StepName, Vec<Bar>)> = Vec::new();
    let mut index: HashMap<StepName, usize> = HashMap::new();
    // The open bar of each (lane, phase).
    let mut open: HashMap<(usize, Phase), usize> = HashMap::new();
    for entry in &state.history {
        let Some(step) = &entry.step else { continue };
        let lane = *index.entry(step.clone()).or_insert_with(|| {
            lanes.push((step.clone(), Vec::new()));
            lanes.len() - 1
        });
        let list = &mut lanes[lane].1;
        let mut begin = |bar: Bar, open: &mut HashMap<(usize, Phase), usize>| {
            // A bar left open (its end not recorded) ends where the next begins.
            if let Some(i) = open.insert((lane, bar.phase), list.len()) {
                list[i].end.get_or_insert(entry.at);
            }
            list.push(bar);
        };
        let close = |list: &mut Vec<Bar>,
                     open: &mut HashMap<(usize, Phase), usize>,
                     phase: Phase,
                     outcome: &'static str,
                     error: Option<&str>| {
            if let Some(i) = open.remove(&(lane, phase)) {
                let bar = &mut list[i];
                bar.end = Some(entry.at);
                bar.outcome = outcome;
                bar.error = error.map(str::to_string);
                if let Some(t) = &entry.timing {
                    bar.timing = Some(multiagents::core::event::Timing::clone(t));
                }
            }
        };
        match &entry.event {
            HistoryEvent::Dispatched => begin(
                Bar::open("attempt", Phase::Forward, entry.attempt, entry.at),
                &mut open,
            ),
            HistoryEvent::CompensationDispatched | HistoryEvent::CompensationRedriven => begin(
                Bar::open("compensation", Phase::Compensate, entry.attempt, entry.at),
                &mut open,
            ),
            HistoryEvent::WaitStarted { until } => {
                let mut bar = Bar::open("wait", Phase::Forward, entry.attempt, entry.at);
                bar.until = *until;
                begin(bar, &mut open);
            }
            HistoryEvent::ChildStarted { transaction_id } => {
                let mut bar = Bar::open("workflow", Phase::Forward, entry.attempt, entry.at);
                bar.child = Some(transaction_id.to_string());
                begin(bar, &mut open);
            }
            HistoryEvent::Redispatched { phase } => {
                if let Some(&i) = open.get(&(lane, *phase)) {
                    list[i].redispatched += 1;
                }
            }
            HistoryEvent::Succeeded => close(list, &mut open, Phase::Forward, "completed", None),
            HistoryEvent::SignalReceived { .. } => {
                // The signal ends the wait (a signal kept for later names no
                // open wait and changes nothing).
                if let Some(&i) = open.get(&(lane, Phase::Forward))
                    && list[i].kind == "wait"
                {
                    close(list, &mut open, Phase::Forward, "signalled", None);
                }
            }
            HistoryEvent::RetryScheduled { phase, error, .. } => {
                close(list, &mut open, *phase, "failed", Some(error));
            }
            HistoryEvent::Failed { error } => {
                close(list, &mut open, Phase::Forward, "failed", Some(error));
            }
            HistoryEvent::Cancelled => close(list, &mut open, Phase::Forward, "cancelled", None),
            HistoryEvent::Compensated => {
                close(list, &mut open, Phase::Compensate, "completed", None);
            }
            HistoryEvent::CompensationFailed { error } => {
                close(list, &mut open, Phase::Compensate, "failed", Some(error));
            }
            HistoryEvent::Skipped => {
                let mut bar = Bar::open("skipped", Phase::Forward, entry.attempt, entry.at);
                bar.end = Some(entry.at);
                bar.outcome = "skipped";
                list.push(bar);
            }
            _ => {}
        }
    }
    lanes
}

/// The fan-out or plain step a lane name belongs to: `charge[2]` → `charge`.
fn base(name: &str) -> &str {
    name.split_once('[').map_or(name, |(b, _)| b)
}

fn parsed(p: Option<&multiagents::core::Payload>) -> Value {
    p.and_then(|p| p.parse().ok()).unwrap_or(Value::Null)
}

/// The state of a lane: the step's, or the branch's in its fan-out.
fn lane_state<'a>(state: &'a WorkflowState, name: &str) -> Option<&'a StepState> {
    let step = state.steps.iter().find(|s| s.name.as_str() == base(name))?;
    if step.name.as_str() == name {
        return Some(step);
    }
    step.items.iter().find(|i| i.name.as_str() == name)
}

/// An LLM step's token use, from the `_usage` of its output.
fn usage(output: &Value) -> Value {
    let Some(u) = output.get(multiagents::llm::USAGE_KEY) else {
        return Value::Null;
    };
    let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
    let completion = u["completion_tokens"].as_u64().unwrap_or(0);
    let mut v = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    });
    if let Some(cost) = u.get("cost_usd").and_then(Value::as_f64) {
        v["cost_usd"] = json!(cost);
    }
    v
}

/// The timeline of `state`, whose definition is `def` (when still deployed).
pub(crate) fn timeline(state: &WorkflowState, def: Option<&WorkflowDefinition>) -> Value {
    let found = bars(state);
    let mut lanes = Vec::new();
    // Every step of the definition gets a lane, in its order, even when it
    // never ran; a fan-out's branches follow their step.
    let order: Vec<StepName> = state.steps.iter().map(|s| s.name.clone()).collect();
    let mut by_name: HashMap<&str, &Vec<Bar>> =
        found.iter().map(|(n, b)| (n.as_str(), b)).collect();
    for step in &order {
        let st = lane_state(state, step.as_str());
        let sdef = def.and_then(|d| d.steps().iter().find(|s| &s.name == step));
        let kind = match sdef.map(|s| &s.kind) {
            Some(StepKind::Task { .. }) => "task",
            Some(StepKind::Sleep { .. }) => "sleep",
            Some(StepKind::Signal(_)) => "signal",
            Some(StepKind::Workflow(_)) => "workflow",
            None => "unknown",
        };
        let input = match sdef.and_then(|s| s.input_from.as_ref()) {
            Some(from) => parsed(state.output(from.as_str())),
            None => parsed(Some(&state.input)),
        };
        let mut lane = lane_json(step.as_str(), st, by_name.remove(step.as_str()), input);
        lane["kind"] = json!(kind);
        lane["group"] = json!(sdef.and_then(|s| s.group.clone()));
        if let Some(StepKind::Signal(w)) = sdef.map(|s| &s.kind) {
            lane["signal"] = json!(w.name);
        }
        if let Some(StepKind::Task { worker }) = sdef.map(|s| &s.kind) {
            lane["worker"] = json!(worker);
        }
        lane["compensable"] = json!(sdef.is_some_and(|s| s.compensation.is_some()));
        let branches: Vec<Value> = st
            .into_iter()
            .flat_map(|s| s.items.iter())
            .map(|item| {
                let input = parsed(item.input.as_ref());
                let mut l = lane_json(
                    item.name.as_str(),
                    Some(item),
                    by_name.remove(item.name.as_str()),
                    input,
                );
                l["kind"] = json!(kind);
                l["branch_of"] = json!(step);
                l
            })
            .collect();
        lanes.push(lane);
        lanes.extend(branches);
    }
    let markers: Vec<Value> = state
        .history
        .iter()
        .filter_map(|h| {
            let what = match &h.event {
                HistoryEvent::Started => "started".to_string(),
                HistoryEvent::Failed { .. } => format!("step `{}` failed", h.step.as_ref()?),
                HistoryEvent::CancelRequested { reason } => format!("cancel requested: {reason}"),
                HistoryEvent::DeadlineExceeded => "deadline passed".to_string(),
                HistoryEvent::UndoRequested { reason } => format!("undo requested: {reason}"),
                HistoryEvent::Finished { status } => format!("finished: {status}"),
                _ => return None,
            };
            Some(json!({"at": h.at, "what": what, "event": h.event}))
        })
        .collect();
    let retried = state.history.iter().find_map(|h| match &h.event {
        HistoryEvent::Retried { transaction_id, .. } => Some(transaction_id.to_string()),
        _ => None,
    });
    let retried_as = state.history.iter().find_map(|h| match &h.event {
        HistoryEvent::RetriedAs { transaction_id } => Some(transaction_id.to_string()),
        _ => None,
    });
    json!({
        "id": state.transaction_id,
        "workflow": state.workflow,
        "version": state.version,
        "status": state.status,
        "failure": state.failure,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "now": Timestamp::now(),
        "parent": state.parent.as_ref().map(|p| p.transaction_id.to_string()),
        "retry_of": retried,
        "retried_as": retried_as,
        "lanes": lanes,
        "markers": markers,
    })
}

fn lane_json(name: &str, st: Option<&StepState>, bars: Option<&Vec<Bar>>, input: Value) -> Value {
    let output = parsed(st.and_then(|s| s.output.as_ref()));
    json!({
        "step": name,
        "status": st.map(step_status),
        "attempts": st.map_or(0, |s| s.attempts),
        "compensation_attempts": st.map_or(0, |s| s.compensation_attempts),
        "input": input,
        "usage": usage(&output),
        "output": output,
        "last_error": st.and_then(|s| s.last_error.as_deref()),
        "bars": bars.map(|b| b.iter().map(Bar::to_json).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

/// A step's status by name (`pending`, `running`, `completed`, …): the
/// state's tag, without the attempt and deadline it carries.
fn step_status(step: &StepState) -> Value {
    match serde_json::to_value(step.status) {
        Ok(Value::Object(m)) => m.get("state").cloned().unwrap_or(Value::Null),
        Ok(other) => other,
        Err(_) => Value::Null,
    }
}

/// `GET /v1/runs/{id}/timeline`.
pub(crate) async fn route(
    State(service): State<Service>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = crate::runs::run_id(&id)?;
    let Some(state) = service.client().status(id).await? else {
        return Err(Problem::not_found(format!(
            "no run {id} (it may have expired)"
        )));
    };
    let def = service
        .store()
        .definitions
        .get_definition(state.workflow.as_str(), state.version)
        .await
        .map_err(multiagents::Error::from)?;
    Ok(Json(timeline(&state, def.as_ref())).into_response())
}

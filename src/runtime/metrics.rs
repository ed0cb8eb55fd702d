//! The orchestrator's metrics, with their handles kept per label set so that
//! recording one is a map lookup under a read lock, not a registration.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;

use metrics::{Counter, Histogram};

use crate::core::saga::{Input, StatusUpdate};
use crate::core::workflow::StepKind;
use crate::core::{
    Phase, StepName, StepStatus, Timestamp, WorkflowName, WorkflowState, WorkflowStatus,
};
use crate::monitoring::metrics::{
    STEP_DURATION, STEP_RETRIES, WORKFLOWS_FINISHED, WORKFLOWS_STARTED, enabled,
};

/// Handles by label set, made on first use.
struct Handles<K, H> {
    map: RwLock<HashMap<K, H>>,
}

impl<K: Eq + Hash + Clone, H: Clone> Handles<K, H> {
    fn new() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K, make: impl FnOnce() -> H) -> H {
        if let Some(h) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return h.clone();
        }
        let h = make();
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_insert(h)
            .clone()
    }
}

pub(crate) struct EngineMetrics {
    started: Handles<WorkflowName, Counter>,
    finished: Handles<(WorkflowName, &'static str), Counter>,
    /// By workflow, then step: one histogram per (phase, outcome). Looked
    /// up by reference, so that recording clones no shared names.
    duration: RwLock<HashMap<WorkflowName, HashMap<StepName, [Histogram; 4]>>>,
    retries: Handles<(WorkflowName, StepName, Phase), Counter>,
}

impl EngineMetrics {
    pub(crate) fn new() -> Self {
        Self {
            started: Handles::new(),
            finished: Handles::new(),
            duration: RwLock::new(HashMap::new()),
            retries: Handles::new(),
        }
    }

    /// Before a result is applied: how long its step was out.
    pub(crate) fn result(&self, state: &WorkflowState, input: &Input, now: Timestamp) {
        if !enabled() {
            return;
        }
        let (step, phase, attempt, ok) = match input {
            Input::Succeeded {
                step,
                phase,
                attempt,
                ..
            } => (step, *phase, *attempt, true),
            Input::Failed {
                step,
                phase,
                attempt,
                ..
            } => (step, *phase, *attempt, false),
            _ => return,
        };
        let Some(s) = state.step(step.as_str()) else {
            return;
        };
        let dispatched = match (s.status, phase) {
            (
                StepStatus::Running {
                    attempt: a,
                    dispatched_at,
                    ..
                },
                Phase::Forward,
            )
            | (
                StepStatus::Compensating {
                    attempt: a,
                    dispatched_at,
                    ..
                },
                Phase::Compensate,
            ) if a == attempt => dispatched_at,
            _ => return,
        };
        let slot = usize::from(phase == Phase::Compensate) * 2 + usize::from(!ok);
        let seconds = now.since(dispatched).as_secs_f64();
        if let Some(h) = self
            .duration
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&state.workflow)
            .and_then(|steps| steps.get(step))
        {
            h[slot].record(seconds);
            return;
        }
        let make = |phase: Phase, ok: bool| {
            metrics::histogram!(
                STEP_DURATION,
                "workflow" => state.workflow.to_string(),
                "step" => step.to_string(),
                "phase" => phase.to_string(),
                "outcome" => if ok { "ok" } else { "error" },
            )
        };
        let mut map = self.duration.write().unwrap_or_else(|e| e.into_inner());
        let h = map
            .entry(state.workflow.clone())
            .or_default()
            .entry(step.clone())
            .or_insert_with(|| {
                [
                    make(Phase::Forward, true),
                    make(Phase::Forward, false),
                    make(Phase::Compensate, true),
                    make(Phase::Compensate, false),
                ]
            });
        h[slot].record(seconds);
    }

    /// Makes every series of `def` exist, at zero, before anything happens
    /// to its runs: Prometheus users alert on absent series. The started
    /// count, each terminal status, and each step's retries (of its
    /// compensation too, when it has one).
    pub(crate) fn known(&self, def: &crate::core::WorkflowDefinition) {
        if !enabled() {
            return;
        }
        let workflow = def.name();
        self.started
            .get(
                workflow,
                || metrics::counter!(WORKFLOWS_STARTED, "workflow" => workflow.to_string()),
            )
            .increment(0);
        for status in WorkflowStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            let status = status.as_str();
            self.finished
                .get(&(workflow.clone(), status), || {
                    metrics::counter!(
                        WORKFLOWS_FINISHED,
                        "workflow" => workflow.to_string(),
                        "status" => status,
                    )
                })
                .increment(0);
        }
        for step in def.steps() {
            let undone = step.compensation.is_some() || matches!(step.kind, StepKind::Workflow(_));
            let phases: &[Phase] = if undone {
                &[Phase::Forward, Phase::Compensate]
            } else {
                &[Phase::Forward]
            };
            for &phase in phases {
                self.retries
                    .get(&(workflow.clone(), step.name.clone(), phase), || {
                        metrics::counter!(
                            STEP_RETRIES,
                            "workflow" => workflow.to_string(),
                            "step" => step.name.to_string(),
                            "phase" => phase.to_string(),
                        )
                    })
                    .increment(0);
            }
        }
    }

    pub(crate) fn status(&self, state: &WorkflowState, update: &StatusUpdate) {
        if !enabled() {
            return;
        }
        match update {
            StatusUpdate::Started => self
                .started
                .get(&state.workflow, || {
                    metrics::counter!(WORKFLOWS_STARTED, "workflow" => state.workflow.to_string())
                })
                .increment(1),
            StatusUpdate::Finished { status } => {
                let status = status.as_str();
                self.finished
                    .get(&(state.workflow.clone(), status), || {
                        metrics::counter!(
                            WORKFLOWS_FINISHED,
                            "workflow" => state.workflow.to_string(),
                            "status" => status,
                        )
                    })
                    .increment(1)
            }
            _ => {}
        }
    }

    pub(crate) fn dispatch(
        &self,
        state: &WorkflowState,
        step: &StepName,
        phase: Phase,
        attempt: u32,
    ) {
        if attempt > 1 {
            self.retries
                .get(&(state.workflow.clone(), step.clone(), phase), || {
                    metrics::counter!(
                        STEP_RETRIES,
                        "workflow" => state.workflow.to_string(),
                        "step" => step.to_string(),
                        "phase" => phase.to_string(),
                    )
                })
                .increment(1);
        }
    }
}

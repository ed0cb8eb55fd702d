//! Without the `otel` feature: the runtime's span hooks, doing nothing.

use crate::core::{Event, Phase, StepName, WorkflowState};

pub(crate) fn dispatch(
    _state: &WorkflowState,
    _step: &StepName,
    _phase: Phase,
    _attempt: u32,
    _worker: &str,
) -> Option<String> {
    None
}

pub(crate) fn workflow_finished(_state: &WorkflowState) {}

/// Never built: there is no span to hold.
pub(crate) enum CallSpan {}

impl CallSpan {
    pub(crate) fn start(_event: &Event, _worker: &str, _instance: &str) -> Option<Self> {
        None
    }

    pub(crate) fn traceparent(&self) -> &str {
        match *self {}
    }

    pub(crate) fn end(self, _error: Option<&str>) {
        match self {}
    }
}

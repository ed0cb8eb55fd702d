//! Fan-out: one branch per item, as many at once as the bound allows, and
//! the step completed with every branch's output once all have.

use super::{HistoryEvent, Slot, StepState, StepStatus, Transition};
use crate::payload::Payload;

impl Transition<'_> {
    /// Makes one branch per item and starts as many as the bound allows.
    pub(super) fn fan_out(&mut self, i: usize, items: Vec<serde_json::Value>) -> bool {
        let name = self.state.steps[i].name.clone();
        let count = items.len();
        self.state.steps[i].items = items
            .into_iter()
            .enumerate()
            .map(|(k, item)| {
                let mut branch = StepState::pending(format!("{name}[{k}]").into());
                branch.input = Some(Payload::to_json(&item).unwrap_or_else(|_| Payload::null()));
                branch
            })
            .collect();
        self.state.steps[i].status = StepStatus::Branching;
        self.state.steps[i].attempts = 1;
        self.record(
            Some(i),
            1,
            HistoryEvent::FannedOut {
                items: count as u32,
            },
        );
        self.top_up(i)
    }

    /// Starts pending branches of fan-out `i` up to its bound, and completes
    /// it once every branch has. True if it completed.
    pub(super) fn top_up(&mut self, i: usize) -> bool {
        let limit = self.def.steps()[i]
            .for_each
            .as_ref()
            .map_or(1, |f| f.max_concurrency) as usize;
        let items = &self.state.steps[i].items;
        let running = items.iter().filter(|b| is_active(&b.status)).count();
        let pending: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, b)| b.status == StepStatus::Pending)
            .map(|(k, _)| k)
            .collect();
        for k in pending.into_iter().take(limit.saturating_sub(running)) {
            self.dispatch_slot(
                Slot {
                    step: i,
                    item: Some(k),
                },
                1,
            );
        }
        let done = self.state.steps[i]
            .items
            .iter()
            .all(|b| b.status == StepStatus::Completed);
        if done {
            let mut list = String::from("[");
            for (k, b) in self.state.steps[i].items.iter().enumerate() {
                if k > 0 {
                    list.push(',');
                }
                list.push_str(b.output.as_ref().map_or("null", |o| o.as_raw().get()));
            }
            list.push(']');
            let output = Payload::from_json_str(list).unwrap_or_else(|_| Payload::null());
            self.complete(Slot::step(i), 1, output);
        }
        done
    }
}

/// True while a branch holds one of its fan-out's places.
fn is_active(status: &StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Running { .. } | StepStatus::RetryWaiting { .. }
    )
}

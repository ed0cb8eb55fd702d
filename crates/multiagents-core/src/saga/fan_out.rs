//! Fan-out: one branch per item, as many at once as the bound allows, and
//! the step completed with every branch's output once all have.

use super::state::{ACTIVE, FIRST_PENDING, UNFINISHED};
use super::{HistoryEvent, Slot, StepState, StepStatus, Transition};
use crate::chunked::CHUNK;
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
        // Counted per chunk of branches and kept until the chunk changes: a
        // branch's answer recounts its own chunk, not every branch.
        let items = &self.state.steps[i].items;
        let running: u64 = items
            .summaries(ACTIVE, |c| {
                c.iter().filter(|b| is_active(&b.status)).count() as u64
            })
            .sum();
        let first = items
            .summaries(FIRST_PENDING, |c| {
                c.iter()
                    .position(|b| b.status == StepStatus::Pending)
                    .map_or(u64::MAX, |k| k as u64)
            })
            .enumerate()
            .find(|(_, k)| *k != u64::MAX)
            .map(|(c, k)| c * CHUNK + k as usize);
        let room = limit.saturating_sub(running as usize);
        let pending: Vec<usize> = match first {
            Some(first) if room > 0 => (first..items.len())
                .filter(|&k| items[k].status == StepStatus::Pending)
                .take(room)
                .collect(),
            _ => Vec::new(),
        };
        for k in pending {
            self.dispatch_slot(
                Slot {
                    step: i,
                    item: Some(k),
                },
                1,
            );
        }
        let unfinished: u64 = self.state.steps[i]
            .items
            .summaries(UNFINISHED, |c| {
                c.iter()
                    .filter(|b| b.status != StepStatus::Completed)
                    .count() as u64
            })
            .sum();
        let done = unfinished == 0;
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

//! Sub-workflows: a step that runs a workflow of its own. The child's id
//! is derived from the parent's, the step and the attempt, so that every
//! replica names the same child, and a start sent twice starts it once.

use super::{Action, ParentLink, Slot, StartChild, Transition};
use crate::event::{Phase, StepError};
use crate::ids::TransactionId;
use crate::time::format_duration;
use crate::workflow::StepKind;

impl Transition<'_> {
    /// The child transaction a sub-workflow step's attempt runs.
    pub(super) fn child_id(&self, i: usize, attempt: u32) -> TransactionId {
        let name = self.state.steps[i].name.as_str();
        let bytes = self.state.transaction_id.as_uuid().as_bytes();
        let input = || {
            bytes
                .iter()
                .chain(name.as_bytes())
                .copied()
                .chain(attempt.to_le_bytes())
        };
        // Two different hashes of the same bytes fill the 128 bits.
        let h1 = crate::hash::fnv1a(input());
        let h2 = input().fold(0x8422_2325_cbf2_9ce4_u64, |h, b| {
            (h ^ u64::from(b))
                .rotate_left(5)
                .wrapping_mul(crate::hash::GOLDEN)
        });
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&h1.to_be_bytes());
        out[8..].copy_from_slice(&h2.to_be_bytes());
        TransactionId(uuid::Builder::from_custom_bytes(out).into_uuid())
    }

    pub(super) fn parent_link(&self, i: usize, attempt: u32) -> ParentLink {
        ParentLink {
            transaction_id: self.state.transaction_id,
            workflow: self.state.workflow.clone(),
            step: self.state.steps[i].name.clone(),
            attempt,
            depth: self.state.parent.as_ref().map_or(0, |p| p.depth) + 1,
        }
    }

    /// What starts the child of attempt `attempt` (forward), or undoes the
    /// child the step's forward run started (compensate, `attempt` being the
    /// compensation's).
    pub(super) fn child_action(&self, slot: Slot, phase: Phase, attempt: u32) -> Action {
        match phase {
            Phase::Forward => {
                let StepKind::Workflow(child) = &self.def.steps()[slot.step].kind else {
                    unreachable!("child_action is called for sub-workflow steps only")
                };
                Action::StartChild(Box::new(StartChild {
                    parent: self.parent_link(slot.step, attempt),
                    transaction_id: self.child_id(slot.step, attempt),
                    workflow: child.workflow.clone(),
                    version: child.version,
                    input: self.step_input(slot.step).clone(),
                }))
            }
            Phase::Compensate => Action::UndoChild {
                parent: Box::new(self.parent_link(slot.step, attempt)),
                transaction_id: self.child_id(slot.step, self.slot(slot).attempts),
            },
        }
    }

    /// A sub-workflow step passed its deadline. The child may still be
    /// running: stop it, and do not start another next to it.
    pub(super) fn child_timed_out(&mut self, slot: Slot, attempt: u32) {
        let def = &self.def.steps()[slot.step];
        let StepKind::Workflow(child) = &def.kind else {
            return;
        };
        let timeout = format_duration(def.timeout);
        let error = StepError::fatal(format!(
            "sub-workflow `{}` did not finish within {timeout}",
            child.workflow
        ))
        .with_kind("timeout");
        let transaction_id = self.child_id(slot.step, attempt);
        self.fail_for_good(slot, attempt, error);
        self.actions.push(Action::CancelChild {
            transaction_id,
            reason: format!("its parent step timed out after {timeout}"),
        });
    }
}

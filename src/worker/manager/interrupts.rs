//! The calls that can be interrupted, and the copies of a running
//! attempt that must not run again.

use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::bus::{DeliveryId, Interrupt};
use crate::core::{Event, Phase, StepName, TransactionId};

/// The calls of this process that take more than one poll, by (workflow,
/// step, attempt), so that an [`Interrupt`] can cancel their context. Calls
/// that finish on their first poll (most) are never registered.
#[derive(Default)]
pub(super) struct Interrupts {
    pub(super) inner: std::sync::Mutex<InterruptsInner>,
    /// How many calls are registered, so that the duplicate check of every
    /// command takes no lock while none is.
    pub(super) registered: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
pub(super) struct InterruptsInner {
    /// Calls still running after their first poll, with the delivery each
    /// came in.
    pub(super) running:
        crate::core::hash::IdMap<(TransactionId, StepName, u32), (CancellationToken, DeliveryId)>,
    /// Interrupts for calls not (yet) registered here, newest last: a call
    /// registered just after its interrupt came is still cancelled.
    pub(super) recent: std::collections::VecDeque<Interrupt>,
}

/// How many unmatched interrupts are remembered.
pub(super) const RECENT_INTERRUPTS: usize = 256;

impl Interrupts {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, InterruptsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn interrupt(&self, i: Interrupt) {
        let mut inner = self.lock();
        let key = (i.transaction_id, i.step.clone(), i.attempt);
        match inner.running.get(&key) {
            Some((token, _)) => {
                tracing::info!(transaction_id = %i.transaction_id, step = %i.step, attempt = i.attempt, "call interrupted: its result is no longer wanted");
                token.cancel();
            }
            None => {
                if inner.recent.len() >= RECENT_INTERRUPTS {
                    inner.recent.pop_front();
                }
                inner.recent.push_back(i);
            }
        }
    }

    pub(super) fn register(
        &self,
        key: (TransactionId, StepName, u32),
        token: &CancellationToken,
        delivery: &DeliveryId,
    ) {
        let mut inner = self.lock();
        let early = inner
            .recent
            .iter()
            .any(|i| i.transaction_id == key.0 && i.step == key.1 && i.attempt == key.2);
        if early {
            token.cancel();
        }
        if inner
            .running
            .insert(key, (token.clone(), delivery.clone()))
            .is_none()
        {
            self.registered.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn unregister(&self, key: &(TransactionId, StepName, u32)) {
        if self.lock().running.remove(key).is_some() {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The delivery of a call of this attempt running here, if any: a
    /// second command for it is a copy (republished by the recovery sweep,
    /// or redelivered while the first still runs).
    pub(super) fn running(&self, event: &Event) -> Option<DeliveryId> {
        if self.registered.load(Ordering::Relaxed) == 0 || event.phase != Phase::Forward {
            return None;
        }
        let step = event.step.clone()?;
        self.lock()
            .running
            .get(&(event.transaction_id, step, event.attempt))
            .map(|(_, id)| id.clone())
    }
}

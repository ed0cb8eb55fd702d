//! Clients of this process waiting for workflows to finish, for the stores
//! that announce finished workflows to other processes (Redis Pub/Sub,
//! PostgreSQL `NOTIFY`): registered by workflow, handed the state when this
//! process wrote it finished, or woken to read it when another process
//! announced it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{StoreError, Versioned};
use crate::core::hash::IdMap;
use crate::core::{TransactionId, WorkflowState};

type Waiting = Vec<oneshot::Sender<Option<Versioned>>>;

/// The waiters of one store, by workflow.
#[derive(Default)]
pub(crate) struct Waiters(Mutex<IdMap<TransactionId, Waiting>>);

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<TransactionId, Waiting>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process wrote `state` finished: its waiters get it, as
    /// committed, without reading it back.
    pub(crate) fn hand_over(&self, version: super::Version, state: &Arc<WorkflowState>) {
        let waiting = self.lock().remove(&state.transaction_id);
        for w in waiting.into_iter().flatten() {
            let _ = w.send(Some(Versioned {
                version,
                state: state.clone(),
            }));
        }
    }

    /// Another process announced `tx` finished: its waiters read it.
    pub(crate) fn wake(&self, tx: TransactionId) {
        for w in self.lock().remove(&tx).into_iter().flatten() {
            let _ = w.send(None);
        }
    }

    /// The announcements may have been missed (the listener reconnected):
    /// every waiter reads again.
    pub(crate) fn wake_all(&self) {
        for (_, waiting) in self.lock().drain() {
            for w in waiting {
                let _ = w.send(None);
            }
        }
    }

    /// Waits until `tx` is terminal or `timeout` passes; returns its last
    /// state either way (`None` if it does not exist). `finished` reads
    /// whether it is (a small read: its status), `get` reads it whole,
    /// once, when it is the one to return; between reads it sleeps until
    /// woken or `nap` passes (an announcement may be lost).
    pub(crate) async fn wait<F, G>(
        &self,
        tx: TransactionId,
        timeout: Duration,
        nap: Duration,
        finished: impl Fn() -> F,
        get: impl FnOnce() -> G,
    ) -> Result<Option<Versioned>, StoreError>
    where
        F: Future<Output = Result<bool, StoreError>>,
        G: Future<Output = Result<Option<Versioned>, StoreError>>,
    {
        let mut get = Some(get);
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let (sender, woken) = oneshot::channel();
            self.lock().entry(tx).or_default().push(sender);
            if finished().await? || tokio::time::Instant::now() >= until {
                let get = get.take().expect("read once: it returns");
                let current = get().await?;
                let mut waiting = self.lock();
                if let Some(list) = waiting.get_mut(&tx) {
                    list.retain(|s| !s.is_closed());
                    if list.is_empty() {
                        waiting.remove(&tx);
                    }
                }
                return Ok(current);
            }
            let nap = (until - tokio::time::Instant::now()).min(nap);
            if let Ok(Ok(Some(written))) = tokio::time::timeout(nap, woken).await {
                // Written finished by this process: the state itself.
                return Ok(Some(written));
            }
        }
    }
}

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
pub(crate) struct Waiters(Mutex<Board>);

#[derive(Default)]
struct Board {
    waiting: IdMap<TransactionId, Waiting>,
    /// Workflows this process is writing finished, with how many such
    /// writes are under way: their announcements are theirs, and may come
    /// back before the write's own reply.
    writing: IdMap<TransactionId, u32>,
}

/// A write of a finished state under way (see [`Waiters::writing`]).
pub(crate) struct Writing<'a> {
    waiters: &'a Waiters,
    tx: TransactionId,
    handed: bool,
}

impl Writing<'_> {
    /// The write committed `state` at `version`: the waiters get it, as
    /// committed, without reading it back.
    pub(crate) fn hand_over(mut self, version: super::Version, state: &Arc<WorkflowState>) {
        self.handed = true;
        let waiting = {
            let mut board = self.waiters.lock();
            board.unmark(self.tx);
            board.waiting.remove(&self.tx)
        };
        for w in waiting.into_iter().flatten() {
            let _ = w.send(Some(Versioned {
                version,
                state: state.clone(),
            }));
        }
    }
}

impl Drop for Writing<'_> {
    /// Not handed over (refused, failed, its reply lost): the waiters read
    /// again, in case it committed all the same.
    fn drop(&mut self) {
        if !self.handed {
            let mut board = self.waiters.lock();
            board.unmark(self.tx);
            let waiting = board.waiting.remove(&self.tx);
            drop(board);
            for w in waiting.into_iter().flatten() {
                let _ = w.send(None);
            }
        }
    }
}

impl Board {
    fn unmark(&mut self, tx: TransactionId) {
        if let Some(n) = self.writing.get_mut(&tx) {
            *n -= 1;
            if *n == 0 {
                self.writing.remove(&tx);
            }
        }
    }
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process is about to write `tx` finished. Until the returned
    /// guard is handed the committed state (or dropped), an announcement
    /// of `tx` is taken for this write's own, which the store may hear
    /// before the write's reply: the waiters are not woken to read what
    /// they are about to be handed.
    pub(crate) fn writing(&self, tx: TransactionId) -> Writing<'_> {
        *self.lock().writing.entry(tx).or_default() += 1;
        Writing {
            waiters: self,
            tx,
            handed: false,
        }
    }

    /// An announcement that `tx` finished: its waiters read it, unless this
    /// process is writing it finished (they are handed the state then).
    pub(crate) fn wake(&self, tx: TransactionId) {
        let waiting = {
            let mut board = self.lock();
            if board.writing.contains_key(&tx) {
                return;
            }
            board.waiting.remove(&tx)
        };
        for w in waiting.into_iter().flatten() {
            let _ = w.send(None);
        }
    }

    /// The announcements may have been missed (the listener reconnected):
    /// every waiter reads again.
    pub(crate) fn wake_all(&self) {
        for (_, waiting) in self.lock().waiting.drain() {
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
            self.lock().waiting.entry(tx).or_default().push(sender);
            if finished().await? || tokio::time::Instant::now() >= until {
                let get = get.take().expect("read once: it returns");
                let current = get().await?;
                let mut board = self.lock();
                if let Some(list) = board.waiting.get_mut(&tx) {
                    list.retain(|s| !s.is_closed());
                    if list.is_empty() {
                        board.waiting.remove(&tx);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::saga;
    use crate::core::{CorrelationId, Payload, Timestamp, WorkflowBuilder};

    fn state() -> Arc<WorkflowState> {
        let def = WorkflowBuilder::new("w")
            .step("a", "x")
            .build()
            .expect("valid");
        let (s, _) = saga::start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            Payload::null(),
            Timestamp(1),
        );
        Arc::new(s)
    }

    /// Waits on `tx` in a task; `reads` counts the whole-state reads.
    fn waiter(
        waiters: &Arc<Waiters>,
        tx: TransactionId,
        reads: &Arc<std::sync::atomic::AtomicU32>,
        finished: &Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<Option<Versioned>> {
        let (waiters, reads, finished) = (waiters.clone(), reads.clone(), finished.clone());
        tokio::spawn(async move {
            let ordering = std::sync::atomic::Ordering::SeqCst;
            waiters
                .wait(
                    tx,
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                    || {
                        let finished = finished.load(ordering);
                        async move { Ok(finished) }
                    },
                    || {
                        reads.fetch_add(1, ordering);
                        async { Ok(None) }
                    },
                )
                .await
                .expect("waits")
        })
    }

    /// Lets the spawned waiter register.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_announcement_of_a_write_of_this_process_does_not_wake_its_waiters_to_read() {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let waiters = Arc::new(Waiters::default());
        let s = state();
        let tx = s.transaction_id;
        let (reads, finished) = (
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let waiting = waiter(&waiters, tx, &reads, &finished);
        settle().await;

        // The write's announcement comes back before its reply.
        let writing = waiters.writing(tx);
        finished.store(true, Ordering::SeqCst);
        waiters.wake(tx);
        settle().await;
        assert!(
            !waiting.is_finished(),
            "woken by its own write's announcement"
        );

        writing.hand_over(7, &s);
        let got = waiting.await.expect("joins").expect("handed the state");
        assert_eq!(got.version, 7);
        assert!(
            Arc::ptr_eq(&got.state, &s),
            "the state written, not a copy read back"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 0, "nothing read back");

        // The mark is gone: a later announcement wakes waiters as before.
        finished.store(false, Ordering::SeqCst);
        let waiting = waiter(&waiters, tx, &reads, &finished);
        settle().await;
        finished.store(true, Ordering::SeqCst);
        waiters.wake(tx);
        assert!(waiting.await.expect("joins").is_none());
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "read once it was announced"
        );
    }

    #[tokio::test]
    async fn a_write_that_hands_nothing_over_wakes_its_waiters_to_read() {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let waiters = Arc::new(Waiters::default());
        let tx = state().transaction_id;
        let (reads, finished) = (
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let waiting = waiter(&waiters, tx, &reads, &finished);
        settle().await;

        // Its reply was lost, though it may have committed.
        let writing = waiters.writing(tx);
        waiters.wake(tx);
        finished.store(true, Ordering::SeqCst);
        drop(writing);
        assert!(waiting.await.expect("joins").is_none());
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "read again after the failed write"
        );
    }
}

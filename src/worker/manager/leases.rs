//! The commands a runner holds, and the task that extends their leases
//! while they run.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::{Consumer, DeliveryId};

/// Deliveries held by a runner, by consumer (priority level).
#[derive(Default)]
pub(super) struct Held {
    pub(super) ids: std::sync::Mutex<crate::core::hash::IdMap<DeliveryId, usize>>,
}

impl Held {
    pub(super) fn insert(&self, id: DeliveryId, level: usize) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, level);
    }

    pub(super) fn remove(&self, ids: &[DeliveryId]) {
        let mut held = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            held.remove(id);
        }
    }

    /// The ids held, by level.
    pub(super) fn by_level(&self, levels: usize) -> Vec<Vec<DeliveryId>> {
        let mut out = vec![Vec::new(); levels];
        for (id, level) in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(ids) = out.get_mut(*level) {
                ids.push(id.clone());
            }
        }
        out
    }
}

/// Extends the leases of every command a runner holds, every
/// [`Consumer::extend_every`], until aborted: a call may take as long as it
/// needs and is never redelivered while this process lives.
pub(super) async fn extend_leases(
    consumers: Vec<Arc<dyn Consumer>>,
    held: Arc<Held>,
    worker: String,
) {
    let every = consumers
        .first()
        .map_or(Duration::from_secs(1), |c| c.extend_every());
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for (ids, consumer) in held.by_level(consumers.len()).iter().zip(&consumers) {
            if ids.is_empty() {
                continue;
            }
            if let Err(e) = consumer.extend(ids).await {
                tracing::warn!(worker, error = %e, commands = ids.len(), "extending command leases failed; retrying at the next beat");
            }
        }
    }
}

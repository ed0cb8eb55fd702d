//! The flusher: publishes answers and acks their commands together, as
//! many as are ready.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::{Consumer, DeliveryId, RESULTS_TOPIC};
use crate::core::Event;

use super::*;

/// Answers taken at once by the flusher.
pub(super) const FLUSH_BATCH: usize = 256;

/// Answers to publish, and the commands they ack.
pub(super) type Answers = (Vec<DeliveryId>, Vec<(String, Event)>);

/// Publishes answers and acks their commands (a stale command is acked
/// without one), as many as are ready in one go. The ack comes only with the
/// answer: a crash before it redelivers the command, and the idempotency key
/// keeps the side effect single.
pub(super) async fn flush(
    consumers: Vec<Arc<dyn Consumer>>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<(usize, DeliveryId, Option<Event>)>,
    worker: String,
    held: Arc<Held>,
) {
    let mut taken = Vec::with_capacity(FLUSH_BATCH);
    // Kept from batch to batch, emptied after each.
    let mut by_level: Vec<Answers> = consumers.iter().map(|_| Answers::default()).collect();
    while let Some(first) = queue.recv().await {
        taken.push(first);
        while taken.len() < FLUSH_BATCH {
            match queue.try_recv() {
                Ok(next) => taken.push(next),
                Err(_) => break,
            }
        }
        // Each answer is acked on the topic its command came from (almost
        // always the normal one: then the batch goes as it is).
        for (level, id, reply) in taken.drain(..) {
            let (ids, events) = &mut by_level[level];
            ids.push(id);
            events.extend(reply.map(|r| (RESULTS_TOPIC.to_string(), r)));
        }
        for ((ids, events), consumer) in by_level.iter_mut().zip(&consumers) {
            if !ids.is_empty() {
                publish_answers(consumer.as_ref(), events, ids, &worker).await;
                // Acked, or left to be redelivered: either way no longer ours.
                held.remove(ids);
                ids.clear();
                events.clear();
            }
        }
    }
}

pub(super) async fn publish_answers(
    consumer: &dyn Consumer,
    events: &[(String, Event)],
    ids: &[DeliveryId],
    worker: &str,
) {
    // A lost connection comes back by itself (a restarting server within
    // seconds): keep trying — the commands stay held, and their leases are
    // extended again as soon as the server answers — before leaving them to
    // be redelivered (and run again). A failure for good (an answer over the
    // size limit) is not tried again.
    let sent =
        crate::bus::retry_transient(ANSWER_RETRY, || consumer.publish_then_ack(events, ids)).await;
    if let Err(e) = sent {
        tracing::warn!(worker, error = %e, answers = ids.len(), "publishing answers failed; their commands will be redelivered");
    }
}

/// How long a worker keeps trying to publish its answers.
pub(super) const ANSWER_RETRY: Duration = Duration::from_secs(30);

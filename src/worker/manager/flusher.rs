//! The flusher: publishes answers and acks their commands together, as
//! many as are ready.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::{Consumer, DeliveryId, RESULTS_TOPIC};
use crate::core::Event;

use super::*;

/// Answers taken at once by the flusher.
pub(super) const FLUSH_BATCH: usize = 256;

/// Answers to publish, each with the command it acks (a stale command is
/// acked without one).
pub(super) type Answers = Vec<(DeliveryId, Option<(String, Event)>)>;

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
    let mut ids = Vec::with_capacity(FLUSH_BATCH);
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
            by_level[level].push((id, reply.map(|r| (RESULTS_TOPIC.to_string(), r))));
        }
        for (answers, consumer) in by_level.iter_mut().zip(&consumers) {
            if !answers.is_empty() {
                publish_answers(consumer.as_ref(), answers, &worker).await;
                // Acked, or left to be redelivered: either way no longer ours.
                ids.extend(answers.drain(..).map(|(id, _)| id));
                held.remove(&ids);
                ids.clear();
            }
        }
    }
}

/// Publishes `answers` and acks their commands. A lost connection comes
/// back by itself (a restarting server within seconds): a batch that fails
/// is tried again, in halves, and the halves of those, down to one answer
/// tried until [`ANSWER_RETRY`] has passed since the first try — the
/// commands stay held meanwhile, and their leases are extended again as
/// soon as the server answers — before the rest is left to be redelivered
/// (and run again). Halving keeps a failure that takes some of a batch
/// (a publish that went part of the way) from failing the whole of it
/// again and again: what went out goes again, harmlessly, and the rest
/// gets through. A failure for good (an answer over the size limit) is not
/// tried again.
pub(super) async fn publish_answers(
    consumer: &dyn Consumer,
    answers: &[(DeliveryId, Option<(String, Event)>)],
    worker: &str,
) {
    let until = tokio::time::Instant::now() + ANSWER_RETRY;
    let mut parts = vec![answers];
    let mut pause = Duration::from_millis(20);
    while let Some(part) = parts.pop() {
        let ids: Vec<DeliveryId> = part.iter().map(|(id, _)| id.clone()).collect();
        let events: Vec<(String, Event)> = part.iter().filter_map(|(_, e)| e.clone()).collect();
        let sent = if part.len() > 1 {
            consumer.publish_then_ack(&events, &ids).await
        } else {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            crate::bus::retry_transient(left, || consumer.publish_then_ack(&events, &ids)).await
        };
        match sent {
            Ok(()) => pause = Duration::from_millis(20),
            Err(e) if e.is_transient() && part.len() > 1 && tokio::time::Instant::now() < until => {
                let (first, second) = part.split_at(part.len() / 2);
                parts.push(second);
                parts.push(first);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => {
                tracing::warn!(worker, error = %e, answers = part.len(), "publishing answers failed; their commands will be redelivered");
            }
        }
    }
}

/// How long a worker keeps trying to publish its answers.
pub(super) const ANSWER_RETRY: Duration = Duration::from_secs(30);

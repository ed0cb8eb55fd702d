//! The flusher: publishes answers and acks their commands together, as
//! many as are ready.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use crate::bus::{Consumer, DeliveryId, RESULTS_TOPIC};
use crate::core::Event;

use super::*;

/// Answers taken at once by the flusher.
pub(super) const FLUSH_BATCH: usize = 256;

/// Answers to publish, each with the command it acks (a stale command is
/// acked without one). Kept as the two slices the bus takes, so a batch goes
/// out without a copy; `events_before` finds the events of any run of
/// answers when a failed batch is split.
#[derive(Default)]
pub(super) struct Answers {
    ids: Vec<DeliveryId>,
    events: Vec<(String, Event)>,
    /// `events_before[i]`: how many of the first `i` answers carry an event
    /// (one entry more than there are answers).
    events_before: Vec<usize>,
}

impl Answers {
    fn push(&mut self, id: DeliveryId, reply: Option<Event>) {
        if self.events_before.is_empty() {
            self.events_before.push(0);
        }
        self.ids.push(id);
        self.events
            .extend(reply.map(|r| (RESULTS_TOPIC.to_string(), r)));
        self.events_before.push(self.events.len());
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The events and command ids of the answers in `range`.
    fn part(&self, range: Range<usize>) -> (&[(String, Event)], &[DeliveryId]) {
        let events = self.events_before[range.start]..self.events_before[range.end];
        (&self.events[events], &self.ids[range])
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.events.clear();
        self.events_before.clear();
    }
}

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
            by_level[level].push(id, reply);
        }
        for (answers, consumer) in by_level.iter_mut().zip(&consumers) {
            if !answers.is_empty() {
                publish_answers(consumer.as_ref(), answers, &worker).await;
                // Acked, or left to be redelivered: either way no longer ours.
                held.remove(&answers.ids);
                answers.clear();
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
pub(super) async fn publish_answers(consumer: &dyn Consumer, answers: &Answers, worker: &str) {
    let until = tokio::time::Instant::now() + ANSWER_RETRY;
    // The runs of answers still to go, the next one last.
    let mut parts: Vec<Range<usize>> = Vec::with_capacity(8);
    parts.push(0..answers.len());
    let mut pause = Duration::from_millis(20);
    while let Some(part) = parts.pop() {
        let (events, ids) = answers.part(part.clone());
        let sent = if part.len() > 1 {
            consumer.publish_then_ack(events, ids).await
        } else {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            crate::bus::retry_transient(left, || consumer.publish_then_ack(events, ids)).await
        };
        match sent {
            Ok(()) => pause = Duration::from_millis(20),
            Err(e) if e.is_transient() && part.len() > 1 && tokio::time::Instant::now() < until => {
                let middle = part.start + part.len() / 2;
                parts.push(middle..part.end);
                parts.push(part.start..middle);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{CorrelationId, EventKind, Payload, TransactionId, WorkflowName};

    fn answer(n: u64) -> Event {
        let mut e = Event::new(
            EventKind::Result,
            TransactionId::new(),
            CorrelationId::new(),
            WorkflowName::new("w"),
            Payload::null(),
        );
        e.attempt = n as u32;
        e
    }

    #[test]
    fn every_part_holds_the_events_of_its_own_answers() {
        // Answers 0..10, those at 2, 3 and 7 stale (no event).
        let mut answers = Answers::default();
        for n in 0..10u64 {
            let stale = [2, 3, 7].contains(&n);
            answers.push(DeliveryId::Seq(n), (!stale).then(|| answer(n)));
        }
        for start in 0..=10 {
            for end in start..=10 {
                let (events, ids) = answers.part(start..end);
                let expected: Vec<u64> = (start as u64..end as u64)
                    .filter(|n| ![2, 3, 7].contains(n))
                    .collect();
                let got: Vec<u64> = events.iter().map(|(_, e)| u64::from(e.attempt)).collect();
                assert_eq!(got, expected, "events of {start}..{end}");
                assert_eq!(ids.len(), end - start);
                assert!(events.iter().all(|(topic, _)| topic == RESULTS_TOPIC));
            }
        }
        answers.clear();
        assert!(answers.is_empty());
        answers.push(DeliveryId::Seq(1), Some(answer(1)));
        assert_eq!(answers.part(0..1).0.len(), 1);
    }
}

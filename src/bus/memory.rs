//! The in-memory bus: the embedded default. It keeps the same contract as the
//! Redis Streams bus (groups, acks, redelivery after a visibility timeout,
//! dead letters after N deliveries) inside one process. It survives nothing:
//! when the process ends, what it held is gone, which is why the embedded
//! runtime republishes in-flight commands from the store when it starts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::{
    AuditedLetter, BusError, Consumer, DeadLetter, Delivery, DeliveryId, Interrupt, LocalLimits,
    LocalNotifier, Notifier, PlaceLimits, Places, Settlement, SharedLimits, Topics,
};
use crate::core::event::DEFAULT_MAX_EVENT_BYTES;
use crate::core::{Event, Timestamp};

/// Settings of a [`MemoryBus`].
#[derive(Clone, Debug)]
pub struct MemoryBusConfig {
    /// How long a delivery may stay unacked before it is delivered again.
    pub visibility_timeout: Duration,
    /// Deliveries after which an event is dead-lettered.
    pub max_deliveries: u32,
    /// Largest event accepted, in bytes (estimated: the bus does not encode).
    pub max_event_bytes: usize,
    /// How many dead letters to keep.
    pub dead_letter_capacity: usize,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(5),
            max_deliveries: 5,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            dead_letter_capacity: 10_000,
        }
    }
}

/// An in-process bus: [`Topics`], with a [`LocalNotifier`] and
/// [`LocalLimits`] of its own.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: MemoryBusConfig,
    topics: RwLock<crate::core::hash::IdMap<String, Arc<Topic>>>,
    dead: Mutex<DeadLetters>,
    notifier: LocalNotifier,
    limits: LocalLimits,
}

/// The dead-letter list and its audit log.
#[derive(Default)]
struct DeadLetters {
    letters: VecDeque<DeadLetter>,
    audit: VecDeque<AuditedLetter>,
    next_id: u64,
}

#[derive(Default)]
struct Topic {
    state: Mutex<TopicState>,
}

#[derive(Default)]
struct TopicState {
    groups: crate::core::hash::IdMap<String, Arc<Group>>,
    /// Events published while no group existed.
    backlog: VecDeque<Arc<Event>>,
}

struct Group {
    topic: String,
    name: String,
    state: Mutex<GroupState>,
    ready: Notify,
}

#[derive(Default)]
struct GroupState {
    next_id: u64,
    queue: VecDeque<(u64, Arc<Event>, u32)>,
    /// Deliveries not acked yet: the event, its delivery count and the end
    /// of its lease.
    pending: crate::core::hash::IdMap<u64, (Arc<Event>, u32, Instant)>,
    /// (visibility deadline, id, delivery count) in the order they were
    /// set; a deadline that an extension moved is skipped when it comes up.
    timeouts: VecDeque<(Instant, u64, u32)>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    /// A bus with default settings.
    pub fn new() -> Self {
        Self::with_config(MemoryBusConfig::default())
    }

    /// A bus with the given settings.
    pub fn with_config(config: MemoryBusConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                topics: RwLock::default(),
                dead: Mutex::new(DeadLetters::default()),
                notifier: LocalNotifier::new(),
                limits: LocalLimits::new(),
            }),
        }
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(t) = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return t.clone();
        }
        self.inner
            .topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Events waiting or unacked in `group` of `topic` (for tests and metrics).
    pub fn depth(&self, topic: &str, group: &str) -> usize {
        let t = self.topic(topic);
        let ts = t.state.lock().unwrap_or_else(|e| e.into_inner());
        match ts.groups.get(group) {
            Some(g) => {
                let gs = g.state.lock().unwrap_or_else(|e| e.into_inner());
                gs.queue.len() + gs.pending.len()
            }
            None => ts.backlog.len(),
        }
    }

    /// Publishes at once: nothing here waits.
    fn publish_now(&self, topic: &str, event: Event) -> Result<(), BusError> {
        let size = event.approx_size();
        if size > self.inner.config.max_event_bytes {
            return Err(BusError::TooLarge {
                topic: topic.into(),
                size,
                limit: self.inner.config.max_event_bytes,
            });
        }
        let event = Arc::new(event);
        let t = self.topic(topic);
        let ts = &mut *t.state.lock().unwrap_or_else(|e| e.into_inner());
        if ts.groups.is_empty() {
            ts.backlog.push_back(event);
            return Ok(());
        }
        for g in ts.groups.values() {
            {
                let mut gs = g.state.lock().unwrap_or_else(|e| e.into_inner());
                let id = gs.next_id;
                gs.next_id += 1;
                gs.queue.push_back((id, event.clone(), 0));
            }
            g.ready.notify_one();
        }
        Ok(())
    }

    fn push_dead(&self, mut letter: DeadLetter) {
        metrics::counter!(crate::monitoring::metrics::DEAD_LETTERS, "topic" => letter.topic.clone())
            .increment(1);
        let mut dead = self.inner.dead.lock().unwrap_or_else(|e| e.into_inner());
        if dead.letters.len() >= self.inner.config.dead_letter_capacity {
            dead.letters.pop_front();
        }
        tracing::warn!(topic = %letter.topic, reason = %letter.reason, "event dead-lettered");
        dead.next_id += 1;
        letter.id = dead.next_id.to_string();
        dead.letters.push_back(letter);
    }
}

fn body_of(event: &Event) -> String {
    serde_json::to_string(event).unwrap_or_else(|e| format!("<unencodable: {e}>"))
}

#[async_trait]
impl Topics for MemoryBus {
    async fn publish(&self, topic: &str, event: Event) -> Result<(), BusError> {
        self.publish_now(topic, event)
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        _consumer: &str,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        let t = self.topic(topic);
        let g = {
            let ts = &mut *t.state.lock().unwrap_or_else(|e| e.into_inner());
            let first = ts.groups.is_empty();
            let g = ts
                .groups
                .entry(group.to_string())
                .or_insert_with(|| {
                    Arc::new(Group {
                        topic: topic.to_string(),
                        name: group.to_string(),
                        state: Mutex::new(GroupState::default()),
                        ready: Notify::new(),
                    })
                })
                .clone();
            if first {
                let mut gs = g.state.lock().unwrap_or_else(|e| e.into_inner());
                while let Some(e) = ts.backlog.pop_front() {
                    let id = gs.next_id;
                    gs.next_id += 1;
                    gs.queue.push_back((id, e, 0));
                }
            }
            g
        };
        g.ready.notify_one();
        Ok(Arc::new(MemoryConsumer {
            bus: self.clone(),
            group: g,
        }))
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        self.push_dead(letter);
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let dead = self.inner.dead.lock().unwrap_or_else(|e| e.into_inner());
        Ok(dead
            .letters
            .iter()
            .rev()
            .take(limit)
            .rev()
            .cloned()
            .collect())
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        let dead = self.inner.dead.lock().unwrap_or_else(|e| e.into_inner());
        Ok(dead.letters.iter().find(|d| d.id == id).cloned())
    }

    async fn settle_dead_letter(
        &self,
        id: &str,
        settlement: &Settlement,
    ) -> Result<Option<DeadLetter>, BusError> {
        let mut dead = self.inner.dead.lock().unwrap_or_else(|e| e.into_inner());
        let Some(at) = dead.letters.iter().position(|d| d.id == id) else {
            return Ok(None);
        };
        let Some(letter) = dead.letters.remove(at) else {
            return Ok(None);
        };
        if dead.audit.len() >= super::AUDIT_CAPACITY {
            dead.audit.pop_front();
        }
        dead.audit.push_back(AuditedLetter {
            letter: letter.clone(),
            settlement: settlement.clone(),
        });
        Ok(Some(letter))
    }

    async fn dead_letter_audit(&self, limit: usize) -> Result<Vec<AuditedLetter>, BusError> {
        let dead = self.inner.dead.lock().unwrap_or_else(|e| e.into_inner());
        Ok(dead.audit.iter().rev().take(limit).rev().cloned().collect())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        let t = self.topic(topic);
        let ts = t.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Some(match ts.groups.get(group) {
            Some(g) => g
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue
                .len() as u64,
            None => ts.backlog.len() as u64,
        }))
    }
}

#[async_trait]
impl Notifier for MemoryBus {
    fn broadcast(&self, event: Event) {
        self.inner.notifier.broadcast(event)
    }

    fn has_status_listeners(&self) -> bool {
        self.inner.notifier.has_status_listeners()
    }

    fn subscribe_status(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.notifier.subscribe_status()
    }

    async fn interrupt(&self, interrupt: Interrupt) -> Result<(), BusError> {
        self.inner.notifier.interrupt(interrupt).await
    }

    fn subscribe_interrupts(&self) -> broadcast::Receiver<Interrupt> {
        self.inner.notifier.subscribe_interrupts()
    }
}

#[async_trait]
impl SharedLimits for MemoryBus {
    async fn take_places(
        &self,
        key: &str,
        want: u32,
        limits: &PlaceLimits,
        holder: &str,
    ) -> Result<Places, BusError> {
        self.inner
            .limits
            .take_places(key, want, limits, holder)
            .await
    }

    async fn give_back(&self, key: &str, leases: &[String]) -> Result<(), BusError> {
        self.inner.limits.give_back(key, leases).await
    }
}

struct MemoryConsumer {
    bus: MemoryBus,
    group: Arc<Group>,
}

impl MemoryConsumer {
    /// Acks at once: nothing here waits.
    fn ack_now(&self, ids: &[DeliveryId]) {
        let mut gs = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let DeliveryId::Seq(n) = id {
                gs.pending.remove(n);
            }
        }
    }

    /// Takes what is ready, moving expired deliveries back to the queue (or
    /// to the dead letters). Returns the batch and, when it is empty, how long
    /// until the next visibility deadline.
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let config = &self.bus.inner.config;
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut out = Vec::new();
        let next_deadline;
        {
            let gs = &mut *self.group.state.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(&(deadline, id, count)) = gs.timeouts.front() {
                let current = gs.pending.get(&id).map(|(_, c, until)| (*c, *until));
                if current != Some((count, deadline)) {
                    // Acked, redelivered since, or extended.
                    gs.timeouts.pop_front();
                    continue;
                }
                if deadline > now {
                    break;
                }
                gs.timeouts.pop_front();
                if let Some((event, count, _)) = gs.pending.remove(&id) {
                    if count >= config.max_deliveries {
                        dead.push((event, count));
                    } else {
                        gs.queue.push_front((id, event, count));
                    }
                }
            }
            while out.len() < max {
                let Some((id, event, count)) = gs.queue.pop_front() else {
                    break;
                };
                let count = count + 1;
                let until = now + config.visibility_timeout;
                gs.pending.insert(id, (event.clone(), count, until));
                gs.timeouts.push_back((until, id, count));
                out.push(Delivery {
                    id: DeliveryId::Seq(id),
                    event,
                    delivery_count: count,
                });
            }
            if !gs.queue.is_empty() {
                // Let another waiting consumer take the rest.
                self.group.ready.notify_one();
            }
            next_deadline = gs.timeouts.front().map(|t| t.0);
        }
        for (event, count) in dead {
            self.bus.push_dead(DeadLetter {
                id: String::new(),
                topic: self.group.topic.clone(),
                group: Some(self.group.name.clone()),
                reason: format!("not acked after {count} deliveries"),
                delivery_count: count,
                at: Timestamp::now(),
                body: body_of(&event),
            });
        }
        (out, next_deadline)
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let until = Instant::now() + wait;
        loop {
            let (batch, next_deadline) = self.take(max.max(1));
            if !batch.is_empty() {
                return Ok(batch);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(batch);
            }
            let wake = next_deadline.map_or(until, |d| d.min(until)).max(now);
            let _ = tokio::time::timeout_at(wake, self.group.ready.notified()).await;
        }
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        self.ack_now(ids);
        Ok(())
    }

    async fn extend(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        let until = Instant::now() + self.bus.inner.config.visibility_timeout;
        let gs = &mut *self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let DeliveryId::Seq(n) = id
                && let Some((_, count, lease)) = gs.pending.get_mut(n)
            {
                *lease = until;
                gs.timeouts.push_back((until, *n, *count));
            }
        }
        Ok(())
    }

    fn visibility_timeout(&self) -> Duration {
        self.bus.inner.config.visibility_timeout
    }

    async fn publish_then_ack(
        &self,
        events: &[(String, Event)],
        ids: &[DeliveryId],
    ) -> Result<(), BusError> {
        for (topic, event) in events {
            self.bus.publish_now(topic, event.clone())?;
        }
        self.ack_now(ids);
        Ok(())
    }

    async fn reject(&self, delivery: &Delivery, reason: &str) -> Result<(), BusError> {
        self.ack(std::slice::from_ref(&delivery.id)).await?;
        self.bus.push_dead(DeadLetter {
            id: String::new(),
            topic: self.group.topic.clone(),
            group: Some(self.group.name.clone()),
            reason: reason.to_string(),
            delivery_count: delivery.delivery_count,
            at: Timestamp::now(),
            body: body_of(&delivery.event),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_letter_is_found_by_id_and_settled_once_into_the_audit_log() {
        use crate::bus::{SettleAction, Settlement};
        let bus = MemoryBus::new();
        for n in 0..3 {
            bus.dead_letter(DeadLetter {
                id: String::new(),
                topic: "t".into(),
                group: None,
                reason: format!("reason {n}"),
                delivery_count: 0,
                at: Timestamp::now(),
                body: String::new(),
            })
            .await
            .expect("dead-lettered");
        }
        let letters = bus.dead_letters(10).await.expect("list");
        let ids: Vec<&str> = letters.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "3"]);
        assert_eq!(
            bus.dead_letter_by_id("2").await.expect("get"),
            Some(letters[1].clone())
        );
        let settlement = Settlement {
            action: SettleAction::Redriven,
            by: "ops".into(),
            note: String::new(),
            at: Timestamp::now(),
        };
        let first = bus
            .settle_dead_letter("2", &settlement)
            .await
            .expect("settle");
        assert_eq!(first, Some(letters[1].clone()));
        assert_eq!(
            bus.settle_dead_letter("2", &settlement)
                .await
                .expect("settle"),
            None
        );
        assert_eq!(bus.dead_letters(10).await.expect("list").len(), 2);
        let audit = bus.dead_letter_audit(10).await.expect("audit");
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].letter, letters[1]);
        assert_eq!(audit[0].settlement, settlement);
    }
    use crate::core::{CorrelationId, EventKind, Payload, TransactionId, WorkflowName};

    fn event(n: u32) -> Event {
        let mut e = Event::new(
            EventKind::Command,
            TransactionId::new(),
            CorrelationId::new(),
            WorkflowName::new("w"),
            Payload::null(),
        );
        e.attempt = n;
        e
    }

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn keeps_events_published_before_any_group() {
        let bus = MemoryBus::new();
        bus.publish("t", event(1)).await.expect("publish");
        let c = bus.consumer("t", "g", "c1").await.expect("consumer");
        let batch = c.next_batch(10, WAIT).await.expect("batch");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].event.attempt, 1);
    }

    #[tokio::test]
    async fn every_group_gets_every_event_and_consumers_share_one_group() {
        let bus = MemoryBus::new();
        let a1 = bus.consumer("t", "a", "1").await.expect("consumer");
        let a2 = bus.consumer("t", "a", "2").await.expect("consumer");
        let b = bus.consumer("t", "b", "1").await.expect("consumer");
        for n in 0..10 {
            bus.publish("t", event(n)).await.expect("publish");
        }
        let x = a1.next_batch(6, WAIT).await.expect("batch");
        let y = a2.next_batch(10, WAIT).await.expect("batch");
        assert_eq!(x.len() + y.len(), 10);
        assert_eq!(b.next_batch(100, WAIT).await.expect("batch").len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn redelivers_unacked_after_the_visibility_timeout_then_dead_letters() {
        let bus = MemoryBus::with_config(MemoryBusConfig {
            visibility_timeout: Duration::from_secs(1),
            max_deliveries: 2,
            ..Default::default()
        });
        let c = bus.consumer("t", "g", "1").await.expect("consumer");
        bus.publish("t", event(7)).await.expect("publish");
        let first = c.next_batch(1, WAIT).await.expect("batch");
        assert_eq!(first[0].delivery_count, 1);
        assert!(
            c.next_batch(1, Duration::from_millis(500))
                .await
                .expect("batch")
                .is_empty()
        );
        let second = c
            .next_batch(1, Duration::from_secs(2))
            .await
            .expect("batch");
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].delivery_count, 2);
        assert_eq!(second[0].event.attempt, 7);
        // Not acked again: dead-lettered instead of a third delivery.
        assert!(
            c.next_batch(1, Duration::from_secs(3))
                .await
                .expect("batch")
                .is_empty()
        );
        let dead = bus.dead_letters(10).await.expect("dead letters");
        assert_eq!(dead.len(), 1);
        assert!(
            dead[0].reason.contains("2 deliveries"),
            "{}",
            dead[0].reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_extended_delivery_is_not_redelivered_while_its_holder_extends_it() {
        let bus = MemoryBus::with_config(MemoryBusConfig {
            visibility_timeout: Duration::from_secs(3),
            ..Default::default()
        });
        let holder = bus.consumer("t", "g", "1").await.expect("consumer");
        let peer = bus.consumer("t", "g", "2").await.expect("consumer");
        bus.publish("t", event(1)).await.expect("publish");
        let taken = holder.next_batch(1, WAIT).await.expect("batch");
        // Ten visibility timeouts, extended every second.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            holder.extend(&[taken[0].id.clone()]).await.expect("extend");
            assert!(
                peer.next_batch(1, Duration::ZERO)
                    .await
                    .expect("batch")
                    .is_empty()
            );
        }
        // Once the holder stops, the peer gets it after one timeout.
        let again = peer
            .next_batch(1, Duration::from_secs(4))
            .await
            .expect("batch");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].delivery_count, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn acked_events_are_not_redelivered() {
        let bus = MemoryBus::with_config(MemoryBusConfig {
            visibility_timeout: Duration::from_secs(1),
            ..Default::default()
        });
        let c = bus.consumer("t", "g", "1").await.expect("consumer");
        bus.publish("t", event(1)).await.expect("publish");
        let batch = c.next_batch(1, WAIT).await.expect("batch");
        c.ack(&[batch[0].id.clone()]).await.expect("ack");
        assert!(
            c.next_batch(1, Duration::from_secs(5))
                .await
                .expect("batch")
                .is_empty()
        );
        assert_eq!(bus.depth("t", "g"), 0);
    }

    #[tokio::test]
    async fn reject_dead_letters_with_the_reason() {
        let bus = MemoryBus::new();
        let c = bus.consumer("t", "g", "1").await.expect("consumer");
        bus.publish("t", event(1)).await.expect("publish");
        let batch = c.next_batch(1, WAIT).await.expect("batch");
        c.reject(&batch[0], "unknown transaction")
            .await
            .expect("reject");
        let dead = bus.dead_letters(10).await.expect("dead letters");
        assert_eq!(dead[0].reason, "unknown transaction");
        assert_eq!(bus.depth("t", "g"), 0);
    }

    #[tokio::test]
    async fn refuses_oversized_events() {
        let bus = MemoryBus::with_config(MemoryBusConfig {
            max_event_bytes: 1000,
            ..Default::default()
        });
        let mut e = event(1);
        e.payload = Payload::to_json(&"x".repeat(2000)).expect("json");
        assert!(matches!(
            bus.publish("t", e).await,
            Err(BusError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_publish() {
        let bus = MemoryBus::new();
        let c = bus.consumer("t", "g", "1").await.expect("consumer");
        let waiter = tokio::spawn(async move { c.next_batch(1, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        bus.publish("t", event(3)).await.expect("publish");
        let batch = waiter.await.expect("join").expect("batch");
        assert_eq!(batch.len(), 1);
    }
}

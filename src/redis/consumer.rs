//! A consumer in a stream's group.
//!
//! Consumer groups are created at `0`, so events published before a group
//! exists are delivered to it. Consumers read with a blocking `XREADGROUP`.
//! A consumer still working on an entry extends it (one script: `XPENDING`
//! to check it still owns it, then `XCLAIM … JUSTID`, which resets its idle
//! time without counting a delivery) every five eighths of the visibility
//! timeout; entries
//! idle past the visibility timeout — their holder died — are claimed by
//! another consumer (`XPENDING IDLE` + `XCLAIM`, looked for every eighth of
//! the timeout), and after `max_deliveries` they are moved to the dead
//! letters. An ack is `XACK` (and `XDEL`, with `delete_on_ack`, the
//! default: each topic has one consumer group, so an acked entry is done).
//! Entries that do not decode, or are over the size limit, are dead-lettered
//! with the reason and never handed to the application.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::sync::Mutex;

use super::bus::RedisStreamsBus;
use super::conn::{Entry, RedisConnection, bulk_string, entries, run_all};
use crate::bus::{BusError, Consumer, DeadLetter, Delivery, DeliveryId};
use crate::core::{Event, Timestamp};

/// Publishes, then acks: `KEYS[1]` is the consumer's stream, `KEYS[2..]` the
/// streams to publish to; `ARGV` is the group, whether to delete acked
/// entries, the number of events, the events, then the ids to ack. A refused
/// `XADD` raises, so nothing after it (no ack) happens.
pub(super) static PUBLISH_THEN_ACK: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
local n = tonumber(ARGV[3])
for i = 1, n do
  redis.call('XADD', KEYS[i + 1], '*', 'e', ARGV[3 + i])
end
local first = 4 + n
while first <= #ARGV do
  local last = math.min(first + 999, #ARGV)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
  if ARGV[2] == '1' then
    redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
  end
  first = last + 1
end
return 0
",
        )
    });

/// Extends the leases of entries a consumer still owns: `KEYS[1]` is the
/// stream, `ARGV` the group, the consumer and the ids. An entry another
/// consumer has taken over (or that is acked) is left alone. `JUSTID`: the
/// delivery count does not grow.
pub(super) static EXTEND: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then kept[#kept + 1] = ARGV[i] end
end
local first = 1
while first <= #kept do
  local last = math.min(first + 999, #kept)
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for i = first, last do args[#args + 1] = kept[i] end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
  first = last + 1
end
return #kept
",
    )
});

pub(super) struct RedisConsumer {
    pub(super) bus: RedisStreamsBus,
    pub(super) topic: String,
    pub(super) key: String,
    pub(super) group: String,
    pub(super) name: String,
    /// A connection of its own: a blocking read holds its connection.
    pub(super) reader: Mutex<Option<RedisConnection>>,
    pub(super) last_reclaim: Mutex<Option<tokio::time::Instant>>,
}

pub(super) fn stream_id(id: &str) -> DeliveryId {
    match id
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
    {
        Some((ms, seq)) => DeliveryId::Stream(ms, seq),
        None => DeliveryId::Token(Arc::from(id)),
    }
}

pub(super) fn id_text(id: &DeliveryId) -> String {
    match id {
        DeliveryId::Stream(ms, seq) => format!("{ms}-{seq}"),
        DeliveryId::Seq(n) => n.to_string(),
        DeliveryId::Token(t) => t.to_string(),
    }
}

impl RedisConsumer {
    /// Queues `letter` on the dead-letter stream and drops entry `id` from
    /// the group and the stream.
    fn move_to_dead_letters(&self, pipe: &mut redis::Pipeline, letter: &DeadLetter, id: &str) {
        self.bus.dead_letter_cmd(pipe, letter);
        pipe.cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(id)
            .ignore();
        pipe.cmd("XDEL").arg(&self.key).arg(id).ignore();
    }

    /// Queues the `XACK` (and `XDEL`) of `ids`.
    fn ack_cmds(&self, pipe: &mut redis::Pipeline, ids: &[DeliveryId]) {
        if ids.is_empty() {
            return;
        }
        let texts: Vec<String> = ids.iter().map(id_text).collect();
        pipe.cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&texts)
            .ignore();
        if self.bus.inner.config.delete_on_ack {
            pipe.cmd("XDEL").arg(&self.key).arg(&texts).ignore();
        }
    }

    async fn reader(&self) -> Result<RedisConnection, BusError> {
        let mut slot = self.reader.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let inner = &self.bus.inner;
        let c = inner
            .conn
            .blocking(&inner.client)
            .await
            .map_err(|e| self.bus.err(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Decodes entries; dead-letters those that do not decode.
    async fn deliveries(
        &self,
        raw: Vec<Entry>,
        counts: &std::collections::HashMap<String, u32>,
    ) -> Result<Vec<Delivery>, BusError> {
        let mut out = Vec::with_capacity(raw.len());
        let mut poison = Vec::new();
        for (id, fields) in raw {
            let count = counts.get(&id).copied().unwrap_or(1);
            let body = fields.into_iter().find(|(k, _)| k == "e").map(|(_, v)| v);
            match body.map(|b| (self.bus.inner.codec.decode(&b), b)) {
                Some((Ok(event), _)) => out.push(Delivery {
                    id: stream_id(&id),
                    event: Arc::new(event),
                    delivery_count: count,
                }),
                Some((Err(e), bytes)) => poison.push((
                    id,
                    e.to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                    count,
                )),
                None => poison.push((
                    id,
                    "entry has no `e` field".to_string(),
                    String::new(),
                    count,
                )),
            }
        }
        if !poison.is_empty() {
            let mut pipe = redis::pipe();
            for (id, reason, body, count) in &poison {
                tracing::warn!(topic = %self.topic, id = %id, reason = %reason, "undecodable entry dead-lettered");
                let letter = DeadLetter {
                    id: String::new(),
                    topic: self.topic.clone(),
                    group: Some(self.group.clone()),
                    reason: reason.clone(),
                    delivery_count: *count,
                    at: Timestamp::now(),
                    body: body.clone(),
                };
                self.move_to_dead_letters(&mut pipe, &letter, id);
            }
            self.bus.run(&pipe).await?;
        }
        Ok(out)
    }

    /// Claims entries idle past the visibility timeout; dead-letters those
    /// delivered too often.
    async fn reclaim(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let config = &self.bus.inner.config;
        let idle = config.visibility_timeout.as_millis() as u64;
        let mut conn = self.bus.inner.conn.get();
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(&self.group)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(max)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.bus.err(e))?;
        let Value::Array(rows) = pending else {
            return Ok(Vec::new());
        };
        let mut claim = Vec::new();
        let mut exhausted = Vec::new();
        for row in rows {
            let Value::Array(cols) = row else { continue };
            let (Some(id), Some(Value::Int(count))) =
                (cols.first().and_then(bulk_string), cols.get(3))
            else {
                continue;
            };
            if *count as u32 >= config.max_deliveries {
                exhausted.push((id, *count as u32));
            } else {
                claim.push((id, *count as u32 + 1));
            }
        }
        for (id, count) in exhausted {
            // Read the body, dead-letter it, and drop it from the group.
            let body: Value = redis::cmd("XRANGE")
                .arg(&self.key)
                .arg(&id)
                .arg(&id)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.bus.err(e))?;
            let body = entries(&body)
                .into_iter()
                .next()
                .and_then(|(_, f)| f.into_iter().find(|(k, _)| k == "e"))
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            let letter = DeadLetter {
                id: String::new(),
                topic: self.topic.clone(),
                group: Some(self.group.clone()),
                reason: format!("not acked after {count} deliveries"),
                delivery_count: count,
                at: Timestamp::now(),
                body,
            };
            tracing::warn!(topic = %self.topic, id = %id, "{}", letter.reason);
            let mut pipe = redis::pipe();
            self.move_to_dead_letters(&mut pipe, &letter, &id);
            run_all(&mut conn, &pipe)
                .await
                .map_err(|e| self.bus.err(e))?;
        }
        if claim.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.key)
            .arg(&self.group)
            .arg(&self.name)
            .arg(idle);
        for (id, _) in &claim {
            cmd.arg(id);
        }
        let claimed: Value = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| self.bus.err(e))?;
        let counts = claim.into_iter().collect();
        self.deliveries(entries(&claimed), &counts).await
    }
}

impl RedisConsumer {
    /// How often to look for abandoned entries: an eighth of the visibility
    /// timeout.
    fn reclaim_every(&self) -> Duration {
        (self.bus.inner.config.visibility_timeout / 8).max(Duration::from_millis(10))
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        // Look for abandoned entries now and then, not on every read.
        let due = {
            let mut last = self.last_reclaim.lock().await;
            let now = tokio::time::Instant::now();
            let every = self.reclaim_every();
            if last.is_none_or(|t| now.duration_since(t) >= every) {
                *last = Some(now);
                true
            } else {
                false
            }
        };
        if due {
            let reclaimed = self.reclaim(max).await?;
            if !reclaimed.is_empty() {
                return Ok(reclaimed);
            }
        }
        let mut conn = self.reader().await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max);
        // No wait: a plain read that answers at once. A blocking read lasts
        // no longer than the look for abandoned entries is due, so that an
        // idle consumer takes over a dead one's entries in time.
        if !wait.is_zero() {
            let wait = wait.min(self.reclaim_every());
            cmd.arg("BLOCK")
                .arg(wait.as_millis().clamp(1, 5_000) as u64);
        }
        let reply: redis::RedisResult<Value> = cmd
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // Drop the connection; the next call opens a new one.
                *self.reader.lock().await = None;
                return Err(self.bus.err(e));
            }
        };
        // [[key, [[id, fields], …]]] or nil on timeout.
        let raw = match &reply {
            Value::Array(streams) => streams
                .iter()
                .filter_map(|s| match s {
                    Value::Array(kv) => kv.get(1).map(entries),
                    _ => None,
                })
                .flatten()
                .collect(),
            Value::Map(streams) => streams.iter().flat_map(|(_, v)| entries(v)).collect(),
            _ => Vec::new(),
        };
        self.deliveries(raw, &std::collections::HashMap::new())
            .await
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.ack_cmds(&mut pipe, ids);
        self.bus.run(&pipe).await
    }

    async fn extend(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut invocation = EXTEND.key(&self.key);
        invocation.arg(&self.group).arg(&self.name);
        for id in ids {
            invocation.arg(id_text(id));
        }
        let mut conn = self.bus.inner.conn.get();
        invocation
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.bus.err(e))
    }

    fn visibility_timeout(&self) -> Duration {
        self.bus.inner.config.visibility_timeout
    }

    async fn publish_then_ack(
        &self,
        events: &[(String, Event)],
        ids: &[DeliveryId],
    ) -> Result<(), BusError> {
        if events.is_empty() {
            return self.ack(ids).await;
        }
        if ids.is_empty() {
            let mut pipe = redis::pipe();
            self.bus.xadd_cmds(&mut pipe, events)?;
            return self.bus.run(&pipe).await;
        }
        if self.bus.inner.conn.is_cluster() {
            // The streams live on different nodes: publish, then ack.
            let mut pipe = redis::pipe();
            self.bus.xadd_cmds(&mut pipe, events)?;
            self.bus.run(&pipe).await?;
            return self.ack(ids).await;
        }
        // One script: a publish the server refuses stops it before the acks.
        let mut invocation = PUBLISH_THEN_ACK.key(&self.key);
        for (topic, _) in events {
            invocation.key(self.bus.key(topic));
        }
        invocation
            .arg(&self.group)
            .arg(u8::from(self.bus.inner.config.delete_on_ack))
            .arg(events.len());
        for (topic, event) in events {
            invocation.arg(self.bus.encode(topic, event)?);
        }
        for id in ids {
            invocation.arg(id_text(id));
        }
        let mut conn = self.bus.inner.conn.get();
        invocation
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(|e| self.bus.err(e))
    }

    async fn reject(&self, delivery: &Delivery, reason: &str) -> Result<(), BusError> {
        let id = id_text(&delivery.id);
        let letter = DeadLetter {
            id: String::new(),
            topic: self.topic.clone(),
            group: Some(self.group.clone()),
            reason: reason.to_string(),
            delivery_count: delivery.delivery_count,
            at: Timestamp::now(),
            body: serde_json::to_string(&*delivery.event).unwrap_or_default(),
        };
        tracing::warn!(topic = %self.topic, reason, "event dead-lettered");
        let mut pipe = redis::pipe();
        self.move_to_dead_letters(&mut pipe, &letter, &id);
        self.bus.run(&pipe).await
    }
}

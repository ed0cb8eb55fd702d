//! The Redis Streams topics: each topic a stream with one consumer group,
//! published with `XADD`, read with a blocking `XREADGROUP` (see
//! [`consumer`](super::consumer) for leases, takeover and dead letters).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::sync::{Mutex, broadcast};

use super::conn::{Pool, bulk_string, entries, open, redacted, run_all};
use super::consumer::RedisConsumer;
use super::notify::RedisPubSubBus;
use crate::bus::{
    AuditedLetter, BusError, Consumer, DeadLetter, Interrupt, SettleAction, Settlement, Topics,
};
use crate::core::event::DEFAULT_MAX_EVENT_BYTES;
use crate::core::{Event, EventCodec, Timestamp};

/// Settings of a [`RedisStreamsBus`].
#[derive(Clone, Debug)]
pub struct RedisBusConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://…` for TLS.
    pub url: String,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// `rediss://` server (one with a private CA, say).
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of every key.
    pub prefix: String,
    /// How long a delivery may go without being acked or extended before
    /// another consumer takes it over. Holders extend their deliveries every
    /// five eighths of it ([`Consumer::extend_every`]), so a dead process's
    /// deliveries are taken over within 1.8 of its beats.
    pub visibility_timeout: Duration,
    /// Deliveries after which an entry is dead-lettered.
    pub max_deliveries: u32,
    /// Largest event accepted, in bytes, on publish and on consume.
    pub max_event_bytes: usize,
    /// Delete entries once acked (one consumer group per topic).
    pub delete_on_ack: bool,
    /// Also publish status broadcasts on Redis Pub/Sub (fire-and-forget).
    pub broadcast_status: bool,
}

impl RedisBusConfig {
    /// Defaults for a server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            prefix: "ma".into(),
            visibility_timeout: Duration::from_millis(1500),
            max_deliveries: 5,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            delete_on_ack: true,
            broadcast_status: false,
        }
    }

    /// Sets the key prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Trusts the CA certificates in a PEM file as well as the system's
    /// (for `rediss://` only).
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Sets the visibility timeout.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }

    /// Sets the deliveries before dead-lettering.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Sets the size limit.
    pub fn max_event_bytes(mut self, n: usize) -> Self {
        self.max_event_bytes = n;
        self
    }
}

/// A bus on Redis Streams: topics as streams with consumer groups, limits
/// in sorted sets, interrupts and (with `broadcast_status`) status over
/// Pub/Sub.
#[derive(Clone)]
pub struct RedisStreamsBus {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) config: RedisBusConfig,
    pub(super) address: String,
    pub(super) client: redis::Client,
    pub(super) conn: Pool,
    pub(super) codec: EventCodec,
    pub(super) status: broadcast::Sender<Arc<Event>>,
    /// Status over Redis Pub/Sub, when `broadcast_status` is on.
    pub(super) pubsub: Option<RedisPubSubBus>,
    /// Interrupts received on the `{prefix}:interrupts` channel.
    pub(super) interrupts: broadcast::Sender<Interrupt>,
    /// Set once the interrupt subscription task runs.
    pub(super) interrupts_listening: std::sync::Once,
}

impl RedisStreamsBus {
    /// With `broadcast_status`: starts the status subscription and waits
    /// until it is active (at most `timeout`), so that a replica serving
    /// `/v1/events` sees the changes other replicas make from the first one
    /// on (Pub/Sub keeps nothing for a subscriber not there yet). True when
    /// it is active, or when status is not broadcast.
    pub async fn status_subscribed(&self, timeout: std::time::Duration) -> bool {
        match &self.inner.pubsub {
            Some(pubsub) => {
                drop(pubsub.subscribe());
                pubsub.subscribed(timeout).await
            }
            None => true,
        }
    }

    /// Connects; fails with the server's address if it cannot be reached.
    pub async fn connect(config: RedisBusConfig) -> Result<Self, BusError> {
        let address = redacted(&config.url);
        let (client, conn) =
            open(&config.url, config.ca_file.as_deref())
                .await
                .map_err(|message| BusError::Backend {
                    address: address.clone(),
                    message,
                })?;
        let (status, _) = broadcast::channel(4096);
        let pubsub = if config.broadcast_status {
            Some(
                RedisPubSubBus::connect_with(
                    &config.url,
                    config.ca_file.as_deref(),
                    format!("{}:status", config.prefix),
                )
                .await?,
            )
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                codec: EventCodec::with_limit(config.max_event_bytes),
                config,
                address,
                client,
                conn,
                status,
                pubsub,
                interrupts: broadcast::channel(1024).0,
                interrupts_listening: std::sync::Once::new(),
            }),
        })
    }

    pub(super) fn interrupt_channel(&self) -> String {
        format!("{}:interrupts", self.inner.config.prefix)
    }

    pub(super) fn key(&self, topic: &str) -> String {
        format!("{{{}:{topic}}}", self.inner.config.prefix)
    }

    pub(super) fn dead_key(&self) -> String {
        self.key("dead-letters")
    }

    /// The newest `limit` entries of stream `key`, newest first.
    async fn newest(&self, key: &str, limit: usize) -> Result<Vec<super::conn::Entry>, BusError> {
        let mut conn = self.inner.conn.get();
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(entries(&reply))
    }

    /// The audit log of settled dead letters: beside the list, in the same
    /// cluster slot, so that one script moves a letter from one to the other.
    fn audit_key(&self) -> String {
        format!("{}:audit", self.dead_key())
    }

    pub(super) fn err(&self, e: redis::RedisError) -> BusError {
        BusError::Backend {
            address: self.inner.address.clone(),
            message: e.to_string(),
        }
    }

    /// Queues an `XADD` per event, checking each against the size limit.
    pub(super) fn xadd_cmds(
        &self,
        pipe: &mut redis::Pipeline,
        events: &[(String, Event)],
    ) -> Result<(), BusError> {
        for (topic, event) in events {
            pipe.cmd("XADD")
                .arg(self.key(topic))
                .arg("*")
                .arg("e")
                .arg(self.encode(topic, event)?)
                .ignore();
        }
        Ok(())
    }

    /// Encodes an event for `topic`, checking the size limit.
    pub(super) fn encode(&self, topic: &str, event: &Event) -> Result<Vec<u8>, BusError> {
        self.inner.codec.encode(event).map_err(|e| match e {
            crate::core::EventError::TooLarge { size, limit } => BusError::TooLarge {
                topic: topic.to_string(),
                size,
                limit,
            },
            other => BusError::Backend {
                address: self.inner.address.clone(),
                message: other.to_string(),
            },
        })
    }

    /// Sends a pipeline whose replies are all ignored.
    pub(super) async fn run(&self, pipe: &redis::Pipeline) -> Result<(), BusError> {
        let mut conn = self.inner.conn.get();
        run_all(&mut conn, pipe).await.map_err(|e| self.err(e))
    }

    pub(super) fn dead_letter_cmd(&self, pipe: &mut redis::Pipeline, letter: &DeadLetter) {
        metrics::counter!(crate::monitoring::metrics::DEAD_LETTERS, "topic" => letter.topic.clone())
            .increment(1);
        pipe.cmd("XADD")
            .arg(self.dead_key())
            .arg("*")
            .arg("topic")
            .arg(&letter.topic)
            .arg("group")
            .arg(letter.group.as_deref().unwrap_or(""))
            .arg("reason")
            .arg(&letter.reason)
            .arg("deliveries")
            .arg(letter.delivery_count)
            .arg("at")
            .arg(letter.at.as_millis())
            .arg("body")
            .arg(&letter.body)
            .ignore();
    }
}

#[async_trait]
impl Topics for RedisStreamsBus {
    async fn publish(&self, topic: &str, event: Event) -> Result<(), BusError> {
        self.publish_many(vec![(topic.to_string(), event)]).await
    }

    async fn publish_many(&self, events: Vec<(String, Event)>) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        self.xadd_cmds(&mut pipe, &events)?;
        self.run(&pipe).await
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        let key = self.key(topic);
        let mut conn = self.inner.conn.get();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        // BUSYGROUP: the group exists already, which is fine.
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(self.err(e));
        }
        Ok(Arc::new(RedisConsumer {
            bus: self.clone(),
            topic: topic.to_string(),
            key,
            group: group.to_string(),
            name: consumer.to_string(),
            reader: Mutex::new(None),
            last_reclaim: Mutex::new(None),
        }))
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        tracing::warn!(topic = %letter.topic, reason = %letter.reason, "event dead-lettered");
        let mut pipe = redis::pipe();
        self.dead_letter_cmd(&mut pipe, &letter);
        self.run(&pipe).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let mut out: Vec<DeadLetter> = self
            .newest(&self.dead_key(), limit)
            .await?
            .into_iter()
            .map(letter_of)
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        let Some(id) = stream_id(id) else {
            return Ok(None);
        };
        let mut conn = self.inner.conn.get();
        let reply: Value = redis::cmd("XRANGE")
            .arg(self.dead_key())
            .arg(&id)
            .arg(&id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(entries(&reply).into_iter().next().map(letter_of))
    }

    async fn settle_dead_letter(
        &self,
        id: &str,
        settlement: &Settlement,
    ) -> Result<Option<DeadLetter>, BusError> {
        let Some(id) = stream_id(id) else {
            return Ok(None);
        };
        let mut conn = self.inner.conn.get();
        let reply: Value = SETTLE
            .key(self.dead_key())
            .key(self.audit_key())
            .arg(&id)
            .arg(crate::bus::AUDIT_CAPACITY)
            .arg(settlement.action.as_str())
            .arg(&settlement.by)
            .arg(&settlement.note)
            .arg(settlement.at.as_millis())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        let Value::Array(fields) = reply else {
            return Ok(None);
        };
        let entry = Value::Array(vec![Value::Array(vec![
            Value::BulkString(id.into_bytes()),
            Value::Array(fields),
        ])]);
        Ok(entries(&entry).into_iter().next().map(letter_of))
    }

    async fn dead_letter_audit(&self, limit: usize) -> Result<Vec<AuditedLetter>, BusError> {
        let mut out: Vec<AuditedLetter> = self
            .newest(&self.audit_key(), limit)
            .await?
            .into_iter()
            .map(|(audit_id, fields)| {
                let get = field_getter(&fields);
                let settlement = Settlement {
                    action: if get("action") == "discarded" {
                        SettleAction::Discarded
                    } else {
                        SettleAction::Redriven
                    },
                    by: get("by"),
                    note: get("note"),
                    at: Timestamp(get("settled_at").parse().unwrap_or(0)),
                };
                let kept_id = get("letter");
                drop(get);
                let mut letter = letter_of((audit_id, fields));
                letter.id = settlement_letter_id(&letter, &kept_id);
                AuditedLetter { letter, settlement }
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        let mut conn = self.inner.conn.get();
        let groups: Value = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.key(topic))
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            // No such stream yet: nothing published, nothing behind.
            Err(e) if e.to_string().contains("no such key") => return Ok(Some(0)),
            Err(e) => return Err(self.err(e)),
        };
        let Value::Array(groups) = groups else {
            return Ok(None);
        };
        for g in groups {
            let pairs: Vec<(String, Value)> = match g {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| Some((bulk_string(&c[0])?, c.get(1)?.clone())))
                    .collect(),
                Value::Map(kv) => kv
                    .into_iter()
                    .filter_map(|(k, v)| Some((bulk_string(&k)?, v)))
                    .collect(),
                _ => continue,
            };
            let field = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            if field("name").and_then(bulk_string).as_deref() == Some(group) {
                return Ok(match field("lag") {
                    Some(Value::Int(n)) => Some(*n as u64),
                    _ => None,
                });
            }
        }
        Ok(None)
    }
}

/// Moves a dead letter to the audit log: `KEYS[1]` the list, `KEYS[2]` the
/// log; `ARGV` the entry id, the log's cap, then the action, who, the note
/// and when. Returns the letter's fields, or nil when it is gone already.
static SETTLE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
redis.call('XDEL', KEYS[1], ARGV[1])
local fields = e[1][2]
local logged = {}
for i = 1, #fields do logged[i] = fields[i] end
for _, v in ipairs({'letter', ARGV[1], 'action', ARGV[3], 'by', ARGV[4], 'note', ARGV[5], 'settled_at', ARGV[6]}) do
  logged[#logged + 1] = v
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(logged))
return fields
",
    )
});

/// A dead-letter id as a stream entry id (`ms-seq`), or `None` when it is
/// not one (then no such letter exists).
fn stream_id(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    (ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok()).then(|| id.to_string())
}

fn field_getter(fields: &[(String, Vec<u8>)]) -> impl Fn(&str) -> String + '_ {
    move |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }
}

/// The id a settled letter had on the list (kept in its audit entry).
fn settlement_letter_id(letter: &DeadLetter, kept: &str) -> String {
    if kept.is_empty() {
        letter.id.clone()
    } else {
        kept.to_string()
    }
}

/// A dead-letter stream entry as a [`DeadLetter`].
fn letter_of((id, fields): (String, Vec<(String, Vec<u8>)>)) -> DeadLetter {
    let get = field_getter(&fields);
    DeadLetter {
        topic: get("topic"),
        group: Some(get("group")).filter(|g| !g.is_empty()),
        reason: get("reason"),
        delivery_count: get("deliveries").parse().unwrap_or(0),
        at: Timestamp(get("at").parse().unwrap_or(0)),
        body: get("body"),
        id,
    }
}

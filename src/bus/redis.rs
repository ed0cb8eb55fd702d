//! The Redis Streams bus: the production bus for several processes on one
//! Redis.
//!
//! Key layout (prefix `ma` by default; every key carries a `{…}` hash tag so
//! the same commands run on Redis Cluster):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{ma:<topic>}` | stream | the topic's events, one entry each, field `e` = the encoded event |
//! | `{ma:dead-letters}` | stream | dead letters: `topic`, `group`, `reason`, `deliveries`, `at`, `body` |
//! | `{ma:limits:<worker>}held`, `…starts`, `…seq` | sorted sets, counter | shared places: leases, recent starts, lease numbers |
//! | `ma:status` | Pub/Sub channel | status broadcasts (only with `broadcast_status`) |
//! | `ma:interrupts` | Pub/Sub channel | interrupts for steps in flight (best effort) |
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
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{Mutex, broadcast};

use super::{
    BusError, Consumer, DeadLetter, Delivery, DeliveryId, EventBus, Interrupt, PlaceLimits, Places,
};
use crate::core::event::DEFAULT_MAX_EVENT_BYTES;
use crate::core::{Event, EventCodec, Timestamp};

/// Publishes, then acks: `KEYS[1]` is the consumer's stream, `KEYS[2..]` the
/// streams to publish to; `ARGV` is the group, whether to delete acked
/// entries, the number of events, the events, then the ids to ack. A refused
/// `XADD` raises, so nothing after it (no ack) happens.
/// Takes places of a worker type under shared limits, on the server's clock.
/// KEYS: held leases (zset lease → expiry ms), recent starts (zset member →
/// start ms), lease counter. ARGV: want, concurrency (0: none), rate calls
/// (0: none), rate period ms, lease ms, holder. Returns {granted, first lease
/// number, wait ms}.
static TAKE_PLACES: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grant = tonumber(ARGV[1])
local conc = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local wait = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local free = conc - redis.call('ZCARD', KEYS[1])
  if free < grant then grant = free end
  if grant <= 0 then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.min(50, math.max(1, tonumber(first[2]) - now))
  end
end
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - period)
  local left = rate - redis.call('ZCARD', KEYS[2])
  if left < grant then grant = left end
  if left <= 0 then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + period - now)
  end
end
if grant <= 0 then return {0, 0, wait} end
local last = redis.call('INCRBY', KEYS[3], grant)
local first = last - grant + 1
for i = first, last do
  local lease = ARGV[6] .. ':' .. i
  if conc > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), lease) end
  if rate > 0 then redis.call('ZADD', KEYS[2], now, lease) end
end
if conc > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]) * 2) end
if rate > 0 then redis.call('PEXPIRE', KEYS[2], period * 2) end
return {grant, first, 0}
",
    )
});

static PUBLISH_THEN_ACK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
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
static EXTEND: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
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

/// A connection to a single server or to a Redis Cluster, chosen when
/// connecting: a server that says `cluster_enabled:1` gets a cluster
/// connection, which routes each command to the node owning its key (every
/// key carries a `{…}` hash tag, so each script's keys share a slot).
#[derive(Clone)]
pub enum RedisConnection {
    /// One server, reconnecting by itself.
    Single(ConnectionManager),
    /// One server, on a connection of its own (for blocking reads).
    Direct(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Direct(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Direct(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Sends a pipeline whose replies are ignored. On a cluster the commands go
/// one after another, in order: a cluster pipeline must stay in one slot.
pub(crate) async fn run_all(
    conn: &mut RedisConnection,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<()> {
    if matches!(conn, RedisConnection::Cluster(_)) {
        for cmd in pipe.cmd_iter() {
            cmd.query_async::<()>(conn).await?;
        }
        return Ok(());
    }
    pipe.query_async::<()>(conn).await
}

/// Sends a pipeline and returns every reply (none may be ignored). On a
/// cluster the commands go one after another.
pub(crate) async fn query_all<T: redis::FromRedisValue>(
    conn: &mut RedisConnection,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<Vec<T>> {
    if matches!(conn, RedisConnection::Cluster(_)) {
        let mut out = Vec::with_capacity(pipe.len());
        for cmd in pipe.cmd_iter() {
            out.push(cmd.query_async::<T>(conn).await?);
        }
        return Ok(out);
    }
    pipe.query_async::<Vec<T>>(conn).await
}

/// Connects to the server or cluster at `url` (for a cluster, any node's
/// address); the error names the address.
pub async fn connect(url: &str) -> Result<RedisConnection, BusError> {
    connect_with(url, None).await
}

/// [`connect`], trusting the CA certificates of `ca_file` as well (see
/// [`RedisBusConfig::ca_file`]).
pub async fn connect_with(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<RedisConnection, BusError> {
    let (_, pool) = open(url, ca_file)
        .await
        .map_err(|message| BusError::Backend {
            address: redacted(url),
            message,
        })?;
    Ok(pool.get())
}

/// The client and the connection pool for `url`, within 10 s; the error is
/// the reason, for the caller to put beside the (redacted) address.
pub(crate) async fn open(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<(redis::Client, Pool), String> {
    let (client, certs) = client(url, ca_file)?;
    let pool = tokio::time::timeout(Duration::from_secs(10), Pool::connect(&client, url, certs))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| {
            let e = e.to_string();
            if e.contains("UnknownIssuer") && ca_file.is_none() {
                format!("{e} (for a private CA, give its PEM file: `ca_file`, `--redis-ca-file`)")
            } else {
                e
            }
        })?;
    Ok((client, pool))
}

/// A client for `url`: over TLS for `rediss://`, trusting the CA
/// certificates of `ca_file` besides the system's. The user and password,
/// if any, come from the URL. The certificates are returned too, for a
/// cluster client.
pub(crate) fn client(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<(redis::Client, Option<redis::TlsCertificates>), String> {
    let Some(path) = ca_file else {
        return Ok((redis::Client::open(url).map_err(|e| e.to_string())?, None));
    };
    if !url.starts_with("rediss://") {
        return Err(format!(
            "a CA file ({}) is given, but the URL is not rediss:// (TLS)",
            path.display()
        ));
    }
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(trusted_roots(path)?),
    };
    let client = redis::Client::build_with_tls(url, certs.clone()).map_err(|e| e.to_string())?;
    Ok((client, Some(certs)))
}

/// The system's root certificates and those of the PEM file at `path`, as
/// one PEM bundle (redis-rs trusts only the bundle it is given).
fn trusted_roots(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("the CA file {} is not valid PEM: {e}", path.display()))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!(
            "the CA file {} holds no certificate",
            path.display()
        ));
    }
    let mut bundle = pem;
    bundle.push(b'\n');
    // A system without a trust store still trusts the file.
    for cert in rustls_native_certs::load_native_certs().certs {
        bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(&cert);
        for line in encoded.as_bytes().chunks(64) {
            bundle.extend_from_slice(line);
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(bundle)
}

/// Connections used in turn: one connection's driver task parses every
/// reply on it, and became the bottleneck under load. On a cluster, one
/// cluster connection (it holds a connection per node).
pub(crate) struct Pool {
    conns: Vec<RedisConnection>,
    next: std::sync::atomic::AtomicUsize,
    /// For blocking reads on a cluster: no response timeout.
    blocking: Option<redis::cluster::ClusterClient>,
}

/// Connections in a [`Pool`].
const POOL_SIZE: usize = 2;

impl Pool {
    /// Opens the pool; the error is the server's.
    pub(crate) async fn connect(
        client: &redis::Client,
        url: &str,
        certs: Option<redis::TlsCertificates>,
    ) -> redis::RedisResult<Self> {
        let mut probe = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut probe)
            .await?;
        if info.contains("cluster_enabled:1") {
            let cluster = |timeout: Option<Duration>| {
                let mut builder = redis::cluster::ClusterClient::builder(vec![url])
                    .connection_timeout(Duration::from_secs(5))
                    .retries(3);
                if let Some(certs) = &certs {
                    builder = builder.certs(certs.clone());
                }
                match timeout {
                    Some(t) => builder.response_timeout(t),
                    None => builder.response_timeout(Duration::from_secs(3600)),
                }
                .build()
            };
            let conn = cluster(Some(Duration::from_secs(10)))?
                .get_async_connection()
                .await?;
            return Ok(Self {
                conns: vec![RedisConnection::Cluster(conn)],
                next: std::sync::atomic::AtomicUsize::new(0),
                blocking: Some(cluster(None)?),
            });
        }
        let mut conns = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(1));
            conns.push(RedisConnection::Single(
                client.get_connection_manager_with_config(config).await?,
            ));
        }
        Ok(Self {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
            blocking: None,
        })
    }

    /// The next connection.
    pub(crate) fn get(&self) -> RedisConnection {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }

    /// True on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.blocking.is_some()
    }

    /// A connection of its own for blocking reads, without a response
    /// timeout (the read's own `BLOCK` bounds it).
    pub(crate) async fn blocking(
        &self,
        client: &redis::Client,
    ) -> redis::RedisResult<RedisConnection> {
        if let Some(cluster) = &self.blocking {
            return Ok(RedisConnection::Cluster(
                cluster.get_async_connection().await?,
            ));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(None);
        Ok(RedisConnection::Direct(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

/// The URL without its user and password, for logs and error messages.
///
/// ```
/// use multiagents::bus::redis::redacted;
///
/// assert_eq!(redacted("redis://app:secret@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// ```
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A [`EventBus`] on Redis Streams.
#[derive(Clone)]
pub struct RedisStreamsBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisBusConfig,
    address: String,
    client: redis::Client,
    conn: Pool,
    codec: EventCodec,
    status: broadcast::Sender<Arc<Event>>,
    /// Status over Redis Pub/Sub, when `broadcast_status` is on.
    pubsub: Option<RedisPubSubBus>,
    /// Interrupts received on the `{prefix}:interrupts` channel.
    interrupts: broadcast::Sender<Interrupt>,
    /// Set once the interrupt subscription task runs.
    interrupts_listening: std::sync::Once,
}

impl RedisStreamsBus {
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

    fn interrupt_channel(&self) -> String {
        format!("{}:interrupts", self.inner.config.prefix)
    }

    fn key(&self, topic: &str) -> String {
        format!("{{{}:{topic}}}", self.inner.config.prefix)
    }

    fn dead_key(&self) -> String {
        self.key("dead-letters")
    }

    fn err(&self, e: redis::RedisError) -> BusError {
        BusError::Backend {
            address: self.inner.address.clone(),
            message: e.to_string(),
        }
    }

    /// Queues an `XADD` per event, checking each against the size limit.
    fn xadd_cmds(
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
    fn encode(&self, topic: &str, event: &Event) -> Result<Vec<u8>, BusError> {
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
    async fn run(&self, pipe: &redis::Pipeline) -> Result<(), BusError> {
        let mut conn = self.inner.conn.get();
        run_all(&mut conn, pipe).await.map_err(|e| self.err(e))
    }

    fn dead_letter_cmd(&self, pipe: &mut redis::Pipeline, letter: &DeadLetter) {
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
impl EventBus for RedisStreamsBus {
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
        let mut conn = self.inner.conn.get();
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(self.dead_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        let mut out: Vec<DeadLetter> = entries(&reply)
            .into_iter()
            .map(|(_, fields)| {
                let get = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                DeadLetter {
                    topic: get("topic"),
                    group: Some(get("group")).filter(|g| !g.is_empty()),
                    reason: get("reason"),
                    delivery_count: get("deliveries").parse().unwrap_or(0),
                    at: Timestamp(get("at").parse().unwrap_or(0)),
                    body: get("body"),
                }
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

    async fn take_places(
        &self,
        key: &str,
        want: u32,
        limits: &PlaceLimits,
        holder: &str,
    ) -> Result<Places, BusError> {
        let tag = format!("{{{}:limits:{key}}}", self.inner.config.prefix);
        let (rate, period) = limits
            .rate
            .map_or((0, 0), |(n, per)| (n, per.as_millis().max(1) as u64));
        let mut invocation = TAKE_PLACES.key(format!("{tag}held"));
        invocation
            .key(format!("{tag}starts"))
            .key(format!("{tag}seq"))
            .arg(want)
            .arg(limits.concurrency.unwrap_or(0))
            .arg(rate)
            .arg(period)
            .arg(limits.lease.as_millis().max(1) as u64)
            .arg(holder);
        let mut conn = self.inner.conn.get();
        let (granted, first, wait): (u64, u64, u64) = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Places {
            leases: (first..first + granted)
                .map(|i| format!("{holder}:{i}"))
                .collect(),
            retry_after: (granted == 0).then(|| Duration::from_millis(wait.max(1))),
        })
    }

    async fn give_back(&self, key: &str, leases: &[String]) -> Result<(), BusError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM")
            .arg(format!("{{{}:limits:{key}}}held", self.inner.config.prefix))
            .arg(leases)
            .ignore();
        self.run(&pipe).await
    }

    async fn interrupt(&self, interrupt: Interrupt) -> Result<(), BusError> {
        let body = serde_json::to_vec(&interrupt).map_err(|e| BusError::Backend {
            address: self.inner.address.clone(),
            message: e.to_string(),
        })?;
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH")
            .arg(self.interrupt_channel())
            .arg(body)
            .ignore();
        self.run(&pipe).await
    }

    fn subscribe_interrupts(&self) -> broadcast::Receiver<Interrupt> {
        let rx = self.inner.interrupts.subscribe();
        let me = self.clone();
        self.inner.interrupts_listening.call_once(|| {
            tokio::spawn(async move {
                let inner = &me.inner;
                follow_channel(
                    &inner.client,
                    &me.interrupt_channel(),
                    &inner.address,
                    |_| {},
                    |payload| match serde_json::from_slice::<Interrupt>(payload) {
                        Ok(i) => {
                            let _ = inner.interrupts.send(i);
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable interrupt ignored"),
                    },
                )
                .await
            });
        });
        rx
    }

    fn broadcast(&self, event: Event) {
        match &self.inner.pubsub {
            Some(pubsub) => pubsub.broadcast(&event),
            None => {
                if self.inner.status.receiver_count() > 0 {
                    let _ = self.inner.status.send(Arc::new(event));
                }
            }
        }
    }

    fn has_status_listeners(&self) -> bool {
        self.inner.pubsub.is_some() || self.inner.status.receiver_count() > 0
    }

    fn subscribe_status(&self) -> broadcast::Receiver<Arc<Event>> {
        match &self.inner.pubsub {
            Some(pubsub) => pubsub.subscribe(),
            None => self.inner.status.subscribe(),
        }
    }
}

/// Status broadcast over Redis Pub/Sub: **fire-and-forget**. Redis keeps
/// nothing: a message published while nobody is subscribed, or while a
/// subscriber reconnects, is lost. That is why commands and results never go
/// through it — only status events (workflow started, step done, finished)
/// that dashboards and tails may miss without harm.
#[derive(Clone)]
pub struct RedisPubSubBus {
    inner: Arc<PubSubInner>,
}

struct PubSubInner {
    client: redis::Client,
    /// To the one task that publishes, in order.
    outbox: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    address: String,
    channel: String,
    codec: EventCodec,
    local: broadcast::Sender<Arc<Event>>,
    listening: std::sync::Once,
    subscribed: tokio::sync::watch::Sender<bool>,
}

impl RedisPubSubBus {
    /// Connects to `url`; status events go to `channel`.
    pub async fn connect(url: &str, channel: impl Into<String>) -> Result<Self, BusError> {
        Self::connect_with(url, None, channel).await
    }

    /// Connects to `url`, trusting the CA certificates of `ca_file` as well
    /// (see [`RedisBusConfig::ca_file`]); status events go to `channel`.
    pub async fn connect_with(
        url: &str,
        ca_file: Option<&std::path::Path>,
        channel: impl Into<String>,
    ) -> Result<Self, BusError> {
        let address = redacted(url);
        let backend = |e: redis::RedisError| BusError::Backend {
            address: address.clone(),
            message: e.to_string(),
        };
        let (client, _) = client(url, ca_file).map_err(|message| BusError::Backend {
            address: address.clone(),
            message,
        })?;
        let conn = tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager())
            .await
            .map_err(|_| BusError::Backend {
                address: address.clone(),
                message: "connection timed out".into(),
            })?
            .map_err(backend)?;
        let (local, _) = broadcast::channel(4096);
        let (subscribed, _) = tokio::sync::watch::channel(false);
        let (outbox, mut queue) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let publish_channel: String = channel.into();
        let channel = publish_channel.clone();
        tokio::spawn(async move {
            let mut conn = conn;
            while let Some(first) = queue.recv().await {
                // Whatever queued meanwhile goes in the same round trip, in order.
                let mut pipe = redis::pipe();
                pipe.cmd("PUBLISH")
                    .arg(&publish_channel)
                    .arg(first)
                    .ignore();
                while let Ok(more) = queue.try_recv() {
                    pipe.cmd("PUBLISH").arg(&publish_channel).arg(more).ignore();
                }
                let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
            }
        });
        Ok(Self {
            inner: Arc::new(PubSubInner {
                client,
                outbox,
                address,
                channel,
                codec: EventCodec::default(),
                local,
                listening: std::sync::Once::new(),
                subscribed,
            }),
        })
    }

    /// Publishes a status event, without waiting and without any guarantee.
    pub fn broadcast(&self, event: &Event) {
        let Ok(bytes) = self.inner.codec.encode(event) else {
            return;
        };
        let _ = self.inner.outbox.send(bytes);
    }

    /// Receives status events from now on (once the subscription is up; see
    /// [`RedisPubSubBus::subscribed`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        let rx = self.inner.local.subscribe();
        let me = self.clone();
        self.inner.listening.call_once(|| {
            tokio::spawn(async move { me.listen().await });
        });
        rx
    }

    /// Waits until the subscription is active (at most `timeout`); returns
    /// whether it is.
    pub async fn subscribed(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.subscribed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn listen(&self) {
        let inner = &self.inner;
        follow_channel(
            &inner.client,
            &inner.channel,
            &inner.address,
            |up| {
                let _ = inner.subscribed.send(up);
            },
            |payload| match inner.codec.decode(payload) {
                Ok(event) => {
                    let _ = inner.local.send(Arc::new(event));
                }
                Err(e) => tracing::warn!(error = %e, "undecodable status broadcast ignored"),
            },
        )
        .await
    }
}

/// Follows a Pub/Sub channel forever, handing each message's payload to
/// `on_message` and resubscribing when the connection drops (messages sent
/// meanwhile are lost: Pub/Sub keeps nothing). `on_state` is told when the
/// subscription comes up and goes down.
pub(crate) async fn follow_channel(
    client: &redis::Client,
    channel: &str,
    address: &str,
    mut on_state: impl FnMut(bool),
    mut on_message: impl FnMut(&[u8]),
) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(channel).await.is_ok() {
                    on_state(true);
                    let mut stream = std::pin::pin!(pubsub.on_message());
                    while let Some(msg) = std::future::poll_fn(|cx| {
                        futures_core::Stream::poll_next(stream.as_mut(), cx)
                    })
                    .await
                    {
                        on_message(msg.get_payload_bytes());
                    }
                    on_state(false);
                }
            }
            Err(e) => tracing::warn!(address, channel, error = %e, "subscription failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct RedisConsumer {
    bus: RedisStreamsBus,
    topic: String,
    key: String,
    group: String,
    name: String,
    /// A connection of its own: a blocking read holds its connection.
    reader: Mutex<Option<RedisConnection>>,
    last_reclaim: Mutex<Option<tokio::time::Instant>>,
}

/// One stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// Parses `[[id, [field, value, …]], …]`.
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = bulk_string(pair.first()?)?;
            let mut fields = Vec::new();
            if let Some(Value::Array(kv)) = pair.get(1) {
                for chunk in kv.chunks(2) {
                    if let [k, v] = chunk
                        && let (Some(k), Some(v)) = (bulk_string(k), bulk_bytes(v))
                    {
                        fields.push((k, v));
                    }
                }
            }
            Some((id, fields))
        })
        .collect()
}

fn bulk_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

fn bulk_string(v: &Value) -> Option<String> {
    bulk_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn stream_id(id: &str) -> DeliveryId {
    match id
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
    {
        Some((ms, seq)) => DeliveryId::Stream(ms, seq),
        None => DeliveryId::Token(Arc::from(id)),
    }
}

fn id_text(id: &DeliveryId) -> String {
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

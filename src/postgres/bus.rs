//! The PostgreSQL topics: commands and results as rows of one table,
//! claimed with `FOR UPDATE SKIP LOCKED` under a visibility lease, so that
//! a deployment needs nothing but PostgreSQL.
//!
//! * **Publish** is one `INSERT` of every event of a batch, a row per
//!   consumer group of its topic (or one row for no group yet, which the
//!   first group to join adopts).
//! * **Claim** is one statement: the oldest visible rows of the topic and
//!   group, locked with `SKIP LOCKED` so that consumers never wait on each
//!   other, are made invisible for the visibility timeout (`visible_at`),
//!   counted as delivered and named after their holder. A row whose lease
//!   runs out without an ack or an extension becomes visible again: that is
//!   redelivery, and takeover of a dead process's work.
//! * **Handoff**: rows for a topic and group that the publishing process
//!   consumes itself are leased to it in the insert and handed to its
//!   consumer in memory, without a claim (see [`Wake`]).
//! * **Ack** deletes the rows; **publish then ack** inserts and deletes in
//!   one statement, so that a worker's result and the end of its command
//!   commit together.
//! * **Wake-ups**: a consumer with nothing to do waits. It is woken at once
//!   by a publish of its own process, by `NOTIFY <schema>_bus` (the topics,
//!   sent by a task of the publishing process after its insert committed,
//!   never inside it), and by one poll per process that looks, for every
//!   topic and group a consumer here waits on, when the next row becomes
//!   visible: every `poll_interval` when nothing is held, or sooner when a
//!   lease is due to run out. An idle process costs one query per
//!   `poll_interval`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc};
use tokio_postgres::types::ToSql;

use super::conn::{Connector, describe, describe_pool};
use crate::bus::{
    AuditedLetter, BusError, Consumer, DeadLetter, Delivery, DeliveryId, SettleAction, Settlement,
    Topics,
};
use crate::core::event::DEFAULT_MAX_EVENT_BYTES;
use crate::core::{Event, EventCodec, Timestamp};

/// Settings of a [`PostgresBus`].
#[derive(Clone, Debug)]
pub struct PostgresBusConfig {
    /// `postgres://[user[:password]@]host[:port]/database[?sslmode=…]`
    /// (`sslmode` as libpq reads it: `disable`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`), or
    /// `key=value` settings.
    pub url: String,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// server reached over TLS; with it, `sslmode=prefer` and `require`
    /// check the server's chain as `verify-ca` does.
    pub ca_file: Option<std::path::PathBuf>,
    /// The schema holding the tables (shared with a
    /// [`PostgresStateStore`](super::PostgresStateStore) of the same
    /// schema), created if missing.
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// How long a delivery may go without being acked or extended before
    /// another consumer takes it over. Holders extend every five eighths of
    /// it ([`Consumer::extend_every`]).
    pub visibility_timeout: Duration,
    /// Deliveries after which an event is dead-lettered.
    pub max_deliveries: u32,
    /// Largest event accepted, in bytes, on publish and on consume.
    pub max_event_bytes: usize,
    /// The longest a waiting consumer goes without a look at the table. A
    /// lease due to run out is looked at when it does, and a publish wakes
    /// consumers by `NOTIFY`; this look is for a notification lost while
    /// the listener reconnected, and is what an idle process costs the
    /// database: one query per interval.
    pub poll_interval: Duration,
}

impl PostgresBusConfig {
    /// Defaults for a server at `url`: schema `multiagents`, 16
    /// connections, a 1.5 s visibility timeout, 5 deliveries, a poll every
    /// 2 s at most.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            schema: "multiagents".into(),
            pool_size: 16,
            visibility_timeout: Duration::from_millis(1500),
            max_deliveries: 5,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            poll_interval: Duration::from_secs(2),
        }
    }

    /// The schema holding the tables (lowercase letters, digits, `_`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// A PEM file of CA certificates to trust.
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Connections in the pool.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
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

    /// Sets the longest wait without a look at the table.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(5));
        self
    }
}

/// A bus on PostgreSQL: topics as rows claimed with `SKIP LOCKED`. It has
/// topics only; [`Bus::new`](crate::bus::Bus::new) gives it an in-process
/// notifier and limits.
///
/// ```no_run
/// # async fn run() -> Result<(), multiagents::bus::BusError> {
/// use multiagents::bus::{Bus, PostgresBus, PostgresBusConfig};
///
/// let pg = PostgresBus::connect(PostgresBusConfig::new("postgres://app@localhost/app")).await?;
/// let bus = Bus::new(pg);
/// # let _ = bus;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: PostgresBusConfig,
    connector: Connector,
    /// For publishes and the dead letters: commits wait for the flush.
    pool: deadpool_postgres::Pool,
    /// For claims, extensions, acks, answers published with the ack of
    /// what they answer, and the poll: commits do not wait for the flush
    /// (`synchronous_commit = off`). One lost in a crash of the server only
    /// means a delivery made again: a claim or an extension undone lets the
    /// row be claimed again, an ack (with its answer) undone delivers it
    /// again, and the orchestrator and the workers take duplicates in their
    /// stride. The next synchronous commit flushes them anyway.
    leases: deadpool_postgres::Pool,
    codec: EventCodec,
    sql: Sql,
    /// The topics and groups consumers of this process wait on.
    waits: Mutex<HashMap<(String, String), Arc<Wake>>>,
    /// Nudges the poller when a topic and group is first waited on.
    joined: Arc<Notify>,
    /// Topics published to, to announce with `NOTIFY`.
    announce: mpsc::UnboundedSender<String>,
    /// Names this bus in its announcements, so that it does not wake its
    /// own consumers twice (they were woken when the publish committed).
    instance: String,
    /// Started with the first consumer: the listener and the poller.
    started: std::sync::Once,
    /// Set once a store writes this bus's events with its states: from
    /// then on acks wait (a little) to go with the store's next write.
    carried: std::sync::atomic::AtomicBool,
    /// Acks waiting for the store's next write, or for the flusher.
    acks: Mutex<Vec<i64>>,
    /// Wakes the flusher of the acks.
    acked: Arc<Notify>,
    /// Started with the first ack that waits.
    flusher: std::sync::Once,
}

/// How long an ack waits for a store's write to go with before it is sent
/// by itself: far below any visibility timeout.
const ACK_WAIT: Duration = Duration::from_millis(20);

/// What wakes the consumers of one topic and group in this process: how
/// many rows may be waiting for them (hints), and a notify that wakes one
/// waiting consumer, not all of them. A consumer claims only when it can
/// take hints, as many as it claims rows: sixty-four result consumers
/// coming back for every result published would otherwise claim
/// sixty-four times for one row. A publish here adds a hint per row; a
/// notification from another process or the poll adds one, and a claim
/// that comes back full puts one back (there may be more). A hint whose
/// row another process took costs one short claim.
///
/// Rows this process published for a topic and group it consumes are
/// leased to it in the insert itself (`holder` and `visible_at` set, one
/// delivery counted) and handed over here in memory, without a claim: the
/// claims were two of the four statements on a step's path. While the
/// process lives it delivers them; if it dies, their leases run out and
/// another process claims them, as any lapsed claim.
#[derive(Default)]
struct Wake {
    hints: AtomicU64,
    notify: Notify,
    /// Rows leased to this process at their insert, waiting for a consumer.
    handed: Mutex<std::collections::VecDeque<Handed>>,
    /// Consumers of this topic and group alive in this process: rows are
    /// leased here only while there is one.
    consumers: AtomicU64,
}

/// A row leased to this process when it was published, and its event.
struct Handed {
    id: i64,
    event: Arc<Event>,
    at: std::time::Instant,
}

/// The most rows waiting in a [`Wake`] to be handed over: beyond, rows are
/// published visible to all.
const HANDED_CAP: usize = 1024;

impl Wake {
    fn hint(&self, rows: u64) {
        self.hints.fetch_add(rows, Ordering::AcqRel);
        self.notify.notify_one();
    }

    fn hand(&self, handed: Handed) {
        self.handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(handed);
        self.notify.notify_one();
    }

    /// Whether rows may be leased to this process's consumers.
    fn takes_handoffs(&self) -> bool {
        self.consumers.load(Ordering::Acquire) > 0
            && self.handed.lock().unwrap_or_else(|e| e.into_inner()).len() < HANDED_CAP
    }

    /// Takes up to `max` hints; how many were taken.
    fn take(&self, max: u64) -> u64 {
        match self
            .hints
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h > 0).then(|| h - h.min(max))
            }) {
            Ok(before) => before.min(max),
            Err(_) => 0,
        }
    }
}

/// The statements, with the schema written in.
struct Sql {
    publish: String,
    publish_then_ack: String,
    claim: String,
    ack: String,
    extend: String,
    take_over: String,
    bury: String,
    join: String,
    adopt: String,
    poll: String,
    dead_letter: String,
    dead_letters: String,
    dead_letter_by_id: String,
    settle: String,
    trim_audit: String,
    audit: String,
    lag: String,
    notify: String,
    channel: String,
}

/// Inserts the rows of the events `e(topic, body, n)` of `source`: one per
/// group of the event's topic (or one without a group), in order, each
/// tagged with its event's `n`. Those of a topic and group consumed in the
/// publishing process (the arrays `$p`, `$p+1`) are leased to it (holder
/// `$p+2`, for `$p+3` ms) to be handed over in memory ([`Local`]). Returns
/// each row's `id, grp, tag, leased`.
pub(crate) fn insert_messages(s: &str, source: &str, p: usize) -> String {
    let (lt, lg, holder, lease) = (p, p + 1, p + 2, p + 3);
    format!(
        "INSERT INTO {s}.messages (topic, grp, body, visible_at, deliveries, holder, tag)
         SELECT e.topic, coalesce(g.grp, ''), e.body,
             CASE WHEN l.grp IS NULL THEN now()
                  ELSE now() + ${lease}::bigint * interval '1 millisecond' END,
             CASE WHEN l.grp IS NULL THEN 0 ELSE 1 END,
             CASE WHEN l.grp IS NULL THEN '' ELSE ${holder}::text END,
             e.n
         FROM {source}
         LEFT JOIN {s}.bus_groups g ON g.topic = e.topic
         LEFT JOIN unnest(${lt}::text[], ${lg}::text[]) AS l(topic, grp)
           ON l.topic = e.topic AND l.grp = g.grp
         ORDER BY e.n, g.grp
         RETURNING id, grp, tag, holder <> '' AS leased"
    )
}

/// The events of a publish: `$1` topics, `$2` bodies.
const EVENTS: &str = "unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS e(topic, body, n)";

/// The topics and groups of the publishing process's consumers, to whom
/// rows are leased as they are inserted ([`insert_messages`]).
#[derive(Default)]
pub(crate) struct Local {
    topics: Vec<String>,
    groups: Vec<String>,
    holder: String,
    lease_ms: i64,
}

impl Local {
    /// The four parameters of [`insert_messages`], in order.
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.topics, &self.groups, &self.holder, &self.lease_ms]
    }
}

/// A row a publish inserted (one row of [`insert_messages`]): its id, its
/// group, its event's index among those published (from 0), and whether
/// it was leased to this process.
pub(crate) struct Inserted {
    pub(crate) id: i64,
    pub(crate) group: String,
    pub(crate) event: usize,
    pub(crate) leased: bool,
}

impl Inserted {
    /// The row of [`insert_messages`]' `RETURNING`, from column `at` on
    /// (the statement's events numbered from 1).
    pub(crate) fn of(row: &tokio_postgres::Row, at: usize) -> Option<Self> {
        Some(Self {
            id: row.get::<_, Option<i64>>(at)?,
            group: row.get::<_, Option<String>>(at + 1)?,
            event: usize::try_from(row.get::<_, Option<i64>>(at + 2)? - 1).ok()?,
            leased: row.get::<_, Option<bool>>(at + 3)?,
        })
    }
}

impl Sql {
    fn new(s: &str) -> Self {
        let q = |sql: &str| sql.replace("{s}", s);
        Self {
            publish: insert_messages(s, EVENTS, 3),
            publish_then_ack: format!(
                "WITH acked AS (DELETE FROM {s}.messages WHERE id = ANY($3::bigint[])) {}",
                insert_messages(s, EVENTS, 4)
            ),
            claim: q("WITH c AS (
                 SELECT id FROM {s}.messages
                 WHERE topic = $1 AND grp = $2 AND visible_at <= now()
                 ORDER BY visible_at LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE {s}.messages m
             SET visible_at = now() + $4::bigint * interval '1 millisecond',
                 deliveries = m.deliveries + 1, holder = $5
             FROM c WHERE m.id = c.id
             RETURNING m.id, m.body, m.deliveries"),
            ack: q("DELETE FROM {s}.messages WHERE id = ANY($1::bigint[])"),
            extend: q(
                "UPDATE {s}.messages SET visible_at = now() + $3::bigint * interval '1 millisecond'
                 WHERE id = ANY($1::bigint[]) AND holder IN ($2, $4)",
            ),
            take_over: q(
                "UPDATE {s}.messages SET visible_at = now() + $3::bigint * interval '1 millisecond',
                     holder = $2
                 WHERE id = ANY($1::bigint[]) AND holder = $4
                 RETURNING id",
            ),
            bury: q("WITH gone AS (
                 DELETE FROM {s}.messages m
                 USING unnest($1::bigint[], $2::text[], $3::integer[]) AS u(id, reason, deliveries)
                 WHERE m.id = u.id
                 RETURNING m.topic, m.grp, u.reason, u.deliveries, m.body)
             INSERT INTO {s}.dead_letters (topic, grp, reason, deliveries, at, body)
             SELECT topic, nullif(grp, ''), reason, deliveries, $4, body FROM gone"),
            join: q("INSERT INTO {s}.bus_groups (topic, grp) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
            adopt: q("WITH orphans AS (
                 DELETE FROM {s}.messages WHERE topic = $1 AND grp = '' RETURNING id, body)
             INSERT INTO {s}.messages (topic, grp, body)
             SELECT $1, g.grp, o.body FROM orphans o
             JOIN {s}.bus_groups g ON g.topic = $1
             ORDER BY o.id, g.grp"),
            poll: q("SELECT u.topic, u.grp,
                 (SELECT extract(epoch FROM min(m.visible_at) - now()) * 1000
                  FROM {s}.messages m WHERE m.topic = u.topic AND m.grp = u.grp)::float8,
                 EXISTS (SELECT 1 FROM {s}.messages m WHERE m.topic = u.topic AND m.grp = '')
             FROM unnest($1::text[], $2::text[]) AS u(topic, grp)"),
            dead_letter: q(
                "INSERT INTO {s}.dead_letters (topic, grp, reason, deliveries, at, body)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            ),
            dead_letters: q(
                "SELECT id, topic, grp, reason, deliveries, at, body FROM {s}.dead_letters
                 ORDER BY id DESC LIMIT $1",
            ),
            dead_letter_by_id: q(
                "SELECT id, topic, grp, reason, deliveries, at, body FROM {s}.dead_letters
                 WHERE id = $1",
            ),
            settle: q("WITH d AS (DELETE FROM {s}.dead_letters WHERE id = $1
                 RETURNING id, topic, grp, reason, deliveries, at, body),
             logged AS (INSERT INTO {s}.dead_letter_audit
                 (letter_id, topic, grp, reason, deliveries, at, body, action, by, note, settled_at)
                 SELECT id, topic, grp, reason, deliveries, at, body, $2, $3, $4, $5 FROM d)
             SELECT id, topic, grp, reason, deliveries, at, body FROM d"),
            trim_audit: q("DELETE FROM {s}.dead_letter_audit
                 WHERE id <= (SELECT max(id) FROM {s}.dead_letter_audit) - $1"),
            audit: q(
                "SELECT letter_id, topic, grp, reason, deliveries, at, body, action, by, note, settled_at
                 FROM {s}.dead_letter_audit ORDER BY id DESC LIMIT $1",
            ),
            lag: q(
                "SELECT count(*) FROM {s}.messages WHERE topic = $1 AND grp = $2 AND deliveries = 0",
            ),
            notify: "SELECT pg_notify($1, $2)".into(),
            channel: format!("{s}_bus"),
        }
    }
}

impl PostgresBus {
    /// Connects, and creates or migrates the tables; fails with the
    /// server's address if it cannot be reached.
    pub async fn connect(config: PostgresBusConfig) -> Result<Self, BusError> {
        let backend = |address: String, message: String| BusError::Backend { address, message };
        super::schema::valid_schema(&config.schema)
            .map_err(|m| backend(super::redacted(&config.url), m))?;
        let connector = Connector::new(&config.url, config.ca_file.as_deref())
            .map_err(|m| backend(super::redacted(&config.url), m))?;
        let address = connector.address.clone();
        let pool = connector
            .pool(config.pool_size)
            .map_err(|m| backend(address.clone(), m))?;
        let leases = connector
            .lazy_pool(config.pool_size)
            .map_err(|m| backend(address.clone(), m))?;
        {
            let mut client = pool.get().await.map_err(|e| {
                backend(
                    address.clone(),
                    format!(
                        "cannot connect: {}; is PostgreSQL running there, and is the URL right?",
                        describe_pool(&e)
                    ),
                )
            })?;
            super::schema::migrate(&mut client, &config.schema)
                .await
                .map_err(|e| {
                    backend(
                        address.clone(),
                        format!("cannot create or migrate the tables: {}", describe(&e)),
                    )
                })?;
        }
        let (announce, topics) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            codec: EventCodec::with_limit(config.max_event_bytes),
            sql: Sql::new(&config.schema),
            config,
            connector,
            pool,
            leases,
            waits: Mutex::default(),
            joined: Arc::default(),
            announce,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            started: std::sync::Once::new(),
            carried: std::sync::atomic::AtomicBool::new(false),
            acks: Mutex::default(),
            acked: Arc::default(),
            flusher: std::sync::Once::new(),
        });
        tokio::spawn(announce_loop(Arc::downgrade(&inner), topics));
        Ok(Self { inner })
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &PostgresBusConfig {
        &self.inner.config
    }

    fn err(&self, message: impl std::fmt::Display) -> BusError {
        BusError::Backend {
            address: self.inner.connector.address.clone(),
            message: message.to_string(),
        }
    }

    fn pg(&self, e: tokio_postgres::Error) -> BusError {
        self.err(describe(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, BusError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| self.err(describe_pool(&e)))
    }

    /// A connection whose commits do not wait for the flush.
    async fn lazy_client(&self) -> Result<deadpool_postgres::Object, BusError> {
        self.inner
            .leases
            .get()
            .await
            .map_err(|e| self.err(describe_pool(&e)))
    }

    /// Runs a statement, prepared once per connection.
    async fn execute(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, BusError> {
        let statement = client.prepare_cached(sql).await.map_err(|e| self.pg(e))?;
        client
            .execute(&statement, params)
            .await
            .map_err(|e| self.pg(e))
    }

    /// Runs a query, prepared once per connection.
    async fn query(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, BusError> {
        let statement = client.prepare_cached(sql).await.map_err(|e| self.pg(e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| self.pg(e))
    }

    /// The topics and bodies of `events`, each checked against the size limit.
    fn encode<'e>(
        &self,
        events: &'e [(String, Event)],
    ) -> Result<(Vec<&'e str>, Vec<Vec<u8>>), BusError> {
        let mut topics = Vec::with_capacity(events.len());
        let mut bodies = Vec::with_capacity(events.len());
        for (topic, event) in events {
            let body = self.inner.codec.encode(event).map_err(|e| match e {
                crate::core::EventError::TooLarge { size, limit } => BusError::TooLarge {
                    topic: topic.clone(),
                    size,
                    limit,
                },
                other => self.err(other),
            })?;
            topics.push(topic.as_str());
            bodies.push(body);
        }
        Ok((topics, bodies))
    }

    /// The wake of a topic and group waited on here.
    fn wake(&self, topic: &str, group: &str) -> Arc<Wake> {
        let mut waits = self.inner.waits.lock().unwrap_or_else(|e| e.into_inner());
        let wake = waits
            .entry((topic.to_string(), group.to_string()))
            .or_default()
            .clone();
        drop(waits);
        self.inner.joined.notify_one();
        wake
    }
}

/// What a [`PostgresStateStore`](super::PostgresStateStore) that writes
/// events with its states needs of the bus: its encoding and size limit,
/// and the wake-ups after a commit.
#[derive(Clone)]
pub(crate) struct Carrier {
    inner: std::sync::Weak<Inner>,
    codec: EventCodec,
    address: String,
}

impl PostgresBus {
    pub(crate) fn carrier(&self) -> Carrier {
        self.inner.carried.store(true, Ordering::Release);
        Carrier {
            inner: Arc::downgrade(&self.inner),
            codec: self.inner.codec,
            address: self.inner.connector.address.clone(),
        }
    }
}

impl Carrier {
    /// The server, as the store names its own.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// The events encoded, or `None` when one is over the size limit (then
    /// the write goes without them, and publishing reports it).
    pub(crate) fn encode(&self, events: &[(String, Event)]) -> Option<super::store::Events> {
        events
            .iter()
            .map(|(topic, e)| Some((topic.clone(), self.codec.encode(e).ok()?)))
            .collect()
    }

    /// The topics and groups to lease the rows of a write to.
    pub(crate) fn local(&self) -> Local {
        self.inner
            .upgrade()
            .map(|inner| inner.local())
            .unwrap_or_default()
    }

    /// The acks waiting, for a write to delete in its transaction; given
    /// back with [`Carrier::give_back_acks`] if the write fails.
    pub(crate) fn take_acks(&self) -> Vec<i64> {
        self.inner.upgrade().map_or_else(Vec::new, |inner| {
            std::mem::take(&mut *inner.acks.lock().unwrap_or_else(|e| e.into_inner()))
        })
    }

    /// Acks a failed write took: they wait again.
    pub(crate) fn give_back_acks(&self, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        if let Some(inner) = self.inner.upgrade() {
            inner.wait_acks(ids);
        }
    }

    /// After a write carrying `events` committed, with the rows it
    /// inserted for them.
    pub(crate) fn settle(&self, events: &[(String, Event)], inserted: &[Inserted]) {
        if let Some(inner) = self.inner.upgrade() {
            inner.settle(events, inserted);
        }
    }
}

impl Inner {
    /// Acks to wait for a store's write (or the flusher, `ACK_WAIT` on).
    fn wait_acks(&self, ids: Vec<i64>) {
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
        self.acked.notify_one();
    }

    /// The topics and groups to lease rows to as they are inserted: those
    /// with a consumer here and room to hand rows over.
    fn local(&self) -> Local {
        let waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        let mut local = Local {
            holder: self.instance.clone(),
            lease_ms: self.config.visibility_timeout.as_millis().max(1) as i64,
            ..Local::default()
        };
        for ((topic, group), wake) in waits.iter() {
            if wake.takes_handoffs() {
                local.topics.push(topic.clone());
                local.groups.push(group.clone());
            }
        }
        local
    }

    /// After a publish of `events` committed, with the rows it inserted:
    /// hands the rows leased here to this process's consumers, wakes them
    /// for the others, and announces those to the other processes.
    fn settle(&self, events: &[(String, Event)], inserted: &[Inserted]) {
        let mut counted: Vec<(&str, u64)> = Vec::new();
        let mut arcs: Vec<Option<Arc<Event>>> = vec![None; events.len()];
        let waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        for row in inserted {
            let Some((topic, event)) = events.get(row.event) else {
                continue;
            };
            if row.leased {
                if let Some(wake) = waits.get(&(topic.clone(), row.group.clone())) {
                    let event = arcs[row.event].get_or_insert_with(|| Arc::new(event.clone()));
                    wake.hand(Handed {
                        id: row.id,
                        event: event.clone(),
                        at: std::time::Instant::now(),
                    });
                }
                continue;
            }
            match counted.iter_mut().find(|(t, _)| *t == topic) {
                Some((_, n)) => *n += 1,
                None => counted.push((topic, 1)),
            }
        }
        drop(waits);
        for (topic, rows) in counted {
            Inner::wake_topic(self, topic, rows);
            let _ = self.announce.send(topic.to_string());
        }
    }

    fn wake_topic(inner: &Inner, topic: &str, rows: u64) {
        let waits = inner.waits.lock().unwrap_or_else(|e| e.into_inner());
        for ((t, _), wake) in waits.iter() {
            if t == topic {
                wake.hint(rows);
            }
        }
    }

    fn wake_all(inner: &Inner) {
        let waits = inner.waits.lock().unwrap_or_else(|e| e.into_inner());
        for wake in waits.values() {
            wake.hint(1);
        }
    }
}

#[async_trait]
impl Topics for PostgresBus {
    async fn publish(&self, topic: &str, event: Event) -> Result<(), BusError> {
        self.publish_many(vec![(topic.to_string(), event)]).await
    }

    async fn publish_many(&self, events: Vec<(String, Event)>) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        let (topics, bodies) = self.encode(&events)?;
        let local = self.inner.local();
        let client = self.client().await?;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&topics, &bodies];
        params.extend(local.params());
        let rows = self
            .query(&client, &self.inner.sql.publish, &params)
            .await?;
        drop(client);
        let inserted: Vec<Inserted> = rows.iter().filter_map(|r| Inserted::of(r, 0)).collect();
        self.inner.settle(&events, &inserted);
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        if group.is_empty() {
            return Err(self.err("a consumer group needs a name"));
        }
        {
            let client = self.client().await?;
            client
                .execute(self.inner.sql.join.as_str(), &[&topic, &group])
                .await
                .map_err(|e| self.pg(e))?;
            client
                .execute(self.inner.sql.adopt.as_str(), &[&topic])
                .await
                .map_err(|e| self.pg(e))?;
        }
        let inner = Arc::downgrade(&self.inner);
        self.inner.started.call_once(|| {
            tokio::spawn(listen(inner.clone()));
            tokio::spawn(poll(inner));
        });
        let wake = self.wake(topic, group);
        wake.consumers.fetch_add(1, Ordering::AcqRel);
        Ok(Arc::new(PostgresConsumer {
            wake,
            bus: self.clone(),
            topic: topic.to_string(),
            group: group.to_string(),
            name: consumer.to_string(),
            looked: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        tracing::warn!(topic = %letter.topic, reason = %letter.reason, "event dead-lettered");
        metrics::counter!(crate::monitoring::metrics::DEAD_LETTERS, "topic" => letter.topic.clone())
            .increment(1);
        let client = self.client().await?;
        client
            .execute(
                self.inner.sql.dead_letter.as_str(),
                &[
                    &letter.topic,
                    &letter.group,
                    &letter.reason,
                    &(letter.delivery_count as i32),
                    &millis(letter.at),
                    &letter.body.as_bytes(),
                ],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let client = self.client().await?;
        let rows = client
            .query(self.inner.sql.dead_letters.as_str(), &[&(limit as i64)])
            .await
            .map_err(|e| self.pg(e))?;
        let mut out: Vec<DeadLetter> = rows.iter().map(letter_of).collect();
        out.reverse();
        Ok(out)
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        let Ok(id) = id.parse::<i64>() else {
            return Ok(None);
        };
        let client = self.client().await?;
        let row = client
            .query_opt(self.inner.sql.dead_letter_by_id.as_str(), &[&id])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(row.as_ref().map(letter_of))
    }

    async fn settle_dead_letter(
        &self,
        id: &str,
        settlement: &Settlement,
    ) -> Result<Option<DeadLetter>, BusError> {
        let Ok(id) = id.parse::<i64>() else {
            return Ok(None);
        };
        let client = self.client().await?;
        let row = client
            .query_opt(
                self.inner.sql.settle.as_str(),
                &[
                    &id,
                    &settlement.action.as_str(),
                    &settlement.by,
                    &settlement.note,
                    &millis(settlement.at),
                ],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if row.is_some() {
            client
                .execute(
                    self.inner.sql.trim_audit.as_str(),
                    &[&(crate::bus::AUDIT_CAPACITY as i64)],
                )
                .await
                .map_err(|e| self.pg(e))?;
        }
        Ok(row.as_ref().map(letter_of))
    }

    async fn dead_letter_audit(&self, limit: usize) -> Result<Vec<AuditedLetter>, BusError> {
        let client = self.client().await?;
        let rows = client
            .query(self.inner.sql.audit.as_str(), &[&(limit as i64)])
            .await
            .map_err(|e| self.pg(e))?;
        let mut out: Vec<AuditedLetter> = rows
            .iter()
            .map(|row| AuditedLetter {
                letter: letter_of(row),
                settlement: Settlement {
                    action: if row.get::<_, &str>(7) == "discarded" {
                        SettleAction::Discarded
                    } else {
                        SettleAction::Redriven
                    },
                    by: row.get(8),
                    note: row.get(9),
                    at: Timestamp(row.get::<_, i64>(10).max(0) as u64),
                },
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        let client = self.client().await?;
        let row = client
            .query_one(self.inner.sql.lag.as_str(), &[&topic, &group])
            .await
            .map_err(|e| self.pg(e))?;
        // Rows leased to this process at their insert and not yet taken by
        // a consumer wait too (another process's such rows are not seen).
        let handed = self
            .inner
            .waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(topic.to_string(), group.to_string()))
            .map_or(0, |w| {
                w.handed.lock().unwrap_or_else(|e| e.into_inner()).len()
            });
        Ok(Some(row.get::<_, i64>(0).max(0) as u64 + handed as u64))
    }
}

fn millis(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

/// A dead-letter row (`id, topic, grp, reason, deliveries, at, body`).
fn letter_of(row: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: row.get::<_, i64>(0).to_string(),
        topic: row.get(1),
        group: row.get::<_, Option<String>>(2).filter(|g| !g.is_empty()),
        reason: row.get(3),
        delivery_count: row.get::<_, i32>(4).max(0) as u32,
        at: Timestamp(row.get::<_, i64>(5).max(0) as u64),
        body: String::from_utf8_lossy(row.get::<_, &[u8]>(6)).into_owned(),
    }
}

/// A consumer of one topic and group.
struct PostgresConsumer {
    bus: PostgresBus,
    topic: String,
    group: String,
    name: String,
    wake: Arc<Wake>,
    /// Whether this consumer has looked at the table at all: its first call
    /// claims without a hint, for what was there before it.
    looked: std::sync::atomic::AtomicBool,
}

impl Drop for PostgresConsumer {
    fn drop(&mut self) {
        self.wake.consumers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The rows of `ids` (deliveries of this bus; others are none of its).
pub(crate) fn row_ids(ids: &[DeliveryId]) -> Vec<i64> {
    ids.iter()
        .filter_map(|id| match id {
            DeliveryId::Seq(n) => i64::try_from(*n).ok(),
            _ => None,
        })
        .collect()
}

impl PostgresConsumer {
    fn lease_ms(&self) -> i64 {
        self.bus.inner.config.visibility_timeout.as_millis().max(1) as i64
    }

    /// Takes up to `max` rows handed over in memory. Those handed over a
    /// while ago (a quarter of the lease) are taken over in the table first,
    /// so that the lease this consumer extends from now on is whole; one
    /// whose lease ran out and that another consumer claimed is dropped.
    async fn take_handed(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let taken: Vec<Handed> = {
            let mut handed = self.wake.handed.lock().unwrap_or_else(|e| e.into_inner());
            let n = handed.len().min(max);
            let taken = handed.drain(..n).collect();
            if !handed.is_empty() {
                // More for another consumer here.
                self.wake.notify.notify_one();
            }
            taken
        };
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let fresh = self.bus.inner.config.visibility_timeout / 4;
        let (mut out, stale): (Vec<Handed>, Vec<Handed>) =
            taken.into_iter().partition(|h| h.at.elapsed() < fresh);
        if !stale.is_empty() {
            let ids: Vec<i64> = stale.iter().map(|h| h.id).collect();
            let client = self.bus.lazy_client().await?;
            let rows = self
                .bus
                .query(
                    &client,
                    &self.bus.inner.sql.take_over,
                    &[&ids, &self.name, &self.lease_ms(), &self.bus.inner.instance],
                )
                .await?;
            let kept: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
            out.extend(stale.into_iter().filter(|h| kept.contains(&h.id)));
            out.sort_unstable_by_key(|h| h.id);
        }
        Ok(out
            .into_iter()
            .map(|h| Delivery {
                id: DeliveryId::Seq(h.id as u64),
                event: h.event,
                delivery_count: 1,
            })
            .collect())
    }

    /// Claims up to `max` rows; returns the deliveries and how many rows were
    /// claimed (poison and exhausted rows among them go to the dead letters).
    async fn claim(&self, max: usize) -> Result<(Vec<Delivery>, usize), BusError> {
        let inner = &self.bus.inner;
        let client = self.bus.lazy_client().await?;
        let rows = self
            .bus
            .query(
                &client,
                &inner.sql.claim,
                &[
                    &self.topic,
                    &self.group,
                    &(max as i64),
                    &self.lease_ms(),
                    &self.name,
                ],
            )
            .await?;
        let claimed = rows.len();
        let mut rows: Vec<(i64, &[u8], i32)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        rows.sort_unstable_by_key(|r| r.0);
        let max_deliveries = inner.config.max_deliveries;
        let mut out = Vec::with_capacity(rows.len());
        let mut buried: (Vec<i64>, Vec<String>, Vec<i32>) = Default::default();
        for (id, body, deliveries) in rows {
            let count = deliveries.max(1) as u32;
            let reason = if count > max_deliveries {
                format!("not acked after {max_deliveries} deliveries")
            } else {
                match inner.codec.decode(body) {
                    Ok(event) => {
                        out.push(Delivery {
                            id: DeliveryId::Seq(id as u64),
                            event: Arc::new(event),
                            delivery_count: count,
                        });
                        continue;
                    }
                    Err(e) => e.to_string(),
                }
            };
            tracing::warn!(topic = %self.topic, id, reason = %reason, "event dead-lettered");
            metrics::counter!(crate::monitoring::metrics::DEAD_LETTERS, "topic" => self.topic.clone())
                .increment(1);
            buried.0.push(id);
            buried.1.push(reason);
            buried.2.push(count.min(max_deliveries) as i32);
        }
        if !buried.0.is_empty() {
            self.bus
                .execute(
                    &client,
                    &inner.sql.bury,
                    &[&buried.0, &buried.1, &buried.2, &millis(Timestamp::now())],
                )
                .await?;
        }
        Ok((out, claimed))
    }
}

#[async_trait]
impl Consumer for PostgresConsumer {
    async fn next_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        let until = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.wake.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let handed = self.take_handed(max).await?;
            if !handed.is_empty() {
                return Ok(handed);
            }
            let first = !self.looked.swap(true, Ordering::AcqRel);
            if first || self.wake.take(max as u64) > 0 {
                let (got, claimed) = self.claim(max).await?;
                if claimed == max {
                    // There may be more.
                    self.wake.hint(1);
                } else if self.wake.hints.load(Ordering::Acquire) > 0 {
                    // Hints left for another consumer here.
                    self.wake.notify.notify_one();
                }
                if !got.is_empty() {
                    return Ok(got);
                }
                if claimed > 0 {
                    continue;
                }
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return Ok(Vec::new());
            }
            if tokio::time::timeout(until - now, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        let ids = row_ids(ids);
        if ids.is_empty() {
            return Ok(());
        }
        let inner = &self.bus.inner;
        if inner.carried.load(Ordering::Acquire) {
            // The orchestrator acks the results it applied right after their
            // writes, and the next write comes soon: the acks go with it (in
            // its transaction), or after `ACK_WAIT` by themselves. An ack
            // lost in a crash meanwhile only means a result delivered again,
            // which changes nothing, as with any lost ack.
            let weak = Arc::downgrade(inner);
            inner.flusher.call_once(|| {
                tokio::spawn(flush_acks(weak));
            });
            inner.wait_acks(ids);
            return Ok(());
        }
        let client = self.bus.lazy_client().await?;
        self.bus
            .execute(&client, &self.bus.inner.sql.ack, &[&ids])
            .await?;
        Ok(())
    }

    async fn extend(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        let ids = row_ids(ids);
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.bus.lazy_client().await?;
        self.bus
            .execute(
                &client,
                &self.bus.inner.sql.extend,
                &[&ids, &self.name, &self.lease_ms(), &self.bus.inner.instance],
            )
            .await?;
        Ok(())
    }

    fn visibility_timeout(&self) -> Duration {
        self.bus.inner.config.visibility_timeout
    }

    async fn reject(&self, delivery: &Delivery, reason: &str) -> Result<(), BusError> {
        let Some(id) = row_ids(std::slice::from_ref(&delivery.id)).pop() else {
            return Ok(());
        };
        tracing::warn!(topic = %self.topic, id, reason = %reason, "event dead-lettered");
        metrics::counter!(crate::monitoring::metrics::DEAD_LETTERS, "topic" => self.topic.clone())
            .increment(1);
        let client = self.bus.lazy_client().await?;
        self.bus
            .execute(
                &client,
                &self.bus.inner.sql.bury,
                &[
                    &vec![id],
                    &vec![reason.to_string()],
                    &vec![delivery.delivery_count as i32],
                    &millis(Timestamp::now()),
                ],
            )
            .await?;
        Ok(())
    }

    async fn publish_then_ack(
        &self,
        events: &[(String, Event)],
        ids: &[DeliveryId],
    ) -> Result<(), BusError> {
        if events.is_empty() {
            return self.ack(ids).await;
        }
        let (topics, bodies) = self.bus.encode(events)?;
        let ids = row_ids(ids);
        // Answers to deliveries commit without waiting for the flush: if
        // a crash of the server undid them, the deliveries would come
        // again and be answered again (a worker's idempotency key holds).
        // Events acking nothing would be lost: they wait.
        let local = self.bus.inner.local();
        let client = if ids.is_empty() {
            self.bus.client().await?
        } else {
            self.bus.lazy_client().await?
        };
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&topics, &bodies, &ids];
        params.extend(local.params());
        let rows = self
            .bus
            .query(&client, &self.bus.inner.sql.publish_then_ack, &params)
            .await?;
        drop(client);
        let inserted: Vec<Inserted> = rows.iter().filter_map(|r| Inserted::of(r, 0)).collect();
        self.bus.inner.settle(events, &inserted);
        Ok(())
    }
}

/// Sends the acks that waited `ACK_WAIT` for a store's write without one
/// taking them; stops when the bus is dropped.
async fn flush_acks(inner: std::sync::Weak<Inner>) {
    let Some(acked) = inner.upgrade().map(|i| i.acked.clone()) else {
        return;
    };
    loop {
        acked.notified().await;
        tokio::time::sleep(ACK_WAIT).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let ids = std::mem::take(&mut *strong.acks.lock().unwrap_or_else(|e| e.into_inner()));
        if ids.is_empty() {
            continue;
        }
        let deleted = match strong.leases.get().await {
            Ok(client) => match client.prepare_cached(&strong.sql.ack).await {
                Ok(statement) => client
                    .execute(&statement, &[&ids])
                    .await
                    .map(|_| ())
                    .map_err(|e| describe(&e)),
                Err(e) => Err(describe(&e)),
            },
            Err(e) => Err(describe_pool(&e)),
        };
        if let Err(e) = deleted {
            tracing::debug!(error = %e, acks = ids.len(), "acking failed; trying again");
            strong.wait_acks(ids);
        }
    }
}

/// Ends the name of the announcing bus in a `NOTIFY` payload, before the
/// topics (the unit separator, which no topic name has).
const FROM: char = '\u{1f}';

/// The topics an announcement names, unless it is `own` (its consumers
/// were woken when the publish committed). Payloads without a sender (of
/// earlier versions) name topics only.
fn announced<'a>(payload: &'a str, own: &str) -> Option<&'a str> {
    match payload.split_once(FROM) {
        Some((from, _)) if from == own => None,
        Some((_, topics)) => Some(topics),
        None => Some(payload),
    }
}

/// Announces the topics published to: whatever is queued goes out, each
/// topic once, in one `NOTIFY` (or a few, if long), after the inserts
/// committed.
async fn announce_loop(inner: std::sync::Weak<Inner>, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut batch: Vec<String> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while let Ok(topic) = rx.try_recv() {
            if !batch.contains(&topic) {
                batch.push(topic);
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Hundreds of worker types publishing at once still fit: as many
        // `NOTIFY`s as it takes.
        let payloads =
            super::conn::notify_payloads(&format!("{}{FROM}", inner.instance), batch.drain(..));
        match inner.leases.get().await {
            Ok(client) => {
                for payload in &payloads {
                    let sent = match client.prepare_cached(&inner.sql.notify).await {
                        Ok(statement) => client
                            .execute(&statement, &[&inner.sql.channel, payload])
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = sent {
                        tracing::debug!(error = %describe(&e), "announcing published topics failed; consumers elsewhere find them by polling");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %describe_pool(&e), "announcing published topics failed; consumers elsewhere find them by polling");
            }
        }
    }
}

/// Follows the announcements of other processes, reconnecting when the
/// connection is lost (every consumer here looks again then, in case one
/// was missed); stops when the bus is dropped.
async fn listen(inner: std::sync::Weak<Inner>) {
    let Some((connector, channel)) = inner
        .upgrade()
        .map(|i| (i.connector.clone(), i.sql.channel.clone()))
    else {
        return;
    };
    let on_payload = inner.clone();
    super::conn::follow(
        connector,
        channel,
        "bus",
        || inner.upgrade().map(|i| Inner::wake_all(&i)).is_some(),
        |payload| {
            let Some(strong) = on_payload.upgrade() else {
                return false;
            };
            let Some(topics) = announced(payload, &strong.instance) else {
                return true;
            };
            for topic in topics.split(',') {
                Inner::wake_topic(&strong, topic, 1);
            }
            true
        },
    )
    .await
}

/// Looks, for every topic and group waited on here, when its next row
/// becomes visible: wakes those with a visible row, adopts rows published
/// before their topic had a group, and sleeps until the next lease runs
/// out, at most `poll_interval`. Stops when the bus is dropped.
async fn poll(inner: std::sync::Weak<Inner>) {
    let Some(joined) = inner.upgrade().map(|i| i.joined.clone()) else {
        return;
    };
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let every = strong.config.poll_interval;
        let pairs: Vec<(String, String)> = strong
            .waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut next = every;
        if !pairs.is_empty() {
            match poll_once(&strong, &pairs).await {
                Ok(soonest) => next = soonest.map_or(every, |s| s.min(every)),
                Err(e) => {
                    tracing::debug!(error = %e, "polling the PostgreSQL bus failed; trying again");
                    Inner::wake_all(&strong);
                }
            }
        }
        drop(strong);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = joined.notified() => {}
        }
    }
}

/// One look; returns how long until the soonest lease runs out.
async fn poll_once(inner: &Inner, pairs: &[(String, String)]) -> Result<Option<Duration>, String> {
    let client = inner.leases.get().await.map_err(|e| describe_pool(&e))?;
    let topics: Vec<&str> = pairs.iter().map(|(t, _)| t.as_str()).collect();
    let groups: Vec<&str> = pairs.iter().map(|(_, g)| g.as_str()).collect();
    let statement = client
        .prepare_cached(&inner.sql.poll)
        .await
        .map_err(|e| describe(&e))?;
    let rows = client
        .query(&statement, &[&topics, &groups])
        .await
        .map_err(|e| describe(&e))?;
    let mut soonest: Option<Duration> = None;
    let mut orphaned: Vec<String> = Vec::new();
    let waits: Vec<(String, String, Option<f64>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    for (topic, group, until, orphans) in waits {
        if orphans && !orphaned.contains(&topic) {
            orphaned.push(topic.clone());
        }
        match until {
            Some(ms) if ms <= 0.0 => {
                let wake = inner
                    .waits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(topic, group))
                    .cloned();
                if let Some(w) = wake {
                    w.hint(1);
                }
            }
            Some(ms) => {
                let d = Duration::from_micros((ms * 1000.0) as u64 + 1000);
                soonest = Some(soonest.map_or(d, |s| s.min(d)));
            }
            None => {}
        }
    }
    for topic in orphaned {
        client
            .execute(inner.sql.adopt.as_str(), &[&topic])
            .await
            .map_err(|e| describe(&e))?;
        Inner::wake_topic(inner, &topic, 1);
    }
    Ok(soonest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bus_skips_its_own_announcements_and_reads_every_other() {
        let own = "a1";
        let payloads = super::super::conn::notify_payloads(&format!("{own}{FROM}"), ["t1", "t2"]);
        assert_eq!(payloads.len(), 1);
        assert_eq!(announced(&payloads[0], own), None, "its own");
        assert_eq!(announced(&payloads[0], "b2"), Some("t1,t2"), "another's");
        assert_eq!(announced("t1,t2", own), Some("t1,t2"), "a sender of before");
    }
}

//! The PostgreSQL state store: workflow states with compare-and-set, timers
//! any orchestrator replica can fire (exactly one does), definitions by
//! version, worker heartbeats, retention by batched deletes.
//!
//! Its tables are in the [module table](super). Writes go through writer
//! tasks that commit concurrent transitions together: the compare-and-sets
//! of a batch are one statement over `unnest` arrays, an `UPDATE … FROM`
//! of the workflows' rows where the version is the one read, with the
//! parts they changed upserted, their timers set, and the writes noted
//! unpublished, in data-modifying `WITH` clauses of the same statement, so
//! that each write happens whole or not at all. Waiting clients are woken by one `NOTIFY` per finished batch,
//! sent after the write commits, never inside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use super::bus::{Inserted, Local};
use super::conn::{Connector, describe, describe_pool};
use crate::core::saga::parts::Changes;
use crate::core::{
    Timestamp, TransactionId, WorkflowDefinition, WorkflowName, WorkflowState, WorkflowStatus,
};
use crate::store::fields::{assemble, part_field, part_output, write_fields};
use crate::store::{
    Definitions, HealthRecords, ListQuery, StoreError, TimerIndex, Version, Versioned,
    WorkflowStates, WorkflowSummary, same_definition,
};

/// Settings of a [`PostgresStateStore`].
#[derive(Clone, Debug)]
pub struct PostgresStoreConfig {
    /// `postgres://[user[:password]@]host[:port]/database[?sslmode=…]`
    /// (`sslmode` as libpq reads it: `disable`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`), or
    /// `key=value` settings (`host=/run/postgresql dbname=app`).
    pub url: String,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// server reached over TLS; with it, `sslmode=prefer` and `require`
    /// check the server's chain as `verify-ca` does.
    pub ca_file: Option<std::path::PathBuf>,
    /// The schema holding the tables, created if missing.
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// How long a due timer is leased to the replica that took it.
    pub timer_lease: Duration,
    /// Outputs and fan-out items of this many bytes or more are stored
    /// apart from their step, once, under their SHA-256 (a `p:<digest>`
    /// part). Default [`crate::store::LARGE_PAYLOAD_BYTES`].
    pub large_payload_bytes: usize,
    /// Writer tasks. Each takes the transitions waiting to be written and
    /// writes them in one transaction (one commit for all), so that many
    /// concurrent transitions share a commit; a lone transition is written
    /// at once, by itself.
    pub writers: usize,
    /// The most transitions one writer puts in one transaction.
    pub batch: usize,
}

impl PostgresStoreConfig {
    /// Defaults for a server at `url`: schema `multiagents`, 16
    /// connections, 30 s timer lease, 4 writers of up to 128 transitions
    /// per transaction.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            schema: "multiagents".into(),
            pool_size: 16,
            timer_lease: Duration::from_secs(30),
            large_payload_bytes: crate::store::LARGE_PAYLOAD_BYTES,
            writers: 4,
            batch: 128,
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

    /// Writer tasks, each committing a batch of transitions at a time.
    pub fn writers(mut self, writers: usize) -> Self {
        self.writers = writers;
        self
    }

    /// The size from which payloads are kept apart.
    pub fn large_payload_bytes(mut self, bytes: usize) -> Self {
        self.large_payload_bytes = bytes;
        self
    }
}

/// A store on PostgreSQL: states, timers, definitions and worker health.
///
/// ```no_run
/// # async fn run() -> Result<(), multiagents::store::StoreError> {
/// use multiagents::store::{PostgresStateStore, PostgresStoreConfig, Store};
///
/// let pg = PostgresStateStore::connect(PostgresStoreConfig::new(
///     "postgres://app@localhost/app",
/// ))
/// .await?;
/// let store: Store = pg.into();
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStateStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: PostgresStoreConfig,
    connector: Connector,
    pool: deadpool_postgres::Pool,
    sql: Arc<Sql>,
    /// Lease deadlines of the timers this instance took, by transaction.
    leases: Mutex<crate::core::hash::IdMap<TransactionId, i64>>,
    /// Waiters of this process, by workflow: woken with the state when this
    /// process wrote it finished, or with nothing (read it) when another
    /// process announced it.
    waiters: crate::store::waiters::Waiters,
    listener: std::sync::Once,
    /// Finished workflows to announce, sent after their write committed.
    finished: mpsc::UnboundedSender<TransactionId>,
    /// Transitions for the writers.
    writes: mpsc::Sender<Write>,
    /// Writes submitted and not yet answered. A write submitted when there
    /// is none is written by its caller: a lone transition (a workflow run
    /// by itself) so spares the hand-over to a writer task and back, two
    /// thread wake-ups; writes that come while others are under way queue
    /// for the writers, which batch them.
    under_way: std::sync::atomic::AtomicUsize,
    /// Writes published, whose notes are to be deleted.
    published: mpsc::UnboundedSender<(uuid::Uuid, i64)>,
    /// What the writers did.
    counts: Arc<WriteCounts>,
    /// Bytes of state records sent.
    written: std::sync::atomic::AtomicU64,
    /// The bus of this database whose events writes carry, once set.
    carrier: Arc<std::sync::OnceLock<super::bus::Carrier>>,
    /// Payloads this instance stored, by workflow and digest: a later write
    /// names them without sending them again (the statement checks that
    /// they are still there). Bounded: forgotten all at once when full.
    stored: Mutex<std::collections::HashSet<(TransactionId, String)>>,
}

/// Counts a submitted write as under way until it is answered (or its
/// caller gives up on it).
struct UnderWay<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How many (workflow, payload) pairs a store remembers having written.
const REMEMBERED_PAYLOADS: usize = 16 * 1024;

/// Workflows deleted per statement by `expire`.
const EXPIRE_BATCH: i64 = 1000;

/// The statements, with the schema written in.
struct Sql {
    create: String,
    update: String,
    lock: String,
    delete_parts: String,
    get: String,
    part: String,
    status: String,
    expire: String,
    published: String,
    unpublished: String,
    due: String,
    rearm: String,
    give_back: String,
    put_definition: String,
    get_definition: String,
    latest_definition: String,
    definition_versions: String,
    record_health: String,
    read_health: String,
    drop_health: String,
    notify: String,
    channel: String,
    schema: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        // The columns every write sets, then the parts and the note.
        // Any number of creates, each workflow once: `c` the rows, `f`
        // their parts, `e` their events; the final `SELECT` says which were
        // created (the others existed), then the bus rows of their events.
        let create = format!(
            "WITH c AS (
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::text[], $5::uuid[],
                   $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                   $11::bigint[], $12::bool[])
               AS c(tx, workflow, def_version, status, correlation_id, started_at, updated_at,
                   finished_at, wakeup, history_len, at, noted)
             ), w AS (
               INSERT INTO {s}.workflows (tx, version, workflow, def_version, status, correlation_id,
                   started_at, updated_at, finished_at, history_len)
               SELECT tx, 1, workflow, def_version, status, correlation_id, started_at, updated_at,
                   finished_at, history_len FROM c
               ON CONFLICT (tx) DO NOTHING RETURNING tx
             ), t AS (
               INSERT INTO {s}.timers (tx, wakeup)
               SELECT c.tx, c.wakeup FROM c JOIN w ON w.tx = c.tx WHERE c.wakeup IS NOT NULL
             ), f AS (
               SELECT * FROM unnest($13::uuid[], $14::text[], $15::bytea[]) AS f(tx, field, value)
             ), p AS (
               INSERT INTO {s}.parts (tx, field, value)
               SELECT f.tx, f.field, f.value FROM f JOIN w ON w.tx = f.tx
               ON CONFLICT (tx, field) DO UPDATE SET value = excluded.value
             ), u AS (
               INSERT INTO {s}.unpublished (tx, version, at)
               SELECT c.tx, 1, c.at FROM c JOIN w ON w.tx = c.tx WHERE c.noted
             ), e AS (
               SELECT * FROM unnest($16::uuid[], $17::text[], $18::bytea[]) WITH ORDINALITY
                 AS e(tx, topic, body, n)
             ), a AS (
               DELETE FROM {s}.messages WHERE id = ANY($23::bigint[])
             ), m AS ({})
             SELECT c.tx, w.tx IS NOT NULL, NULL::bigint, NULL::text, NULL::bigint, NULL::bool
             FROM c LEFT JOIN w ON w.tx = c.tx
             UNION ALL SELECT NULL, NULL, m.id, m.grp, m.tag, m.leased FROM m",
            super::bus::insert_messages(s, "e JOIN w ON w.tx = e.tx", 19)
        );
        // Any number of compare-and-sets, each workflow once: `r` the rows,
        // `named` the payload parts they name without sending (they must be
        // stored), `f` the parts they write. The final `SELECT` reads the
        // rows as they were before the statement: the version and history
        // length a refused write reports.
        let update = format!(
            "WITH r AS (
               SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[],
                   $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bool[])
               AS r(tx, expected, status, updated_at, finished_at, wakeup, history_len,
                   history_from, at, noted)
             ), named AS (
               SELECT * FROM unnest($11::uuid[], $12::text[]) AS n(tx, field)
             ), w AS (
               UPDATE {s}.workflows w SET version = r.expected + 1, status = r.status,
                   updated_at = r.updated_at, finished_at = r.finished_at, history_len = r.history_len
               FROM r
               WHERE w.tx = r.tx AND w.version = r.expected
                 AND (r.history_from IS NULL OR w.history_len = r.history_from)
                 AND NOT EXISTS (
                   SELECT 1 FROM named n WHERE n.tx = r.tx AND NOT EXISTS (
                     SELECT 1 FROM {s}.parts p WHERE p.tx = n.tx AND p.field = n.field))
               RETURNING w.tx
             ), f AS (
               SELECT * FROM unnest($13::uuid[], $14::text[], $15::bytea[]) AS f(tx, field, value)
             ), p AS (
               INSERT INTO {s}.parts (tx, field, value)
               SELECT f.tx, f.field, f.value FROM f JOIN w ON w.tx = f.tx
               ON CONFLICT (tx, field) DO UPDATE SET value = excluded.value
                 WHERE left({s}.parts.field, 2) <> 'p:'
             ), t AS (
               INSERT INTO {s}.timers (tx, wakeup)
               SELECT r.tx, r.wakeup FROM r JOIN w ON w.tx = r.tx WHERE r.wakeup IS NOT NULL
               ON CONFLICT (tx) DO UPDATE SET wakeup = excluded.wakeup
                 WHERE excluded.wakeup < {s}.timers.wakeup
             ), td AS (
               -- An array, so that the plan looks each one up: a join
               -- planned generically (an `unnest` guessed at 10 rows) read
               -- the whole timers index for every batch.
               DELETE FROM {s}.timers
               WHERE tx = ANY(ARRAY(SELECT r.tx FROM r JOIN w ON w.tx = r.tx WHERE r.wakeup IS NULL))
             ), u AS (
               INSERT INTO {s}.unpublished (tx, version, at)
               SELECT r.tx, r.expected + 1, r.at FROM r JOIN w ON w.tx = r.tx WHERE r.noted
             ), e AS (
               SELECT * FROM unnest($16::uuid[], $17::text[], $18::bytea[]) WITH ORDINALITY
                 AS e(tx, topic, body, n)
             ), a AS (
               DELETE FROM {s}.messages WHERE id = ANY($23::bigint[])
             ), ac AS (
               -- The results each transition applied, if it was made.
               DELETE FROM {s}.messages WHERE id = ANY(ARRAY(
                 SELECT k.id FROM unnest($24::uuid[], $25::bigint[]) AS k(tx, id)
                 JOIN w ON w.tx = k.tx))
             ), m AS ({})
             SELECT r.tx, w.tx IS NOT NULL, c.version, c.history_len,
                 NULL::bigint, NULL::text, NULL::bigint, NULL::bool
             FROM r LEFT JOIN w ON w.tx = r.tx LEFT JOIN {s}.workflows c ON c.tx = r.tx
             UNION ALL SELECT NULL, NULL, NULL, NULL, m.id, m.grp, m.tag, m.leased FROM m",
            super::bus::insert_messages(s, "e JOIN w ON w.tx = e.tx", 19)
        );
        Self {
            create,
            update,
            lock: format!("SELECT version FROM {s}.workflows WHERE tx = $1 FOR UPDATE"),
            delete_parts: format!("DELETE FROM {s}.parts WHERE tx = $1"),
            get: format!(
                "SELECT w.version, w.history_len, p.field, p.value
                 FROM {s}.workflows w LEFT JOIN {s}.parts p ON p.tx = w.tx WHERE w.tx = $1"
            ),
            part: format!("SELECT value FROM {s}.parts WHERE tx = $1 AND field = $2"),
            status: format!("SELECT status FROM {s}.workflows WHERE tx = $1"),
            expire: format!(
                "WITH d AS (
                   DELETE FROM {s}.workflows WHERE tx IN (
                     SELECT tx FROM {s}.workflows WHERE finished_at < $1 LIMIT $2
                   ) RETURNING tx
                 ), p AS (
                   DELETE FROM {s}.parts WHERE tx = ANY(ARRAY(SELECT tx FROM d))
                 ), u AS (
                   DELETE FROM {s}.unpublished WHERE tx = ANY(ARRAY(SELECT tx FROM d))
                 ), t AS (
                   DELETE FROM {s}.timers WHERE tx = ANY(ARRAY(SELECT tx FROM d))
                 )
                 SELECT count(*) FROM d"
            ),
            published: format!(
                "DELETE FROM {s}.unpublished u
                 USING unnest($1::uuid[], $2::bigint[]) AS x(tx, version)
                 WHERE u.tx = x.tx AND u.version = x.version"
            ),
            unpublished: format!(
                "UPDATE {s}.unpublished u SET at = $2
                 FROM (SELECT tx, version FROM {s}.unpublished WHERE at <= $1
                       ORDER BY at LIMIT $3 FOR UPDATE SKIP LOCKED) x
                 WHERE u.tx = x.tx AND u.version = x.version
                 RETURNING u.tx, u.version"
            ),
            due: format!(
                "UPDATE {s}.timers t SET lease = $2
                 FROM (SELECT tx FROM {s}.timers WHERE wakeup <= $1 AND lease <= $1
                       ORDER BY wakeup LIMIT $3 FOR UPDATE SKIP LOCKED) x
                 WHERE t.tx = x.tx
                 RETURNING t.tx"
            ),
            rearm: format!(
                "UPDATE {s}.timers SET lease = 0, wakeup = $3
                 WHERE tx = $1 AND lease = $2
                   AND EXISTS (SELECT 1 FROM {s}.workflows w WHERE w.tx = $1 AND w.version = $4)"
            ),
            give_back: format!("UPDATE {s}.timers SET lease = 0 WHERE tx = $1 AND lease = $2"),
            put_definition: format!(
                "INSERT INTO {s}.definitions (name, version, body) VALUES ($1, $2, $3)
                 ON CONFLICT (name, version) DO NOTHING"
            ),
            get_definition: format!(
                "SELECT body FROM {s}.definitions WHERE name = $1 AND version = $2"
            ),
            latest_definition: format!(
                "SELECT body FROM {s}.definitions WHERE name = $1 ORDER BY version DESC LIMIT 1"
            ),
            definition_versions: format!(
                "SELECT name, version FROM {s}.definitions ORDER BY name, version"
            ),
            record_health: format!(
                "INSERT INTO {s}.workers (key, at, body)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
                 ON CONFLICT (key) DO UPDATE SET at = excluded.at, body = excluded.body"
            ),
            read_health: format!("SELECT body FROM {s}.workers WHERE at >= $1"),
            drop_health: format!("DELETE FROM {s}.workers WHERE at < $1"),
            notify: "SELECT pg_notify($1, $2)".into(),
            channel: format!("{s}_finished"),
            schema: s.to_string(),
        }
    }
}

/// Why a write did not happen.
enum Refused {
    Store(StoreError),
    Exists,
    Conflict(Version),
    Missing,
    /// The stored history has this many entries, not what the delta expects.
    History(i64),
    /// A payload named without its value is not stored.
    Named,
}

fn millis(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

impl PostgresStateStore {
    /// Connects, and creates or migrates the tables; fails with the
    /// server's address if it cannot be reached.
    pub async fn connect(config: PostgresStoreConfig) -> Result<Self, StoreError> {
        super::schema::valid_schema(&config.schema).map_err(|message| StoreError::Io {
            location: super::redacted(&config.url),
            message,
        })?;
        let connector =
            Connector::new(&config.url, config.ca_file.as_deref()).map_err(|message| {
                StoreError::Io {
                    location: super::redacted(&config.url),
                    message,
                }
            })?;
        let io = |message: String| StoreError::Io {
            location: connector.address.clone(),
            message,
        };
        let pool = connector.pool(config.pool_size).map_err(io)?;
        {
            let mut client = pool.get().await.map_err(|e| {
                io(format!(
                    "cannot connect: {}; is PostgreSQL running there, and is the URL right?",
                    describe_pool(&e)
                ))
            })?;
            let applied = super::schema::migrate(&mut client, &config.schema)
                .await
                .map_err(|e| {
                    io(format!(
                        "cannot create or migrate the tables: {}",
                        describe(&e)
                    ))
                })?;
            if !applied.is_empty() {
                tracing::info!(schema = %config.schema, migrations = ?applied, "PostgreSQL tables migrated");
            }
        }
        let (finished, announcements) = mpsc::unbounded_channel();
        let sql = Arc::new(Sql::new(&config.schema));
        let (writes, queue) = mpsc::channel(config.batch.max(1) * config.writers.max(1) * 4);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let (published, notes) = mpsc::unbounded_channel();
        tokio::spawn(forget_published(pool.clone(), sql.clone(), notes));
        let counts = Arc::new(WriteCounts::default());
        let carrier: Arc<std::sync::OnceLock<super::bus::Carrier>> = Arc::default();
        for _ in 0..config.writers.max(1) {
            tokio::spawn(writer(
                pool.clone(),
                sql.clone(),
                queue.clone(),
                config.batch.max(1),
                counts.clone(),
                carrier.clone(),
            ));
        }
        let store = Self {
            inner: Arc::new(Inner {
                sql,
                config,
                connector,
                pool,
                leases: Mutex::default(),
                waiters: Default::default(),
                listener: std::sync::Once::new(),
                finished,
                writes,
                under_way: std::sync::atomic::AtomicUsize::new(0),
                published,
                counts,
                written: std::sync::atomic::AtomicU64::new(0),
                carrier,
                stored: Mutex::default(),
            }),
        };
        tokio::spawn(announce(Arc::downgrade(&store.inner), announcements));
        Ok(store)
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &PostgresStoreConfig {
        &self.inner.config
    }

    /// Publishes the events of each transition on `bus` in the same
    /// transaction as its state, from now on (PostgreSQL alone). The
    /// commands of a step are then written exactly when its state is: no
    /// publish after the write, no note of unpublished writes, nothing for
    /// the recovery sweep to heal. `bus` must be on the same server and
    /// schema, or it is refused, naming both.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use multiagents::bus::{Bus, PostgresBus, PostgresBusConfig};
    /// use multiagents::store::{PostgresStateStore, PostgresStoreConfig};
    ///
    /// let url = "postgres://app@localhost/app";
    /// let store = PostgresStateStore::connect(PostgresStoreConfig::new(url)).await?;
    /// let bus = PostgresBus::connect(PostgresBusConfig::new(url)).await?;
    /// store.carry_events_of(&bus)?;
    /// let runtime = multiagents::Runtime::builder()
    ///     .store(store)
    ///     .bus(Bus::new(bus));
    /// # let _ = runtime;
    /// # Ok(())
    /// # }
    /// ```
    pub fn carry_events_of(&self, bus: &super::PostgresBus) -> Result<(), StoreError> {
        let carrier = bus.carrier();
        let here = (&self.inner.connector.address, &self.inner.config.schema);
        let there = (carrier.address(), &bus.config().schema);
        if here.0 != there.0 || here.1 != there.1 {
            return Err(self.io(format!(
                "the bus is at {} (schema {}), the store at {} (schema {}): a transaction cannot span them",
                there.0, there.1, here.0, here.1
            )));
        }
        let _ = self.inner.carrier.set(carrier);
        Ok(())
    }

    /// What the writers did so far: transitions written and the commits
    /// they took (fewer commits than writes: batches shared them).
    pub fn write_stats(&self) -> WriteStats {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        WriteStats {
            writes: load(&self.inner.counts.writes),
            commits: load(&self.inner.counts.commits),
            statements: load(&self.inner.counts.statements),
        }
    }

    fn io(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            location: self.inner.connector.address.clone(),
            message: message.to_string(),
        }
    }

    fn corrupt(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            location: self.inner.connector.address.clone(),
            message: message.to_string(),
        }
    }

    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        self.io(describe(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| self.io(describe_pool(&e)))
    }

    async fn write(
        &self,
        expected: Option<Version>,
        before: Option<&WorkflowState>,
        state: Arc<WorkflowState>,
        events: Option<&Events>,
        consumed: &[i64],
    ) -> Result<(Version, Vec<Inserted>), StoreError> {
        let apart = self.inner.config.large_payload_bytes;
        let delta = match (expected, before) {
            (Some(_), Some(b)) => Changes::between(b, &state),
            _ => Changes::full(&state),
        }
        .keep_apart(apart);
        // This process's waiters get a finished state itself, whenever its
        // announcement comes back.
        let writing = state
            .is_terminal()
            .then(|| self.inner.waiters.writing(state.transaction_id));
        let written = match self
            .write_parts(expected, &delta, &state, true, events, consumed)
            .await
        {
            // A payload named was gone (the parts rewritten meanwhile): send all.
            Err(Refused::Named) => {
                self.write_parts(expected, &delta, &state, false, events, consumed)
                    .await
            }
            other => other,
        };
        let written = match written {
            // Not stored as the caller read it: whole.
            Err(Refused::History(len)) if !delta.full => {
                tracing::debug!(transaction_id = %state.transaction_id, stored = len, expected = delta.history_from, "the stored history is not the one read: writing the state whole");
                let whole = Changes::full(&state).keep_apart(apart);
                self.write_parts(expected, &whole, &state, false, events, consumed)
                    .await
            }
            other => other,
        };
        match written {
            Ok((v, inserted)) => {
                if let Some(writing) = writing {
                    let _ = self.inner.finished.send(state.transaction_id);
                    writing.hand_over(v, &state);
                }
                Ok((v, inserted))
            }
            Err(r) => Err(self.refused(r, state.transaction_id, expected)),
        }
    }

    fn refused(&self, r: Refused, tx: TransactionId, expected: Option<Version>) -> StoreError {
        match r {
            Refused::Store(e) => e,
            Refused::Exists => StoreError::AlreadyExists(tx),
            Refused::Conflict(found) => StoreError::Conflict {
                transaction_id: tx,
                expected: expected.unwrap_or(0),
                found,
            },
            Refused::Missing => StoreError::NotFound(tx),
            Refused::History(_) | Refused::Named => self.corrupt(format!(
                "workflow {tx} could not be written whole over its stored parts"
            )),
        }
    }

    /// Hands a write to the writers and waits for its answer; with no other
    /// write of this store under way, writes it here instead (see
    /// [`Inner::under_way`]).
    async fn submit(&self, job: Job) -> Result<Answer, Refused> {
        use std::sync::atomic::Ordering;
        let before = self.inner.under_way.fetch_add(1, Ordering::AcqRel);
        let _done = UnderWay(&self.inner.under_way);
        if before == 0 {
            return self.write_here(&job).await;
        }
        let (reply, answer) = oneshot::channel();
        let gone = || Refused::Store(self.io("the store's writers have stopped"));
        self.inner
            .writes
            .send(Write { job, reply })
            .await
            .map_err(|_| gone())?;
        match answer.await.map_err(|_| gone())? {
            Ok(answer) => Ok(answer),
            Err(WriteError::Pg(e)) => Err(Refused::Store(self.pg(e))),
            Err(WriteError::Pool(message)) => Err(Refused::Store(self.io(message))),
        }
    }

    /// A lone write, by the caller's task: what a writer does with one write
    /// taken alone.
    async fn write_here(&self, job: &Job) -> Result<Answer, Refused> {
        let client = self
            .inner
            .pool
            .get()
            .await
            .map_err(|e| Refused::Store(self.io(describe_pool(&e))))?;
        let carrier = self.inner.carrier.get();
        let local = carrier.map(|c| c.local()).unwrap_or_default();
        // Taken for this write. Should its caller give up on it midway,
        // they are lost with it: those results come again after their lease
        // and are acked as already applied.
        let mut acks = carrier.map(|c| c.take_acks()).unwrap_or_default();
        let answer = write_alone(
            &client,
            &self.inner.sql,
            job,
            &local,
            &mut acks,
            &self.inner.counts,
        )
        .await;
        if answer.is_err()
            && let Some(c) = carrier
        {
            c.give_back_acks(acks);
        }
        answer.map_err(|e| Refused::Store(self.pg(e)))
    }

    /// One write of `delta`; with `name_stored`, the payloads this store
    /// wrote before are named, not sent (never for a full write, which
    /// deletes what was there first). An update deletes the bus rows
    /// `consumed` if it is made.
    async fn write_parts(
        &self,
        expected: Option<Version>,
        delta: &Changes<'_>,
        state: &WorkflowState,
        name_stored: bool,
        events: Option<&Events>,
        consumed: &[i64],
    ) -> Result<(Version, Vec<Inserted>), Refused> {
        let tx = state.transaction_id;
        let (head, mut fields) =
            write_fields(delta, state).map_err(|e| Refused::Store(self.corrupt(e)))?;
        fields.push(("h".into(), head));
        let mut named: Vec<String> = Vec::new();
        let mut payloads: Vec<(String, &str)> = Vec::new();
        {
            let stored = self.inner.stored.lock().unwrap_or_else(|e| e.into_inner());
            for (d, p) in delta.apart.payloads() {
                let field = format!("p:{d}");
                match name_stored && !delta.full && stored.contains(&(tx, d.to_string())) {
                    true => named.push(field),
                    false => payloads.push((field, p.as_str())),
                }
            }
        }
        let mut names: Vec<String> = Vec::with_capacity(fields.len() + payloads.len());
        let mut values: Vec<Vec<u8>> = Vec::with_capacity(fields.len() + payloads.len());
        for (f, v) in fields {
            names.push(f);
            values.push(v.into_bytes());
        }
        for (f, p) in payloads {
            names.push(f);
            values.push(p.as_bytes().to_vec());
        }
        let sent = names.iter().map(|n| n.len()).sum::<usize>()
            + values.iter().map(|v| v.len()).sum::<usize>()
            + named.iter().map(String::len).sum::<usize>()
            + state.status.as_str().len()
            + state.workflow.as_str().len()
            + 16 * 2
            + 8 * 8;
        self.inner
            .written
            .fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
        // A finished top-level workflow has nothing left that must arrive
        // (only status broadcasts): no note.
        // Nor when its events go with it.
        let noted = events.is_none() && !(state.is_terminal() && state.parent.is_none());
        let mut events = events.cloned().unwrap_or_default();
        let now = millis(Timestamp::now());
        let status = state.status.as_str();
        let updated = millis(state.updated_at);
        let finished = state.finished_at.map(millis);
        let wakeup = state.next_wakeup().map(millis);
        let history_len = state.history.len() as i64;
        let sql = &self.inner.sql;
        let pg = |e: tokio_postgres::Error| Refused::Store(self.pg(e));
        let (version, inserted) = match expected {
            None => {
                let create = Create {
                    tx: tx.0,
                    workflow: state.workflow.as_str().to_string(),
                    def_version: state.version as i32,
                    status,
                    correlation_id: state.correlation_id.0,
                    started_at: millis(state.started_at),
                    updated,
                    finished,
                    wakeup,
                    history_len,
                    at: now,
                    noted,
                    names,
                    values,
                    events: std::mem::take(&mut events),
                };
                match self.submit(Job::Create(create)).await? {
                    Answer::Created(true, inserted) => (1, inserted),
                    _ => return Err(Refused::Exists),
                }
            }
            Some(expected) if delta.full => {
                // Over whatever is stored: in one transaction, the row
                // locked, its parts deleted, then written.
                let mut client = self.client().await.map_err(Refused::Store)?;
                let t = client.transaction().await.map_err(pg)?;
                let lock = t.prepare_cached(&sql.lock).await.map_err(pg)?;
                let Some(row) = t.query_opt(&lock, &[&tx.0]).await.map_err(pg)? else {
                    return Err(Refused::Missing);
                };
                let found = row.get::<_, i64>(0) as u64;
                if found != expected {
                    return Err(Refused::Conflict(found));
                }
                let delete = t.prepare_cached(&sql.delete_parts).await.map_err(pg)?;
                t.execute(&delete, &[&tx.0]).await.map_err(pg)?;
                let whole = Update {
                    tx: tx.0,
                    expected: expected as i64,
                    status,
                    updated,
                    finished,
                    wakeup,
                    history_len,
                    history_from: None,
                    at: now,
                    noted,
                    named: Vec::new(),
                    names,
                    values,
                    events,
                    consumed: consumed.to_vec(),
                };
                let local = self
                    .inner
                    .carrier
                    .get()
                    .map(|c| c.local())
                    .unwrap_or_default();
                let mut found = update(&t, sql, &[&whole], &local, &[]).await.map_err(pg)?;
                let Some((Some((true, _, _)), inserted)) = found.remove(&tx.0) else {
                    return Err(Refused::Store(
                        self.corrupt(format!("workflow {tx}: a locked row was not updated")),
                    ));
                };
                t.commit().await.map_err(pg)?;
                (expected + 1, inserted)
            }
            Some(expected) => {
                let update = Update {
                    tx: tx.0,
                    expected: expected as i64,
                    status,
                    updated,
                    finished,
                    wakeup,
                    history_len,
                    history_from: Some(delta.history_from as i64),
                    at: now,
                    noted,
                    named,
                    names,
                    values,
                    events,
                    consumed: consumed.to_vec(),
                };
                let Answer::Updated(row, inserted) = self.submit(Job::Update(update)).await? else {
                    unreachable!("an update is answered as one");
                };
                let Some((done, found, found_history)) = row else {
                    return Err(Refused::Missing);
                };
                let done = i64::from(done);
                let found = found as u64;

                if done == 1 {
                    (expected + 1, inserted)
                } else if found != expected {
                    return Err(Refused::Conflict(found));
                } else if found_history != delta.history_from as i64 {
                    return Err(Refused::History(found_history));
                } else {
                    return Err(Refused::Named);
                }
            }
        };
        if !delta.apart.is_empty() {
            let mut stored = self.inner.stored.lock().unwrap_or_else(|e| e.into_inner());
            if stored.len() + delta.apart.payloads().count() > REMEMBERED_PAYLOADS {
                stored.clear();
            }
            for (d, _) in delta.apart.payloads() {
                stored.insert((tx, d.to_string()));
            }
        }
        Ok((version, inserted))
    }

    /// Starts the listener that wakes local waiters when workflows finish.
    fn ensure_listener(&self) {
        let inner = Arc::downgrade(&self.inner);
        self.inner.listener.call_once(|| {
            tokio::spawn(listen(inner));
        });
    }
}

/// Transitions written by a [`PostgresStateStore`]'s writers, and the
/// commits they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Creates and compare-and-sets run by the writers.
    pub writes: u64,
    /// Transactions committed for them: one per batch, or per lone write.
    pub commits: u64,
    /// Statements the writers sent for them, `BEGIN` and `COMMIT`
    /// included: one per lone write; per batch, one per round of creates
    /// and one per round of updates (each workflow once a round), and two.
    pub statements: u64,
}

#[derive(Default)]
struct WriteCounts {
    writes: std::sync::atomic::AtomicU64,
    commits: std::sync::atomic::AtomicU64,
    statements: std::sync::atomic::AtomicU64,
}

impl WriteCounts {
    fn add(&self, writes: usize, commits: usize, statements: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.writes.fetch_add(writes as u64, Relaxed);
        self.commits.fetch_add(commits as u64, Relaxed);
        self.statements.fetch_add(statements as u64, Relaxed);
    }
}

/// One transition for the writers.
enum Job {
    /// A new workflow: a row of [`Sql::create`].
    Create(Create),
    /// A compare-and-set, a row of [`Sql::update`].
    Update(Update),
}

/// A new workflow: one row of the batch statement.
struct Create {
    tx: uuid::Uuid,
    workflow: String,
    def_version: i32,
    status: &'static str,
    correlation_id: uuid::Uuid,
    started_at: i64,
    updated: i64,
    finished: Option<i64>,
    wakeup: Option<i64>,
    history_len: i64,
    /// When it was written (the unpublished note's time).
    at: i64,
    noted: bool,
    names: Vec<String>,
    values: Vec<Vec<u8>>,
    /// Events published with the write (topics and bodies).
    events: Events,
}

/// A compare-and-set of one workflow: one row of the batch statement.
struct Update {
    tx: uuid::Uuid,
    expected: i64,
    status: &'static str,
    updated: i64,
    finished: Option<i64>,
    wakeup: Option<i64>,
    history_len: i64,
    /// The history length the writer read (None: any).
    history_from: Option<i64>,
    /// When it was written (the unpublished note's time).
    at: i64,
    noted: bool,
    /// Payload parts named without their value: they must be stored.
    named: Vec<String>,
    names: Vec<String>,
    values: Vec<Vec<u8>>,
    /// Events published with the write (topics and bodies).
    events: Events,
    /// Bus rows the transition applied (results): deleted if it is made.
    consumed: Vec<i64>,
}

/// Events a write carries onto the bus: their topics and encoded bodies.
pub(super) type Events = Vec<(String, Vec<u8>)>;

/// What a write found.
enum Answer {
    /// Whether the workflow was created (false: it existed), and the bus
    /// rows of its events.
    Created(bool, Vec<Inserted>),
    /// Whether the update was done, and the version and history length
    /// stored before it (None when the workflow does not exist); the bus
    /// rows of its events.
    Updated(Option<(bool, i64, i64)>, Vec<Inserted>),
}

/// The bus rows of each update of a statement, and what it found.
type Found = std::collections::HashMap<uuid::Uuid, (Option<(bool, i64, i64)>, Vec<Inserted>)>;

/// A transition and where its answer goes.
struct Write {
    job: Job,
    reply: oneshot::Sender<Result<Answer, WriteError>>,
}

enum WriteError {
    Pg(tokio_postgres::Error),
    Pool(String),
}

/// A writer: takes the writes waiting (up to `batch`) and runs them in one
/// transaction with one commit: the updates as one `UNNEST` statement per
/// round (a round holds each workflow once), the creates likewise beside
/// them, all sent together. One write alone runs by itself. If any statement of a
/// batch fails, the batch is rolled back and each write runs by itself, so
/// that one bad write fails alone. Stops when the store is dropped.
async fn writer(
    pool: deadpool_postgres::Pool,
    sql: Arc<Sql>,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Write>>>,
    batch: usize,
    counts: Arc<WriteCounts>,
    carrier: Arc<std::sync::OnceLock<super::bus::Carrier>>,
) {
    let mut writes: Vec<Write> = Vec::with_capacity(batch);
    loop {
        {
            let mut queue = queue.lock().await;
            if queue.recv_many(&mut writes, batch).await == 0 {
                return;
            }
        }
        let mut client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let message = describe_pool(&e);
                for w in writes.drain(..) {
                    let _ = w.reply.send(Err(WriteError::Pool(message.clone())));
                }
                continue;
            }
        };
        let local = carrier.get().map(|c| c.local()).unwrap_or_default();
        // The orchestrator's acks of the results it applied, deleted in the
        // transaction of these writes (given back to wait if it fails).
        let mut acks = carrier.get().map(|c| c.take_acks()).unwrap_or_default();
        let give_back = |acks: Vec<i64>| {
            if let Some(c) = carrier.get() {
                c.give_back_acks(acks);
            }
        };
        if writes.len() > 1 {
            match in_one_transaction(&mut client, &sql, &writes, &local, &acks).await {
                Ok((answers, statements)) => {
                    counts.add(writes.len(), 1, statements + 2);
                    for (w, answer) in writes.drain(..).zip(answers) {
                        let _ = w.reply.send(Ok(answer));
                    }
                    continue;
                }
                // Not committed: each by itself, below.
                Err(Batch::Statement) => give_back(std::mem::take(&mut acks)),
                // The commit's outcome is unknown: the writers' callers
                // read the state again, as after any failed write.
                Err(Batch::Commit(e)) => {
                    give_back(std::mem::take(&mut acks));
                    let message = describe(&e);
                    for w in writes.drain(..) {
                        let _ = w.reply.send(Err(WriteError::Pool(format!(
                            "the commit of a batch of writes failed: {message}"
                        ))));
                    }
                    continue;
                }
            }
        }
        // A lone write takes the acks; after a failed batch they were given
        // back, and each write by itself takes none.
        for w in writes.drain(..) {
            let answer = write_alone(&client, &sql, &w.job, &local, &mut acks, &counts).await;
            if answer.is_err() {
                give_back(std::mem::take(&mut acks));
            }
            let _ = w.reply.send(answer.map_err(WriteError::Pg));
        }
    }
}

/// One write by itself, in a statement of its own, deleting `acks` with it
/// (emptied when it was made).
async fn write_alone(
    client: &impl deadpool_postgres::GenericClient,
    sql: &Sql,
    job: &Job,
    local: &Local,
    acks: &mut Vec<i64>,
    counts: &WriteCounts,
) -> Result<Answer, tokio_postgres::Error> {
    let answer = match job {
        Job::Create(c) => create(client, sql, &[c], local, acks)
            .await
            .map(|mut found| {
                let (row, inserted) = found.remove(&c.tx).unwrap_or_default();
                Answer::Created(row.is_some_and(|(done, _, _)| done), inserted)
            }),
        Job::Update(u) => update(client, sql, &[u], local, acks)
            .await
            .map(|mut found| {
                let (row, inserted) = found.remove(&u.tx).unwrap_or_default();
                Answer::Updated(row, inserted)
            }),
    };
    if answer.is_ok() {
        counts.add(1, 1, 1);
        acks.clear();
    }
    answer
}

enum Batch {
    Statement,
    Commit(tokio_postgres::Error),
}

/// Runs the creates (each workflow at most once) as one statement; for
/// each workflow, whether it was created (as `(created, 0, 0)`), and the
/// bus rows of its events.
async fn create(
    client: &impl deadpool_postgres::GenericClient,
    sql: &Sql,
    creates: &[&Create],
    local: &Local,
    acks: &[i64],
) -> Result<Found, tokio_postgres::Error> {
    let statement = client.prepare_cached(&sql.create).await?;
    let column = |f: &dyn Fn(&Create) -> i64| creates.iter().map(|c| f(c)).collect::<Vec<i64>>();
    let txs: Vec<uuid::Uuid> = creates.iter().map(|c| c.tx).collect();
    let workflows: Vec<&str> = creates.iter().map(|c| c.workflow.as_str()).collect();
    let def_versions: Vec<i32> = creates.iter().map(|c| c.def_version).collect();
    let status: Vec<&str> = creates.iter().map(|c| c.status).collect();
    let correlations: Vec<uuid::Uuid> = creates.iter().map(|c| c.correlation_id).collect();
    let started = column(&|c| c.started_at);
    let updated = column(&|c| c.updated);
    let finished: Vec<Option<i64>> = creates.iter().map(|c| c.finished).collect();
    let wakeup: Vec<Option<i64>> = creates.iter().map(|c| c.wakeup).collect();
    let history_len = column(&|c| c.history_len);
    let at = column(&|c| c.at);
    let noted: Vec<bool> = creates.iter().map(|c| c.noted).collect();
    let mut flat = Flat::default();
    for c in creates {
        flat.add(c.tx, &c.names, &c.values, &c.events);
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &txs,
        &workflows,
        &def_versions,
        &status,
        &correlations,
        &started,
        &updated,
        &finished,
        &wakeup,
        &history_len,
        &at,
        &noted,
    ];
    params.extend(flat.params());
    params.extend(local.params());
    params.push(&acks);
    let rows = client.query(&statement, &params).await?;
    Ok(found(
        &rows,
        2,
        creates.iter().map(|c| (c.tx, c.events.len())),
        |row| Some((row.get(1), 0, 0)),
    ))
}

/// The parts and the events of a statement's writes, as its columns: each
/// part and event beside its workflow.
#[derive(Default)]
struct Flat<'a> {
    part_tx: Vec<uuid::Uuid>,
    names: Vec<&'a str>,
    values: Vec<&'a [u8]>,
    event_tx: Vec<uuid::Uuid>,
    topics: Vec<&'a str>,
    bodies: Vec<&'a [u8]>,
}

impl<'a> Flat<'a> {
    fn add(
        &mut self,
        tx: uuid::Uuid,
        names: &'a [String],
        values: &'a [Vec<u8>],
        events: &'a Events,
    ) {
        for (n, v) in names.iter().zip(values) {
            self.part_tx.push(tx);
            self.names.push(n);
            self.values.push(v);
        }
        for (topic, body) in events {
            self.event_tx.push(tx);
            self.topics.push(topic);
            self.bodies.push(body);
        }
    }

    /// The parts, then the events (six parameters).
    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.part_tx,
            &self.names,
            &self.values,
            &self.event_tx,
            &self.topics,
            &self.bodies,
        ]
    }
}

/// What a statement of writes found, by workflow: the rows whose first
/// column names a workflow (read by `row_of`), and the bus rows (from
/// column `at` on), each given to the write whose event it is; `writes`
/// are each write's workflow and how many events it had, in statement
/// order.
fn found(
    rows: &[tokio_postgres::Row],
    at: usize,
    writes: impl Iterator<Item = (uuid::Uuid, usize)>,
    row_of: impl Fn(&tokio_postgres::Row) -> Option<(bool, i64, i64)>,
) -> Found {
    let mut found: Found = std::collections::HashMap::with_capacity(rows.len());
    let mut inserted = Vec::new();
    for row in rows {
        match row.get::<_, Option<uuid::Uuid>>(0) {
            Some(tx) => found.entry(tx).or_default().0 = row_of(row),
            None => inserted.extend(Inserted::of(row, at)),
        }
    }
    to_their_writes(&mut found, inserted, writes);
    found
}

/// Gives each bus row of a statement to the write whose event it is: the
/// events went in write by write (`writes`: each one's workflow and how
/// many events it had).
fn to_their_writes(
    found: &mut Found,
    inserted: Vec<Inserted>,
    writes: impl Iterator<Item = (uuid::Uuid, usize)>,
) {
    if inserted.is_empty() {
        return;
    }
    let mut starts = Vec::new();
    let mut n = 0;
    for (tx, events) in writes {
        starts.push((n, tx));
        n += events;
    }
    for mut row in inserted {
        let k = starts.partition_point(|&(s, _)| s <= row.event);
        let Some(&(start, tx)) = k.checked_sub(1).and_then(|k| starts.get(k)) else {
            continue;
        };
        row.event -= start;
        found.entry(tx).or_default().1.push(row);
    }
}

/// Runs the updates (each workflow at most once) as one statement; for
/// each workflow, whether it was updated and what was stored before.
async fn update(
    client: &impl deadpool_postgres::GenericClient,
    sql: &Sql,
    updates: &[&Update],
    local: &Local,
    acks: &[i64],
) -> Result<Found, tokio_postgres::Error> {
    let statement = client.prepare_cached(&sql.update).await?;
    let column = |f: &dyn Fn(&Update) -> i64| updates.iter().map(|u| f(u)).collect::<Vec<i64>>();
    let txs: Vec<uuid::Uuid> = updates.iter().map(|u| u.tx).collect();
    let expected = column(&|u| u.expected);
    let status: Vec<&str> = updates.iter().map(|u| u.status).collect();
    let updated = column(&|u| u.updated);
    let finished: Vec<Option<i64>> = updates.iter().map(|u| u.finished).collect();
    let wakeup: Vec<Option<i64>> = updates.iter().map(|u| u.wakeup).collect();
    let history_len = column(&|u| u.history_len);
    let history_from: Vec<Option<i64>> = updates.iter().map(|u| u.history_from).collect();
    let at = column(&|u| u.at);
    let noted: Vec<bool> = updates.iter().map(|u| u.noted).collect();
    let (mut named_tx, mut named) = (Vec::new(), Vec::new());
    let mut flat = Flat::default();
    for u in updates {
        for n in &u.named {
            named_tx.push(u.tx);
            named.push(n.as_str());
        }
        flat.add(u.tx, &u.names, &u.values, &u.events);
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &txs,
        &expected,
        &status,
        &updated,
        &finished,
        &wakeup,
        &history_len,
        &history_from,
        &at,
        &noted,
        &named_tx,
        &named,
    ];
    params.extend(flat.params());
    params.extend(local.params());
    params.push(&acks);
    let (mut consumed_tx, mut consumed) = (Vec::new(), Vec::new());
    for u in updates {
        for id in &u.consumed {
            consumed_tx.push(u.tx);
            consumed.push(*id);
        }
    }
    params.push(&consumed_tx);
    params.push(&consumed);
    let rows = client.query(&statement, &params).await?;
    Ok(found(
        &rows,
        4,
        updates.iter().map(|u| (u.tx, u.events.len())),
        |row| {
            let done: bool = row.get(1);
            let version: Option<i64> = row.get(2);
            let history: Option<i64> = row.get(3);
            version.zip(history).map(|(v, h)| (done, v, h))
        },
    ))
}

async fn in_one_transaction(
    client: &mut deadpool_postgres::Object,
    sql: &Sql,
    writes: &[Write],
    local: &Local,
    acks: &[i64],
) -> Result<(Vec<Answer>, usize), Batch> {
    let t = client.transaction().await.map_err(|_| Batch::Statement)?;
    // Rounds in which each workflow is created, or updated, at most once
    // (racing writers of one workflow go in later rounds, and see the
    // earlier).
    fn round_of<'w, T>(
        rounds: &mut Vec<(std::collections::HashSet<uuid::Uuid>, Vec<&'w T>)>,
        tx: uuid::Uuid,
        write: &'w T,
    ) {
        match rounds.iter_mut().find(|(txs, _)| !txs.contains(&tx)) {
            Some((txs, round)) => {
                txs.insert(tx);
                round.push(write);
            }
            None => rounds.push(([tx].into(), vec![write])),
        }
    }
    let mut rounds: Vec<(std::collections::HashSet<uuid::Uuid>, Vec<&Update>)> = Vec::new();
    let mut creates: Vec<(std::collections::HashSet<uuid::Uuid>, Vec<&Create>)> = Vec::new();
    for w in writes {
        match &w.job {
            Job::Create(c) => round_of(&mut creates, c.tx, c),
            Job::Update(u) => round_of(&mut rounds, u.tx, u),
        }
    }
    let statements = creates.len() + rounds.len();
    // The acks go with the first statement.
    let acks_of = |first: bool| if first { acks } else { &[][..] };
    let (created, updated) = tokio::join!(
        futures_util::future::join_all(creates.iter().enumerate().map(|(i, (_, c))| create(
            &t,
            sql,
            c,
            local,
            acks_of(i == 0)
        ))),
        futures_util::future::join_all(rounds.iter().enumerate().map(|(i, (_, r))| update(
            &t,
            sql,
            r,
            local,
            acks_of(i == 0 && creates.is_empty())
        ))),
    );
    let failed = |e: &tokio_postgres::Error| {
        tracing::debug!(error = %describe(e), "a statement of a batch of writes failed: each is written by itself");
        Batch::Statement
    };
    let mut made = Vec::with_capacity(created.len());
    for r in created {
        made.push(r.map_err(|e| failed(&e))?);
    }
    let mut found = Vec::with_capacity(updated.len());
    for r in updated {
        found.push(r.map_err(|e| failed(&e))?);
    }
    let mut answers = Vec::with_capacity(writes.len());
    for w in writes {
        answers.push(match &w.job {
            Job::Create(c) => {
                let (row, inserted) = made
                    .iter_mut()
                    .find_map(|f| f.remove(&c.tx))
                    .unwrap_or_default();
                Answer::Created(row.is_some_and(|(done, _, _)| done), inserted)
            }
            // The round that held this update is the first whose answers
            // have it and not yet taken.
            Job::Update(u) => {
                let (row, inserted) = found
                    .iter_mut()
                    .find_map(|f| f.remove(&u.tx))
                    .unwrap_or_default();
                Answer::Updated(row, inserted)
            }
        });
    }
    t.commit().await.map_err(Batch::Commit)?;
    Ok((answers, statements))
}

/// Deletes the notes of published writes: all that are waiting, in one
/// statement, while more gather for the next. Stops when the store is
/// dropped.
async fn forget_published(
    pool: deadpool_postgres::Pool,
    sql: Arc<Sql>,
    mut notes: mpsc::UnboundedReceiver<(uuid::Uuid, i64)>,
) {
    let mut batch = Vec::new();
    while notes.recv_many(&mut batch, 10_000).await > 0 {
        let (ids, versions): (Vec<uuid::Uuid>, Vec<i64>) = batch.drain(..).unzip();
        let deleted = match pool.get().await {
            Ok(client) => match client.prepare_cached(&sql.published).await {
                Ok(statement) => client
                    .execute(&statement, &[&ids, &versions])
                    .await
                    .map_err(|e| describe(&e)),
                Err(e) => Err(describe(&e)),
            },
            Err(e) => Err(describe_pool(&e)),
        };
        if let Err(e) = deleted {
            tracing::debug!(error = %e, writes = ids.len(), "forgetting published writes failed; the recovery sweep will publish them again");
        }
    }
}

/// Announces finished workflows: whatever is queued goes out in one
/// `NOTIFY` (or a few, if long), after the writes committed.
async fn announce(inner: std::sync::Weak<Inner>, mut rx: mpsc::UnboundedReceiver<TransactionId>) {
    let mut batch: Vec<TransactionId> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while let Ok(tx) = rx.try_recv() {
            batch.push(tx);
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let payloads = super::conn::notify_payloads("", batch.drain(..).map(|tx| tx.to_string()));
        match inner.pool.get().await {
            Ok(client) => {
                for p in &payloads {
                    if let Err(e) = client
                        .execute(inner.sql.notify.as_str(), &[&inner.sql.channel, p])
                        .await
                    {
                        tracing::debug!(error = %describe(&e), "announcing finished workflows failed; waiters re-read by themselves");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %describe_pool(&e), "announcing finished workflows failed; waiters re-read by themselves");
            }
        }
    }
}

/// Follows the finish announcements, reconnecting when the connection is
/// lost; stops when the store is dropped.
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
        "store",
        || inner.upgrade().map(|i| i.waiters.wake_all()).is_some(),
        |payload| {
            let Some(strong) = on_payload.upgrade() else {
                return false;
            };
            for id in payload.split(',') {
                if let Ok(tx) = id.parse::<TransactionId>() {
                    strong.waiters.wake(tx);
                }
            }
            true
        },
    )
    .await
}

fn status_of(text: &str) -> Option<WorkflowStatus> {
    text.parse().ok()
}

#[async_trait]
impl WorkflowStates for PostgresStateStore {
    async fn create(&self, state: Arc<WorkflowState>) -> Result<Version, StoreError> {
        self.write(None, None, state, None, &[])
            .await
            .map(|(v, _)| v)
    }

    async fn get(&self, transaction_id: TransactionId) -> Result<Option<Versioned>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.inner.sql.get)
            .await
            .map_err(|e| self.pg(e))?;
        // One statement: the state as of one write.
        let rows = client
            .query(&statement, &[&transaction_id.0])
            .await
            .map_err(|e| self.pg(e))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let version = first.get::<_, i64>(0) as u64;
        let history_len = first.get::<_, i64>(1) as usize;
        let mut fields = HashMap::with_capacity(rows.len());
        for row in &rows {
            let (Some(field), Some(value)) = (
                row.get::<_, Option<String>>(2),
                row.get::<_, Option<Vec<u8>>>(3),
            ) else {
                continue;
            };
            let value = String::from_utf8(value).map_err(|_| {
                self.corrupt(format!("workflow {transaction_id}: `{field}` is not UTF-8"))
            })?;
            fields.insert(field, value);
        }
        let state = assemble(transaction_id, &fields, Some(history_len), &|m| {
            self.corrupt(m)
        })?;
        Ok(Some(Versioned {
            version,
            state: Arc::new(state),
        }))
    }

    async fn compare_and_set(
        &self,
        expected: Version,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        self.write(Some(expected), None, state, None, &[])
            .await
            .map(|(v, _)| v)
    }

    async fn compare_and_set_from(
        &self,
        expected: Version,
        before: &WorkflowState,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        self.write(Some(expected), Some(before), state, None, &[])
            .await
            .map(|(v, _)| v)
    }

    async fn step_output(
        &self,
        transaction_id: TransactionId,
        step: &str,
    ) -> Result<Option<crate::core::Payload>, StoreError> {
        let field = part_field(step);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.inner.sql.part)
            .await
            .map_err(|e| self.pg(e))?;
        let read = |row: Option<tokio_postgres::Row>, field: &str| {
            row.map(|r| {
                String::from_utf8(r.get::<_, Vec<u8>>(0)).map_err(|_| {
                    self.corrupt(format!("workflow {transaction_id}: `{field}` is not UTF-8"))
                })
            })
            .transpose()
        };
        let row = client
            .query_opt(&statement, &[&transaction_id.0, &field])
            .await
            .map_err(|e| self.pg(e))?;
        let Some(text) = read(row, &field)? else {
            return Ok(None);
        };
        let (output, digest) = part_output(&text)
            .map_err(|e| self.corrupt(format!("workflow {transaction_id}: {field}: {e}")))?;
        let Some(digest) = digest else {
            return Ok(output);
        };
        // Kept apart: one more read.
        let at = format!("p:{digest}");
        let row = client
            .query_opt(&statement, &[&transaction_id.0, &at])
            .await
            .map_err(|e| self.pg(e))?;
        let lost = |why: String| {
            self.corrupt(format!(
                "workflow {transaction_id}: {field} names a payload {at} that {why}"
            ))
        };
        let text = read(row, &at)?.ok_or_else(|| lost("is not stored".into()))?;
        crate::core::Payload::from_json_str(text)
            .map(Some)
            .map_err(|e| lost(format!("is not JSON: {e}")))
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError> {
        let s = &self.inner.sql.schema;
        let mut sql = format!(
            "SELECT tx, workflow, def_version, status, started_at, updated_at FROM {s}.workflows WHERE true"
        );
        let status = query.status.map(|st| st.as_str());
        let workflow = query.workflow.as_ref().map(|w| w.as_str());
        let updated_before = query.updated_before.map(millis);
        let updated_after = query.updated_after.map(millis);
        let correlation = query.correlation_id.map(|c| c.0);
        let started_after = query.started_after.map(millis);
        let started_before = query.started_before.map(millis);
        let after = query.after.map(|(t, tx)| (millis(t), tx.0));
        let limit = (query.limit > 0).then_some(query.limit as i64);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        fn and<'a>(
            (sql, params): (&mut String, &mut Vec<&'a (dyn ToSql + Sync)>),
            clause: &str,
            p: &'a (dyn ToSql + Sync),
        ) {
            params.push(p);
            sql.push_str(&clause.replace('?', &format!("${}", params.len())));
        }
        if let Some(v) = &status {
            and((&mut sql, &mut params), " AND status = ?", v);
        }
        if let Some(v) = &workflow {
            and((&mut sql, &mut params), " AND workflow = ?", v);
        }
        if let Some(v) = &updated_before {
            and((&mut sql, &mut params), " AND updated_at <= ?", v);
        }
        if let Some(v) = &updated_after {
            and((&mut sql, &mut params), " AND updated_at >= ?", v);
        }
        if let Some(v) = &correlation {
            and((&mut sql, &mut params), " AND correlation_id = ?", v);
        }
        if let Some(v) = &started_after {
            and((&mut sql, &mut params), " AND started_at >= ?", v);
        }
        if let Some(v) = &started_before {
            and((&mut sql, &mut params), " AND started_at < ?", v);
        }
        if let Some((t, tx)) = &after {
            and((&mut sql, &mut params), " AND (started_at, tx) < (?", t);
            and((&mut sql, &mut params), ", ?)", tx);
        }
        sql.push_str(" ORDER BY started_at DESC, tx DESC");
        if let Some(v) = &limit {
            and((&mut sql, &mut params), " LIMIT ?", v);
        }
        let client = self.client().await?;
        let rows = client.query(&sql, &params).await.map_err(|e| self.pg(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row.get(3);
            let Some(status) = status_of(&text) else {
                return Err(self.corrupt(format!("a workflow in status `{text}`")));
            };
            out.push(WorkflowSummary {
                transaction_id: TransactionId(row.get(0)),
                workflow: WorkflowName::from(row.get::<_, String>(1)),
                version: row.get::<_, i32>(2) as u32,
                status,
                started_at: Timestamp(row.get::<_, i64>(4) as u64),
                updated_at: Timestamp(row.get::<_, i64>(5) as u64),
            });
        }
        Ok(out)
    }

    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.inner.sql.expire)
            .await
            .map_err(|e| self.pg(e))?;
        let mut removed = 0;
        // A batch at a time: no statement holds many rows locked for long.
        loop {
            let row = client
                .query_one(&statement, &[&millis(finished_before), &EXPIRE_BATCH])
                .await
                .map_err(|e| self.pg(e))?;
            let n: i64 = row.get(0);
            removed += n as usize;
            if n < EXPIRE_BATCH {
                return Ok(removed);
            }
        }
    }

    async fn published(&self, writes: &[(TransactionId, Version)]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        // Forgotten in the background, many at once: a note left behind
        // (the process died first) costs only a publication again by the
        // recovery sweep, which waits far longer than this takes.
        for (tx, v) in writes {
            let _ = self.inner.published.send((tx.0, *v as i64));
        }
        Ok(())
    }

    async fn unpublished(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(TransactionId, Version)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.inner.sql.unpublished)
            .await
            .map_err(|e| self.pg(e))?;
        let rows = client
            .query(
                &statement,
                &[
                    &millis(written_before),
                    &millis(lease_until),
                    &(limit.max(1) as i64),
                ],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(rows
            .iter()
            .map(|r| (TransactionId(r.get(0)), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn tracks_unpublished(&self) -> bool {
        true
    }

    fn bytes_written(&self) -> Option<u64> {
        Some(
            self.inner
                .written
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn carries_events(&self) -> bool {
        self.inner.carrier.get().is_some()
    }

    async fn create_carrying(
        &self,
        state: Arc<WorkflowState>,
        events: &[(String, crate::core::Event)],
    ) -> Result<Option<Version>, StoreError> {
        let Some(carrier) = self.inner.carrier.get() else {
            return Ok(None);
        };
        let Some(encoded) = carrier.encode(events) else {
            return Ok(None);
        };
        let (version, inserted) = self.write(None, None, state, Some(&encoded), &[]).await?;
        carrier.settle(events, &inserted);
        Ok(Some(version))
    }

    async fn compare_and_set_carrying(
        &self,
        expected: Version,
        before: &WorkflowState,
        state: Arc<WorkflowState>,
        events: &[(String, crate::core::Event)],
        consumed: &[crate::bus::DeliveryId],
    ) -> Result<Option<Version>, StoreError> {
        let Some(carrier) = self.inner.carrier.get() else {
            return Ok(None);
        };
        let Some(encoded) = carrier.encode(events) else {
            return Ok(None);
        };
        let consumed = super::bus::row_ids(consumed);
        let (version, inserted) = self
            .write(
                Some(expected),
                Some(before),
                state,
                Some(&encoded),
                &consumed,
            )
            .await?;
        carrier.settle(events, &inserted);
        Ok(Some(version))
    }

    fn is_remote(&self) -> bool {
        true
    }

    async fn wait_terminal(
        &self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Result<Option<Versioned>, StoreError> {
        self.ensure_listener();
        // Re-read every second in case an announcement was missed (nothing
        // is kept while the listener reconnects).
        self.inner
            .waiters
            .wait(
                transaction_id,
                timeout,
                Duration::from_secs(1),
                move || async move {
                    // The status column (one small read).
                    let client = self.client().await?;
                    let statement = client
                        .prepare_cached(&self.inner.sql.status)
                        .await
                        .map_err(|e| self.pg(e))?;
                    let status: Option<String> = client
                        .query_opt(&statement, &[&transaction_id.0])
                        .await
                        .map_err(|e| self.pg(e))?
                        .map(|r| r.get(0));
                    Ok(status.is_none_or(|s| status_of(&s).is_none_or(|s| s.is_terminal())))
                },
                move || self.get(transaction_id),
            )
            .await
    }
}

#[async_trait]
impl TimerIndex for PostgresStateStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError> {
        let lease = millis(now.plus(self.inner.config.timer_lease));
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.inner.sql.due)
            .await
            .map_err(|e| self.pg(e))?;
        let rows = client
            .query(&statement, &[&millis(now), &lease, &(limit.max(1) as i64)])
            .await
            .map_err(|e| self.pg(e))?;
        let ids: Vec<TransactionId> = rows.iter().map(|r| TransactionId(r.get(0))).collect();
        if let Ok(mut leases) = self.inner.leases.lock() {
            for id in &ids {
                leases.insert(*id, lease);
            }
        }
        Ok(ids)
    }

    async fn timer_handled(&self, transaction_id: TransactionId) -> Result<(), StoreError> {
        let Some(lease) = self
            .inner
            .leases
            .lock()
            .ok()
            .and_then(|mut l| l.remove(&transaction_id))
        else {
            return Ok(());
        };
        // Writes only ever bring a timer forward (most transitions move the
        // next deadline later, and skipping those writes is what keeps the
        // timer's row and index quiet): the timer is set back to the
        // workflow's real next wakeup here, as of the version read. A write
        // between the read and the re-arm (its wakeup not written, the row's
        // being in the past) makes the re-arm read again.
        let sql = &self.inner.sql;
        for _ in 0..3 {
            let Some(read) = self.get(transaction_id).await? else {
                break;
            };
            // No wakeup: never due, until a write brings it forward.
            let next = read.state.next_wakeup().map_or(i64::MAX, millis);
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&sql.rearm)
                .await
                .map_err(|e| self.pg(e))?;
            let rearmed = client
                .execute(
                    &statement,
                    &[&transaction_id.0, &lease, &next, &(read.version as i64)],
                )
                .await
                .map_err(|e| self.pg(e))?;
            if rearmed == 1 {
                return Ok(());
            }
        }
        // Written over and over meanwhile, or gone: the lease is given back
        // and the timer, still in the past, is looked at again at once.
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&sql.give_back)
            .await
            .map_err(|e| self.pg(e))?;
        client
            .execute(&statement, &[&transaction_id.0, &lease])
            .await
            .map(|_| ())
            .map_err(|e| self.pg(e))
    }
}

#[async_trait]
impl Definitions for PostgresStateStore {
    async fn put_definition(&self, definition: &WorkflowDefinition) -> Result<(), StoreError> {
        let json = serde_json::to_string(definition).map_err(|e| self.corrupt(e))?;
        let client = self.client().await?;
        let added = client
            .execute(
                self.inner.sql.put_definition.as_str(),
                &[
                    &definition.name().as_str(),
                    &(definition.version() as i32),
                    &json,
                ],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if added == 1 {
            return Ok(());
        }
        match self
            .get_definition(definition.name().as_str(), definition.version())
            .await?
        {
            Some(stored) => same_definition(&stored, definition),
            None => Ok(()),
        }
    }

    async fn get_definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                self.inner.sql.get_definition.as_str(),
                &[&name, &(version as i32)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        row.map(|r| {
            WorkflowDefinition::from_json(&r.get::<_, String>(0)).map_err(|e| self.corrupt(e))
        })
        .transpose()
    }

    async fn latest_definition(
        &self,
        name: &str,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(self.inner.sql.latest_definition.as_str(), &[&name])
            .await
            .map_err(|e| self.pg(e))?;
        row.map(|r| {
            WorkflowDefinition::from_json(&r.get::<_, String>(0)).map_err(|e| self.corrupt(e))
        })
        .transpose()
    }

    async fn definition_versions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(self.inner.sql.definition_versions.as_str(), &[])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1) as u32))
            .collect())
    }
}

#[async_trait]
impl HealthRecords for PostgresStateStore {
    async fn record_worker_health(
        &self,
        beats: &[crate::core::health::WorkerHealth],
    ) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        // One row per (worker, instance): the last beat of each in this batch.
        let mut latest: HashMap<String, &crate::core::health::WorkerHealth> = HashMap::new();
        for b in beats {
            latest.insert(format!("{}@{}", b.worker, b.instance), b);
        }
        let mut keys = Vec::with_capacity(latest.len());
        let mut ats = Vec::with_capacity(latest.len());
        let mut bodies = Vec::with_capacity(latest.len());
        for (key, b) in latest {
            keys.push(key);
            ats.push(millis(b.at));
            bodies.push(serde_json::to_string(b).map_err(|e| self.corrupt(e))?);
        }
        let client = self.client().await?;
        client
            .execute(
                self.inner.sql.record_health.as_str(),
                &[&keys, &ats, &bodies],
            )
            .await
            .map(|_| ())
            .map_err(|e| self.pg(e))
    }

    async fn worker_health(
        &self,
        max_age: Duration,
    ) -> Result<Vec<crate::core::health::WorkerHealth>, StoreError> {
        let since = millis(Timestamp(
            Timestamp::now()
                .as_millis()
                .saturating_sub(max_age.as_millis() as u64),
        ));
        let client = self.client().await?;
        let rows = client
            .query(self.inner.sql.read_health.as_str(), &[&since])
            .await
            .map_err(|e| self.pg(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Ok(b) =
                serde_json::from_str::<crate::core::health::WorkerHealth>(&r.get::<_, String>(0))
            {
                out.push(b);
            }
        }
        // Stale ones are dropped when read.
        let _ = client
            .execute(self.inner.sql.drop_health.as_str(), &[&since])
            .await;
        out.sort_by(|a, b| (&a.worker, &a.instance).cmp(&(&b.worker, &b.instance)));
        Ok(out)
    }
}

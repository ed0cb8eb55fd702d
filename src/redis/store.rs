//! The Redis state store: workflow states with compare-and-set, timers any
//! orchestrator replica can fire (exactly one does), definitions by version,
//! and finished workflows expiring after a TTL.
//!
//! Its keys are in the [module table](super).
//!
//! A write is one Lua script on the workflow's key (check the version, write,
//! set the TTL when finished, announce the finish), pipelined behind a
//! `ZADD … LT` of its next wakeup: the timer index may run early, never late.
//! `due` leases what is due to the caller (moves its score a lease ahead), so
//! a replica that dies while firing a timer only delays it by the lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::conn::{Pool, RedisConnection, follow_channel, open, query_all, redacted, run_all};
use crate::core::saga::parts::Changes;
use crate::core::{
    CorrelationId, Timestamp, TransactionId, WorkflowDefinition, WorkflowName, WorkflowState,
    WorkflowStatus,
};
use crate::store::{
    Definitions, HealthRecords, ListQuery, StoreError, TimerIndex, Version, Versioned,
    WorkflowStates, WorkflowSummary, newest_first, same_definition,
};

/// Settings of a [`RedisStateStore`].
#[derive(Clone, Debug)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://…` for TLS.
    pub url: String,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// `rediss://` server.
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of every key.
    pub prefix: String,
    /// How long finished workflows are kept.
    pub finished_ttl: Duration,
    /// How long a due timer is leased to the replica that took it.
    pub timer_lease: Duration,
    /// Outputs and fan-out items of this many bytes or more are stored
    /// apart from their step, once, under their SHA-256 (`p:<digest>` in the
    /// workflow's hash): a step's part is then small however often it is
    /// rewritten, and identical payloads are stored once. Default
    /// [`crate::store::LARGE_PAYLOAD_BYTES`].
    pub large_payload_bytes: usize,
}

impl RedisStoreConfig {
    /// Defaults for a server at `url`: 7-day TTL, 30 s timer lease.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            prefix: "ma".into(),
            finished_ttl: Duration::from_secs(7 * 24 * 3600),
            timer_lease: Duration::from_secs(30),
            large_payload_bytes: crate::store::LARGE_PAYLOAD_BYTES,
        }
    }

    /// Sets the size from which payloads are stored apart, by digest.
    pub fn large_payload_bytes(mut self, bytes: usize) -> Self {
        self.large_payload_bytes = bytes;
        self
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

    /// Sets the TTL of finished workflows.
    pub fn finished_ttl(mut self, ttl: Duration) -> Self {
        self.finished_ttl = ttl;
        self
    }
}

/// Writes a state as parts of its hash: `h` the head, `in` the input,
/// `s:<step>` a step, `i:<step>[k]` a branch, `hn` how many history
/// entries, `h:<n>` the history entries one write added (a JSON array,
/// `n` the index of its first), and `p:<sha256>` a large payload that parts
/// name by digest (written once: HSETNX). The workflow's name (`wf`) and
/// start (`sa`) never change: only a full write sets them. A full write (a new workflow, a state not
/// made from the stored one, or one stored in the old single-field layout
/// `s`) replaces what was there.
///
/// KEYS: hash, [unpublished]. ARGV: expected ('0' = create), new version,
/// head, status, workflow, started, updated, ttl, channel, tx, now, note,
/// correlation, history_from, full, field-value pair count, the new history
/// count, then the pairs, then how many payload fields are named without
/// their value (ones this client wrote before: they must exist), those
/// names, then the payloads' pairs. Returns {1, v}; {0, found} on a version
/// conflict; {-1, 0} when missing; {-2, v} when a delta meets the old layout
/// (write it whole); {-3, count} when the stored history is not the length
/// the delta expects; {-4, 0} when a payload named without its value is not
/// there (send it).
const CAS: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'hn')
local full = ARGV[15] == '1'
if ARGV[1] == '0' then
  if cur[1] then return {0, tonumber(cur[1])} end
else
  if not cur[1] then return {-1, 0} end
  if cur[1] ~= ARGV[1] then return {0, tonumber(cur[1])} end
  if not full then
    if not cur[2] then return {-2, tonumber(cur[1])} end
    if cur[2] ~= ARGV[14] then return {-3, tonumber(cur[2])} end
  end
end
local pairs_end = 17 + 2 * tonumber(ARGV[16])
local named_end = pairs_end + 1 + tonumber(ARGV[pairs_end + 1])
for j = pairs_end + 2, named_end do
  if redis.call('HEXISTS', KEYS[1], ARGV[j]) == 0 then return {-4, 0} end
end
if full and cur[1] then
  local co = redis.call('HGET', KEYS[1], 'co')
  redis.call('DEL', KEYS[1])
  if co then redis.call('HSET', KEYS[1], 'co', co) end
end
local first_end = math.min(pairs_end, 1017)
if ARGV[1] == '0' then
  redis.call('HSET', KEYS[1], 'wf', ARGV[5], 'sa', ARGV[6], 'co', ARGV[13])
elseif full then
  redis.call('HSET', KEYS[1], 'wf', ARGV[5], 'sa', ARGV[6])
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'h', ARGV[3], 'st', ARGV[4], 'up', ARGV[7], 'hn', ARGV[17], unpack(ARGV, 18, first_end))
for j = first_end + 1, pairs_end, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, j, math.min(j + 999, pairs_end)))
end
for j = named_end + 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[j], ARGV[j + 1])
end
if KEYS[2] then redis.call('ZADD', KEYS[2], ARGV[11], ARGV[12]) end
if ARGV[8] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PUBLISH', ARGV[9], ARGV[10])
end
return {1, tonumber(ARGV[2])}
";

const LEASE_DUE: &str = r"
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(items) do redis.call('ZADD', KEYS[1], ARGV[3], m) end
return items
";

const REARM: &str = r"
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
if cur and tonumber(cur) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
  return 1
end
return 0
";

/// Workflows read per round trip when listing.
const LIST_PAGE: usize = 500;

/// A store on Redis: states, timers, definitions and worker health.
#[derive(Clone)]
pub struct RedisStateStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisStoreConfig,
    address: String,
    client: redis::Client,
    conn: Pool,
    cas: Script,
    lease_due: Script,
    rearm: Script,
    /// Lease scores of the timers this instance took, by transaction.
    leases: Mutex<crate::core::hash::IdMap<TransactionId, u64>>,
    /// Waiters of this process, by workflow: woken with the state when this
    /// process wrote it finished, or with nothing (read it) when another
    /// process announced it.
    waiters: crate::store::waiters::Waiters,
    listener: std::sync::Once,
    /// Bytes of state records sent (the state and the script's other
    /// arguments; not the index updates beside it).
    written: std::sync::atomic::AtomicU64,
    /// Payloads this instance stored, by workflow and digest: a later write
    /// names them without sending them again (the script checks that they
    /// are still there). Bounded: forgotten all at once when full.
    stored: Mutex<std::collections::HashSet<(TransactionId, String)>>,
}

/// How many (workflow, payload) pairs a store remembers having written.
const REMEMBERED_PAYLOADS: usize = 16 * 1024;

impl RedisStateStore {
    /// Connects; fails with the server's address if it cannot be reached.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self, StoreError> {
        let address = redacted(&config.url);
        let (client, conn) =
            open(&config.url, config.ca_file.as_deref())
                .await
                .map_err(|message| StoreError::Io {
                    location: address.clone(),
                    message,
                })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                address,
                client,
                conn,
                cas: Script::new(CAS),
                lease_due: Script::new(LEASE_DUE),
                rearm: Script::new(REARM),
                leases: Mutex::default(),
                waiters: Default::default(),
                listener: std::sync::Once::new(),
                written: std::sync::atomic::AtomicU64::new(0),
                stored: Mutex::default(),
            }),
        })
    }

    fn key(&self, tx: TransactionId) -> String {
        format!("{{{}:wf:{tx}}}", self.inner.config.prefix)
    }

    fn timers_key(&self) -> String {
        format!("{{{}:timers}}", self.inner.config.prefix)
    }

    fn workers_key(&self) -> String {
        format!("{{{}:workers}}", self.inner.config.prefix)
    }

    fn index_key(&self) -> String {
        format!("{{{}:index}}", self.inner.config.prefix)
    }

    /// Writes whose actions are not published yet: `tx:version` → when.
    fn unpublished_key(&self) -> String {
        format!("{{{}:unpublished}}", self.inner.config.prefix)
    }

    fn defs_key(&self) -> String {
        format!("{{{}:defs}}", self.inner.config.prefix)
    }

    fn finished_channel(&self) -> String {
        format!("{}:finished", self.inner.config.prefix)
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            location: self.inner.address.clone(),
            message: e.to_string(),
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            location: self.inner.address.clone(),
            message: e.to_string(),
        }
    }

    /// A state from its stored parts.
    fn assemble(
        &self,
        tx: TransactionId,
        fields: &HashMap<String, String>,
    ) -> Result<WorkflowState, StoreError> {
        let written = fields.get("hn").and_then(|n| n.parse::<usize>().ok());
        crate::store::fields::assemble(tx, fields, written, &|e| self.corrupt(e))
    }

    async fn write(
        &self,
        expected: Option<Version>,
        before: Option<&WorkflowState>,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        let apart = self.inner.config.large_payload_bytes;
        let delta = match before {
            Some(b) => Changes::between(b, &state),
            None => Changes::full(&state),
        }
        .keep_apart(apart);
        if !state.is_terminal() {
            return self.write_with(expected, &delta, &state).await;
        }
        // The script announces it; the announcement can come back before
        // the reply. This process's waiters get the state itself, as
        // committed, without reading it back.
        let writing = self.inner.waiters.writing(state.transaction_id);
        let written = self.write_with(expected, &delta, &state).await;
        if let Ok(version) = &written {
            writing.hand_over(*version, &state);
        }
        written
    }

    async fn write_with(
        &self,
        expected: Option<Version>,
        delta: &Changes<'_>,
        state: &Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        let apart = self.inner.config.large_payload_bytes;
        let written = match self.write_parts(expected, delta, state, true).await {
            // A payload named was gone (the hash rewritten meanwhile): send all.
            Err(Refused::Named) => self.write_parts(expected, delta, state, false).await,
            other => other,
        };
        match written {
            // Stored in the old layout, or not as the caller read it: whole.
            Err(r @ (Refused::Layout | Refused::History(_))) if !delta.full => {
                if let Refused::History(len) = r {
                    tracing::debug!(transaction_id = %state.transaction_id, stored = len, expected = delta.history_from, "the stored history is not the one read: writing the state whole");
                }
                let whole = Changes::full(state).keep_apart(apart);
                match self.write_parts(expected, &whole, state, false).await {
                    Ok(v) => Ok(v),
                    Err(r) => Err(self.refused(r, state.transaction_id, expected)),
                }
            }
            Ok(v) => Ok(v),
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
            Refused::Layout | Refused::History(_) | Refused::Named => self.corrupt(format!(
                "workflow {tx} could not be written whole over its stored parts"
            )),
        }
    }

    /// One write of `delta`; with `name_stored`, the payloads this store
    /// wrote before are named, not sent (never for a full write, which
    /// deletes what was there first).
    async fn write_parts(
        &self,
        expected: Option<Version>,
        delta: &Changes<'_>,
        state: &WorkflowState,
        name_stored: bool,
    ) -> Result<Version, Refused> {
        let tx = state.transaction_id;
        let (json, fields) = crate::store::fields::write_fields(delta, state)
            .map_err(|e| Refused::Store(self.corrupt(e)))?;
        let expected_arg = expected.unwrap_or(0);
        let ttl = if state.is_terminal() {
            self.inner.config.finished_ttl.as_millis().max(1) as u64
        } else {
            0
        };
        let mut pipe = redis::pipe();
        if expected.is_none() {
            pipe.cmd("ZADD")
                .arg(self.index_key())
                .arg(state.started_at.as_millis())
                .arg(tx.to_string())
                .ignore();
        }
        if let Some(w) = state.next_wakeup() {
            // First, so the index is never later than the state.
            pipe.cmd("ZADD")
                .arg(self.timers_key())
                .arg("LT")
                .arg(w.as_millis())
                .arg(tx.to_string())
                .ignore();
        }
        // Unpublished until the engine says otherwise (after publishing).
        // On one server the script notes it with the write; on a cluster
        // the note lives in another slot and goes first, so that a crash
        // after the write still leaves it.
        // A finished top-level workflow has nothing left that must arrive
        // (only status broadcasts): no note.
        let note = format!("{tx}:{}", expected_arg + 1);
        let noted = !(state.is_terminal() && state.parent.is_none());
        let now = Timestamp::now().as_millis();
        let cluster = matches!(self.inner.conn.get(), RedisConnection::Cluster(_));
        if cluster && noted {
            pipe.cmd("ZADD")
                .arg(self.unpublished_key())
                .arg(now)
                .arg(&note)
                .ignore();
        }
        let correlation = if expected.is_none() {
            state.correlation_id.to_string()
        } else {
            String::new()
        };
        let channel = self.finished_channel();
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
        let sent = json.len()
            + fields.iter().map(|(f, v)| f.len() + v.len()).sum::<usize>()
            + payloads
                .iter()
                .map(|(f, v)| f.len() + v.len())
                .sum::<usize>()
            + named.iter().map(String::len).sum::<usize>()
            + state.status.as_str().len()
            + state.workflow.as_str().len()
            + channel.len()
            + note.len()
            + correlation.len()
            + 36
            + 6 * 13;
        self.inner
            .written
            .fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
        let mut invocation = self.inner.cas.key(self.key(tx));
        if !cluster && noted {
            invocation.key(self.unpublished_key());
        }
        invocation
            .arg(expected_arg)
            .arg(expected_arg + 1)
            .arg(json)
            .arg(state.status.as_str())
            .arg(state.workflow.as_str())
            .arg(state.started_at.as_millis())
            .arg(state.updated_at.as_millis())
            .arg(ttl)
            .arg(channel)
            .arg(tx.to_string())
            .arg(now)
            .arg(&note)
            .arg(correlation)
            .arg(delta.history_from)
            .arg(if delta.full { "1" } else { "0" })
            .arg(fields.len())
            .arg(delta.history_from + delta.history_added());
        for (f, v) in &fields {
            invocation.arg(f).arg(v);
        }
        invocation.arg(named.len());
        for f in &named {
            invocation.arg(f);
        }
        for (f, v) in &payloads {
            invocation.arg(f).arg(v);
        }
        // Scripts are sent by hash; load once so a pipeline can use EVALSHA.
        let mut conn = self.inner.conn.get();
        if matches!(conn, RedisConnection::Cluster(_)) {
            // The indexes live in other slots: update them first, then write.
            run_all(&mut conn, &pipe)
                .await
                .map_err(|e| Refused::Store(self.io(e)))?;
            pipe = redis::pipe();
        }
        let reply: (i64, u64) = {
            pipe.invoke_script(&invocation);
            match pipe.query_async::<((i64, u64),)>(&mut conn).await {
                Ok((r,)) => r,
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    invocation
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| Refused::Store(self.io(e)))?
                }
                Err(e) => return Err(Refused::Store(self.io(e))),
            }
        };
        if reply.0 == 1 && !delta.apart.is_empty() {
            let mut stored = self.inner.stored.lock().unwrap_or_else(|e| e.into_inner());
            if stored.len() + delta.apart.payloads().count() > REMEMBERED_PAYLOADS {
                stored.clear();
            }
            for (d, _) in delta.apart.payloads() {
                stored.insert((tx, d.to_string()));
            }
        }
        match reply {
            (1, v) => Ok(v),
            (0, _) if expected.is_none() => Err(Refused::Exists),
            (0, found) => Err(Refused::Conflict(found)),
            (-2, _) => Err(Refused::Layout),
            (-3, len) => Err(Refused::History(len)),
            (-4, _) => Err(Refused::Named),
            _ => Err(Refused::Missing),
        }
    }

    /// Starts the listener that wakes local waiters when workflows finish.
    fn ensure_listener(&self) {
        let store = self.clone();
        self.inner.listener.call_once(|| {
            tokio::spawn(async move { store.listen_finished().await });
        });
    }

    async fn listen_finished(&self) {
        let inner = &self.inner;
        let channel = self.finished_channel();
        follow_channel(
            &inner.client,
            &channel,
            &inner.address,
            |_| {},
            |payload| {
                let Some(tx) = std::str::from_utf8(payload)
                    .ok()
                    .and_then(|t| t.parse::<TransactionId>().ok())
                else {
                    return;
                };
                inner.waiters.wake(tx);
            },
        )
        .await
    }
}

/// Why a write of parts did not happen.
enum Refused {
    Store(StoreError),
    Exists,
    Conflict(Version),
    Missing,
    /// The state is stored in the old single-field layout.
    Layout,
    /// The stored history has this many entries, not what the delta expects.
    History(u64),
    /// A payload named without its value is not stored.
    Named,
}

fn status_of(text: &str) -> Option<WorkflowStatus> {
    text.parse().ok()
}

#[async_trait]
impl WorkflowStates for RedisStateStore {
    async fn create(&self, state: Arc<WorkflowState>) -> Result<Version, StoreError> {
        self.write(None, None, state).await
    }

    async fn get(&self, transaction_id: TransactionId) -> Result<Option<Versioned>, StoreError> {
        let mut conn = self.inner.conn.get();
        // One command: the state as of one write.
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key(transaction_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        let Some(version) = fields.get("v").and_then(|v| v.parse::<u64>().ok()) else {
            return Ok(None);
        };
        let state = match (fields.get("h"), fields.get("s")) {
            (Some(_), _) => self.assemble(transaction_id, &fields)?,
            // Written before states were kept as parts: one JSON document.
            (None, Some(json)) => serde_json::from_str(json).map_err(|e| self.corrupt(e))?,
            (None, None) => return Ok(None),
        };
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
        self.write(Some(expected), None, state).await
    }

    async fn compare_and_set_from(
        &self,
        expected: Version,
        before: &WorkflowState,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        self.write(Some(expected), Some(before), state).await
    }

    async fn step_output(
        &self,
        transaction_id: TransactionId,
        step: &str,
    ) -> Result<Option<crate::core::Payload>, StoreError> {
        let field = crate::store::fields::part_field(step);
        let mut conn = self.inner.conn.get();
        let (part, head): (Option<String>, bool) = redis::pipe()
            .cmd("HGET")
            .arg(self.key(transaction_id))
            .arg(&field)
            .cmd("HEXISTS")
            .arg(self.key(transaction_id))
            .arg("h")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        match (part, head) {
            (Some(text), _) => {
                let (output, apart) = crate::store::fields::part_output(&text).map_err(|e| {
                    self.corrupt(format!("workflow {transaction_id}: {field}: {e}"))
                })?;
                let Some(digest) = apart else {
                    return Ok(output);
                };
                // Kept apart: one more read.
                let text: Option<String> = redis::cmd("HGET")
                    .arg(self.key(transaction_id))
                    .arg(format!("p:{digest}"))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.io(e))?;
                let lost = |why: String| {
                    self.corrupt(format!(
                        "workflow {transaction_id}: {field} names a payload p:{digest} that {why}"
                    ))
                };
                let text = text.ok_or_else(|| lost("is not stored".into()))?;
                crate::core::Payload::from_json_str(text)
                    .map(Some)
                    .map_err(|e| lost(format!("is not JSON: {e}")))
            }
            (None, true) => Ok(None),
            // The layout before parts: read the whole state.
            (None, false) => Ok(self
                .get(transaction_id)
                .await?
                .and_then(|v| v.state.output(step).cloned())),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError> {
        let mut conn = self.inner.conn.get();
        let mut out = Vec::new();
        // Newest first from the index (scored by start), within the start
        // range and from the cursor on, a page at a time, until the limit.
        // The highest start score wanted: the cursor's (inclusive: ties
        // are told apart by id) or `started_before` (exclusive), the lower.
        let max = match (query.started_before, query.after) {
            (Some(b), Some((c, _))) if c < b => c.as_millis().to_string(),
            (Some(b), _) => format!("({}", b.as_millis()),
            (None, Some((c, _))) => c.as_millis().to_string(),
            (None, None) => "+inf".to_string(),
        };
        let min = query
            .started_after
            .map_or_else(|| "-inf".to_string(), |t| t.as_millis().to_string());
        let mut start = 0usize;
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(self.index_key())
                .arg(&max)
                .arg(&min)
                .arg("LIMIT")
                .arg(start)
                .arg(LIST_PAGE)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.io(e))?;
            start += LIST_PAGE;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(format!("{{{}:wf:{id}}}", self.inner.config.prefix))
                    .arg("st")
                    .arg("wf")
                    .arg("sa")
                    .arg("up")
                    .arg("co");
            }
            type Row = (
                Option<String>,
                Option<String>,
                Option<u64>,
                Option<u64>,
                Option<String>,
            );
            let rows: Vec<Row> = query_all(&mut conn, &pipe).await.map_err(|e| self.io(e))?;
            for (id, (st, wf, sa, up, co)) in ids.iter().zip(rows) {
                // Expired (or never written): the index is pruned by `expire`.
                let (
                    Some(status),
                    Some(workflow),
                    Some(started),
                    Some(updated),
                    Ok(transaction_id),
                ) = (
                    st.as_deref().and_then(status_of),
                    wf,
                    sa,
                    up,
                    id.parse::<TransactionId>(),
                )
                else {
                    continue;
                };
                let summary = WorkflowSummary {
                    transaction_id,
                    workflow: WorkflowName::from(workflow),
                    version: 0,
                    status,
                    started_at: Timestamp(started),
                    updated_at: Timestamp(updated),
                };
                if !query.summary_matches(&summary) {
                    continue;
                }
                if let Some(wanted) = query.correlation_id {
                    let found = match co.and_then(|c| c.parse().ok()) {
                        Some(c) => Some(CorrelationId(c)),
                        // Written before the field was: read the state.
                        None => self
                            .get(transaction_id)
                            .await?
                            .map(|v| v.state.correlation_id),
                    };
                    if found != Some(wanted) {
                        continue;
                    }
                }
                out.push(summary);
            }
            if query.limit > 0 && out.len() >= query.limit {
                break;
            }
        }
        newest_first(&mut out, query.limit);
        Ok(out)
    }

    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError> {
        // Finished workflows carry a TTL: Redis deletes them itself. What is
        // left is to drop them from the index: of the workflows started
        // before the cut-off, those whose hash is gone.
        let mut conn = self.inner.conn.get();
        let mut removed = 0;
        let mut start = 0usize;
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.index_key())
                .arg("-inf")
                .arg(finished_before.as_millis())
                .arg("LIMIT")
                .arg(start)
                .arg(LIST_PAGE)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.io(e))?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("EXISTS")
                    .arg(format!("{{{}:wf:{id}}}", self.inner.config.prefix));
            }
            let exists: Vec<bool> = query_all(&mut conn, &pipe).await.map_err(|e| self.io(e))?;
            let gone: Vec<&String> = ids
                .iter()
                .zip(&exists)
                .filter(|(_, e)| !**e)
                .map(|(id, _)| id)
                .collect();
            start += ids.len() - gone.len();
            if !gone.is_empty() {
                let n: usize = redis::cmd("ZREM")
                    .arg(self.index_key())
                    .arg(&gone)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.io(e))?;
                removed += n;
            }
        }
        Ok(removed)
    }

    async fn published(&self, writes: &[(TransactionId, Version)]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let members: Vec<String> = writes.iter().map(|(tx, v)| format!("{tx}:{v}")).collect();
        let mut conn = self.inner.conn.get();
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.unpublished_key()).arg(&members);
        cmd.query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.io(e))
    }

    async fn unpublished(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(TransactionId, Version)>, StoreError> {
        let mut conn = self.inner.conn.get();
        let members: Vec<String> = self
            .inner
            .lease_due
            .key(self.unpublished_key())
            .arg(written_before.as_millis())
            .arg(limit.max(1))
            .arg(lease_until.as_millis())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        Ok(members
            .iter()
            .filter_map(|m| {
                let (tx, v) = m.rsplit_once(':')?;
                Some((tx.parse().ok()?, v.parse().ok()?))
            })
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

    fn is_remote(&self) -> bool {
        true
    }

    async fn wait_terminal(
        &self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Result<Option<Versioned>, StoreError> {
        self.ensure_listener();
        // Re-read every 250 ms in case an announcement was missed (Pub/Sub
        // keeps nothing while reconnecting).
        self.inner
            .waiters
            .wait(
                transaction_id,
                timeout,
                Duration::from_millis(250),
                move || async move {
                    // The status field (one small read).
                    let mut conn = self.inner.conn.get();
                    let status: Option<String> = redis::cmd("HGET")
                        .arg(self.key(transaction_id))
                        .arg("st")
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.io(e))?;
                    Ok(status.is_none_or(|s| status_of(&s).is_none_or(|s| s.is_terminal())))
                },
                move || self.get(transaction_id),
            )
            .await
    }
}

#[async_trait]
impl TimerIndex for RedisStateStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError> {
        let lease = now.plus(self.inner.config.timer_lease).as_millis();
        let mut conn = self.inner.conn.get();
        let ids: Vec<String> = self
            .inner
            .lease_due
            .key(self.timers_key())
            .arg(now.as_millis())
            .arg(limit)
            .arg(lease)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        let ids: Vec<TransactionId> = ids.iter().filter_map(|s| s.parse().ok()).collect();
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
        let read = self.get(transaction_id).await?;
        let next = read.as_ref().and_then(|v| v.state.next_wakeup());
        let mut conn = self.inner.conn.get();
        let rearmed: i64 = self
            .inner
            .rearm
            .key(self.timers_key())
            .arg(transaction_id.to_string())
            .arg(lease)
            .arg(next.map(|t| t.as_millis().to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        if rearmed == 1 {
            // A write between the read and the re-arm found the lease in the
            // index and may not have lowered it: index that write's wakeup.
            let now = self.get(transaction_id).await?;
            if now.as_ref().map(|v| v.version) != read.as_ref().map(|v| v.version)
                && let Some(w) = now.and_then(|v| v.state.next_wakeup())
            {
                let _: () = redis::cmd("ZADD")
                    .arg(self.timers_key())
                    .arg("LT")
                    .arg(w.as_millis())
                    .arg(transaction_id.to_string())
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.io(e))?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Definitions for RedisStateStore {
    async fn put_definition(&self, definition: &WorkflowDefinition) -> Result<(), StoreError> {
        let field = format!("{}@{}", definition.name(), definition.version());
        let json = serde_json::to_string(definition).map_err(|e| self.corrupt(e))?;
        let mut conn = self.inner.conn.get();
        let added: bool = redis::cmd("HSETNX")
            .arg(self.defs_key())
            .arg(&field)
            .arg(&json)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        if added {
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
        let mut conn = self.inner.conn.get();
        let json: Option<String> = redis::cmd("HGET")
            .arg(self.defs_key())
            .arg(format!("{name}@{version}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        json.map(|j| WorkflowDefinition::from_json(&j).map_err(|e| self.corrupt(e)))
            .transpose()
    }

    async fn latest_definition(
        &self,
        name: &str,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        let mut conn = self.inner.conn.get();
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(self.defs_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        let latest = fields
            .iter()
            .filter_map(|f| f.rsplit_once('@'))
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.parse::<u32>().ok())
            .max();
        match latest {
            Some(v) => self.get_definition(name, v).await,
            None => Ok(None),
        }
    }

    async fn definition_versions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let mut conn = self.inner.conn.get();
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(self.defs_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        let mut out: Vec<(String, u32)> = fields
            .iter()
            .filter_map(|f| f.rsplit_once('@'))
            .filter_map(|(n, v)| Some((n.to_string(), v.parse::<u32>().ok()?)))
            .collect();
        out.sort();
        Ok(out)
    }
}

#[async_trait]
impl HealthRecords for RedisStateStore {
    async fn record_worker_health(
        &self,
        beats: &[crate::core::health::WorkerHealth],
    ) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.workers_key());
        for b in beats {
            let json = serde_json::to_string(b).map_err(|e| self.corrupt(e))?;
            cmd.arg(format!("{}@{}", b.worker, b.instance)).arg(json);
        }
        let mut conn = self.inner.conn.get();
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.io(e))
    }

    async fn worker_health(
        &self,
        max_age: Duration,
    ) -> Result<Vec<crate::core::health::WorkerHealth>, StoreError> {
        let mut conn = self.inner.conn.get();
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.workers_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.io(e))?;
        let now = Timestamp::now();
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for (field, json) in all {
            match serde_json::from_str::<crate::core::health::WorkerHealth>(&json) {
                Ok(b) if now.since(b.at) <= max_age => out.push(b),
                _ => stale.push(field),
            }
        }
        if !stale.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("HDEL")
                .arg(self.workers_key())
                .arg(&stale)
                .query_async(&mut conn)
                .await;
        }
        out.sort_by(|a, b| (&a.worker, &a.instance).cmp(&(&b.worker, &b.instance)));
        Ok(out)
    }
}

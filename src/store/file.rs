//! The embedded persistent store: one append-only file, zero setup.
//!
//! Every write appends a framed record (`length`, `crc32`, JSON) to the file
//! through one writer thread, which batches whatever is waiting into a single
//! `write` (and, with [`Sync::Always`], a single `fdatasync`: group commit).
//! A write returns only once its record is in the file, so what the runtime
//! persists before it publishes survives a crash of the process. The whole
//! state is also kept in memory (a [`MemoryStore`] is the index), which is
//! what makes reads free; the file is replayed when the store is opened, a
//! torn last record is cut off, and the file is compacted (rewritten with one
//! record per live workflow) when it grows to several times the live data.
//!
//! One process at a time: a lock file beside the store refuses a second one.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    Definitions, HealthRecords, ListQuery, MemoryStore, StoreError, TimerIndex, Version, Versioned,
    WorkflowStates, WorkflowSummary, same_definition,
};
use crate::core::saga::parts::{Changes, Delta};
use crate::core::{Timestamp, TransactionId, WorkflowDefinition, WorkflowState};

/// When the file is flushed to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sync {
    /// Every commit is handed to the operating system before the write
    /// returns: it survives the process dying (kill -9), not a power cut.
    /// The same guarantee as SQLite's WAL with `synchronous=NORMAL`.
    #[default]
    Os,
    /// Every commit batch is also `fdatasync`ed: it survives a power cut.
    Always,
}

/// Settings of a [`FileStore`].
#[derive(Clone, Debug)]
pub struct FileStoreConfig {
    /// Flushing.
    pub sync: Sync,
    /// Compact when the file is larger than this and than 4× the live data.
    pub compact_min_bytes: u64,
    /// Outputs and fan-out items of this many bytes or more are written
    /// apart from their step, once per file, under their SHA-256: a step
    /// rewritten (retried, undone) does not write its output again, and
    /// identical payloads are written once. Default
    /// [`LARGE_PAYLOAD_BYTES`](super::LARGE_PAYLOAD_BYTES).
    pub large_payload_bytes: usize,
}

impl Default for FileStoreConfig {
    fn default() -> Self {
        Self {
            sync: Sync::Os,
            compact_min_bytes: 64 * 1024 * 1024,
            large_payload_bytes: super::LARGE_PAYLOAD_BYTES,
        }
    }
}

/// A store in one local file: states, timers, definitions and (in
/// memory) worker health.
#[derive(Clone)]
pub struct FileStore {
    index: MemoryStore,
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// Orders index updates and log appends the same way.
    commit: Mutex<mpsc::Sender<Request>>,
    /// Bytes written to the file, compactions included.
    written: Arc<std::sync::atomic::AtomicU64>,
    /// See [`FileStoreConfig::large_payload_bytes`].
    large_payload_bytes: usize,
    _lock: File,
}

struct Request {
    /// The payloads `frame` names by digest, each as its own record: the
    /// writer appends those the file does not hold yet, before `frame`.
    payloads: Vec<(String, Vec<u8>)>,
    frame: Vec<u8>,
    /// Compact the file after this batch, however large it is.
    compact: bool,
    done: oneshot::Sender<Result<(), String>>,
}

/// One log record. Externally tagged: an internally tagged enum would make
/// serde buffer the state, which raw JSON payloads cannot pass through.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Put {
        v: Version,
        s: Arc<WorkflowState>,
    },
    /// What one transition changed, over version `v - 1`.
    Delta {
        tx: TransactionId,
        v: Version,
        d: Box<Delta>,
    },
    Delete {
        tx: TransactionId,
    },
    Definition {
        d: WorkflowDefinition,
    },
    /// A large payload that later records name by its digest `d`.
    Payload {
        d: String,
        p: crate::core::Payload,
    },
}

/// A change record as written: borrowed from the state, read back as a
/// [`Record::Delta`].
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Written<'a> {
    Delta {
        tx: TransactionId,
        v: Version,
        d: &'a Changes<'a>,
    },
    Payload {
        d: &'a str,
        p: &'a crate::core::Payload,
    },
}

/// A state's change record, and the records of the payloads it keeps apart.
fn change_frames(
    tx: TransactionId,
    v: Version,
    changes: &Changes<'_>,
) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let payloads = changes
        .apart
        .payloads()
        .map(|(d, p)| (d.to_string(), frame(&Written::Payload { d, p })))
        .collect();
    (frame(&Written::Delta { tx, v, d: changes }), payloads)
}

fn frame(record: &impl Serialize) -> Vec<u8> {
    let body = serde_json::to_vec(record).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        location: path.display().to_string(),
        message: e.to_string(),
    }
}

impl FileStore {
    /// Opens (creating if needed) the store at `path` with default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, FileStoreConfig::default())
    }

    /// Opens the store at `path`.
    pub fn open_with(path: impl AsRef<Path>, config: FileStoreConfig) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        lock.try_lock().map_err(|_| {
            io_err(&path, "the store is open in another process (its lock file is held); stop that process or use another path")
        })?;
        let index = MemoryStore::new();
        let (live, known) = load(&path, &index)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let (tx, rx) = mpsc::channel();
        let config_apart = config.large_payload_bytes;
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = Writer {
            counted: counted.clone(),
            path: path.clone(),
            file: BufWriter::with_capacity(1 << 20, file),
            config,
            index: index.clone(),
            live_bytes: live,
            written: 0,
            known,
        };
        std::thread::Builder::new()
            .name("multiagents-file-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err(&path, e))?;
        Ok(Self {
            index,
            shared: Arc::new(Shared {
                path,
                commit: Mutex::new(tx),
                written: counted,
                large_payload_bytes: config_apart,
                _lock: lock,
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Rewrites the file now with what is live (each workflow, definition
    /// and payload once), as happens by itself once the file has grown to
    /// four times that: the storage of expired workflows is given back.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(async {
    /// let dir = tempfile::tempdir().expect("dir");
    /// let store = multiagents::store::FileStore::open(dir.path().join("s.db")).expect("open");
    /// store.compact().await.expect("compacted");
    /// # });
    /// ```
    pub async fn compact(&self) -> Result<(), StoreError> {
        self.commit_with(Vec::new(), Vec::new(), true, || Ok(()))
            .await
    }

    /// Appends a record and waits until it is in the file. `update` runs
    /// under the commit lock, so the index and the file see writes in the
    /// same order.
    async fn commit<T>(
        &self,
        frame: Vec<u8>,
        update: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.commit_with(Vec::new(), frame, false, update).await
    }

    /// [`commit`](Self::commit), after the payloads `frame` names; with
    /// `compact`, answered once the file is compacted after it.
    async fn commit_with<T>(
        &self,
        payloads: Vec<(String, Vec<u8>)>,
        frame: Vec<u8>,
        compact: bool,
        update: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (done, wait) = oneshot::channel();
        let value = {
            let sender = self.shared.commit.lock().unwrap_or_else(|e| e.into_inner());
            let value = update()?;
            sender
                .send(Request {
                    payloads,
                    frame,
                    compact,
                    done,
                })
                .map_err(|_| io_err(&self.shared.path, "the writer thread stopped"))?;
            value
        };
        match wait.await {
            Ok(Ok(())) => Ok(value),
            Ok(Err(message)) => Err(io_err(&self.shared.path, message)),
            Err(_) => Err(io_err(&self.shared.path, "the writer thread stopped")),
        }
    }

    async fn write(
        &self,
        expected: Option<Version>,
        before: Option<&WorkflowState>,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        // Encode outside the lock; the version is checked inside it. Over a
        // known state only what changed is written.
        let guess = expected.map_or(1, |e| e + 1);
        // Only over the very state stored at `expected` (the one the index
        // holds, not merely an equal version): a delta over anything else
        // would not replay.
        let before = before.filter(|b| {
            self.index
                .current(state.transaction_id)
                .is_some_and(|c| Some(c.version) == expected && std::ptr::eq(*b, &*c.state))
        });
        let changes = match before.map(|b| Changes::between(b, &state)) {
            Some(d) if !d.full => d,
            _ => Changes::full(&state),
        }
        .keep_apart(self.shared.large_payload_bytes);
        let (record, payloads) = change_frames(state.transaction_id, guess, &changes);
        drop(changes);
        let version = self
            .commit_with(payloads, record, false, || {
                let version = self.index.check(expected, &state)?;
                self.index.put_unchecked(version, state.clone());
                Ok(version)
            })
            .await?;
        debug_assert_eq!(version, guess);
        // A finished top-level workflow has nothing left that must arrive.
        if !(state.is_terminal() && state.parent.is_none()) {
            self.index.note_unpublished(state.transaction_id, version);
        }
        if state.is_terminal() {
            self.index.notify(&Versioned { version, state });
        }
        Ok(version)
    }
}

/// Replays the file into `index`; returns the live size and the digests of
/// the payloads the file holds. Cuts a torn tail.
fn load(
    path: &Path,
    index: &MemoryStore,
) -> Result<(u64, std::collections::HashSet<String>), StoreError> {
    let mut file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return Err(io_err(path, e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
    let mut pos = 0usize;
    let mut good = 0usize;
    // One payload in memory however many states name it.
    let mut payloads: std::collections::HashMap<String, crate::core::Payload> =
        std::collections::HashMap::new();
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let crc = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let record: Record = serde_json::from_slice(body).map_err(|e| StoreError::Corrupt {
            location: path.display().to_string(),
            message: format!("record at byte {pos}: {e}"),
        })?;
        match record {
            Record::Put { v, s } => index.put_unchecked(v, s),
            Record::Delta { tx, v, mut d } => {
                let corrupt = |message: String| StoreError::Corrupt {
                    location: path.display().to_string(),
                    message: format!("record at byte {pos}: {message}"),
                };
                let base = index.current(tx);
                if base.is_none() && !d.full {
                    return Err(corrupt(format!(
                        "a change to workflow {tx}, which is not stored"
                    )));
                }
                // A compaction may have snapshotted the index past records
                // still queued behind it: those are in the snapshot already.
                let stored = base.as_ref().map_or(0, |b| b.version);
                if stored < v {
                    if !d.full && stored + 1 != v {
                        return Err(corrupt(format!(
                            "version {v} of workflow {tx} follows version {stored}"
                        )));
                    }
                    d.resolve(&mut |digest| payloads.get(digest).cloned())
                        .map_err(|digest| {
                            corrupt(format!(
                                "workflow {tx} names a payload {digest} that no earlier record holds"
                            ))
                        })?;
                    let base = base.filter(|_| !d.full);
                    let state = d
                        .apply(base.map(|b| WorkflowState::clone(&b.state)))
                        .map_err(|e| corrupt(e.to_string()))?;
                    index.put_unchecked(v, Arc::new(state));
                }
            }
            Record::Payload { d, p } => {
                payloads.insert(d, p);
            }
            Record::Delete { tx } => index.remove_unchecked(tx),
            Record::Definition { d } => {
                // A later record of the same version wins, as for states.
                let _ = index.insert_definition(&d);
            }
        }
        pos += 8 + len;
        good = pos;
    }
    if good < bytes.len() {
        tracing::warn!(path = %path.display(), at = good, dropped = bytes.len() - good, "cutting a torn record off the end of the store file");
        file.set_len(good as u64).map_err(|e| io_err(path, e))?;
        file.seek(SeekFrom::End(0)).map_err(|e| io_err(path, e))?;
    }
    Ok((good as u64, payloads.into_keys().collect()))
}

struct Writer {
    path: PathBuf,
    file: BufWriter<File>,
    config: FileStoreConfig,
    index: MemoryStore,
    live_bytes: u64,
    written: u64,
    counted: Arc<std::sync::atomic::AtomicU64>,
    /// Digests of the payloads the file holds.
    known: std::collections::HashSet<String>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(1024);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let result = self.append(&batch);
            // Writes are answered first; a compaction asked for, after it.
            let mut asked = Vec::new();
            for r in batch.drain(..) {
                match r.compact {
                    true => asked.push(r.done),
                    false => drop(r.done.send(result.clone())),
                }
            }
            let compacted = match result.is_ok() && (!asked.is_empty() || self.should_compact()) {
                true => self.compact().inspect_err(|e| {
                    tracing::error!(path = %self.path.display(), error = %e, "compacting the store file failed; it keeps growing");
                    self.live_bytes = self.written;
                }),
                false => result,
            };
            for done in asked {
                let _ = done.send(compacted.clone());
            }
        }
        let _ = self.file.flush();
    }

    fn append(&mut self, batch: &[Request]) -> Result<(), String> {
        let appended = self.write_batch(batch).inspect_err(|_| {
            // What reached the file is unknown: write every payload again.
            self.known.clear();
        })?;
        self.counted
            .fetch_add(appended, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn write_batch(&mut self, batch: &[Request]) -> Result<u64, String> {
        let mut appended = 0u64;
        for r in batch {
            for (digest, f) in &r.payloads {
                if !self.known.contains(digest) {
                    self.file.write_all(f).map_err(|e| e.to_string())?;
                    appended += f.len() as u64;
                    self.known.insert(digest.clone());
                }
            }
            self.file.write_all(&r.frame).map_err(|e| e.to_string())?;
            appended += r.frame.len() as u64;
        }
        self.written += appended;
        self.file.flush().map_err(|e| e.to_string())?;
        if self.config.sync == Sync::Always {
            self.file.get_ref().sync_data().map_err(|e| e.to_string())?;
        }
        Ok(appended)
    }

    fn should_compact(&self) -> bool {
        let size = self.live_bytes + self.written;
        // `live_bytes` is the size of the last snapshot (or of the file as
        // loaded): compact once the file is four times that.
        size > self.config.compact_min_bytes && size > 4 * self.live_bytes.max(1)
    }

    /// Rewrites the file with one record per live workflow and definition.
    fn compact(&mut self) -> Result<(), String> {
        let tmp = self.path.with_extension("compacting");
        let mut out =
            BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(|e| e.to_string())?);
        let mut size = 0u64;
        for d in self.index.all_definitions() {
            let f = frame(&Record::Definition { d });
            size += f.len() as u64;
            out.write_all(&f).map_err(|e| e.to_string())?;
        }
        // Each live state whole, after the payloads it names that this
        // file does not hold yet: a finished workflow's payloads go with it.
        let mut known = std::collections::HashSet::new();
        for v in self.index.all() {
            let changes = Changes::full(&v.state).keep_apart(self.config.large_payload_bytes);
            let (record, payloads) = change_frames(v.state.transaction_id, v.version, &changes);
            for (digest, f) in payloads {
                if known.insert(digest) {
                    size += f.len() as u64;
                    out.write_all(&f).map_err(|e| e.to_string())?;
                }
            }
            size += record.len() as u64;
            out.write_all(&record).map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
        out.get_ref().sync_all().map_err(|e| e.to_string())?;
        drop(out);
        std::fs::rename(&tmp, &self.path).map_err(|e| e.to_string())?;
        let file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| e.to_string())?;
        self.file = BufWriter::with_capacity(1 << 20, file);
        self.known = known;
        self.live_bytes = size;
        self.written = 0;
        self.counted
            .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(path = %self.path.display(), bytes = size, "store file compacted");
        Ok(())
    }
}

#[async_trait]
impl WorkflowStates for FileStore {
    async fn create(&self, state: Arc<WorkflowState>) -> Result<Version, StoreError> {
        self.write(None, None, state).await
    }

    async fn get(&self, transaction_id: TransactionId) -> Result<Option<Versioned>, StoreError> {
        self.index.get(transaction_id).await
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

    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError> {
        self.index.list(query).await
    }

    // Kept in memory: after a crash the bus is gone too, and the
    // orchestrator republishes everything in flight when it starts.

    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError> {
        let ids = self.index.finished_before(finished_before);
        for tx in &ids {
            let record = frame(&Record::Delete { tx: *tx });
            self.commit(record, || {
                self.index.remove_unchecked(*tx);
                Ok(())
            })
            .await?;
        }
        Ok(ids.len())
    }

    async fn published(&self, writes: &[(TransactionId, Version)]) -> Result<(), StoreError> {
        self.index.published(writes).await
    }

    async fn unpublished(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(TransactionId, Version)>, StoreError> {
        self.index
            .unpublished(written_before, lease_until, limit)
            .await
    }

    fn tracks_unpublished(&self) -> bool {
        true
    }

    fn bytes_written(&self) -> Option<u64> {
        Some(
            self.shared
                .written
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    async fn wait_terminal(
        &self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Result<Option<Versioned>, StoreError> {
        self.index.wait_terminal(transaction_id, timeout).await
    }
}

#[async_trait]
impl TimerIndex for FileStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError> {
        self.index.due(now, limit).await
    }
}

#[async_trait]
impl Definitions for FileStore {
    async fn put_definition(&self, definition: &WorkflowDefinition) -> Result<(), StoreError> {
        if let Some(stored) = self
            .index
            .get_definition(definition.name().as_str(), definition.version())
            .await?
        {
            return same_definition(&stored, definition);
        }
        let record = frame(&Record::Definition {
            d: definition.clone(),
        });
        self.commit(record, || self.index.insert_definition(definition))
            .await
    }

    async fn get_definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        self.index.get_definition(name, version).await
    }

    async fn latest_definition(
        &self,
        name: &str,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        self.index.latest_definition(name).await
    }

    async fn definition_versions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.index.definition_versions().await
    }
}

#[async_trait]
impl HealthRecords for FileStore {
    async fn record_worker_health(
        &self,
        beats: &[crate::core::health::WorkerHealth],
    ) -> Result<(), StoreError> {
        // Heartbeats are not worth the disk: they are kept in memory.
        self.index.record_worker_health(beats).await
    }

    async fn worker_health(
        &self,
        max_age: std::time::Duration,
    ) -> Result<Vec<crate::core::health::WorkerHealth>, StoreError> {
        self.index.worker_health(max_age).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::saga;
    use crate::core::{CorrelationId, Payload, WorkflowBuilder};

    fn def() -> WorkflowDefinition {
        WorkflowBuilder::new("w")
            .step("a", "x")
            .step("b", "y")
            .build()
            .expect("valid")
    }

    fn fresh(def: &WorkflowDefinition) -> Arc<WorkflowState> {
        let (s, _) = saga::start(
            def,
            TransactionId::new(),
            CorrelationId::new(),
            Payload::null(),
            Timestamp(1),
        );
        Arc::new(s)
    }

    fn advance(def: &WorkflowDefinition, state: &WorkflowState, step: &str) -> Arc<WorkflowState> {
        let mut s = state.clone();
        let input = saga::Input::Succeeded {
            step: step.into(),
            phase: crate::core::Phase::Forward,
            attempt: 1,
            output: Payload::null(),
        };
        assert!(saga::apply(def, &mut s, input, Timestamp(2)).changed);
        Arc::new(s)
    }

    #[tokio::test]
    async fn reopening_restores_states_versions_definitions_and_timers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let def = def();
        let (a, b) = (fresh(&def), fresh(&def));
        {
            let store = FileStore::open(&path).expect("opens");
            store.put_definition(&def).await.expect("definition");
            store.create(a.clone()).await.expect("create a");
            store.create(b.clone()).await.expect("create b");
            let a2 = advance(&def, &a, "a");
            assert_eq!(store.compare_and_set(1, a2.clone()).await.expect("cas"), 2);
            assert!(matches!(
                store.compare_and_set(1, a2).await,
                Err(StoreError::Conflict {
                    expected: 1,
                    found: 2,
                    ..
                })
            ));
        }
        let store = FileStore::open(&path).expect("reopens");
        let got = store
            .get(a.transaction_id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(got.version, 2);
        assert_eq!(
            got.state.steps[0].status,
            crate::core::StepStatus::Completed
        );
        assert_eq!(
            store
                .get(b.transaction_id)
                .await
                .expect("get")
                .expect("exists")
                .version,
            1
        );
        assert_eq!(
            store.get_definition("w", 1).await.expect("def"),
            Some(def.clone())
        );
        // Timers are indexed again: both workflows have a step deadline.
        assert_eq!(
            store.due(Timestamp(u64::MAX), 10).await.expect("due").len(),
            2
        );
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let def = def();
        let a = fresh(&def);
        {
            let store = FileStore::open(&path).expect("opens");
            store.create(a.clone()).await.expect("create");
            store
                .compare_and_set(1, advance(&def, &a, "a"))
                .await
                .expect("cas");
        }
        // A crash in the middle of writing a record.
        let full = std::fs::metadata(&path).expect("meta").len();
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[200, 1, 0, 0, 1, 2, 3]).expect("write");
        drop(f);
        let store = FileStore::open(&path).expect("reopens");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), full);
        assert_eq!(
            store
                .get(a.transaction_id)
                .await
                .expect("get")
                .expect("exists")
                .version,
            2
        );
        // And it goes on appending after the cut.
        let cur = store
            .get(a.transaction_id)
            .await
            .expect("get")
            .expect("exists");
        store
            .compare_and_set(2, advance(&def, &cur.state, "b"))
            .await
            .expect("cas");
        drop(store);
        let store = FileStore::open(&path).expect("reopens");
        let got = store
            .get(a.transaction_id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            (got.version, got.state.status),
            (3, crate::core::WorkflowStatus::Completed)
        );
    }

    #[tokio::test]
    async fn a_corrupted_record_with_a_good_checksum_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let body = br#"{"put":{"v":"one"}}"#;
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        bytes.extend_from_slice(body);
        std::fs::write(&path, bytes).expect("write");
        let err = FileStore::open(&path).err().expect("refused");
        assert!(
            err.to_string().contains("corrupt record: record at byte 0"),
            "{err}"
        );
    }

    fn count_records(path: &Path) -> usize {
        let bytes = std::fs::read(path).expect("read");
        let (mut pos, mut n) = (0, 0);
        while pos + 8 <= bytes.len() {
            let len =
                u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
                    as usize;
            pos += 8 + len;
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn compaction_keeps_only_live_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let def = def();
        let config = FileStoreConfig {
            sync: Sync::Always,
            compact_min_bytes: 16 * 1024,
            ..Default::default()
        };
        let mut ids = Vec::new();
        {
            let store = FileStore::open_with(&path, config.clone()).expect("opens");
            store.put_definition(&def).await.expect("definition");
            for _ in 0..50 {
                let s = fresh(&def);
                store.create(s.clone()).await.expect("create");
                let s2 = advance(&def, &s, "a");
                store.compare_and_set(1, s2.clone()).await.expect("cas");
                store
                    .compare_and_set(2, advance(&def, &s2, "b"))
                    .await
                    .expect("cas");
                ids.push(s.transaction_id);
            }
            assert_eq!(store.expire(Timestamp(u64::MAX)).await.expect("expire"), 50);
            for _ in 0..100 {
                store.create(fresh(&def)).await.expect("create");
            }
        }
        let records = count_records(&path);
        let store = FileStore::open_with(&path, config).expect("reopens");
        assert_eq!(
            store.list(&ListQuery::default()).await.expect("list").len(),
            100
        );
        for id in ids {
            assert!(
                store.get(id).await.expect("get").is_none(),
                "expired workflows stay gone"
            );
        }
        // Without compaction: 1 definition + 150 creates + 100 updates + 50 deletes.
        assert!(records < 301, "file not compacted: {records} records");
        assert_eq!(store.get_definition("w", 1).await.expect("def"), Some(def));
    }
}

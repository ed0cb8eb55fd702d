//! A worker process's heartbeat: what each worker type did since it
//! started and lately. Worker managers write it, stores keep it, and the
//! worker monitor of any process reads it.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Counters of one worker type in this process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerHealth {
    /// The worker type.
    pub worker: String,
    /// This process.
    pub instance: String,
    /// Calls finished successfully.
    pub succeeded: u64,
    /// Calls that failed (any kind).
    pub failed: u64,
    /// Calls in flight now.
    pub in_flight: u64,
    /// Concurrency limit.
    pub concurrency: u64,
    /// When this snapshot was taken.
    pub at: Timestamp,
    /// The heartbeat interval: how often a snapshot comes.
    #[serde(default)]
    pub interval_ms: u64,
    /// Calls that succeeded since the previous snapshot.
    #[serde(default)]
    pub recent_succeeded: u64,
    /// Calls that failed since the previous snapshot.
    #[serde(default)]
    pub recent_failed: u64,
    /// Call durations in this process, microseconds: `(value, count)` of
    /// every non-empty bucket of an HDR histogram (2 significant digits),
    /// so that monitors can merge instances exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub durations_us: Vec<(u64, u64)>,
    /// The latest errors, by kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ErrorKind>,
}

/// Errors of one kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorKind {
    /// The kind (`WorkerError::with_kind`), or `error` when none was given.
    pub kind: String,
    /// How many.
    pub count: u64,
    /// The latest one's message.
    pub last_message: String,
    /// When the latest happened.
    pub last_at: Timestamp,
}

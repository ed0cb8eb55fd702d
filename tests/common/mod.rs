//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Counts side effects by idempotency key, so a test can see what ran and how often.
#[derive(Clone, Default)]
pub struct Effects {
    inner: Arc<Mutex<HashMap<String, u32>>>,
}

impl Effects {
    pub fn record(&self, key: &str) {
        *self
            .inner
            .lock()
            .expect("lock")
            .entry(key.to_string())
            .or_default() += 1;
    }

    /// How many distinct keys start with `prefix`-ish filters.
    pub fn count_matching(&self, needle: &str) -> usize {
        self.inner
            .lock()
            .expect("lock")
            .keys()
            .filter(|k| k.contains(needle))
            .count()
    }

    /// Keys recorded more than once.
    pub fn duplicates(&self) -> usize {
        self.inner
            .lock()
            .expect("lock")
            .values()
            .filter(|n| **n > 1)
            .count()
    }

    pub fn total(&self) -> u32 {
        self.inner.lock().expect("lock").values().sum()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    pub amount_cents: u64,
    #[serde(default)]
    pub decline: bool,
}

/// The Redis to test against: `REDIS_URL` (set by scripts/test.sh, which starts
/// a throw-away server). Without it a Redis test is skipped with a note, except
/// in CI, where it fails.
pub fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok() => {
            panic!("REDIS_URL is not set; run the tests through ./scripts/test.sh")
        }
        _ => {
            eprintln!(
                "skipped: REDIS_URL is not set (./scripts/test.sh starts a throw-away Redis)"
            );
            None
        }
    }
}

/// The address of a Redis Cluster node, from `REDIS_CLUSTER_URL` (set by
/// `scripts/test.sh`, which starts a throw-away three-node cluster).
pub fn redis_cluster_url() -> Option<String> {
    match std::env::var("REDIS_CLUSTER_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok() => {
            panic!("REDIS_CLUSTER_URL is not set; run the tests through ./scripts/test.sh")
        }
        _ => {
            eprintln!(
                "skipped: REDIS_CLUSTER_URL is not set (./scripts/test.sh starts a throw-away cluster)"
            );
            None
        }
    }
}

/// The PostgreSQL to test against: `DATABASE_URL` (set by scripts/test.sh,
/// which starts a throw-away cluster). Without it a PostgreSQL test is
/// skipped with a note, except in CI, where it fails.
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok() => {
            panic!("DATABASE_URL is not set; run the tests through ./scripts/test.sh")
        }
        _ => {
            eprintln!(
                "skipped: DATABASE_URL is not set (./scripts/test.sh starts a throw-away PostgreSQL)"
            );
            None
        }
    }
}

/// A PostgreSQL schema name no other test run uses.
pub fn unique_schema(name: &str) -> String {
    format!("t{}_{name}", uuid_like()).to_lowercase()
}

/// A key prefix no other test run uses.
pub fn unique_prefix(name: &str) -> String {
    format!("t{}-{name}", uuid_like())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", nanos, std::process::id())
}

/// The sub-workflow a workflow started (the first one in its history).
pub fn child_of(
    state: &multiagents::core::WorkflowState,
) -> Option<multiagents::core::TransactionId> {
    state.history.iter().find_map(|h| match &h.event {
        multiagents::core::saga::HistoryEvent::ChildStarted { transaction_id } => {
            Some(*transaction_id)
        }
        _ => None,
    })
}

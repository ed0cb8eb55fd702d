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

//! Counters and the health model: what a heartbeat reports of each worker
//! type in this process.

use std::sync::atomic::AtomicU64;

use crate::core::Timestamp;
use crate::core::health::ErrorKind;

/// Error kinds kept per worker type.
pub(super) const ERROR_KINDS_KEPT: usize = 16;

/// What the worker monitor needs that counters alone do not give. Calls
/// push their durations into a lock-free bucket; snapshots drain it into the
/// histogram, so the hot path takes no lock.
pub(super) struct Detail {
    pub(super) recent: metrics_util::storage::AtomicBucket<u64>,
    pub(super) summary: std::sync::Mutex<Summary>,
}

pub(super) struct Summary {
    pub(super) durations: hdrhistogram::Histogram<u64>,
    pub(super) errors: Vec<ErrorKind>,
    /// Counters at the previous snapshot.
    pub(super) last: (u64, u64),
}

impl Detail {
    pub(super) fn new() -> Self {
        Self {
            recent: metrics_util::storage::AtomicBucket::new(),
            summary: std::sync::Mutex::new(Summary {
                // 1 µs to 1 hour, 2 significant digits.
                durations: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("valid histogram bounds"),
                errors: Vec::new(),
                last: (0, 0),
            }),
        }
    }

    /// The summary, with the durations pushed since folded in.
    pub(super) fn summary(&self) -> std::sync::MutexGuard<'_, Summary> {
        let mut s = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        let durations = &mut s.durations;
        self.recent.clear_with(|values| {
            for v in values {
                let _ = durations.record((*v).clamp(1, 3_600_000_000));
            }
        });
        s
    }
}

impl Summary {
    pub(super) fn error(&mut self, kind: &str, message: &str, at: Timestamp) {
        match self.errors.iter_mut().find(|e| e.kind == kind) {
            Some(e) => {
                e.count += 1;
                e.last_message = message.to_string();
                e.last_at = at;
            }
            None => {
                if self.errors.len() >= ERROR_KINDS_KEPT {
                    // Forget the kind seen longest ago.
                    if let Some(i) = (0..self.errors.len()).min_by_key(|i| self.errors[*i].last_at)
                    {
                        self.errors.swap_remove(i);
                    }
                }
                self.errors.push(ErrorKind {
                    kind: kind.to_string(),
                    count: 1,
                    last_message: message.to_string(),
                    last_at: at,
                });
            }
        }
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) succeeded: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) in_flight: AtomicU64,
    /// With worker monitoring on.
    pub(super) detail: Option<Detail>,
}

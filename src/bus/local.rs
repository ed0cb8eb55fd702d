//! The in-process notifier and limits: what a bus whose backend has no
//! fire-and-forget channel or shared counters of its own gets, and what the
//! in-memory bus is made of. They reach only this process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{BusError, Interrupt, Notifier, PlaceLimits, Places, SharedLimits};
use crate::core::Event;

/// Status broadcasts and interrupts within this process, on two
/// `tokio::sync::broadcast` channels. A receiver that falls behind misses
/// events, as the contract allows.
#[derive(Clone)]
pub struct LocalNotifier {
    status: broadcast::Sender<Arc<Event>>,
    interrupts: broadcast::Sender<Interrupt>,
}

impl Default for LocalNotifier {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalNotifier {
    /// A notifier that keeps up to 4,096 status events and 1,024 interrupts
    /// for a slow receiver.
    pub fn new() -> Self {
        Self {
            status: broadcast::channel(4096).0,
            interrupts: broadcast::channel(1024).0,
        }
    }
}

#[async_trait]
impl Notifier for LocalNotifier {
    fn broadcast(&self, event: Event) {
        if self.status.receiver_count() > 0 {
            let _ = self.status.send(Arc::new(event));
        }
    }

    fn has_status_listeners(&self) -> bool {
        self.status.receiver_count() > 0
    }

    fn subscribe_status(&self) -> broadcast::Receiver<Arc<Event>> {
        self.status.subscribe()
    }

    async fn interrupt(&self, interrupt: Interrupt) -> Result<(), BusError> {
        if self.interrupts.receiver_count() > 0 {
            let _ = self.interrupts.send(interrupt);
        }
        Ok(())
    }

    fn subscribe_interrupts(&self) -> broadcast::Receiver<Interrupt> {
        self.interrupts.subscribe()
    }
}

/// Places and rates counted in this process only: right for the embedded
/// mode, and for a deployment whose limits need not be shared.
#[derive(Clone, Default)]
pub struct LocalLimits {
    by_key: Arc<Mutex<HashMap<String, LimitState>>>,
}

impl LocalLimits {
    /// No place taken yet.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl SharedLimits for LocalLimits {
    async fn take_places(
        &self,
        key: &str,
        want: u32,
        limits: &PlaceLimits,
        holder: &str,
    ) -> Result<Places, BusError> {
        let mut all = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        let state = all.entry(key.to_string()).or_default();
        Ok(state.take(Instant::now(), want, limits, holder))
    }

    async fn give_back(&self, key: &str, leases: &[String]) -> Result<(), BusError> {
        let mut all = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = all.get_mut(key) {
            for l in leases {
                state.held.remove(l);
            }
        }
        Ok(())
    }
}

/// Places of one worker type: leases held and recent starts.
#[derive(Default)]
struct LimitState {
    held: HashMap<String, Instant>,
    starts: VecDeque<Instant>,
    next: u64,
}

impl LimitState {
    fn take(&mut self, now: Instant, want: u32, limits: &PlaceLimits, holder: &str) -> Places {
        let mut grant = want;
        let mut wait: Option<Duration> = None;
        if let Some(max) = limits.concurrency {
            self.held.retain(|_, until| *until > now);
            grant = grant.min(max.saturating_sub(self.held.len() as u32));
            if grant == 0 {
                let first_free = self.held.values().min().map(|u| u.duration_since(now));
                wait = Some(
                    first_free
                        .unwrap_or_default()
                        .min(Duration::from_millis(50)),
                );
            }
        }
        if let Some((n, per)) = limits.rate {
            while self
                .starts
                .front()
                .is_some_and(|t| now.duration_since(*t) >= per)
            {
                self.starts.pop_front();
            }
            grant = grant.min(n.saturating_sub(self.starts.len() as u32));
            if grant == 0 {
                let oldest = self.starts.front().copied().unwrap_or(now);
                let free_in = per.saturating_sub(now.duration_since(oldest));
                wait = Some(wait.map_or(free_in, |w| w.max(free_in)));
            }
        }
        if grant == 0 {
            return Places {
                leases: Vec::new(),
                retry_after: wait,
            };
        }
        let leases: Vec<String> = (0..grant)
            .map(|_| {
                self.next += 1;
                format!("{holder}:{}", self.next)
            })
            .collect();
        if limits.concurrency.is_some() {
            for l in &leases {
                self.held.insert(l.clone(), now + limits.lease);
            }
        }
        if limits.rate.is_some() {
            self.starts.extend(std::iter::repeat_n(now, grant as usize));
        }
        Places {
            leases,
            retry_after: None,
        }
    }
}

//! The runner of one worker type: takes commands (highest priority first),
//! within its limits, and hands each to a call.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::bus::{Bus, Consumer, Delivery, PlaceLimits};
use crate::core::{Priority, Timestamp};

use super::*;

/// One worker type's metrics in this process (`None` when no recorder is
/// installed).
pub(super) struct RunnerMetrics {
    pub(super) ok: metrics::Counter,
    pub(super) stale: metrics::Counter,
    pub(super) failed: metrics::Counter,
    pub(super) duration: metrics::Histogram,
    pub(super) in_flight: metrics::Gauge,
}

impl RunnerMetrics {
    pub(super) fn new(worker: &str) -> Option<Self> {
        use crate::monitoring::metrics::{
            STALE_COMMANDS, WORKER_CALL_DURATION, WORKER_CALLS, WORKER_IN_FLIGHT,
        };
        if !crate::monitoring::metrics::enabled() {
            return None;
        }
        let w = worker.to_string();
        Some(Self {
            ok: metrics::counter!(WORKER_CALLS, "worker" => w.clone(), "outcome" => "ok"),
            stale: metrics::counter!(STALE_COMMANDS, "worker" => w.clone()),
            failed: metrics::counter!(WORKER_CALLS, "worker" => w.clone(), "outcome" => "error"),
            duration: metrics::histogram!(WORKER_CALL_DURATION, "worker" => w.clone()),
            in_flight: metrics::gauge!(WORKER_IN_FLIGHT, "worker" => w),
        })
    }
}

pub(super) struct Runner {
    pub(super) metrics: Option<RunnerMetrics>,
    /// This process's name, on every answer's timing.
    pub(super) instance: Arc<str>,
    pub(super) record_timing: bool,
    pub(super) max_output_bytes: usize,
    pub(super) worker: Arc<dyn Worker>,
    /// The command topics' consumers, by priority, highest first.
    pub(super) consumers: Vec<Arc<dyn Consumer>>,
    pub(super) limit: Arc<Semaphore>,
    pub(super) counters: Arc<Counters>,
    pub(super) batch_size: usize,
    pub(super) hard_stop: CancellationToken,
    pub(super) interrupts: Arc<Interrupts>,
    /// Limits shared with other processes, if any.
    pub(super) shared: Option<PlaceLimits>,
    pub(super) bus: Bus,
    /// Names this process's places.
    pub(super) holder: Arc<str>,
    /// Where a redelivered command's workflow is looked up first, so that
    /// a stale one is dropped instead of run.
    pub(super) states: Option<Arc<dyn crate::store::WorkflowStates>>,
    /// The commands this runner holds (running, or answered and not yet
    /// acked), by the priority level they came from: their leases are
    /// extended until they are acked.
    pub(super) held: Arc<Held>,
}

impl Runner {
    pub(super) async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mut calls = JoinSet::new();
        // Answers go through one flusher, which publishes those that finished
        // meanwhile and acks their commands together.
        let (answers, queue) = tokio::sync::mpsc::unbounded_channel();
        let flusher = tokio::spawn(flush(
            this.consumers.clone(),
            queue,
            this.worker.name().to_string(),
            this.held.clone(),
        ));
        let extender = tokio::spawn(extend_leases(
            this.consumers.clone(),
            this.held.clone(),
            this.worker.name().to_string(),
        ));
        let mut look = Look::default();
        loop {
            // Take no more than we can start.
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = this.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut room = (this.limit.available_permits() + 1).min(this.batch_size);
            // Under shared limits, take places before taking commands.
            let mut leases = Vec::new();
            if let Some(limits) = &this.shared {
                match this.take_places(limits, room, &stop).await {
                    Some(l) => leases = l,
                    None => break,
                }
                room = room.min(leases.len());
            }
            let batch = tokio::select! {
                _ = stop.cancelled() => {
                    this.give_back(leases).await;
                    break;
                }
                b = this.take_commands(room, &mut look) => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    this.give_back(leases).await;
                    tracing::warn!(worker = this.worker.name(), error = %e, "taking commands failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if leases.len() > batch.len() {
                let unused = leases.split_off(batch.len());
                this.give_back(unused).await;
            }
            let mut leases = leases.into_iter();
            let picked_up_at = Timestamp::now();
            let mut first = Some(permit);
            for (level, delivery) in batch {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match this.limit.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let me = this.clone();
                let answers = answers.clone();
                let lease = leases.next();
                me.held.insert(delivery.id.clone(), level);
                calls.spawn(async move {
                    match me.handle(&delivery, level, picked_up_at).await {
                        Handled::Answer(reply) => {
                            let _ = answers.send((level, delivery.id, Some(*reply)));
                        }
                        Handled::Stale => {
                            let _ = answers.send((level, delivery.id, None));
                        }
                        Handled::Nothing => me.held.remove(std::slice::from_ref(&delivery.id)),
                        Handled::Held => {}
                    }
                    if let Some(lease) = lease {
                        me.give_back(vec![lease]).await;
                    }
                    drop(permit);
                });
            }
            while calls.try_join_next().is_some() {}
        }
        // Drain: calls in flight finish (or are cancelled by the handle), then
        // the last answers are flushed.
        while calls.join_next().await.is_some() {}
        drop(answers);
        let _ = flusher.await;
        extender.abort();
    }

    /// Takes up to `room` commands, higher priorities first. The high and
    /// low topics are looked at whenever the last look found work in them,
    /// and otherwise every [`LOOK_AROUND`]; in between, only the normal
    /// topic is read (one read per batch, as without priorities). A command
    /// of higher priority so waits at most [`LOOK_AROUND`] behind normal
    /// ones.
    pub(super) async fn take_commands(
        &self,
        room: usize,
        look: &mut Look,
    ) -> Result<Vec<(usize, Delivery)>, crate::bus::BusError> {
        let normal = Priority::ALL
            .iter()
            .position(|p| *p == Priority::Normal)
            .unwrap_or(0);
        let around = look.others_busy || look.last.is_none_or(|t| t.elapsed() >= LOOK_AROUND);
        let mut out = Vec::new();
        if around {
            look.last = Some(std::time::Instant::now());
            look.others_busy = false;
            for (level, consumer) in self.consumers.iter().enumerate() {
                let left = room - out.len();
                if left == 0 {
                    break;
                }
                let got = consumer.next_batch(left, Duration::ZERO).await?;
                look.others_busy |= level != normal && !got.is_empty();
                out.extend(got.into_iter().map(|d| (level, d)));
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
        let got = self.consumers[normal].next_batch(room, IDLE_WAIT).await?;
        Ok(got.into_iter().map(|d| (normal, d)).collect())
    }

    /// Takes up to `want` shared places, waiting while none is free; `None`
    /// when stopped meanwhile.
    pub(super) async fn take_places(
        &self,
        limits: &PlaceLimits,
        want: usize,
        stop: &CancellationToken,
    ) -> Option<Vec<String>> {
        let name = self.worker.name();
        loop {
            let pause = match self
                .bus
                .limits
                .take_places(name, want as u32, limits, &self.holder)
                .await
            {
                Ok(places) if !places.leases.is_empty() => return Some(places.leases),
                Ok(places) => places
                    .retry_after
                    .unwrap_or(Duration::from_millis(10))
                    .clamp(Duration::from_millis(2), Duration::from_millis(250)),
                Err(e) => {
                    tracing::warn!(worker = name, error = %e, "taking a shared place failed; retrying");
                    Duration::from_millis(200)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    pub(super) async fn give_back(&self, leases: Vec<String>) {
        if leases.is_empty() {
            return;
        }
        if let Err(e) = self.bus.limits.give_back(self.worker.name(), &leases).await {
            tracing::warn!(worker = self.worker.name(), error = %e, "giving shared places back failed; they come back when their lease ends");
        }
    }
}

/// Where the runner is in looking at the high and low topics.
#[derive(Default)]
pub(super) struct Look {
    /// The last look found work in the high or low topic.
    pub(super) others_busy: bool,
    /// When the high and low topics were last looked at.
    pub(super) last: Option<std::time::Instant>,
}

/// How often an idle worker looks at the high and low topics.
pub(super) const LOOK_AROUND: Duration = Duration::from_millis(50);

/// How long an idle worker waits on the normal topic per take.
pub(super) const IDLE_WAIT: Duration = Duration::from_millis(100);

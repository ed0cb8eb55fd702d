//! How a worker type is run and how the manager is set up.

use std::time::Duration;

use crate::bus::PlaceLimits;

/// How one worker type is run.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Calls in flight at once in this process.
    pub concurrency: usize,
    /// Limits shared by every process on the bus (none by default).
    pub shared: PlaceLimits,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            shared: PlaceLimits {
                concurrency: None,
                rate: None,
                lease: Duration::from_secs(60),
            },
        }
    }
}

impl WorkerOptions {
    /// Sets the concurrency limit of this process.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// At most `n` calls of this worker type at once across **all**
    /// processes on the bus (an API that allows so many connections, say).
    /// Give every process the same limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// use multiagents::worker::WorkerOptions;
    ///
    /// let options = WorkerOptions::default()
    ///     .global_concurrency(10)
    ///     .rate_limit(100, Duration::from_secs(1));
    /// assert_eq!(options.shared.concurrency, Some(10));
    /// ```
    pub fn global_concurrency(mut self, n: u32) -> Self {
        self.shared.concurrency = Some(n.max(1));
        self
    }

    /// At most `calls` calls of this worker type started per `period`
    /// across all processes on the bus.
    pub fn rate_limit(mut self, calls: u32, period: Duration) -> Self {
        self.shared.rate = Some((calls.max(1), period.max(Duration::from_millis(1))));
        self
    }

    /// How long a place under [`global_concurrency`](Self::global_concurrency)
    /// is held at most (default 60 s): a call should finish within it, and
    /// the places of a process that dies come back after it.
    pub fn place_lease(mut self, lease: Duration) -> Self {
        self.shared.lease = lease.max(Duration::from_millis(1));
        self
    }

    pub(super) fn limited(&self) -> bool {
        self.shared.concurrency.is_some() || self.shared.rate.is_some()
    }
}

/// Settings of a [`WorkerManager`](super::WorkerManager).
#[derive(Clone, Debug)]
pub struct WorkerManagerConfig {
    /// This process's name among the workers (consumer name on the bus).
    pub instance: String,
    /// How often a heartbeat is broadcast.
    pub heartbeat_interval: Duration,
    /// How long shutdown waits for calls in flight before cancelling them.
    pub drain_timeout: Duration,
    /// How many commands one consumer takes from the bus at once.
    pub batch_size: usize,
    /// Put when a command was picked up, started and finished on its answer,
    /// so that the event monitor can show each step's lifecycle
    /// (`event_monitoring.enabled`).
    pub record_timing: bool,
    /// Keep call durations and errors by kind for the worker monitor
    /// (`worker_monitoring.enabled`).
    pub monitor: bool,
    /// The largest output a step may return, in bytes of JSON. A bigger one
    /// fails the step for good (kind `output_too_large`, naming the step
    /// and the size), so that its workflow compensates rather than stalls
    /// on an answer the bus cannot carry. Default: the event size limit
    /// less 16 KiB for the envelope.
    pub max_output_bytes: usize,
}

impl Default for WorkerManagerConfig {
    fn default() -> Self {
        Self {
            instance: format!("worker-{}", std::process::id()),
            heartbeat_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            batch_size: 64,
            record_timing: true,
            monitor: true,
            max_output_bytes: crate::core::event::DEFAULT_MAX_EVENT_BYTES - 16 * 1024,
        }
    }
}

impl WorkerManagerConfig {
    /// Applies the monitoring settings: the heartbeat interval
    /// (`worker_monitoring.health_check_interval_seconds`), whether durations
    /// and errors are kept (`worker_monitoring.enabled`) and whether answers
    /// carry their timing (`event_monitoring.enabled`).
    pub fn with_monitoring(mut self, m: &crate::monitoring::MonitoringConfig) -> Self {
        self.heartbeat_interval =
            Duration::from_secs(m.worker_monitoring.health_check_interval_seconds.max(1));
        self.monitor = m.worker_monitoring.enabled;
        self.record_timing = m.event_monitoring.enabled;
        self
    }
}

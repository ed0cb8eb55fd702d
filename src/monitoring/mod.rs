//! Monitoring: configuration, logs, and (as they land) the event and worker
//! monitors, Prometheus metrics and OpenTelemetry traces.

mod config;
pub mod events;
mod logging;
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(not(feature = "otel"))]
#[path = "otel_off.rs"]
pub(crate) mod otel;
pub mod workers;

pub use config::{
    ConfigError, ENV_VARS, EventMonitoringConfig, LoggerKind, LoggingConfig, MetricsConfig,
    MonitoringConfig, TracingConfig, WorkerMonitoringConfig,
};
pub use events::{EventMonitor, Lifecycle, MonitorError, Outcome, WindowStats, lifecycles};
pub use logging::{
    BoxedLayer, ConsoleStreams, RotatingFile, RotatingWriter, init_logging, log_layers,
    log_layers_with,
};
pub use workers::{Health, WorkerMonitor, WorkerTypeReport};

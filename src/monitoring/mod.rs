//! Monitoring: configuration, logs, and (as they land) the event and worker
//! monitors, Prometheus metrics and OpenTelemetry traces.

mod config;
mod logging;
pub mod metrics;

pub use config::{
    ConfigError, ENV_VARS, EventMonitoringConfig, LoggerKind, LoggingConfig, MetricsConfig,
    MonitoringConfig, TracingConfig, WorkerMonitoringConfig,
};
pub use logging::{
    BoxedLayer, ConsoleStreams, RotatingFile, RotatingWriter, init_logging, log_layers,
    log_layers_with,
};

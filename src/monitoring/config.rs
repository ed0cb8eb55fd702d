//! [`MonitoringConfig`]: what to log, where, and what to measure — from a
//! YAML or JSON file and from environment variables (which win).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

/// Every monitoring setting. Each key has a default; a file or environment
/// variable only needs the keys it changes.
///
/// ```
/// use multiagents::monitoring::{LoggerKind, MonitoringConfig};
///
/// let config = MonitoringConfig::from_yaml("logging: {default_logger: json, level: debug}")?;
/// assert_eq!(config.logging.default_logger, LoggerKind::Json);
/// assert_eq!(config.worker_monitoring.health_check_interval_seconds, 30);
///
/// // A misspelt key is refused, naming it and the key it probably meant.
/// let err = MonitoringConfig::from_yaml("logging: {levle: debug}").expect_err("refused");
/// assert!(err.to_string().contains("did you mean `level`"));
/// # Ok::<(), multiagents::monitoring::ConfigError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitoringConfig {
    /// Logs.
    pub logging: LoggingConfig,
    /// The event lifecycle monitor.
    pub event_monitoring: EventMonitoringConfig,
    /// The worker monitor.
    pub worker_monitoring: WorkerMonitoringConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces.
    pub tracing: TracingConfig,
}

/// Where logs go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoggerKind {
    /// Human-readable lines on the terminal: errors and warnings to stderr,
    /// the rest to stdout.
    #[default]
    Console,
    /// Lines in `file_path`, rotated by size.
    File,
    /// JSON lines in `file_path` (or on stdout when it is not set).
    Json,
    /// The console and the file at once.
    Composite,
}

/// Log settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Where logs go.
    pub default_logger: LoggerKind,
    /// The lowest level logged: `trace`, `debug`, `info`, `warn` or `error`,
    /// or a filter such as `info,multiagents=debug`.
    pub level: String,
    /// Write the file as JSON lines (also for `file` and `composite`).
    pub json_format: bool,
    /// The log file, for `file`, `json` and `composite`.
    pub file_path: Option<PathBuf>,
    /// Size at which the file is rotated, in MiB.
    pub max_size_mb: u64,
    /// Rotated files kept (`app.log.1` … `app.log.N`).
    pub backup_count: u32,
    /// Colours on the console (only ever when it is a terminal).
    pub use_colors: bool,
    /// The lowest level shown on the console in `composite` mode (the file
    /// gets `level`).
    pub console_min_level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            default_logger: LoggerKind::Console,
            level: "info".into(),
            json_format: false,
            file_path: None,
            max_size_mb: 10,
            backup_count: 5,
            use_colors: true,
            console_min_level: "info".into(),
        }
    }
}

/// Event lifecycle monitor settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventMonitoringConfig {
    /// Record each event's dispatch, pickup, processing and completion.
    pub enabled: bool,
    /// Transactions whose traces are kept at most.
    pub max_trace_history: usize,
    /// How often old traces are dropped.
    pub cleanup_interval_minutes: u64,
    /// How long traces are kept.
    pub trace_retention_hours: u64,
}

impl Default for EventMonitoringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_trace_history: 10_000,
            cleanup_interval_minutes: 5,
            trace_retention_hours: 24,
        }
    }
}

/// Worker monitor settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerMonitoringConfig {
    /// Track per-worker counters, latencies and health.
    pub enabled: bool,
    /// How often workers report (heartbeat interval).
    pub health_check_interval_seconds: u64,
    /// How long per-worker figures are kept.
    pub metrics_retention_hours: u64,
    /// Failure share at which a worker reads as degraded.
    pub degraded_failure_rate: f64,
    /// Failure share at which a worker reads as failing.
    pub failing_failure_rate: f64,
    /// Missed heartbeats after which a worker reads as inactive.
    pub inactive_after_missed_heartbeats: u32,
}

impl Default for WorkerMonitoringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            health_check_interval_seconds: 30,
            metrics_retention_hours: 24,
            degraded_failure_rate: 0.2,
            failing_failure_rate: 0.5,
            inactive_after_missed_heartbeats: 3,
        }
    }
}

/// Prometheus settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Record metrics.
    pub enabled: bool,
    /// Serve `/metrics` and `/healthz` here (`127.0.0.1:9464`, say).
    pub prometheus_addr: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prometheus_addr: None,
        }
    }
}

/// OpenTelemetry settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Export spans over OTLP/HTTP to this endpoint (`http://127.0.0.1:4318`).
    pub otlp_endpoint: Option<String>,
    /// The service name spans carry.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "multiagents".into(),
        }
    }
}

/// A monitoring configuration that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read monitoring config {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A key nobody knows.
    #[error("{origin}: unknown key `{key}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_else(|| format!("; known keys: {}", known.join(", "))))]
    UnknownKey {
        /// Where it was (the file or the variable).
        origin: String,
        /// Its dotted path.
        key: String,
        /// The closest known key at that place.
        suggestion: Option<String>,
        /// The keys known at that place.
        known: Vec<String>,
    },
    /// A value of the wrong type or out of range.
    #[error("{origin}: {message}")]
    Invalid {
        /// Where it was.
        origin: String,
        /// What was wrong.
        message: String,
    },
}

/// Environment variables and the keys they set. Values are read as YAML
/// scalars (`true`, `10`, `info`).
pub const ENV_VARS: &[(&str, &str, &str)] = &[
    ("MULTIAGENTS_LOG_LOGGER", "logging", "default_logger"),
    ("MULTIAGENTS_LOG_LEVEL", "logging", "level"),
    ("MULTIAGENTS_LOG_JSON", "logging", "json_format"),
    ("MULTIAGENTS_LOG_FILE", "logging", "file_path"),
    ("MULTIAGENTS_LOG_MAX_SIZE_MB", "logging", "max_size_mb"),
    ("MULTIAGENTS_LOG_BACKUP_COUNT", "logging", "backup_count"),
    ("MULTIAGENTS_LOG_COLORS", "logging", "use_colors"),
    (
        "MULTIAGENTS_LOG_CONSOLE_MIN_LEVEL",
        "logging",
        "console_min_level",
    ),
    ("MULTIAGENTS_EVENTS_ENABLED", "event_monitoring", "enabled"),
    (
        "MULTIAGENTS_EVENTS_MAX_TRACE_HISTORY",
        "event_monitoring",
        "max_trace_history",
    ),
    (
        "MULTIAGENTS_EVENTS_CLEANUP_INTERVAL_MINUTES",
        "event_monitoring",
        "cleanup_interval_minutes",
    ),
    (
        "MULTIAGENTS_EVENTS_TRACE_RETENTION_HOURS",
        "event_monitoring",
        "trace_retention_hours",
    ),
    (
        "MULTIAGENTS_WORKERS_ENABLED",
        "worker_monitoring",
        "enabled",
    ),
    (
        "MULTIAGENTS_WORKERS_HEALTH_CHECK_INTERVAL_SECONDS",
        "worker_monitoring",
        "health_check_interval_seconds",
    ),
    (
        "MULTIAGENTS_WORKERS_METRICS_RETENTION_HOURS",
        "worker_monitoring",
        "metrics_retention_hours",
    ),
    (
        "MULTIAGENTS_WORKERS_DEGRADED_FAILURE_RATE",
        "worker_monitoring",
        "degraded_failure_rate",
    ),
    (
        "MULTIAGENTS_WORKERS_FAILING_FAILURE_RATE",
        "worker_monitoring",
        "failing_failure_rate",
    ),
    (
        "MULTIAGENTS_WORKERS_INACTIVE_AFTER_MISSED_HEARTBEATS",
        "worker_monitoring",
        "inactive_after_missed_heartbeats",
    ),
    ("MULTIAGENTS_METRICS_ENABLED", "metrics", "enabled"),
    ("MULTIAGENTS_PROMETHEUS_ADDR", "metrics", "prometheus_addr"),
    ("MULTIAGENTS_OTLP_ENDPOINT", "tracing", "otlp_endpoint"),
    ("MULTIAGENTS_SERVICE_NAME", "tracing", "service_name"),
];

impl MonitoringConfig {
    /// Reads YAML (or JSON, which YAML includes), checking every key.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, "monitoring config")
    }

    /// Reads a file (YAML or JSON), checking every key.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Defaults, then `file` if given, then the environment
    /// ([`ENV_VARS`]), which wins.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::default().overlay(file)
    }

    /// `self` as the defaults, then `file` if given, then the environment.
    /// Programs whose own defaults differ (a command-line tool that keeps
    /// quiet below `warn`, say) start from those.
    pub fn overlay(self, file: Option<&Path>) -> Result<Self, ConfigError> {
        let (tree, origin) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
                let origin = path.display().to_string();
                (parse_tree(&text, &origin)?, origin)
            }
            None => (
                Value::Mapping(Mapping::new()),
                "monitoring config".to_string(),
            ),
        };
        let vars: Vec<(String, String)> = std::env::vars().collect();
        self.merge(tree, &origin, &vars)
    }

    /// Defaults, then `text`, then the environment given as pairs.
    pub fn from_yaml_and_env(text: &str, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let tree = parse_tree(text, "monitoring config")?;
        Self::default().merge(tree, "monitoring config", env)
    }

    fn merge(
        self,
        tree: Value,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        check_keys(&tree, origin)?;
        let mut merged = serde_yaml_ng::to_value(&self).map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let (Value::Mapping(base), Value::Mapping(over)) = (&mut merged, tree) else {
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                message: "the top level must be a mapping of sections".into(),
            });
        };
        for (section, values) in over {
            match (base.get_mut(&section), values) {
                (Some(Value::Mapping(into)), Value::Mapping(values)) => {
                    for (k, v) in values {
                        into.insert(k, v);
                    }
                }
                (_, Value::Null) => {}
                (_, other) => {
                    return Err(ConfigError::Invalid {
                        origin: origin.to_string(),
                        message: format!(
                            "`{}` must be a mapping of keys, not {other:?}",
                            section.as_str().unwrap_or_default()
                        ),
                    });
                }
            }
        }
        let mut origin = origin.to_string();
        for (name, section, key) in ENV_VARS {
            let Some((_, raw)) = env.iter().find(|(k, _)| k == name) else {
                continue;
            };
            origin = format!("{origin} with {name}={raw}");
            // Text settings stay text even when they look like numbers.
            let value = match *key {
                "file_path" | "prometheus_addr" | "otlp_endpoint" | "service_name" | "level"
                | "console_min_level" | "default_logger" => Value::String(raw.clone()),
                _ => serde_yaml_ng::from_str(raw).unwrap_or(Value::String(raw.clone())),
            };
            if let Some(Value::Mapping(m)) = base.get_mut(*section) {
                m.insert(Value::String((*key).to_string()), value);
            }
        }
        let config: MonitoringConfig =
            serde_yaml_ng::from_value(merged.clone()).map_err(|e| ConfigError::Invalid {
                origin: origin.clone(),
                message: match culprit(&merged) {
                    Some((key, why)) => format!("{key}: {why}"),
                    None => e.to_string(),
                },
            })?;
        config.validate(&origin)?;
        Ok(config)
    }

    fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::default().merge(parse_tree(text, origin)?, origin, &[])
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })
        };
        let l = &self.logging;
        for (key, level) in [
            ("level", &l.level),
            ("console_min_level", &l.console_min_level),
        ] {
            if let Err(why) = check_level(level) {
                return bad(format!("logging.{key}: {why}"));
            }
        }
        if matches!(l.default_logger, LoggerKind::File | LoggerKind::Composite)
            && l.file_path.is_none()
        {
            return bad(format!(
                "logging.file_path must be set when default_logger is {}",
                serde_yaml_ng::to_string(&l.default_logger)
                    .unwrap_or_default()
                    .trim()
            ));
        }
        if l.max_size_mb == 0 {
            return bad("logging.max_size_mb must be at least 1".into());
        }
        let w = &self.worker_monitoring;
        if !(0.0..=1.0).contains(&w.degraded_failure_rate)
            || !(0.0..=1.0).contains(&w.failing_failure_rate)
            || w.degraded_failure_rate > w.failing_failure_rate
        {
            return bad(format!(
                "worker_monitoring: failure rates must satisfy 0 <= degraded ({}) <= failing ({}) <= 1",
                w.degraded_failure_rate, w.failing_failure_rate
            ));
        }
        if w.health_check_interval_seconds == 0 {
            return bad(
                "worker_monitoring.health_check_interval_seconds must be at least 1".into(),
            );
        }
        if let Some(addr) = &self.metrics.prometheus_addr
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "metrics.prometheus_addr: `{addr}` is not an address such as 127.0.0.1:9464"
            ));
        }
        Ok(())
    }
}

/// The first key whose value does not fit, tried one key at a time (the
/// YAML deserializer does not say where it stopped).
fn culprit(tree: &Value) -> Option<(String, String)> {
    let Value::Mapping(root) = tree else {
        return None;
    };
    for (section, values) in root {
        let Value::Mapping(values) = values else {
            continue;
        };
        for (key, value) in values {
            let mut one = Mapping::new();
            one.insert(key.clone(), value.clone());
            let mut tree = Mapping::new();
            tree.insert(section.clone(), Value::Mapping(one));
            if let Err(e) = serde_yaml_ng::from_value::<MonitoringConfig>(Value::Mapping(tree)) {
                let name = format!(
                    "{}.{}",
                    section.as_str().unwrap_or_default(),
                    key.as_str().unwrap_or_default()
                );
                return Some((name, e.to_string()));
            }
        }
    }
    None
}

/// A level, or a filter whose every part is a level or `target=level`.
fn check_level(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let explain = || {
        format!(
            "`{text}` is not a level ({}) or a filter such as `info,multiagents=debug`",
            LEVELS.join(", ")
        )
    };
    for part in text.split(',').map(str::trim) {
        let level = part.rsplit_once('=').map_or(part, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(explain());
        }
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| format!("{}: {e}", explain()))?;
    Ok(())
}

fn parse_tree(text: &str, origin: &str) -> Result<Value, ConfigError> {
    let tree: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    Ok(match tree {
        Value::Null => Value::Mapping(Mapping::new()),
        t => t,
    })
}

/// The keys known in each section, for the unknown-key check.
fn known_keys(section: Option<&str>) -> &'static [&'static str] {
    match section {
        None => &[
            "logging",
            "event_monitoring",
            "worker_monitoring",
            "metrics",
            "tracing",
        ],
        Some("logging") => &[
            "default_logger",
            "level",
            "json_format",
            "file_path",
            "max_size_mb",
            "backup_count",
            "use_colors",
            "console_min_level",
        ],
        Some("event_monitoring") => &[
            "enabled",
            "max_trace_history",
            "cleanup_interval_minutes",
            "trace_retention_hours",
        ],
        Some("worker_monitoring") => &[
            "enabled",
            "health_check_interval_seconds",
            "metrics_retention_hours",
            "degraded_failure_rate",
            "failing_failure_rate",
            "inactive_after_missed_heartbeats",
        ],
        Some("metrics") => &["enabled", "prometheus_addr"],
        Some("tracing") => &["otlp_endpoint", "service_name"],
        Some(_) => &[],
    }
}

fn check_keys(tree: &Value, origin: &str) -> Result<(), ConfigError> {
    let unknown = |key: String, known: &[&str], given: &str| {
        let suggestion = known
            .iter()
            .map(|k| (strsim::jaro_winkler(k, given), *k))
            .filter(|(score, _)| *score > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, k)| k.to_string());
        ConfigError::UnknownKey {
            origin: origin.to_string(),
            key,
            suggestion,
            known: known.iter().map(|k| k.to_string()).collect(),
        }
    };
    let Value::Mapping(root) = tree else {
        return Err(ConfigError::Invalid {
            origin: origin.to_string(),
            message: "the top level must be a mapping of sections (logging, metrics, …)".into(),
        });
    };
    for (k, v) in root {
        let name = k.as_str().unwrap_or_default();
        let sections = known_keys(None);
        if !sections.contains(&name) {
            return Err(unknown(name.to_string(), sections, name));
        }
        if let Value::Mapping(section) = v {
            let keys = known_keys(Some(name));
            for (k, _) in section {
                let key = k.as_str().unwrap_or_default();
                if !keys.contains(&key) {
                    return Err(unknown(format!("{name}.{key}"), keys, key));
                }
            }
        }
    }
    Ok(())
}

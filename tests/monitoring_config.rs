//! `MonitoringConfig` from YAML, JSON and the environment, and the log
//! layers it builds: levels, JSON lines with the workflow's fields, and a
//! file rotated by size keeping `backup_count` old files.

use multiagents::monitoring::{ConfigError, LoggerKind, MonitoringConfig, log_layers};
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn every_key_has_a_default_and_files_change_only_what_they_name() {
    assert_eq!(
        MonitoringConfig::from_yaml("").expect("empty is fine"),
        MonitoringConfig::default()
    );
    let yaml = MonitoringConfig::from_yaml(
        "logging:\n  default_logger: composite\n  file_path: /tmp/x.log\n  level: debug\nmetrics:\n  prometheus_addr: 127.0.0.1:9464\n",
    )
    .expect("valid");
    assert_eq!(yaml.logging.default_logger, LoggerKind::Composite);
    assert_eq!(yaml.logging.level, "debug");
    assert_eq!(
        yaml.logging.backup_count, 5,
        "untouched keys keep their default"
    );
    assert_eq!(
        yaml.metrics.prometheus_addr.as_deref(),
        Some("127.0.0.1:9464")
    );
    let json = MonitoringConfig::from_yaml(
        r#"{"worker_monitoring": {"degraded_failure_rate": 0.1, "failing_failure_rate": 0.3}, "tracing": {"service_name": "shop"}}"#,
    )
    .expect("JSON is read too");
    assert_eq!(json.worker_monitoring.degraded_failure_rate, 0.1);
    assert_eq!(json.tracing.service_name, "shop");
    assert_eq!(json.worker_monitoring.inactive_after_missed_heartbeats, 3);
}

#[test]
fn unknown_and_misspelt_keys_are_named_with_the_closest_known_key() {
    let err = MonitoringConfig::from_yaml("logging:\n  json_fromat: true\n").expect_err("refused");
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, suggestion: Some(s), .. } if key == "logging.json_fromat" && s == "json_format"),
        "{err}"
    );
    assert!(
        err.to_string().contains("did you mean `json_format`"),
        "{err}"
    );
    let err = MonitoringConfig::from_yaml("metrcs: {enabled: false}").expect_err("refused");
    assert!(
        err.to_string()
            .contains("unknown key `metrcs`; did you mean `metrics`"),
        "{err}"
    );
    let err = MonitoringConfig::from_yaml("logging: {zzz: 1}").expect_err("refused");
    assert!(
        err.to_string()
            .contains("known keys: default_logger, level"),
        "{err}"
    );
}

#[test]
fn bad_values_are_refused_naming_the_key() {
    let cases = [
        ("logging: {level: loud}", "logging.level"),
        ("logging: {default_logger: file}", "file_path must be set"),
        ("logging: {max_size_mb: lots}", "max_size_mb"),
        (
            "metrics: {prometheus_addr: 'here'}",
            "metrics.prometheus_addr",
        ),
        (
            "worker_monitoring: {degraded_failure_rate: 0.6, failing_failure_rate: 0.5}",
            "degraded (0.6) <= failing (0.5)",
        ),
        ("logging: [1, 2]", "must be a mapping"),
    ];
    for (text, expected) in cases {
        let err = MonitoringConfig::from_yaml(text)
            .expect_err(text)
            .to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn the_environment_wins_over_the_file() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let config = MonitoringConfig::from_yaml_and_env(
        "logging: {level: info, max_size_mb: 3}\nevent_monitoring: {enabled: true}\n",
        &env(&[
            ("MULTIAGENTS_LOG_LEVEL", "debug"),
            ("MULTIAGENTS_LOG_FILE", "/var/log/ma.log"),
            ("MULTIAGENTS_EVENTS_ENABLED", "false"),
            ("MULTIAGENTS_WORKERS_INACTIVE_AFTER_MISSED_HEARTBEATS", "7"),
            ("MULTIAGENTS_PROMETHEUS_ADDR", "0.0.0.0:9000"),
        ]),
    )
    .expect("valid");
    assert_eq!(config.logging.level, "debug");
    assert_eq!(
        config.logging.max_size_mb, 3,
        "the file's value where no variable is set"
    );
    assert_eq!(
        config.logging.file_path.as_deref(),
        Some(std::path::Path::new("/var/log/ma.log"))
    );
    assert!(!config.event_monitoring.enabled);
    assert_eq!(config.worker_monitoring.inactive_after_missed_heartbeats, 7);
    assert_eq!(
        config.metrics.prometheus_addr.as_deref(),
        Some("0.0.0.0:9000")
    );
    let err =
        MonitoringConfig::from_yaml_and_env("", &env(&[("MULTIAGENTS_LOG_MAX_SIZE_MB", "big")]))
            .expect_err("refused")
            .to_string();
    assert!(err.contains("MULTIAGENTS_LOG_MAX_SIZE_MB=big"), "{err}");
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

#[test]
fn json_lines_carry_the_workflow_fields_and_honour_the_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("logs/app.jsonl");
    let config = MonitoringConfig::from_yaml(&format!(
        "logging: {{default_logger: json, level: info, file_path: '{}'}}",
        path.display()
    ))
    .expect("valid");
    let subscriber =
        tracing_subscriber::registry().with(log_layers(&config.logging).expect("layers"));
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(
            "step",
            transaction_id = "tx-1",
            correlation_id = "c-1",
            step = "charge",
            attempt = 2
        );
        let _in = span.enter();
        tracing::info!(amount = 100, "charged");
        tracing::debug!("below the level: not written");
    });
    let written = lines(&path);
    assert_eq!(written.len(), 1, "{written:?}");
    let line = &written[0];
    assert_eq!(line["message"], "charged");
    assert_eq!(line["amount"], 100);
    assert_eq!(line["level"], "INFO");
    let span = &line["spans"][0];
    assert_eq!(span["transaction_id"], "tx-1");
    assert_eq!(span["correlation_id"], "c-1");
    assert_eq!(span["step"], "charge");
    assert_eq!(span["attempt"], 2);
}

#[test]
fn the_file_rotates_by_size_keeping_backup_count_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.log");
    let mut config = MonitoringConfig::from_yaml(&format!(
        "logging: {{default_logger: file, level: info, file_path: '{}', max_size_mb: 1, backup_count: 2}}",
        path.display()
    ))
    .expect("valid");
    assert_eq!(config.logging.max_size_mb, 1);
    // 1 MiB per file; write about 3.5 MiB of lines.
    config.logging.use_colors = true;
    let subscriber =
        tracing_subscriber::registry().with(log_layers(&config.logging).expect("layers"));
    let filler = "x".repeat(1000);
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..3600 {
            tracing::info!(i, "{filler}");
        }
    });
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["app.log", "app.log.1", "app.log.2"],
        "two backups, the oldest dropped"
    );
    for name in &names {
        let size = std::fs::metadata(dir.path().join(name))
            .expect("meta")
            .len();
        assert!(size <= 1024 * 1024, "{name} is {size} bytes");
        let text = std::fs::read_to_string(dir.path().join(name)).expect("read");
        assert!(!text.contains('\u{1b}'), "no colour codes in a file");
    }
    // The newest lines are in app.log, the older in app.log.1.
    let newest = std::fs::read_to_string(&path).expect("read");
    assert!(newest.contains("i=3599"));
}

#[test]
fn json_format_turns_the_file_logger_into_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.log");
    for json in [false, true] {
        let _ = std::fs::remove_file(&path);
        let config = MonitoringConfig::from_yaml(&format!(
            "logging: {{default_logger: file, json_format: {json}, file_path: '{}'}}",
            path.display()
        ))
        .expect("valid");
        let subscriber =
            tracing_subscriber::registry().with(log_layers(&config.logging).expect("layers"));
        tracing::subscriber::with_default(subscriber, || tracing::info!(n = 1, "hello"));
        let text = std::fs::read_to_string(&path).expect("written");
        let parsed = serde_json::from_str::<serde_json::Value>(text.trim());
        assert_eq!(parsed.is_ok(), json, "{text}");
        assert!(text.contains("hello"));
    }
}

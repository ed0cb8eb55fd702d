//! The command's logs follow `--monitoring`: in composite mode the console
//! shows what reaches `console_min_level` and the file what reaches `level`.

use std::process::Command;

fn bench_with(config: &str, dir: &std::path::Path) -> (String, String) {
    let path = dir.join("monitoring.yaml");
    std::fs::write(&path, config).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["--monitoring", path.to_str().expect("utf-8")])
        .args([
            "bench",
            "orders",
            "--backend",
            "memory",
            "--workflows",
            "5",
            "--concurrency",
            "1",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::read_to_string(dir.join("ma.log")).unwrap_or_default();
    (String::from_utf8_lossy(&out.stderr).into_owned(), file)
}

#[test]
fn composite_logs_split_by_level_between_console_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("ma.log");
    let (console, file) = bench_with(
        &format!(
            "logging: {{default_logger: composite, level: info, console_min_level: error, file_path: '{}'}}",
            log.display()
        ),
        dir.path(),
    );
    assert_eq!(file.matches("workflow started").count(), 5, "{file}");
    assert!(file.contains("transaction_id="), "{file}");
    assert!(!console.contains("workflow started"), "{console}");

    std::fs::remove_file(&log).expect("rm");
    let (console, file) = bench_with(
        &format!(
            "logging: {{default_logger: composite, level: warn, console_min_level: info, file_path: '{}'}}",
            log.display()
        ),
        dir.path(),
    );
    assert_eq!(console.matches("workflow finished").count(), 5, "{console}");
    assert!(!file.contains("workflow finished"), "{file}");

    // A bad file is refused before anything runs, naming the key.
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "logging: {levle: info}").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args([
            "--monitoring",
            path.to_str().expect("utf-8"),
            "bench",
            "orders",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown key `logging.levle`; did you mean `level`"),
        "{err}"
    );
}

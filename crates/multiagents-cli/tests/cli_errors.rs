//! The command's errors name the flag or file at fault, and a command line
//! that cannot work exits 2 (as clap's own errors do), anything else 1.

use std::process::{Command, Output};

fn multiagents(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(args)
        .output()
        .expect("runs")
}

#[test]
fn a_bad_flag_value_exits_2_naming_the_flag() {
    for (args, said) in [
        (
            &["bench", "orders", "--fail-rate", "3"][..],
            "error: --fail-rate must be between 0 and 1, not 3",
        ),
        (
            &["bench", "orders", "--workflows", "0"][..],
            "error: --workflows must be at least 1",
        ),
        (
            &["bench", "orders", "--role", "workers"][..],
            "error: --role Workers needs a backend other processes can reach: use --backend redis",
        ),
        (
            &[
                "workflow",
                "signal",
                "not-an-id",
                "go",
                "--redis-url",
                "redis://127.0.0.1:1/",
            ][..],
            "error: <ID> `not-an-id` is not a transaction id",
        ),
    ] {
        let out = multiagents(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
}

#[test]
fn an_unreadable_or_invalid_definition_file_is_named_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.yaml");
    // deploy reads every file before it connects to anything.
    let out = multiagents(&[
        "workflow",
        "deploy",
        "--redis-url",
        "redis://127.0.0.1:1/",
        missing.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: cannot read {}: ", missing.display())),
        "{stderr}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: x\nsteps:\n  - name: a\n    worker: w\n  - name: a\n    worker: w\n",
    )
    .expect("write");
    let out = multiagents(&["workflow", "diagram", bad.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: {}: ", bad.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("`a`"),
        "the duplicated step is named: {stderr}"
    );
}

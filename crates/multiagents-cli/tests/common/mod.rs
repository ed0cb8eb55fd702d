//! Shared by the command's integration tests.
#![allow(dead_code)]

/// The Redis to test against, from `REDIS_URL` (set by `scripts/test.sh`).
/// Without it the test is skipped, except in CI, where that is an error.
pub fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok() => {
            panic!("REDIS_URL is not set; run the tests through ./scripts/test.sh")
        }
        _ => {
            eprintln!(
                "skipped: REDIS_URL is not set (./scripts/test.sh starts a throw-away Redis)"
            );
            None
        }
    }
}

/// Runs the `multiagents` command; whether it succeeded, its stdout and stderr.
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

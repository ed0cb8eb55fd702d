//! `multiagents workflow deploy` against a real Redis: definitions land in
//! the store by version, a changed definition under the same version is
//! refused, and a bad file is refused naming the file and the culprit before
//! anything is registered.

mod common;

use std::process::{Command, Output};

use multiagents::store::{Definitions, RedisStateStore, RedisStoreConfig};

fn deploy(url: &str, prefix: &str, files: &[&std::path::Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["workflow", "deploy", "--redis-url", url, "--prefix", prefix])
        .args(files)
        .output()
        .expect("runs")
}

const V1: &str = "name: refunds\nversion: 1\nsteps:\n  - name: check\n    worker: check_refund\n  - name: pay\n    worker: pay_refund\n";

#[tokio::test]
async fn deploys_definitions_by_version_and_refuses_changes_and_bad_files() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("deploy-{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = dir.path().join("refunds.yaml");
    std::fs::write(&v1, V1).expect("write");

    let out = deploy(&url, &prefix, &[&v1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deployed refunds@1"
    );
    // Again, unchanged: fine.
    assert!(deploy(&url, &prefix, &[&v1]).status.success());

    let store = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store");
    let stored = store
        .get_definition("refunds", 1)
        .await
        .expect("read")
        .expect("registered");
    assert_eq!(stored.steps().len(), 2);

    // Drawn by name from the store, and from the file.
    let draw = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_multiagents"))
            .args(["workflow", "diagram"])
            .args(args)
            .output()
            .expect("runs")
    };
    let out = draw(&[
        "refunds",
        "--redis-url",
        &url,
        "--prefix",
        &prefix,
        "--format",
        "mermaid",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("flowchart TD") && text.contains("s0 --> s1"),
        "{text}"
    );
    let out = draw(&[v1.to_str().expect("utf-8")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("check  [check_refund]") && text.contains("pay    [pay_refund]"),
        "{text}"
    );
    let out = draw(&["nothing-here", "--redis-url", &url, "--prefix", &prefix]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither a file nor a definition registered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same version with other steps is refused.
    let changed = dir.path().join("changed.yaml");
    std::fs::write(&changed, V1.replace("pay_refund", "wire_refund")).expect("write");
    let out = deploy(&url, &prefix, &[&changed]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("version 1 is already registered"), "{err}");

    // A bad file next to a good one: nothing is registered, and the error
    // names the file and the unknown dependency.
    let v2 = dir.path().join("v2.json");
    std::fs::write(
        &v2,
        r#"{"name": "refunds", "version": 2, "steps": [{"name": "check", "worker": "check_refund"}]}"#,
    )
    .expect("write");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: audits\nsteps:\n  - name: a\n    worker: w\n    after: [nowhere]\n",
    )
    .expect("write");
    let out = deploy(&url, &prefix, &[&v2, &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("nowhere"), "{err}");
    assert!(
        store
            .get_definition("refunds", 2)
            .await
            .expect("read")
            .is_none(),
        "nothing registered when one file is bad"
    );

    // An unreachable server is reported with its address.
    let out = deploy("redis://127.0.0.1:1/", &prefix, &[&v2]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));
}

#[tokio::test]
async fn refuses_sub_workflows_that_would_start_each_other() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let prefix = format!("deploy-cycle-{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, "name: a\nsteps:\n  - {name: run_b, workflow: b}\n").expect("write");
    std::fs::write(&b, "name: b\nsteps:\n  - {name: run_a, workflow: a}\n").expect("write");
    // `a` alone is fine (b is not there yet); then `b`, which closes the
    // cycle through the registered `a`, is refused.
    let out = deploy(&url, &prefix, &[&a]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = deploy(&url, &prefix, &[&b]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a → b → a"), "{stderr}");
    assert!(stderr.contains("nothing deployed"), "{stderr}");
    let store = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
        .await
        .expect("store");
    assert!(store.get_definition("b", 1).await.expect("read").is_none());
}

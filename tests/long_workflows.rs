//! Long workflows on the stores that write: a step writes its own step and
//! history entries, never the earlier outputs, on the file store and on
//! Redis; what is written reads back as the state in memory; states in the
//! layout before parts are still read, and rewritten as parts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use multiagents::core::saga::{self, Input};
use multiagents::core::{CorrelationId, Payload, Phase, StepName, Timestamp, TransactionId};
use multiagents::store::{FileStore, WorkflowStates};
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{Runtime, WorkerContext, WorkflowBuilder, WorkflowDefinition, WorkflowStatus};

fn chain(n: usize) -> WorkflowDefinition {
    let mut b = WorkflowBuilder::new(format!("chain{n}"));
    for i in 0..n {
        b = b.step(format!("s{i}"), "noop");
    }
    b.build().expect("valid")
}

/// A new instance of `def` with a `null` input.
fn started(def: &WorkflowDefinition) -> multiagents::core::WorkflowState {
    saga::start(
        def,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        Timestamp::now(),
    )
    .0
}

fn succeeded(step: &str, output: Payload) -> Input {
    Input::Succeeded {
        step: StepName::new(step),
        phase: Phase::Forward,
        attempt: 1,
        output,
    }
}

/// A distinct output of about `bytes` bytes.
fn big_output(i: usize, bytes: usize) -> Payload {
    let mut text = format!("{i}-");
    text.extend(std::iter::repeat_n(
        'x',
        bytes.saturating_sub(text.len() + 20),
    ));
    Payload::to_json(&serde_json::json!({ "step": i, "text": text })).expect("json")
}

/// The same output of about `bytes` bytes at every step (a system prompt
/// repeated).
fn same_output(bytes: usize) -> Payload {
    let text: String = std::iter::repeat_n('p', bytes.saturating_sub(20)).collect();
    Payload::to_json(&serde_json::json!({ "prompt": text })).expect("json")
}

/// Drives a `steps`-step chain through `store` with `output(i)` the output
/// of step `i`, as an orchestrator does (compare-and-set over the state
/// read); returns the bytes written by each step.
async fn drive(
    store: &dyn WorkflowStates,
    steps: usize,
    output: impl Fn(usize) -> Payload,
) -> (TransactionId, Vec<u64>) {
    let def = chain(steps);
    let state = started(&def);
    let tx = state.transaction_id;
    let mut version = store.create(Arc::new(state)).await.expect("create");
    let mut per_step = Vec::new();
    for i in 0..steps {
        let current = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(current.version, version);
        let mut next = multiagents::core::WorkflowState::clone(&current.state);
        let out = saga::apply(
            &def,
            &mut next,
            succeeded(&format!("s{i}"), output(i)),
            Timestamp::now(),
        );
        assert!(out.changed);
        let before = store.bytes_written().expect("the store counts");
        version = store
            .compare_and_set_from(version, &current.state, Arc::new(next))
            .await
            .expect("write");
        per_step.push(store.bytes_written().expect("the store counts") - before);
    }
    (tx, per_step)
}

#[tokio::test]
async fn on_the_file_store_a_step_writes_what_it_changed_and_the_file_reads_back() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("long.db");
    let steps = 300;
    let expected = {
        let store = FileStore::open(&path).expect("open");
        let (tx, per_step) = drive(&store, steps, |i| big_output(i, 2_000)).await;
        // Each step writes about its own output: not more as the chain grows.
        let first: u64 = per_step[..50].iter().sum();
        let last: u64 = per_step[steps - 50..].iter().sum();
        assert!(
            last <= first + first / 10,
            "the last 50 steps wrote {last} bytes, the first 50 {first}"
        );
        assert!(
            per_step.iter().all(|b| *b < 2_000 + 2_000),
            "a step wrote more than its output and a little: {per_step:?}"
        );
        store.get(tx).await.expect("get").expect("stored")
    };
    let reopened = FileStore::open(&path).expect("reopen");
    let back = reopened
        .get(expected.state.transaction_id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(back.version, expected.version);
    assert_eq!(*back.state, *expected.state);
    assert_eq!(back.state.status, WorkflowStatus::Completed);
}

#[tokio::test]
async fn on_the_file_store_a_payload_repeated_at_every_step_is_written_once_and_goes_with_its_workflow()
 {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("apart.db");
    // Compacting only when asked to.
    let config = |compact_min_bytes| multiagents::store::FileStoreConfig {
        compact_min_bytes,
        ..Default::default()
    };
    let steps = 200;
    let prompt = same_output(20_000);
    let (tx, expected) = {
        let store = FileStore::open_with(&path, config(u64::MAX)).expect("open");
        let (tx, per_step) = drive(&store, steps, |_| prompt.clone()).await;
        // The first step writes the payload; the others name it.
        assert!(per_step[0] > 20_000, "{per_step:?}");
        assert!(
            per_step[1..].iter().all(|b| *b < 2_000),
            "a step wrote the payload again: {per_step:?}"
        );
        (tx, store.get(tx).await.expect("get").expect("stored"))
    };
    let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
    assert_eq!(
        text.matches(prompt.as_str()).count(),
        1,
        "the payload is in the file once"
    );
    // Read back whole, every step holding it (and sharing one copy).
    let reopened = FileStore::open_with(&path, config(u64::MAX)).expect("reopen");
    let back = reopened.get(tx).await.expect("get").expect("stored");
    assert_eq!(*back.state, *expected.state);
    let first = back.state.output("s0").expect("output");
    let last = back
        .state
        .output(&format!("s{}", steps - 1))
        .expect("output");
    assert_eq!(first, &prompt);
    assert!(first.same(last), "one copy in memory");
    // A second workflow writing it again keeps the file holding it once.
    let (tx2, _) = drive(&reopened, 3, |_| prompt.clone()).await;
    // Expired, its storage goes with it: the next compaction drops the
    // payload once no workflow names it.
    let removed = reopened
        .expire(Timestamp::now().plus(Duration::from_secs(1)))
        .await
        .expect("expire");
    assert_eq!(removed, 2);
    reopened.compact().await.expect("compacts");
    drop(reopened);
    let bytes = std::fs::read(&path).expect("read");
    assert!(
        bytes.len() < 20_000,
        "the file still holds {} bytes after its workflows expired",
        bytes.len()
    );
    let reopened = FileStore::open_with(&path, config(u64::MAX)).expect("reopen");
    assert!(reopened.get(tx).await.expect("get").is_none());
    assert!(reopened.get(tx2).await.expect("get").is_none());
}

#[tokio::test]
async fn a_long_chain_run_by_the_runtime_on_the_file_store_reopens_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("runtime.db");
    let def = chain(200);
    let final_state = {
        let store = FileStore::open(&path).expect("open");
        let rt = Runtime::builder()
            .store(store)
            .workflow(def.clone())
            .worker(from_fn(
                "noop",
                |_: serde::de::IgnoredAny, ctx: WorkerContext| async move {
                    Ok::<_, WorkerError>(serde_json::json!({ "step": ctx.step.to_string() }))
                },
            ))
            .start()
            .await
            .expect("start");
        let client = rt.client();
        let tx = client
            .start(def.name().as_str(), &serde_json::json!({}))
            .await
            .expect("started");
        let state = client
            .wait(tx, Duration::from_secs(60))
            .await
            .expect("ends");
        assert_eq!(state.status, WorkflowStatus::Completed);
        rt.shutdown().await;
        state
    };
    let reopened = FileStore::open(&path).expect("reopen");
    let back = reopened
        .get(final_state.transaction_id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(*back.state, *final_state);
    assert_eq!(
        back.state.output("s199").map(|p| p.as_str().to_string()),
        Some(r#"{"step":"s199"}"#.to_string())
    );
}

#[tokio::test]
async fn on_the_file_store_a_before_that_is_not_the_stored_state_is_written_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("stale.db");
    let def = chain(4);
    let state = started(&def);
    let tx = state.transaction_id;
    let c = {
        let store = FileStore::open(&path).expect("open");
        let v1 = store.create(Arc::new(state.clone())).await.expect("create");
        let mut a = state.clone();
        saga::apply(
            &def,
            &mut a,
            succeeded("s0", big_output(0, 10)),
            Timestamp::now(),
        );
        let v2 = store
            .compare_and_set_from(v1, &state, Arc::new(a.clone()))
            .await
            .expect("write");
        let mut c = a.clone();
        saga::apply(
            &def,
            &mut c,
            succeeded("s1", big_output(1, 10)),
            Timestamp::now(),
        );
        // `state` is version 1, not the version 2 expected.
        store
            .compare_and_set_from(v2, &state, Arc::new(c.clone()))
            .await
            .expect("write");
        c
    };
    let back = FileStore::open(&path)
        .expect("reopen")
        .get(tx)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(back.version, 3);
    assert_eq!(*back.state, c);
}

fn chain_reading_back() -> WorkflowDefinition {
    WorkflowBuilder::new("reads_back")
        .step("first", "first")
        .step("second", "second")
        .step("third", "third")
        .build()
        .expect("valid")
}

fn chain_workers() -> Vec<Arc<dyn multiagents::worker::Worker>> {
    vec![
        Arc::new(from_fn("first", |_: serde_json::Value, _ctx| async move {
            Ok::<_, WorkerError>(serde_json::json!({ "n": 1 }))
        })),
        Arc::new(from_fn(
            "second",
            |_: serde_json::Value, ctx: WorkerContext| async move {
                let first: serde_json::Value = ctx.output("first").await?;
                Ok::<_, WorkerError>(
                    serde_json::json!({ "n": first["n"].as_i64().unwrap_or(0) + 1 }),
                )
            },
        )),
        Arc::new(from_fn(
            "third",
            |_: serde_json::Value, ctx: WorkerContext| async move {
                // `first` is not a step `third` comes after: read from the store.
                let first: serde_json::Value = ctx.output("first").await?;
                let second: serde_json::Value = ctx.output("second").await?;
                Ok::<_, WorkerError>(serde_json::json!({ "first": first, "second": second }))
            },
        )),
    ]
}

#[tokio::test]
async fn a_worker_reads_an_output_its_command_does_not_carry_from_the_store() {
    let mut builder = Runtime::builder().workflow(chain_reading_back());
    for w in chain_workers() {
        builder = builder.worker_with_arc(w, Default::default());
    }
    let rt = builder.start().await.expect("start");
    let client = rt.client();
    let tx = client
        .start("reads_back", &serde_json::json!({}))
        .await
        .expect("started");
    let state = client
        .wait(tx, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(
        state.status,
        WorkflowStatus::Completed,
        "{:?}",
        state.failure
    );
    assert_eq!(
        state.output("third").map(|p| p.as_str().to_string()),
        Some(r#"{"first":{"n":1},"second":{"n":2}}"#.to_string())
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_worker_manager_without_a_store_says_how_to_read_an_output_not_carried() {
    let bus = multiagents::bus::MemoryBus::new();
    let rt = Runtime::builder()
        .bus(bus.clone())
        .workflow(chain_reading_back())
        .external_workers()
        .start()
        .await
        .expect("start");
    let mut manager = multiagents::worker::WorkerManager::new(bus);
    for w in chain_workers() {
        manager = manager.register_arc(w, Default::default());
    }
    let workers = manager.start().await.expect("workers");
    let client = rt.client();
    let tx = client
        .start("reads_back", &serde_json::json!({}))
        .await
        .expect("started");
    let state = client
        .wait(tx, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(state.status, WorkflowStatus::Failed);
    let error = format!("{:?}", state.failure);
    assert!(error.contains("`first`"), "{error}");
    assert!(error.contains("WorkerManager::store"), "{error}");
    // `second` read `first` from its command: it completed.
    assert_eq!(
        state.output("second").map(|p| p.as_str().to_string()),
        Some(r#"{"n":2}"#.to_string())
    );
    workers.shutdown().await;
    rt.shutdown().await;
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;
    use multiagents::store::{RedisStateStore, RedisStoreConfig};
    use redis::AsyncCommands;

    async fn store(name: &str) -> Option<(RedisStateStore, String, String)> {
        let url = common::redis_url()?;
        let prefix = common::unique_prefix(name);
        let s = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
            .await
            .expect("connects");
        Some((s, url, prefix))
    }

    #[tokio::test]
    async fn a_hundred_steps_of_50_kb_never_rewrite_earlier_outputs() {
        let Some((store, url, prefix)) = store("long-50kb").await else {
            return;
        };
        let (tx, per_step) = drive(&store, 100, |i| big_output(i, 50_000)).await;
        // Each step sends its own output and a constant: not the outputs before it.
        for (i, b) in per_step.iter().enumerate() {
            assert!(
                (50_000..50_000 + 4_000).contains(b),
                "step {i} wrote {b} bytes"
            );
        }
        let back = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(back.state.status, WorkflowStatus::Completed);
        assert_eq!(back.state.output("s42"), Some(&big_output(42, 50_000)));
        // One output is one field: what a worker reads on demand.
        assert_eq!(
            store.step_output(tx, "s42").await.expect("read"),
            Some(big_output(42, 50_000))
        );
        assert_eq!(store.step_output(tx, "nope").await.expect("read"), None);
        // The outputs live in their own fields, the history in its list.
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let key = format!("{{{prefix}:wf:{tx}}}");
        let fields: Vec<String> = conn.hkeys(&key).await.expect("hkeys");
        assert!(fields.contains(&"h".to_string()), "{fields:?}");
        assert!(fields.contains(&"s:s99".to_string()), "{fields:?}");
        assert!(!fields.contains(&"s".to_string()), "{fields:?}");
        // One history field per write (the entries it added), counted in `hn`.
        let writes = fields.iter().filter(|f| f.starts_with("h:")).count();
        assert_eq!(writes, 101, "the create and a write per step");
        let counted: usize = conn.hget(&key, "hn").await.expect("hget");
        assert_eq!(counted, back.state.history.len());
        // Each output is kept apart, by digest; its step's part names it.
        let apart = fields.iter().filter(|f| f.starts_with("p:")).count();
        assert_eq!(apart, 100, "{fields:?}");
        let part: String = conn.hget(&key, "s:s42").await.expect("hget");
        assert!(part.len() < 1_000, "{part}");
        let digest = big_output(42, 50_000).digest();
        assert!(part.contains(&digest), "{part}");
        let kept: String = conn.hget(&key, format!("p:{digest}")).await.expect("hget");
        assert_eq!(kept, big_output(42, 50_000).as_str());
    }

    #[tokio::test]
    async fn a_payload_repeated_at_every_step_is_stored_once_and_expires_with_its_workflow() {
        let Some((store, url, prefix)) = store("long-same").await else {
            return;
        };
        let prompt = same_output(30_000);
        let (tx, per_step) = drive(&store, 50, |_| prompt.clone()).await;
        // Sent once: later steps name it.
        assert!(per_step[0] > 30_000, "{per_step:?}");
        assert!(per_step[1..].iter().all(|b| *b < 3_000), "{per_step:?}");
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let key = format!("{{{prefix}:wf:{tx}}}");
        let fields: Vec<String> = conn.hkeys(&key).await.expect("hkeys");
        let apart: Vec<&String> = fields.iter().filter(|f| f.starts_with("p:")).collect();
        assert_eq!(apart, vec![&format!("p:{}", prompt.digest())]);
        // The hash holds the payload once and little else.
        let mut stored = 0usize;
        for f in &fields {
            let n: usize = redis::cmd("HSTRLEN")
                .arg(&key)
                .arg(f)
                .query_async(&mut conn)
                .await
                .expect("hstrlen");
            stored += n;
        }
        assert!(
            (30_000..30_000 + 50 * 1_500).contains(&stored),
            "{stored} bytes stored"
        );
        let back = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(back.state.status, WorkflowStatus::Completed);
        assert!(
            back.state
                .steps
                .iter()
                .all(|s| s.output.as_ref() == Some(&prompt))
        );
        assert_eq!(
            store.step_output(tx, "s7").await.expect("read"),
            Some(prompt.clone())
        );
        // Finished: the hash, payloads and all, expires as one key.
        let ttl: i64 = conn.pttl(&key).await.expect("pttl");
        assert!(ttl > 0, "the finished workflow's hash has no TTL ({ttl})");
        let _: () = conn.del(&key).await.expect("del");
        assert!(store.get(tx).await.expect("get").is_none());
        assert_eq!(store.step_output(tx, "s7").await.expect("read"), None);
    }

    #[tokio::test]
    async fn a_payload_named_but_gone_since_another_replica_rewrote_the_state_is_sent_again() {
        let Some((a, url, prefix)) = store("long-named").await else {
            return;
        };
        let b = RedisStateStore::connect(RedisStoreConfig::new(&url).prefix(&prefix))
            .await
            .expect("connects");
        let def = chain(3);
        let state = started(&def);
        let tx = state.transaction_id;
        let (p, q) = (same_output(10_000), big_output(0, 10_000));
        let v1 = a.create(Arc::new(state.clone())).await.expect("create");
        // A writes s0 = P, and remembers having stored P.
        let mut with_p = state.clone();
        saga::apply(
            &def,
            &mut with_p,
            succeeded("s0", p.clone()),
            Timestamp::now(),
        );
        let v2 = a
            .compare_and_set_from(v1, &state, Arc::new(with_p))
            .await
            .expect("write");
        // B writes the state whole with s0 = Q: P is no longer stored.
        let mut with_q = state.clone();
        saga::apply(
            &def,
            &mut with_q,
            succeeded("s0", q.clone()),
            Timestamp::now(),
        );
        let v3 = b
            .compare_and_set(v2, Arc::new(with_q))
            .await
            .expect("write whole");
        // A writes s1 = P over what B wrote: naming P finds it gone, sends it.
        let read = a.get(tx).await.expect("get").expect("stored");
        assert_eq!(read.version, v3);
        let mut next = multiagents::core::WorkflowState::clone(&read.state);
        saga::apply(
            &def,
            &mut next,
            succeeded("s1", p.clone()),
            Timestamp::now(),
        );
        a.compare_and_set_from(v3, &read.state, Arc::new(next.clone()))
            .await
            .expect("write");
        let back = b.get(tx).await.expect("get").expect("stored");
        assert_eq!(*back.state, next);
        assert_eq!(back.state.output("s0"), Some(&q));
        assert_eq!(back.state.output("s1"), Some(&p));
    }

    #[tokio::test]
    async fn a_state_in_the_layout_before_parts_is_read_then_rewritten_as_parts() {
        let Some((store, url, prefix)) = store("long-migrate").await else {
            return;
        };
        let def = chain(3);
        let (mut state, _) = saga::start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            Payload::to_json(&serde_json::json!({"order": 7})).expect("json"),
            Timestamp::now(),
        );
        saga::apply(
            &def,
            &mut state,
            succeeded("s0", big_output(0, 100)),
            Timestamp::now(),
        );
        let tx = state.transaction_id;
        // As the store wrote it before: the whole state in one field.
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let key = format!("{{{prefix}:wf:{tx}}}");
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("v")
            .arg(4)
            .arg("s")
            .arg(serde_json::to_string(&state).expect("json"))
            .arg("st")
            .arg(state.status.as_str())
            .arg("wf")
            .arg(state.workflow.as_str())
            .arg("sa")
            .arg(state.started_at.as_millis())
            .arg("up")
            .arg(state.updated_at.as_millis())
            .arg("co")
            .arg(state.correlation_id.to_string())
            .query_async(&mut conn)
            .await
            .expect("hset");
        let old = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(old.version, 4);
        assert_eq!(
            store.step_output(tx, "s0").await.expect("read"),
            Some(big_output(0, 100)),
            "an output of the old layout"
        );
        assert_eq!(*old.state, state);
        // The next transition, written over what was read, rewrites it as parts.
        let mut next = state.clone();
        saga::apply(
            &def,
            &mut next,
            succeeded("s1", big_output(1, 100)),
            Timestamp::now(),
        );
        let v = store
            .compare_and_set_from(4, &old.state, Arc::new(next.clone()))
            .await
            .expect("write");
        assert_eq!(v, 5);
        let fields: Vec<String> = conn.hkeys(&key).await.expect("hkeys");
        assert!(!fields.contains(&"s".to_string()), "{fields:?}");
        assert!(fields.contains(&"h".to_string()), "{fields:?}");
        let back = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(*back.state, next);
        assert_eq!(back.version, 5);
        // And the one after is a delta over the parts.
        let mut last = next.clone();
        saga::apply(
            &def,
            &mut last,
            succeeded("s2", big_output(2, 100)),
            Timestamp::now(),
        );
        store
            .compare_and_set_from(5, &back.state, Arc::new(last.clone()))
            .await
            .expect("write");
        let back = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(*back.state, last);
        assert_eq!(back.state.status, WorkflowStatus::Completed);
        // Listed as before.
        let listed = store
            .list(&multiagents::store::ListQuery {
                correlation_id: Some(state.correlation_id),
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(listed.is_empty() || listed[0].transaction_id == tx);
    }

    #[tokio::test]
    async fn a_stale_before_is_written_whole_never_as_a_wrong_delta() {
        let Some((store, _url, _prefix)) = store("long-stale").await else {
            return;
        };
        let def = chain(4);
        let state = started(&def);
        let tx = state.transaction_id;
        let v1 = store.create(Arc::new(state.clone())).await.expect("create");
        let mut a = state.clone();
        saga::apply(
            &def,
            &mut a,
            succeeded("s0", big_output(0, 10)),
            Timestamp::now(),
        );
        let v2 = store
            .compare_and_set_from(v1, &state, Arc::new(a.clone()))
            .await
            .expect("write");
        // A writer that read version 1 loses the race.
        let mut b = state.clone();
        saga::apply(
            &def,
            &mut b,
            succeeded("s0", big_output(9, 10)),
            Timestamp::now(),
        );
        let lost = store.compare_and_set_from(v1, &state, Arc::new(b)).await;
        assert!(
            matches!(lost, Err(multiagents::store::StoreError::Conflict { .. })),
            "{lost:?}"
        );
        // A caller whose `before` is not what is stored at its version (not
        // made from it) gets a whole write, and the result reads back right.
        let mut c = a.clone();
        saga::apply(
            &def,
            &mut c,
            succeeded("s1", big_output(1, 10)),
            Timestamp::now(),
        );
        store
            .compare_and_set_from(v2, &state, Arc::new(c.clone()))
            .await
            .expect("write");
        let back = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(*back.state, c);
    }
}

#[tokio::test]
async fn an_output_over_the_limit_fails_its_step_for_good_and_the_saga_compensates() {
    let def = WorkflowBuilder::new("too_big")
        .step("reserve", "reserve")
        .compensate_with("release")
        .step("report", "report")
        .build()
        .expect("valid");
    let released = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let r = released.clone();
    let rt = Runtime::builder()
        .workflow(def)
        .worker_config(multiagents::worker::WorkerManagerConfig {
            max_output_bytes: 10_000,
            ..Default::default()
        })
        .worker(from_fn(
            "reserve",
            |_: serde_json::Value, _ctx| async move {
                Ok::<_, WorkerError>(serde_json::json!({ "id": 1 }))
            },
        ))
        .worker(from_fn("release", move |_: serde_json::Value, _ctx| {
            let r = r.clone();
            async move {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, WorkerError>(serde_json::json!({}))
            }
        }))
        .worker(from_fn("report", |_: serde_json::Value, _ctx| async move {
            Ok::<_, WorkerError>(serde_json::json!({ "text": "x".repeat(20_000) }))
        }))
        .start()
        .await
        .expect("start");
    let client = rt.client();
    let tx = client
        .start("too_big", &serde_json::json!({}))
        .await
        .expect("started");
    let state = client
        .wait(tx, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(state.status, WorkflowStatus::Compensated);
    let error = format!("{:?}", state.failure);
    assert!(error.contains("`report`"), "{error}");
    assert!(error.contains("20011 bytes"), "{error}");
    assert!(error.contains("output_too_large"), "{error}");
    // Failed for good: one attempt, not retried.
    assert_eq!(state.step("report").map(|s| s.attempts), Some(1));
    assert_eq!(released.load(std::sync::atomic::Ordering::SeqCst), 1);
    rt.shutdown().await;
}

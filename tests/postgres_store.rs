//! The PostgreSQL state store against a real PostgreSQL: the contract every
//! store passes, its tables created once by replicas starting together,
//! long workflows written as parts, and the runtime on it.
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use multiagents::core::saga;
use multiagents::core::{CorrelationId, Payload, Phase, StepName, Timestamp, TransactionId};
use multiagents::store::{
    Definitions, HealthRecords, ListQuery, PostgresStateStore, PostgresStoreConfig, StoreError,
    TimerIndex, WorkflowStates,
};
use multiagents::worker::{WorkerError, from_fn};
use multiagents::{RetryPolicy, Runtime, WorkflowBuilder, WorkflowDefinition, WorkflowStatus};

fn def() -> WorkflowDefinition {
    WorkflowBuilder::new("orders")
        .step("reserve", "reserve")
        .compensate_with("release")
        .step("charge", "charge")
        .retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(20)))
        .build()
        .expect("valid")
}

async fn store(name: &str) -> Option<(PostgresStateStore, String, String)> {
    let url = common::database_url()?;
    let schema = common::unique_schema(name);
    let s = PostgresStateStore::connect(PostgresStoreConfig::new(&url).schema(&schema))
        .await
        .expect("connects");
    Some((s, url, schema))
}

/// A plain connection, to look at the tables.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connects");
    tokio::spawn(conn);
    client
}

fn succeeded(step: &str, output: Payload) -> saga::Input {
    saga::Input::Succeeded {
        step: StepName::new(step),
        phase: Phase::Forward,
        attempt: 1,
        output,
    }
}

#[tokio::test]
async fn compare_and_set_lists_timers_and_definitions() {
    let Some((store, url, schema)) = store("contract").await else {
        return;
    };
    let d = def();
    store.put_definition(&d).await.expect("definition");
    store
        .put_definition(&d)
        .await
        .expect("the same definition again is fine");
    let changed = WorkflowBuilder::new("orders")
        .step("other", "x")
        .build()
        .expect("valid");
    assert!(matches!(
        store.put_definition(&changed).await,
        Err(StoreError::DefinitionChanged { .. })
    ));
    let v2 = WorkflowBuilder::new("orders")
        .version(2)
        .step("other", "x")
        .build()
        .expect("valid");
    store.put_definition(&v2).await.expect("a new version");
    assert_eq!(
        store
            .latest_definition("orders")
            .await
            .expect("latest")
            .map(|d| d.version()),
        Some(2)
    );
    assert_eq!(
        store.get_definition("orders", 1).await.expect("get"),
        Some(d.clone())
    );
    assert_eq!(
        store.definition_versions().await.expect("versions"),
        vec![("orders".to_string(), 1), ("orders".to_string(), 2)]
    );

    let now = Timestamp::now();
    let (state, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        now,
    );
    let state = Arc::new(state);
    let tx = state.transaction_id;
    assert_eq!(store.create(state.clone()).await.expect("create"), 1);
    assert!(matches!(
        store.create(state.clone()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let mut next = (*state).clone();
    assert!(saga::apply(&d, &mut next, succeeded("reserve", Payload::null()), now).changed);
    let next = Arc::new(next);
    assert_eq!(
        store
            .compare_and_set_from(1, &state, next.clone())
            .await
            .expect("cas"),
        2
    );
    assert!(matches!(
        store.compare_and_set(1, next.clone()).await,
        Err(StoreError::Conflict {
            expected: 1,
            found: 2,
            ..
        })
    ));
    let got = store.get(tx).await.expect("get").expect("exists");
    assert_eq!((got.version, &*got.state), (2, &*next));
    assert_eq!(
        store.step_output(tx, "reserve").await.expect("output"),
        Some(Payload::null())
    );
    assert_eq!(store.step_output(tx, "charge").await.expect("output"), None);

    let listed = store
        .list(&ListQuery {
            status: Some(WorkflowStatus::Running),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|s| s.transaction_id).collect::<Vec<_>>(),
        vec![tx]
    );
    assert_eq!(listed[0].version, 1, "the definition's version");
    assert!(
        store
            .list(&ListQuery {
                status: Some(WorkflowStatus::Completed),
                ..Default::default()
            })
            .await
            .expect("list")
            .is_empty()
    );

    // The deadline of the running step is due 30 s on; leased to one caller.
    assert!(store.due(now, 10).await.expect("due").is_empty());
    let later = now.plus(Duration::from_secs(31));
    assert_eq!(store.due(later, 10).await.expect("due"), vec![tx]);
    assert!(
        store.due(later, 10).await.expect("due").is_empty(),
        "leased: a second replica does not get it"
    );
    store.timer_handled(tx).await.expect("rearm");
    assert_eq!(
        store.due(later, 10).await.expect("due"),
        vec![tx],
        "re-armed at the real wakeup"
    );
    store.timer_handled(tx).await.expect("rearm");

    // Finishing: no timer, woken waiters, and expired with its parts.
    let mut done = (*next).clone();
    assert!(saga::apply(&d, &mut done, succeeded("charge", Payload::null()), now).changed);
    assert_eq!(done.status, WorkflowStatus::Completed);
    store
        .compare_and_set_from(2, &next, Arc::new(done))
        .await
        .expect("cas");
    assert!(store.due(later, 10).await.expect("due").is_empty());
    let waited = store
        .wait_terminal(tx, Duration::from_secs(1))
        .await
        .expect("wait")
        .expect("exists");
    assert_eq!(waited.state.status, WorkflowStatus::Completed);
    assert_eq!(
        store
            .expire(Timestamp::now().plus(Duration::from_secs(1)))
            .await
            .expect("expire"),
        1
    );
    assert!(store.get(tx).await.expect("get").is_none());
    let client = raw(&url).await;
    let left: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.parts WHERE tx = $1"),
            &[&tx.0],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "its parts went with it");
    for table in ["timers", "unpublished"] {
        let left: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {schema}.{table} WHERE tx = $1"),
                &[&tx.0],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(left, 0, "nothing of it is left in {table}");
    }

    // Writing a workflow that does not exist is refused.
    let (ghost, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        now,
    );
    assert!(matches!(
        store.compare_and_set(1, Arc::new(ghost)).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn worker_heartbeats_are_kept_per_process_and_dropped_when_stale() {
    let Some((store, _, _)) = store("health").await else {
        return;
    };
    let beat =
        |worker: &str, instance: &str, at: Timestamp| multiagents::core::health::WorkerHealth {
            worker: worker.into(),
            instance: instance.into(),
            at,
            ..Default::default()
        };
    let now = Timestamp::now();
    let old = Timestamp(now.as_millis() - 120_000);
    store
        .record_worker_health(&[
            beat("charge", "a", old),
            beat("charge", "a", now),
            beat("reserve", "b", now),
            beat("ship", "c", old),
        ])
        .await
        .expect("recorded");
    let seen = store
        .worker_health(Duration::from_secs(60))
        .await
        .expect("read");
    let names: Vec<(String, String)> = seen
        .iter()
        .map(|h| (h.worker.clone(), h.instance.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("charge".to_string(), "a".to_string()),
            ("reserve".to_string(), "b".to_string())
        ]
    );
}

#[tokio::test]
async fn an_unreachable_store_is_reported_with_its_address() {
    let err = PostgresStateStore::connect(PostgresStoreConfig::new(
        "postgres://someone:secret@127.0.0.1:1/app",
    ))
    .await
    .err()
    .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("postgres://someone@127.0.0.1:1/app"),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
    let err = PostgresStateStore::connect(
        PostgresStoreConfig::new("postgres://127.0.0.1:1/app").schema("Bad-Name"),
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("`Bad-Name`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_create_the_tables_once() {
    let Some(url) = common::database_url() else {
        return;
    };
    let schema = common::unique_schema("migrate");
    // Stores and buses of one schema migrate it, whichever comes first.
    let mut starting = Vec::new();
    let mut buses = Vec::new();
    for _ in 0..3 {
        let config = PostgresStoreConfig::new(&url).schema(&schema);
        starting.push(tokio::spawn(PostgresStateStore::connect(config)));
        let config = multiagents::bus::PostgresBusConfig::new(&url).schema(&schema);
        buses.push(tokio::spawn(multiagents::bus::PostgresBus::connect(config)));
    }
    for s in starting {
        s.await.expect("joined").expect("every replica connects");
    }
    for b in buses {
        b.await.expect("joined").expect("every bus connects");
    }
    let client = raw(&url).await;
    let rows = client
        .query(
            &format!("SELECT version FROM {schema}.migrations ORDER BY version"),
            &[],
        )
        .await
        .expect("migrations");
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, vec![1, 2, 3], "each migration applied once");
}

#[tokio::test]
async fn a_long_workflow_writes_each_output_once_and_reads_back_whole() {
    let Some((store, url, schema)) = store("long").await else {
        return;
    };
    let steps = 60;
    let mut b = WorkflowBuilder::new("chain");
    for i in 0..steps {
        b = b.step(format!("s{i}"), "noop");
    }
    let d = b.build().expect("valid");
    let (state, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        Timestamp::now(),
    );
    let tx = state.transaction_id;
    let mut version = store.create(Arc::new(state)).await.expect("create");
    let prompt: String = std::iter::repeat_n('p', 30_000).collect();
    let mut per_step = Vec::new();
    for i in 0..steps {
        let current = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(current.version, version);
        let mut next = multiagents::core::WorkflowState::clone(&current.state);
        // Even steps: a distinct 10 KB output; odd ones: the same 30 KB.
        let output = match i % 2 {
            0 => {
                let text: String = std::iter::repeat_n('x', 10_000).collect();
                Payload::to_json(&serde_json::json!({"step": i, "text": text})).expect("json")
            }
            _ => Payload::to_json(&serde_json::json!({"prompt": prompt})).expect("json"),
        };
        assert!(
            saga::apply(
                &d,
                &mut next,
                succeeded(&format!("s{i}"), output),
                Timestamp::now()
            )
            .changed
        );
        let before = store.bytes_written().expect("counted");
        let next = Arc::new(next);
        version = store
            .compare_and_set_from(version, &current.state, next.clone())
            .await
            .expect("write");
        per_step.push(store.bytes_written().expect("counted") - before);
        let back = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(&*back.state, &*next, "step {i} reads back as written");
    }
    // No step rewrote the outputs before it: each wrote its own (once for
    // the repeated one) and a little.
    for (i, n) in per_step.iter().enumerate() {
        let limit = match i {
            1 => 34_000,
            _ if i % 2 == 0 => 14_000,
            _ => 4_000,
        };
        assert!(*n < limit, "step {i} wrote {n} bytes: {per_step:?}");
    }
    let client = raw(&url).await;
    let payloads: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.parts WHERE tx = $1 AND field LIKE 'p:%'"),
            &[&tx.0],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        payloads,
        (steps / 2 + 1) as i64,
        "distinct ones and the repeated one once"
    );
    let out = store
        .step_output(tx, "s7")
        .await
        .expect("read")
        .expect("present");
    assert_eq!(
        out.parse::<serde_json::Value>().expect("json")["prompt"]
            .as_str()
            .map(str::len),
        Some(30_000)
    );
    let done = store.get(tx).await.expect("get").expect("stored");
    assert_eq!(done.state.status, WorkflowStatus::Completed);
}

#[tokio::test]
async fn a_waiter_is_woken_when_another_replica_finishes_the_workflow() {
    let Some((store, url, schema)) = store("wake").await else {
        return;
    };
    let other = PostgresStateStore::connect(PostgresStoreConfig::new(&url).schema(&schema))
        .await
        .expect("connects");
    let d = def();
    let (state, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        Timestamp::now(),
    );
    let tx = state.transaction_id;
    let state = Arc::new(state);
    store.create(state.clone()).await.expect("create");
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_terminal(tx, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut next = (*state).clone();
    let now = Timestamp::now();
    saga::apply(&d, &mut next, succeeded("reserve", Payload::null()), now);
    let next = Arc::new(next);
    other
        .compare_and_set_from(1, &state, next.clone())
        .await
        .expect("cas");
    let mut done = (*next).clone();
    saga::apply(&d, &mut done, succeeded("charge", Payload::null()), now);
    other
        .compare_and_set_from(2, &next, Arc::new(done))
        .await
        .expect("cas");
    let waited = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken well before its timeout")
        .expect("joined")
        .expect("read")
        .expect("exists");
    assert_eq!(waited.state.status, WorkflowStatus::Completed);
}

/// A process that wrote a transition and died before publishing its
/// commands: the write stays noted as unpublished, and an orchestrator's
/// recovery sweep publishes the commands again.
#[tokio::test]
async fn a_write_whose_commands_were_never_published_is_healed_by_the_sweep() {
    let Some((store, _, _)) = store("unpublished").await else {
        return;
    };
    let d = def();
    store.put_definition(&d).await.expect("definition");
    let tx = TransactionId::new();
    let (state, actions) = saga::start(
        &d,
        tx,
        CorrelationId::new(),
        Payload::to_json(&false).expect("json"),
        Timestamp::now(),
    );
    assert!(!actions.is_empty());
    store.create(Arc::new(state)).await.expect("create");
    let lease = || Timestamp(Timestamp::now().0 + 500);
    let unpublished = store
        .unpublished(Timestamp(Timestamp::now().0 + 1), lease(), 10)
        .await
        .expect("unpublished");
    assert_eq!(unpublished, vec![(tx, 1)]);
    assert!(
        store
            .unpublished(Timestamp(Timestamp::now().0 + 1), lease(), 10)
            .await
            .expect("unpublished")
            .is_empty(),
        "leased to the first caller"
    );

    let rt = Runtime::builder()
        .store(store.clone())
        .workflow(d)
        .orchestrator_config(multiagents::OrchestratorConfig {
            redispatch_on_start: false,
            redispatch_after: None,
            unpublished_after: Duration::from_millis(300),
            ..Default::default()
        })
        .worker(from_fn("reserve", |_: bool, _| async {
            Ok::<_, WorkerError>("r-1")
        }))
        .worker(from_fn("release", |_: bool, _| async {
            Ok::<_, WorkerError>("released")
        }))
        .worker(from_fn("charge", |_: bool, _| async {
            Ok::<_, WorkerError>("charged")
        }))
        .start()
        .await
        .expect("starts");
    let done = rt
        .client()
        .wait(tx, Duration::from_secs(20))
        .await
        .expect("healed and finished");
    assert_eq!(done.status, WorkflowStatus::Completed);
    let mut left = Vec::new();
    for _ in 0..50 {
        left = store
            .unpublished(Timestamp(Timestamp::now().0 + 1), Timestamp::now(), 10)
            .await
            .expect("unpublished");
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left.is_empty(), "{left:?}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_runs_and_undoes_orders_on_postgres() {
    let Some((store, _, _)) = store("runtime").await else {
        return;
    };
    let rt = Runtime::builder()
        .store(store.clone())
        .workflow(def())
        .worker(from_fn("reserve", |_: u64, _| async {
            Ok::<_, WorkerError>("r")
        }))
        .worker(from_fn("release", |_: u64, _| async {
            Ok::<_, WorkerError>("released")
        }))
        .worker(from_fn("charge", |n: u64, ctx| async move {
            if n.is_multiple_of(10) {
                Err(WorkerError::fatal("declined"))
            } else if n.is_multiple_of(7) && ctx.attempt == 1 {
                Err(WorkerError::retry("flaky"))
            } else {
                Ok("charged")
            }
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let mut ids = Vec::new();
    for n in 0..100u64 {
        ids.push((n, client.start("orders", &n).await.expect("start")));
    }
    for (n, tx) in ids {
        let state = client
            .wait(tx, Duration::from_secs(20))
            .await
            .expect("finishes");
        let expected = match n % 10 {
            0 => WorkflowStatus::Compensated,
            _ => WorkflowStatus::Completed,
        };
        assert_eq!(
            state.status,
            expected,
            "{}",
            multiagents::timeline::render(&state)
        );
        if n % 7 == 0 && n % 10 != 0 {
            assert_eq!(
                state.step("charge").expect("step").attempts,
                2,
                "retried through a PostgreSQL timer"
            );
        }
        let stored = store.get(tx).await.expect("get").expect("stored");
        assert_eq!(
            *stored.state, *state,
            "the stored state is the one waited for"
        );
    }
    rt.shutdown().await;
}

/// Concurrent transitions share commits: 300 workflows created and moved
/// on at once by one writer take far fewer commits than writes; racing
/// compare-and-sets of one workflow in the same batches let exactly one
/// win; and a write the server refuses fails alone, the others of its
/// batch still written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_a_bad_one_fails_alone() {
    let Some((_, url, schema)) = store("batches").await else {
        return;
    };
    let store =
        PostgresStateStore::connect(PostgresStoreConfig::new(&url).schema(&schema).writers(1))
            .await
            .expect("connects");
    let d = def();
    let started: Vec<Arc<multiagents::core::WorkflowState>> = (0..300)
        .map(|_| {
            Arc::new(
                saga::start(
                    &d,
                    TransactionId::new(),
                    CorrelationId::new(),
                    Payload::null(),
                    Timestamp::now(),
                )
                .0,
            )
        })
        .collect();
    // One that PostgreSQL refuses: text may not hold a NUL.
    let mut bad = (*started[0]).clone();
    bad.transaction_id = TransactionId::new();
    bad.workflow = multiagents::core::WorkflowName::from("orders\0");
    let bad = Arc::new(bad);
    let mut creates = tokio::task::JoinSet::new();
    for s in started.iter().cloned().chain([bad.clone()]) {
        let store = store.clone();
        creates.spawn(async move { (s.transaction_id, store.create(s).await) });
    }
    let mut refused = Vec::new();
    while let Some(joined) = creates.join_next().await {
        let (tx, created) = joined.expect("joined");
        match created {
            Ok(v) => assert_eq!(v, 1),
            Err(e) => refused.push((tx, e)),
        }
    }
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, bad.transaction_id);
    assert!(
        matches!(&refused[0].1, StoreError::Io { message, .. } if message.contains("0x00")),
        "the server's reason is given: {:?}",
        refused[0].1
    );
    assert!(store.get(bad.transaction_id).await.expect("get").is_none());

    // Each workflow moved on by four racers at once: one wins.
    let mut moves = tokio::task::JoinSet::new();
    for s in &started {
        let mut next = (**s).clone();
        saga::apply(
            &d,
            &mut next,
            succeeded("reserve", Payload::null()),
            Timestamp::now(),
        );
        let next = Arc::new(next);
        for _ in 0..4 {
            let (store, s, next) = (store.clone(), s.clone(), next.clone());
            moves.spawn(async move {
                (
                    s.transaction_id,
                    store.compare_and_set_from(1, &s, next).await,
                )
            });
        }
    }
    let mut won: std::collections::HashMap<TransactionId, usize> = Default::default();
    while let Some(joined) = moves.join_next().await {
        let (tx, moved) = joined.expect("joined");
        match moved {
            Ok(v) => {
                assert_eq!(v, 2);
                *won.entry(tx).or_default() += 1;
            }
            Err(StoreError::Conflict { found, .. }) => assert_eq!(found, 2),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won.len(), started.len());
    assert!(won.values().all(|n| *n == 1), "exactly one racer wins each");
    for s in started.iter().step_by(37) {
        let stored = store
            .get(s.transaction_id)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(stored.version, 2);
        assert_eq!(
            stored.state.step("reserve").expect("step").status,
            multiagents::core::StepStatus::Completed
        );
    }
    let stats = store.write_stats();
    assert!(
        stats.writes >= 300 + 1200,
        "every create and race was run: {stats:?}"
    );
    assert!(
        stats.commits * 4 < stats.writes,
        "concurrent writes shared commits: {stats:?}"
    );
    assert!(
        stats.statements < stats.writes,
        "the updates of a batch went as few statements: {stats:?}"
    );

    // New workflows, each created by three racers at once: one creates it,
    // the others are told it exists, and the creates shared statements.
    let before = store.write_stats();
    let fresh: Vec<Arc<multiagents::core::WorkflowState>> = (0..100)
        .map(|_| {
            let (state, _) = saga::start(
                &d,
                TransactionId::new(),
                CorrelationId::new(),
                Payload::null(),
                Timestamp::now(),
            );
            Arc::new(state)
        })
        .collect();
    let mut racers = tokio::task::JoinSet::new();
    for s in &fresh {
        for _ in 0..3 {
            let (store, s) = (store.clone(), s.clone());
            racers.spawn(async move { (s.transaction_id, store.create(s).await) });
        }
    }
    let mut made: std::collections::HashMap<TransactionId, usize> = Default::default();
    while let Some(joined) = racers.join_next().await {
        let (tx, created) = joined.expect("joined");
        match created {
            Ok(v) => {
                assert_eq!(v, 1);
                *made.entry(tx).or_default() += 1;
            }
            Err(StoreError::AlreadyExists(t)) => assert_eq!(t, tx),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(made.len(), fresh.len());
    assert!(
        made.values().all(|n| *n == 1),
        "exactly one racer creates each"
    );
    let after = store.write_stats();
    assert!(
        after.statements - before.statements < after.writes - before.writes,
        "the creates of a batch went as few statements: {before:?} -> {after:?}"
    );
}

/// Writes only bring a timer forward: a transition that moves the next
/// deadline later leaves the row alone, so the timer fires early once and is
/// set back to the workflow's real wakeup by the orchestrator that took it;
/// a write while it is leased is not lost.
#[tokio::test]
async fn a_timer_is_only_brought_forward_by_writes_and_set_back_when_it_fires_early() {
    let Some((store, url, schema)) = store("lazy_timers").await else {
        return;
    };
    let d = def();
    let t0 = Timestamp::now();
    let at = |s: u64| t0.plus(Duration::from_secs(s));
    let (state, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        t0,
    );
    let tx = state.transaction_id;
    let state = Arc::new(state);
    store.create(state.clone()).await.expect("create");
    let wakeup = |pg: tokio_postgres::Client| {
        let schema = schema.clone();
        async move {
            pg.query_one(
                &format!("SELECT wakeup FROM {schema}.timers WHERE tx = $1"),
                &[&tx.0],
            )
            .await
            .expect("timer")
            .get::<_, i64>(0)
        }
    };
    let first = wakeup(raw(&url).await).await;
    assert_eq!(
        Some(first as u64),
        state.next_wakeup().map(|t| t.as_millis())
    );
    // `reserve` done 20 s on: `charge` runs with its deadline 50 s on.
    let mut next = (*state).clone();
    assert!(saga::apply(&d, &mut next, succeeded("reserve", Payload::null()), at(20)).changed);
    let later_deadline = next.next_wakeup().expect("a deadline");
    assert!(later_deadline > at(40));
    let next = Arc::new(next);
    store
        .compare_and_set_from(1, &state, next.clone())
        .await
        .expect("cas");
    assert_eq!(
        wakeup(raw(&url).await).await,
        first,
        "not moved later by the write"
    );
    // It fires early, once, and is set back to the real wakeup.
    assert_eq!(store.due(at(31), 10).await.expect("due"), vec![tx]);
    store.timer_handled(tx).await.expect("rearm");
    assert_eq!(
        wakeup(raw(&url).await).await as u64,
        later_deadline.as_millis(),
        "set back to the real wakeup"
    );
    assert!(store.due(at(31), 10).await.expect("due").is_empty());
    assert_eq!(store.due(at(60), 10).await.expect("due"), vec![tx]);
    // Leased now; a write while it is leased (a retry due sooner) is kept:
    // the re-arm reads it.
    let mut failed = (*next).clone();
    assert!(
        saga::apply(
            &d,
            &mut failed,
            saga::Input::Failed {
                step: StepName::new("charge"),
                phase: Phase::Forward,
                attempt: 1,
                error: multiagents::core::StepError::retryable("declined"),
            },
            at(59),
        )
        .changed
    );
    let retry_at = failed.next_wakeup().expect("a retry");
    assert!(retry_at < at(60));
    store
        .compare_and_set_from(2, &next, Arc::new(failed))
        .await
        .expect("cas");
    store.timer_handled(tx).await.expect("rearm");
    assert_eq!(
        wakeup(raw(&url).await).await as u64,
        retry_at.as_millis(),
        "the write made while leased decides"
    );
    assert_eq!(store.due(at(60), 10).await.expect("due"), vec![tx]);
}

/// A payload this store wrote before is named, not sent again; if it is
/// gone meanwhile (deleted here by hand, as a rewrite by another replica
/// would), the write is refused for it and sent again with it, and the
/// state reads back whole.
#[tokio::test]
async fn a_named_payload_that_is_gone_is_sent_again() {
    let Some((store, url, schema)) = store("named").await else {
        return;
    };
    let d = WorkflowBuilder::new("pair")
        .step("a", "noop")
        .step("b", "noop")
        .step("c", "noop")
        .build()
        .expect("valid");
    let (state, _) = saga::start(
        &d,
        TransactionId::new(),
        CorrelationId::new(),
        Payload::null(),
        Timestamp::now(),
    );
    let tx = state.transaction_id;
    let mut current = Arc::new(state);
    let mut version = store.create(current.clone()).await.expect("create");
    let prompt: String = std::iter::repeat_n('q', 20_000).collect();
    let same = Payload::to_json(&serde_json::json!({ "prompt": prompt })).expect("json");
    let client = raw(&url).await;
    for (i, step) in ["a", "b", "c"].into_iter().enumerate() {
        if i == 2 {
            let gone = client
                .execute(
                    &format!("DELETE FROM {schema}.parts WHERE tx = $1 AND field LIKE 'p:%'"),
                    &[&tx.0],
                )
                .await
                .expect("delete");
            assert_eq!(gone, 1, "one payload, stored once");
        }
        let mut next = (*current).clone();
        saga::apply(
            &d,
            &mut next,
            succeeded(step, same.clone()),
            Timestamp::now(),
        );
        let next = Arc::new(next);
        let before = store.bytes_written().expect("counted");
        version = store
            .compare_and_set_from(version, &current, next.clone())
            .await
            .expect("write");
        let sent = store.bytes_written().expect("counted") - before;
        match i {
            1 => assert!(sent < 5_000, "named, not sent: {sent} bytes"),
            _ => assert!(sent > 20_000, "sent: {sent} bytes"),
        }
        current = next;
    }
    let back = store.get(tx).await.expect("get").expect("stored");
    assert_eq!(*back.state, *current, "reads back whole");
}

//! Listing workflows, the same on every store: newest first, paged by a
//! cursor without a run lost or shown twice (ties in start time included),
//! and filtered by request chain and start time.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use multiagents::WorkflowBuilder;
use multiagents::core::saga;
use multiagents::core::{CorrelationId, Payload, Timestamp, TransactionId};
use multiagents::store::{ListQuery, MemoryStore, WorkflowStates};

const T0: u64 = 1_800_000_000_000;

/// Nine runs: started at T0 + 0, 1, 2, 3, 3, 3, 4, 5, 6 ms (three at once),
/// the even ones in chain `a`, the odd ones in chain `b`.
async fn fill(store: &dyn WorkflowStates) -> (CorrelationId, CorrelationId, Vec<TransactionId>) {
    let def = WorkflowBuilder::new("w")
        .step("s", "x")
        .build()
        .expect("valid");
    let (a, b) = (CorrelationId::new(), CorrelationId::new());
    let mut ids = Vec::new();
    for (n, offset) in [0u64, 1, 2, 3, 3, 3, 4, 5, 6].into_iter().enumerate() {
        let chain = if n % 2 == 0 { a } else { b };
        let (state, _) = saga::start(
            &def,
            TransactionId::new(),
            chain,
            Payload::null(),
            Timestamp(T0 + offset),
        );
        ids.push(state.transaction_id);
        store.create(Arc::new(state)).await.expect("created");
    }
    (a, b, ids)
}

async fn contract(store: &dyn WorkflowStates) {
    let (a, _, ids) = fill(store).await;
    let all = store.list(&ListQuery::default()).await.expect("list");
    assert_eq!(all.len(), 9);
    let order: Vec<(Timestamp, TransactionId)> = all.iter().map(|s| s.cursor()).collect();
    let mut sorted = order.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(order, sorted, "newest first, ties by id");

    // Pages of two, from each page's last cursor: every run once, in order.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&ListQuery {
                after,
                limit: 2,
                ..Default::default()
            })
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|s| s.cursor());
        paged.extend(page.iter().map(|s| s.transaction_id));
    }
    assert_eq!(
        paged,
        all.iter().map(|s| s.transaction_id).collect::<Vec<_>>()
    );

    // By chain, and by start time [T0+2, T0+4).
    let chain: BTreeSet<TransactionId> = store
        .list(&ListQuery {
            correlation_id: Some(a),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.transaction_id)
        .collect();
    let expected: BTreeSet<TransactionId> = ids.iter().step_by(2).copied().collect();
    assert_eq!(chain, expected);
    let window = store
        .list(&ListQuery {
            started_after: Some(Timestamp(T0 + 2)),
            started_before: Some(Timestamp(T0 + 4)),
            ..Default::default()
        })
        .await
        .expect("list");
    let starts: Vec<u64> = window
        .iter()
        .map(|s| s.started_at.as_millis() - T0)
        .collect();
    assert_eq!(starts, [3, 3, 3, 2]);
    // A cursor inside the window, with a window bound above it.
    let rest = store
        .list(&ListQuery {
            started_before: Some(Timestamp(T0 + 6)),
            after: Some(window[1].cursor()),
            ..Default::default()
        })
        .await
        .expect("list");
    let starts: Vec<u64> = rest.iter().map(|s| s.started_at.as_millis() - T0).collect();
    assert_eq!(starts, [3, 2, 1, 0]);
}

#[tokio::test]
async fn the_memory_store_lists_pages_and_filters() {
    contract(&MemoryStore::new()).await;
}

#[cfg(feature = "embedded")]
#[tokio::test]
async fn the_file_store_lists_pages_and_filters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = multiagents::store::FileStore::open(dir.path().join("s.db")).expect("opens");
    contract(&store).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn the_redis_store_lists_pages_and_filters() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let store = multiagents::store::RedisStateStore::connect(
        multiagents::store::RedisStoreConfig::new(&url).prefix(common::unique_prefix("listing")),
    )
    .await
    .expect("connects");
    contract(&store).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_postgres_store_lists_pages_and_filters() {
    let Some(url) = common::database_url() else {
        return;
    };
    let store = multiagents::store::PostgresStateStore::connect(
        multiagents::store::PostgresStoreConfig::new(&url).schema(common::unique_schema("listing")),
    )
    .await
    .expect("connects");
    contract(&store).await;
}

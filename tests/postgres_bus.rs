//! The PostgreSQL bus against a real PostgreSQL: the contract the Redis and
//! in-memory buses meet, poison rows written straight into the table, a
//! server that refuses a write, wake-ups across processes, and sagas run
//! with nothing but PostgreSQL.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use multiagents::bus::{BusError, Consumer, PostgresBus, PostgresBusConfig, Topics};
use multiagents::core::{CorrelationId, Event, EventKind, Payload, TransactionId, WorkflowName};

const WAIT: Duration = Duration::from_millis(200);

fn event(n: u32) -> Event {
    let mut e = Event::new(
        EventKind::Command,
        TransactionId::new(),
        CorrelationId::new(),
        WorkflowName::new("w"),
        Payload::to_json(&serde_json::json!({"input": n, "steps": {}})).expect("json"),
    );
    e.attempt = n;
    e.step = Some("s".into());
    e
}

/// A bus in a schema of its own. Polls every 50 ms unless `tweak` says
/// otherwise, so that lease expiry shows within the tests' waits.
async fn bus(
    name: &str,
    tweak: impl FnOnce(PostgresBusConfig) -> PostgresBusConfig,
) -> Option<(PostgresBus, String, String)> {
    let url = common::database_url()?;
    let schema = common::unique_schema(name);
    let config = PostgresBusConfig::new(&url)
        .schema(&schema)
        .poll_interval(Duration::from_millis(50));
    let bus = PostgresBus::connect(tweak(config)).await.expect("connects");
    Some((bus, url, schema))
}

/// A plain connection, to look at and write into the tables.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connects");
    tokio::spawn(conn);
    client
}

async fn attempts(c: &dyn Consumer, max: usize) -> Vec<u32> {
    c.next_batch(max, WAIT)
        .await
        .expect("batch")
        .iter()
        .map(|d| d.event.attempt)
        .collect()
}

#[tokio::test]
async fn keeps_events_published_before_any_group_and_acks_them_away() {
    let Some((bus, _, _)) = bus("pgb_backlog", |c| c).await else {
        return;
    };
    bus.publish("t", event(1)).await.expect("publish");
    let c = bus.consumer("t", "g", "c1").await.expect("consumer");
    let batch = c.next_batch(10, WAIT).await.expect("batch");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].event.attempt, 1);
    assert_eq!(batch[0].delivery_count, 1);
    c.ack(&[batch[0].id.clone()]).await.expect("ack");
    assert!(c.next_batch(10, WAIT).await.expect("batch").is_empty());
}

#[tokio::test]
async fn consumers_of_one_group_share_the_events_and_every_group_gets_each() {
    let Some((bus, _, _)) = bus("pgb_share", |c| c).await else {
        return;
    };
    let a1 = bus.consumer("t", "a", "1").await.expect("consumer");
    let a2 = bus.consumer("t", "a", "2").await.expect("consumer");
    let b = bus.consumer("t", "b", "1").await.expect("consumer");
    let events: Vec<(String, Event)> = (0..10).map(|n| ("t".to_string(), event(n))).collect();
    bus.publish_many(events).await.expect("publish");
    let x = attempts(&*a1, 6).await;
    let y = attempts(&*a2, 10).await;
    assert_eq!((x.len(), y.len()), (6, 4));
    assert_eq!(x, (0..6).collect::<Vec<_>>(), "oldest first, in order");
    let mut seen: Vec<u32> = x.into_iter().chain(y).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert_eq!(attempts(&*b, 20).await, (0..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_unacked_event_goes_to_another_consumer_then_to_the_dead_letters() {
    let Some((bus, _, _)) = bus("pgb_redeliver", |c| {
        c.visibility_timeout(Duration::from_millis(100))
            .max_deliveries(2)
    })
    .await
    else {
        return;
    };
    let dead = bus.consumer("t", "g", "dead").await.expect("consumer");
    let alive = bus.consumer("t", "g", "alive").await.expect("consumer");
    bus.publish("t", event(7)).await.expect("publish");
    let first = dead.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(first.len(), 1);
    drop(dead);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = alive.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(second.len(), 1, "claimed by the live consumer");
    assert_eq!(second[0].delivery_count, 2);
    assert_eq!(second[0].event.id, first[0].event.id);
    // Not acked again: dead-lettered instead of a third delivery.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(alive.next_batch(1, WAIT).await.expect("batch").is_empty());
    let letters = bus.dead_letters(10).await.expect("dead letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "not acked after 2 deliveries");
    assert_eq!(letters[0].delivery_count, 2);
    assert_eq!(letters[0].group.as_deref(), Some("g"));
    assert!(
        letters[0].body.contains(&first[0].event.id.to_string()),
        "the dead letter keeps the event"
    );
}

/// Each row's holder, deliveries and whether it is leased, in order.
async fn held(pg: &tokio_postgres::Client, schema: &str) -> Vec<(String, i32, bool)> {
    pg.query(
        &format!(
            "SELECT holder, deliveries, visible_at > now() FROM {schema}.messages ORDER BY id"
        ),
        &[],
    )
    .await
    .expect("rows")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Rows published for a topic and group this process consumes are leased
/// to it in the insert and handed over in memory: one delivery counted, no
/// claim, and a handoff kept too long is taken over in the table first.
#[tokio::test]
async fn rows_for_a_consumer_here_are_leased_in_the_insert_and_handed_over() {
    let Some((bus, url, schema)) = bus("pgb_handoff", |c| {
        c.visibility_timeout(Duration::from_millis(400))
    })
    .await
    else {
        return;
    };
    let c = bus.consumer("t", "g", "c").await.expect("consumer");
    bus.publish_many((0..3).map(|n| ("t".to_string(), event(n))).collect())
        .await
        .expect("publish");
    let pg = raw(&url).await;
    let rows = held(&pg, &schema).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (holder, deliveries, leased) in &rows {
        assert!(
            !holder.is_empty(),
            "leased to this process at the insert: {rows:?}"
        );
        assert_eq!(*deliveries, 1, "{rows:?}");
        assert!(leased, "invisible to other processes: {rows:?}");
    }
    assert_eq!(
        bus.lag("t", "g").await.expect("lag"),
        Some(3),
        "waiting to be handed over"
    );
    let first = c.next_batch(2, WAIT).await.expect("batch");
    assert_eq!(
        first.iter().map(|d| d.event.attempt).collect::<Vec<_>>(),
        [0, 1],
        "in order, from memory"
    );
    assert!(first.iter().all(|d| d.delivery_count == 1));
    c.ack(&[first[0].id.clone(), first[1].id.clone()])
        .await
        .expect("ack");
    // The third waits past a quarter of its lease: taken over in the table
    // (the consumer's own name, a whole lease) before it is delivered.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let third = c.next_batch(2, WAIT).await.expect("batch");
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].event.attempt, 2);
    let rows = held(&pg, &schema).await;
    assert_eq!(
        rows,
        [("c".to_string(), 1, true)],
        "taken over by its consumer"
    );
    // Extended by its holder, it stays; acked, it is gone.
    c.extend(&[third[0].id.clone()]).await.expect("extend");
    c.ack(&[third[0].id.clone()]).await.expect("ack");
    assert!(c.next_batch(2, WAIT).await.expect("batch").is_empty());
    assert_eq!(bus.lag("t", "g").await.expect("lag"), Some(0));
}

/// A process that dies holding rows leased to it at their insert (here: a
/// bus dropped with its consumer before taking them) loses nothing: when
/// the leases run out, another process claims them, as their second
/// delivery.
#[tokio::test]
async fn rows_leased_to_a_process_that_dies_go_to_another_when_the_lease_runs_out() {
    let Some((dying, url, schema)) = bus("pgb_handoff_dies", |c| {
        c.visibility_timeout(Duration::from_millis(200))
    })
    .await
    else {
        return;
    };
    let config = PostgresBusConfig::new(&url)
        .schema(&schema)
        .poll_interval(Duration::from_millis(50))
        .visibility_timeout(Duration::from_millis(200));
    let other = PostgresBus::connect(config).await.expect("connects");
    let there = other.consumer("t", "g", "there").await.expect("consumer");
    let here = dying.consumer("t", "g", "here").await.expect("consumer");
    dying
        .publish_many((0..2).map(|n| ("t".to_string(), event(n))).collect())
        .await
        .expect("publish");
    assert!(
        there
            .next_batch(2, Duration::from_millis(50))
            .await
            .expect("batch")
            .is_empty(),
        "leased to the publishing process"
    );
    drop(here);
    drop(dying);
    let mut got = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 2 && std::time::Instant::now() < until {
        got.extend(there.next_batch(2, WAIT).await.expect("batch"));
    }
    let mut attempts: Vec<u32> = got.iter().map(|d| d.event.attempt).collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [0, 1], "both, once each");
    assert!(
        got.iter().all(|d| d.delivery_count == 2),
        "their second delivery"
    );
}

#[tokio::test]
async fn an_extended_entry_stays_with_its_holder_and_a_taken_over_one_is_not_taken_back() {
    let Some((bus, url, schema)) = bus("pgb_extend", |c| {
        c.visibility_timeout(Duration::from_millis(300))
    })
    .await
    else {
        return;
    };
    let holder = bus.consumer("t", "g", "holder").await.expect("consumer");
    let peer = bus.consumer("t", "g", "peer").await.expect("consumer");
    bus.publish("t", event(3)).await.expect("publish");
    let taken = holder.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(taken.len(), 1);
    // Six visibility timeouts, extended every 100 ms: never redelivered.
    for _ in 0..18 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder.extend(&[taken[0].id.clone()]).await.expect("extend");
        assert!(
            peer.next_batch(1, Duration::ZERO)
                .await
                .expect("batch")
                .is_empty()
        );
    }
    // The holder stops extending (it died): the peer takes it over, as
    // the second delivery (extensions count none).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let again = peer.next_batch(1, WAIT).await.expect("batch");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].delivery_count, 2);
    // A late extension by the old holder does not take it back.
    holder.extend(&[taken[0].id.clone()]).await.expect("extend");
    let rows = raw(&url)
        .await
        .query(
            &format!("SELECT holder, deliveries FROM {schema}.messages"),
            &[],
        )
        .await
        .expect("select");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, &str>(0), "peer", "still the peer's");
    assert_eq!(rows[0].get::<_, i32>(1), 2, "extensions count no delivery");
    peer.ack(&[again[0].id.clone()]).await.expect("ack");
}

#[tokio::test]
async fn poison_written_straight_into_the_table_is_dead_lettered_with_the_reason() {
    let Some((bus, url, schema)) = bus("pgb_poison", |c| c.max_event_bytes(4096)).await else {
        return;
    };
    let c = bus.consumer("t", "g", "1").await.expect("consumer");
    let good = serde_json::to_vec(&event(1)).expect("json");
    let mut wrong_kind: serde_json::Value = serde_json::from_slice(&good).expect("json");
    wrong_kind["kind"] = "teleport".into();
    let oversized = serde_json::to_vec(&{
        let mut e = event(2);
        e.payload = Payload::to_json(&"x".repeat(8000)).expect("json");
        e
    })
    .expect("json");
    let client = raw(&url).await;
    let bodies: Vec<Vec<u8>> = vec![
        b"\x00\xffgarbage".to_vec(),
        br#"{"hello":"world"}"#.to_vec(),
        serde_json::to_vec(&wrong_kind).expect("json"),
        oversized,
        good,
    ];
    for body in &bodies {
        client
            .execute(
                &format!("INSERT INTO {schema}.messages (topic, grp, body) VALUES ('t', 'g', $1)"),
                &[body],
            )
            .await
            .expect("insert");
    }
    let batch = c.next_batch(10, WAIT).await.expect("batch");
    assert_eq!(batch.len(), 1, "only the good event is handed over");
    assert_eq!(batch[0].event.attempt, 1);
    let reasons: Vec<String> = bus
        .dead_letters(10)
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].starts_with("undecodable event"), "{reasons:?}");
    assert!(reasons[1].contains("missing field"), "{reasons:?}");
    assert!(reasons[2].contains("teleport"), "{reasons:?}");
    assert!(
        reasons[3].contains("over the 4096-byte limit"),
        "{reasons:?}"
    );
    // They are gone from the table: nothing is redelivered.
    let left: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.messages"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 1, "only the unacked good event is left");
}

#[tokio::test]
async fn refuses_to_publish_oversized_events() {
    let Some((bus, _, _)) = bus("pgb_big", |c| c.max_event_bytes(1000)).await else {
        return;
    };
    let mut e = event(1);
    e.payload = Payload::to_json(&"x".repeat(2000)).expect("json");
    assert!(matches!(
        bus.publish("t", e).await,
        Err(BusError::TooLarge { limit: 1000, .. })
    ));
}

#[tokio::test]
async fn an_unreachable_server_is_reported_with_its_address() {
    let err = PostgresBus::connect(PostgresBusConfig::new(
        "postgres://app@127.0.0.1:1/app?connect_timeout=2",
    ))
    .await
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("postgres://app@127.0.0.1:1/app"), "{msg}");
    assert!(msg.contains("is PostgreSQL running there"), "{msg}");
}

#[tokio::test]
async fn publish_then_ack_publishes_and_acks_in_one_go_or_not_at_all() {
    let Some((bus, url, schema)) = bus("pgb_pubthenack", |c| {
        c.visibility_timeout(Duration::from_millis(100))
    })
    .await
    else {
        return;
    };
    let commands = bus.consumer("in", "g", "c").await.expect("consumer");
    bus.publish_many((1..=3).map(|n| ("in".to_string(), event(n))).collect())
        .await
        .expect("publish");
    let batch = commands.next_batch(10, WAIT).await.expect("batch");
    assert_eq!(batch.len(), 3);
    let ids: Vec<_> = batch.iter().map(|d| d.id.clone()).collect();

    // The server refuses rows for `out` (a trigger raises): nothing is
    // acked, so the commands come again.
    let client = raw(&url).await;
    client
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'no room for %', NEW.topic; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON {schema}.messages
               FOR EACH ROW WHEN (NEW.topic = 'out') EXECUTE FUNCTION {schema}.refuse();"
        ))
        .await
        .expect("trigger");
    let answers: Vec<(String, Event)> = (11..=13).map(|n| ("out".to_string(), event(n))).collect();
    let refused = commands.publish_then_ack(&answers, &ids).await;
    match &refused {
        Err(BusError::Backend { message, .. }) => {
            assert!(message.contains("no room for out"), "{message}")
        }
        other => panic!("not refused: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let again = commands.next_batch(10, WAIT).await.expect("batch");
    assert_eq!(again.len(), 3, "refused answers ack nothing");

    // Once the answers can be published, they are, and the commands are gone.
    client
        .batch_execute(&format!("DROP TRIGGER refuse ON {schema}.messages"))
        .await
        .expect("drop");
    let ids: Vec<_> = again.iter().map(|d| d.id.clone()).collect();
    let out = bus.consumer("out", "g", "c").await.expect("consumer");
    commands
        .publish_then_ack(&answers, &ids)
        .await
        .expect("publish then ack");
    assert_eq!(attempts(&*out, 10).await, vec![11, 12, 13], "in order");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        commands
            .next_batch(10, WAIT)
            .await
            .expect("batch")
            .is_empty()
    );
    let left: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.messages WHERE topic = 'in'"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "acked rows are deleted");
}

#[tokio::test]
async fn a_waiting_consumer_is_woken_by_a_publish_in_another_process() {
    // Polls every 30 s: only the NOTIFY can wake it within the wait.
    let Some((waiting, url, schema)) =
        bus("pgb_wake", |c| c.poll_interval(Duration::from_secs(30))).await
    else {
        return;
    };
    let other = PostgresBus::connect(
        PostgresBusConfig::new(&url)
            .schema(&schema)
            .poll_interval(Duration::from_secs(30)),
    )
    .await
    .expect("connects");
    let c = waiting.consumer("t", "g", "c").await.expect("consumer");
    // The first call looks and finds nothing; the listener is up by then.
    assert!(c.next_batch(1, WAIT).await.expect("batch").is_empty());
    for n in 0..3 {
        let started = std::time::Instant::now();
        let publisher = other.clone();
        let publish = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            publisher.publish("t", event(n)).await.expect("publish");
        });
        let got = c
            .next_batch(1, Duration::from_secs(10))
            .await
            .expect("batch");
        publish.await.expect("published");
        assert_eq!(got.len(), 1, "woken for event {n}");
        assert_eq!(got[0].event.attempt, n);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "woken, not timed out"
        );
        c.ack(&[got[0].id.clone()]).await.expect("ack");
    }
}

#[tokio::test]
async fn a_dead_letter_is_found_by_id_and_settled_once_into_the_audit_log() {
    use multiagents::bus::{DeadLetter, SettleAction, Settlement};
    use multiagents::core::Timestamp;
    let Some((bus, _, _)) = bus("pgb_settle", |c| c).await else {
        return;
    };
    for n in 0..3 {
        bus.dead_letter(DeadLetter {
            id: String::new(),
            topic: "compensations".into(),
            group: None,
            reason: format!("reason {n}"),
            delivery_count: 0,
            at: Timestamp::now(),
            body: format!("{{\"n\":{n}}}"),
        })
        .await
        .expect("dead-lettered");
    }
    let letters = bus.dead_letters(10).await.expect("list");
    assert_eq!(letters.len(), 3);
    let middle = letters[1].clone();
    assert!(!middle.id.is_empty(), "{middle:?}");
    assert_eq!(
        bus.dead_letter_by_id(&middle.id).await.expect("get"),
        Some(middle.clone())
    );
    assert_eq!(bus.dead_letter_by_id("999999").await.expect("get"), None);
    assert_eq!(bus.dead_letter_by_id("not an id").await.expect("get"), None);
    let settlement = Settlement {
        action: SettleAction::Discarded,
        by: "ops".into(),
        note: "a test".into(),
        at: Timestamp::now(),
    };
    // Two at once: one gets it.
    let (a, b) = tokio::join!(
        bus.settle_dead_letter(&middle.id, &settlement),
        bus.settle_dead_letter(&middle.id, &settlement)
    );
    let got: Vec<DeadLetter> = [a.expect("settle"), b.expect("settle")]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(got, vec![middle.clone()]);
    let left: Vec<String> = bus
        .dead_letters(10)
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(left, ["reason 0", "reason 2"]);
    let audit = bus.dead_letter_audit(10).await.expect("audit");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].letter, middle);
    assert_eq!(audit[0].settlement, settlement);
}

#[tokio::test]
async fn lag_counts_what_the_group_has_not_been_handed() {
    let Some((bus, _, _)) = bus("pgb_lag", |c| c).await else {
        return;
    };
    let c = bus.consumer("t", "g", "c").await.expect("consumer");
    bus.publish_many((0..5).map(|n| ("t".to_string(), event(n))).collect())
        .await
        .expect("publish");
    assert_eq!(bus.lag("t", "g").await.expect("lag"), Some(5));
    assert_eq!(c.next_batch(2, WAIT).await.expect("batch").len(), 2);
    assert_eq!(bus.lag("t", "g").await.expect("lag"), Some(3));
}

/// Sagas with nothing but PostgreSQL: its store and its bus.
#[tokio::test]
async fn sagas_run_and_compensate_on_postgres_alone() {
    use multiagents::store::{PostgresStateStore, PostgresStoreConfig};
    use multiagents::worker::{WorkerError, from_fn};
    use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
    let Some((bus, url, schema)) = bus("pgb_saga", |c| c).await else {
        return;
    };
    let store = PostgresStateStore::connect(PostgresStoreConfig::new(&url).schema(&schema))
        .await
        .expect("store");
    let rt = Runtime::builder()
        .bus(multiagents::bus::Bus::new(bus.clone()))
        .store(store)
        .workflow(
            WorkflowBuilder::new("orders")
                .step("reserve", "reserve")
                .compensate_with("release")
                .step("charge", "charge")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("reserve", |_: bool, _| async {
            Ok::<_, WorkerError>("r-1")
        }))
        .worker(from_fn("release", |_: bool, ctx| async move {
            let r: String = ctx.output("reserve").await?;
            Ok::<_, WorkerError>(format!("released {r}"))
        }))
        .worker(from_fn("charge", |decline: bool, _| async move {
            if decline {
                Err(WorkerError::fatal("declined"))
            } else {
                Ok("charged")
            }
        }))
        .start()
        .await
        .expect("starts");
    let client = rt.client();
    let ok = client.start("orders", &false).await.expect("start");
    let declined = client.start("orders", &true).await.expect("start");
    assert_eq!(
        client
            .wait(ok, Duration::from_secs(10))
            .await
            .expect("ends")
            .status,
        WorkflowStatus::Completed
    );
    let state = client
        .wait(declined, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(
        state.status,
        WorkflowStatus::Compensated,
        "{}",
        multiagents::timeline::render(&state)
    );
    assert_eq!(
        state
            .output("reserve")
            .map(|p| p.parse::<String>().expect("text")),
        Some("r-1".to_string())
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn results_for_unknown_transactions_written_into_the_table_are_dead_lettered() {
    use multiagents::store::{PostgresStateStore, PostgresStoreConfig};
    use multiagents::worker::{WorkerError, from_fn};
    use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
    let Some((bus, url, schema)) = bus("pgb_unknown", |c| c).await else {
        return;
    };
    let store = PostgresStateStore::connect(PostgresStoreConfig::new(&url).schema(&schema))
        .await
        .expect("store");
    let rt = Runtime::builder()
        .bus(multiagents::bus::Bus::new(bus.clone()))
        .store(store)
        .workflow(
            WorkflowBuilder::new("w")
                .step("s", "ok")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("ok", |_: (), _| async { Ok::<_, WorkerError>(()) }))
        .start()
        .await
        .expect("starts");
    let mut stray = Event::new(
        EventKind::Result,
        TransactionId::new(),
        CorrelationId::new(),
        "w".into(),
        Payload::null(),
    );
    stray.step = Some("s".into());
    let client = raw(&url).await;
    for body in [
        serde_json::to_vec(&stray).expect("json"),
        b"not an event".to_vec(),
    ] {
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.messages (topic, grp, body) VALUES ('results', 'orchestrators', $1)"
                ),
                &[&body],
            )
            .await
            .expect("insert");
    }
    // The orchestrator keeps working.
    let tx = rt.client().start("w", &()).await.expect("start");
    assert_eq!(
        rt.client()
            .wait(tx, Duration::from_secs(10))
            .await
            .expect("ends")
            .status,
        WorkflowStatus::Completed
    );
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = bus
            .dead_letters(10)
            .await
            .expect("dead letters")
            .into_iter()
            .map(|d| d.reason)
            .collect();
        if reasons.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reasons
            .iter()
            .any(|r| r == &format!("unknown transaction {}", stray.transaction_id)),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("undecodable event")),
        "{reasons:?}"
    );
    rt.shutdown().await;
}

/// With the store carrying the bus's events, a transition's commands are
/// inserted by the very transaction that writes its state (a new run's
/// first commands by its create): every command row shares its
/// transaction id with a write of a workflow row.
#[tokio::test]
async fn a_transitions_commands_commit_in_the_transaction_of_its_state() {
    use multiagents::store::{PostgresStateStore, PostgresStoreConfig};
    use multiagents::worker::{WorkerError, from_fn};
    use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
    let Some((bus, url, schema)) = bus("pgb_carry", |c| c).await else {
        return;
    };
    let store = PostgresStateStore::connect(PostgresStoreConfig::new(&url).schema(&schema))
        .await
        .expect("store");
    // A bus of another schema cannot share a transaction with it.
    let elsewhere = PostgresBus::connect(
        PostgresBusConfig::new(&url).schema(common::unique_schema("pgb_carry_other")),
    )
    .await
    .expect("bus");
    let refused = store.carry_events_of(&elsewhere).expect_err("refused");
    assert!(refused.to_string().contains("schema"), "{refused}");
    store.carry_events_of(&bus).expect("same server and schema");

    let client = raw(&url).await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.seen (what text, topic text, xid bigint, tx text, kind text,
                 deliveries int);
             CREATE FUNCTION {schema}.note_message() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO {schema}.seen VALUES ('message', NEW.topic, txid_current()); RETURN NEW; END $$;
             CREATE FUNCTION {schema}.note_workflow() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO {schema}.seen VALUES ('workflow', '', txid_current(), NEW.tx::text);
                  RETURN NEW; END $$;
             CREATE TRIGGER note AFTER INSERT ON {schema}.messages
               FOR EACH ROW EXECUTE FUNCTION {schema}.note_message();
             CREATE TRIGGER note AFTER INSERT OR UPDATE ON {schema}.workflows
               FOR EACH ROW EXECUTE FUNCTION {schema}.note_workflow();
             CREATE FUNCTION {schema}.note_gone() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO {schema}.seen VALUES ('gone', OLD.topic, txid_current(),
                    convert_from(OLD.body, 'UTF8')::json->>'transaction_id',
                    convert_from(OLD.body, 'UTF8')::json->>'kind', OLD.deliveries);
                  RETURN OLD; END $$;
             CREATE TRIGGER gone AFTER DELETE ON {schema}.messages
               FOR EACH ROW EXECUTE FUNCTION {schema}.note_gone();"
        ))
        .await
        .expect("triggers");
    let rt = Runtime::builder()
        .bus(multiagents::bus::Bus::new(bus.clone()))
        .store(store)
        .workflow(
            WorkflowBuilder::new("three")
                .step("a", "ok")
                .step("b", "ok")
                .step("c", "ok")
                .build()
                .expect("valid"),
        )
        // A sub-workflow's first commands go with its create too.
        .workflow(
            WorkflowBuilder::new("parent")
                .step("p", "ok")
                .sub_workflow("kid", "three")
                .build()
                .expect("valid"),
        )
        // And a retried run's.
        .workflow(
            WorkflowBuilder::new("once")
                .step("x", "fails_once")
                .build()
                .expect("valid"),
        )
        .worker(from_fn("ok", |_: serde_json::Value, _| async {
            Ok::<_, WorkerError>(1)
        }))
        .worker(from_fn("fails_once", {
            let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            move |_: serde_json::Value, _| {
                let first = !failed.swap(true, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if first {
                        Err(WorkerError::fatal("not yet"))
                    } else {
                        Ok(2)
                    }
                }
            }
        }))
        .start()
        .await
        .expect("starts");
    let runs: Vec<TransactionId> = {
        let mut v = Vec::new();
        for n in 0..5 {
            v.push(rt.client().start("three", &n).await.expect("start"));
        }
        v.push(rt.client().start("parent", &0).await.expect("start"));
        v
    };
    for tx in runs {
        let state = rt
            .client()
            .wait(tx, Duration::from_secs(10))
            .await
            .expect("ends");
        assert_eq!(state.status, WorkflowStatus::Completed);
    }
    let once = rt.client().start("once", &0).await.expect("start");
    let failed = rt
        .client()
        .wait(once, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_ne!(failed.status, WorkflowStatus::Completed);
    let retried = rt
        .client()
        .retry(once, Default::default())
        .await
        .expect("retried");
    let state = rt
        .client()
        .wait(retried, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(state.status, WorkflowStatus::Completed);
    rt.shutdown().await;
    let apart: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.seen m WHERE m.what = 'message'
                   AND m.topic LIKE 'commands.%'
                   AND NOT EXISTS (SELECT 1 FROM {schema}.seen w
                                   WHERE w.what = 'workflow' AND w.xid = m.xid)"
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    let commands: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.seen WHERE what = 'message' AND topic LIKE 'commands.%'"
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        commands, 21,
        "three commands for each of five runs, one for the parent, three for its \
         sub-workflow, one for the failed run and one for its retry"
    );
    // The first with the run's create (of a sub-workflow and of a retry
    // too), every later one with its state.
    assert_eq!(apart, 0, "every command committed with a workflow write");
    let notes: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.unpublished"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(notes, 0, "nothing was left to publish after a write");
    // The orchestrator's acks of the results it applied: deleted with a
    // later write, or by themselves after a short wait; none left behind.
    let results =
        format!("SELECT count(*) FROM {schema}.messages WHERE topic NOT LIKE 'commands.%'");
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let mut left: i64 = 1;
    while left > 0 && std::time::Instant::now() < until {
        left = client.query_one(&results, &[]).await.expect("count").get(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "every result acked");
    let with_writes: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.seen g WHERE g.what = 'gone'
                   AND g.topic NOT LIKE 'commands.%'
                   AND EXISTS (SELECT 1 FROM {schema}.seen w
                               WHERE w.what = 'workflow' AND w.xid = g.xid)"
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(
        with_writes > 0,
        "acks went with the writes that followed them"
    );
    // A result (or error) is deleted by the very write that applied it:
    // the transaction that deleted its row wrote its workflow. (One
    // delivered again, after a lease ran out, changes nothing and is acked
    // by itself.)
    let results: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.seen WHERE what = 'gone'
                   AND kind IN ('result', 'error') AND deliveries <= 1"
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    let acked_apart: Vec<String> = client
        .query(
            &format!(
                "SELECT g.tx || ' ' || g.kind FROM {schema}.seen g WHERE g.what = 'gone'
                   AND g.kind IN ('result', 'error') AND g.deliveries <= 1
                   AND NOT EXISTS (SELECT 1 FROM {schema}.seen w
                                   WHERE w.what = 'workflow' AND w.xid = g.xid AND w.tx = g.tx)"
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(results >= 21, "a result for each command: {results}");
    assert!(
        acked_apart.is_empty(),
        "results deleted apart from the write that applied them: {acked_apart:?}"
    );
}

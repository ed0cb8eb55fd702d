//! The Redis Streams bus against a real Redis: the same contract as the
//! in-memory bus, plus poison entries written straight into the streams.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use multiagents::bus::{BusError, RedisBusConfig, RedisStreamsBus, Topics};
use multiagents::core::{CorrelationId, Event, EventKind, Payload, TransactionId, WorkflowName};
use redis::AsyncCommands;

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

async fn bus(
    name: &str,
    tweak: impl FnOnce(RedisBusConfig) -> RedisBusConfig,
) -> Option<(RedisStreamsBus, String, String)> {
    let url = common::redis_url()?;
    let prefix = common::unique_prefix(name);
    let bus = RedisStreamsBus::connect(tweak(RedisBusConfig::new(&url).prefix(&prefix)))
        .await
        .expect("connects");
    Some((bus, url, prefix))
}

#[tokio::test]
async fn keeps_events_published_before_any_group_and_acks_them_away() {
    let Some((bus, _, _)) = bus("backlog", |c| c).await else {
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
async fn consumers_of_one_group_share_the_events() {
    let Some((bus, _, _)) = bus("share", |c| c).await else {
        return;
    };
    let a1 = bus.consumer("t", "a", "1").await.expect("consumer");
    let a2 = bus.consumer("t", "a", "2").await.expect("consumer");
    let events: Vec<(String, Event)> = (0..10).map(|n| ("t".to_string(), event(n))).collect();
    bus.publish_many(events).await.expect("publish");
    let x = a1.next_batch(6, WAIT).await.expect("batch");
    let y = a2.next_batch(10, WAIT).await.expect("batch");
    assert_eq!((x.len(), y.len()), (6, 4));
    let mut seen: Vec<u32> = x.iter().chain(y.iter()).map(|d| d.event.attempt).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_unacked_event_goes_to_another_consumer_then_to_the_dead_letters() {
    let Some((bus, _, _)) = bus("redeliver", |c| {
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
    assert!(
        letters[0].body.contains(&first[0].event.id.to_string()),
        "the dead letter keeps the entry"
    );
}

#[tokio::test]
async fn an_extended_entry_stays_with_its_holder_and_a_taken_over_one_is_not_taken_back() {
    let Some((bus, url, prefix)) = bus("extend", |c| {
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
    let mut conn = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(format!("{{{prefix}:t}}"))
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut conn)
        .await
        .expect("xpending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].1, "peer", "still the peer's: {pending:?}");
    assert_eq!(pending[0].3, 2, "extensions count no delivery");
    peer.ack(&[again[0].id.clone()]).await.expect("ack");
}

#[tokio::test]
async fn poison_written_straight_into_a_stream_is_dead_lettered_with_the_reason() {
    let Some((bus, url, prefix)) = bus("poison", |c| c.max_event_bytes(4096)).await else {
        return;
    };
    let c = bus.consumer("t", "g", "1").await.expect("consumer");
    let key = format!("{{{prefix}:t}}");
    let mut raw = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let good = serde_json::to_vec(&event(1)).expect("json");
    let mut wrong_kind: serde_json::Value = serde_json::from_slice(&good).expect("json");
    wrong_kind["kind"] = "teleport".into();
    let oversized = serde_json::to_vec(&{
        let mut e = event(2);
        e.payload = Payload::to_json(&"x".repeat(8000)).expect("json");
        e
    })
    .expect("json");
    let _: String = raw
        .xadd(&key, "*", &[("e", b"\x00\xffgarbage".to_vec())])
        .await
        .expect("xadd");
    let _: String = raw
        .xadd(&key, "*", &[("e", br#"{"hello":"world"}"#.to_vec())])
        .await
        .expect("xadd");
    let _: String = raw
        .xadd(
            &key,
            "*",
            &[("e", serde_json::to_vec(&wrong_kind).expect("json"))],
        )
        .await
        .expect("xadd");
    let _: String = raw
        .xadd(&key, "*", &[("e", oversized)])
        .await
        .expect("xadd");
    let _: String = raw
        .xadd(&key, "*", &[("other", b"field".to_vec())])
        .await
        .expect("xadd");
    let _: String = raw.xadd(&key, "*", &[("e", good)]).await.expect("xadd");
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
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons[0].starts_with("undecodable event"), "{reasons:?}");
    assert!(reasons[1].contains("missing field"), "{reasons:?}");
    assert!(reasons[2].contains("teleport"), "{reasons:?}");
    assert!(
        reasons[3].contains("over the 4096-byte limit"),
        "{reasons:?}"
    );
    assert_eq!(reasons[4], "entry has no `e` field");
    // They are gone from the stream: nothing is redelivered.
    let len: usize = raw.xlen(&key).await.expect("xlen");
    assert_eq!(len, 1, "only the unacked good event is left");
}

#[tokio::test]
async fn refuses_to_publish_oversized_events() {
    let Some((bus, _, _)) = bus("big", |c| c.max_event_bytes(1000)).await else {
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
    let err = RedisStreamsBus::connect(RedisBusConfig::new("redis://127.0.0.1:1/"))
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("redis://127.0.0.1:1/"), "{msg}");
}

#[tokio::test]
async fn sagas_run_and_compensate_over_redis_streams() {
    use multiagents::worker::{WorkerError, from_fn};
    use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
    let Some((bus, _, _)) = bus("saga", |c| c).await else {
        return;
    };
    let rt = Runtime::builder()
        .bus(bus.clone())
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
    rt.shutdown().await;
}

#[tokio::test]
async fn pub_sub_status_reaches_listeners_and_is_lost_when_nobody_listens() {
    use multiagents::bus::RedisPubSubBus;
    let Some(url) = common::redis_url() else {
        return;
    };
    let channel = format!("{}:status", common::unique_prefix("pubsub"));
    let publisher = RedisPubSubBus::connect(&url, &channel)
        .await
        .expect("connects");
    let listener = RedisPubSubBus::connect(&url, &channel)
        .await
        .expect("connects");
    // Published before anyone subscribed: gone, by design.
    publisher.broadcast(&event(1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rx = listener.subscribe();
    assert!(
        listener.subscribed(Duration::from_secs(5)).await,
        "subscription is up"
    );
    publisher.broadcast(&event(2));
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time")
        .expect("received");
    assert_eq!(
        got.attempt, 2,
        "the first message was published to nobody and is lost"
    );
}

#[tokio::test]
async fn a_streams_bus_with_broadcast_status_sends_workflow_status_over_pub_sub() {
    use multiagents::worker::{WorkerError, from_fn};
    use multiagents::{Runtime, WorkflowBuilder};
    let Some((bus, url, prefix)) = bus("status", |mut c| {
        c.broadcast_status = true;
        c
    })
    .await
    else {
        return;
    };
    // Another process's view: a separate subscriber on the same channel.
    let watcher = multiagents::bus::RedisPubSubBus::connect(&url, format!("{prefix}:status"))
        .await
        .expect("connects");
    let mut rx = watcher.subscribe();
    assert!(watcher.subscribed(Duration::from_secs(5)).await);
    let rt = Runtime::builder()
        .bus(bus)
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
    let tx = rt.client().start("w", &()).await.expect("start");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("received");
        if e.transaction_id == tx {
            let update: serde_json::Value = e.payload.parse().expect("json");
            seen.push(update["event"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(seen, ["started", "step_completed", "finished"]);
    rt.shutdown().await;
}

#[tokio::test]
async fn results_for_unknown_transactions_written_into_redis_are_dead_lettered() {
    use multiagents::worker::{WorkerError, from_fn};
    use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
    let Some((bus, url, prefix)) = bus("unknown", |c| c).await else {
        return;
    };
    let rt = Runtime::builder()
        .bus(bus.clone())
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
    let mut raw = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let mut stray = Event::new(
        EventKind::Result,
        TransactionId::new(),
        CorrelationId::new(),
        "w".into(),
        Payload::null(),
    );
    stray.step = Some("s".into());
    let results = format!("{{{prefix}:results}}");
    let _: String = raw
        .xadd(
            &results,
            "*",
            &[("e", serde_json::to_vec(&stray).expect("json"))],
        )
        .await
        .expect("xadd");
    let _: String = raw
        .xadd(&results, "*", &[("e", b"not an event".to_vec())])
        .await
        .expect("xadd");
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

#[tokio::test]
async fn publish_then_ack_publishes_and_acks_in_one_go_or_not_at_all() {
    let Some((bus, url, prefix)) = bus("pubthenack", |c| {
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

    // The server refuses the publish (the target is not a stream): nothing
    // is acked, so the commands come again.
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let blocked = format!("{{{prefix}:out}}");
    let _: () = raw.set(&blocked, "not a stream").await.expect("set");
    let answers: Vec<(String, Event)> = (11..=13).map(|n| ("out".to_string(), event(n))).collect();
    assert!(matches!(
        commands.publish_then_ack(&answers, &ids).await,
        Err(BusError::Backend { .. })
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let again = commands.next_batch(10, WAIT).await.expect("batch");
    assert_eq!(again.len(), 3, "refused answers ack nothing");

    // Once the answers can be published, they are, and the commands are gone.
    let _: () = raw.del(&blocked).await.expect("del");
    let ids: Vec<_> = again.iter().map(|d| d.id.clone()).collect();
    commands
        .publish_then_ack(&answers, &ids)
        .await
        .expect("publish then ack");
    let out = bus.consumer("out", "g", "c").await.expect("consumer");
    let got: Vec<u32> = out
        .next_batch(10, WAIT)
        .await
        .expect("batch")
        .iter()
        .map(|d| d.event.attempt)
        .collect();
    assert_eq!(got, vec![11, 12, 13], "published in order");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        commands
            .next_batch(10, WAIT)
            .await
            .expect("batch")
            .is_empty()
    );
    let left: usize = raw.xlen(format!("{{{prefix}:in}}")).await.expect("xlen");
    assert_eq!(left, 0, "acked entries are deleted");
}

#[tokio::test]
async fn a_dead_letter_is_found_by_id_and_settled_once_into_the_audit_log() {
    use multiagents::bus::{DeadLetter, SettleAction, Settlement};
    use multiagents::core::Timestamp;
    let Some((bus, _, _)) = bus("settle", |c| c).await else {
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
    assert_eq!(bus.dead_letter_by_id("0-1").await.expect("get"), None);
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

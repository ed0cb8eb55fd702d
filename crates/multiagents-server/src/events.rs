//! Server-Sent Events: one run's history as it grows
//! (`GET /v1/runs/{id}/events`) and every run's status changes
//! (`GET /v1/events`), both resumable with `Last-Event-ID`.
//!
//! A run's stream is its history: event `N` is history entry `N`, read from
//! the store, so it resumes exactly, in any replica, after any restart. The
//! all-runs stream is the status broadcasts this service hears, kept in a
//! ring of the last [`RING`] in memory; its ids are `BOOT-SEQ`, and an id
//! from another process or one that has fallen out of the ring gets a
//! `reset` event first (list the runs again, then follow the stream).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::extract::{Path, Query};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use multiagents::bus::Bus;
use multiagents::core::saga::StatusUpdate;
use multiagents::core::{EventKind, Timestamp, TransactionId};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::{Problem, Service};

/// How many status changes the all-runs stream keeps for clients that
/// resume.
pub(crate) const RING: usize = 10_000;

/// How often a run's stream reads the run when no broadcast woke it
/// (broadcasts are fire-and-forget, and not every history entry has one).
const POLL: Duration = Duration::from_secs(1);

/// One status change of the ring: its number, its data and its workflow
/// (none for a gap).
type Entry = (u64, Arc<str>, Option<Arc<str>>);

/// The status changes this service heard, numbered.
pub(crate) struct Feed {
    boot: u64,
    ring: Mutex<VecDeque<Entry>>,
    latest: watch::Sender<u64>,
}

impl Feed {
    /// A feed of `bus`'s status broadcasts, filled by a task of the current
    /// Tokio runtime (none outside one: the feed then stays empty).
    pub(crate) fn start(bus: &Bus) -> Arc<Feed> {
        let feed = Arc::new(Feed {
            boot: Timestamp::now().as_millis(),
            ring: Mutex::new(VecDeque::new()),
            latest: watch::channel(0).0,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let rx = bus.notifier.subscribe_status();
            handle.spawn(fill(Arc::downgrade(&feed), rx));
        }
        feed
    }

    fn push(&self, data: String, workflow: Option<Arc<str>>) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let seq = ring.back().map_or(1, |(s, _, _)| s + 1);
        if ring.len() >= RING {
            ring.pop_front();
        }
        ring.push_back((seq, data.into(), workflow));
        drop(ring);
        self.latest.send_replace(seq);
    }

    /// The entries after `seq`, or `None` when some of them have left the
    /// ring.
    fn after(&self, seq: u64) -> Option<Vec<Entry>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        match ring.front() {
            Some((first, _, _)) if *first > seq + 1 => None,
            _ => Some(ring.iter().filter(|(s, _, _)| *s > seq).cloned().collect()),
        }
    }

    fn last(&self) -> u64 {
        *self.latest.borrow()
    }
}

async fn fill(feed: Weak<Feed>, mut rx: broadcast::Receiver<Arc<multiagents::core::Event>>) {
    loop {
        let event = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let Some(feed) = feed.upgrade() else { return };
                feed.push(json!({"gap": missed}).to_string(), None);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(feed) = feed.upgrade() else { return };
        if event.kind != EventKind::Status || event.transaction_id.as_uuid().is_nil() {
            continue;
        }
        let Ok(update) = event.payload.parse::<StatusUpdate>() else {
            continue;
        };
        let data = json!({
            "transaction_id": event.transaction_id,
            "workflow": event.workflow,
            "correlation_id": event.correlation_id,
            "at": event.created_at,
            "url": format!("/v1/runs/{}", event.transaction_id),
            "update": update,
        });
        feed.push(data.to_string(), Some(Arc::from(event.workflow.as_str())));
    }
}

fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[derive(Deserialize)]
pub(crate) struct EventsQuery {
    workflow: Option<String>,
}

/// `GET /v1/events[?workflow=NAME]`: every run's status changes as they
/// happen.
pub(crate) async fn all(
    State(service): State<Service>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let feed = service.feed().clone();
    let boot = feed.boot;
    // Where the client was, when it was in this process's stream.
    let (mut seq, mut reset) = match last_event_id(&headers) {
        None => (feed.last(), None),
        Some(id) => match id
            .split_once('-')
            .and_then(|(b, s)| Some((b.parse::<u64>().ok()?, s.parse::<u64>().ok()?)))
        {
            Some((b, s)) if b == boot => (s, None),
            _ => (
                feed.last(),
                Some(
                    "the stream was restarted or the id is not from this service: list the runs again",
                ),
            ),
        },
    };
    let mut latest = feed.latest.subscribe();
    let stream = async_stream(move |tx| async move {
        if let Some(why) = reset.take() {
            let _ = tx
                .send(
                    SseEvent::default()
                        .event("reset")
                        .data(json!({"reason": why}).to_string()),
                )
                .await;
        }
        loop {
            match feed.after(seq) {
                None => {
                    let _ = tx.send(SseEvent::default().event("reset").data(
                        json!({"reason": "the stream moved on past this id: list the runs again"})
                            .to_string(),
                    )).await;
                    seq = feed.last();
                }
                Some(entries) => {
                    for (s, data, workflow) in entries {
                        seq = s;
                        let wanted = q
                            .workflow
                            .as_deref()
                            .is_none_or(|w| workflow.as_deref().is_none_or(|name| name == w));
                        if !wanted {
                            continue;
                        }
                        let kind = if workflow.is_some() { "status" } else { "gap" };
                        let event = SseEvent::default()
                            .event(kind)
                            .id(format!("{boot}-{s}"))
                            .data(&*data);
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if latest.changed().await.is_err() {
                return;
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /v1/runs/{id}/events`: the run's history, entry by entry (event id
/// = the entry's index), then each new entry as it is written; `end` once
/// the run has finished.
pub(crate) async fn run(
    State(service): State<Service>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id: TransactionId = id
        .parse()
        .map_err(|e| Problem::bad_request("path.id", format!("`{id}` is not a run id: {e}")))?;
    let mut next = match last_event_id(&headers) {
        None => 0,
        Some(text) => {
            text.parse::<usize>().map_err(|_| {
                Problem::bad_request(
                    "header.Last-Event-ID",
                    format!("`{text}` is not the index of a history entry"),
                )
            })? + 1
        }
    };
    // Subscribed before the first read, so no change between is missed.
    let mut wake = service.tasks().bus().notifier.subscribe_status();
    if service.client().status(id).await?.is_none() {
        return Err(Problem::not_found(format!(
            "no run {id} (it may have expired)"
        )));
    }
    let client = service.client().clone();
    let stream =
        async_stream(move |tx| async move {
            loop {
                let state =
                    match client.status(id).await {
                        Ok(Some(s)) => s,
                        Ok(None) => {
                            let _ = tx.send(SseEvent::default().event("end").data(
                        json!({"id": id, "status": null, "reason": "the run expired"}).to_string(),
                    )).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx
                                .send(
                                    SseEvent::default()
                                        .event("error")
                                        .data(json!({"detail": e.to_string()}).to_string()),
                                )
                                .await;
                            tokio::time::sleep(POLL).await;
                            continue;
                        }
                    };
                for (index, entry) in state.history.iter().enumerate().skip(next) {
                    let mut data = serde_json::to_value(entry).unwrap_or_default();
                    data["index"] = json!(index);
                    data["status"] = json!(state.status);
                    let event = SseEvent::default()
                        .event("history")
                        .id(index.to_string())
                        .data(data.to_string());
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                next = next.max(state.history.len());
                if state.is_terminal() {
                    let _ = tx.send(SseEvent::default().event("end").data(
                    json!({"id": id, "status": state.status, "url": format!("/v1/runs/{id}")})
                        .to_string(),
                )).await;
                    return;
                }
                // Until a broadcast about this run, or the next look.
                let _ = tokio::time::timeout(POLL, async {
                    loop {
                        match wake.recv().await {
                            Ok(e) if e.transaction_id == id => return,
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => {
                                return std::future::pending().await;
                            }
                        }
                    }
                })
                .await;
                if tx.is_closed() {
                    return;
                }
            }
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A stream of what `produce` sends, produced by a task that waits while
/// the client is slow and stops when it goes away (its sends fail).
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(produce(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

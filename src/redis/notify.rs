//! Fire-and-forget messages over Pub/Sub: interrupts always, status
//! broadcasts with `broadcast_status`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::bus::RedisStreamsBus;
use super::conn::{client, follow_channel, redacted};
use crate::bus::{BusError, Interrupt, Notifier};
use crate::core::{Event, EventCodec};

#[async_trait]
impl Notifier for RedisStreamsBus {
    fn broadcast(&self, event: Event) {
        match &self.inner.pubsub {
            Some(pubsub) => pubsub.broadcast(&event),
            None => {
                if self.inner.status.receiver_count() > 0 {
                    let _ = self.inner.status.send(Arc::new(event));
                }
            }
        }
    }

    fn has_status_listeners(&self) -> bool {
        self.inner.pubsub.is_some() || self.inner.status.receiver_count() > 0
    }

    fn subscribe_status(&self) -> broadcast::Receiver<Arc<Event>> {
        match &self.inner.pubsub {
            Some(pubsub) => pubsub.subscribe(),
            None => self.inner.status.subscribe(),
        }
    }

    async fn interrupt(&self, interrupt: Interrupt) -> Result<(), BusError> {
        let body = serde_json::to_vec(&interrupt).map_err(|e| BusError::Backend {
            address: self.inner.address.clone(),
            message: e.to_string(),
        })?;
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH")
            .arg(self.interrupt_channel())
            .arg(body)
            .ignore();
        self.run(&pipe).await
    }

    fn subscribe_interrupts(&self) -> broadcast::Receiver<Interrupt> {
        let rx = self.inner.interrupts.subscribe();
        let me = self.clone();
        self.inner.interrupts_listening.call_once(|| {
            tokio::spawn(async move {
                let inner = &me.inner;
                follow_channel(
                    &inner.client,
                    &me.interrupt_channel(),
                    &inner.address,
                    |_| {},
                    |payload| match serde_json::from_slice::<Interrupt>(payload) {
                        Ok(i) => {
                            let _ = inner.interrupts.send(i);
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable interrupt ignored"),
                    },
                )
                .await
            });
        });
        rx
    }
}

/// Status broadcast over Redis Pub/Sub: **fire-and-forget**. Redis keeps
/// nothing: a message published while nobody is subscribed, or while a
/// subscriber reconnects, is lost. That is why commands and results never go
/// through it — only status events (workflow started, step done, finished)
/// that dashboards and tails may miss without harm.
#[derive(Clone)]
pub struct RedisPubSubBus {
    pub(super) inner: Arc<PubSubInner>,
}

pub(super) struct PubSubInner {
    pub(super) client: redis::Client,
    /// To the one task that publishes, in order.
    pub(super) outbox: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    pub(super) address: String,
    pub(super) channel: String,
    pub(super) codec: EventCodec,
    pub(super) local: broadcast::Sender<Arc<Event>>,
    pub(super) listening: std::sync::Once,
    pub(super) subscribed: tokio::sync::watch::Sender<bool>,
}

impl RedisPubSubBus {
    /// Connects to `url`; status events go to `channel`.
    pub async fn connect(url: &str, channel: impl Into<String>) -> Result<Self, BusError> {
        Self::connect_with(url, None, channel).await
    }

    /// Connects to `url`, trusting the CA certificates of `ca_file` as well
    /// (see [`RedisBusConfig::ca_file`](super::RedisBusConfig::ca_file)); status events go to `channel`.
    pub async fn connect_with(
        url: &str,
        ca_file: Option<&std::path::Path>,
        channel: impl Into<String>,
    ) -> Result<Self, BusError> {
        let address = redacted(url);
        let backend = |e: redis::RedisError| BusError::Backend {
            address: address.clone(),
            message: e.to_string(),
        };
        let (client, _) = client(url, ca_file).map_err(|message| BusError::Backend {
            address: address.clone(),
            message,
        })?;
        let conn = tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager())
            .await
            .map_err(|_| BusError::Backend {
                address: address.clone(),
                message: "connection timed out".into(),
            })?
            .map_err(backend)?;
        let (local, _) = broadcast::channel(4096);
        let (subscribed, _) = tokio::sync::watch::channel(false);
        let (outbox, mut queue) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let publish_channel: String = channel.into();
        let channel = publish_channel.clone();
        tokio::spawn(async move {
            let mut conn = conn;
            while let Some(first) = queue.recv().await {
                // Whatever queued meanwhile goes in the same round trip, in order.
                let mut pipe = redis::pipe();
                pipe.cmd("PUBLISH")
                    .arg(&publish_channel)
                    .arg(first)
                    .ignore();
                while let Ok(more) = queue.try_recv() {
                    pipe.cmd("PUBLISH").arg(&publish_channel).arg(more).ignore();
                }
                let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
            }
        });
        Ok(Self {
            inner: Arc::new(PubSubInner {
                client,
                outbox,
                address,
                channel,
                codec: EventCodec::default(),
                local,
                listening: std::sync::Once::new(),
                subscribed,
            }),
        })
    }

    /// Publishes a status event, without waiting and without any guarantee.
    pub fn broadcast(&self, event: &Event) {
        let Ok(bytes) = self.inner.codec.encode(event) else {
            return;
        };
        let _ = self.inner.outbox.send(bytes);
    }

    /// Receives status events from now on (once the subscription is up; see
    /// [`RedisPubSubBus::subscribed`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        let rx = self.inner.local.subscribe();
        let me = self.clone();
        self.inner.listening.call_once(|| {
            tokio::spawn(async move { me.listen().await });
        });
        rx
    }

    /// Waits until the subscription is active (at most `timeout`); returns
    /// whether it is.
    pub async fn subscribed(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.subscribed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn listen(&self) {
        let inner = &self.inner;
        follow_channel(
            &inner.client,
            &inner.channel,
            &inner.address,
            |up| {
                // Kept even with no one waiting yet (`send` would drop it).
                inner.subscribed.send_replace(up);
            },
            |payload| match inner.codec.decode(payload) {
                Ok(event) => {
                    let _ = inner.local.send(Arc::new(event));
                }
                Err(e) => tracing::warn!(error = %e, "undecodable status broadcast ignored"),
            },
        )
        .await
    }
}

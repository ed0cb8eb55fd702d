//! Redis: the production backend for several processes on one Redis (or a
//! Redis Cluster), with the `redis` feature. One connection layer serves
//! every part:
//!
//! | module | what | implements |
//! | --- | --- | --- |
//! | `conn` | clients over TCP or TLS, a small pool, Cluster routing, Pub/Sub subscriptions | — |
//! | `bus` | [`RedisStreamsBus`]: topics as streams | [`Topics`](crate::bus::Topics) |
//! | `consumer` | a consumer in a stream's group: leases, takeover, dead letters | [`Consumer`](crate::bus::Consumer) |
//! | `limits` | places and rates in sorted sets | [`SharedLimits`](crate::bus::SharedLimits) |
//! | `notify` | interrupts and status over Pub/Sub; [`RedisPubSubBus`] | [`Notifier`](crate::bus::Notifier) |
//! | `store` | [`RedisStateStore`]: states, timers, definitions, heartbeats | the four [store](crate::store) traits |
//!
//! Key layout (prefix `ma` by default; every key carries a `{…}` hash tag so
//! that each script's keys share one Cluster slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{ma:<topic>}` | stream | the topic's events, one entry each, field `e` = the encoded event |
//! | `{ma:dead-letters}` | stream | dead letters: `topic`, `group`, `reason`, `deliveries`, `at`, `body` |
//! | `{ma:limits:<worker>}held`, `…starts`, `…seq` | sorted sets, counter | shared places: leases, recent starts, lease numbers |
//! | `ma:status` | Pub/Sub channel | status broadcasts (only with `broadcast_status`) |
//! | `ma:interrupts` | Pub/Sub channel | interrupts for steps in flight (best effort) |
//! | `{ma:wf:<transaction>}` | hash | `v` version, `h` head, `in` input, `s:<step>` step, `i:<step>[k]` branch, `h:<n>` history entries from *n*, `hn` their count ([parts](crate::core::saga::parts)); `st` status, `wf` workflow, `sa` started, `up` updated (ms), `co` correlation; `s` the whole state JSON in the layout before parts |
//! | `{ma:timers}` | sorted set | transaction ids scored by next wakeup (ms) |
//! | `{ma:workers}` | hash | `worker@instance` → the latest heartbeat (JSON); stale ones are dropped when read |
//! | `{ma:index}` | sorted set | transaction ids scored by start (ms), for listing; `expire` drops those whose hash has expired |
//! | `{ma:defs}` | hash | `name@version` → definition JSON |
//! | `ma:finished` | Pub/Sub channel | transaction ids as they finish (wakes waiting clients) |

mod bus;
mod conn;
mod consumer;
mod limits;
mod notify;
mod store;

pub use bus::{RedisBusConfig, RedisStreamsBus};
pub use conn::{RedisConnection, connect, connect_with, redacted};
pub use notify::RedisPubSubBus;
pub use store::{RedisStateStore, RedisStoreConfig};

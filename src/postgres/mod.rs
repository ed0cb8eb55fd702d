//! PostgreSQL (feature `postgres`): a state store and a bus for teams that
//! run only PostgreSQL, or the store beside a Redis bus.
//!
//! | module | what | implements |
//! | --- | --- | --- |
//! | `conn` | a pool (deadpool-postgres) over TCP, a Unix socket or TLS (rustls on ring); connections of their own for `LISTEN` | — |
//! | `schema` | the tables, created and migrated by the store under an advisory lock | — |
//! | `store` | [`PostgresStateStore`]: states, timers, definitions, heartbeats; with [`PostgresStateStore::carry_events_of`], a transition's events in its state's transaction | the four [store](crate::store) traits |
//! | `bus` | [`PostgresBus`]: topics as rows claimed with `SKIP LOCKED` under a lease | [`Topics`](crate::bus::Topics) |
//!
//! Tables, in the configured schema (`multiagents` by default):
//!
//! | table | holds |
//! | --- | --- |
//! | `workflows` | one row per workflow: `version` (compare-and-set), `workflow`, `def_version`, `status`, `correlation_id`, `started_at`, `updated_at`, `finished_at` (ms), `history_len`; indexed for the API's listings; fillfactor 70, so that most writes are HOT updates |
//! | `timers` | `tx → (wakeup, lease)`: the workflow's next timer and the lease of the orchestrator firing it |
//! | `parts` | `(tx, field) → value`: the head, steps, branches, history batches and payloads kept apart, named as in the [fields layout](crate::store) shared with Redis |
//! | `unpublished` | `(tx, version, at)`: writes whose commands were not yet marked published (the recovery sweep's list) |
//! | `definitions` | `(name, version) → body` (JSON) |
//! | `workers` | unlogged: `worker@instance → (at, body)`, the latest heartbeat |
//! | `messages` | the bus: `topic`, `grp`, `body`, `visible_at` (the lease), `deliveries`, `holder` |
//! | `bus_groups` | the consumer groups of each topic |
//! | `dead_letters`, `dead_letter_audit` | what could not be processed, and how it was settled |
//! | `migrations` | the migrations applied, by version |
//!
//! Waiting clients are woken by `NOTIFY <schema>_finished` with the ids of
//! workflows that finished, and waiting consumers by `NOTIFY <schema>_bus`
//! with the topics published to, both sent after the write committed.

mod bus;
mod conn;
mod schema;
mod store;

pub use bus::{PostgresBus, PostgresBusConfig};
pub use store::{PostgresStateStore, PostgresStoreConfig, WriteStats};

/// A URL with its password hidden, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

//! The tables, created and migrated by the store itself: versioned
//! migrations applied in one transaction under an advisory lock, so that
//! replicas starting together do not race, each recorded in
//! `<schema>.migrations`.

use tokio_postgres::Client;

/// The migrations, in order; `{s}` stands for the schema. Never edit one
/// that has shipped: add the next.
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r"
CREATE TABLE {s}.workflows (
    tx uuid PRIMARY KEY,
    version bigint NOT NULL,
    workflow text NOT NULL,
    def_version integer NOT NULL,
    status text NOT NULL,
    correlation_id uuid NOT NULL,
    started_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    finished_at bigint,
    history_len bigint NOT NULL
) WITH (fillfactor = 70);
CREATE INDEX workflows_started ON {s}.workflows (started_at DESC, tx DESC);
CREATE INDEX workflows_status ON {s}.workflows (status, started_at DESC, tx DESC);
CREATE INDEX workflows_workflow ON {s}.workflows (workflow, started_at DESC, tx DESC);
CREATE INDEX workflows_correlation ON {s}.workflows (correlation_id);
CREATE INDEX workflows_finished ON {s}.workflows (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE {s}.parts (
    tx uuid NOT NULL,
    field text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tx, field)
);
CREATE TABLE {s}.timers (
    tx uuid PRIMARY KEY,
    wakeup bigint NOT NULL,
    lease bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
CREATE INDEX timers_wakeup ON {s}.timers (wakeup);
CREATE TABLE {s}.unpublished (
    tx uuid NOT NULL,
    version bigint NOT NULL,
    at bigint NOT NULL,
    PRIMARY KEY (tx, version)
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
CREATE INDEX unpublished_at ON {s}.unpublished (at);
CREATE TABLE {s}.definitions (
    name text NOT NULL,
    version integer NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE UNLOGGED TABLE {s}.workers (
    key text PRIMARY KEY,
    at bigint NOT NULL,
    body text NOT NULL
);
",
    ),
    (
        2,
        r"
CREATE TABLE {s}.bus_groups (
    topic text NOT NULL,
    grp text NOT NULL,
    PRIMARY KEY (topic, grp)
);
CREATE TABLE {s}.messages (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    grp text NOT NULL,
    body bytea NOT NULL,
    visible_at timestamptz NOT NULL DEFAULT now(),
    deliveries integer NOT NULL DEFAULT 0,
    holder text NOT NULL DEFAULT ''
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
CREATE INDEX messages_ready ON {s}.messages (topic, grp, visible_at);
CREATE TABLE {s}.dead_letters (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    grp text,
    reason text NOT NULL,
    deliveries integer NOT NULL,
    at bigint NOT NULL,
    body bytea NOT NULL
);
CREATE TABLE {s}.dead_letter_audit (
    id bigserial PRIMARY KEY,
    letter_id bigint NOT NULL,
    topic text NOT NULL,
    grp text,
    reason text NOT NULL,
    deliveries integer NOT NULL,
    at bigint NOT NULL,
    body bytea NOT NULL,
    action text NOT NULL,
    by text NOT NULL,
    note text NOT NULL,
    settled_at bigint NOT NULL
);
",
    ),
    (
        3,
        r"
ALTER TABLE {s}.messages ADD COLUMN tag bigint;
",
    ),
];

/// Checks that `schema` can be written into SQL as it is.
pub(crate) fn valid_schema(schema: &str) -> Result<(), String> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && schema.len() <= 48 {
        Ok(())
    } else {
        Err(format!(
            "the schema name `{schema}` is not usable: use lowercase letters, digits and `_`, starting with a letter or `_`, at most 48 characters"
        ))
    }
}

/// Creates the schema and applies the migrations it lacks; returns the
/// versions applied now. Replicas that start together wait for each other
/// on a transaction-level advisory lock named after the schema.
pub(crate) async fn migrate(
    client: &mut Client,
    schema: &str,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    let t = client.transaction().await?;
    t.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('multiagents:' || $1, 0))",
        &[&schema],
    )
    .await?;
    t.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let row = t
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.migrations"),
            &[],
        )
        .await?;
    let at: i32 = row.get(0);
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > at) {
        t.batch_execute(&sql.replace("{s}", schema)).await?;
        t.execute(
            &format!("INSERT INTO {schema}.migrations (version) VALUES ($1)"),
            &[version],
        )
        .await?;
        applied.push(*version);
    }
    t.commit().await?;
    Ok(applied)
}

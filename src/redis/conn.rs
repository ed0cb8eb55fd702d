//! Connections: a client over TCP or TLS, a small pool, a Cluster
//! connection when the server is one, and Pub/Sub subscriptions that come
//! back by themselves.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};

use crate::bus::BusError;

/// A connection to a single server or to a Redis Cluster, chosen when
/// connecting: a server that says `cluster_enabled:1` gets a cluster
/// connection, which routes each command to the node owning its key (every
/// key carries a `{…}` hash tag, so each script's keys share a slot).
#[derive(Clone)]
pub enum RedisConnection {
    /// One server, reconnecting by itself.
    Single(ConnectionManager),
    /// One server, on a connection of its own (for blocking reads).
    Direct(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Direct(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Direct(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Sends a pipeline whose replies are ignored. On a cluster the commands go
/// one after another, in order: a cluster pipeline must stay in one slot.
pub(crate) async fn run_all(
    conn: &mut RedisConnection,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<()> {
    if matches!(conn, RedisConnection::Cluster(_)) {
        for cmd in pipe.cmd_iter() {
            cmd.query_async::<()>(conn).await?;
        }
        return Ok(());
    }
    pipe.query_async::<()>(conn).await
}

/// Sends a pipeline and returns every reply (none may be ignored). On a
/// cluster the commands go one after another.
pub(crate) async fn query_all<T: redis::FromRedisValue>(
    conn: &mut RedisConnection,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<Vec<T>> {
    if matches!(conn, RedisConnection::Cluster(_)) {
        let mut out = Vec::with_capacity(pipe.len());
        for cmd in pipe.cmd_iter() {
            out.push(cmd.query_async::<T>(conn).await?);
        }
        return Ok(out);
    }
    pipe.query_async::<Vec<T>>(conn).await
}

/// Connects to the server or cluster at `url` (for a cluster, any node's
/// address); the error names the address.
pub async fn connect(url: &str) -> Result<RedisConnection, BusError> {
    connect_with(url, None).await
}

/// [`connect`], trusting the CA certificates of `ca_file` as well (see
/// [`RedisBusConfig::ca_file`](super::RedisBusConfig::ca_file)).
pub async fn connect_with(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<RedisConnection, BusError> {
    let (_, pool) = open(url, ca_file)
        .await
        .map_err(|message| BusError::Backend {
            address: redacted(url),
            message,
        })?;
    Ok(pool.get())
}

/// The client and the connection pool for `url`, within 10 s; the error is
/// the reason, for the caller to put beside the (redacted) address.
pub(crate) async fn open(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<(redis::Client, Pool), String> {
    let (client, certs) = client(url, ca_file)?;
    let pool = tokio::time::timeout(Duration::from_secs(10), Pool::connect(&client, url, certs))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| {
            let e = e.to_string();
            if e.contains("UnknownIssuer") && ca_file.is_none() {
                format!("{e} (for a private CA, give its PEM file: `ca_file`, `--redis-ca-file`)")
            } else {
                e
            }
        })?;
    Ok((client, pool))
}

/// A client for `url`: over TLS for `rediss://`, trusting the CA
/// certificates of `ca_file` besides the system's. The user and password,
/// if any, come from the URL. The certificates are returned too, for a
/// cluster client.
pub(crate) fn client(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<(redis::Client, Option<redis::TlsCertificates>), String> {
    let Some(path) = ca_file else {
        return Ok((redis::Client::open(url).map_err(|e| e.to_string())?, None));
    };
    if !url.starts_with("rediss://") {
        return Err(format!(
            "a CA file ({}) is given, but the URL is not rediss:// (TLS)",
            path.display()
        ));
    }
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(trusted_roots(path)?),
    };
    let client = redis::Client::build_with_tls(url, certs.clone()).map_err(|e| e.to_string())?;
    Ok((client, Some(certs)))
}

/// The system's root certificates and those of the PEM file at `path`, as
/// one PEM bundle (redis-rs trusts only the bundle it is given).
pub(super) fn trusted_roots(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("the CA file {} is not valid PEM: {e}", path.display()))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!(
            "the CA file {} holds no certificate",
            path.display()
        ));
    }
    let mut bundle = pem;
    bundle.push(b'\n');
    // A system without a trust store still trusts the file.
    for cert in rustls_native_certs::load_native_certs().certs {
        bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(&cert);
        for line in encoded.as_bytes().chunks(64) {
            bundle.extend_from_slice(line);
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(bundle)
}

/// Connections used in turn: one connection's driver task parses every
/// reply on it, and became the bottleneck under load. On a cluster, one
/// cluster connection (it holds a connection per node).
pub(crate) struct Pool {
    conns: Vec<RedisConnection>,
    next: std::sync::atomic::AtomicUsize,
    /// For blocking reads on a cluster: no response timeout.
    blocking: Option<redis::cluster::ClusterClient>,
}

/// Connections in a [`Pool`].
pub(super) const POOL_SIZE: usize = 2;

impl Pool {
    /// Opens the pool; the error is the server's.
    pub(crate) async fn connect(
        client: &redis::Client,
        url: &str,
        certs: Option<redis::TlsCertificates>,
    ) -> redis::RedisResult<Self> {
        let mut probe = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut probe)
            .await?;
        if info.contains("cluster_enabled:1") {
            let cluster = |timeout: Option<Duration>| {
                let mut builder = redis::cluster::ClusterClient::builder(vec![url])
                    .connection_timeout(Duration::from_secs(5))
                    .retries(3);
                if let Some(certs) = &certs {
                    builder = builder.certs(certs.clone());
                }
                match timeout {
                    Some(t) => builder.response_timeout(t),
                    None => builder.response_timeout(Duration::from_secs(3600)),
                }
                .build()
            };
            let conn = cluster(Some(Duration::from_secs(10)))?
                .get_async_connection()
                .await?;
            return Ok(Self {
                conns: vec![RedisConnection::Cluster(conn)],
                next: std::sync::atomic::AtomicUsize::new(0),
                blocking: Some(cluster(None)?),
            });
        }
        let mut conns = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(1));
            conns.push(RedisConnection::Single(
                client.get_connection_manager_with_config(config).await?,
            ));
        }
        Ok(Self {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
            blocking: None,
        })
    }

    /// The next connection.
    pub(crate) fn get(&self) -> RedisConnection {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }

    /// True on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.blocking.is_some()
    }

    /// A connection of its own for blocking reads, without a response
    /// timeout (the read's own `BLOCK` bounds it).
    pub(crate) async fn blocking(
        &self,
        client: &redis::Client,
    ) -> redis::RedisResult<RedisConnection> {
        if let Some(cluster) = &self.blocking {
            return Ok(RedisConnection::Cluster(
                cluster.get_async_connection().await?,
            ));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(None);
        Ok(RedisConnection::Direct(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

/// The URL without its user and password, for logs and error messages.
///
/// ```
/// use multiagents::redis::redacted;
///
/// assert_eq!(redacted("redis://app:secret@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// ```
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Follows a Pub/Sub channel forever, handing each message's payload to
/// `on_message` and resubscribing when the connection drops (messages sent
/// meanwhile are lost: Pub/Sub keeps nothing). `on_state` is told when the
/// subscription comes up and goes down.
pub(crate) async fn follow_channel(
    client: &redis::Client,
    channel: &str,
    address: &str,
    mut on_state: impl FnMut(bool),
    mut on_message: impl FnMut(&[u8]),
) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(channel).await.is_ok() {
                    on_state(true);
                    let mut stream = std::pin::pin!(pubsub.on_message());
                    while let Some(msg) = std::future::poll_fn(|cx| {
                        futures_core::Stream::poll_next(stream.as_mut(), cx)
                    })
                    .await
                    {
                        on_message(msg.get_payload_bytes());
                    }
                    on_state(false);
                }
            }
            Err(e) => tracing::warn!(address, channel, error = %e, "subscription failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One stream entry: its id and its fields.
pub(super) type Entry = (String, Vec<(String, Vec<u8>)>);

/// Parses `[[id, [field, value, …]], …]`.
pub(super) fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = bulk_string(pair.first()?)?;
            let mut fields = Vec::new();
            if let Some(Value::Array(kv)) = pair.get(1) {
                for chunk in kv.chunks(2) {
                    if let [k, v] = chunk
                        && let (Some(k), Some(v)) = (bulk_string(k), bulk_bytes(v))
                    {
                        fields.push((k, v));
                    }
                }
            }
            Some((id, fields))
        })
        .collect()
}

pub(super) fn bulk_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

pub(super) fn bulk_string(v: &Value) -> Option<String> {
    bulk_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

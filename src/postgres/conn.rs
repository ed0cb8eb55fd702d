//! Connections: a pool for statements, and single connections of their own
//! for `LISTEN`, over TCP, a Unix socket or TLS (rustls on ring).

use std::str::FromStr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How to reach one server: its parsed settings and TLS, if any.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Config,
    tls: Option<MakeRustlsConnect>,
    /// Where, for messages: `postgres://user@host:port/db`, no password.
    pub(crate) address: String,
}

impl Connector {
    /// From a `postgres://` URL (or `key=value` settings). `sslmode` means
    /// what it means to libpq (and `psql`): `disable`, plain text; `prefer`
    /// (the default), TLS when the server has it; `require`, TLS or no
    /// connection; neither checks the server's certificate, unless a CA
    /// file is given, which makes them check its chain as `verify-ca` does;
    /// `verify-ca`, a chain to a trusted root (the system's and the CA
    /// file's); `verify-full`, that and the host name.
    pub(crate) fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        let (url, verify) = verify_mode(url);
        let url = url.as_str();
        let mut config = Config::from_str(url).map_err(|e| {
            format!(
                "the database URL {} is not valid: {e}",
                super::redacted(url)
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("multiagents");
        }
        let address = address_of(&config);
        let tls = match (config.get_ssl_mode(), verify) {
            (tokio_postgres::config::SslMode::Disable, _) => None,
            (_, Some(verify)) => Some(verify),
            (_, None) if ca_file.is_some() => Some(Verify::Chain),
            (_, None) => Some(Verify::Nothing),
        }
        .map(|verify| client_config(ca_file, verify).map(MakeRustlsConnect::new))
        .transpose()?;
        Ok(Self {
            config,
            tls,
            address,
        })
    }

    /// A pool of up to `size` connections, opened as needed.
    pub(crate) fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool, String> {
        self.pool_of(self.config.clone(), size)
    }

    /// A pool whose transactions commit without waiting for the WAL flush
    /// (`synchronous_commit = off`), for writes whose loss in a crash of the
    /// server only means doing something again: a lease taken or extended,
    /// an ack, a note deleted. A later synchronous commit flushes them too.
    pub(crate) fn lazy_pool(&self, size: usize) -> Result<deadpool_postgres::Pool, String> {
        let mut config = self.config.clone();
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c synchronous_commit=off"),
            _ => "-c synchronous_commit=off".to_string(),
        };
        config.options(&options);
        self.pool_of(config, size)
    }

    /// Every statement here finds its rows through an index, and each is
    /// prepared once per connection: a plan made while the tables were
    /// new and small (a sequential scan of `workflows` for a batch of
    /// compare-and-sets) would be kept for the connection's life and grow
    /// slower with the table, so sequential scans are priced out
    /// (`enable_seqscan = off`; still used where nothing else can serve).
    ///
    /// Each is planned once, too (`plan_cache_mode = force_generic_plan`):
    /// the server would otherwise plan the writes' statements (common
    /// table expressions over arrays) again at every execution, because
    /// it cannot price a plan for arrays of unknown length below one made
    /// for the arrays at hand. Planning took more time than running them:
    /// a workflow of five steps alone on PostgreSQL took 20–21 ms with it,
    /// 9–11 ms without (2026-12-07).
    fn pool_of(&self, mut config: Config, size: usize) -> Result<deadpool_postgres::Pool, String> {
        const SETTINGS: &str = "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan";
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {SETTINGS}"),
            _ => SETTINGS.to_string(),
        };
        config.options(&options);
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            Some(tls) => {
                deadpool_postgres::Manager::from_config(config, tls.clone(), manager_config)
            }
            None => deadpool_postgres::Manager::from_config(config, NoTls, manager_config),
        };
        deadpool_postgres::Pool::builder(manager)
            .max_size(size.max(1))
            .build()
            .map_err(|e| e.to_string())
    }

    /// A connection of its own whose notifications (`LISTEN`) arrive on the
    /// receiver, which closes when the connection is lost.
    pub(crate) async fn listener(
        &self,
    ) -> Result<
        (
            Client,
            mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        String,
    > {
        match &self.tls {
            Some(tls) => listen_with(&self.config, tls.clone()).await,
            None => listen_with(&self.config, NoTls).await,
        }
        .map_err(|e| describe(&e))
    }
}

async fn listen_with<T>(
    config: &Config,
    tls: T,
) -> Result<
    (
        Client,
        mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    ),
    tokio_postgres::Error,
>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "a PostgreSQL listening connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    Ok((client, rx))
}

/// `postgres://user@host:port/db` of a config, without its password.
fn address_of(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or("");
    format!("postgres://{user}{host}:{port}/{db}")
}

/// How much of the server's certificate a TLS connection checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    /// Nothing (libpq's `prefer` and `require`): encrypted, but a server
    /// with any certificate is taken for the one meant.
    Nothing,
    /// A chain to a trusted root, whatever host it names (`verify-ca`).
    Chain,
    /// A chain to a trusted root, for the host connected to
    /// (`verify-full`).
    Full,
}

/// libpq's `sslmode=verify-ca` and `verify-full`, which tokio-postgres
/// does not read: the URL with them said as `require` (TLS or no
/// connection), and what they ask to check.
fn verify_mode(url: &str) -> (String, Option<Verify>) {
    for (mode, verify) in [
        ("sslmode=verify-full", Verify::Full),
        ("sslmode=verify-ca", Verify::Chain),
    ] {
        if url.contains(mode) {
            return (url.replace(mode, "sslmode=require"), Some(verify));
        }
    }
    (url.to_string(), None)
}

/// TLS settings: the system's roots and those of `ca_file`, checked as
/// `verify` says.
fn client_config(
    ca_file: Option<&std::path::Path>,
    verify: Verify,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    if verify == Verify::Nothing {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(Lenient {
                chain: None,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as curl does.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| format!("the CA file {} is not valid PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("the CA file {}: {e}", path.display()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!(
                "the CA file {} holds no certificate",
                path.display()
            ));
        }
    }
    if verify == Verify::Full {
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    let algorithms = provider.signature_verification_algorithms;
    let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .build()
    .map_err(|e| e.to_string())?;
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Lenient {
            chain: Some(chain),
            algorithms,
        }))
        .with_no_client_auth())
}

/// Checks less of the server's certificate than rustls does by default:
/// nothing (`chain: None`, libpq's `prefer` and `require`), or its chain to
/// a trusted root but not the host name (`verify-ca`; webpki checks the
/// chain before the name, so a certificate refused only for its name has a
/// trusted chain). The handshake's signatures are always checked, so the
/// server holds the key of the certificate it shows.
#[derive(Debug)]
struct Lenient {
    chain: Option<std::sync::Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What went wrong, with the server's own message when it sent one.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// What went wrong getting a pooled connection.
pub(crate) fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

/// Follows `LISTEN channel` on a connection of its own, reconnecting when
/// it is lost (after 100 ms, doubling up to 2 s): `connected` runs after
/// each (re)connection (a notification may have been missed meanwhile),
/// `payload` for each notification. Stops when either returns false (its
/// owner is gone).
pub(crate) async fn follow(
    connector: Connector,
    channel: String,
    what: &'static str,
    mut connected: impl FnMut() -> bool,
    mut payload: impl FnMut(&str) -> bool,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match connector.listener().await {
            Ok((client, mut notes)) => {
                if let Err(e) = client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                    tracing::debug!(error = %describe(&e), "LISTEN failed");
                } else {
                    delay = Duration::from_millis(100);
                    if !connected() {
                        return;
                    }
                    while let Some(n) = notes.recv().await {
                        if !payload(n.payload()) {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(address = %connector.address, error = %e, "the PostgreSQL {what} listener cannot connect; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The longest `NOTIFY` payload sent (the server refuses 8000 bytes or
/// more).
pub(crate) const NOTIFY_BYTES: usize = 7800;

/// `items` joined by commas after `prefix` into as few payloads as fit
/// [`NOTIFY_BYTES`] each, in order. An item too long for any payload is
/// left out: nobody is told of it, and whoever waits for it finds it by
/// polling.
pub(crate) fn notify_payloads<I, S>(prefix: &str, items: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut payloads: Vec<String> = Vec::new();
    for item in items {
        let item = item.as_ref();
        if prefix.len() + item.len() > NOTIFY_BYTES {
            tracing::debug!(bytes = item.len(), "too long to announce; found by polling");
            continue;
        }
        match payloads.last_mut() {
            Some(last) if last.len() + 1 + item.len() <= NOTIFY_BYTES => {
                last.push(',');
                last.push_str(item);
            }
            _ => payloads.push(format!("{prefix}{item}")),
        }
    }
    payloads
}

#[cfg(test)]
mod tests {

    #[test]
    fn verify_modes_are_read_from_urls_and_settings_and_said_as_require() {
        assert_eq!(
            verify_mode("postgres://u@h/db?sslmode=verify-full&application_name=x"),
            (
                "postgres://u@h/db?sslmode=require&application_name=x".to_string(),
                Some(Verify::Full)
            )
        );
        assert_eq!(
            verify_mode("host=h sslmode=verify-ca dbname=db"),
            (
                "host=h sslmode=require dbname=db".to_string(),
                Some(Verify::Chain)
            )
        );
        assert_eq!(
            verify_mode("postgres://u@h/db?sslmode=require"),
            ("postgres://u@h/db?sslmode=require".to_string(), None)
        );
    }
    use super::*;

    #[test]
    fn announcements_are_split_to_fit_a_notify_and_keep_every_item_in_order() {
        let items: Vec<String> = (0..900)
            .map(|i| format!("topic-{i:04}-{}", "x".repeat(i % 40)))
            .collect();
        let payloads = notify_payloads("me;", &items);
        assert!(
            payloads.len() > 1,
            "{} bytes in one payload",
            payloads[0].len()
        );
        assert!(
            payloads
                .iter()
                .all(|p| p.len() <= NOTIFY_BYTES && p.len() > 3)
        );
        let back: Vec<&str> = payloads
            .iter()
            .flat_map(|p| p.strip_prefix("me;").expect("prefixed").split(','))
            .collect();
        assert_eq!(back, items.iter().map(String::as_str).collect::<Vec<_>>());

        let long = "y".repeat(NOTIFY_BYTES);
        assert_eq!(
            notify_payloads("", ["a", long.as_str(), "b"]),
            vec!["a".to_string(), long.clone(), "b".to_string()]
        );
        assert_eq!(
            notify_payloads("p", ["a", long.as_str(), "b"]),
            vec!["pa,b".to_string()]
        );
        assert!(notify_payloads("", Vec::<String>::new()).is_empty());
    }
}

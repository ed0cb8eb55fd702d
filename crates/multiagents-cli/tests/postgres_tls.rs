//! PostgreSQL over TLS, against a real server of the test's own that takes
//! TCP connections over TLS only: `sslmode` means what it means to libpq
//! and `psql` (`prefer` and `require` encrypt without checking the
//! certificate; `verify-ca` checks its chain, `verify-full` its chain and
//! host name), and a refused certificate is reported with the server's
//! address.

mod common;

use common::{PgCluster, cli};

/// A CA, and a server certificate it signed for `localhost` only.
struct Certificates {
    dir: tempfile::TempDir,
    server_pem: String,
    server_key: String,
}

impl Certificates {
    fn new() -> Self {
        let (ca, server_pem, server_key) = common::ca_and_server_certificate(&["localhost"]);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), ca).expect("write");
        Self {
            dir,
            server_pem,
            server_key,
        }
    }

    fn ca_file(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }
}

/// `workflow list` on the server at `url`: whether it worked, and what it
/// printed (stdout, then stderr).
fn list(url: &str, ca_file: Option<&str>) -> (bool, String) {
    let mut args = vec!["workflow", "list", "--json", "--database-url", url];
    if let Some(ca) = ca_file {
        args.extend(["--database-ca-file", ca]);
    }
    let (ok, out, err) = cli(&args);
    (ok, format!("{out}{err}"))
}

#[test]
fn sslmode_means_what_it_means_to_libpq_and_a_refused_certificate_names_the_server() {
    let certs = Certificates::new();
    let Some(pg) = PgCluster::start_tls(&certs.server_pem, &certs.server_key) else {
        return;
    };
    let port = pg.port();
    let at = |host: &str, mode: &str| format!("postgres://postgres@{host}:{port}/postgres{mode}");

    // The server takes no plain TCP connection: what connects below is TLS.
    let (ok, out) = list(&at("127.0.0.1", "?sslmode=disable"), None);
    assert!(!ok, "a plain connection was taken: {out}");
    assert!(out.contains("no encryption"), "{out}");

    // prefer (the default) and require: encrypted, certificate unchecked,
    // as with psql.
    for mode in ["", "?sslmode=prefer", "?sslmode=require"] {
        let (ok, out) = list(&at("127.0.0.1", mode), None);
        assert!(ok, "sslmode {mode:?}: {out}");
        assert!(out.trim_start().starts_with('['), "{out}");
    }

    // verify-full: the chain must reach a trusted root ...
    let (ok, out) = list(&at("localhost", "?sslmode=verify-full"), None);
    assert!(!ok, "an untrusted certificate was taken: {out}");
    assert!(out.contains(&format!("localhost:{port}")), "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    let (ok, out) = list(
        &at("localhost", "?sslmode=verify-full"),
        Some(&certs.ca_file()),
    );
    assert!(ok, "{out}");
    // ... and name the host connected to.
    let (ok, out) = list(
        &at("127.0.0.1", "?sslmode=verify-full"),
        Some(&certs.ca_file()),
    );
    assert!(!ok, "a certificate for another name was taken: {out}");
    assert!(out.contains("not valid for name"), "{out}");

    // verify-ca: the chain only.
    let (ok, out) = list(&at("127.0.0.1", "?sslmode=verify-ca"), None);
    assert!(!ok, "an untrusted certificate was taken: {out}");
    let (ok, out) = list(
        &at("127.0.0.1", "?sslmode=verify-ca"),
        Some(&certs.ca_file()),
    );
    assert!(ok, "{out}");

    // A CA file given with require checks the chain, as libpq does with a
    // root certificate: one that does not sign the server's is refused.
    let other = Certificates::new();
    let (ok, out) = list(&at("127.0.0.1", "?sslmode=require"), Some(&other.ca_file()));
    assert!(!ok, "a certificate signed by another CA was taken: {out}");
    let (ok, out) = list(&at("127.0.0.1", "?sslmode=require"), Some(&certs.ca_file()));
    assert!(ok, "{out}");
}

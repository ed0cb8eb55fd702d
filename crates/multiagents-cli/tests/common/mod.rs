//! Shared by the command's integration tests.
#![allow(dead_code)]

/// The Redis to test against, from `REDIS_URL` (set by `scripts/test.sh`).
/// Without it the test is skipped, except in CI, where that is an error.
pub fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok() => {
            panic!("REDIS_URL is not set; run the tests through ./scripts/test.sh")
        }
        _ => {
            eprintln!(
                "skipped: REDIS_URL is not set (./scripts/test.sh starts a throw-away Redis)"
            );
            None
        }
    }
}

/// Runs the `multiagents` command; whether it succeeded, its stdout and stderr.
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The PostgreSQL to test against, from `DATABASE_URL` (set by
/// `scripts/test.sh`). Without it the test is skipped, except in CI.
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok() => {
            panic!("DATABASE_URL is not set; run the tests through ./scripts/test.sh")
        }
        _ => {
            eprintln!(
                "skipped: DATABASE_URL is not set (./scripts/test.sh starts a throw-away PostgreSQL)"
            );
            None
        }
    }
}

/// A PostgreSQL cluster of the test's own, which it may stop and start
/// (the shared one serves other tests meanwhile): initdb into a temporary
/// directory, on a free port, as the `postgres` user when run as root.
/// Stopped when dropped.
pub struct PgCluster {
    _dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    log: std::path::PathBuf,
    port: u16,
    as_postgres: bool,
    /// Server settings given on every start (`-c name=value ...`).
    settings: String,
}

/// PostgreSQL's server binaries: `PG_BIN`, on PATH, or where Debian puts them.
fn pg_bin() -> Option<std::path::PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Some(dir.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() {
                return Some(dir);
            }
        }
    }
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

impl PgCluster {
    /// A new cluster, started; `None` (the test is skipped) when
    /// PostgreSQL is not installed, except in CI.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    /// A new cluster that speaks TLS with this certificate and key (PEM)
    /// and takes TCP connections over TLS only (`hostssl` in `pg_hba.conf`;
    /// its Unix socket stays open), started.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<Self> {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Option<Self> {
        let Some(bin) = pg_bin() else {
            assert!(
                std::env::var("CI").is_err(),
                "PostgreSQL's initdb is needed"
            );
            eprintln!("skipped: PostgreSQL is not installed");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_postgres {
            let status = std::process::Command::new("chown")
                .args(["postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("addr")
            .port();
        let cluster = Self {
            data: dir.path().join("data"),
            log: dir.path().join("log"),
            _dir: dir,
            bin,
            port,
            as_postgres,
            // Tests are not benchmarks: no fsync, as in scripts/test.sh, so
            // that a fast shutdown's checkpoint does not wait on a busy disk
            // (with fsync, a restart here once took about a minute beside
            // three other process tests, longer than the client's
            // --stuck-after). What a test checks across a restart (nothing
            // committed is lost) still holds: the server writes out all it
            // has before it stops.
            settings: format!(
                "-c fsync=off{}",
                if tls.is_some() { " -c ssl=on" } else { "" }
            ),
        };
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            let write = |name: &str, text: &str, mode: u32| {
                use std::os::unix::fs::PermissionsExt;
                let path = cluster.data.join(name);
                std::fs::write(&path, text).expect("write");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
                if cluster.as_postgres {
                    let status = std::process::Command::new("chown")
                        .arg("postgres")
                        .arg(&path)
                        .status()
                        .expect("chown");
                    assert!(status.success(), "chown postgres");
                }
            };
            write("server.crt", cert, 0o644);
            write("server.key", key, 0o600);
            write(
                "pg_hba.conf",
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
                0o600,
            );
        }
        cluster.start_again();
        Some(cluster)
    }

    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&self) {
        let socket_dir = self.data.parent().expect("dir").to_path_buf();
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 {}",
                self.port,
                socket_dir.display(),
                self.settings
            ))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("pg_ctl runs");
        assert!(
            status.success(),
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops the server the way an operator restarting it would: fast
    /// shutdown (open transactions are rolled back, everything committed
    /// is kept).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// A test CA, and a server certificate it signed for `names`: the CA's
/// PEM, the server's certificate PEM and its key PEM.
pub fn ca_and_server_certificate(names: &[&str]) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "multiagents test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params")
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

/// Processes killed (SIGKILL) and reaped when dropped, unless they ended
/// before: a test that fails part-way leaves none of them running (an
/// orchestrator or worker process waits for a signal that would never come).
pub struct KillOnDrop(pub Vec<std::process::Child>);

impl std::ops::Deref for KillOnDrop {
    type Target = Vec<std::process::Child>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

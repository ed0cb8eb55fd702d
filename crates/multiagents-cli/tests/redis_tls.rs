//! Redis over TLS (`rediss://`) with a private CA, as an ACL user that may
//! touch only its prefix: `multiagents serve` and the library run workflows
//! to the end (one completes, one compensates), the ACL really refuses keys
//! outside the prefix, and neither the logs nor the errors show the
//! password.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multiagents::bus::{Bus, RedisBusConfig, RedisStreamsBus};
use multiagents::store::{RedisStateStore, RedisStoreConfig, Store};
use multiagents::worker::{WorkerContext, WorkerError, WorkerManager, from_fn};
use multiagents::{Client, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

const PASSWORD: &str = "s3cret-Pa55";

/// A throw-away redis-server that speaks only TLS, with a certificate from
/// a CA of its own, and two users: `default` (an admin, for the test) and
/// `app`, limited to the keys and channels of `prefix`.
struct TlsRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(prefix: &str) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(std::env::var("CI").is_err(), "redis-server is needed");
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, server, server_key) =
            common::ca_and_server_certificate(&["localhost", "127.0.0.1"]);
        let write =
            |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("write");
        write("ca.pem", ca);
        write("server.pem", server);
        write("server.key", server_key);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let d = dir.path().display();
        write(
            "redis.conf",
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\n\
                 tls-cert-file {d}/server.pem\ntls-key-file {d}/server.key\n\
                 tls-ca-cert-file {d}/ca.pem\ntls-auth-clients no\n\
                 save \"\"\nappendonly no\ndir {d}\n\
                 user default on >admin-pw ~* &* +@all\n\
                 user app on >{PASSWORD} ~{{{prefix}:* ~{prefix}:* &{prefix}:* &{{{prefix}:* +@all -@dangerous +info\n"
            ),
        );
        let child = Command::new("redis-server")
            .arg(dir.path().join("redis.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("rediss://{user}:{password}@127.0.0.1:{}/", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped, so that a failing test leaves none
/// behind. Its stdout and stderr are read as it writes them (a debug log
/// left in a full pipe would stall it), into `out`.
struct Reaped {
    child: Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Reaped {
    fn output(&self) -> String {
        self.out.lock().expect("lock").clone()
    }
}

fn serve(url: &str, ca: &Path, prefix: &str) -> Reaped {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_multiagents"))
        .args(["serve", "--redis-url", url, "--prefix", prefix])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--redis-ca-file")
        .arg(ca)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the multiagents binary starts");
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut readers = Vec::new();
    let pipes: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout")),
        Box::new(child.stderr.take().expect("stderr")),
    ];
    for pipe in pipes {
        let out = out.clone();
        readers.push(std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                let mut out = out.lock().expect("lock");
                out.push_str(&line);
                out.push('\n');
            }
        }));
    }
    Reaped {
        child,
        out,
        readers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_run_over_tls_as_an_acl_user_limited_to_its_prefix() {
    let prefix = format!("tls{}", std::process::id());
    let Some(redis) = TlsRedis::start(&prefix) else {
        return;
    };
    let url = redis.url("app", PASSWORD);
    let bus: Bus = RedisStreamsBus::connect(
        RedisBusConfig::new(&url)
            .prefix(&prefix)
            .ca_file(redis.ca()),
    )
    .await
    .expect("the bus connects over TLS as `app`")
    .into();
    let store: Store = RedisStateStore::connect(
        RedisStoreConfig::new(&url)
            .prefix(&prefix)
            .ca_file(redis.ca()),
    )
    .await
    .expect("the store connects over TLS as `app`")
    .into();
    let client = Client::new(bus.clone(), store.clone());
    let def = WorkflowBuilder::new("paid")
        .step("reserve", "reserve")
        .compensate_with("release")
        .step("charge", "charge")
        .build()
        .expect("valid");
    client.register(&def).await.expect("registered");
    let echo = |name: &'static str| {
        from_fn(name, |input: Value, _ctx: WorkerContext| async move {
            Ok::<_, WorkerError>(input)
        })
    };
    let charge = from_fn("charge", |input: Value, _ctx: WorkerContext| async move {
        if input["decline"] == json!(true) {
            return Err(WorkerError::fatal("card declined"));
        }
        Ok(json!({"charged": true}))
    });
    let workers = WorkerManager::new(bus.clone())
        .register(echo("reserve"))
        .register(echo("release"))
        .register(charge)
        .start()
        .await
        .expect("workers");
    let mut orchestrator = serve(&url, &redis.ca(), &prefix);

    let paid = client
        .start("paid", &json!({"decline": false}))
        .await
        .expect("start");
    let declined = client
        .start("paid", &json!({"decline": true}))
        .await
        .expect("start");
    let paid = client
        .wait(paid, Duration::from_secs(30))
        .await
        .expect("finishes");
    let declined = client
        .wait(declined, Duration::from_secs(30))
        .await
        .expect("finishes");
    assert_eq!(paid.status, WorkflowStatus::Completed, "{paid:?}");
    assert_eq!(declined.status, WorkflowStatus::Compensated, "{declined:?}");

    // The ACL is real: `app` may not touch a key outside its prefix.
    let mut conn = multiagents::redis::connect_with(&url, Some(&redis.ca()))
        .await
        .expect("connects");
    let refused: redis::RedisResult<()> = redis::cmd("SET")
        .arg("someone-else:key")
        .arg("1")
        .query_async(&mut conn)
        .await;
    let err = refused.expect_err("the ACL refuses a key outside the prefix");
    assert!(err.to_string().contains("NoPerm"), "{err}");

    workers.shutdown().await;
    // Up and saying where it serves (it ran the workflows, so it is), then
    // SIGTERM, so that the orchestrator drains and logs its way out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !orchestrator.output().contains("serving http://") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-TERM", &orchestrator.child.id().to_string()])
        .status()
        .expect("kill");
    let out = wait_output(&mut orchestrator);
    assert!(
        !out.contains(PASSWORD),
        "the password is in the log:\n{out}"
    );
    assert!(
        out.contains("rediss://***@127.0.0.1"),
        "the address is in the log:\n{out}"
    );
}

fn wait_output(served: &mut Reaped) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while served.child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = served.child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for reader in served.readers.drain(..) {
        let _ = reader.join();
    }
    served.output()
}

/// The error of connecting the bus to `url`.
async fn connect(url: String, ca: Option<PathBuf>) -> String {
    let mut config = RedisBusConfig::new(url);
    config.ca_file = ca;
    match RedisStreamsBus::connect(config).await {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn tls_and_credential_errors_name_the_address_and_never_the_password() {
    let prefix = format!("tlsbad{}", std::process::id());
    let Some(redis) = TlsRedis::start(&prefix) else {
        return;
    };
    let redacted = format!("rediss://***@127.0.0.1:{}/", redis.port);

    let wrong = connect(redis.url("app", "wrong-Pa55"), Some(redis.ca())).await;
    assert!(wrong.contains(&redacted), "{wrong}");
    assert!(wrong.contains("authentication failed"), "{wrong}");
    assert!(!wrong.contains("wrong-Pa55"), "{wrong}");

    // The server's CA is not among the system's roots.
    let untrusted = connect(redis.url("app", PASSWORD), None).await;
    assert!(untrusted.contains(&redacted), "{untrusted}");
    assert!(
        untrusted.contains("invalid peer certificate"),
        "{untrusted}"
    );
    assert!(untrusted.contains("--redis-ca-file"), "{untrusted}");
    assert!(!untrusted.contains(PASSWORD), "{untrusted}");

    let plain = connect(
        format!("redis://app:{PASSWORD}@127.0.0.1:{}/", redis.port),
        Some(redis.ca()),
    )
    .await;
    assert!(plain.contains("not rediss://"), "{plain}");
    assert!(!plain.contains(PASSWORD), "{plain}");

    let missing = redis.dir.path().join("no-such-ca.pem");
    let unreadable = connect(redis.url("app", PASSWORD), Some(missing.clone())).await;
    assert!(
        unreadable.contains(&missing.display().to_string()),
        "{unreadable}"
    );

    let not_pem = redis.dir.path().join("redis.conf");
    let garbage = connect(redis.url("app", PASSWORD), Some(not_pem)).await;
    assert!(garbage.contains("holds no certificate"), "{garbage}");

    // The command line says the same, with the address and without the password.
    let (ok, _, err) = common::cli(&[
        "workers",
        "--redis-url",
        &redis.url("app", "wrong-Pa55"),
        "--redis-ca-file",
        &redis.ca().display().to_string(),
        "--prefix",
        &prefix,
    ]);
    assert!(!ok);
    assert!(err.contains(&redacted), "{err}");
    assert!(!err.contains("wrong-Pa55"), "{err}");
}

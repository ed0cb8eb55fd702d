//! API keys: who may call what.
//!
//! `multiagents serve --api-keys FILE` reads one key a line,
//! `NAME SCOPES SHA256HEX`: a name for logs and the audit trail, scopes
//! comma-separated from `read`, `operate`, `admin` and `worker`, and the
//! SHA-256 of the key in hex. The key itself is never stored; `multiagents
//! keys new` prints a fresh one once, with its line. Requests send it as
//! `Authorization: Bearer KEY`; it is hashed and compared with every
//! line's hash in constant time.
//!
//! | scope | allows |
//! | --- | --- |
//! | `read` | every `GET` (runs, definitions, dead letters, workers, events, metrics) |
//! | `operate` | `read`, and starting, signalling, cancelling and retrying runs, redriving dead letters |
//! | `admin` | everything: `operate`, `worker`, deploying definitions, discarding dead letters |
//! | `worker` | the task routes of HTTP workers (`/v1/tasks/…`) |
//!
//! `/healthz` and `/readyz` need no key.

use std::fmt;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{Problem, Service};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read everything.
    Read,
    /// Start, signal, cancel and retry runs; redrive dead letters.
    Operate,
    /// Everything.
    Admin,
    /// Take and answer tasks, as an HTTP worker.
    Worker,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Operate, Scope::Admin, Scope::Worker];

    /// Its name in the keys file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
            Scope::Worker => "worker",
        }
    }

    /// True when a key with this scope may do what `needed` allows.
    pub fn allows(self, needed: Scope) -> bool {
        match (self, needed) {
            (Scope::Admin, _) => true,
            (Scope::Operate, Scope::Read | Scope::Operate) => true,
            (have, need) => have == need,
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}`; use read, operate, admin or worker"))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the keys file.
#[derive(Clone, Debug)]
struct KeyLine {
    name: Arc<str>,
    scopes: Vec<Scope>,
    hash: [u8; 32],
}

/// The API keys a service accepts: the names, scopes and SHA-256 hashes of
/// the keys, never the keys.
///
/// ```
/// use multiagents_server::{ApiKeys, Scope};
///
/// let (key, line) = ApiKeys::generate("ci", &[Scope::Operate]).expect("random");
/// let keys = ApiKeys::parse(&line).expect("valid");
/// assert_eq!(keys.check(&key).map(|(name, _)| name), Some("ci"));
/// assert!(keys.check("mak_wrong").is_none());
/// ```
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    lines: Vec<KeyLine>,
}

/// A keys file that cannot be used, with the line at fault.
#[derive(Debug, thiserror::Error)]
#[error("{path}line {line}: {problem}")]
pub struct KeysError {
    path: String,
    line: usize,
    problem: String,
}

impl ApiKeys {
    /// Reads a keys file: `NAME SCOPES SHA256HEX` a line, blank lines and
    /// `#` comments allowed.
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        let mut lines = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let problem = |problem: String| KeysError {
                path: String::new(),
                line: n + 1,
                problem,
            };
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [name, scopes, hash] = parts[..] else {
                return Err(problem(format!(
                    "expected `NAME SCOPES SHA256HEX`, found {} field(s)",
                    parts.len()
                )));
            };
            let scopes = scopes
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<Scope>, String>>()
                .map_err(problem)?;
            let hash = unhex(hash).ok_or_else(|| {
                problem("the hash must be 64 hex digits (the key's SHA-256)".into())
            })?;
            if lines.iter().any(|l: &KeyLine| &*l.name == name) {
                return Err(problem(format!("the name `{name}` is used twice")));
            }
            lines.push(KeyLine {
                name: name.into(),
                scopes,
                hash,
            });
        }
        Ok(Self { lines })
    }

    /// Reads the keys file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeysError {
            path: format!("{}: ", path.display()),
            line: 0,
            problem: format!("cannot be read: {e}"),
        })?;
        Self::parse(&text).map_err(|mut e| {
            e.path = format!("{}: ", path.display());
            e
        })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True with no keys at all.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The name and scopes of `key`, if it is one of these. Every line is
    /// compared, in constant time, whichever matches.
    pub fn check(&self, key: &str) -> Option<(&str, &[Scope])> {
        let digest = sha256(key.as_bytes());
        let mut found = None;
        for line in &self.lines {
            if constant_time_eq(&line.hash, &digest) {
                found = Some(line);
            }
        }
        found.map(|l| (&*l.name, l.scopes.as_slice()))
    }

    /// A fresh random key for `name` with `scopes`, and the line of the
    /// keys file that accepts it. Show the key once; keep only the line.
    pub fn generate(name: &str, scopes: &[Scope]) -> Result<(String, String), String> {
        use ring::rand::SecureRandom as _;
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '#') {
            return Err(format!(
                "`{name}` cannot name a key: use letters, digits and punctuation, no spaces or #"
            ));
        }
        if scopes.is_empty() {
            return Err("give the key at least one scope".into());
        }
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| "the system has no randomness to give".to_string())?;
        let key = format!("mak_{}", hex(&bytes));
        let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let line = format!(
            "{name} {} {}",
            scopes.join(","),
            hex(&sha256(key.as_bytes()))
        );
        Ok((key, line))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The scope a request needs, `None` for one anyone may make.
fn needed(method: &Method, path: &str) -> Option<Scope> {
    if matches!(path, "/healthz" | "/readyz" | "/openapi.json") || crate::ui::is_ui(path) {
        return None;
    }
    if path.starts_with("/v1/tasks/") {
        return Some(Scope::Worker);
    }
    if *method == Method::GET || *method == Method::HEAD {
        return Some(Scope::Read);
    }
    if path == "/v1/definitions" || *method == Method::DELETE {
        return Some(Scope::Admin);
    }
    Some(Scope::Operate)
}

/// The caller of a request: the name of the API key it presented, or
/// `anonymous` when the service requires none. Recorded where people will
/// want to know who did it (the dead-letter audit log).
#[derive(Clone, Debug)]
pub(crate) struct Caller(pub(crate) Arc<str>);

impl Caller {
    pub(crate) fn name(&self) -> &str {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller("anonymous".into())))
    }
}

/// The scopes of the caller's key, for the routes that show them.
#[derive(Clone, Debug)]
pub(crate) struct Granted(pub(crate) Vec<Scope>);

/// `GET /v1/me`: the caller's key name and scopes (every scope when the
/// service requires no key), so that a UI can hide what it may not do.
pub(crate) async fn me(
    State(service): State<Service>,
    caller: Caller,
    request: Request,
) -> Response {
    let scopes: Vec<&str> = match request.extensions().get::<Granted>() {
        Some(Granted(scopes)) => scopes.iter().map(|s| s.as_str()).collect(),
        None => Scope::ALL.iter().map(|s| s.as_str()).collect(),
    };
    axum::Json(serde_json::json!({
        "name": caller.name(),
        "scopes": scopes,
        "keys_required": service.keys().is_some(),
    }))
    .into_response()
}

fn unauthorized(detail: &str) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "An API key is needed",
        detail,
    )
    .field("header.Authorization")
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"multiagents\""),
    );
    response
}

/// Checks the key of every request against the service's keys, when it has
/// any.
pub(crate) async fn require_key(
    State(service): State<Service>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(keys) = service.keys() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    // Who am I: any valid key may ask.
    let me = path == "/v1/me";
    let Some(scope) = needed(request.method(), path) else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let key = match presented {
        None => {
            return unauthorized("send `Authorization: Bearer KEY`; this service requires a key");
        }
        Some(value) => match value.strip_prefix("Bearer ") {
            Some(key) => key.trim(),
            None => return unauthorized("the Authorization header must be `Bearer KEY`"),
        },
    };
    let Some((name, scopes)) = keys.check(key) else {
        return unauthorized("the key is not one of this service's keys");
    };
    if !me && !scopes.iter().any(|s| s.allows(scope)) {
        let have: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        return Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "The key may not do this",
            format!(
                "this needs the `{scope}` scope; key `{name}` has {}",
                have.join(", ")
            ),
        )
        .field("header.Authorization")
        .into_response();
    }
    let granted = Granted(scopes.to_vec());
    request.extensions_mut().insert(Caller(name.into()));
    request.extensions_mut().insert(granted);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_worker_stands_apart() {
        assert!(Scope::Admin.allows(Scope::Worker));
        assert!(Scope::Operate.allows(Scope::Read));
        assert!(!Scope::Operate.allows(Scope::Admin));
        assert!(!Scope::Read.allows(Scope::Operate));
        assert!(!Scope::Worker.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Worker));
    }

    #[test]
    fn a_bad_keys_file_names_the_line() {
        let hash = "ab".repeat(32);
        let err = ApiKeys::parse(&format!("# keys\nops read {hash}\nci rwx {hash}\n"))
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "line 3: unknown scope `rwx`; use read, operate, admin or worker"
        );
        let err = ApiKeys::parse("ops read abc").expect_err("refused");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let err = ApiKeys::parse("ops read").expect_err("refused");
        assert!(err.to_string().contains("found 2 field(s)"), "{err}");
        let err = ApiKeys::parse(&format!("a read {hash}\na admin {hash}")).expect_err("refused");
        assert!(err.to_string().contains("used twice"), "{err}");
    }

    #[test]
    fn routes_need_the_scopes_the_docs_give() {
        assert_eq!(needed(&Method::GET, "/healthz"), None);
        assert_eq!(needed(&Method::GET, "/openapi.json"), None);
        assert_eq!(needed(&Method::GET, "/ui/"), None);
        assert_eq!(needed(&Method::GET, "/ui/app.js"), None);
        assert_eq!(needed(&Method::GET, "/uix"), Some(Scope::Read));
        assert_eq!(needed(&Method::GET, "/v1/runs"), Some(Scope::Read));
        assert_eq!(needed(&Method::GET, "/metrics"), Some(Scope::Read));
        assert_eq!(
            needed(&Method::POST, "/v1/workflows/x/runs"),
            Some(Scope::Operate)
        );
        assert_eq!(
            needed(&Method::POST, "/v1/dead-letters/1-0/redrive"),
            Some(Scope::Operate)
        );
        assert_eq!(needed(&Method::POST, "/v1/definitions"), Some(Scope::Admin));
        assert_eq!(
            needed(&Method::DELETE, "/v1/dead-letters/1-0"),
            Some(Scope::Admin)
        );
        assert_eq!(needed(&Method::POST, "/v1/tasks/poll"), Some(Scope::Worker));
    }

    #[test]
    fn a_generated_key_is_accepted_by_its_line_only() {
        let (key, line) = ApiKeys::generate("ops", &[Scope::Read, Scope::Worker]).expect("key");
        assert!(key.starts_with("mak_") && key.len() == 68, "{key}");
        assert!(!line.contains(&key), "the line must not hold the key");
        let keys = ApiKeys::parse(&line).expect("valid");
        assert_eq!(
            keys.check(&key),
            Some(("ops", &[Scope::Read, Scope::Worker][..]))
        );
        let (other, _) = ApiKeys::generate("ops", &[Scope::Read]).expect("key");
        assert_ne!(other, key);
        assert!(keys.check(&other).is_none());
        assert!(ApiKeys::generate("has space", &[Scope::Read]).is_err());
        assert!(ApiKeys::generate("ops", &[]).is_err());
    }
}

//! Replies kept for reuse: a response cache in memory, a recording to a
//! JSON-lines file, or a playback from one — so that tests and demos run
//! deterministically without a server.
//!
//! A reply is keyed by the exact request the client would send (model,
//! messages, options): the same program with the same inputs gets the same
//! reply. Each line of a file is `{"key": …, "reply": {"content": …,
//! "finish_reason": …, "usage": …, "model": …}}`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{ChatResponse, LlmError, Usage};

/// Where replies come from and go to.
#[derive(Debug)]
pub struct Replay {
    mode: Mode,
    replies: Mutex<HashMap<String, Stored>>,
}

#[derive(Debug)]
enum Mode {
    /// Serve repeats from memory; call the server otherwise.
    Cache,
    /// Call the server and append every new reply to the file.
    Record(PathBuf),
    /// Only the file: a request it lacks is an error.
    Playback(PathBuf),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<super::ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finish_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
    #[serde(default)]
    model: String,
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    reply: Stored,
}

impl Replay {
    /// A response cache in memory.
    pub fn cache() -> Self {
        Self {
            mode: Mode::Cache,
            replies: Mutex::new(HashMap::new()),
        }
    }

    /// Records new replies to `path` (appending; replies already in it are
    /// served from it).
    pub fn record(path: impl AsRef<Path>) -> Result<Self, LlmError> {
        let path = path.as_ref().to_path_buf();
        let replies = if path.exists() {
            load(&path)?
        } else {
            HashMap::new()
        };
        Ok(Self {
            mode: Mode::Record(path),
            replies: Mutex::new(replies),
        })
    }

    /// Plays back the replies in `path`; no server is called.
    pub fn playback(path: impl AsRef<Path>) -> Result<Self, LlmError> {
        let path = path.as_ref().to_path_buf();
        Ok(Self {
            replies: Mutex::new(load(&path)?),
            mode: Mode::Playback(path),
        })
    }

    /// How many replies it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.replies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kept reply for `key`; in playback, an error when there is none.
    pub(super) fn lookup(&self, key: &str) -> Result<Option<ChatResponse>, LlmError> {
        let found = self.lock().get(key).cloned();
        match (found, &self.mode) {
            (Some(s), _) => Ok(Some(ChatResponse {
                content: s.content,
                tool_calls: s.tool_calls,
                finish_reason: s.finish_reason,
                usage: s.usage,
                model: s.model,
                attempts: 0,
            })),
            (None, Mode::Playback(path)) => Err(LlmError::Replay(format!(
                "{} has no reply for this request (key {key}); the prompt or inputs changed since it was recorded: record again with a live endpoint",
                path.display()
            ))),
            (None, _) => Ok(None),
        }
    }

    /// Keeps a new reply (and appends it to the file when recording).
    pub(super) fn store(&self, key: &str, reply: &ChatResponse) -> Result<(), LlmError> {
        let stored = Stored {
            content: reply.content.clone(),
            tool_calls: reply.tool_calls.clone(),
            finish_reason: reply.finish_reason.clone(),
            usage: reply.usage,
            model: reply.model.clone(),
        };
        if let Mode::Record(path) = &self.mode {
            let line = serde_json::to_string(&Line {
                key: key.to_string(),
                reply: stored.clone(),
            })
            .map_err(|e| LlmError::Replay(e.to_string()))?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}").map(|_| f))
                .map_err(|e| LlmError::Replay(format!("cannot write {}: {e}", path.display())))?;
            let _ = file.flush();
        }
        self.lock().insert(key.to_string(), stored);
        Ok(())
    }
}

fn load(path: &Path) -> Result<HashMap<String, Stored>, LlmError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LlmError::Replay(format!("cannot read {}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| LlmError::Replay(format!("{} line {}: {e}", path.display(), n + 1)))?;
        out.insert(l.key, l.reply);
    }
    Ok(out)
}

/// A stable key for a request body: two FNV-1a hashes, in hex.
pub(super) fn key(body: &[u8]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for &byte in body {
        a ^= u64::from(byte);
        a = a.wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ u64::from(byte))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    format!("{a:016x}{b:016x}")
}

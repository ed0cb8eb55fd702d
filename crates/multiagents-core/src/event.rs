//! The wire format: one envelope for every event on the bus.
//!
//! Commands ask a worker to run a step, compensations ask it to undo one,
//! results and errors answer, status events tell the world what happened.
//! Decoding is total: any byte string yields an [`Event`] or an
//! [`EventError`] saying what was wrong, never a panic.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{CorrelationId, EventId, StepName, TransactionId, WorkflowName};
use crate::payload::Payload;
use crate::time::Timestamp;

/// The version of the envelope layout written by this build.
pub const SCHEMA_VERSION: u16 = 1;

/// Default upper bound for one encoded event: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// What an event is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Run a step (orchestrator → worker).
    Command,
    /// A step or compensation finished (worker → orchestrator).
    Result,
    /// A step or compensation failed (worker → orchestrator).
    Error,
    /// Undo a completed step (orchestrator → worker).
    Compensation,
    /// Something happened to a workflow (broadcast, fire-and-forget).
    Status,
}

/// Whether an event is about running a step or about undoing it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step itself.
    #[default]
    Forward,
    /// The step's compensation.
    Compensate,
}

impl Phase {
    fn is_forward(&self) -> bool {
        *self == Phase::Forward
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Forward => "forward",
            Phase::Compensate => "compensate",
        })
    }
}

/// The envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Envelope layout version ([`SCHEMA_VERSION`]).
    pub schema: u16,
    /// Unique id (UUIDv7, time-ordered).
    pub id: EventId,
    /// What the event is for.
    pub kind: EventKind,
    /// The workflow instance.
    pub transaction_id: TransactionId,
    /// The request chain that caused it.
    pub correlation_id: CorrelationId,
    /// The event that caused this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<EventId>,
    /// The workflow definition's name.
    pub workflow: WorkflowName,
    /// The step concerned (absent on workflow-level status events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepName>,
    /// Forward or compensation (omitted when forward).
    #[serde(default, skip_serializing_if = "Phase::is_forward")]
    pub phase: Phase,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// When the event was created.
    pub created_at: Timestamp,
    /// When the work it asks for must be done by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// W3C trace context of the span that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Arc<str>>,
    /// The data: a command's input, a result's output, an error's [`StepError`].
    pub payload: Payload,
    /// On results and errors: how the worker handled the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
}

/// How a worker handled a command, carried on its result so that the
/// lifecycle (dispatch → pickup → processing → completion) is stored with the
/// workflow, whichever process did each part.
///
/// It is written compactly, since every step's history entry carries one:
/// `[instance, picked_up_at, started − picked_up, finished − picked_up]`
/// (milliseconds), e.g. `["worker-7",1795478441174,0,4]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "TimingWire", from = "TimingWire")]
pub struct Timing {
    /// The worker process that ran it.
    pub instance: Arc<str>,
    /// When the command was taken from the bus.
    pub picked_up_at: Timestamp,
    /// When the worker body started.
    pub started_at: Timestamp,
    /// When it finished.
    pub finished_at: Timestamp,
}

/// [`Timing`] as written: instance, pickup, then offsets from the pickup.
#[derive(Serialize, Deserialize)]
struct TimingWire(Arc<str>, u64, u64, u64);

impl From<Timing> for TimingWire {
    fn from(t: Timing) -> Self {
        let base = t.picked_up_at.as_millis();
        TimingWire(
            t.instance,
            base,
            t.started_at.as_millis().saturating_sub(base),
            t.finished_at.as_millis().saturating_sub(base),
        )
    }
}

impl From<TimingWire> for Timing {
    fn from(TimingWire(instance, base, started, finished): TimingWire) -> Self {
        Timing {
            instance,
            picked_up_at: Timestamp(base),
            started_at: Timestamp(base.saturating_add(started)),
            finished_at: Timestamp(base.saturating_add(finished)),
        }
    }
}

impl Event {
    /// An event of `kind` for one step of one transaction, with a fresh id and
    /// the current time. Callers set the rest (step, phase, attempt,
    /// deadline…) on the public fields.
    pub fn new(
        kind: EventKind,
        transaction_id: TransactionId,
        correlation_id: CorrelationId,
        workflow: WorkflowName,
        payload: Payload,
    ) -> Self {
        let now = Timestamp::now();
        Self {
            schema: SCHEMA_VERSION,
            id: EventId::at(now),
            kind,
            transaction_id,
            correlation_id,
            causation_id: None,
            workflow,
            step: None,
            phase: Phase::Forward,
            attempt: 1,
            created_at: now,
            deadline: None,
            traceparent: None,
            payload,
            timing: None,
        }
    }

    /// A cheap estimate of the encoded size (payload plus envelope), used by
    /// in-process buses that never encode.
    pub fn approx_size(&self) -> usize {
        self.payload.len()
            + self.workflow.as_str().len()
            + self.step.as_ref().map_or(0, |s| s.as_str().len())
            + self.traceparent.as_ref().map_or(0, |t| t.len())
            + 320
    }

    /// The answer to this command: a `kind` event (a result or an error)
    /// carrying `payload`, for the same workflow, step, phase and attempt,
    /// caused by this one and continuing its trace.
    ///
    /// ```
    /// use multiagents_core::{CorrelationId, Event, EventKind, Payload, TransactionId, WorkflowName};
    ///
    /// let mut command = Event::new(EventKind::Command, TransactionId::new(), CorrelationId::new(),
    ///     WorkflowName::new("orders"), Payload::null());
    /// command.step = Some("charge".into());
    /// command.attempt = 2;
    /// let answer = command.answer(EventKind::Result, Payload::null());
    /// assert_eq!((answer.step, answer.attempt, answer.causation_id), (command.step, 2, Some(command.id)));
    /// ```
    pub fn answer(&self, kind: EventKind, payload: Payload) -> Event {
        let mut answer = Event::new(
            kind,
            self.transaction_id,
            self.correlation_id,
            self.workflow.clone(),
            payload,
        );
        answer.causation_id = Some(self.id);
        answer.step = self.step.clone();
        answer.phase = self.phase;
        answer.attempt = self.attempt;
        answer.traceparent = self.traceparent.clone();
        answer
    }

    /// The idempotency key a worker gets for this command: the same for
    /// every attempt and every redelivery of this step in this phase.
    pub fn idempotency_key(&self) -> String {
        idempotency_key(
            self.transaction_id,
            self.step.as_ref().map_or("", |s| s.as_str()),
            self.phase,
        )
    }

    /// The per-attempt key beside it: the same for every redelivery of this
    /// attempt, different for the next one.
    pub fn attempt_key(&self) -> String {
        attempt_key(
            self.transaction_id,
            self.step.as_ref().map_or("", |s| s.as_str()),
            self.phase,
            self.attempt,
        )
    }
}

/// `transaction/step/phase`: the key that makes a step's side effect
/// exactly-once, whatever number of attempts and redeliveries it takes
/// (Temporal's workflow id + activity id). A fan-out branch's step is
/// `step[i]`, so each branch has its own key.
pub fn idempotency_key(tx: TransactionId, step: &str, phase: Phase) -> String {
    use std::fmt::Write as _;
    // Sized once: a hyphenated UUID is 36 bytes, the longest phase 10.
    let mut key = String::with_capacity(36 + step.len() + 12);
    let _ = write!(key, "{tx}/{step}/{phase}");
    key
}

/// `transaction/step/phase/attempt`: one key per attempt, for the rare API
/// that remembers a failure under its key and would answer every retry with
/// it.
pub fn attempt_key(tx: TransactionId, step: &str, phase: Phase, attempt: u32) -> String {
    use std::fmt::Write as _;
    let mut key = String::with_capacity(36 + step.len() + 23);
    let _ = write!(key, "{tx}/{step}/{phase}/{attempt}");
    key
}

/// How a failed step wants to be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode", content = "after_ms")]
pub enum RetryDirective {
    /// Retry under the step's retry policy (transient failure).
    #[default]
    Retry,
    /// Retry, but not before this many milliseconds.
    RetryAfter(u64),
    /// Do not retry: the step has failed for good.
    Never,
}

impl RetryDirective {
    /// `RetryAfter` from a duration.
    pub fn after(d: Duration) -> Self {
        Self::RetryAfter(d.as_millis().min(u64::MAX as u128) as u64)
    }
}

/// The payload of an [`EventKind::Error`] event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// What went wrong, for people.
    pub message: String,
    /// Whether and when to retry.
    #[serde(default)]
    pub retry: RetryDirective,
    /// What kind of error it is, for branching and grouping (`timeout`,
    /// `invalid_input`, or a kind the worker chose, `declined` say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<StepErrorKind>,
}

/// The kind of a [`StepError`]: the kinds the framework itself gives, each
/// a variant, and the kinds workers choose, as [`StepErrorKind::Custom`].
///
/// On the wire and in persisted states a kind is its name, a short
/// snake_case string (`timeout`, `invalid_input`, `declined`), so states
/// and events written before this type existed read the same; a name that
/// is one of the framework's reads as its variant, whoever wrote it.
///
/// ```
/// use multiagents_core::StepErrorKind;
///
/// assert_eq!(StepErrorKind::from("timeout"), StepErrorKind::Timeout);
/// assert_eq!(StepErrorKind::from("declined").as_str(), "declined");
/// let kind: StepErrorKind = serde_json::from_str("\"signal_timeout\"").unwrap();
/// assert_eq!(kind, StepErrorKind::SignalTimeout);
/// assert_eq!(serde_json::to_string(&StepErrorKind::custom("out_of_stock")).unwrap(), "\"out_of_stock\"");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum StepErrorKind {
    /// The attempt ran past its step timeout (or a worker's call past its
    /// deadline).
    Timeout,
    /// A signal step waited past its timeout.
    SignalTimeout,
    /// A step's `when` condition could not be evaluated.
    Condition,
    /// A `for_each` expression did not give a list, or too long a one.
    ForEach,
    /// A sub-workflow failed, was compensated or timed out.
    SubWorkflow,
    /// The worker could not read its input.
    InvalidInput,
    /// The call was interrupted (cancelled, or its process stopped).
    Interrupted,
    /// An LLM step would go over its token budget.
    TokenBudget,
    /// An LLM answered with output the program could not parse.
    BadLlmOutput,
    /// The LLM endpoint could not be reached or was overloaded.
    LlmUnavailable,
    /// The LLM endpoint refused the request for good.
    LlmRefused,
    /// A kind the worker chose.
    Custom(Box<str>),
}

impl StepErrorKind {
    /// Every kind the framework gives, by name.
    const NAMED: [(&'static str, StepErrorKind); 11] = [
        ("timeout", StepErrorKind::Timeout),
        ("signal_timeout", StepErrorKind::SignalTimeout),
        ("condition", StepErrorKind::Condition),
        ("for_each", StepErrorKind::ForEach),
        ("sub_workflow", StepErrorKind::SubWorkflow),
        ("invalid_input", StepErrorKind::InvalidInput),
        ("interrupted", StepErrorKind::Interrupted),
        ("token_budget", StepErrorKind::TokenBudget),
        ("bad_llm_output", StepErrorKind::BadLlmOutput),
        ("llm_unavailable", StepErrorKind::LlmUnavailable),
        ("llm_refused", StepErrorKind::LlmRefused),
    ];

    /// A kind by name: the framework's variant when the name is one of
    /// its kinds, else [`StepErrorKind::Custom`].
    pub fn custom(name: impl AsRef<str> + Into<Box<str>>) -> Self {
        match Self::NAMED.iter().find(|(n, _)| *n == name.as_ref()) {
            Some((_, kind)) => kind.clone(),
            None => StepErrorKind::Custom(name.into()),
        }
    }

    /// Its name, as written on the wire and shown by monitors.
    pub fn as_str(&self) -> &str {
        match self {
            StepErrorKind::Custom(name) => name,
            known => Self::NAMED
                .iter()
                .find(|(_, k)| k == known)
                .map_or("error", |(n, _)| n),
        }
    }

    /// True for a kind the framework gives, false for one a worker chose.
    pub fn is_builtin(&self) -> bool {
        !matches!(self, StepErrorKind::Custom(_))
    }
}

impl fmt::Display for StepErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for StepErrorKind {
    fn from(name: &str) -> Self {
        Self::custom(name)
    }
}

impl From<String> for StepErrorKind {
    fn from(name: String) -> Self {
        Self::custom(name)
    }
}

impl PartialEq<str> for StepErrorKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for StepErrorKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for StepErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for StepErrorKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Self::custom(name.into_owned()))
    }
}

impl StepError {
    /// A transient error.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: RetryDirective::Retry,
            kind: None,
        }
    }

    /// A permanent error.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: RetryDirective::Never,
            kind: None,
        }
    }

    /// Sets the kind.
    pub fn with_kind(mut self, kind: impl Into<StepErrorKind>) -> Self {
        self.kind = Some(kind.into());
        self
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Some(kind) => write!(f, "{kind}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Why an event could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// The event is larger than the configured limit.
    #[error("event is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The bytes are not an event envelope.
    #[error("undecodable event: {0}")]
    Malformed(String),
    /// The envelope was written by an incompatible version.
    #[error(
        "event schema version {found} is not supported (this build reads up to {SCHEMA_VERSION})"
    )]
    UnsupportedSchema {
        /// The version found.
        found: u16,
    },
}

/// Encodes and decodes events as JSON, enforcing a size limit both ways.
#[derive(Clone, Copy, Debug)]
pub struct EventCodec {
    max_bytes: usize,
}

impl Default for EventCodec {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

impl EventCodec {
    /// A codec with a size limit in bytes.
    pub fn with_limit(max_bytes: usize) -> Self {
        Self { max_bytes }
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.max_bytes
    }

    /// Encodes, refusing events over the limit.
    pub fn encode(&self, event: &Event) -> Result<Vec<u8>, EventError> {
        let bytes = serde_json::to_vec(event).map_err(|e| EventError::Malformed(e.to_string()))?;
        if bytes.len() > self.max_bytes {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                limit: self.max_bytes,
            });
        }
        Ok(bytes)
    }

    /// Decodes, refusing oversized input before parsing it.
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, EventError> {
        if bytes.len() > self.max_bytes {
            return Err(EventError::TooLarge {
                size: bytes.len(),
                limit: self.max_bytes,
            });
        }
        #[derive(Deserialize)]
        struct Probe {
            schema: Option<u16>,
        }
        let unsupported = |found: u16| found > SCHEMA_VERSION || found == 0;
        match serde_json::from_slice::<Event>(bytes) {
            Ok(event) if unsupported(event.schema) => Err(EventError::UnsupportedSchema {
                found: event.schema,
            }),
            Ok(event) => Ok(event),
            // A newer envelope may fail on a field this build does not know:
            // say that its version is the problem, not the field.
            Err(e) => match serde_json::from_slice::<Probe>(bytes) {
                Ok(Probe {
                    schema: Some(found),
                }) if unsupported(found) => Err(EventError::UnsupportedSchema { found }),
                _ => Err(EventError::Malformed(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn step_error_kinds_read_and_write_as_their_names() {
        // The layout written before kinds were typed.
        for (text, kind) in [
            (
                r#"{"message":"late","retry":{"mode":"retry"},"kind":"timeout"}"#,
                StepErrorKind::Timeout,
            ),
            (
                r#"{"message":"no","retry":{"mode":"never"},"kind":"declined"}"#,
                StepErrorKind::Custom("declined".into()),
            ),
            (
                r#"{"message":"bad","retry":{"mode":"never"},"kind":"invalid_input"}"#,
                StepErrorKind::InvalidInput,
            ),
        ] {
            let error: StepError = serde_json::from_str(text).expect("an old step error reads");
            assert_eq!(error.kind.as_ref(), Some(&kind));
            assert_eq!(serde_json::to_string(&error).expect("encodes"), text);
        }
        // Every framework kind goes round by its name, and no custom name
        // shadows one.
        for (name, kind) in StepErrorKind::NAMED {
            assert!(kind.is_builtin());
            assert_eq!(kind.as_str(), name);
            assert_eq!(StepErrorKind::custom(name), kind);
            assert_eq!(StepErrorKind::from(name.to_string()), kind);
        }
        assert!(!StepErrorKind::from("out_of_stock").is_builtin());
        assert_eq!(
            StepError::fatal("x").with_kind("for_each").to_string(),
            "for_each: x"
        );
    }

    fn sample() -> Event {
        let mut e = Event::new(
            EventKind::Command,
            TransactionId::new(),
            CorrelationId::new(),
            WorkflowName::new("orders"),
            Payload::from_json_str(r#"{"input":{"id":7},"steps":{}}"#).expect("valid json"),
        );
        e.step = Some(StepName::new("charge"));
        e.attempt = 2;
        e.deadline = Some(Timestamp(1_700_000_000_000));
        e.traceparent = Some(Arc::from(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        e
    }

    #[test]
    fn round_trips() {
        let codec = EventCodec::default();
        let e = sample();
        let bytes = codec.encode(&e).expect("encodes");
        assert_eq!(codec.decode(&bytes).expect("decodes"), e);
    }

    #[test]
    fn compensation_phase_round_trips_and_forward_is_omitted() {
        let codec = EventCodec::default();
        let mut e = sample();
        let text = String::from_utf8(codec.encode(&e).expect("encodes")).expect("utf8");
        assert!(!text.contains("phase"));
        e.phase = Phase::Compensate;
        e.kind = EventKind::Compensation;
        let bytes = codec.encode(&e).expect("encodes");
        assert_eq!(
            codec.decode(&bytes).expect("decodes").phase,
            Phase::Compensate
        );
    }

    #[test]
    fn refuses_oversized_both_ways() {
        let codec = EventCodec::with_limit(200);
        let e = sample();
        assert!(matches!(
            codec.encode(&e),
            Err(EventError::TooLarge { limit: 200, .. })
        ));
        let big = EventCodec::default().encode(&e).expect("encodes");
        assert!(matches!(
            codec.decode(&big),
            Err(EventError::TooLarge { .. })
        ));
    }

    #[test]
    fn refuses_future_schema_and_wrong_shapes() {
        let codec = EventCodec::default();
        let mut v: serde_json::Value =
            serde_json::from_slice(&codec.encode(&sample()).expect("encodes")).expect("json");
        v["schema"] = 99.into();
        let bytes = serde_json::to_vec(&v).expect("json");
        assert_eq!(
            codec.decode(&bytes),
            Err(EventError::UnsupportedSchema { found: 99 })
        );
        v["schema"] = 1.into();
        v["kind"] = "teleport".into();
        let bytes = serde_json::to_vec(&v).expect("json");
        assert!(
            matches!(codec.decode(&bytes), Err(EventError::Malformed(m)) if m.contains("teleport"))
        );
        assert!(matches!(
            codec.decode(b"[1,2,3]"),
            Err(EventError::Malformed(_))
        ));
        assert!(matches!(codec.decode(b""), Err(EventError::Malformed(_))));
    }

    #[test]
    fn timing_is_written_compactly_and_reads_back() {
        let t = Timing {
            instance: "worker-7".into(),
            picked_up_at: Timestamp(1_000),
            started_at: Timestamp(1_001),
            finished_at: Timestamp(1_005),
        };
        let text = serde_json::to_string(&t).expect("json");
        assert_eq!(text, r#"["worker-7",1000,1,5]"#);
        assert_eq!(serde_json::from_str::<Timing>(&text).expect("back"), t);
    }

    #[test]
    fn idempotency_key_is_stable_per_step_and_the_attempt_key_per_attempt() {
        let e = sample();
        let mut redelivered = e.clone();
        redelivered.id = EventId::new();
        assert_eq!(e.idempotency_key(), redelivered.idempotency_key());
        assert_eq!(e.attempt_key(), redelivered.attempt_key());
        let mut next = e.clone();
        next.attempt += 1;
        assert_eq!(e.idempotency_key(), next.idempotency_key());
        assert_ne!(e.attempt_key(), next.attempt_key());
        let mut undo = e.clone();
        undo.phase = Phase::Compensate;
        assert_ne!(e.idempotency_key(), undo.idempotency_key());
        let mut other = e.clone();
        other.step = Some("other".into());
        assert_ne!(e.idempotency_key(), other.idempotency_key());
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = EventCodec::default().decode(&bytes);
        }

        #[test]
        fn decoding_mutated_events_never_panics(pos in 0usize..400, byte in any::<u8>(), cut in 0usize..400) {
            let mut bytes = EventCodec::default().encode(&sample()).expect("encodes");
            let len = bytes.len();
            bytes[pos % len] = byte;
            bytes.truncate(cut.max(1).min(len));
            let _ = EventCodec::default().decode(&bytes);
        }

        #[test]
        fn deeply_nested_payloads_do_not_overflow(depth in 1usize..5000) {
            let text = format!(
                r#"{{"schema":1,"payload":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let _ = EventCodec::default().decode(text.as_bytes());
        }
    }
}

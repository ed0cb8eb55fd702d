//! OpenTelemetry traces: one trace per workflow, across processes.
//!
//! The trace id is the workflow's transaction id, and the workflow's own
//! span id is derived from it, so every process can name the workflow span as
//! parent without asking anyone. The orchestrator opens a `dispatch <step>`
//! (or `compensate <step>`) span for each command and puts its W3C
//! `traceparent` on the command; the worker's `run <step>` span is its child,
//! in whichever process runs it; when the workflow ends, the orchestrator
//! emits the `workflow <name>` span from start to finish. Spans go to the
//! global tracer provider: [`init_tracing`] sets one that exports over
//! OTLP/HTTP; with none set, nothing is built. All of this needs the cargo
//! feature `otel`; without it no span is ever built.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};

use crate::core::{Phase, StepName, Timestamp, TransactionId, WorkflowState};

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported by this process.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Tells the runtime that a tracer provider of your own is set globally, so
/// that it builds spans. (The workflow span then gets an id of the
/// provider's choosing, not the derived one.)
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

const TRACER: &str = "multiagents";

/// The workflow span's context: trace id = the transaction id; span id
/// derived from it (never zero).
pub fn workflow_context(tx: TransactionId) -> SpanContext {
    let bytes = *tx.0.as_bytes();
    let mut span = [0u8; 8];
    for (i, b) in bytes.iter().enumerate() {
        span[i % 8] ^= b.rotate_left(i as u32 % 8);
    }
    if span == [0; 8] {
        span[7] = 1;
    }
    SpanContext::new(
        TraceId::from_bytes(bytes),
        SpanId::from_bytes(span),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// `00-<trace>-<span>-<flags>`.
pub fn traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// Parses a W3C `traceparent`.
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let cx = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

fn system_time(t: Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(t.as_millis())
}

/// The attributes every span about a workflow carries.
fn workflow_attributes(state: &WorkflowState) -> [KeyValue; 3] {
    [
        KeyValue::new(
            "multiagents.transaction_id",
            state.transaction_id.to_string(),
        ),
        KeyValue::new(
            "multiagents.correlation_id",
            state.correlation_id.to_string(),
        ),
        KeyValue::new("multiagents.workflow", state.workflow.to_string()),
    ]
}

/// The span of one command's dispatch; returns the `traceparent` for the
/// command, or `None` when tracing is off.
pub(crate) fn dispatch(
    state: &WorkflowState,
    step: &StepName,
    phase: Phase,
    attempt: u32,
    worker: &str,
) -> Option<String> {
    if !enabled() {
        return None;
    }
    let tracer = global::tracer(TRACER);
    let parent = Context::new().with_remote_span_context(workflow_context(state.transaction_id));
    let verb = match phase {
        Phase::Forward => "dispatch",
        Phase::Compensate => "compensate",
    };
    let mut span = tracer
        .span_builder(format!("{verb} {step}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(workflow_attributes(state).into_iter().chain([
            KeyValue::new("multiagents.step", step.to_string()),
            KeyValue::new("multiagents.phase", phase.to_string()),
            KeyValue::new("multiagents.attempt", i64::from(attempt)),
            KeyValue::new("multiagents.worker", worker.to_string()),
        ]))
        .start_with_context(&tracer, &parent);
    let tp = traceparent(span.span_context());
    span.end();
    Some(tp)
}

/// The workflow's own span, from start to finish, emitted when it ends.
pub(crate) fn workflow_finished(state: &WorkflowState) {
    if !enabled() {
        return;
    }
    let tracer = global::tracer(TRACER);
    let cx = workflow_context(state.transaction_id);
    let mut span = FORCED.with(|f| {
        f.set(Some((cx.trace_id(), cx.span_id())));
        let span = tracer
            .span_builder(format!("workflow {}", state.workflow))
            .with_kind(SpanKind::Internal)
            .with_start_time(system_time(state.started_at))
            .with_attributes(
                workflow_attributes(state)
                    .into_iter()
                    .chain([KeyValue::new("multiagents.status", state.status.as_str())]),
            )
            .start_with_context(&tracer, &Context::new());
        f.set(None);
        span
    });
    if !matches!(state.status, crate::core::WorkflowStatus::Completed) {
        span.set_status(Status::error(state.status.as_str()));
    }
    span.end_with_timestamp(system_time(state.finished_at.unwrap_or(state.updated_at)));
}

/// A worker's span around one call.
pub(crate) struct CallSpan {
    span: global::BoxedSpan,
    traceparent: String,
}

impl CallSpan {
    /// Opens the span of running `event`, a child of its dispatch.
    pub(crate) fn start(event: &crate::core::Event, worker: &str, instance: &str) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let parent = event
            .traceparent
            .as_deref()
            .and_then(parse_traceparent)
            .unwrap_or_else(|| workflow_context(event.transaction_id));
        let tracer = global::tracer(TRACER);
        let step = event.step.as_ref().map_or("", |s| s.as_str());
        let verb = match event.phase {
            Phase::Forward => "run",
            Phase::Compensate => "undo",
        };
        let span = tracer
            .span_builder(format!("{verb} {step}"))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new(
                    "multiagents.transaction_id",
                    event.transaction_id.to_string(),
                ),
                KeyValue::new("multiagents.step", step.to_string()),
                KeyValue::new("multiagents.phase", event.phase.to_string()),
                KeyValue::new("multiagents.attempt", i64::from(event.attempt)),
                KeyValue::new("multiagents.worker", worker.to_string()),
                KeyValue::new("multiagents.instance", instance.to_string()),
            ])
            .start_with_context(&tracer, &Context::new().with_remote_span_context(parent));
        let traceparent = traceparent(span.span_context());
        Some(Self { span, traceparent })
    }

    /// The `traceparent` for the answer.
    pub(crate) fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// Closes the span with the call's outcome.
    pub(crate) fn end(mut self, error: Option<&str>) {
        if let Some(e) = error {
            self.span.set_status(Status::error(e.to_string()));
        }
        self.span.end();
    }
}

thread_local! {
    /// Ids the next span built on this thread must take (the workflow span's).
    static FORCED: std::cell::Cell<Option<(TraceId, SpanId)>> = const { std::cell::Cell::new(None) };
}

mod export {
    use super::*;
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};

    /// Random ids, except where a span must take the workflow's.
    #[derive(Debug)]
    struct Ids(RandomIdGenerator);

    impl IdGenerator for Ids {
        fn new_trace_id(&self) -> TraceId {
            FORCED
                .with(|f| f.get())
                .map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
        }

        fn new_span_id(&self) -> SpanId {
            FORCED
                .with(|f| f.get())
                .map_or_else(|| self.0.new_span_id(), |(_, s)| s)
        }
    }

    /// Sends the exporter's requests on the Tokio runtime: the batch
    /// processor exports from a thread of its own.
    #[derive(Debug)]
    struct OnTokio {
        client: std::sync::Arc<opentelemetry_http::hyper::HyperClient>,
        runtime: tokio::runtime::Handle,
    }

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for OnTokio {
        async fn send_bytes(
            &self,
            request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
        ) -> Result<
            opentelemetry_http::Response<opentelemetry_http::Bytes>,
            opentelemetry_http::HttpError,
        > {
            let client = self.client.clone();
            self.runtime
                .spawn(async move { client.send_bytes(request).await })
                .await
                .map_err(|e| -> opentelemetry_http::HttpError { Box::new(e) })?
        }
    }

    /// Exports spans until shut down; shutting down (or dropping) flushes.
    pub struct TracingGuard {
        provider: SdkTracerProvider,
    }

    impl TracingGuard {
        /// Flushes what is left and stops exporting.
        pub fn shutdown(self) {
            let _ = self.provider.force_flush();
            let _ = self.provider.shutdown();
        }
    }

    /// Sets a global tracer provider exporting over OTLP/HTTP (JSON) to
    /// `config.otlp_endpoint` (a base URL: `/v1/traces` is added when it has
    /// no path); `None` when no endpoint is configured. Call it inside a
    /// Tokio runtime, before starting runtimes and workers.
    pub fn init_tracing(
        config: &crate::monitoring::TracingConfig,
    ) -> Result<Option<TracingGuard>, crate::monitoring::ConfigError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let invalid = |message: String| crate::monitoring::ConfigError::Invalid {
            origin: "tracing.otlp_endpoint".into(),
            message,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("init_tracing must be called inside a Tokio runtime".into()))?;
        let url = match endpoint.trim_end_matches('/') {
            e if e.split("://").nth(1).is_some_and(|rest| rest.contains('/')) => e.to_string(),
            e => format!("{e}/v1/traces"),
        };
        let client = OnTokio {
            client: std::sync::Arc::new(
                opentelemetry_http::hyper::HyperClient::with_default_connector(
                    Duration::from_secs(10),
                    None,
                ),
            ),
            runtime,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(url.clone())
            .build()
            .map_err(|e| invalid(format!("{url}: {e}")))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new(
                "service.instance.id",
                format!("{}-{}", config.service_name, std::process::id()),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(Ids(RandomIdGenerator::default()))
            .with_resource(resource)
            .build();
        global::set_tracer_provider(provider.clone());
        enable();
        Ok(Some(TracingGuard { provider }))
    }
}

pub use export::{TracingGuard, init_tracing};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_the_workflow_context_is_the_transaction() {
        let tx = TransactionId::new();
        let cx = workflow_context(tx);
        assert!(cx.is_valid());
        assert_eq!(cx.trace_id().to_bytes(), *tx.0.as_bytes());
        let text = traceparent(&cx);
        assert_eq!(text.len(), 55);
        let back = parse_traceparent(&text).expect("parses");
        assert_eq!(
            (back.trace_id(), back.span_id()),
            (cx.trace_id(), cx.span_id())
        );
        assert_eq!(
            workflow_context(tx),
            workflow_context(tx),
            "derived, the same everywhere"
        );
        for bad in [
            "",
            "00-abc",
            "01-00000000000000000000000000000000-0000000000000000-01",
            "00-00000000000000000000000000000000-0000000000000000-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}

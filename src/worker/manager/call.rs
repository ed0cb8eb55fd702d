//! One call: decode the command, run the worker bounded by its deadline,
//! record what happened, build the answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{WorkerContext, WorkerError};
use crate::bus::Delivery;
use crate::core::{Event, EventKind, Payload, Phase, StepError, StepErrorKind, Timestamp};

use super::*;

impl Runner {
    /// True when a redelivered command is stale: its workflow no longer
    /// waits for this attempt (it was given up on, answered meanwhile, or
    /// the workflow finished). One store read, only for redeliveries; when
    /// the store cannot tell, the command runs (the idempotency key keeps
    /// its effect single).
    pub(super) async fn stale(&self, delivery: &Delivery) -> bool {
        let (Some(states), Some(step)) = (&self.states, &delivery.event.step) else {
            return false;
        };
        if delivery.delivery_count < 2 {
            return false;
        }
        let event = &delivery.event;
        match states.get(event.transaction_id).await {
            Ok(Some(current)) => !current
                .state
                .awaits(step.as_str(), event.phase, event.attempt),
            Ok(None) => true,
            Err(e) => {
                tracing::debug!(transaction_id = %event.transaction_id, error = %e, "could not check a redelivered command; running it");
                false
            }
        }
    }

    /// Runs one command; returns the answer to publish, if any.
    pub(super) async fn handle(
        &self,
        delivery: &Delivery,
        level: usize,
        picked_up_at: Timestamp,
    ) -> Handled {
        let event = &delivery.event;
        let name = self.worker.name();
        if !matches!(event.kind, EventKind::Command | EventKind::Compensation)
            || event.step.is_none()
        {
            let reason = format!(
                "worker `{name}` received a {:?} event, which is not a command",
                event.kind
            );
            let _ = self.consumers[level].reject(delivery, &reason).await;
            return Handled::Nothing;
        }
        if let Some(running) = self.interrupts.running(event) {
            tracing::info!(
                worker = name,
                transaction_id = %event.transaction_id,
                step = ?event.step,
                attempt = event.attempt,
                "command dropped: this attempt is running here already, and its answer will serve"
            );
            // The same delivery taken again: the running call acks it.
            if running == delivery.id {
                return Handled::Held;
            }
            return Handled::Stale;
        }
        if self.stale(delivery).await {
            tracing::info!(
                worker = name,
                transaction_id = %event.transaction_id,
                step = ?event.step,
                attempt = event.attempt,
                deliveries = delivery.delivery_count,
                "redelivered command dropped: its workflow no longer waits for this attempt"
            );
            if let Some(m) = &self.metrics {
                m.stale.increment(1);
            }
            return Handled::Stale;
        }
        // Only the input is copied out; the step outputs stay in the command
        // and are read when the worker asks for one.
        let input = match command_input(event.payload.as_str()) {
            Ok(input) => Payload::from_raw(input.to_owned()),
            Err(e) => {
                let reason = format!("command payload is not {{\"input\": …, \"steps\": …}}: {e}");
                let _ = self.consumers[level].reject(delivery, &reason).await;
                return Handled::Nothing;
            }
        };
        let steps = Some(event.payload.clone());
        let token = self.hard_stop.child_token();
        let ctx = WorkerContext::from_parts(event, steps, token.clone(), self.states.clone());
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.in_flight.increment(1.0);
        }
        let began = (self.metrics.is_some() || self.counters.detail.is_some())
            .then(std::time::Instant::now);
        // The worker's own log lines carry the workflow's fields.
        let started_at = Timestamp::now();
        let otel = crate::monitoring::otel::CallSpan::start(event, name, &self.instance);
        let span = tracing::info_span!(
            "step",
            transaction_id = %event.transaction_id,
            correlation_id = %event.correlation_id,
            step = %event.step.as_ref().map_or("", |s| s.as_str()),
            attempt = event.attempt,
            worker = name,
        );
        let mut run = std::pin::pin!(tracing::Instrument::instrument(
            self.worker.run(input, ctx),
            span
        ));
        // Most calls finish on their first poll: only arm a deadline timer
        // (a timer-wheel insert and removal) for those that do not.
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(run.as_mut().poll(cx))).await;
        // Only calls still running can be interrupted: register those.
        let key = (first.is_pending() && event.phase == Phase::Forward).then(|| {
            (
                event.transaction_id,
                event.step.clone().unwrap_or_else(|| "".into()),
                event.attempt,
            )
        });
        if let Some(key) = &key {
            self.interrupts.register(key.clone(), &token, &delivery.id);
        }
        let outcome = match (first, event.deadline.map(|d| d.since(Timestamp::now()))) {
            (std::task::Poll::Ready(r), _) => r,
            (std::task::Poll::Pending, Some(left)) => match tokio::time::timeout(left, run).await {
                Ok(r) => r,
                Err(_) => {
                    token.cancel();
                    Err(
                        WorkerError::retry(format!("worker `{name}` passed its deadline"))
                            .with_kind("timeout"),
                    )
                }
            },
            (std::task::Poll::Pending, None) => run.await,
        };
        if let Some(key) = &key {
            self.interrupts.unregister(key);
        }
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let (Some(m), Some(began)) = (&self.metrics, began) {
            m.in_flight.decrement(1.0);
            m.duration.record(began.elapsed().as_secs_f64());
        }
        if let (Some(detail), Some(began)) = (&self.counters.detail, began) {
            detail.recent.push(began.elapsed().as_micros() as u64);
            if let Err(e) = &outcome {
                detail.summary().error(
                    e.kind().map_or("error", StepErrorKind::as_str),
                    &e.to_string(),
                    Timestamp::now(),
                );
            }
        }

        if outcome.is_err() && self.hard_stop.is_cancelled() {
            // Stopped by shutdown, not failed: leave the command unacked so
            // that another worker gets it, as the same attempt.
            tracing::info!(worker = name, transaction_id = %event.transaction_id, "call cancelled by shutdown; its command will be redelivered");
            return Handled::Nothing;
        }
        // An output the bus could not carry fails the step for good, saying
        // so, instead of an answer that is never delivered.
        let outcome = match outcome {
            Ok(output) if output.len() > self.max_output_bytes => Err(WorkerError::fatal(format!(
                "step `{}` returned {} bytes of output, over the limit of {} bytes; keep large data elsewhere and return a reference to it",
                event.step.as_ref().map_or("", |s| s.as_str()),
                output.len(),
                self.max_output_bytes
            ))
            .with_kind("output_too_large")),
            other => other,
        };
        let (kind, payload) = match outcome {
            Ok(output) => {
                self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.ok.increment(1);
                }
                (EventKind::Result, output)
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.failed.increment(1);
                }
                tracing::debug!(
                    worker = name,
                    transaction_id = %event.transaction_id,
                    step = ?event.step,
                    attempt = event.attempt,
                    error = %e,
                    "worker call failed"
                );
                let err: StepError = e.into_step_error();
                (
                    EventKind::Error,
                    Payload::to_json(&err).unwrap_or_else(|_| Payload::null()),
                )
            }
        };
        let mut reply = event.answer(kind, payload);
        reply.traceparent = match otel {
            Some(span) => {
                let tp = Arc::from(span.traceparent());
                span.end(match &reply.kind {
                    EventKind::Error => Some("the call failed"),
                    _ => None,
                });
                Some(tp)
            }
            None => reply.traceparent,
        };
        if self.record_timing {
            reply.timing = Some(crate::core::Timing {
                instance: self.instance.clone(),
                picked_up_at,
                started_at,
                finished_at: Timestamp::now(),
            });
        }
        Handled::Answer(Box::new(reply))
    }
}

/// What became of a command.
pub(super) enum Handled {
    /// Ran: publish this answer and ack the command.
    Answer(Box<Event>),
    /// Stale: ack it without an answer.
    Stale,
    /// Rejected (dead-lettered) or left for redelivery: nothing to flush.
    Nothing,
    /// Held by a call still running, which will answer and ack it.
    Held,
}

/// The input of a command, `{"input": …, "steps": {…}}`. The orchestrator
/// writes the input first and compactly, so it is read without parsing the
/// outputs of every step before (which grow with the workflow); anything
/// else is parsed whole. The event decoder has already checked that the
/// payload is JSON.
fn command_input(payload: &str) -> Result<&RawValue, serde_json::Error> {
    if let Some(rest) = payload.strip_prefix("{\"input\":") {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<&RawValue>();
        if let Some(Ok(input)) = values.next() {
            let after = &rest[values.byte_offset()..];
            if after == "}"
                || after
                    .strip_prefix(",\"steps\":{")
                    .is_some_and(|steps| steps.ends_with('}'))
            {
                return Ok(input);
            }
        }
    }
    #[derive(Deserialize)]
    struct Doc<'a> {
        #[serde(borrow)]
        input: &'a RawValue,
    }
    serde_json::from_str::<Doc<'_>>(payload).map(|doc| doc.input)
}

#[cfg(test)]
mod tests {
    use super::command_input;

    #[test]
    fn the_input_is_read_without_the_outputs_and_odd_layouts_are_parsed_whole() {
        let read = |p: &str| {
            command_input(p)
                .map(|r| r.get().to_string())
                .map_err(|e| e.to_string())
        };
        // As the orchestrator writes it.
        assert_eq!(
            read(r#"{"input":{"n":1},"steps":{"a":{"x":[1,2]}}}"#),
            Ok(r#"{"n":1}"#.into())
        );
        assert_eq!(read(r#"{"input":7,"steps":{}}"#), Ok("7".into()));
        assert_eq!(
            read(r#"{"input":"s,\"steps\":{","steps":{}}"#),
            Ok(r#""s,\"steps\":{""#.into())
        );
        assert_eq!(read(r#"{"input":null}"#), Ok("null".into()));
        // Written some other way: parsed whole, same answer.
        assert_eq!(read(r#"{ "steps": {}, "input": [1] }"#), Ok("[1]".into()));
        assert_eq!(read(r#"{"input":1, "steps":{}}"#), Ok("1".into()));
        // Not a command: refused, saying why.
        assert!(
            read(r#"{"steps":{}}"#)
                .expect_err("no input")
                .contains("missing field `input`")
        );
        assert!(read("5").is_err());
    }
}

//! The orchestrator process: consumes results, fires timers from the store,
//! republishes what a crash may have lost, and expires finished workflows.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::engine::{Driven, Engine, Outbox};
use crate::Error;
use crate::bus::{Consumer, Delivery, DeliveryId, ORCHESTRATOR_GROUP, RESULTS_TOPIC};
use crate::core::saga::Input;
use crate::core::{Event, EventKind, StepError, Timestamp, TransactionId, WorkflowStatus};
use crate::store::ListQuery;

/// Settings of the orchestrator.
#[derive(Clone, Debug)]
pub struct OrchestratorConfig {
    /// This process's name in the consumer group.
    pub instance: String,
    /// Result consumers run at once.
    pub consumers: usize,
    /// Results taken from the bus at once per consumer.
    pub batch_size: usize,
    /// Handle the results of different workflows in one batch at once.
    /// Worth it when the store is remote (Redis); in-process stores are
    /// faster without the extra tasks.
    pub parallel_results: bool,
    /// How often the store is asked for due timers at the least. A timer
    /// this process wrote (a retry's back-off, a step deadline, a durable
    /// sleep) is asked for when it is due; this look finds those that other
    /// processes wrote and did not fire (they died), so it bounds how late
    /// such a timer fires, and it is most of what an idle orchestrator
    /// costs its store.
    pub tick_interval: Duration,
    /// Republish the commands of every in-flight step at start. Right for the
    /// in-memory bus, which loses everything with the process.
    pub redispatch_on_start: bool,
    /// Republish commands of steps in flight for longer than this without
    /// any change (heals a crash between persisting and publishing).
    pub redispatch_after: Option<Duration>,
    /// A write whose actions are not marked published this long after it
    /// was made is taken to have been cut short by a crash, and its
    /// workflow's commands are published again (with a store that tracks
    /// unpublished writes: every store here does). The sweep looks this
    /// often (one query per look: most of what an idle orchestrator costs
    /// its store, with the timer look).
    pub unpublished_after: Duration,
    /// How long finished workflows are kept.
    pub retention: Duration,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            instance: format!("orchestrator-{}", std::process::id()),
            consumers: 2,
            batch_size: 256,
            parallel_results: false,
            tick_interval: Duration::from_secs(2),
            redispatch_on_start: true,
            redispatch_after: None,
            unpublished_after: Duration::from_secs(2),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A running orchestrator.
pub struct OrchestratorHandle {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl OrchestratorHandle {
    /// Stops the loops after the batch each is working on.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

pub(crate) async fn start(
    engine: Arc<Engine>,
    config: OrchestratorConfig,
) -> Result<OrchestratorHandle, Error> {
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    if config.redispatch_on_start {
        let n = redispatch(&engine, Timestamp::now(), None).await?;
        if n > 0 {
            tracing::info!(
                workflows = n,
                "republished in-flight commands of unfinished workflows"
            );
        }
    }
    for i in 0..config.consumers.max(1) {
        let consumer = engine
            .bus
            .topics
            .consumer(
                RESULTS_TOPIC,
                ORCHESTRATOR_GROUP,
                &format!("{}-{i}", config.instance),
            )
            .await?;
        tasks.spawn(results_loop(
            engine.clone(),
            consumer,
            config.batch_size,
            config.parallel_results,
            stop.clone(),
        ));
    }
    tasks.spawn(timer_loop(
        engine.clone(),
        config.tick_interval,
        stop.clone(),
    ));
    tasks.spawn(lag_loop(engine.clone(), stop.clone()));
    if engine.store.states.tracks_unpublished() {
        tasks.spawn(unpublished_loop(
            engine.clone(),
            config.unpublished_after,
            stop.clone(),
        ));
    }
    tasks.spawn(housekeeping_loop(engine, config, stop.clone()));
    Ok(OrchestratorHandle { stop, tasks })
}

/// What to do with a delivery after handling it.
enum Verdict {
    Ack,
    Reject(String),
    /// Leave it unacked: it will be redelivered.
    Later,
}

/// Handles a batch of results: in order when `parallel` is false; otherwise
/// the results of different workflows at once (those of one workflow still in
/// order), which pays when each transition waits on a remote store. The
/// commands the transitions produced are added to `outbox`.
async fn handle_batch(
    engine: &Arc<Engine>,
    batch: Vec<Delivery>,
    parallel: bool,
    outbox: &mut Outbox,
) -> Vec<(Delivery, Verdict)> {
    if !parallel || batch.len() < 2 {
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            let v = handle_result(engine, &d, outbox).await;
            out.push((d, v));
        }
        return out;
    }
    let groups = by_workflow(batch, |d| d.event.transaction_id);
    let mut set = JoinSet::new();
    for deliveries in groups {
        let engine = engine.clone();
        set.spawn(async move {
            let mut out = Vec::with_capacity(deliveries.len());
            let mut outbox = Outbox::new();
            for d in deliveries {
                let v = handle_result(&engine, &d, &mut outbox).await;
                out.push((d, v));
            }
            (out, outbox)
        });
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((verdicts, commands)) => {
                out.extend(verdicts);
                outbox.extend(commands);
            }
            // A panicking transition leaves its results unacked: redelivered.
            Err(e) => tracing::error!(error = %e, "handling a result panicked"),
        }
    }
    out
}

async fn results_loop(
    engine: Arc<Engine>,
    consumer: Arc<dyn Consumer>,
    batch_size: usize,
    parallel: bool,
    stop: CancellationToken,
) {
    let mut acks = Vec::with_capacity(batch_size);
    let mut outbox = Outbox::new();
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            b = consumer.next_batch(batch_size, Duration::from_millis(250)) => b,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "taking results failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // A batch that takes long (a slow store) keeps its results' leases.
        let ids: Vec<DeliveryId> = batch.iter().map(|d| d.id.clone()).collect();
        let handled = {
            let handling = handle_batch(&engine, batch, parallel, &mut outbox);
            tokio::pin!(handling);
            let every = consumer.extend_every();
            loop {
                tokio::select! {
                    done = &mut handling => break done,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = consumer.extend(&ids).await {
                            tracing::warn!(error = %e, "extending result leases failed");
                        }
                    }
                }
            }
        };
        for (delivery, verdict) in handled {
            match verdict {
                // Acked by the write that applied it.
                Verdict::Ack if outbox.acked.contains(&delivery.id) => {}
                Verdict::Ack => acks.push(delivery.id),
                Verdict::Reject(reason) => reject(&*consumer, &delivery, &reason).await,
                Verdict::Later => {}
            }
        }
        outbox.acked.clear();
        if !acks.is_empty() || !outbox.is_empty() {
            if publish_then_ack(&*consumer, &outbox.events, &acks).await {
                engine.mark_published(&outbox.written).await;
            } else {
                engine.not_published(&outbox.written);
            }
            acks.clear();
            outbox.clear();
        }
    }
}

/// Publishes the commands of a batch's transitions and acks its results,
/// trying again after a transient failure for up to the results' visibility
/// timeout (a restarting server comes back in that time); true when they
/// went out. The states are
/// already written, so commands lost here are republished by the recovery
/// sweep.
async fn publish_then_ack(
    consumer: &dyn Consumer,
    events: &[(String, Event)],
    acks: &[DeliveryId],
) -> bool {
    let sent = crate::bus::retry_transient(consumer.visibility_timeout(), || {
        consumer.publish_then_ack(events, acks)
    })
    .await;
    match sent {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                error = %e,
                commands = events.len(),
                "publishing commands failed; the recovery sweep will republish them"
            );
            false
        }
    }
}

async fn reject(consumer: &dyn Consumer, delivery: &Delivery, reason: &str) {
    tracing::warn!(
        transaction_id = %delivery.event.transaction_id,
        step = ?delivery.event.step,
        reason,
        "result dead-lettered"
    );
    if let Err(e) = consumer.reject(delivery, reason).await {
        tracing::warn!(error = %e, "dead-lettering failed; the result will be redelivered");
    }
}

/// Turns a result or error event into a state-machine input.
pub(crate) fn input_of(event: &Event) -> Result<Input, String> {
    let step = event
        .step
        .clone()
        .ok_or_else(|| format!("{:?} event without a step", event.kind))?;
    match event.kind {
        EventKind::Result => Ok(Input::Succeeded {
            step,
            phase: event.phase,
            attempt: event.attempt,
            output: event.payload.clone(),
        }),
        EventKind::Error => {
            let error: StepError = event
                .payload
                .parse()
                .map_err(|e| format!("error payload is not {{\"message\", \"retry\"}}: {e}"))?;
            Ok(Input::Failed {
                step,
                phase: event.phase,
                attempt: event.attempt,
                error,
            })
        }
        other => Err(format!("unexpected {other:?} event on the results topic")),
    }
}

async fn handle_result(engine: &Engine, delivery: &Delivery, outbox: &mut Outbox) -> Verdict {
    let event = &*delivery.event;
    if super::engine::is_control(event) {
        return match engine.control_child(event, outbox).await {
            Ok(()) => Verdict::Ack,
            Err(Error::Input(reason)) => Verdict::Reject(format!(
                "unexpected Command event on the results topic: {reason}"
            )),
            Err(e) => {
                tracing::warn!(transaction_id = %event.transaction_id, error = %e, "a message to a sub-workflow failed; it will be redelivered");
                Verdict::Later
            }
        };
    }
    let input = match input_of(event) {
        Ok(i) => i,
        Err(reason) => return Verdict::Reject(reason),
    };
    match engine
        .drive_into(
            event.transaction_id,
            &input,
            Some(event),
            Some(&delivery.id),
            outbox,
        )
        .await
    {
        Ok(Driven::Applied) => Verdict::Ack,
        Ok(Driven::Unchanged) => {
            tracing::trace!(transaction_id = %event.transaction_id, step = ?event.step, attempt = event.attempt, "duplicate or stale result ignored");
            Verdict::Ack
        }
        Ok(Driven::Missing) => {
            Verdict::Reject(format!("unknown transaction {}", event.transaction_id))
        }
        Err(Error::UnknownWorkflow { name, version }) => Verdict::Reject(format!(
            "unknown workflow definition `{name}` version {}",
            version.unwrap_or_default()
        )),
        Err(e) => {
            tracing::warn!(transaction_id = %event.transaction_id, error = %e, "applying a result failed; it will be redelivered");
            Verdict::Later
        }
    }
}

async fn timer_loop(engine: Arc<Engine>, every: Duration, stop: CancellationToken) {
    let mut full = false;
    loop {
        let wait = if full {
            Duration::ZERO
        } else {
            engine.timers.wait(Timestamp::now(), every)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            // A nearer timer was written: work out the wait again.
            _ = engine.timers.nearer.notified(), if !wait.is_zero() => continue,
        }
        let now = Timestamp::now();
        engine.timers.take_due(now);
        let due = match engine.store.timers.due(now, 1024).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading due timers failed");
                full = false;
                tokio::time::sleep(every.min(Duration::from_millis(200))).await;
                continue;
            }
        };
        full = due.len() >= 1024;
        for tx in due {
            if let Err(e) = engine.drive(tx, &Input::Tick, None).await {
                tracing::warn!(transaction_id = %tx, error = %e, "firing a timer failed; it stays due");
                continue;
            }
            if let Err(e) = engine.store.timers.timer_handled(tx).await {
                tracing::warn!(transaction_id = %tx, error = %e, "re-arming a timer failed; it fires again after its lease");
            }
        }
    }
}

/// Republishes in-flight commands of unfinished workflows last changed at or
/// before `cutoff` (all of them when `idle` is `None`). Returns how many
/// workflows had something republished.
async fn redispatch(
    engine: &Engine,
    cutoff: Timestamp,
    idle: Option<Timestamp>,
) -> Result<usize, Error> {
    let mut count = 0;
    for status in [WorkflowStatus::Running, WorkflowStatus::Compensating] {
        let query = ListQuery {
            status: Some(status),
            updated_before: idle,
            ..Default::default()
        };
        for summary in engine.store.states.list(&query).await? {
            let input = Input::Redispatch {
                dispatched_before: cutoff,
            };
            if engine.drive(summary.transaction_id, &input, None).await? == Driven::Applied {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// The recovery sweep: publishes again what writes cut short by a crash
/// never published.
async fn unpublished_loop(engine: Arc<Engine>, after: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(after.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Timestamp::now();
        let before = Timestamp(now.0.saturating_sub(after.as_millis() as u64));
        let lease = Timestamp(now.0 + after.as_millis() as u64);
        let writes = match engine.store.states.unpublished(before, lease, 256).await {
            // What this process is still publishing is not cut short: it
            // comes up again after its lease if it still is not marked.
            Ok(mut w) => {
                w.retain(|write| !engine.publishing(write));
                w
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading unpublished writes failed");
                continue;
            }
        };
        if !writes.is_empty() {
            tracing::info!(
                writes = writes.len(),
                "publishing again what writes cut short by a crash did not publish"
            );
        }
        // A heal republishes from the workflow's current state whichever
        // write it was noted for, so one heal covers all of a workflow's.
        // (Healed one by one, a workflow with several notes was healed as
        // many times in one pass; and where publishing kept failing, each of
        // those heals left a note of its own, doubling them pass after pass.)
        for writes in by_workflow(writes, |(tx, _)| *tx) {
            let tx = writes[0].0;
            let versions: Vec<_> = writes.into_iter().map(|(_, version)| version).collect();
            if let Err(e) = engine.heal_unpublished(tx, &versions).await {
                tracing::warn!(transaction_id = %tx, error = %e, "republishing failed; it is tried again after its lease");
            }
        }
    }
}

/// `items` grouped by workflow (`tx` of each), the groups in the order
/// their workflows first come, each in the order of its items: a batch's
/// results, so that one workflow's run in order; the writes the recovery
/// sweep found, so that a workflow is healed once.
fn by_workflow<T>(items: Vec<T>, tx: impl Fn(&T) -> TransactionId) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut index: crate::core::hash::IdMap<TransactionId, usize> = Default::default();
    for item in items {
        match index.get(&tx(&item)) {
            Some(&i) => groups[i].push(item),
            None => {
                index.insert(tx(&item), groups.len());
                groups.push(vec![item]);
            }
        }
    }
    groups
}

/// Samples the bus lag of the results and of every command topic known here.
async fn lag_loop(engine: Arc<Engine>, stop: CancellationToken) {
    use crate::bus::WORKER_GROUP;
    use crate::monitoring::metrics::BUS_LAG;
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut topics = vec![(RESULTS_TOPIC.to_string(), ORCHESTRATOR_GROUP)];
        topics.extend(
            engine
                .command_topics()
                .into_iter()
                .map(|t| (t, WORKER_GROUP)),
        );
        for (topic, group) in topics {
            match engine.bus.topics.lag(&topic, group).await {
                Ok(Some(n)) => {
                    metrics::gauge!(BUS_LAG, "topic" => topic, "group" => group).set(n as f64)
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(topic, error = %e, "reading the bus lag failed"),
            }
        }
    }
}

async fn housekeeping_loop(
    engine: Arc<Engine>,
    config: OrchestratorConfig,
    stop: CancellationToken,
) {
    let every = config
        .redispatch_after
        .map_or(Duration::from_secs(60), |d| {
            (d / 2).max(Duration::from_millis(100))
        });
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    let mut last_expiry = Timestamp::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Timestamp::now();
        if let Some(after) = config.redispatch_after {
            let cutoff = Timestamp(now.0.saturating_sub(after.as_millis() as u64));
            match redispatch(&engine, cutoff, Some(cutoff)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(workflows = n, "republished commands idle for {after:?}"),
                Err(e) => tracing::warn!(error = %e, "the redispatch sweep failed"),
            }
        }
        if now.since(last_expiry) >= Duration::from_secs(60) {
            last_expiry = now;
            let before = Timestamp(now.0.saturating_sub(config.retention.as_millis() as u64));
            match engine.store.states.expire(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(workflows = n, "expired finished workflows"),
                Err(e) => tracing::warn!(error = %e, "expiring finished workflows failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writes_of_a_workflow_are_healed_together() {
        let (a, b, c) = (
            TransactionId::new(),
            TransactionId::new(),
            TransactionId::new(),
        );
        let writes = vec![(a, 3), (b, 1), (a, 4), (c, 2), (a, 5), (b, 2)];
        let grouped: Vec<(TransactionId, Vec<u64>)> = by_workflow(writes, |(tx, _)| *tx)
            .into_iter()
            .map(|g| (g[0].0, g.into_iter().map(|(_, v)| v).collect()))
            .collect();
        assert_eq!(
            grouped,
            vec![(a, vec![3, 4, 5]), (b, vec![1, 2]), (c, vec![2])]
        );
        assert!(by_workflow(Vec::<(TransactionId, u64)>::new(), |(tx, _)| *tx).is_empty());
    }
}

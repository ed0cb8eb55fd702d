//! No transition's actions are lost when the bus or the store fails part-way
//! through a batch: on the memory backend, wrapped so that publishes fail
//! (some after publishing part of a batch), acks and reads fail, and writes
//! fail either before or *after* they happened (the caller cannot tell). A
//! saga with a compensated step, a parallel group, a fan-out and a
//! sub-workflow must still end every workflow with each effect applied once
//! and each declined order undone exactly once — for several seeds.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use multiagents::bus::{
    Bus, BusError, Consumer, DeadLetter, Delivery, DeliveryId, MemoryBus, MemoryBusConfig, Topics,
};
use multiagents::core::{Event, Timestamp, TransactionId, WorkflowDefinition, WorkflowState};
use multiagents::store::{
    Definitions, HealthRecords, ListQuery, MemoryStore, StoreError, TimerIndex, Version, Versioned,
    WorkflowStates, WorkflowSummary,
};
use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents::{OrchestratorConfig, Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::{Value, json};

/// A deterministic source of failures: fails one call in `every`.
struct Dice {
    state: AtomicU64,
    every: u64,
}

impl Dice {
    fn new(seed: u64, every: u64) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU64::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            every,
        })
    }

    fn roll(&self) -> u64 {
        // xorshift64*, one step per call.
        let mut x = self.state.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .state
                .compare_exchange(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545_f491_4f6c_dd1d),
                Err(now) => x = now,
            }
        }
    }

    fn fails(&self) -> bool {
        self.roll().is_multiple_of(self.every)
    }

    fn injected() -> BusError {
        BusError::Backend {
            address: "flaky://bus".into(),
            message: "injected failure".into(),
        }
    }
}

#[derive(Clone)]
struct FlakyBus {
    inner: MemoryBus,
    dice: Arc<Dice>,
}

#[async_trait]
impl Topics for FlakyBus {
    async fn publish(&self, topic: &str, event: Event) -> Result<(), BusError> {
        if self.dice.fails() {
            return Err(Dice::injected());
        }
        self.inner.publish(topic, event).await
    }

    async fn publish_many(&self, events: Vec<(String, Event)>) -> Result<(), BusError> {
        // Part-way: some of the batch goes out, then the failure.
        for (topic, event) in events {
            self.publish(&topic, event).await?;
        }
        Ok(())
    }

    async fn consumer(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        let inner = self.inner.consumer(topic, group, consumer).await?;
        Ok(Arc::new(FlakyConsumer {
            inner,
            bus: self.clone(),
        }))
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        self.inner.dead_letter(letter).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        self.inner.dead_letters(limit).await
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        self.inner.dead_letter_by_id(id).await
    }

    async fn settle_dead_letter(
        &self,
        id: &str,
        settlement: &multiagents::bus::Settlement,
    ) -> Result<Option<DeadLetter>, BusError> {
        self.inner.settle_dead_letter(id, settlement).await
    }

    async fn dead_letter_audit(
        &self,
        limit: usize,
    ) -> Result<Vec<multiagents::bus::AuditedLetter>, BusError> {
        self.inner.dead_letter_audit(limit).await
    }
}

struct FlakyConsumer {
    inner: Arc<dyn Consumer>,
    bus: FlakyBus,
}

#[async_trait]
impl Consumer for FlakyConsumer {
    async fn next_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if self.bus.dice.fails() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Err(Dice::injected());
        }
        self.inner.next_batch(max, wait).await
    }

    async fn ack(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        if self.bus.dice.fails() {
            return Err(Dice::injected());
        }
        self.inner.ack(ids).await
    }

    async fn extend(&self, ids: &[DeliveryId]) -> Result<(), BusError> {
        self.inner.extend(ids).await
    }

    fn visibility_timeout(&self) -> Duration {
        self.inner.visibility_timeout()
    }

    async fn reject(&self, delivery: &Delivery, reason: &str) -> Result<(), BusError> {
        self.inner.reject(delivery, reason).await
    }

    async fn publish_then_ack(
        &self,
        events: &[(String, Event)],
        ids: &[DeliveryId],
    ) -> Result<(), BusError> {
        // Publishes part of the batch before failing, never acking then.
        for (topic, event) in events {
            self.bus.publish(topic, event.clone()).await?;
        }
        self.ack(ids).await
    }
}

/// A store whose writes fail, half of the time after they happened.
struct FlakyStore {
    inner: MemoryStore,
    dice: Arc<Dice>,
    /// Reads of a state, counted.
    gets: Arc<AtomicU64>,
}

impl FlakyStore {
    fn injected() -> StoreError {
        StoreError::Io {
            location: "flaky://store".into(),
            message: "injected failure".into(),
        }
    }
}

#[async_trait]
impl WorkflowStates for FlakyStore {
    async fn create(&self, state: Arc<WorkflowState>) -> Result<Version, StoreError> {
        match self.dice.roll() % (2 * self.dice.every) {
            0 => Err(Self::injected()),
            1 => self.inner.create(state).await.and(Err(Self::injected())),
            _ => self.inner.create(state).await,
        }
    }

    async fn get(&self, transaction_id: TransactionId) -> Result<Option<Versioned>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        if self.dice.fails() {
            return Err(Self::injected());
        }
        self.inner.get(transaction_id).await
    }

    async fn compare_and_set(
        &self,
        expected: Version,
        state: Arc<WorkflowState>,
    ) -> Result<Version, StoreError> {
        match self.dice.roll() % (2 * self.dice.every) {
            0 => Err(Self::injected()),
            // Written, but the caller hears of a failure.
            1 => self
                .inner
                .compare_and_set(expected, state)
                .await
                .and(Err(Self::injected())),
            _ => self.inner.compare_and_set(expected, state).await,
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<WorkflowSummary>, StoreError> {
        self.inner.list(query).await
    }

    async fn expire(&self, finished_before: Timestamp) -> Result<usize, StoreError> {
        self.inner.expire(finished_before).await
    }

    async fn published(&self, writes: &[(TransactionId, Version)]) -> Result<(), StoreError> {
        if self.dice.fails() {
            return Err(Self::injected());
        }
        self.inner.published(writes).await
    }

    async fn unpublished(
        &self,
        written_before: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<(TransactionId, Version)>, StoreError> {
        self.inner
            .unpublished(written_before, lease_until, limit)
            .await
    }

    fn tracks_unpublished(&self) -> bool {
        self.inner.tracks_unpublished()
    }
}

#[async_trait]
impl TimerIndex for FlakyStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<TransactionId>, StoreError> {
        self.inner.due(now, limit).await
    }

    async fn timer_handled(&self, transaction_id: TransactionId) -> Result<(), StoreError> {
        self.inner.timer_handled(transaction_id).await
    }
}

#[async_trait]
impl Definitions for FlakyStore {
    async fn put_definition(&self, definition: &WorkflowDefinition) -> Result<(), StoreError> {
        self.inner.put_definition(definition).await
    }

    async fn get_definition(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        self.inner.get_definition(name, version).await
    }

    async fn latest_definition(
        &self,
        name: &str,
    ) -> Result<Option<WorkflowDefinition>, StoreError> {
        self.inner.latest_definition(name).await
    }

    async fn definition_versions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.inner.definition_versions().await
    }
}

#[async_trait]
impl HealthRecords for FlakyStore {
    async fn record_worker_health(
        &self,
        beats: &[multiagents::worker::WorkerHealth],
    ) -> Result<(), StoreError> {
        self.inner.record_worker_health(beats).await
    }

    async fn worker_health(
        &self,
        max_age: Duration,
    ) -> Result<Vec<multiagents::worker::WorkerHealth>, StoreError> {
        self.inner.worker_health(max_age).await
    }
}

/// An idempotent effect store, as a payment API keeps one: the first run
/// under a key applies the effect, later runs are no-ops. Beside it, how
/// many runs there were under each key (redeliveries are expected here).
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<HashMap<String, u32>>>);

impl Effects {
    fn apply(&self, ctx: &WorkerContext) {
        *self
            .0
            .lock()
            .expect("lock")
            .entry(ctx.idempotency_key().to_string())
            .or_default() += 1;
    }

    /// 1 when the effect under `key` was applied, 0 when it never was.
    fn applied(&self, key: &str) -> u32 {
        u32::from(self.0.lock().expect("lock").contains_key(key))
    }

    fn runs(&self) -> u32 {
        self.0.lock().expect("lock").values().sum()
    }

    fn keys(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}

fn worker(effects: &Effects, name: &'static str) -> impl multiagents::Worker {
    let effects = effects.clone();
    from_fn(name, move |input: Value, ctx: WorkerContext| {
        let effects = effects.clone();
        async move {
            if name == "charge" && input["decline"] == json!(true) {
                return Err(WorkerError::fatal("card declined"));
            }
            effects.apply(&ctx);
            Ok::<_, WorkerError>(json!({"step": name}))
        }
    })
}

async fn run(seed: u64) {
    let dice = Dice::new(seed, 12);
    let memory = MemoryBus::with_config(MemoryBusConfig {
        visibility_timeout: Duration::from_millis(300),
        max_deliveries: 1000,
        ..Default::default()
    });
    // Only the topics fail; status and limits are the memory bus's own.
    let bus = Bus {
        topics: Arc::new(FlakyBus {
            inner: memory.clone(),
            dice: dice.clone(),
        }),
        notifier: Arc::new(memory.clone()),
        limits: Arc::new(memory),
    };
    let store = FlakyStore {
        inner: MemoryStore::new(),
        dice,
        gets: Arc::default(),
    };
    let child = WorkflowBuilder::new("review")
        .step("approve", "approve")
        .compensate_with("unapprove")
        .build()
        .expect("valid");
    let parent = WorkflowBuilder::new("order")
        .step("reserve", "reserve")
        .compensate_with("release")
        .parallel("checks", |g| {
            g.step("fraud", "fraud").step("address", "address")
        })
        .step("pack", "pack")
        .for_each("input.items")
        .max_concurrency(2)
        .sub_workflow("review", "review")
        .step("charge", "charge")
        .compensate_with("refund")
        .step("notify", "notify")
        .build()
        .expect("valid");
    let effects = Effects::default();
    let mut builder = Runtime::builder()
        .bus(bus)
        .store(store)
        .workflow(child)
        .workflow(parent)
        .orchestrator_config(OrchestratorConfig {
            unpublished_after: Duration::from_millis(200),
            ..Default::default()
        });
    for name in [
        "reserve",
        "release",
        "fraud",
        "address",
        "pack",
        "approve",
        "unapprove",
        "charge",
        "refund",
        "notify",
    ] {
        builder = builder.worker(worker(&effects, name));
    }
    let rt = builder.start().await.expect("runtime");
    let client = rt.client();
    let mut started = Vec::new();
    for n in 0..16u64 {
        let decline = n % 4 == 0;
        let options = multiagents::StartOptions {
            transaction_id: Some(TransactionId::new()),
            ..Default::default()
        };
        let input = json!({"items": [1, 2, 3], "decline": decline});
        // A start is retried with its own id, as a client would.
        let tx = loop {
            match client.start_with("order", &input, options.clone()).await {
                Ok(tx) => break tx,
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("start: {e}"),
            }
        };
        started.push((tx, decline));
    }
    // A seed takes 2-3 s here; a worker whose answers stalled behind a
    // batch that kept failing part of the way took tens of seconds.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    for (tx, decline) in started {
        let state = loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match client.wait(tx, left).await {
                Ok(s) => break s,
                Err(e) if e.is_transient() && !left.is_zero() => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => {
                    // Say where it stands, and where its sub-workflow does.
                    let mut where_ = String::new();
                    for _ in 0..50 {
                        if let Ok(Some(state)) = client.status(tx).await {
                            where_ = multiagents::timeline::render(&state);
                            break;
                        }
                    }
                    panic!("seed {seed}: workflow {tx} did not end: {e}\n{where_}")
                }
            }
        };
        let expected = if decline {
            WorkflowStatus::Compensated
        } else {
            WorkflowStatus::Completed
        };
        assert_eq!(
            state.status,
            expected,
            "seed {seed}: {}",
            multiagents::timeline::render(&state)
        );
        for step in [
            "reserve", "fraud", "address", "pack[0]", "pack[1]", "pack[2]",
        ] {
            assert_eq!(
                effects.applied(&format!("{tx}/{step}/forward")),
                1,
                "seed {seed}: {step} of {tx}"
            );
        }
        let undone = u32::from(decline);
        assert_eq!(
            effects.applied(&format!("{tx}/reserve/compensate")),
            undone,
            "seed {seed}: release of {tx}"
        );
        assert_eq!(
            effects.applied(&format!("{tx}/charge/forward")),
            1 - undone,
            "seed {seed}: charge of {tx}"
        );
        assert_eq!(
            effects.applied(&format!("{tx}/notify/forward")),
            1 - undone,
            "seed {seed}: notify of {tx}"
        );
        // The sub-workflow ran once, and was undone with its parent step.
        let child = common::child_of(&state).expect("child started");
        assert_eq!(effects.applied(&format!("{child}/approve/forward")), 1);
        assert_eq!(
            effects.applied(&format!("{child}/approve/compensate")),
            undone,
            "seed {seed}: the review of {tx} undone with it"
        );
    }
    eprintln!(
        "seed {seed}: {} effects applied over {} step runs",
        effects.keys(),
        effects.runs()
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_action_is_lost_when_the_bus_or_store_fails_part_way() {
    for seed in 1..=4 {
        run(seed).await;
    }
}

/// Several writes of one workflow left unpublished (its process died after
/// each of them): the recovery sweep heals the workflow once for all of
/// them, from its current state: one read of it and one command published
/// again, not one of each per write.
#[tokio::test]
async fn the_unpublished_writes_of_one_workflow_are_healed_together() {
    use multiagents::core::{CorrelationId, Payload, saga};
    let definition = WorkflowBuilder::new("lone")
        .step("only", "nobody")
        .build()
        .expect("valid");
    let gets = Arc::new(AtomicU64::new(0));
    let store = FlakyStore {
        inner: MemoryStore::new(),
        // Never fails: one roll in 2^40.
        dice: Dice::new(1, 1 << 40),
        gets: gets.clone(),
    };
    store.put_definition(&definition).await.expect("definition");
    // What a process wrote three times without publishing: the first
    // command was never sent.
    let tx = TransactionId::new();
    let (state, _) = saga::start(
        &definition,
        tx,
        CorrelationId::new(),
        Payload::null(),
        Timestamp::now(),
    );
    let state = Arc::new(state);
    assert_eq!(store.create(state.clone()).await.expect("create"), 1);
    assert_eq!(
        store.compare_and_set(1, state.clone()).await.expect("cas"),
        2
    );
    assert_eq!(
        store.compare_and_set(2, state.clone()).await.expect("cas"),
        3
    );
    let mut notes = store
        .inner
        .unpublished(Timestamp(Timestamp::now().0 + 1), Timestamp::now(), 10)
        .await
        .expect("unpublished");
    notes.sort_by_key(|(_, version)| *version);
    assert_eq!(notes, vec![(tx, 1), (tx, 2), (tx, 3)]);
    // Older than `unpublished_after` when the sweep first looks: the first
    // pass finds all three.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let bus = MemoryBus::new();
    let commands = bus
        .consumer("commands.nobody", "watch", "w")
        .await
        .expect("consumer");
    let reads_before = gets.load(Ordering::Relaxed);
    let rt = Runtime::builder()
        .bus(bus.clone())
        .store(store)
        .workflow(definition)
        // Its worker runs elsewhere (here: nowhere; its commands stay on
        // the bus to be counted).
        .external_workers()
        .orchestrator_config(OrchestratorConfig {
            unpublished_after: Duration::from_millis(50),
            redispatch_on_start: false,
            redispatch_after: None,
            ..Default::default()
        })
        .start()
        .await
        .expect("starts");
    // The first heal, however slow the machine, then several more passes
    // of the sweep.
    let mut sent = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sent.is_empty() && std::time::Instant::now() < deadline {
        sent.extend(
            commands
                .next_batch(10, Duration::from_millis(100))
                .await
                .expect("batch"),
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    loop {
        let batch = commands
            .next_batch(10, Duration::from_millis(50))
            .await
            .expect("batch");
        if batch.is_empty() {
            break;
        }
        sent.extend(batch);
    }
    let reads = gets.load(Ordering::Relaxed) - reads_before;
    rt.shutdown().await;
    assert_eq!(sent.len(), 1, "one command published again: {sent:?}");
    assert_eq!(sent[0].event.transaction_id, tx);
    assert_eq!(reads, 1, "one heal read the state once");
}

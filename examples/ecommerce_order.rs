//! An e-commerce order saga, run embedded: in-process bus, state in a local
//! file, no server.
//!
//! Validate the order; then a fraud check and an address check at once (a
//! parallel group); reserve inventory (undone by releasing it), charge the
//! card (undone by a refund); gift-wrap, only when the order asks for it (a
//! condition: otherwise the step is recorded as skipped); generate a
//! confirmation, fulfil (flaky: it fails once for some orders and succeeds
//! on the retry), notify the customer. A declined card is a failure no retry
//! can fix, so the order is compensated: the reserved inventory is really
//! released.
//!
//! ```text
//! cargo run --example ecommerce_order -- --orders 8 --fail-rate 0.25 --seed 7
//! ```
//!
//! State lives in `--store` (default `.multiagents/ecommerce_order.db`): stop
//! the program midway (Ctrl-C, or kill -9) and run it again, and the orders
//! left unfinished resume where they were.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use multiagents::core::Payload;
use multiagents::store::{FileStore, ListQuery};
use multiagents::worker::WorkerOptions;
use multiagents::{
    RetryPolicy, Runtime, TransactionId, Worker, WorkerContext, WorkerError, WorkflowBuilder,
    WorkflowDefinition, WorkflowStatus, async_trait, worker,
};
use serde::{Deserialize, Serialize};

/// Runs e-commerce orders through a six-step saga, embedded.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// How many orders to place.
    #[arg(long, default_value_t = 5)]
    orders: u64,
    /// Fraction of orders paid with a card that is declined (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    fail_rate: f64,
    /// Seed for choosing which orders are declined and which fulfilments are flaky.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The embedded store file.
    #[arg(long, default_value = ".multiagents/ecommerce_order.db")]
    store: std::path::PathBuf,
    /// Print the timelines of at most this many orders (every failed one first).
    #[arg(long, default_value_t = 10)]
    show: usize,
    /// Use Redis for the bus and the state instead of the embedded mode
    /// (build with `--features redis`), so that roles can run in separate processes.
    #[arg(long)]
    redis_url: Option<String>,
    /// Key prefix in Redis.
    #[arg(long, default_value = "shop")]
    prefix: String,
    /// What this process runs: everything, only the workers, only an
    /// orchestrator (those two until Ctrl-C), or only the client placing orders.
    #[arg(long, value_enum, default_value_t = Role::All)]
    role: Role,
    /// Monitoring settings (YAML or JSON), e.g. `examples/monitoring.yaml`
    /// for JSON log lines in a file. Without it only warnings are logged.
    #[arg(long, value_name = "FILE")]
    monitoring: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    All,
    Workers,
    Orchestrator,
    Client,
}

type Backends = (multiagents::bus::Bus, multiagents::store::Store);

#[cfg(feature = "redis")]
async fn redis_backends(url: &str, prefix: &str) -> Result<Backends, Box<dyn std::error::Error>> {
    use multiagents::bus::{RedisBusConfig, RedisStreamsBus};
    use multiagents::store::{RedisStateStore, RedisStoreConfig};
    let bus = RedisStreamsBus::connect(RedisBusConfig::new(url).prefix(prefix)).await?;
    let store = RedisStateStore::connect(RedisStoreConfig::new(url).prefix(prefix)).await?;
    Ok((bus.into(), store.into()))
}

#[cfg(not(feature = "redis"))]
async fn redis_backends(_url: &str, _prefix: &str) -> Result<Backends, Box<dyn std::error::Error>> {
    Err("--redis-url needs the redis feature: cargo run --features redis --example ecommerce_order -- --redis-url …".into())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    customer: String,
    sku: String,
    quantity: u32,
    amount_cents: u64,
    card: String,
    /// Test hook: the warehouse API times out on the first call for this order.
    flaky_fulfilment: bool,
    /// Wrap it as a gift.
    #[serde(default)]
    gift_wrap: bool,
    /// Where it goes.
    #[serde(default)]
    address: String,
}

/// A card number that the payment worker always declines (like Stripe's test card).
const DECLINED_CARD: &str = "4000-0000-0000-0002";

fn definition() -> Result<WorkflowDefinition, multiagents::core::DefinitionError> {
    WorkflowBuilder::new("ecommerce_order")
        .version(2)
        .description("validate, check fraud and address at once, reserve, charge, gift-wrap if asked, confirm, fulfil, notify")
        .default_retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(20)))
        .default_timeout(Duration::from_secs(5))
        .step("validate", "validate_order")
        .parallel("checks", |g| {
            g.step("fraud_check", "check_fraud")
                .step("address_check", "verify_address")
        })
        .step("inventory", "check_inventory")
        .compensate_with("release_inventory")
        .step("payment", "process_payment")
        .compensate_with("refund_payment")
        .step("gift_wrap", "wrap_gift")
        .when("input.gift_wrap == true")
        .step("confirmation", "generate_confirmation")
        .step("fulfilment", "fulfill_order")
        .step("notification", "notify_customer")
        .build()
}

#[worker("validate_order")]
async fn validate_order(order: Order) -> Result<serde_json::Value, WorkerError> {
    if order.quantity == 0 || order.amount_cents == 0 {
        return Err(
            WorkerError::fatal("an order needs a quantity and an amount")
                .with_kind("invalid_order"),
        );
    }
    Ok(serde_json::json!({"valid": true}))
}

#[worker("check_fraud")]
async fn check_fraud(order: Order) -> Result<serde_json::Value, WorkerError> {
    // A stand-in score: large orders look riskier.
    let score = (order.amount_cents as f64 / 20_000.0).min(1.0);
    Ok(serde_json::json!({"score": score}))
}

#[worker("verify_address")]
async fn verify_address(order: Order) -> Result<serde_json::Value, WorkerError> {
    if order.address.trim().is_empty() {
        return Err(WorkerError::fatal("the order has no address").with_kind("no_address"));
    }
    Ok(serde_json::json!({"deliverable": true}))
}

#[worker("wrap_gift")]
async fn wrap_gift(order: Order) -> Result<serde_json::Value, WorkerError> {
    Ok(serde_json::json!({"wrapped": order.sku}))
}

#[derive(Debug, Serialize, Deserialize)]
struct Reservation {
    reservation_id: String,
    sku: String,
    quantity: u32,
}

/// The warehouse: a worker that holds a resource (the stock), so it
/// implements `Worker` by hand instead of using `#[worker]`.
#[derive(Clone)]
struct Warehouse {
    stock: Arc<Mutex<HashMap<String, i64>>>,
    /// Reservations by idempotency key, so a redelivered or retried command reserves once.
    reservations: Arc<Mutex<HashMap<String, Reservation>>>,
    compensate: bool,
}

impl Warehouse {
    fn available(&self, sku: &str) -> i64 {
        self.stock
            .lock()
            .map(|s| s.get(sku).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

#[async_trait]
impl Worker for Warehouse {
    fn name(&self) -> &str {
        if self.compensate {
            "release_inventory"
        } else {
            "check_inventory"
        }
    }

    async fn run(&self, input: Payload, ctx: WorkerContext) -> Result<Payload, WorkerError> {
        let order: Order = multiagents::worker::decode_input(self.name(), &input)?;
        // Read before taking the lock: no lock is held across an await.
        let reservation: Option<Reservation> = match self.compensate {
            true => Some(ctx.output("inventory").await?),
            false => None,
        };
        let mut stock = self
            .stock
            .lock()
            .map_err(|_| WorkerError::retry("stock lock poisoned"))?;
        let out = if let Some(r) = reservation {
            let mut released = self
                .reservations
                .lock()
                .map_err(|_| WorkerError::retry("lock poisoned"))?;
            // Releasing is idempotent: only a reservation still held is put back.
            if released.remove(&r.reservation_id).is_some() {
                *stock.entry(r.sku.clone()).or_default() += i64::from(r.quantity);
            }
            serde_json::json!({"released": r.reservation_id})
        } else {
            let mut reservations = self
                .reservations
                .lock()
                .map_err(|_| WorkerError::retry("lock poisoned"))?;
            let key = ctx.idempotency_key().to_string();
            if !reservations.contains_key(&key) {
                let left = stock.entry(order.sku.clone()).or_default();
                if *left < i64::from(order.quantity) {
                    return Err(
                        WorkerError::fatal(format!("only {left} of {} left", order.sku))
                            .with_kind("out_of_stock"),
                    );
                }
                *left -= i64::from(order.quantity);
                reservations.insert(
                    key.clone(),
                    Reservation {
                        reservation_id: key.clone(),
                        sku: order.sku.clone(),
                        quantity: order.quantity,
                    },
                );
            }
            serde_json::json!({"reservation_id": key, "sku": order.sku, "quantity": order.quantity})
        };
        multiagents::worker::encode_output(self.name(), &out)
    }
}

#[worker("process_payment")]
async fn process_payment(
    order: Order,
    ctx: WorkerContext,
) -> Result<serde_json::Value, WorkerError> {
    if order.card == DECLINED_CARD {
        return Err(WorkerError::fatal(format!(
            "card ending {} was declined",
            &order.card[order.card.len() - 4..]
        ))
        .with_kind("card_declined"));
    }
    // The idempotency key doubles as the payment provider's idempotency key.
    Ok(
        serde_json::json!({"charge_id": format!("ch_{}", ctx.idempotency_key()), "amount_cents": order.amount_cents}),
    )
}

#[worker("refund_payment")]
async fn refund_payment(
    order: Order,
    ctx: WorkerContext,
) -> Result<serde_json::Value, WorkerError> {
    let charge: serde_json::Value = ctx.output("payment").await?;
    Ok(serde_json::json!({"refunded": charge["charge_id"], "amount_cents": order.amount_cents}))
}

#[worker("generate_confirmation")]
async fn generate_confirmation(
    order: Order,
    ctx: WorkerContext,
) -> Result<serde_json::Value, WorkerError> {
    let charge: serde_json::Value = ctx.output("payment").await?;
    Ok(
        serde_json::json!({"confirmation": format!("CONF-{:05}", order.order_id), "charge_id": charge["charge_id"]}),
    )
}

#[worker("fulfill_order")]
async fn fulfill_order(order: Order, ctx: WorkerContext) -> Result<serde_json::Value, WorkerError> {
    if order.flaky_fulfilment && ctx.attempt == 1 {
        return Err(WorkerError::retry("warehouse API timed out").with_kind("upstream_timeout"));
    }
    Ok(serde_json::json!({"tracking": format!("TRK{:08}", order.order_id * 7919)}))
}

#[worker("notify_customer")]
async fn notify_customer(
    order: Order,
    ctx: WorkerContext,
) -> Result<serde_json::Value, WorkerError> {
    let confirmation: serde_json::Value = ctx.output("confirmation").await?;
    Ok(serde_json::json!({"emailed": order.customer, "confirmation": confirmation["confirmation"]}))
}

/// splitmix64: a tiny seeded generator, enough to pick orders reproducibly.
fn mix(x: u64) -> u64 {
    multiagents::core::hash::splitmix64(x)
}

fn unit(seed: u64, n: u64, salt: u64) -> f64 {
    (mix(seed ^ mix(n ^ mix(salt))) >> 11) as f64 / (1u64 << 53) as f64
}

fn order(seed: u64, n: u64, fail_rate: f64) -> Order {
    let skus = ["mug", "t-shirt", "poster", "sticker-pack"];
    Order {
        order_id: n,
        customer: format!("customer{}@example.com", n),
        sku: skus[(mix(seed ^ n) % skus.len() as u64) as usize].to_string(),
        quantity: 1 + (mix(seed.wrapping_add(n)) % 3) as u32,
        amount_cents: 500 + mix(seed ^ (n << 8)) % 10_000,
        card: if unit(seed, n, 1) < fail_rate {
            DECLINED_CARD.into()
        } else {
            "4242-4242-4242-4242".into()
        },
        flaky_fulfilment: unit(seed, n, 2) < 0.3,
        gift_wrap: unit(seed, n, 3) < 0.3,
        address: format!("{} Main Street", 1 + n),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // The example prints its own report: log only warnings unless told more.
    let mut monitoring = multiagents::monitoring::MonitoringConfig::default();
    monitoring.logging.level = "warn".into();
    let monitoring = monitoring.overlay(args.monitoring.as_deref())?;
    multiagents::monitoring::init_logging(
        &monitoring.logging,
        multiagents::monitoring::ConsoleStreams::Split,
    )?;
    // `/metrics` and `/healthz`, when the settings name an address; before
    // anything runs, so that every metric is recorded.
    let _metrics = match (
        &monitoring.metrics.prometheus_addr,
        monitoring.metrics.enabled,
    ) {
        (Some(addr), true) => Some(
            multiagents::monitoring::metrics::serve_metrics(addr, std::sync::Arc::new(|| Ok(())))
                .await?,
        ),
        _ => None,
    };
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err(format!(
            "--fail-rate must be between 0 and 1, not {}",
            args.fail_rate
        )
        .into());
    }
    let stock: HashMap<String, i64> = ["mug", "t-shirt", "poster", "sticker-pack"]
        .iter()
        .map(|s| (s.to_string(), 1_000_000))
        .collect();
    let warehouse = Warehouse {
        stock: Arc::new(Mutex::new(stock)),
        reservations: Arc::new(Mutex::new(HashMap::new())),
        compensate: false,
    };
    let (bus, store): Backends = match &args.redis_url {
        Some(url) => redis_backends(url, &args.prefix).await?,
        None if args.role != Role::All => {
            return Err("--role other than `all` needs --redis-url: roles in separate processes share a Redis".into());
        }
        None => (
            multiagents::bus::MemoryBus::new().into(),
            FileStore::open(&args.store)?.into(),
        ),
    };
    let monitor_store = store.clone();
    let run_started = std::time::Instant::now();
    let workers: Vec<(std::sync::Arc<dyn Worker>, WorkerOptions)> = vec![
        (
            std::sync::Arc::new(validate_order),
            WorkerOptions::default(),
        ),
        (
            std::sync::Arc::new(warehouse.clone()),
            WorkerOptions::default(),
        ),
        (
            std::sync::Arc::new(Warehouse {
                compensate: true,
                ..warehouse.clone()
            }),
            WorkerOptions::default(),
        ),
        (std::sync::Arc::new(check_fraud), WorkerOptions::default()),
        (
            std::sync::Arc::new(verify_address),
            WorkerOptions::default(),
        ),
        (std::sync::Arc::new(wrap_gift), WorkerOptions::default()),
        (
            std::sync::Arc::new(process_payment),
            WorkerOptions::default(),
        ),
        (
            std::sync::Arc::new(refund_payment),
            WorkerOptions::default(),
        ),
        (
            std::sync::Arc::new(generate_confirmation),
            WorkerOptions::default(),
        ),
        (
            std::sync::Arc::new(fulfill_order),
            WorkerOptions::default().concurrency(32),
        ),
        (
            std::sync::Arc::new(notify_customer),
            WorkerOptions::default(),
        ),
    ];
    let runtime = match args.role {
        Role::Workers => {
            let mut manager = multiagents::worker::WorkerManager::new(bus)
                .config(
                    multiagents::worker::WorkerManagerConfig::default()
                        .with_monitoring(&monitoring),
                )
                .store(store.clone());
            for (w, o) in workers {
                manager = manager.register_arc(w, o);
            }
            let handle = manager.start().await?;
            println!(
                "workers running (prefix {}); Ctrl-C to drain and stop",
                args.prefix
            );
            tokio::signal::ctrl_c().await?;
            handle.shutdown().await;
            return Ok(());
        }
        Role::Orchestrator => {
            let runtime = Runtime::builder()
                .bus(bus)
                .store(store)
                .workflow(definition()?)
                .external_workers()
                .orchestrator_config(multiagents::OrchestratorConfig {
                    redispatch_on_start: false,
                    redispatch_after: Some(Duration::from_secs(60)),
                    ..Default::default()
                })
                .start()
                .await?;
            println!(
                "orchestrator running (prefix {}); Ctrl-C to stop",
                args.prefix
            );
            tokio::signal::ctrl_c().await?;
            runtime.shutdown().await;
            return Ok(());
        }
        Role::Client => {
            let client = multiagents::Client::new(bus, store);
            client.register(&definition()?).await?;
            (None, client)
        }
        Role::All => {
            let mut builder = Runtime::builder()
                .bus(bus)
                .store(store)
                .worker_config(
                    multiagents::worker::WorkerManagerConfig::default()
                        .with_monitoring(&monitoring),
                )
                .workflow(definition()?);
            for (w, o) in workers {
                builder = builder.worker_with_arc(w, o);
            }
            let runtime = builder.start().await?;
            let client = runtime.client();
            (Some(runtime), client)
        }
    };
    let (runtime, client) = runtime;
    let local_stock = args.role == Role::All;

    let mut ids: Vec<TransactionId> = Vec::new();
    for status in [WorkflowStatus::Running, WorkflowStatus::Compensating] {
        let unfinished = client
            .list(&ListQuery {
                status: Some(status),
                ..Default::default()
            })
            .await?;
        ids.extend(unfinished.iter().map(|s| s.transaction_id));
    }
    if !ids.is_empty() {
        println!(
            "resuming {} unfinished order(s) from an earlier run in {}",
            ids.len(),
            args.store.display()
        );
    }
    let before = warehouse.available("mug")
        + warehouse.available("t-shirt")
        + warehouse.available("poster")
        + warehouse.available("sticker-pack");
    println!(
        "placing {} order(s), about {:.0}% with a declined card (seed {})",
        args.orders,
        args.fail_rate * 100.0,
        args.seed
    );
    for n in 1..=args.orders {
        ids.push(
            client
                .start("ecommerce_order", &order(args.seed, n, args.fail_rate))
                .await?,
        );
    }

    let mut finished = Vec::with_capacity(ids.len());
    for tx in &ids {
        finished.push(client.wait(*tx, Duration::from_secs(60)).await?);
    }
    // Failed orders first, then the rest, up to --show.
    let mut shown: Vec<_> = finished
        .iter()
        .filter(|s| s.status != WorkflowStatus::Completed)
        .collect();
    shown.extend(
        finished
            .iter()
            .filter(|s| s.status == WorkflowStatus::Completed),
    );
    println!();
    for state in shown.iter().take(args.show) {
        let order: Order = state.input.parse()?;
        println!(
            "order #{} ({} x{}, {}):",
            order.order_id, order.sku, order.quantity, order.customer
        );
        print!("{}", multiagents::timeline::render(state));
        println!();
    }
    if finished.len() > args.show {
        println!(
            "({} more order(s) not shown; raise --show to see them)\n",
            finished.len() - args.show
        );
    }

    let count = |s: WorkflowStatus| finished.iter().filter(|x| x.status == s).count();
    let retries: usize = finished
        .iter()
        .flat_map(|s| s.history.iter())
        .filter(|h| {
            matches!(
                h.event,
                multiagents::core::saga::HistoryEvent::RetryScheduled { .. }
            )
        })
        .count();
    let released = finished
        .iter()
        .filter(|s| {
            s.step("inventory")
                .is_some_and(|i| i.status == multiagents::core::StepStatus::Compensated)
        })
        .count();
    let after = warehouse.available("mug")
        + warehouse.available("t-shirt")
        + warehouse.available("poster")
        + warehouse.available("sticker-pack");
    let kept: i64 = finished
        .iter()
        .filter(|s| s.status == WorkflowStatus::Completed)
        .filter_map(|s| s.input.parse::<Order>().ok())
        .map(|o| i64::from(o.quantity))
        .sum();
    println!("summary: {} order(s)", finished.len());
    println!(
        "  completed            {}",
        count(WorkflowStatus::Completed)
    );
    println!(
        "  compensated          {}  (inventory released for {released})",
        count(WorkflowStatus::Compensated)
    );
    println!("  failed               {}", count(WorkflowStatus::Failed));
    println!(
        "  compensation failed  {}",
        count(WorkflowStatus::CompensationFailed)
    );
    let wrapped = finished
        .iter()
        .filter(|s| {
            s.step("gift_wrap")
                .is_some_and(|g| g.status == multiagents::core::StepStatus::Completed)
        })
        .count();
    let skipped = finished
        .iter()
        .filter(|s| {
            s.step("gift_wrap")
                .is_some_and(|g| g.status == multiagents::core::StepStatus::Skipped)
        })
        .count();
    println!("  retries              {retries}");
    println!("  gift-wrapped         {wrapped}  (skipped for {skipped}: not asked)");
    if local_stock {
        // The warehouse's stock lives in this process only when its workers do.
        println!(
            "  stock taken          {}  (= items in completed orders placed in this run: {kept})",
            before - after
        );
    }
    match &args.redis_url {
        Some(_) => println!("  state                Redis, prefix {}", args.prefix),
        None => println!("  state file           {}", args.store.display()),
    }
    if let Some(runtime) = runtime {
        runtime.shutdown().await;
    }
    if args.monitoring.is_some() {
        print_monitoring(monitor_store, &monitoring, run_started.elapsed()).await?;
    }
    Ok(())
}

/// The monitors' view of the run: commands and their latencies (event
/// monitor) and worker health (worker monitor).
async fn print_monitoring(
    store: multiagents::store::Store,
    monitoring: &multiagents::monitoring::MonitoringConfig,
    took: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    use multiagents::monitoring::{EventMonitor, WorkerMonitor};
    println!();
    println!("monitoring summary");
    if monitoring.event_monitoring.enabled {
        let events = EventMonitor::new(store.clone(), monitoring.event_monitoring.clone());
        let w = events.window(took + Duration::from_secs(1)).await?;
        println!(
            "  commands             {} ({} completed, {} failed, {} timed out; success {:.1}%)",
            w.events, w.completed, w.failed, w.timed_out, w.success_rate_percent
        );
        println!(
            "  dispatch → outcome   p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
            w.latency_ms.p50, w.latency_ms.p95, w.latency_ms.p99
        );
        println!(
            "  in worker bodies     p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
            w.processing_ms.p50, w.processing_ms.p95, w.processing_ms.p99
        );
    }
    if monitoring.worker_monitoring.enabled {
        let workers = WorkerMonitor::new(store, monitoring.worker_monitoring.clone());
        for t in workers.report().await? {
            println!(
                "  {:<20} {:<9} {:>4} ok {:>3} failed  p50 {:.2} ms  p99 {:.2} ms{}",
                t.worker,
                t.health.as_str(),
                t.succeeded,
                t.failed,
                t.duration_ms.p50,
                t.duration_ms.p99,
                t.errors
                    .first()
                    .map(|e| format!("  ({} × {})", e.count, e.kind))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

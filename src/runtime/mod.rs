//! The runtime: the orchestrator loops and, in one process, the workers.
//!
//! [`Runtime::builder`] assembles the embedded mode — in-memory bus, a store
//! of your choice (in-memory by default, [`crate::store::FileStore`] to
//! survive restarts), your workflow definitions and workers — and starts it.

mod engine;
mod metrics;
mod orchestrator;

use std::collections::HashSet;
use std::sync::Arc;

pub(crate) use engine::Driven as engine_driven;
pub(crate) use engine::Engine;
pub use orchestrator::{OrchestratorConfig, OrchestratorHandle};

use crate::bus::{Bus, MemoryBus};
use crate::core::WorkflowDefinition;
use crate::store::{MemoryStore, Store};
use crate::worker::{
    Worker, WorkerHandle, WorkerHealth, WorkerManager, WorkerManagerConfig, WorkerOptions,
};
use crate::{Client, Error};

/// Builds a [`Runtime`].
#[must_use = "a builder does nothing until .start() is awaited"]
pub struct RuntimeBuilder {
    bus: Option<Bus>,
    store: Option<Store>,
    workflows: Vec<WorkflowDefinition>,
    workers: Vec<(Arc<dyn Worker>, WorkerOptions)>,
    orchestrator: OrchestratorConfig,
    worker_config: WorkerManagerConfig,
    external_workers: bool,
}

/// An orchestrator and workers running in this process.
///
/// ```
/// use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
/// use multiagents::worker::{from_fn, WorkerError};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let runtime = Runtime::builder()
///     .workflow(WorkflowBuilder::new("greet").step("hello", "say_hello").build()?)
///     .worker(from_fn("say_hello", |name: String, _ctx| async move {
///         Ok::<_, WorkerError>(format!("hello, {name}"))
///     }))
///     .start()
///     .await?;
/// let client = runtime.client();
/// let tx = client.start("greet", &"ada").await?;
/// let done = client.wait(tx, std::time::Duration::from_secs(5)).await?;
/// assert_eq!(done.status, WorkflowStatus::Completed);
/// assert_eq!(done.output("hello").unwrap().as_str(), r#""hello, ada""#);
/// runtime.shutdown().await;
/// # Ok::<(), multiagents::Error>(())
/// # }).unwrap();
/// ```
pub struct Runtime {
    client: Client,
    orchestrator: OrchestratorHandle,
    workers: Option<WorkerHandle>,
}

impl Runtime {
    /// Starts a builder.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            bus: None,
            store: None,
            workflows: Vec::new(),
            workers: Vec::new(),
            orchestrator: OrchestratorConfig::default(),
            worker_config: WorkerManagerConfig::default(),
            external_workers: false,
        }
    }

    /// A client for starting, watching and cancelling workflows.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Health of the workers in this process.
    pub fn worker_health(&self) -> Vec<WorkerHealth> {
        self.workers
            .as_ref()
            .map(|w| w.health())
            .unwrap_or_default()
    }

    /// Drains the workers, then stops the orchestrator.
    pub async fn shutdown(self) {
        if let Some(w) = &self.workers {
            w.shutdown().await;
        }
        self.orchestrator.shutdown().await;
    }
}

impl RuntimeBuilder {
    /// The bus (default: a new [`MemoryBus`]): a backend, or a [`Bus`]
    /// put together from parts. To share one with other runtimes or a
    /// [`WorkerManager`], pass a clone.
    pub fn bus(mut self, bus: impl Into<Bus>) -> Self {
        self.bus = Some(bus.into());
        self
    }

    /// The store (default: a new [`MemoryStore`]): a backend, or a
    /// [`Store`] put together from parts. To share one, pass a clone.
    pub fn store(mut self, store: impl Into<Store>) -> Self {
        self.store = Some(store.into());
        self
    }

    /// Registers a workflow definition.
    pub fn workflow(mut self, definition: WorkflowDefinition) -> Self {
        self.workflows.push(definition);
        self
    }

    /// Runs a worker in this process with default options.
    pub fn worker(self, worker: impl Worker) -> Self {
        self.worker_with(worker, WorkerOptions::default())
    }

    /// Runs a worker in this process.
    pub fn worker_with(mut self, worker: impl Worker, options: WorkerOptions) -> Self {
        self.workers.push((Arc::new(worker), options));
        self
    }

    /// Runs a shared worker in this process.
    pub fn worker_with_arc(mut self, worker: Arc<dyn Worker>, options: WorkerOptions) -> Self {
        self.workers.push((worker, options));
        self
    }

    /// Orchestrator settings.
    pub fn orchestrator_config(mut self, config: OrchestratorConfig) -> Self {
        self.orchestrator = config;
        self
    }

    /// Worker manager settings.
    pub fn worker_config(mut self, config: WorkerManagerConfig) -> Self {
        self.worker_config = config;
        self
    }

    /// Workers run in other processes: do not insist that every worker the
    /// workflows name is registered here.
    pub fn external_workers(mut self) -> Self {
        self.external_workers = true;
        self
    }

    /// Registers the workflows, checks that their workers exist, and starts
    /// the workers and the orchestrator.
    pub async fn start(self) -> Result<Runtime, Error> {
        let bus = self.bus.unwrap_or_else(|| MemoryBus::new().into());
        let store = self.store.unwrap_or_else(|| MemoryStore::new().into());
        if !self.external_workers {
            let known: HashSet<&str> = self.workers.iter().map(|(w, _)| w.name()).collect();
            for def in &self.workflows {
                for step in def.steps() {
                    let needed = step.worker().map(|w| (w, "runs")).into_iter().chain(
                        step.compensation
                            .as_ref()
                            .map(|c| (&c.worker, "is compensated by")),
                    );
                    for (worker, what) in needed {
                        if !known.contains(worker.as_str()) {
                            return Err(Error::Config(format!(
                                "step `{}` of workflow `{}` {what} worker `{worker}`, which is not registered; add it with .worker(…) or call .external_workers() if it runs elsewhere",
                                step.name,
                                def.name()
                            )));
                        }
                    }
                }
            }
        }
        if let Some(cycle) = crate::core::workflow::child_cycle(&self.workflows) {
            return Err(Error::Config(format!(
                "workflows start each other as sub-workflows in a cycle, which would never end: {}",
                cycle.join(" → ")
            )));
        }
        let engine = Arc::new(Engine::new(bus.clone(), store.clone()));
        for def in &self.workflows {
            engine.register(def).await?;
        }
        if crate::monitoring::metrics::enabled() {
            // The metrics of every deployed workflow, at zero, from the first scrape.
            engine.preload_definitions().await;
        }
        let workers = if self.workers.is_empty() {
            None
        } else {
            let mut manager = WorkerManager::new(bus)
                .config(self.worker_config)
                .store(store);
            for (w, o) in self.workers {
                manager = manager.register_arc(w, o);
            }
            Some(manager.start().await?)
        };
        let orchestrator = orchestrator::start(engine.clone(), self.orchestrator).await?;
        Ok(Runtime {
            client: Client::from_engine(engine),
            orchestrator,
            workers,
        })
    }
}

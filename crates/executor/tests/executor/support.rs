//! A harness that reads like the executor's API: start a pool over a fresh database,
//! submit, wait for a batch to reach a state, shut down.

use std::sync::Arc;
use std::time::Duration;

use batchd_domain::{JsonMap, Mode, OnItemFailure};
use batchd_executor::{Executor, ExecutorConfig, ExecutorHandle, HandlerRegistry, QueueConfig};
use batchd_storage::testing::{ManualClock, TestDatabase};
use batchd_storage::{BatchRecord, CreateOutcome, EventRecord, NewBatch, NewItem, Scope, Store, StoreOptions};
use serde_json::{Value, json};

/// Generates, for each listed test function, one `#[tokio::test]` per backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Backend::Postgres).await;
                }
            )*
        }
    };
}
pub(crate) use both_backends;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Harness {
    pub store: Arc<dyn Store>,
    pub clock: Option<ManualClock>,
    handle: Option<ExecutorHandle>,
    _db: TestDatabase,
}

impl Harness {
    /// A store over a fresh database (`None`: PostgreSQL is not configured here).
    pub async fn open(backend: Backend) -> Option<Harness> {
        Self::open_with(backend, false).await
    }

    /// The same with a clock the test moves by hand.
    pub async fn open_with_manual_clock(backend: Backend) -> Option<Harness> {
        Self::open_with(backend, true).await
    }

    async fn open_with(backend: Backend, manual: bool) -> Option<Harness> {
        let db = match backend {
            Backend::Sqlite => TestDatabase::sqlite(),
            Backend::Postgres => TestDatabase::postgres().await?,
        };
        let clock = manual.then(ManualClock::new);
        let mut options = StoreOptions::new(db.url());
        if let Some(clock) = &clock {
            options.clock = clock.clock();
        }
        let store = batchd_storage::connect(options).await.expect("open the store");
        Some(Harness {
            store,
            clock,
            handle: None,
            _db: db,
        })
    }

    /// Starts the pool with these handlers and queues.
    pub fn start(
        &mut self,
        registry: HandlerRegistry,
        queues: Vec<QueueConfig>,
        tweak: impl FnOnce(&mut ExecutorConfig),
    ) {
        let mut config = ExecutorConfig {
            node_id: "test-node".into(),
            queues,
            poll_interval: Duration::from_millis(200),
            rescue_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(10),
            ..ExecutorConfig::default()
        };
        tweak(&mut config);
        self.handle = Some(Executor::start(self.store.clone(), registry, config).expect("start the executor"));
    }

    pub async fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }

    pub fn running(&self) -> usize {
        self.handle.as_ref().map_or(0, ExecutorHandle::running)
    }

    pub async fn submit(&self, queue: &str, mode: Mode, inputs: Vec<Value>) -> (String, Vec<String>) {
        self.submit_batch(new_batch(queue, mode, inputs)).await
    }

    pub async fn submit_batch(&self, batch: NewBatch) -> (String, Vec<String>) {
        match self.store.create_batch(batch).await.expect("create the batch") {
            CreateOutcome::Created(b, ids) => (b.id, ids),
            CreateOutcome::Existing(..) => panic!("expected a new batch"),
        }
    }

    pub async fn batch(&self, id: &str) -> BatchRecord {
        self.store.get_batch(Scope::All, id).await.expect("get the batch")
    }

    /// Waits (on notifications, with a deadline) until the batch satisfies `done`.
    pub async fn wait_until(&self, id: &str, what: &str, done: impl Fn(&BatchRecord) -> bool) -> BatchRecord {
        let mut notices = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let batch = self.batch(id).await;
            if done(&batch) {
                return batch;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "batch {id} never got {what}: {batch:?}"
            );
            let _ = tokio::time::timeout(Duration::from_millis(50), notices.recv()).await;
        }
    }

    pub async fn wait_until_ended(&self, id: &str) -> BatchRecord {
        self.wait_until(id, "to an end", |b| b.status.is_terminal()).await
    }

    pub async fn events(&self, id: &str) -> Vec<EventRecord> {
        self.store.read_events(Scope::All, id, 0, 1_000).await.expect("events")
    }

    pub async fn event_types(&self, id: &str) -> Vec<String> {
        self.events(id)
            .await
            .into_iter()
            .map(|e| e.event_type.to_string())
            .collect()
    }
}

/// A queue with quick retries for tests.
pub fn queue(name: &str, handler: &str, concurrency: usize) -> QueueConfig {
    let defaults = json!({"timeout_ms": 180_000, "max_attempts": 3, "backoff_base_ms": 10, "backoff_max_ms": 100});
    QueueConfig {
        name: name.into(),
        handler: handler.into(),
        concurrency,
        rate_per_second: 0.0,
        burst: 1,
        lease: Duration::from_secs(30),
        defaults: defaults.as_object().cloned().unwrap_or_default(),
    }
}

pub fn new_batch(queue: &str, mode: Mode, inputs: Vec<Value>) -> NewBatch {
    NewBatch {
        id: batchd_domain::new_batch_id(),
        tenant: "acme".into(),
        queue: queue.into(),
        session_id: None,
        mode,
        on_item_failure: OnItemFailure::Continue,
        priority: 0,
        run_at: None,
        config: JsonMap::new(),
        webhook: None,
        metadata: None,
        idempotency_key: None,
        client_chose_id: false,
        request_hash: "h".into(),
        items: inputs
            .into_iter()
            .map(|input| NewItem {
                input,
                custom_id: None,
                config: JsonMap::new(),
                max_attempts: 3,
            })
            .collect(),
    }
}

pub fn demo() -> HandlerRegistry {
    HandlerRegistry::with_builtins()
}

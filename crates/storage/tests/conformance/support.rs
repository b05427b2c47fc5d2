//! Test helpers that read like the store's API.

use std::sync::Arc;
use std::time::Duration;

use batchd_domain::{ItemStatus, JsonMap, Mode, OnItemFailure, RetryPolicy};
use batchd_storage::testing::{ManualClock, TestDatabase};
use batchd_storage::{
    BatchRecord, ClaimRequest, ClaimedItem, CreateOutcome, Finish, FinishResult, ItemRecord, NewBatch, NewItem,
    Outcome, PageRequest, Scope, Store, StoreOptions,
};
use serde_json::{Value, json};

/// Generates, for each listed test function, one `#[tokio::test]` per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Fixture::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(fixture) = crate::support::Fixture::postgres().await {
                        super::$name(fixture).await;
                    }
                }
            )*
        }
    };
}
pub(crate) use conformance;

pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub clock: ManualClock,
    pub db: TestDatabase,
}

impl Fixture {
    pub async fn sqlite() -> Fixture {
        Self::open(TestDatabase::sqlite()).await
    }

    pub async fn postgres() -> Option<Fixture> {
        Some(Self::open(TestDatabase::postgres().await?).await)
    }

    async fn open(db: TestDatabase) -> Fixture {
        let clock = ManualClock::new();
        let mut options = StoreOptions::new(db.url());
        options.clock = clock.clock();
        let store = batchd_storage::connect(options).await.expect("open the store");
        Fixture { store, clock, db }
    }

    /// Another store on the same database, as a second batchd instance would open it.
    pub async fn reopen(&self) -> Arc<dyn Store> {
        let mut options = StoreOptions::new(self.db.url());
        options.clock = self.clock.clock();
        batchd_storage::connect(options).await.expect("reopen the store")
    }

    pub async fn submit(&self, batch: NewBatch) -> (BatchRecord, Vec<String>) {
        match self.store.create_batch(batch).await.expect("create the batch") {
            CreateOutcome::Created(b, ids) => (b, ids),
            CreateOutcome::Existing(..) => panic!("expected a new batch"),
        }
    }

    pub async fn claim(&self, queue: &str, n: usize) -> Vec<ClaimedItem> {
        self.store.claim(&claim_request(queue, n)).await.expect("claim")
    }

    pub async fn finish(&self, item: &ClaimedItem, outcome: Outcome) -> FinishResult {
        let finish = Finish {
            item_id: item.id.clone(),
            lease_token: item.lease_token.clone(),
            outcome,
        };
        self.store.finish(vec![finish]).await.expect("finish").remove(0)
    }

    pub async fn complete(&self, item: &ClaimedItem) -> FinishResult {
        self.finish(
            item,
            Outcome::Completed {
                result: json!({"done": item.index}),
            },
        )
        .await
    }

    /// Completes all of `items` in one call, each with `{"done": index}`.
    pub async fn complete_all(&self, items: &[ClaimedItem]) -> Vec<FinishResult> {
        self.store.finish(completions(items)).await.expect("finish")
    }

    pub async fn batch(&self, id: &str) -> BatchRecord {
        self.store.get_batch(Scope::All, id).await.expect("get the batch")
    }

    pub async fn items(&self, batch_id: &str) -> Vec<ItemRecord> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_items(Scope::All, batch_id, None, &PageRequest { cursor, limit: 1_000 })
                .await
                .expect("list items");
            out.extend(page.rows);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return out,
            }
        }
    }

    pub async fn event_types(&self, batch_id: &str) -> Vec<String> {
        self.store
            .read_events(Scope::All, batch_id, 0, 1_000)
            .await
            .expect("read events")
            .into_iter()
            .map(|e| e.event_type.to_string())
            .collect()
    }

    /// Counters of the batch row equal a recount of its items.
    pub async fn assert_counts_match_items(&self, batch_id: &str) {
        let batch = self.batch(batch_id).await;
        let items = self.items(batch_id).await;
        let count = |s: ItemStatus| items.iter().filter(|i| i.status == s).count() as i64;
        let c = batch.counts;
        assert_eq!(c.total, items.len() as i64, "total of {batch_id}");
        assert_eq!(c.pending, count(ItemStatus::Pending), "pending of {batch_id}");
        assert_eq!(c.running, count(ItemStatus::Running), "running of {batch_id}");
        assert_eq!(c.completed, count(ItemStatus::Completed), "completed of {batch_id}");
        assert_eq!(c.failed, count(ItemStatus::Failed), "failed of {batch_id}");
        assert_eq!(c.cancelled, count(ItemStatus::Cancelled), "cancelled of {batch_id}");
        assert_eq!(
            c.needs_input,
            count(ItemStatus::NeedsInput),
            "needs_input of {batch_id}"
        );
        assert_eq!(c.sum(), c.total);
    }
}

pub fn claim_request(queue: &str, n: usize) -> ClaimRequest {
    ClaimRequest {
        queue: queue.to_owned(),
        max_items: n,
        lease: Duration::from_secs(30),
        owner: "test".to_owned(),
    }
}

/// The completions of `items`, each with `{"done": index}`.
pub fn completions(items: &[ClaimedItem]) -> Vec<Finish> {
    completions_with(items, |item| json!({"done": item.index}))
}

/// Completions of `items`, each with the result `result` gives it.
pub fn completions_with(items: &[ClaimedItem], result: impl Fn(&ClaimedItem) -> Value) -> Vec<Finish> {
    items
        .iter()
        .map(|item| Finish {
            item_id: item.id.clone(),
            lease_token: item.lease_token.clone(),
            outcome: Outcome::Completed { result: result(item) },
        })
        .collect()
}

/// A batch of `n` items with inputs `{"n": i}`, parallel, on `queue`, for tenant `acme`.
pub fn batch(queue: &str, n: usize) -> NewBatch {
    NewBatch {
        id: batchd_domain::new_batch_id(),
        tenant: "acme".to_owned(),
        queue: queue.to_owned(),
        session_id: None,
        mode: Mode::Parallel,
        on_item_failure: OnItemFailure::Continue,
        priority: 0,
        run_at: None,
        config: JsonMap::new(),
        webhook: None,
        metadata: Some(json!({"k": "v"})),
        idempotency_key: None,
        client_chose_id: false,
        request_hash: "h1".to_owned(),
        items: (0..n)
            .map(|i| NewItem {
                input: json!({"n": i}),
                custom_id: Some(format!("c{i}")),
                config: JsonMap::new(),
                max_attempts: 3,
            })
            .collect(),
    }
}

pub fn sequential(queue: &str, n: usize) -> NewBatch {
    NewBatch {
        mode: Mode::Sequential,
        ..batch(queue, n)
    }
}

pub fn failure(error: &str, retryable: bool) -> Outcome {
    Outcome::Failed {
        error: error.to_owned(),
        retryable,
        retry_after: None,
        policy: RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(60),
        },
    }
}

pub fn input_n(item: &ClaimedItem) -> Value {
    item.input["n"].clone()
}

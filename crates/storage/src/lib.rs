#![doc = include_str!("../README.md")]

mod error;
mod model;
mod notify;
mod order;
mod pg;
pub mod scratch;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use batchd_domain::ItemStatus;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::broadcast;

pub use error::StoreError;
pub use model::*;
pub use notify::Notice;
pub use order::{FirstPhaseDone, Turn};
pub use pg::PgStore;
pub use sqlite::SqliteStore;

/// The clock the store stamps rows with; tests inject their own.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The system clock, truncated to microseconds (what both databases keep).
pub fn system_clock() -> Clock {
    Arc::new(|| {
        let now = OffsetDateTime::now_utc();
        now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000).unwrap_or(now)
    })
}

/// How to open a store.
#[derive(Clone)]
pub struct StoreOptions {
    /// `sqlite://file.db` (relative to the working directory), `sqlite:///abs/file.db`, or
    /// `postgres://…` / `postgresql://…`.
    pub url: String,
    /// Apply pending migrations on open.
    pub migrate: bool,
    /// Connections in the pool (PostgreSQL), or readers beside the one writer (SQLite).
    pub max_connections: usize,
    pub clock: Clock,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("url", &redact_url(&self.url))
            .field("migrate", &self.migrate)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            migrate: true,
            max_connections: 8,
            clock: system_clock(),
        }
    }
}

/// A database URL with any password replaced, for logs and `config check`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Opens the store the URL names, applying migrations unless told not to.
pub async fn connect(options: StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    let url = options.url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(options).await?))
    } else if url.starts_with("sqlite://") {
        Ok(Arc::new(SqliteStore::connect(options).await?))
    } else {
        Err(StoreError::Config(format!(
            "database.url `{}` must start with sqlite:// or postgres://",
            redact_url(url)
        )))
    }
}

/// Database reachability and schema state, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub reachable: bool,
    pub migrated: bool,
}

/// Everything batchd keeps. Every method that changes state is one transaction: the items,
/// the batch counters and status, the events and the webhook outbox rows commit together or
/// not at all. Methods that take a `Scope` answer `NotFound` for another tenant's ids.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The backend's name: `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Whether the database answers and every migration is applied.
    async fn readiness(&self) -> Readiness;

    /// Applies pending migrations; returns how many ran.
    async fn migrate(&self) -> Result<usize, StoreError>;

    /// Subscribes to wake-ups (see `Notice`). Subscribe before you query, so nothing that
    /// commits in between is missed.
    fn subscribe(&self) -> broadcast::Receiver<Notice>;

    /// Creates a batch with its items, its `batch.created` event and idempotency record.
    /// A replay (same tenant, same idempotency key or client id, same request hash) returns
    /// the existing batch; another body, or a client id another tenant used, is
    /// `IdempotencyConflict`.
    async fn create_batch(&self, batch: NewBatch) -> Result<CreateOutcome, StoreError>;

    /// One batch.
    async fn get_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError>;

    /// Batches newest first.
    async fn list_batches(
        &self,
        scope: Scope<'_>,
        filter: &BatchFilter,
        page: &PageRequest,
    ) -> Result<Page<BatchRecord>, StoreError>;

    /// A batch's items by index, with queue positions of ready pending items.
    async fn list_items(
        &self,
        scope: Scope<'_>,
        batch_id: &str,
        status: Option<ItemStatus>,
        page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError>;

    /// The scope's items created since a time, oldest first, with positions.
    async fn list_recent_items(
        &self,
        scope: Scope<'_>,
        since: OffsetDateTime,
        page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError>;

    /// One item, with its position.
    async fn get_item(&self, scope: Scope<'_>, id: &str) -> Result<ItemRecord, StoreError>;

    /// A batch's events with `seq > after`, in order, at most `limit`.
    async fn read_events(
        &self,
        scope: Scope<'_>,
        batch_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Claims up to `max_items` ready items of a queue, leasing each: priority first, then
    /// submission order; a sequential batch never has two items running; paused batches and
    /// queues give nothing. Marks batches running and writes `item.started` events.
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedItem>, StoreError>;

    /// Extends a lease, and tells the holder whether to go on.
    async fn renew_lease(&self, item_id: &str, lease_token: &str, lease: Duration) -> Result<LeaseState, StoreError>;

    /// Records a running item's step, message or progress with its event, while the lease
    /// holds.
    async fn report(&self, item_id: &str, lease_token: &str, report: ItemReport) -> Result<LeaseState, StoreError>;

    /// Applies finished attempts, all in one transaction (a group commit). Each applies only
    /// while its lease token still matches a running item; otherwise it is `LeaseLost`.
    async fn finish(&self, finishes: Vec<Finish>) -> Result<Vec<FinishResult>, StoreError>;

    /// `finish` and then `claim` for each request, in one transaction: one commit both
    /// ends attempts and starts the next ones. The claims see the finishes (a batch this
    /// group failed gives nothing); the answer holds a list of claimed items per request,
    /// in request order. It keeps no order with other calls; a writer that overlaps its
    /// groups uses `finish_and_claim_in_turn`.
    async fn finish_and_claim(
        &self,
        finishes: Vec<Finish>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<FinishResult>, Vec<Vec<ClaimedItem>>), StoreError> {
        self.finish_and_claim_in_turn(Turn::unordered(), finishes, claims).await
    }

    /// How many `finish_and_claim` transactions are worth running at once: 1 where write
    /// transactions run one at a time anyway (SQLite), more where the next one's work can
    /// overlap the previous one's (PostgreSQL).
    fn group_overlap(&self) -> usize {
        1
    }

    /// The next place in the commit order of `finish_and_claim` transactions. Take turns in
    /// the order the groups are formed; each group's transaction then locks batch rows and
    /// commits after the groups with earlier turns (a claim never commits before the results
    /// that freed its slots), while its own completions may be written meanwhile.
    fn group_turn(&self) -> Turn;

    /// `finish_and_claim` in a turn taken with `group_turn`.
    async fn finish_and_claim_in_turn(
        &self,
        turn: Turn,
        finishes: Vec<Finish>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<FinishResult>, Vec<Vec<ClaimedItem>>), StoreError>;

    /// Puts running items whose lease expired back to pending (attempt counted), or fails
    /// them when their attempts are used up, or cancels them in a cancelling batch.
    async fn requeue_expired_leases(&self) -> Result<usize, StoreError>;

    /// Cancels a batch: pending and waiting items at once; running ones when their workers
    /// stop (the batch is `cancelling` until then). A no-op on a `cancelling` batch.
    async fn cancel_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError>;

    /// Pauses a batch: nothing new starts; running items finish.
    async fn pause_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError>;

    /// Resumes a paused batch.
    async fn resume_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError>;

    /// Sends a finished batch's failed items (and those `fail_batch` cancelled) back to
    /// pending with their attempts reset.
    async fn retry_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError>;

    /// Cancels one pending item.
    async fn cancel_item(&self, scope: Scope<'_>, id: &str) -> Result<ItemRecord, StoreError>;

    /// Answers an item that needs input: it goes back to pending with the answer.
    async fn answer_item(&self, scope: Scope<'_>, id: &str, answer: Value) -> Result<ItemRecord, StoreError>;

    /// Pauses or resumes a whole queue.
    async fn set_queue_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError>;

    /// Statistics of every queue that has items or a paused state.
    async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError>;

    /// Deletes batches that ended before `before`, with their items, events and deliveries.
    async fn purge_finished(&self, before: OffsetDateTime) -> Result<usize, StoreError>;

    /// Claims up to `max` due webhook deliveries (pending, `next_attempt_at` passed, no live
    /// lease), leasing each for `lease` with a fresh token: several dispatchers never get the
    /// same one while its lease holds. An expired lease (its dispatcher died) is claimable again.
    async fn claim_deliveries(&self, max: usize, lease: Duration) -> Result<Vec<DueDelivery>, StoreError>;

    /// Records one attempt of a claimed delivery and what comes next, in one transaction,
    /// while `lease_token` still holds it; `Ok(false)` (nothing written) when it does not.
    async fn record_delivery_attempt(
        &self,
        delivery_id: &str,
        lease_token: &str,
        attempt: DeliveryAttempt,
        next: DeliveryNext,
    ) -> Result<bool, StoreError>;

    /// A batch's webhook deliveries in event order, each with its attempts.
    async fn list_deliveries(
        &self,
        scope: Scope<'_>,
        batch_id: &str,
        page: &PageRequest,
    ) -> Result<Page<DeliveryRecord>, StoreError>;
}

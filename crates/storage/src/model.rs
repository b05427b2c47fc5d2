//! What the store takes and gives: plain records with typed statuses. The API turns them
//! into wire views; the rows that mirror the tables stay private to each backend.

use std::time::Duration;

use batchd_domain::{
    BatchStatus, CancelReason, Counts, EventType, ItemStatus, JsonMap, Mode, OnItemFailure, RetryPolicy,
};
use serde_json::Value;
use time::OffsetDateTime;

/// Whose data a call may see: one tenant's, or (an admin's) everyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Tenant(&'a str),
    All,
}

impl Scope<'_> {
    pub(crate) fn tenant(&self) -> Option<&str> {
        match self {
            Scope::Tenant(t) => Some(t),
            Scope::All => None,
        }
    }
}

/// A batch to create, already validated.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: String,
    pub tenant: String,
    pub queue: String,
    pub session_id: Option<String>,
    pub mode: Mode,
    pub on_item_failure: OnItemFailure,
    pub priority: i32,
    pub run_at: Option<OffsetDateTime>,
    pub config: JsonMap,
    pub webhook: Option<NewWebhook>,
    pub metadata: Option<Value>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Whether `id` was chosen by the client (then it also works as an idempotency key).
    pub client_chose_id: bool,
    /// A hash of the request body: a replay with another body is a conflict.
    pub request_hash: String,
    pub items: Vec<NewItem>,
}

/// A batch's webhook as stored.
#[derive(Clone, PartialEq)]
pub struct NewWebhook {
    pub url: String,
    pub secret: Option<String>,
    pub events: Vec<EventType>,
}

impl std::fmt::Debug for NewWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewWebhook")
            .field("url", &self.url)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// An item to create.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub input: Value,
    pub custom_id: Option<String>,
    pub config: JsonMap,
    pub max_attempts: i32,
}

/// What `create_batch` did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// A new batch, with its item ids in index order.
    Created(BatchRecord, Vec<String>),
    /// An idempotent replay: the batch that the same request created before.
    Existing(BatchRecord, Vec<String>),
}

/// A stored batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: String,
    pub tenant: String,
    pub queue: String,
    pub session_id: Option<String>,
    pub mode: Mode,
    pub on_item_failure: OnItemFailure,
    pub priority: i32,
    pub run_at: Option<OffsetDateTime>,
    pub config: JsonMap,
    pub webhook: Option<NewWebhook>,
    pub metadata: Option<Value>,
    pub result: Option<Value>,
    pub status: BatchStatus,
    pub counts: Counts,
    pub message: Option<String>,
    pub error: Option<String>,
    pub last_event_seq: i64,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
}

/// A stored item; `position` is set for a pending item that is ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    pub id: String,
    pub batch_id: String,
    pub tenant: String,
    pub queue: String,
    pub index: i32,
    pub custom_id: Option<String>,
    pub input: Value,
    pub config: JsonMap,
    pub status: ItemStatus,
    pub position: Option<i64>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub next_attempt_at: Option<OffsetDateTime>,
    pub lease_expires_at: Option<OffsetDateTime>,
    pub step: Option<String>,
    pub message: Option<String>,
    pub progress: Option<(i64, Option<i64>)>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub question: Option<Value>,
    pub answer: Option<Value>,
    pub cancel_reason: Option<CancelReason>,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
}

/// One timeline event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub batch_id: String,
    pub seq: i64,
    pub item_id: Option<String>,
    pub item_index: Option<i32>,
    pub event_type: EventType,
    pub step: Option<String>,
    pub message: Option<String>,
    pub data: Option<Value>,
    pub at: OffsetDateTime,
}

/// Filters of `GET /v1/batches`.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    /// Any of these statuses (empty: all).
    pub statuses: Vec<BatchStatus>,
    pub queue: Option<String>,
    pub session_id: Option<String>,
    pub created_after: Option<OffsetDateTime>,
}

/// A page of a list: at most `limit` rows after `cursor`.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub cursor: Option<String>,
    pub limit: usize,
}

/// One page and the cursor of the next (`None` on the last page).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A claim of up to `max_items` ready items of a queue.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub queue: String,
    pub max_items: usize,
    pub lease: Duration,
    /// Who holds the lease (a node or worker name), for operators.
    pub owner: String,
}

/// A claimed item: everything a handler needs, and the lease that lets it report.
#[derive(Debug, Clone)]
pub struct ClaimedItem {
    pub id: String,
    pub batch_id: String,
    pub tenant: String,
    pub queue: String,
    pub index: i32,
    pub custom_id: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub input: Value,
    pub answer: Option<Value>,
    pub item_config: JsonMap,
    pub batch_config: JsonMap,
    pub session_id: Option<String>,
    pub mode: Mode,
    pub lease_token: String,
    pub lease_expires_at: OffsetDateTime,
    /// When the item became ready to run (submitted, due again, answered, unblocked): its
    /// pick-up latency is the time from here to the claim.
    pub ready_at: OffsetDateTime,
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed {
        result: Value,
    },
    Failed {
        error: String,
        /// False for a permanent error: no retry whatever the attempts left.
        retryable: bool,
        /// The worker's own delay before the next attempt (e.g. a 429's Retry-After).
        retry_after: Option<Duration>,
        /// The backoff of the item's merged config.
        policy: RetryPolicy,
    },
    NeedsInput {
        question: Value,
    },
    /// The worker saw its batch's cancellation and stopped.
    Cancelled,
    /// Handed back at shutdown: pending again, the attempt not spent.
    Released,
}

/// One finished attempt, reported with the lease it ran under.
#[derive(Debug, Clone)]
pub struct Finish {
    pub item_id: String,
    pub lease_token: String,
    pub outcome: Outcome,
}

/// What became of a reported attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishResult {
    /// Applied; the item is now in this status.
    Applied(ItemStatus),
    /// The lease was no longer this worker's (expired, re-claimed, or a wrong token):
    /// nothing changed.
    LeaseLost,
    /// The item's batch was cancelled: the item ended cancelled instead.
    ItemCancelled,
}

/// A progress report of a running item (step, message, progress) and the event it writes.
#[derive(Debug, Clone, Default)]
pub struct ItemReport {
    pub event_type: Option<EventType>,
    pub step: Option<String>,
    pub message: Option<String>,
    pub progress: Option<(i64, Option<i64>)>,
    pub data: Option<Value>,
}

/// What a lease holder may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Still held, until this time.
    Held(OffsetDateTime),
    /// Its batch is cancelling or has ended: stop.
    Cancelled,
    /// Expired, claimed by another worker, or a wrong token: the worker's result would be dropped.
    Lost,
}

/// Statistics of one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    pub name: String,
    pub paused: bool,
    /// Pending items (ready or not).
    pub depth: i64,
    pub running: i64,
    pub needs_input: i64,
    /// Items completed in the last minute.
    pub completed_last_minute: i64,
    pub oldest_pending_at: Option<OffsetDateTime>,
}

/// A webhook delivery claimed for one attempt: what the dispatcher sends, and the lease
/// that lets it record the outcome.
#[derive(Clone)]
pub struct DueDelivery {
    pub id: String,
    pub batch_id: String,
    pub event_type: EventType,
    pub item_id: Option<String>,
    pub url: String,
    /// The exact body, the same on every attempt.
    pub payload: String,
    /// The batch's webhook secret, as submitted; `None`: unsigned.
    pub secret: Option<String>,
    /// Attempts made before this one.
    pub attempts: i32,
    pub lease_token: String,
    pub lease_expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
}

impl std::fmt::Debug for DueDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueDelivery")
            .field("id", &self.id)
            .field("batch_id", &self.batch_id)
            .field("event_type", &self.event_type)
            .field("url", &self.url)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// One attempt to deliver a webhook, as the dispatcher saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    pub at: OffsetDateTime,
    /// The receiver's status; `None` when no answer came.
    pub status_code: Option<i32>,
    pub latency_ms: i64,
    pub error: Option<String>,
    /// The first KiB of the answer.
    pub response_body: Option<String>,
}

/// What becomes of a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    /// Acknowledged: never sent again.
    Delivered,
    /// Tried again at this time.
    RetryAt(OffsetDateTime),
    /// Given up.
    Failed,
}

/// A recorded attempt, numbered from 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub at: OffsetDateTime,
    pub status_code: Option<i32>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// A webhook delivery with its attempts, as `GET /v1/batches/{id}/webhooks` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub id: String,
    pub batch_id: String,
    pub event_seq: i64,
    pub event_type: EventType,
    pub item_id: Option<String>,
    pub status: batchd_domain::DeliveryStatus,
    pub attempts: Vec<AttemptRecord>,
    pub next_attempt_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

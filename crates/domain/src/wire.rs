//! The JSON bodies of the HTTP API (DESIGN.md sections 7 and 15), shared by the server and
//! the client so the two cannot drift. Every field is always present; a value that does not
//! apply is `null`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::{BatchStatus, Counts, DeliveryStatus, EventType, ItemStatus, JsonMap, Mode, OnItemFailure};

/// A submitted batch after validation (`validate_submission`). Its schema describes the body
/// of `POST /v1/batches`, where only `items` is required and the rest has defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(
        description = "The body of `POST /v1/batches`: only `items` is required; a field left out or null takes \
                       its default. Unknown fields are refused.",
        example = json!({
            "queue": "default",
            "items": [
                {"input": {"steps": ["fetch", "summarize"], "sleep_ms": 200}, "custom_id": "doc-1"},
                {"input": {"text": "hello"}, "custom_id": "doc-2"}
            ],
            "mode": "parallel",
            "metadata": {"requested_by": "reports"}
        })
    )
)]
pub struct SubmitBatch {
    /// A configured queue; 1-64 characters of `[A-Za-z0-9._-]`.
    #[cfg_attr(
        feature = "openapi",
        schema(required = false, default = "default", pattern = "^[A-Za-z0-9._-]{1,64}$")
    )]
    pub queue: String,
    /// At least one item, at most the queue's `max_items`.
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub items: Vec<SubmitItem>,
    /// The client's own batch id, 1-128 characters of `[A-Za-z0-9._:-]`; the server chooses
    /// one when absent. Resubmitting the same id with the same body answers the existing batch.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub id: Option<String>,
    /// A label that groups batches; 1-256 characters.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 256))]
    pub session_id: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required = false, default = "parallel"))]
    pub mode: Mode,
    #[cfg_attr(feature = "openapi", schema(required = false, default = "continue"))]
    pub on_item_failure: OnItemFailure,
    /// Higher runs first.
    #[cfg_attr(feature = "openapi", schema(required = false, default = 0))]
    pub priority: i32,
    /// Nothing of the batch starts before this time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub run_at: Option<OffsetDateTime>,
    /// Batch-level settings (`timeout_ms`, `max_attempts`, ...) and handler options.
    #[cfg_attr(feature = "openapi", schema(value_type = Object, required = false))]
    pub config: JsonMap,
    pub webhook: Option<WebhookSpec>,
    /// Any JSON, returned as is.
    pub metadata: Option<Value>,
}

/// One item of a submitted batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitItem {
    /// Any JSON; what the handler works on.
    pub input: Value,
    /// The client's label for the item, unique within the batch; 1-256 characters.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 256))]
    pub custom_id: Option<String>,
    /// Item-level settings; they override the batch's.
    #[cfg_attr(feature = "openapi", schema(value_type = Object, required = false))]
    pub config: JsonMap,
}

/// A batch's webhook as submitted; the secret is stored and never returned.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookSpec {
    /// An `http://` or `https://` URL. Unless the server sets
    /// `webhooks.allow_private_destinations`, a host on a loopback, private, link-local or
    /// other non-public address is refused (an IP literal or `localhost` at submit, any
    /// resolved address at delivery).
    pub url: String,
    /// The signing secret; stored, never returned. `whsec_<base64>` is a Standard Webhooks
    /// secret (the decoded bytes are the key); any other string is used as its bytes.
    pub secret: Option<String>,
    /// The events to deliver; by default item.completed, item.failed, item.needs_input,
    /// batch.completed, batch.failed and batch.cancelled.
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub events: Vec<EventType>,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("events", &self.events)
            .finish()
    }
}

/// `202` (or `200` on an idempotent replay) reply to `POST /v1/batches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitResponse {
    pub id: String,
    pub status: BatchStatus,
    pub queue: String,
    pub total_items: i64,
    /// The items' ids, in index order.
    pub item_ids: Vec<String>,
    pub status_url: String,
    pub events_url: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The item currently running (or most recently started) in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CurrentItem {
    pub item_id: String,
    pub index: i32,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub step: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub message: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub progress: Option<Progress>,
}

/// Nested progress an item reports (`query i of n`, `tool j of m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    pub current: i64,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub total: Option<i64>,
}

/// A batch's webhook as shown to clients: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookView {
    pub url: String,
    pub events: Vec<EventType>,
}

/// `GET /v1/batches/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchView {
    pub id: String,
    pub queue: String,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub session_id: Option<String>,
    pub status: BatchStatus,
    pub mode: Mode,
    pub on_item_failure: OnItemFailure,
    pub priority: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub run_at: Option<OffsetDateTime>,
    pub counts: Counts,
    /// Ended items over all items, from 0 to 1.
    pub progress: f64,
    /// The running item with the lowest index.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub current: Option<CurrentItem>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub message: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub error: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub result: Option<Value>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub metadata: Option<Value>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: JsonMap,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub webhook: Option<WebhookView>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When an item of the batch first started.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub completed_at: Option<OffsetDateTime>,
}

/// An item as listed; `GET /v1/items/{id}` adds `input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemView {
    pub id: String,
    pub batch_id: String,
    pub index: i32,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub custom_id: Option<String>,
    pub status: ItemStatus,
    /// Set only for a pending item that is ready to run: 1 + the number of ready items of its
    /// queue that will be claimed before it.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub position: Option<i64>,
    pub attempts: i32,
    pub max_attempts: i32,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub step: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub message: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub progress: Option<Progress>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub result: Option<Value>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub error: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub question: Option<Value>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub answer: Option<Value>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub completed_at: Option<OffsetDateTime>,
    /// Only in `GET /v1/items/{id}` and the replies that return one item; lists leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

/// One entry of a batch's timeline, and the `data:` of an SSE frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventView {
    pub seq: i64,
    pub batch_id: String,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub item_id: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub item_index: Option<i32>,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub step: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub message: Option<String>,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub data: Option<Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The one error body of the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `{"code", "message", "issues"}`, plus `current_status` on `invalid_state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// Every field-specific problem, with its path from the body root; empty when none is.
    pub issues: Vec<crate::Issue>,
    /// Only on `invalid_state`: the batch's or item's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub current_status: Option<String>,
}

/// `GET /v1/batches`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchList {
    pub batches: Vec<BatchView>,
    /// The `cursor` of the next page; null on the last page.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_cursor: Option<String>,
}

/// `GET /v1/batches/{id}/items` (by index) and `GET /v1/items` (oldest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemList {
    pub items: Vec<ItemView>,
    /// The `cursor` of the next page; null on the last page.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_cursor: Option<String>,
}

/// One attempt to deliver a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryAttemptView {
    /// 1 for the first attempt.
    pub attempt: i32,
    /// When the request was sent.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The receiver's HTTP status; null when no answer came (timeout, connection error,
    /// refused destination).
    #[cfg_attr(feature = "openapi", schema(required))]
    pub status_code: Option<i32>,
    /// From sending the request to the end of the answer (or the failure).
    pub latency_ms: i64,
    /// Why the attempt did not deliver; null for a 2xx.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub error: Option<String>,
    /// The first KiB of the receiver's answer, as text.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub response_body: Option<String>,
}

/// A webhook delivery of one event (the body it sends is signed; the secret is never shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryView {
    /// The delivery id: the body's `id` and the `webhook-id` header, the same on every attempt.
    pub id: String,
    pub event_type: EventType,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub item_id: Option<String>,
    pub status: DeliveryStatus,
    /// Every attempt so far, oldest first.
    pub attempts: Vec<DeliveryAttemptView>,
    /// When the next attempt is due; null once delivered or failed.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `GET /v1/batches/{id}/webhooks`: in the order of the batch's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
    /// The `cursor` of the next page; null on the last page.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_cursor: Option<String>,
}

/// `GET /v1/batches/{id}/events`: in `seq` order; the next page is `?after=<last seq>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventList {
    pub events: Vec<EventView>,
}

/// `POST /v1/items/{id}/input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AnswerRequest {
    /// Any JSON; it reaches the handler beside the item's input.
    pub answer: Value,
}

/// One queue in `GET /v1/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueView {
    pub name: String,
    /// The configured handler; null for a queue that is no longer configured but still
    /// holds items.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub handler: Option<String>,
    pub paused: bool,
    /// Pending items.
    pub depth: i64,
    pub running: i64,
    pub needs_input: i64,
    /// Items completed in the last minute.
    pub throughput_per_minute: i64,
    /// Seconds since the oldest pending item was submitted.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub oldest_pending_age_seconds: Option<f64>,
}

/// `GET /v1/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

/// The body of `POST /v1/queues/{queue}/claim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(example = json!({"max_items": 10, "wait_ms": 20000, "lease_ms": 60000}))
)]
pub struct ClaimRequest {
    /// Items to claim at most, 1-100.
    #[cfg_attr(
        feature = "openapi",
        schema(required = false, default = 1, minimum = 1, maximum = 100)
    )]
    pub max_items: u32,
    /// How long to wait for work when none is ready (a long poll), 0-30000 ms.
    #[cfg_attr(
        feature = "openapi",
        schema(required = false, default = 0, minimum = 0, maximum = 30000)
    )]
    pub wait_ms: u64,
    /// The lease of each claimed item, 100-3600000 ms; the queue's `lease_ms` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 100, maximum = 3600000))]
    pub lease_ms: Option<u64>,
}

impl Default for ClaimRequest {
    fn default() -> Self {
        Self {
            max_items: 1,
            wait_ms: 0,
            lease_ms: None,
        }
    }
}

/// A claimed item: what a pull worker gets from a claim, and the body batchd POSTs to an
/// `http` queue's URL. `lease_token` authorises the item's reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimItem {
    pub id: String,
    pub batch_id: String,
    pub index: i32,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub custom_id: Option<String>,
    /// The attempt this claim starts, from 1.
    pub attempt: i32,
    /// Any JSON: what to work on.
    pub input: Value,
    /// The answer to the item's question, once given.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub answer: Option<Value>,
    /// Server defaults < queue < batch < item config, merged by key.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: JsonMap,
    #[cfg_attr(feature = "openapi", schema(required))]
    pub session_id: Option<String>,
    /// Authorises the item's heartbeat, events, complete, fail and needs-input calls.
    pub lease_token: String,
    /// When the lease ends unless a heartbeat renews it.
    #[serde(with = "time::serde::rfc3339")]
    pub lease_expires_at: OffsetDateTime,
}

/// `200` reply to a claim: an empty list when nothing came within `wait_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimResponse {
    pub items: Vec<ClaimItem>,
}

/// The body of `POST /v1/items/{id}/heartbeat`: renews the lease, and may report where the
/// item is (written as an `item.step`, `item.progress` or `item.log` event).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    pub lease_token: String,
    /// The new lease from now, 100-3600000 ms; the queue's `lease_ms` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// The kinds of event a worker may write to an item's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkerEventType {
    /// `item.step`: the step the item is on.
    Step,
    /// `item.progress`: how far it is.
    Progress,
    /// `item.log`: a log line or event data.
    Log,
}

/// The body of `POST /v1/items/{id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemEventRequest {
    pub lease_token: String,
    #[serde(rename = "type")]
    pub event_type: WorkerEventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// `200` reply to a heartbeat or an event: the lease still holds, until this time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseResponse {
    #[serde(with = "time::serde::rfc3339")]
    pub lease_expires_at: OffsetDateTime,
}

/// The body of `POST /v1/items/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteRequest {
    pub lease_token: String,
    /// Any JSON; null when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = false))]
    pub result: Value,
}

/// The body of `POST /v1/items/{id}/fail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailRequest {
    pub lease_token: String,
    /// What went wrong; truncated to the server's error length.
    pub error: String,
    /// False: the item fails now, whatever attempts remain.
    #[cfg_attr(feature = "openapi", schema(required = false, default = true))]
    pub retryable: bool,
}

/// The body of `POST /v1/items/{id}/needs-input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NeedsInputRequest {
    pub lease_token: String,
    /// Any JSON: what to ask the client.
    pub question: Value,
}

/// `200` reply to complete, fail and needs-input: the item's status after the report
/// (`pending` for a failure that will be retried).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReportResponse {
    pub id: String,
    pub status: ItemStatus,
}

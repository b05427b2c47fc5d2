//! The JSON bodies of the HTTP API (DESIGN.md sections 7 and 15), shared by the server and
//! the client so the two cannot drift. Every field is always present; a value that does not
//! apply is `null`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::{BatchStatus, Counts, EventType, ItemStatus, JsonMap, Mode, OnItemFailure};

/// A submitted batch after validation (`validate_submission`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitBatch {
    pub queue: String,
    pub items: Vec<SubmitItem>,
    pub id: Option<String>,
    pub session_id: Option<String>,
    pub mode: Mode,
    pub on_item_failure: OnItemFailure,
    pub priority: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub run_at: Option<OffsetDateTime>,
    pub config: JsonMap,
    pub webhook: Option<WebhookSpec>,
    pub metadata: Option<Value>,
}

/// One item of a submitted batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitItem {
    pub input: Value,
    pub custom_id: Option<String>,
    pub config: JsonMap,
}

/// A batch's webhook as submitted; the secret is stored and never returned.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookSpec {
    pub url: String,
    pub secret: Option<String>,
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
pub struct SubmitResponse {
    pub id: String,
    pub status: BatchStatus,
    pub queue: String,
    pub total_items: i64,
    pub item_ids: Vec<String>,
    pub status_url: String,
    pub events_url: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The item currently running (or most recently started) in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentItem {
    pub item_id: String,
    pub index: i32,
    pub step: Option<String>,
    pub message: Option<String>,
    pub progress: Option<Progress>,
}

/// Nested progress an item reports (`query i of n`, `tool j of m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub current: i64,
    pub total: Option<i64>,
}

/// A batch's webhook as shown to clients: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookView {
    pub url: String,
    pub events: Vec<EventType>,
}

/// `GET /v1/batches/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchView {
    pub id: String,
    pub queue: String,
    pub session_id: Option<String>,
    pub status: BatchStatus,
    pub mode: Mode,
    pub on_item_failure: OnItemFailure,
    pub priority: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub run_at: Option<OffsetDateTime>,
    pub counts: Counts,
    pub progress: f64,
    pub current: Option<CurrentItem>,
    pub message: Option<String>,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub metadata: Option<Value>,
    pub config: JsonMap,
    pub webhook: Option<WebhookView>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
}

/// An item as listed; `GET /v1/items/{id}` adds `input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemView {
    pub id: String,
    pub batch_id: String,
    pub index: i32,
    pub custom_id: Option<String>,
    pub status: ItemStatus,
    pub position: Option<i64>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub step: Option<String>,
    pub message: Option<String>,
    pub progress: Option<Progress>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub question: Option<Value>,
    pub answer: Option<Value>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

/// One entry of a batch's timeline, and the `data:` of an SSE frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: i64,
    pub batch_id: String,
    pub item_id: Option<String>,
    pub item_index: Option<i32>,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub step: Option<String>,
    pub message: Option<String>,
    pub data: Option<Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The one error body of the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `{"code", "message", "issues"}`, plus `current_status` on `invalid_state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub issues: Vec<crate::Issue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_status: Option<String>,
}

/// `GET /v1/batches`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchList {
    pub batches: Vec<BatchView>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/batches/{id}/items` (by index) and `GET /v1/items` (oldest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemList {
    pub items: Vec<ItemView>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/batches/{id}/events`: in `seq` order; the next page is `?after=<last seq>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<EventView>,
}

/// `POST /v1/items/{id}/input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRequest {
    pub answer: Value,
}

/// One queue in `GET /v1/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub name: String,
    pub handler: Option<String>,
    pub paused: bool,
    /// Pending items.
    pub depth: i64,
    pub running: i64,
    pub needs_input: i64,
    /// Items completed in the last minute.
    pub throughput_per_minute: i64,
    /// Seconds since the oldest pending item was submitted.
    pub oldest_pending_age_seconds: Option<f64>,
}

/// `GET /v1/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

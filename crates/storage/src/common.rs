// The store's logic, written once and compiled into each backend module with
// `include!("common.rs")`. The including module provides:
// - `schema`: the backend's generated diesel schema;
// - `Conn`: its connection type, and `Self::read_conn` / `Self::write_conn` on the store;
// - `Db`: its diesel backend, and `SqlTimestamp` the SQL type of times, for hand-written SQL;
// - `write_tx!(conn, |c| body)`: runs `body` in a write transaction (`BEGIN IMMEDIATE` on SQLite);
// - `locked!(query)` / `skip_locked!(query)`: `FOR UPDATE [SKIP LOCKED]` on PostgreSQL, nothing
//   on SQLite (whose write transactions are serialized);
// - `insert_rows!(c, table, rows)`: a multi-row insert of owned rows;
// - `Self::notify_in_tx(c, &notices)` and `Self::after_commit(notices)`.
//
// Lock order, so that transactions never wait on each other in a cycle: item rows first, then
// batch rows in id order. The one exception, cancelling a batch (and `fail_batch` cancelling
// the rest), takes the batch first and skips item rows another transaction holds; that
// transaction (a claim) sees the batch's new status once it gets the batch and cancels its
// own items.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use batchd_domain::transition::{batch as batch_sm, item as item_sm};
use batchd_domain::{
    BatchStatus, CancelReason, Counts, DeliveryStatus, EventType, FailureDecision, ItemStatus, JsonMap, Mode,
    OnItemFailure,
};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde_json::{Value, json};
use time::OffsetDateTime;

use self::schema::{batches, events, items, queue_states, webhook_attempts, webhook_deliveries};
use crate::model::*;
use crate::notify::Notice;
use crate::{Readiness, StoreError};

/// Rows of a multi-row insert per statement: below both backends' bind-parameter limits.
const INSERT_CHUNK: usize = 1_000;
/// Expired leases handled per `requeue_expired_leases` call.
const REQUEUE_BATCH: i64 = 1_000;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = batches, treat_none_as_default_value = false)]
struct BatchRow {
    id: String,
    tenant: String,
    queue: String,
    session_id: Option<String>,
    mode: String,
    on_item_failure: String,
    priority: i32,
    run_at: Option<OffsetDateTime>,
    config: Value,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_events: Option<Value>,
    metadata: Option<Value>,
    result: Option<Value>,
    status: String,
    total: i64,
    pending: i64,
    running: i64,
    completed: i64,
    failed: i64,
    cancelled: i64,
    needs_input: i64,
    message: Option<String>,
    error: Option<String>,
    idempotency_key: Option<String>,
    request_hash: String,
    last_event_seq: i64,
    created_at: OffsetDateTime,
    started_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
    completed_at: Option<OffsetDateTime>,
}

/// The columns of a batch that change after it is created.
#[derive(Debug, AsChangeset)]
#[diesel(table_name = batches, treat_none_as_null = true)]
struct BatchState<'a> {
    status: &'a str,
    pending: i64,
    running: i64,
    completed: i64,
    failed: i64,
    cancelled: i64,
    needs_input: i64,
    message: Option<&'a str>,
    error: Option<&'a str>,
    result: Option<&'a Value>,
    last_event_seq: i64,
    started_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
    completed_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = items)]
struct ItemRow {
    seq: i64,
    id: String,
    batch_id: String,
    tenant: String,
    queue: String,
    priority: i32,
    item_index: i32,
    custom_id: Option<String>,
    input: Value,
    config: Value,
    status: String,
    blocked: bool,
    attempts: i32,
    max_attempts: i32,
    next_attempt_at: Option<OffsetDateTime>,
    lease_owner: Option<String>,
    lease_token: Option<String>,
    lease_expires_at: Option<OffsetDateTime>,
    step: Option<String>,
    message: Option<String>,
    progress_current: Option<i64>,
    progress_total: Option<i64>,
    result: Option<Value>,
    error: Option<String>,
    question: Option<Value>,
    answer: Option<Value>,
    cancel_reason: Option<String>,
    created_at: OffsetDateTime,
    started_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
    completed_at: Option<OffsetDateTime>,
}

/// The columns of an item that change after it is created.
#[derive(Debug, AsChangeset)]
#[diesel(table_name = items, treat_none_as_null = true)]
struct ItemState<'a> {
    status: &'a str,
    blocked: bool,
    attempts: i32,
    next_attempt_at: Option<OffsetDateTime>,
    lease_owner: Option<&'a str>,
    lease_token: Option<&'a str>,
    lease_expires_at: Option<OffsetDateTime>,
    step: Option<&'a str>,
    message: Option<&'a str>,
    progress_current: Option<i64>,
    progress_total: Option<i64>,
    result: Option<&'a Value>,
    error: Option<&'a str>,
    question: Option<&'a Value>,
    answer: Option<&'a Value>,
    cancel_reason: Option<&'a str>,
    started_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
    completed_at: Option<OffsetDateTime>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = items, treat_none_as_default_value = false)]
struct NewItemRow {
    id: String,
    batch_id: String,
    tenant: String,
    queue: String,
    priority: i32,
    item_index: i32,
    custom_id: Option<String>,
    input: Value,
    config: Value,
    status: &'static str,
    blocked: bool,
    attempts: i32,
    max_attempts: i32,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = events, treat_none_as_default_value = false)]
struct EventRow {
    batch_id: String,
    seq: i64,
    item_id: Option<String>,
    item_index: Option<i32>,
    event_type: String,
    step: Option<String>,
    message: Option<String>,
    data: Option<Value>,
    at: OffsetDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = webhook_deliveries, treat_none_as_default_value = false)]
struct NewDeliveryRow {
    id: String,
    batch_id: String,
    event_seq: i64,
    event_type: String,
    item_id: Option<String>,
    url: String,
    payload: String,
    status: &'static str,
    attempts: i32,
    next_attempt_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

/// A stored webhook delivery (the columns the dispatcher and the API read).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = webhook_deliveries)]
struct DeliveryRow {
    id: String,
    batch_id: String,
    event_seq: i64,
    event_type: String,
    item_id: Option<String>,
    url: String,
    payload: String,
    status: String,
    attempts: i32,
    next_attempt_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = webhook_attempts, treat_none_as_default_value = false)]
struct AttemptRow {
    delivery_id: String,
    attempt: i32,
    at: OffsetDateTime,
    status_code: Option<i32>,
    latency_ms: i64,
    error: Option<String>,
    response_body: Option<String>,
}

impl ItemRow {
    fn status(&self) -> Result<ItemStatus, StoreError> {
        Ok(self.status.parse()?)
    }

    fn cancel_reason(&self) -> Result<Option<CancelReason>, StoreError> {
        self.cancel_reason.as_deref().map(str::parse).transpose().map_err(StoreError::from)
    }

    fn state(&self) -> ItemState<'_> {
        ItemState {
            status: &self.status,
            blocked: self.blocked,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            lease_owner: self.lease_owner.as_deref(),
            lease_token: self.lease_token.as_deref(),
            lease_expires_at: self.lease_expires_at,
            step: self.step.as_deref(),
            message: self.message.as_deref(),
            progress_current: self.progress_current,
            progress_total: self.progress_total,
            result: self.result.as_ref(),
            error: self.error.as_deref(),
            question: self.question.as_ref(),
            answer: self.answer.as_ref(),
            cancel_reason: self.cancel_reason.as_deref(),
            started_at: self.started_at,
            updated_at: self.updated_at,
            completed_at: self.completed_at,
        }
    }

    /// Moves the item to `to`, clearing its lease and stamping times as the status asks.
    fn set_status(&mut self, to: ItemStatus, now: OffsetDateTime) {
        self.status = to.as_str().to_owned();
        self.updated_at = now;
        if to != ItemStatus::Running {
            self.lease_owner = None;
            self.lease_token = None;
            self.lease_expires_at = None;
        }
        self.completed_at = to.is_ended().then_some(now);
        if to != ItemStatus::Pending {
            self.next_attempt_at = None;
        }
    }

    fn into_record(self, position: Option<i64>) -> Result<ItemRecord, StoreError> {
        Ok(ItemRecord {
            status: self.status()?,
            cancel_reason: self.cancel_reason()?,
            id: self.id,
            batch_id: self.batch_id,
            tenant: self.tenant,
            queue: self.queue,
            index: self.item_index,
            custom_id: self.custom_id,
            input: self.input,
            config: object(self.config),
            position,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            next_attempt_at: self.next_attempt_at,
            lease_expires_at: self.lease_expires_at,
            step: self.step,
            message: self.message,
            progress: self.progress_current.map(|c| (c, self.progress_total)),
            result: self.result,
            error: self.error,
            question: self.question,
            answer: self.answer,
            created_at: self.created_at,
            started_at: self.started_at,
            updated_at: self.updated_at,
            completed_at: self.completed_at,
        })
    }
}

fn object(value: Value) -> JsonMap {
    match value {
        Value::Object(map) => map,
        _ => JsonMap::new(),
    }
}

impl BatchRow {
    fn status(&self) -> Result<BatchStatus, StoreError> {
        Ok(self.status.parse()?)
    }

    fn counts(&self) -> Counts {
        Counts {
            total: self.total,
            pending: self.pending,
            running: self.running,
            completed: self.completed,
            failed: self.failed,
            cancelled: self.cancelled,
            needs_input: self.needs_input,
        }
    }

    fn set_counts(&mut self, c: Counts) {
        self.pending = c.pending;
        self.running = c.running;
        self.completed = c.completed;
        self.failed = c.failed;
        self.cancelled = c.cancelled;
        self.needs_input = c.needs_input;
    }

    fn mode(&self) -> Result<Mode, StoreError> {
        Ok(self.mode.parse()?)
    }

    fn webhook_events(&self) -> Vec<EventType> {
        match &self.webhook_events {
            Some(Value::Array(list)) => list.iter().filter_map(|v| v.as_str()?.parse().ok()).collect(),
            _ => Vec::new(),
        }
    }

    fn state(&self) -> BatchState<'_> {
        BatchState {
            status: &self.status,
            pending: self.pending,
            running: self.running,
            completed: self.completed,
            failed: self.failed,
            cancelled: self.cancelled,
            needs_input: self.needs_input,
            message: self.message.as_deref(),
            error: self.error.as_deref(),
            result: self.result.as_ref(),
            last_event_seq: self.last_event_seq,
            started_at: self.started_at,
            updated_at: self.updated_at,
            completed_at: self.completed_at,
        }
    }

    fn into_record(self) -> Result<BatchRecord, StoreError> {
        let webhook = self.webhook_url.clone().map(|url| NewWebhook {
            url,
            secret: self.webhook_secret.clone(),
            events: self.webhook_events(),
        });
        Ok(BatchRecord {
            status: self.status()?,
            mode: self.mode()?,
            on_item_failure: self.on_item_failure.parse()?,
            counts: self.counts(),
            id: self.id,
            tenant: self.tenant,
            queue: self.queue,
            session_id: self.session_id,
            priority: self.priority,
            run_at: self.run_at,
            config: object(self.config),
            webhook,
            metadata: self.metadata,
            result: self.result,
            message: self.message,
            error: self.error,
            last_event_seq: self.last_event_seq,
            created_at: self.created_at,
            started_at: self.started_at,
            updated_at: self.updated_at,
            completed_at: self.completed_at,
        })
    }
}

/// An item's fields as a webhook or event sees them at the moment of a change.
struct ItemSnapshot<'a> {
    row: &'a ItemRow,
}

/// A batch locked inside a write transaction, with the changes made to it so far. Every
/// change of its counters goes through `move_item`, every change of status through
/// `set_status`, so events and webhook rows cannot be forgotten.
struct Touched {
    row: BatchRow,
    before: BatchRow,
    events: Vec<EventRow>,
    deliveries: Vec<NewDeliveryRow>,
    /// A sequential batch whose head may have ended: unblock its next item.
    advance: bool,
}

impl Touched {
    fn new(row: BatchRow) -> Self {
        Self { before: row.clone(), row, events: Vec::new(), deliveries: Vec::new(), advance: false }
    }

    fn status(&self) -> Result<BatchStatus, StoreError> {
        self.row.status()
    }

    fn move_item(&mut self, from: ItemStatus, to: ItemStatus) {
        let mut counts = self.row.counts();
        counts.shift(from, to, 1);
        self.row.set_counts(counts);
    }

    /// Appends an event (and its webhook delivery, when the batch's webhook asks for it).
    fn event(
        &mut self,
        event_type: EventType,
        item: Option<ItemSnapshot<'_>>,
        message: Option<String>,
        data: Option<Value>,
        now: OffsetDateTime,
    ) {
        self.row.last_event_seq += 1;
        let seq = self.row.last_event_seq;
        let step = item.as_ref().and_then(|i| i.row.step.clone()).filter(|_| event_type == EventType::ItemStep);
        if let Some(url) = self.row.webhook_url.clone()
            && self.row.webhook_events().contains(&event_type)
        {
            let delivery_id = batchd_domain::new_item_id();
            let counts = self.row.counts();
            let payload = match &item {
                Some(ItemSnapshot { row }) => json!({
                    "type": event_type, "id": delivery_id, "batch_id": self.row.id,
                    "item_id": row.id, "item_index": row.item_index, "custom_id": row.custom_id,
                    "status": row.status, "message": message.clone().or_else(|| row.message.clone()),
                    "result": row.result, "error": row.error, "counts": counts, "timestamp": rfc3339(now),
                }),
                None => json!({
                    "type": event_type, "id": delivery_id, "batch_id": self.row.id,
                    "item_id": null, "item_index": null, "custom_id": null,
                    "status": self.row.status, "message": message.clone().or_else(|| self.row.message.clone()),
                    "result": self.row.result, "error": self.row.error, "counts": counts, "timestamp": rfc3339(now),
                }),
            };
            self.deliveries.push(NewDeliveryRow {
                id: delivery_id,
                batch_id: self.row.id.clone(),
                event_seq: seq,
                event_type: event_type.to_string(),
                item_id: item.as_ref().map(|i| i.row.id.clone()),
                url,
                payload: payload.to_string(),
                status: "pending",
                attempts: 0,
                next_attempt_at: Some(now),
                created_at: now,
                updated_at: now,
            });
        }
        self.events.push(EventRow {
            batch_id: self.row.id.clone(),
            seq,
            item_id: item.as_ref().map(|i| i.row.id.clone()),
            item_index: item.as_ref().map(|i| i.row.item_index),
            event_type: event_type.to_string(),
            step,
            message,
            data,
            at: now,
        });
    }

    /// Sets a new batch status with its event, stamping `started_at` and `completed_at`.
    fn set_status(&mut self, to: BatchStatus, event_type: EventType, now: OffsetDateTime) {
        self.row.status = to.as_str().to_owned();
        if to == BatchStatus::Running && self.row.started_at.is_none() {
            self.row.started_at = Some(now);
        }
        self.row.completed_at = to.is_terminal().then_some(now);
        self.event(event_type, None, None, None, now);
    }

    /// Ends the batch when every item has ended (DESIGN.md section 15's rule).
    fn settle(&mut self, now: OffsetDateTime) -> Result<(), StoreError> {
        let status = self.status()?;
        if status.is_terminal() {
            return Ok(());
        }
        if let Some(to) = batch_sm::settle(status, &self.row.counts())?
            && let Some(event_type) = EventType::for_batch_status(to)
        {
            self.set_status(to, event_type, now);
        }
        Ok(())
    }

    fn changed(&self) -> bool {
        !self.events.is_empty() || self.row.counts() != self.before.counts() || self.row.status != self.before.status
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn visible(tenant: &str, scope: Scope<'_>) -> bool {
    scope.tenant().is_none_or(|t| t == tenant)
}

fn encode_time_cursor(t: OffsetDateTime, id: &str) -> String {
    format!("{}_{id}", t.unix_timestamp_nanos() / 1_000)
}

fn decode_time_cursor(cursor: &str) -> Option<(OffsetDateTime, String)> {
    let (micros, id) = cursor.split_once('_')?;
    let micros: i128 = micros.parse().ok()?;
    let t = OffsetDateTime::from_unix_timestamp_nanos(micros * 1_000).ok()?;
    Some((t, id.to_owned()))
}

fn bad_cursor() -> StoreError {
    StoreError::InvalidCursor
}


fn page_limit(page: &PageRequest) -> i64 {
    page.limit.clamp(1, 1_000) as i64
}

/// Inserts owned rows in statements of at most `INSERT_CHUNK` rows.
macro_rules! insert_chunked {
    ($c:expr, $table:expr, $rows:expr) => {{
        let mut rows = $rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<_> = rows.by_ref().take(INSERT_CHUNK).collect();
            insert_rows!($c, $table, chunk);
        }
    }};
}

/// Locks a batch row (inside a write transaction).
async fn lock_batch(c: &mut Conn, id: &str) -> Result<Option<BatchRow>, StoreError> {
    Ok(locked!(batches::table.find(id).select(BatchRow::as_select())).first(c).await.optional()?)
}

/// Locks an item row (inside a write transaction).
async fn lock_item(c: &mut Conn, id: &str) -> Result<Option<ItemRow>, StoreError> {
    Ok(locked!(items::table.filter(items::id.eq(id)).select(ItemRow::as_select())).first(c).await.optional()?)
}

/// Locks the batches of these ids in id order.
async fn lock_batches(
    c: &mut Conn,
    ids: impl IntoIterator<Item = String>,
) -> Result<BTreeMap<String, Touched>, StoreError> {
    let mut ids: Vec<String> = ids.into_iter().collect();
    ids.sort();
    ids.dedup();
    let mut out = BTreeMap::new();
    for id in ids {
        let row = lock_batch(c, &id).await?.ok_or_else(|| StoreError::Corrupt(format!("item of missing batch {id}")))?;
        out.insert(id, Touched::new(row));
    }
    Ok(out)
}

async fn save_item(c: &mut Conn, row: &ItemRow) -> Result<(), StoreError> {
    diesel::update(items::table.filter(items::seq.eq(row.seq))).set(row.state()).execute(c).await?;
    Ok(())
}

/// Writes a touched batch: its row, its new events and webhook deliveries. Returns the
/// notices its changes call for.
async fn save_batch(c: &mut Conn, t: &mut Touched, now: OffsetDateTime) -> Result<Vec<Notice>, StoreError> {
    let mut notices = Vec::new();
    if t.advance && t.row.mode == Mode::Sequential.as_str() && t.row.running == 0 && t.row.needs_input == 0 {
        let next = items::table
            .filter(items::batch_id.eq(&t.row.id))
            .filter(items::status.eq(ItemStatus::Pending.as_str()))
            .order(items::item_index.asc())
            .select(items::seq)
            .first::<i64>(c)
            .await
            .optional()?;
        if let Some(seq) = next {
            let n = diesel::update(items::table.filter(items::seq.eq(seq)).filter(items::blocked.eq(true)))
                .set((items::blocked.eq(false), items::updated_at.eq(now)))
                .execute(c)
                .await?;
            if n > 0 {
                notices.push(Notice::Work { queue: t.row.queue.clone() });
            }
        }
    }
    if !t.changed() {
        return Ok(notices);
    }
    t.row.updated_at = now;
    diesel::update(batches::table.find(&t.row.id)).set(t.row.state()).execute(c).await?;
    insert_events(c, std::mem::take(&mut t.events)).await?;
    if !t.deliveries.is_empty() {
        notices.push(Notice::Webhooks);
    }
    insert_chunked!(c, webhook_deliveries::table, std::mem::take(&mut t.deliveries));
    notices.push(Notice::Events { batch_id: t.row.id.clone() });
    let (old, new) = (t.before.status.as_str(), t.row.status.as_str());
    if old != new {
        notices.push(Notice::Control { batch_id: t.row.id.clone() });
        if matches!(new, "pending" | "running") {
            notices.push(Notice::Work { queue: t.row.queue.clone() });
        }
    }
    t.before = t.row.clone();
    Ok(notices)
}

async fn save_batches(
    c: &mut Conn,
    touched: &mut BTreeMap<String, Touched>,
    now: OffsetDateTime,
) -> Result<Vec<Notice>, StoreError> {
    let mut notices = Vec::new();
    for t in touched.values_mut() {
        notices.extend(save_batch(c, t, now).await?);
    }
    notices.sort_by_key(Notice::encode);
    notices.dedup();
    Ok(notices)
}

/// How an attempt (or a lease) ends, decided inside the transaction.
enum Ending {
    Complete(Value),
    Fail { error: String, retryable: bool, retry_after: Option<Duration>, policy: batchd_domain::RetryPolicy },
    AskInput(Value),
    Cancel(CancelReason),
    Release,
    LeaseExpired,
}

/// Applies the end of a running item's attempt to the item and its (locked) batch.
/// Returns the item's new status.
fn end_attempt(
    item: &mut ItemRow,
    batch: &mut Touched,
    ending: Ending,
    max_error_chars: usize,
    now: OffsetDateTime,
) -> Result<ItemStatus, StoreError> {
    let from = item.status()?;
    let batch_status = batch.status()?;
    // A batch that is cancelling (or that `fail_batch` failed) ends its running items cancelled.
    let ending = match batch_status {
        BatchStatus::Cancelling | BatchStatus::Cancelled => Ending::Cancel(CancelReason::Batch),
        BatchStatus::Failed if batch.row.on_item_failure == OnItemFailure::FailBatch.as_str() => {
            Ending::Cancel(CancelReason::FailBatch)
        }
        _ => ending,
    };
    let attempt = json!({"attempt": item.attempts});
    let to = match ending {
        Ending::Complete(result) => {
            let to = item_sm::complete(from)?;
            item.set_status(to, now);
            item.result = Some(result);
            item.error = None;
            batch.move_item(from, to);
            batch.event(EventType::ItemCompleted, Some(ItemSnapshot { row: item }), None, Some(attempt), now);
            to
        }
        Ending::Fail { error, retryable, retry_after, policy } => {
            let error = batchd_domain::truncate_error(&error, max_error_chars);
            let decision = batchd_domain::decide_failure(
                &policy,
                item.attempts,
                item.max_attempts,
                !retryable,
                retry_after,
                rand::random::<f64>(),
            );
            item.error = Some(error.clone());
            match decision {
                FailureDecision::RetryAfter(delay) => {
                    let to = item_sm::requeue(from)?;
                    item.set_status(to, now);
                    let at = now + delay;
                    item.next_attempt_at = Some(at);
                    batch.move_item(from, to);
                    let data = json!({"attempt": item.attempts, "next_attempt_at": rfc3339(at), "error": error});
                    batch.event(EventType::ItemRetryScheduled, Some(ItemSnapshot { row: item }), Some(error), Some(data), now);
                    to
                }
                FailureDecision::GiveUp => fail_item(item, batch, from, error, now)?,
            }
        }
        Ending::AskInput(question) => {
            let to = item_sm::ask_input(from)?;
            item.set_status(to, now);
            item.question = Some(question.clone());
            batch.move_item(from, to);
            let data = json!({"question": question});
            batch.event(EventType::ItemNeedsInput, Some(ItemSnapshot { row: item }), None, Some(data), now);
            to
        }
        Ending::Cancel(reason) => {
            let to = item_sm::cancel(from, reason)?;
            item.set_status(to, now);
            item.cancel_reason = Some(reason.as_str().to_owned());
            batch.move_item(from, to);
            batch.event(EventType::ItemCancelled, Some(ItemSnapshot { row: item }), None, None, now);
            to
        }
        Ending::Release => {
            let to = item_sm::requeue(from)?;
            item.set_status(to, now);
            item.attempts = (item.attempts - 1).max(0);
            batch.move_item(from, to);
            let message = "handed back at shutdown; the attempt is not spent".to_owned();
            let data = json!({"attempt": item.attempts + 1, "released": true});
            batch.event(EventType::ItemRetryScheduled, Some(ItemSnapshot { row: item }), Some(message), Some(data), now);
            to
        }
        Ending::LeaseExpired => {
            let message = format!("the lease of attempt {} expired", item.attempts);
            batch.event(EventType::ItemLeaseExpired, Some(ItemSnapshot { row: item }), Some(message.clone()), Some(attempt), now);
            if item.attempts >= item.max_attempts {
                fail_item(item, batch, from, message, now)?
            } else {
                let to = item_sm::requeue(from)?;
                item.set_status(to, now);
                batch.move_item(from, to);
                to
            }
        }
    };
    if to.is_ended() {
        batch.advance = true;
    }
    batch.settle(now)?;
    Ok(to)
}

/// Ends an item `failed`; under `fail_batch` the batch fails too (its other items are
/// cancelled by `cancel_rest`, after the batch row is saved).
fn fail_item(
    item: &mut ItemRow,
    batch: &mut Touched,
    from: ItemStatus,
    error: String,
    now: OffsetDateTime,
) -> Result<ItemStatus, StoreError> {
    let to = item_sm::fail(from)?;
    item.set_status(to, now);
    item.error = Some(error.clone());
    batch.move_item(from, to);
    let data = json!({"attempt": item.attempts});
    batch.event(EventType::ItemFailed, Some(ItemSnapshot { row: item }), Some(error.clone()), Some(data), now);
    if batch.row.on_item_failure == OnItemFailure::FailBatch.as_str() && !batch.status()?.is_terminal() {
        let to_batch = batch_sm::fail_fast(batch.status()?)?;
        batch.row.error = Some(format!("item {} failed: {error}", item.item_index));
        batch.set_status(to_batch, EventType::BatchFailed, now);
    }
    Ok(to)
}

/// Cancels every pending and waiting item of a batch (skipping rows another transaction
/// holds; see the lock order above), recording each with its event.
async fn cancel_waiting_items(
    c: &mut Conn,
    t: &mut Touched,
    reason: CancelReason,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let waiting: Vec<ItemRow> = skip_locked!(
        items::table
            .filter(items::batch_id.eq(&t.row.id))
            .filter(items::status.eq_any([ItemStatus::Pending.as_str(), ItemStatus::NeedsInput.as_str()]))
            .order(items::item_index.asc())
            .select(ItemRow::as_select())
    )
    .load(c)
    .await?;
    if waiting.is_empty() {
        return Ok(());
    }
    let mut by_status: HashMap<&'static str, Vec<i64>> = HashMap::new();
    for mut item in waiting {
        let from = item.status()?;
        let to = item_sm::cancel(from, reason)?;
        by_status.entry(from.as_str()).or_default().push(item.seq);
        item.set_status(to, now);
        t.move_item(from, to);
        t.event(EventType::ItemCancelled, Some(ItemSnapshot { row: &item }), None, None, now);
    }
    for (from, seqs) in by_status {
        for chunk in seqs.chunks(INSERT_CHUNK) {
            diesel::update(items::table.filter(items::seq.eq_any(chunk)).filter(items::status.eq(from)))
                .set((
                    items::status.eq(ItemStatus::Cancelled.as_str()),
                    items::cancel_reason.eq(reason.as_str()),
                    items::completed_at.eq(now),
                    items::updated_at.eq(now),
                    items::next_attempt_at.eq(None::<OffsetDateTime>),
                ))
                .execute(c)
                .await?;
        }
    }
    Ok(())
}

/// Whether the batch failed under `fail_batch` in this transaction, so what still waits
/// must be cancelled.
fn fails_batch_now(t: &Touched) -> bool {
    t.before.status != BatchStatus::Failed.as_str()
        && t.row.status == BatchStatus::Failed.as_str()
        && t.row.on_item_failure == OnItemFailure::FailBatch.as_str()
}

/// Whether items of a batch in this status may be claimed.
fn claimable(status: BatchStatus) -> bool {
    matches!(status, BatchStatus::Pending | BatchStatus::Running)
}

async fn queue_paused(c: &mut Conn, queue: &str) -> Result<bool, StoreError> {
    Ok(queue_states::table
        .find(queue)
        .select(queue_states::paused)
        .first::<bool>(c)
        .await
        .optional()?
        .unwrap_or(false))
}

/// The rows of the items being finished, locked, by id.
async fn lock_finished_items(c: &mut Conn, finishes: &[Finish]) -> Result<HashMap<String, ItemRow>, StoreError> {
    if finishes.is_empty() {
        return Ok(HashMap::new());
    }
    let mut ids: Vec<&str> = finishes.iter().map(|f| f.item_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows: Vec<ItemRow> =
        locked!(items::table.filter(items::id.eq_any(&ids)).order(items::seq.asc()).select(ItemRow::as_select()))
            .load(c)
            .await?;
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// Up to `max_items` ready items of the request's queue in claim order, locked (skipping
/// rows other transactions hold), leaving out the rows in `taken`.
async fn claim_candidates(
    c: &mut Conn,
    request: &ClaimRequest,
    taken: &HashSet<i64>,
    now: OffsetDateTime,
) -> Result<Vec<ItemRow>, StoreError> {
    if request.max_items == 0 || queue_paused(c, &request.queue).await? {
        return Ok(Vec::new());
    }
    // The status and `blocked` conditions are written out, not bound: only then can SQLite
    // (and a generic PostgreSQL plan) tell that the partial indexes of pending items hold
    // every row asked for, and read one in claim order. With bound values SQLite read every
    // item of every running batch and sorted them, on each claim.
    let rows: Vec<ItemRow> = skip_locked!(
        items::table
            .filter(items::queue.eq(&request.queue))
            .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(CLAIMABLE))
            .filter(items::next_attempt_at.is_null().or(items::next_attempt_at.le(now)))
            // Each candidate's batch is looked up by its key: a list of every batch that may
            // run would be read in full on each claim.
            .filter(diesel::dsl::exists(
                batches::table
                    .filter(batches::id.eq(items::batch_id))
                    .filter(batches::status.eq_any([BatchStatus::Pending.as_str(), BatchStatus::Running.as_str()]))
                    .filter(batches::run_at.is_null().or(batches::run_at.le(now))),
            ))
            .order((items::priority.desc(), items::seq.asc()))
            .limit((request.max_items + taken.len()) as i64)
            .select(ItemRow::as_select())
    )
    .load(c)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|r| !taken.contains(&r.seq))
        .take(request.max_items)
        .collect())
}

/// Applies finished attempts to their (locked) rows and batches. Returns each finish's
/// result and the rows changed and not yet written; `failed_now` gets the batches that
/// failed under `fail_batch` here (their waiting items are cancelled and written already).
async fn apply_finishes(
    c: &mut Conn,
    finishes: Vec<Finish>,
    rows: &mut HashMap<String, ItemRow>,
    touched: &mut BTreeMap<String, Touched>,
    failed_now: &mut HashSet<String>,
    max_error_chars: usize,
    now: OffsetDateTime,
) -> Result<(Vec<FinishResult>, Vec<ItemRow>), StoreError> {
    let mut results = Vec::with_capacity(finishes.len());
    // Items changed here and not yet written: written together by the caller.
    let mut unsaved: HashSet<String> = HashSet::new();
    for f in finishes {
        let Some(item) = rows.get_mut(&f.item_id) else {
            results.push(FinishResult::LeaseLost);
            continue;
        };
        if item.status != ItemStatus::Running.as_str() || item.lease_token.as_deref() != Some(&f.lease_token) {
            let cancelled = item.status == ItemStatus::Cancelled.as_str()
                && item.cancel_reason.as_deref() != Some(CancelReason::Item.as_str());
            results.push(if cancelled { FinishResult::ItemCancelled } else { FinishResult::LeaseLost });
            continue;
        }
        let Some(t) = touched.get_mut(&item.batch_id) else {
            results.push(FinishResult::LeaseLost);
            continue;
        };
        let ending = match f.outcome {
            Outcome::Completed { result } => Ending::Complete(result),
            Outcome::Failed { error, retryable, retry_after, policy } => {
                Ending::Fail { error, retryable, retry_after, policy }
            }
            Outcome::NeedsInput { question } => Ending::AskInput(question),
            Outcome::Cancelled => Ending::Cancel(CancelReason::Batch),
            Outcome::Released => Ending::Release,
        };
        let to = end_attempt(item, t, ending, max_error_chars, now)?;
        unsaved.insert(item.id.clone());
        if fails_batch_now(t) {
            // The cancellation reads the batch's waiting items from the table: what this
            // group changed so far is written first.
            let flushed = unsaved.drain().filter_map(|id| rows.get(&id).cloned()).collect();
            save_items(c, flushed).await?;
            cancel_waiting_items(c, t, CancelReason::FailBatch, now).await?;
            failed_now.insert(t.row.id.clone());
        }
        let cancelled_by_batch = to == ItemStatus::Cancelled;
        results.push(if cancelled_by_batch { FinishResult::ItemCancelled } else { FinishResult::Applied(to) });
    }
    let mut changed: Vec<ItemRow> = rows.drain().map(|(_, row)| row).filter(|row| unsaved.contains(&row.id)).collect();
    changed.sort_by_key(|row| row.seq);
    Ok((results, changed))
}

/// What a started item takes from its batch: (batch config, session id, mode, ready at).
type StartedFrom = (Value, Option<String>, Mode, OffsetDateTime);

/// Starts the candidates of one claim under their (locked) batches. Returns what each
/// started item takes from its batch, and the changed rows: the started ones first, in
/// claim order, then the ones their batch cancelled meanwhile.
fn apply_claim(
    request: &ClaimRequest,
    candidates: impl IntoIterator<Item = ItemRow>,
    touched: &mut BTreeMap<String, Touched>,
    now: OffsetDateTime,
) -> Result<(Vec<StartedFrom>, Vec<ItemRow>), StoreError> {
    let lease_expires_at = now + request.lease;
    let mut claimed = Vec::new();
    let mut changed = Vec::new();
    for mut item in candidates {
        let Some(t) = touched.get_mut(&item.batch_id) else { continue };
        let batch_status = t.status()?;
        if !claimable(batch_status) {
            // The batch changed after the candidates were read.
            let reason = match batch_status {
                BatchStatus::Cancelling | BatchStatus::Cancelled => Some(CancelReason::Batch),
                BatchStatus::Failed => Some(CancelReason::FailBatch),
                _ => None,
            };
            if let Some(reason) = reason {
                let from = item.status()?;
                let to = item_sm::cancel(from, reason)?;
                item.set_status(to, now);
                item.cancel_reason = Some(reason.as_str().to_owned());
                t.move_item(from, to);
                t.event(EventType::ItemCancelled, Some(ItemSnapshot { row: &item }), None, None, now);
                changed.push(item);
                t.settle(now)?;
            }
            continue;
        }
        let from = item.status()?;
        let to = item_sm::start(from)?;
        let ready_at = [Some(item.updated_at), item.next_attempt_at, t.row.run_at]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(item.created_at)
            .min(now);
        item.set_status(to, now);
        item.attempts += 1;
        item.lease_owner = Some(request.owner.clone());
        item.lease_token = Some(batchd_domain::new_lease_token());
        item.lease_expires_at = Some(lease_expires_at);
        item.started_at = Some(now);
        t.move_item(from, to);
        if batch_status == BatchStatus::Pending {
            let to_batch = batch_sm::start(batch_status)?;
            t.set_status(to_batch, EventType::BatchStarted, now);
        }
        let data = json!({"attempt": item.attempts, "lease_owner": request.owner});
        t.event(EventType::ItemStarted, Some(ItemSnapshot { row: &item }), None, Some(data), now);
        claimed.push((t.row.config.clone(), t.row.session_id.clone(), t.row.mode()?, ready_at));
        changed.push(item);
    }
    // Started items first, in claim order; then the ones the batch cancelled.
    changed.sort_by_key(|item| item.status != ItemStatus::Running.as_str());
    Ok((claimed, changed))
}

/// The claimed items, from what each took from its batch and its written row.
fn claimed_items(claimed: Vec<StartedFrom>, rows: Vec<ItemRow>) -> Vec<ClaimedItem> {
    claimed
        .into_iter()
        .zip(rows)
        .map(|((batch_config, session_id, mode, ready_at), item)| ClaimedItem {
            lease_token: item.lease_token.clone().unwrap_or_default(),
            lease_expires_at: item.lease_expires_at.unwrap_or(ready_at),
            id: item.id,
            batch_id: item.batch_id,
            tenant: item.tenant,
            queue: item.queue,
            index: item.item_index,
            custom_id: item.custom_id,
            attempt: item.attempts,
            max_attempts: item.max_attempts,
            input: item.input,
            answer: item.answer,
            item_config: object(item.config),
            batch_config: object(batch_config),
            session_id,
            mode,
            ready_at,
        })
        .collect()
}

/// Pending items (blocked ones included) are counted per queue, priority and bucket of this
/// many `seq` values by the triggers of migrations/*/2026-11-22-000002_queue_positions,
/// whose SQL divides by the same number.
const POSITION_BUCKET: i64 = 1_024;

/// The number of ready items of `queue` that will be claimed before a pending item of
/// `priority` and `seq` (claim order: priority DESC, then seq), in one statement:
/// - the pending items ahead: the bucket counts of higher priorities and of earlier buckets of
///   the same priority, plus an index count inside the item's own bucket (fewer than
///   `POSITION_BUCKET` entries of `items_pending`);
/// - minus those of them waiting for a backoff, in batches that may run (`items_backoff`;
///   the `+` keeps the planner off `items_pending`, which would read every item ahead);
/// - minus those of them in batches that are paused, cancelling or not yet due
///   (`batches_waiting`). Items carry their batch's queue and priority and are inserted in
///   index order, so a batch of another priority counts whole or not at all, and so does one
///   that ends before `seq` or starts after it; only a batch whose items interleave with
///   `seq` is counted by index.
///
/// Its text is fixed and its query id static, so each connection prepares it once (diesel
/// never caches statements built with `sql`).
struct ReadyAhead<'a> {
    queue: &'a str,
    priority: i32,
    seq: i64,
    bucket: i64,
    bucket_start: i64,
    now: OffsetDateTime,
}

impl<'a> ReadyAhead<'a> {
    fn new(queue: &'a str, priority: i32, seq: i64, now: OffsetDateTime) -> Self {
        let bucket = seq.div_euclid(POSITION_BUCKET);
        Self { queue, priority, seq, bucket, bucket_start: bucket * POSITION_BUCKET, now }
    }
}

impl diesel::query_builder::QueryId for ReadyAhead<'_> {
    type QueryId = ReadyAhead<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for ReadyAhead<'_> {
    type SqlType = diesel::sql_types::BigInt;
}

impl diesel::query_builder::QueryFragment<Db> for ReadyAhead<'_> {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, Db>) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Integer, Text};
        out.push_sql("SELECT CAST((SELECT COALESCE(SUM(pending), 0) FROM queue_position_buckets WHERE queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND (priority > ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" OR (priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND bucket < ");
        out.push_bind_param::<BigInt, _>(&self.bucket)?;
        out.push_sql("))) + (SELECT COUNT(*) FROM items WHERE queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND status = 'pending' AND priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND seq >= ");
        out.push_bind_param::<BigInt, _>(&self.bucket_start)?;
        out.push_sql(" AND seq < ");
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(") - (SELECT COUNT(*) FROM items AS i WHERE i.queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND i.status = 'pending' AND i.next_attempt_at IS NOT NULL AND i.next_attempt_at > ");
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(" AND (+i.priority > ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" OR (+i.priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND +i.seq < ");
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(
            ")) AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = i.batch_id \
             AND b.status IN ('pending', 'running') AND (b.run_at IS NULL OR b.run_at <= ",
        );
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql("))) - (SELECT COALESCE(SUM(CASE WHEN b.priority > ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" THEN b.pending WHEN b.priority < ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(
            " THEN 0 WHEN (SELECT l.seq FROM items AS l WHERE l.batch_id = b.id ORDER BY l.item_index DESC LIMIT 1) < ",
        );
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(
            " THEN b.pending WHEN (SELECT f.seq FROM items AS f WHERE f.batch_id = b.id ORDER BY f.item_index LIMIT 1) > ",
        );
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(" THEN 0 ELSE (SELECT COUNT(*) FROM items AS i WHERE i.batch_id = b.id AND i.status = 'pending' AND i.seq < ");
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(") END), 0) FROM batches AS b WHERE b.queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(
            " AND (status IN ('paused', 'cancelling') OR (run_at IS NOT NULL AND status IN ('pending', 'running'))) \
             AND b.pending > 0 AND (b.status NOT IN ('pending', 'running') OR b.run_at > ",
        );
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(")) AS BIGINT)");
        Ok(())
    }
}

/// The `seq` of the ready items of `queue` and `priority` from `from` to `to`, in claim order.
/// The batch is looked up per item (`ready_items!` would list every ready batch first), and
/// `status` is written out so that the partial index `items_pending` applies. Prepared once
/// per connection, as [`ReadyAhead`].
struct ReadySpan<'a> {
    queue: &'a str,
    priority: i32,
    from: i64,
    to: i64,
    now: OffsetDateTime,
}

impl diesel::query_builder::QueryId for ReadySpan<'_> {
    type QueryId = ReadySpan<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for ReadySpan<'_> {
    type SqlType = diesel::sql_types::BigInt;
}

impl diesel::query_builder::QueryFragment<Db> for ReadySpan<'_> {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, Db>) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Integer, Text};
        out.push_sql("SELECT i.seq FROM items AS i WHERE i.queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND i.status = 'pending' AND i.priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND i.seq >= ");
        out.push_bind_param::<BigInt, _>(&self.from)?;
        out.push_sql(" AND i.seq <= ");
        out.push_bind_param::<BigInt, _>(&self.to)?;
        out.push_sql(" AND (i.next_attempt_at IS NULL OR i.next_attempt_at <= ");
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(
            ") AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = i.batch_id \
             AND b.status IN ('pending', 'running') AND (b.run_at IS NULL OR b.run_at <= ",
        );
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(")) ORDER BY i.seq");
        Ok(())
    }
}

/// Queue positions of the ready pending items among `rows`: 1 + the number of ready items
/// of the same queue that will be claimed before each (claim order: priority, then `seq`).
/// The candidates are taken in claim order, in runs of one priority spanning less than
/// `POSITION_BUCKET` values of `seq`: a run costs one [`ReadyAhead`] for its first item and
/// one [`ReadySpan`] from its first to its last, whatever the queue holds.
async fn positions(c: &mut Conn, rows: &[ItemRow], now: OffsetDateTime) -> Result<HashMap<i64, i64>, StoreError> {
    let mut by_queue: BTreeMap<&str, Vec<&ItemRow>> = BTreeMap::new();
    for r in rows {
        let ready = r.status == ItemStatus::Pending.as_str() && r.next_attempt_at.is_none_or(|t| t <= now);
        if ready {
            by_queue.entry(r.queue.as_str()).or_default().push(r);
        }
    }
    let mut out = HashMap::new();
    for (queue, mut candidates) in by_queue {
        if queue_paused(c, queue).await? {
            continue;
        }
        candidates.sort_by_key(|r| (std::cmp::Reverse(r.priority), r.seq));
        let mut rest = candidates.as_slice();
        while let Some(first) = rest.first() {
            let len = rest
                .iter()
                .take_while(|r| r.priority == first.priority && r.seq - first.seq < POSITION_BUCKET)
                .count();
            let (run, tail) = rest.split_at(len);
            rest = tail;
            let last = run[len - 1];
            let before: i64 = ReadyAhead::new(queue, first.priority, first.seq, now).get_result(c).await?;
            let span: Vec<i64> = ReadySpan { queue, priority: first.priority, from: first.seq, to: last.seq, now }
                .load(c)
                .await?;
            for r in run {
                if let Ok(i) = span.binary_search(&r.seq) {
                    out.insert(r.seq, before + 1 + i as i64);
                }
            }
        }
    }
    Ok(out)
}

async fn with_positions(c: &mut Conn, rows: Vec<ItemRow>, now: OffsetDateTime) -> Result<Vec<ItemRecord>, StoreError> {
    let positions = positions(c, &rows, now).await?;
    rows.into_iter().map(|r| {
        let p = positions.get(&r.seq).copied();
        r.into_record(p)
    }).collect()
}

async fn find_visible_batch(c: &mut Conn, scope: Scope<'_>, id: &str) -> Result<BatchRow, StoreError> {
    let row: Option<BatchRow> =
        batches::table.find(id).select(BatchRow::as_select()).first(c).await.optional()?;
    row.filter(|b| visible(&b.tenant, scope)).ok_or(StoreError::NotFound)
}

async fn item_ids_of(c: &mut Conn, batch_id: &str) -> Result<Vec<String>, StoreError> {
    Ok(items::table
        .filter(items::batch_id.eq(batch_id))
        .order(items::item_index.asc())
        .select(items::id)
        .load(c)
        .await?)
}

impl ThisStore {
    fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    /// Runs a write transaction and, after it commits, publishes its notices.
    async fn write<R: Send>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<(R, Vec<Notice>), StoreError>>
            + Send
            + 'static,
    ) -> Result<R, StoreError> {
        let mut conn = self.write_conn().await?;
        let (result, notices) = write_tx!(conn, |c| {
            let (result, notices) = f(c).await?;
            Self::notify_in_tx(c, &notices).await?;
            Ok::<_, StoreError>((result, notices))
        })?;
        self.after_commit(notices);
        Ok(result)
    }

    /// Locks a visible batch, lets `change` act on it, and saves it.
    async fn control_batch(
        &self,
        scope: Scope<'_>,
        id: &str,
        change: impl for<'c> FnOnce(
            &'c mut Conn,
            &'c mut Touched,
            OffsetDateTime,
        ) -> futures_util::future::BoxFuture<'c, Result<(), StoreError>>
        + Send
        + 'static,
    ) -> Result<BatchRecord, StoreError> {
        let now = self.now();
        let tenant = scope.tenant().map(str::to_owned);
        let id = id.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                let row = lock_batch(c, &id).await?;
                let row = row
                    .filter(|b| tenant.as_deref().is_none_or(|t| t == b.tenant))
                    .ok_or(StoreError::NotFound)?;
                let mut t = Touched::new(row);
                change(c, &mut t, now).await?;
                let notices = save_batch(c, &mut t, now).await?;
                Ok((t.row.into_record()?, notices))
            })
        })
        .await
    }

    /// Locks a visible item and its batch, lets `change` act on them, and saves both.
    async fn control_item(
        &self,
        scope: Scope<'_>,
        id: &str,
        change: impl FnOnce(&mut ItemRow, &mut Touched, OffsetDateTime) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<ItemRecord, StoreError> {
        let now = self.now();
        let tenant = scope.tenant().map(str::to_owned);
        let id = id.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                let mut item = lock_item(c, &id)
                    .await?
                    .filter(|i| tenant.as_deref().is_none_or(|t| t == i.tenant))
                    .ok_or(StoreError::NotFound)?;
                let batch = lock_batch(c, &item.batch_id).await?.ok_or(StoreError::NotFound)?;
                let mut t = Touched::new(batch);
                change(&mut item, &mut t, now)?;
                save_item(c, &item).await?;
                let notices = save_batch(c, &mut t, now).await?;
                let position = positions(c, std::slice::from_ref(&item), now).await?.get(&item.seq).copied();
                Ok((item.into_record(position)?, notices))
            })
        })
        .await
    }

    async fn create_in_tx(
        c: &mut Conn,
        new: &NewBatch,
        now: OffsetDateTime,
    ) -> Result<(CreateOutcome, Vec<Notice>), StoreError> {
        // Idempotency: the key (per tenant) and a client-chosen id (across the server).
        let by_key: Option<BatchRow> = match &new.idempotency_key {
            Some(key) => batches::table
                .filter(batches::tenant.eq(&new.tenant))
                .filter(batches::idempotency_key.eq(key))
                .select(BatchRow::as_select())
                .first(c)
                .await
                .optional()?,
            None => None,
        };
        let by_id: Option<BatchRow> = if new.client_chose_id {
            batches::table.find(&new.id).select(BatchRow::as_select()).first(c).await.optional()?
        } else {
            None
        };
        let existing = match (by_key, by_id) {
            (Some(a), Some(b)) if a.id != b.id => return Err(StoreError::IdempotencyConflict),
            (Some(a), _) | (None, Some(a)) => Some(a),
            (None, None) => None,
        };
        if let Some(existing) = existing {
            if existing.tenant != new.tenant || existing.request_hash != new.request_hash {
                return Err(StoreError::IdempotencyConflict);
            }
            let ids = item_ids_of(c, &existing.id).await?;
            return Ok((CreateOutcome::Existing(existing.into_record()?, ids), Vec::new()));
        }

        let total = new.items.len() as i64;
        let counts = Counts::new(total);
        let row = BatchRow {
            id: new.id.clone(),
            tenant: new.tenant.clone(),
            queue: new.queue.clone(),
            session_id: new.session_id.clone(),
            mode: new.mode.as_str().to_owned(),
            on_item_failure: new.on_item_failure.as_str().to_owned(),
            priority: new.priority,
            run_at: new.run_at,
            config: Value::Object(new.config.clone()),
            webhook_url: new.webhook.as_ref().map(|w| w.url.clone()),
            webhook_secret: new.webhook.as_ref().and_then(|w| w.secret.clone()),
            webhook_events: new.webhook.as_ref().map(|w| json!(w.events)),
            metadata: new.metadata.clone(),
            result: None,
            status: BatchStatus::Pending.as_str().to_owned(),
            total,
            pending: counts.pending,
            running: 0,
            completed: 0,
            failed: 0,
            cancelled: 0,
            needs_input: 0,
            message: None,
            error: None,
            idempotency_key: new.idempotency_key.clone(),
            request_hash: new.request_hash.clone(),
            last_event_seq: 0,
            created_at: now,
            started_at: None,
            updated_at: now,
            completed_at: None,
        };
        diesel::insert_into(batches::table).values(&row).execute(c).await?;
        let sequential = new.mode == Mode::Sequential;
        let item_rows: Vec<NewItemRow> = new
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| NewItemRow {
                id: batchd_domain::new_item_id(),
                batch_id: new.id.clone(),
                tenant: new.tenant.clone(),
                queue: new.queue.clone(),
                priority: new.priority,
                item_index: i as i32,
                custom_id: item.custom_id.clone(),
                input: item.input.clone(),
                config: Value::Object(item.config.clone()),
                status: ItemStatus::Pending.as_str(),
                blocked: sequential && i > 0,
                attempts: 0,
                max_attempts: item.max_attempts.max(1),
                created_at: now,
                updated_at: now,
            })
            .collect();
        let ids: Vec<String> = item_rows.iter().map(|r| r.id.clone()).collect();
        insert_items(c, item_rows).await?;
        let mut t = Touched::new(row);
        let data = json!({"total_items": total});
        t.event(EventType::BatchCreated, None, None, Some(data), now);
        let mut notices = save_batch(c, &mut t, now).await?;
        if new.run_at.is_none_or(|at| at <= now) {
            notices.push(Notice::Work { queue: new.queue.clone() });
        }
        Ok((CreateOutcome::Created(t.row.into_record()?, ids), notices))
    }
}

#[async_trait::async_trait]
impl crate::Store for ThisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn readiness(&self) -> Readiness {
        match self.pending_migrations().await {
            Ok(pending) => Readiness { reachable: true, migrated: pending == 0 },
            Err(_) => Readiness { reachable: false, migrated: false },
        }
    }

    async fn migrate(&self) -> Result<usize, StoreError> {
        self.run_migrations().await
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notifier.subscribe()
    }

    async fn create_batch(&self, batch: NewBatch) -> Result<CreateOutcome, StoreError> {
        let now = self.now();
        let again = batch.clone();
        let attempt = self.write(move |c| Box::pin(async move { Self::create_in_tx(c, &batch, now).await })).await;
        match attempt {
            // Two requests with one idempotency key raced: the loser now finds the winner.
            Err(StoreError::Database(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            ))) => self.write(move |c| Box::pin(async move { Self::create_in_tx(c, &again, now).await })).await,
            other => other,
        }
    }

    async fn get_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError> {
        let mut conn = self.read_conn().await?;
        find_visible_batch(&mut conn, scope, id).await?.into_record()
    }

    async fn list_batches(
        &self,
        scope: Scope<'_>,
        filter: &BatchFilter,
        page: &PageRequest,
    ) -> Result<Page<BatchRecord>, StoreError> {
        let mut conn = self.read_conn().await?;
        let mut q = batches::table.select(BatchRow::as_select()).into_boxed();
        if let Some(t) = scope.tenant() {
            q = q.filter(batches::tenant.eq(t.to_owned()));
        }
        if !filter.statuses.is_empty() {
            q = q.filter(batches::status.eq_any(filter.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>()));
        }
        if let Some(queue) = &filter.queue {
            q = q.filter(batches::queue.eq(queue.clone()));
        }
        if let Some(s) = &filter.session_id {
            q = q.filter(batches::session_id.eq(s.clone()));
        }
        if let Some(after) = filter.created_after {
            q = q.filter(batches::created_at.gt(after));
        }
        if let Some(cursor) = &page.cursor {
            let (t, id) = decode_time_cursor(cursor).ok_or_else(bad_cursor)?;
            q = q.filter(batches::created_at.lt(t).or(batches::created_at.eq(t).and(batches::id.lt(id))));
        }
        let limit = page_limit(page);
        let mut rows: Vec<BatchRow> =
            q.order((batches::created_at.desc(), batches::id.desc())).limit(limit + 1).load(&mut *conn).await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| encode_time_cursor(r.created_at, &r.id))
        } else {
            None
        };
        Ok(Page { rows: rows.into_iter().map(BatchRow::into_record).collect::<Result<_, _>>()?, next_cursor })
    }

    async fn list_items(
        &self,
        scope: Scope<'_>,
        batch_id: &str,
        status: Option<ItemStatus>,
        page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        let now = self.now();
        let mut conn = self.read_conn().await?;
        let batch = find_visible_batch(&mut conn, scope, batch_id).await?;
        let mut q = items::table.filter(items::batch_id.eq(batch_id.to_owned())).select(ItemRow::as_select()).into_boxed();
        if let Some(s) = status {
            q = q.filter(items::status.eq(s.as_str()));
        }
        if let Some(cursor) = &page.cursor {
            let after: i32 = cursor.parse().map_err(|_| bad_cursor())?;
            q = q.filter(items::item_index.gt(after));
        }
        let limit = page_limit(page);
        let mut rows: Vec<ItemRow> = q.order(items::item_index.asc()).limit(limit + 1).load(&mut *conn).await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.item_index.to_string())
        } else {
            None
        };
        let rows = if claimable(batch.status()?) && batch.run_at.is_none_or(|t| t <= now) {
            with_positions(&mut conn, rows, now).await?
        } else {
            rows.into_iter().map(|r| r.into_record(None)).collect::<Result<_, _>>()?
        };
        Ok(Page { rows, next_cursor })
    }

    async fn list_recent_items(
        &self,
        scope: Scope<'_>,
        since: OffsetDateTime,
        page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        let now = self.now();
        let mut conn = self.read_conn().await?;
        let mut q = items::table.filter(items::created_at.ge(since)).select(ItemRow::as_select()).into_boxed();
        if let Some(t) = scope.tenant() {
            q = q.filter(items::tenant.eq(t.to_owned()));
        }
        if let Some(cursor) = &page.cursor {
            let after: i64 = cursor.parse().map_err(|_| bad_cursor())?;
            q = q.filter(items::seq.gt(after));
        }
        let limit = page_limit(page);
        let mut rows: Vec<ItemRow> =
            q.order((items::created_at.asc(), items::seq.asc())).limit(limit + 1).load(&mut *conn).await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.seq.to_string())
        } else {
            None
        };
        Ok(Page { rows: with_positions(&mut conn, rows, now).await?, next_cursor })
    }

    async fn get_item(&self, scope: Scope<'_>, id: &str) -> Result<ItemRecord, StoreError> {
        let now = self.now();
        let mut conn = self.read_conn().await?;
        let row: ItemRow = items::table
            .filter(items::id.eq(id))
            .select(ItemRow::as_select())
            .first(&mut *conn)
            .await
            .optional()?
            .filter(|i| visible(&i.tenant, scope))
            .ok_or(StoreError::NotFound)?;
        Ok(with_positions(&mut conn, vec![row], now).await?.remove(0))
    }

    async fn read_events(
        &self,
        scope: Scope<'_>,
        batch_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut conn = self.read_conn().await?;
        find_visible_batch(&mut conn, scope, batch_id).await?;
        let rows: Vec<EventRow> = events::table
            .filter(events::batch_id.eq(batch_id))
            .filter(events::seq.gt(after))
            .order(events::seq.asc())
            .limit(limit.clamp(1, 1_000) as i64)
            .select(EventRow::as_select())
            .load(&mut *conn)
            .await?;
        rows.into_iter()
            .map(|e| {
                Ok(EventRecord {
                    event_type: e.event_type.parse()?,
                    batch_id: e.batch_id,
                    seq: e.seq,
                    item_id: e.item_id,
                    item_index: e.item_index,
                    step: e.step,
                    message: e.message,
                    data: e.data,
                    at: e.at,
                })
            })
            .collect()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedItem>, StoreError> {
        let (_, mut claimed) = self.finish_and_claim(Vec::new(), vec![request.clone()]).await?;
        Ok(claimed.pop().unwrap_or_default())
    }

    async fn renew_lease(&self, item_id: &str, lease_token: &str, lease: Duration) -> Result<LeaseState, StoreError> {
        let now = self.now();
        let expires = now + lease;
        let mut conn = self.write_conn().await?;
        let batch_id: Option<String> = diesel::update(
            items::table
                .filter(items::id.eq(item_id))
                .filter(items::status.eq(ItemStatus::Running.as_str()))
                .filter(items::lease_token.eq(lease_token)),
        )
        .set((items::lease_expires_at.eq(expires), items::updated_at.eq(now)))
        .returning(items::batch_id)
        .get_result(&mut *conn)
        .await
        .optional()?;
        drop(conn);
        let mut conn = self.read_conn().await?;
        match batch_id {
            Some(batch_id) => {
                let status: String =
                    batches::table.find(&batch_id).select(batches::status).first(&mut *conn).await?;
                let status: BatchStatus = status.parse()?;
                Ok(if matches!(status, BatchStatus::Cancelling | BatchStatus::Cancelled | BatchStatus::Failed) {
                    LeaseState::Cancelled
                } else {
                    LeaseState::Held(expires)
                })
            }
            None => lease_lost_state(&mut conn, item_id).await,
        }
    }

    async fn report(&self, item_id: &str, lease_token: &str, report: ItemReport) -> Result<LeaseState, StoreError> {
        let now = self.now();
        let (id, lease_token) = (item_id.to_owned(), lease_token.to_owned());
        let state = self
            .write(move |c| {
                Box::pin(async move {
                    let Some(mut item) = lock_item(c, &id).await? else {
                        return Ok((None, Vec::new()));
                    };
                    if item.status != ItemStatus::Running.as_str() || item.lease_token.as_deref() != Some(&lease_token) {
                        return Ok((None, Vec::new()));
                    }
                    let batch = lock_batch(c, &item.batch_id).await?.ok_or(StoreError::NotFound)?;
                    let mut t = Touched::new(batch);
                    if matches!(t.status()?, BatchStatus::Cancelling | BatchStatus::Cancelled | BatchStatus::Failed) {
                        return Ok((Some(LeaseState::Cancelled), Vec::new()));
                    }
                    if let Some(step) = &report.step {
                        item.step = Some(step.clone());
                    }
                    if let Some(message) = &report.message {
                        item.message = Some(message.clone());
                    }
                    if let Some((current, total)) = report.progress {
                        item.progress_current = Some(current);
                        item.progress_total = total;
                    }
                    item.updated_at = now;
                    let event_type = report.event_type.unwrap_or(if report.step.is_some() {
                        EventType::ItemStep
                    } else if report.progress.is_some() {
                        EventType::ItemProgress
                    } else {
                        EventType::ItemLog
                    });
                    let mut data = report.data.clone();
                    if let Some((current, total)) = report.progress {
                        let progress = json!({"current": current, "total": total});
                        data = Some(match data {
                            Some(Value::Object(mut m)) => {
                                m.insert("progress".into(), progress);
                                Value::Object(m)
                            }
                            Some(other) => json!({"progress": progress, "value": other}),
                            None => json!({"progress": progress}),
                        });
                    }
                    t.event(event_type, Some(ItemSnapshot { row: &item }), report.message.clone(), data, now);
                    save_item(c, &item).await?;
                    let notices = save_batch(c, &mut t, now).await?;
                    Ok((Some(LeaseState::Held(item.lease_expires_at.unwrap_or(now))), notices))
                })
            })
            .await?;
        match state {
            Some(state) => Ok(state),
            None => {
                let mut conn = self.read_conn().await?;
                lease_lost_state(&mut conn, item_id).await
            }
        }
    }

    async fn finish(&self, finishes: Vec<Finish>) -> Result<Vec<FinishResult>, StoreError> {
        let (results, _) = self.finish_and_claim(finishes, Vec::new()).await?;
        Ok(results)
    }

    async fn finish_and_claim(
        &self,
        finishes: Vec<Finish>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<FinishResult>, Vec<Vec<ClaimedItem>>), StoreError> {
        if finishes.is_empty() && claims.iter().all(|r| r.max_items == 0) {
            return Ok((Vec::new(), claims.iter().map(|_| Vec::new()).collect()));
        }
        let now = self.now();
        let max_error_chars = self.max_error_chars;
        self.write(move |c| {
            Box::pin(async move {
                // Lock order (see the top of this file): the finished items' rows, then the
                // candidates' rows (skipping rows other transactions hold), then every batch
                // row involved, in id order.
                let mut rows = lock_finished_items(c, &finishes).await?;
                let mut candidates = Vec::with_capacity(claims.len());
                for request in &claims {
                    let taken: HashSet<i64> = candidates.iter().flatten().map(|r: &ItemRow| r.seq).collect();
                    candidates.push(claim_candidates(c, request, &taken, now).await?);
                }
                let mut touched = lock_batches(
                    c,
                    rows.values()
                        .filter(|r| r.status == ItemStatus::Running.as_str())
                        .map(|r| r.batch_id.clone())
                        .chain(candidates.iter().flatten().map(|r| r.batch_id.clone())),
                )
                .await?;
                let mut failed_now = HashSet::new();
                let (results, finished) =
                    apply_finishes(c, finishes, &mut rows, &mut touched, &mut failed_now, max_error_chars, now).await?;
                let mut changed = finished;
                let mut started = Vec::with_capacity(claims.len());
                for (request, candidates) in claims.iter().zip(candidates) {
                    // Items of a batch this group just failed were cancelled with it.
                    let candidates = candidates.into_iter().filter(|r| !failed_now.contains(&r.batch_id));
                    let (claimed, items) = apply_claim(request, candidates, &mut touched, now)?;
                    started.push((changed.len(), claimed));
                    changed.extend(items);
                }
                let mut saved = save_items(c, changed).await?;
                let notices = save_batches(c, &mut touched, now).await?;
                // Each claim's started rows, in claim order, from where they were put.
                let mut claimed_out = Vec::with_capacity(started.len());
                for (from, claimed) in started.into_iter().rev() {
                    let rows = saved.split_off(from);
                    claimed_out.push(claimed_items(claimed, rows));
                }
                claimed_out.reverse();
                Ok(((results, claimed_out), notices))
            })
        })
        .await
    }

    async fn requeue_expired_leases(&self) -> Result<usize, StoreError> {
        let now = self.now();
        let max_error_chars = self.max_error_chars;
        self.write(move |c| {
            Box::pin(async move {
                // Written out, not bound, so that SQLite reads `items_running_leases` (see
                // `claim_candidates`); with a bound status it read the whole table.
                let expired: Vec<ItemRow> = skip_locked!(
                    items::table
                        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>("items.status = 'running'"))
                        .filter(items::lease_expires_at.lt(now))
                        .order(items::lease_expires_at.asc())
                        .limit(REQUEUE_BATCH)
                        .select(ItemRow::as_select())
                )
                .load(c)
                .await?;
                if expired.is_empty() {
                    return Ok((0, Vec::new()));
                }
                let mut touched = lock_batches(c, expired.iter().map(|i| i.batch_id.clone())).await?;
                let n = expired.len();
                let mut changed = Vec::with_capacity(n);
                for mut item in expired {
                    let Some(t) = touched.get_mut(&item.batch_id) else { continue };
                    end_attempt(&mut item, t, Ending::LeaseExpired, max_error_chars, now)?;
                    changed.push(item);
                    if fails_batch_now(t) {
                        // The cancellation reads the batch's waiting items from the table.
                        save_items(c, std::mem::take(&mut changed)).await?;
                        cancel_waiting_items(c, t, CancelReason::FailBatch, now).await?;
                    }
                }
                save_items(c, changed).await?;
                let mut notices = save_batches(c, &mut touched, now).await?;
                notices.extend(touched.values().map(|t| Notice::Work { queue: t.row.queue.clone() }));
                Ok((n, notices))
            })
        })
        .await
    }

    async fn cancel_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError> {
        self.control_batch(scope, id, |c, t, now| {
            Box::pin(async move {
                let status = t.status()?;
                // Validate before touching items: a finished batch cannot be cancelled.
                batch_sm::cancel(status, t.row.running)?;
                if status == BatchStatus::Cancelling {
                    return Ok(());
                }
                cancel_waiting_items(c, t, CancelReason::Batch, now).await?;
                let to = batch_sm::cancel(status, t.row.running)?;
                if to == BatchStatus::Cancelling {
                    t.set_status(to, EventType::BatchCancelling, now);
                } else {
                    t.set_status(to, EventType::BatchCancelled, now);
                }
                Ok(())
            })
        })
        .await
    }

    async fn pause_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError> {
        self.control_batch(scope, id, |_, t, now| {
            Box::pin(async move {
                let to = batch_sm::pause(t.status()?)?;
                t.set_status(to, EventType::BatchPaused, now);
                Ok(())
            })
        })
        .await
    }

    async fn resume_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError> {
        self.control_batch(scope, id, |_, t, now| {
            Box::pin(async move {
                let to = batch_sm::resume(t.status()?, t.row.started_at.is_some())?;
                t.set_status(to, EventType::BatchResumed, now);
                // Items may all have ended while the batch was paused.
                t.settle(now)?;
                Ok(())
            })
        })
        .await
    }

    async fn retry_batch(&self, scope: Scope<'_>, id: &str) -> Result<BatchRecord, StoreError> {
        self.control_batch(scope, id, |c, t, now| {
            Box::pin(async move {
                let retryable: Vec<ItemRow> = items::table
                    .filter(items::batch_id.eq(&t.row.id))
                    .filter(
                        items::status.eq(ItemStatus::Failed.as_str()).or(items::status
                            .eq(ItemStatus::Cancelled.as_str())
                            .and(items::cancel_reason.eq(CancelReason::FailBatch.as_str()))),
                    )
                    .order(items::item_index.asc())
                    .select(ItemRow::as_select())
                    .load(c)
                    .await?;
                let to = batch_sm::retry(t.status()?, retryable.len() as i64)?;
                let sequential = t.row.mode == Mode::Sequential.as_str();
                for mut item in retryable {
                    let from = item.status()?;
                    let to_item = item_sm::retry(from, item.cancel_reason()?)?;
                    item.set_status(to_item, now);
                    item.attempts = 0;
                    item.error = None;
                    item.cancel_reason = None;
                    item.blocked = sequential;
                    t.move_item(from, to_item);
                    save_item(c, &item).await?;
                }
                t.row.error = None;
                t.set_status(to, EventType::BatchRetried, now);
                t.advance = true;
                Ok(())
            })
        })
        .await
    }

    async fn cancel_item(&self, scope: Scope<'_>, id: &str) -> Result<ItemRecord, StoreError> {
        self.control_item(scope, id, |item, t, now| {
            let from = item.status()?;
            let to = item_sm::cancel(from, CancelReason::Item)?;
            item.set_status(to, now);
            item.cancel_reason = Some(CancelReason::Item.as_str().to_owned());
            item.blocked = false;
            t.move_item(from, to);
            t.event(EventType::ItemCancelled, Some(ItemSnapshot { row: item }), None, None, now);
            t.advance = true;
            t.settle(now)
        })
        .await
    }

    async fn answer_item(&self, scope: Scope<'_>, id: &str, answer: Value) -> Result<ItemRecord, StoreError> {
        self.control_item(scope, id, move |item, t, now| {
            let from = item.status()?;
            let to = item_sm::answer(from)?;
            item.set_status(to, now);
            item.answer = Some(answer.clone());
            t.move_item(from, to);
            let data = json!({"answer": answer});
            t.event(EventType::ItemInputReceived, Some(ItemSnapshot { row: item }), None, Some(data), now);
            Ok(())
        })
        .await
    }

    async fn set_queue_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError> {
        let now = self.now();
        let queue = queue.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                diesel::insert_into(queue_states::table)
                    .values((queue_states::name.eq(&queue), queue_states::paused.eq(paused), queue_states::updated_at.eq(now)))
                    .on_conflict(queue_states::name)
                    .do_update()
                    .set((queue_states::paused.eq(paused), queue_states::updated_at.eq(now)))
                    .execute(c)
                    .await?;
                let mut notices = vec![Notice::Queue { queue: queue.clone() }];
                if !paused {
                    notices.push(Notice::Work { queue });
                }
                Ok(((), notices))
            })
        })
        .await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        let now = self.now();
        let mut conn = self.read_conn().await?;
        let active: Vec<(String, String, i64)> = items::table
            .filter(items::status.eq_any([
                ItemStatus::Pending.as_str(),
                ItemStatus::Running.as_str(),
                ItemStatus::NeedsInput.as_str(),
            ]))
            .group_by((items::queue, items::status))
            .select((items::queue, items::status, diesel::dsl::count_star()))
            .load(&mut *conn)
            .await?;
        let recent: Vec<(String, i64)> = items::table
            .filter(items::status.eq(ItemStatus::Completed.as_str()))
            .filter(items::completed_at.gt(now - Duration::from_secs(60)))
            .group_by(items::queue)
            .select((items::queue, diesel::dsl::count_star()))
            .load(&mut *conn)
            .await?;
        let paused: Vec<(String, bool)> =
            queue_states::table.select((queue_states::name, queue_states::paused)).load(&mut *conn).await?;
        let mut out: BTreeMap<String, QueueStats> = BTreeMap::new();
        fn stats_of(out: &mut BTreeMap<String, QueueStats>, queue: String) -> &mut QueueStats {
            out.entry(queue.clone()).or_insert_with(|| QueueStats {
                name: queue,
                paused: false,
                depth: 0,
                running: 0,
                needs_input: 0,
                completed_last_minute: 0,
                oldest_pending_at: None,
            })
        }
        for (queue, status, n) in active {
            let s = stats_of(&mut out, queue);
            match status.as_str() {
                "pending" => s.depth = n,
                "running" => s.running = n,
                _ => s.needs_input = n,
            }
        }
        for (queue, n) in recent {
            stats_of(&mut out, queue).completed_last_minute = n;
        }
        for (queue, p) in paused {
            stats_of(&mut out, queue).paused = p;
        }
        for s in out.values_mut().filter(|s| s.depth > 0) {
            s.oldest_pending_at = items::table
                .filter(items::queue.eq(&s.name))
                .filter(items::status.eq(ItemStatus::Pending.as_str()))
                .order(items::seq.asc())
                .select(items::created_at)
                .first(&mut *conn)
                .await
                .optional()?;
        }
        Ok(out.into_values().collect())
    }

    async fn purge_finished(&self, before: OffsetDateTime) -> Result<usize, StoreError> {
        self.write(move |c| {
            Box::pin(async move {
                let ids: Vec<String> = batches::table
                    .filter(batches::completed_at.lt(before))
                    .filter(batches::status.eq_any([
                        BatchStatus::Completed.as_str(),
                        BatchStatus::Failed.as_str(),
                        BatchStatus::Cancelled.as_str(),
                    ]))
                    .select(batches::id)
                    .load(c)
                    .await?;
                // Items and events go explicitly (PostgreSQL keeps no foreign key on them);
                // webhook deliveries and their attempts go with their batch.
                for chunk in ids.chunks(INSERT_CHUNK) {
                    diesel::delete(events::table.filter(events::batch_id.eq_any(chunk))).execute(c).await?;
                    diesel::delete(items::table.filter(items::batch_id.eq_any(chunk))).execute(c).await?;
                    diesel::delete(batches::table.filter(batches::id.eq_any(chunk))).execute(c).await?;
                }
                Ok((ids.len(), Vec::new()))
            })
        })
        .await
    }

    async fn claim_deliveries(&self, max: usize, lease: Duration) -> Result<Vec<DueDelivery>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let now = self.now();
        let lease_expires_at = now + lease;
        // Most polls find nothing: look on a reader first and leave the writer alone.
        let due = due_deliveries(now)
            .select(webhook_deliveries::id)
            .first::<String>(&mut *self.read_conn().await?)
            .await
            .optional()?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        self.write(move |c| {
            Box::pin(async move {
                let ids: Vec<String> = skip_locked!(
                    webhook_deliveries::table
                        .filter(webhook_deliveries::status.eq(DeliveryStatus::Pending.as_str()))
                        .filter(webhook_deliveries::next_attempt_at.le(now))
                        .filter(
                            webhook_deliveries::lease_expires_at
                                .is_null()
                                .or(webhook_deliveries::lease_expires_at.le(now)),
                        )
                        .order((webhook_deliveries::next_attempt_at.asc(), webhook_deliveries::id.asc()))
                        .limit(max.min(1_000) as i64)
                        .select(webhook_deliveries::id)
                )
                .load(c)
                .await?;
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let lease_token = batchd_domain::new_lease_token();
                    diesel::update(webhook_deliveries::table.find(&id))
                        .set((
                            webhook_deliveries::lease_token.eq(&lease_token),
                            webhook_deliveries::lease_expires_at.eq(lease_expires_at),
                            webhook_deliveries::updated_at.eq(now),
                        ))
                        .execute(c)
                        .await?;
                    let (row, secret): (DeliveryRow, Option<String>) = webhook_deliveries::table
                        .inner_join(batches::table)
                        .filter(webhook_deliveries::id.eq(&id))
                        .select((DeliveryRow::as_select(), batches::webhook_secret))
                        .first(c)
                        .await?;
                    out.push(DueDelivery {
                        event_type: row.event_type.parse()?,
                        id: row.id,
                        batch_id: row.batch_id,
                        item_id: row.item_id,
                        url: row.url,
                        payload: row.payload,
                        secret,
                        attempts: row.attempts,
                        lease_token,
                        lease_expires_at,
                        created_at: row.created_at,
                    });
                }
                Ok((out, Vec::new()))
            })
        })
        .await
    }

    async fn record_delivery_attempt(
        &self,
        delivery_id: &str,
        lease_token: &str,
        attempt: DeliveryAttempt,
        next: DeliveryNext,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        let delivery_id = delivery_id.to_owned();
        let lease_token = lease_token.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                let held: Option<i32> = locked!(
                    webhook_deliveries::table
                        .filter(webhook_deliveries::id.eq(&delivery_id))
                        .filter(webhook_deliveries::status.eq(DeliveryStatus::Pending.as_str()))
                        .filter(webhook_deliveries::lease_token.eq(&lease_token))
                        .select(webhook_deliveries::attempts)
                )
                .first(c)
                .await
                .optional()?;
                let Some(attempts) = held else {
                    return Ok((false, Vec::new()));
                };
                let number = attempts + 1;
                diesel::insert_into(webhook_attempts::table)
                    .values(AttemptRow {
                        delivery_id: delivery_id.clone(),
                        attempt: number,
                        at: attempt.at,
                        status_code: attempt.status_code,
                        latency_ms: attempt.latency_ms,
                        error: attempt.error,
                        response_body: attempt.response_body,
                    })
                    .execute(c)
                    .await?;
                let (status, next_attempt_at) = match next {
                    DeliveryNext::Delivered => (DeliveryStatus::Delivered, None),
                    DeliveryNext::Failed => (DeliveryStatus::Failed, None),
                    DeliveryNext::RetryAt(at) => (DeliveryStatus::Pending, Some(at)),
                };
                diesel::update(webhook_deliveries::table.find(&delivery_id))
                    .set((
                        webhook_deliveries::status.eq(status.as_str()),
                        webhook_deliveries::attempts.eq(number),
                        webhook_deliveries::next_attempt_at.eq(next_attempt_at),
                        webhook_deliveries::lease_token.eq(None::<String>),
                        webhook_deliveries::lease_expires_at.eq(None::<OffsetDateTime>),
                        webhook_deliveries::updated_at.eq(now),
                    ))
                    .execute(c)
                    .await?;
                Ok((true, Vec::new()))
            })
        })
        .await
    }

    async fn list_deliveries(
        &self,
        scope: Scope<'_>,
        batch_id: &str,
        page: &PageRequest,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        let mut conn = self.read_conn().await?;
        find_visible_batch(&mut conn, scope, batch_id).await?;
        let mut q = webhook_deliveries::table
            .filter(webhook_deliveries::batch_id.eq(batch_id.to_owned()))
            .select(DeliveryRow::as_select())
            .into_boxed();
        if let Some(cursor) = &page.cursor {
            let after: i64 = cursor.parse().map_err(|_| bad_cursor())?;
            q = q.filter(webhook_deliveries::event_seq.gt(after));
        }
        let limit = page_limit(page);
        let mut rows: Vec<DeliveryRow> = q
            .order((webhook_deliveries::event_seq.asc(), webhook_deliveries::id.asc()))
            .limit(limit + 1)
            .load(&mut *conn)
            .await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.event_seq.to_string())
        } else {
            None
        };
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let attempt_rows: Vec<AttemptRow> = webhook_attempts::table
            .filter(webhook_attempts::delivery_id.eq_any(ids))
            .order((webhook_attempts::delivery_id.asc(), webhook_attempts::attempt.asc()))
            .select(AttemptRow::as_select())
            .load(&mut *conn)
            .await?;
        let mut attempts: HashMap<String, Vec<AttemptRecord>> = HashMap::new();
        for a in attempt_rows {
            attempts.entry(a.delivery_id).or_default().push(AttemptRecord {
                attempt: a.attempt,
                at: a.at,
                status_code: a.status_code,
                latency_ms: a.latency_ms,
                error: a.error,
                response_body: a.response_body,
            });
        }
        let rows = rows
            .into_iter()
            .map(|r| {
                Ok(DeliveryRecord {
                    event_type: r.event_type.parse()?,
                    status: r.status.parse()?,
                    attempts: attempts.remove(&r.id).unwrap_or_default(),
                    id: r.id,
                    batch_id: r.batch_id,
                    event_seq: r.event_seq,
                    item_id: r.item_id,
                    next_attempt_at: r.next_attempt_at,
                    created_at: r.created_at,
                    updated_at: r.updated_at,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Page { rows, next_cursor })
    }
}

/// Pending deliveries whose next attempt is due and whose lease (if any) has expired, oldest
/// due first.
fn due_deliveries(
    now: OffsetDateTime,
) -> webhook_deliveries::BoxedQuery<'static, <Conn as diesel_async::AsyncConnectionCore>::Backend> {
    webhook_deliveries::table
        .filter(webhook_deliveries::status.eq(DeliveryStatus::Pending.as_str()))
        .filter(webhook_deliveries::next_attempt_at.le(now))
        .filter(
            webhook_deliveries::lease_expires_at
                .is_null()
                .or(webhook_deliveries::lease_expires_at.le(now)),
        )
        .order((webhook_deliveries::next_attempt_at.asc(), webhook_deliveries::id.asc()))
        .into_boxed()
}

/// Why a lease holder no longer holds its lease.
async fn lease_lost_state(c: &mut Conn, item_id: &str) -> Result<LeaseState, StoreError> {
    let row: Option<(String, Option<String>)> = items::table
        .filter(items::id.eq(item_id))
        .select((items::status, items::cancel_reason))
        .first(c)
        .await
        .optional()?;
    Ok(match row {
        Some((status, reason))
            if status == ItemStatus::Cancelled.as_str() && reason.as_deref() != Some(CancelReason::Item.as_str()) =>
        {
            LeaseState::Cancelled
        }
        _ => LeaseState::Lost,
    })
}

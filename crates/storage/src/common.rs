// The store's logic, written once and compiled into each backend module with
// `include!("common.rs")`. The including module provides:
// - `schema`: the backend's generated diesel schema;
// - `Conn`: its connection type, and `Self::read_conn` / `Self::write_conn` on the store;
// - `Db`: its diesel backend, and `SqlTimestamp` the SQL type of times, for hand-written SQL;
// - `db_time(t)`: a time as the query builder binds it (`DbTime`; a row written through it binds
//   `DbTime` and, for a nullable time, `DbMaybeTime`): the time itself on PostgreSQL, integer
//   microseconds on SQLite (`sqlite/micros.rs`);
// - `Self::transaction(f)`: runs `f` in a write transaction (`BEGIN IMMEDIATE` on SQLite, the
//   whole transaction in one trip to a blocking thread), and `Self::transaction_with(f)` the
//   same for an `f` that sends its `BEGIN` first (`begin_piped`) and may have ended it
//   (`Ended`);
// - `ENDS_IN_PIPELINE` and `end_piped(c)`: whether a transaction's last writes can take its
//   `COMMIT` with them (PostgreSQL), and that `COMMIT`; `begin_piped(c)`: the `BEGIN` of a
//   `transaction_with`, sent first with its first statements (nothing on SQLite);
// - `locked!(query)` / `skip_locked!(query)`: `FOR UPDATE [SKIP LOCKED]` on PostgreSQL, nothing
//   on SQLite (whose write transactions are serialized);
// - `insert_rows!(c, table, rows)`: a multi-row insert of owned rows;
// - `save_items`, `insert_items`, `insert_event_runs`, `complete_ranged`, `complete_own`,
//   `reserve_lease_ids`, `insert_range_leases`,
//   `delete_entries`, `lock_end_rows_by_id`, `lock_batch_rows_and_cursor`,
//   `leases_of`, `items_from`
//   and `next_batch_seq`: the statements of the hot path, in each backend's best form;
// - `Piped<'_>`: what `joined!` hands each of its expressions as a connection (`&mut
//   Piped<'_>`): a shared connection on PostgreSQL, the connection itself on SQLite;
// - `Self::notify_in_tx(c, &notices)`, `notify_piped(c, &notices)` (the same from inside
//   `pipelined!`) and `Self::after_commit(notices)`;
// - `piped_each!(c, pattern in iter => block)`: a block per item, pipelined as `pipelined!`;
// - `self.turn()`, the commit order of group transactions (`crate::order`), and
//   `self.insert_turn()`, held while a batch's items are inserted.
//
// How items are claimed (migration 2026-12-04-000004_range_claims has the long version): a
// parallel batch is claimed through its cursor, `next_index`, in ranges that write one lease
// row and no item row; a row that says `pending`, never started and lies below the cursor is
// running under such a range (`batchd_domain::claim`). Every other pending item waits in
// `queue_entries` and is claimed one by one, into `running` in its own row and a lease row of
// its own. Every running item has one lease row; expired leases are found there.
//
// Lock order, so that transactions never wait on each other in a cycle: queue entries, then
// item rows, then batch rows in id order, then lease rows. The one exception, cancelling a
// batch (and `fail_batch` cancelling the rest), takes the batch first and skips item rows and
// queue entries another transaction holds; that transaction (a claim) sees the batch's new
// status once it gets the batch and cancels its own items. Queue entries are always deleted
// skipping the ones another transaction holds: a claim that holds one finds its item ended
// and drops the entry itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use batchd_domain::claim::{ClaimCursor, RangeTokens, Waiting, parse_range_token, range_lease_token};
use batchd_domain::transition::{batch as batch_sm, item as item_sm};
use batchd_domain::{
    BatchStatus, CancelReason, Counts, DeliveryStatus, EventType, FailureDecision, ItemStatus, JsonMap, Mode,
    OnItemFailure,
};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde_json::{Value, json};
use time::OffsetDateTime;

use self::schema::{
    batches, event_runs, items, leases, queue_entries, queue_states, webhook_attempts,
    webhook_deliveries,
};
use crate::model::*;
use crate::notify::Notice;
use crate::{Readiness, StoreError};

/// Rows of a multi-row insert per statement: below both backends' bind-parameter limits.
const INSERT_CHUNK: usize = 1_000;

/// Range lease ids a group transaction reserves for its claims (each batch a claim takes
/// items from makes one lease); a claim that makes more inserts the rest one by one.
const RESERVED_LEASES: usize = 4;
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
    #[diesel(serialize_as = DbMaybeTime)]
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
    #[diesel(serialize_as = DbTime)]
    created_at: OffsetDateTime,
    #[diesel(serialize_as = DbMaybeTime)]
    started_at: Option<OffsetDateTime>,
    #[diesel(serialize_as = DbTime)]
    updated_at: OffsetDateTime,
    #[diesel(serialize_as = DbMaybeTime)]
    completed_at: Option<OffsetDateTime>,
    seq: i64,
    next_index: i32,
    unclaimed: i64,
}


#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = items)]
struct ItemRow {
    seq: i64,
    id: String,
    batch_id: String,
    tenant: String,
    queue: String,
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
    #[diesel(serialize_as = DbMaybeTime)]
    next_attempt_at: Option<OffsetDateTime>,
    lease_owner: Option<&'a str>,
    lease_token: Option<&'a str>,
    #[diesel(serialize_as = DbMaybeTime)]
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
    #[diesel(serialize_as = DbMaybeTime)]
    started_at: Option<OffsetDateTime>,
    #[diesel(serialize_as = DbTime)]
    updated_at: OffsetDateTime,
    #[diesel(serialize_as = DbMaybeTime)]
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
    #[diesel(serialize_as = DbTime)]
    created_at: OffsetDateTime,
    #[diesel(serialize_as = DbTime)]
    updated_at: OffsetDateTime,
}

/// What a claim reads of an item taken in a range: what its handler needs.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = items)]
struct FreshRow {
    id: String,
    tenant: String,
    item_index: i32,
    custom_id: Option<String>,
    input: Value,
    config: Value,
    answer: Option<Value>,
    status: String,
    attempts: i32,
    max_attempts: i32,
    started_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
}

/// Items read at a batch's cursor before a claim gets to it (`lock_batches_at`), with the
/// cursor they were read from: a claim uses them only if that is still its batch's cursor.
#[derive(Debug)]
struct AtCursor {
    batch_id: String,
    next_index: i32,
    rows: Vec<FreshRow>,
}

/// What ending an attempt the general way reads of an item first (locked): enough to check
/// its lease; the whole row is read only once the lease holds.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = items)]
struct EndRow {
    seq: i64,
    id: String,
    batch_id: String,
    item_index: i32,
    status: String,
    lease_token: Option<String>,
    cancel_reason: Option<String>,
    started_at: Option<OffsetDateTime>,
}

/// A completion of an item running under a range lease that `complete_ranged` wrote: the
/// row still said `pending`, never started (so no attempt counted yet: `attempts` is 0
/// until an item starts), in the lease's batch. Its attempt was the first.
#[derive(Debug, Clone)]
struct RangeDone {
    id: String,
    batch_id: String,
    item_index: i32,
}

/// A completion of an item under a range lease as its worker sent it: `complete_ranged`
/// writes it when lease `lease` covers item `item_index`, `secret` is the
/// lease's, and the item's row still says it runs under the range.
#[derive(Debug, Clone)]
struct RangeEnd {
    id: String,
    lease: i64,
    secret: String,
    item_index: i32,
    result: Value,
}

/// A completion of an item claimed one by one, as `complete_own` writes it: the row must
/// still be running under this token.
#[derive(Debug, Clone)]
struct OwnEnd {
    id: String,
    token: String,
    result: Value,
}

/// What a completion on the hot path returns of the row it wrote.
#[derive(Debug, Clone, Queryable)]
struct CompletedItem {
    seq: i64,
    id: String,
    batch_id: String,
    item_index: i32,
    custom_id: Option<String>,
    step: Option<String>,
    message: Option<String>,
    attempts: i32,
}

/// The SQL types of [`CompletedItem`], in its order.
type CompletedItemSql = (
    diesel::sql_types::BigInt,
    diesel::sql_types::Text,
    diesel::sql_types::Text,
    diesel::sql_types::Integer,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Integer,
);

/// A pending item waiting to be claimed one by one.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = queue_entries, treat_none_as_default_value = false)]
struct EntryRow {
    item_seq: i64,
    batch_id: String,
    queue: String,
    priority: i32,
    batch_seq: i64,
    item_index: i32,
    blocked: bool,
    #[diesel(serialize_as = DbMaybeTime)]
    not_before: Option<OffsetDateTime>,
}

/// A lease: a range of a batch's items claimed together, or one item (`item_seq`).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = leases)]
struct LeaseRow {
    id: i64,
    batch_id: String,
    first_index: i32,
    last_index: i32,
    item_seq: Option<i64>,
    owner: String,
    secret: String,
    started_at: OffsetDateTime,
    expires_at: OffsetDateTime,
}

impl LeaseRow {
    fn covers(&self, index: i32) -> bool {
        self.item_seq.is_none() && self.first_index <= index && index <= self.last_index
    }

    /// Whether `token` is the lease token of item `index` of this range.
    fn holds(&self, index: i32, token: &str) -> bool {
        self.covers(index) && range_lease_token(self.id, &self.secret, index) == token
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = leases, treat_none_as_default_value = false)]
struct NewLeaseRow {
    batch_id: String,
    queue: String,
    first_index: i32,
    last_index: i32,
    item_seq: Option<i64>,
    owner: String,
    secret: String,
    running: i32,
    #[diesel(serialize_as = DbTime)]
    started_at: OffsetDateTime,
    #[diesel(serialize_as = DbTime)]
    expires_at: OffsetDateTime,
}

/// One timeline event, as a run stores it (see `event_runs`), or several: the same event of
/// further items right after it (`more`), as a claim of a range or a group of completions
/// writes them. Those take the seqs after `seq`, one each, in order; their ids are not
/// stored but read from `items` by index when the events are read (an item's id never
/// changes, and a batch's items and events are deleted together).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct EventRow {
    #[serde(skip)]
    batch_id: String,
    seq: i64,
    item_id: Option<String>,
    item_index: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more: Vec<i32>,
    #[serde(rename = "type")]
    event_type: String,
    step: Option<String>,
    message: Option<String>,
    data: Option<Value>,
    #[serde(with = "run_time")]
    at: OffsetDateTime,
}

impl EventRow {
    /// The seq of the last event it holds.
    fn last_seq(&self) -> i64 {
        self.seq + self.more.len() as i64
    }

    /// Takes the same event of the next item into this one, when it is that: an item event
    /// of the same type, data and time, with no step or message, whose seq comes next.
    fn absorb(&mut self, seq: i64, index: i32, event_type: &str, data: Option<&Value>, at: OffsetDateTime) -> bool {
        let fits = self.item_index.is_some()
            && self.step.is_none()
            && self.message.is_none()
            && self.last_seq() + 1 == seq
            && self.at == at
            && self.event_type == event_type
            && self.data.as_ref() == data;
        if fits {
            self.more.push(index);
        }
        fits
    }
}

/// An event's time in a run: microseconds since the Unix epoch. Rows moved from the old
/// `events` table of SQLite hold the time's text instead.
mod run_time {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub(super) fn serialize<S: Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64((at.unix_timestamp_nanos() / 1_000) as i64)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Micros(i64),
        Text(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        use serde::de::Error;
        match Stored::deserialize(d)? {
            Stored::Micros(micros) => OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
                .map_err(|e| D::Error::custom(e.to_string())),
            Stored::Text(text) => {
                const SQLITE: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond]]][offset_hour sign:mandatory]:[offset_minute]"
                );
                OffsetDateTime::parse(&text, SQLITE)
                    .or_else(|_| OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339))
                    .map_err(|e| D::Error::custom(format!("an event time `{text}`: {e}")))
            }
        }
    }
}

/// A run of a batch's events, consecutive in `seq`, as stored.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = event_runs)]
struct EventRunRow {
    batch_id: String,
    first_seq: i64,
    last_seq: i64,
    events: String,
}

/// Runs are cut once their JSON passes this size: below the 2 KB past which PostgreSQL
/// compresses a value and moves it out of line.
const EVENT_RUN_BYTES: usize = 1_800;

/// Packs events (each batch's in `seq` order, batches one after another) into runs.
fn event_runs_of(events: Vec<EventRow>) -> Result<Vec<EventRunRow>, StoreError> {
    let mut runs: Vec<EventRunRow> = Vec::new();
    let mut open: Option<EventRunRow> = None;
    for event in events {
        let json = serde_json::to_string(&event).map_err(|e| StoreError::Corrupt(format!("an event: {e}")))?;
        let last_seq = event.last_seq();
        let joins = open.as_ref().is_some_and(|run| {
            run.batch_id == event.batch_id && run.last_seq + 1 == event.seq && run.events.len() + json.len() < EVENT_RUN_BYTES
        });
        if joins {
            if let Some(run) = open.as_mut() {
                run.events.pop();
                run.events.push(',');
                run.events.push_str(&json);
                run.events.push(']');
                run.last_seq = last_seq;
            }
        } else {
            runs.extend(open.take());
            open = Some(EventRunRow { batch_id: event.batch_id, first_seq: event.seq, last_seq, events: format!("[{json}]") });
        }
    }
    runs.extend(open);
    Ok(runs)
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
    #[diesel(serialize_as = DbMaybeTime)]
    next_attempt_at: Option<OffsetDateTime>,
    #[diesel(serialize_as = DbTime)]
    created_at: OffsetDateTime,
    #[diesel(serialize_as = DbTime)]
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
    #[diesel(serialize_as = DbTime)]
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

    fn snapshot(&self) -> ItemSnapshot<'_> {
        ItemSnapshot {
            id: &self.id,
            index: self.item_index,
            custom_id: self.custom_id.as_deref(),
            status: &self.status,
            step: self.step.as_deref(),
            message: self.message.as_deref(),
            result: self.result.as_ref(),
            error: self.error.as_deref(),
        }
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

    /// Shows an item that runs under a range lease as running, as its row would say had the
    /// claim written it.
    fn show_running_under(&mut self, lease: Option<&LeaseRow>) {
        self.status = ItemStatus::Running.as_str().to_owned();
        self.attempts += 1;
        if let Some(lease) = lease {
            self.lease_owner = Some(lease.owner.clone());
            self.lease_token = Some(range_lease_token(lease.id, &lease.secret, self.item_index));
            self.lease_expires_at = Some(lease.expires_at);
            self.started_at = Some(lease.started_at);
            self.updated_at = lease.started_at;
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

    fn cursor(&self) -> ClaimCursor {
        ClaimCursor {
            sequential: self.mode == Mode::Sequential.as_str(),
            next_index: self.next_index,
        }
    }

    /// Whether an item row of this batch says `pending` but runs under a range lease.
    fn runs_under_range(&self, status: &str, started_at: Option<OffsetDateTime>, index: i32) -> bool {
        self.cursor()
            .runs_under_range(status == ItemStatus::Pending.as_str(), started_at.is_some(), index)
    }

    /// Whether its pending items may be claimed now (the queue aside).
    fn ready(&self, now: OffsetDateTime) -> Result<bool, StoreError> {
        Ok(claimable(self.status()?) && self.run_at.is_none_or(|t| t <= now))
    }

    fn webhook_events(&self) -> Vec<EventType> {
        match &self.webhook_events {
            Some(Value::Array(list)) => list.iter().filter_map(|v| v.as_str()?.parse().ok()).collect(),
            _ => Vec::new(),
        }
    }

    /// The statement that writes the columns of the batch that change after it is created.
    fn update(&self) -> UpdateBatch<'_> {
        UpdateBatch {
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
            next_index: self.next_index,
            unclaimed: self.unclaimed,
            id: &self.id,
            _row: std::marker::PhantomData,
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
#[derive(Debug, Clone, Copy)]
struct ItemSnapshot<'a> {
    id: &'a str,
    index: i32,
    custom_id: Option<&'a str>,
    status: &'a str,
    step: Option<&'a str>,
    message: Option<&'a str>,
    result: Option<&'a Value>,
    error: Option<&'a str>,
}

/// A batch locked inside a write transaction, with the changes made to it so far. Every
/// change of its counters goes through `move_item`, every change of status through
/// `set_status`, every item that starts or stops waiting through `enter_pending` and
/// `leave_pending`, and every item that stops running through `leave_running`, so events,
/// webhook rows, queue entries and leases cannot be forgotten.
struct Touched {
    row: BatchRow,
    before: BatchRow,
    /// The batch's pending items as the position counts know them.
    pending_counted: i64,
    /// The row of the position counts its changes go to (`POSITION_SHARDS`).
    counts_shard: i32,
    events: Vec<EventRow>,
    deliveries: Vec<NewDeliveryRow>,
    /// A sequential batch whose head may have ended: unblock its next item.
    advance: bool,
    entries_add: Vec<EntryRow>,
    entries_remove: Vec<i64>,
    leases_add: Vec<NewLeaseRow>,
    /// Range leases made under ids reserved beforehand (`reserve_lease_ids`): their rows are
    /// written with the transaction's other writes, not when they are made.
    ranges_add: Vec<(i64, NewLeaseRow)>,
    /// Items whose own lease goes.
    leases_end: Vec<i64>,
    /// Range leases and how many of their items stopped running under them.
    ranges_end: BTreeMap<i64, i32>,
    /// Items taken out of a range lease in this transaction, and the lease each gets of its
    /// own if it is still running at the end.
    materialized: HashMap<i64, NewLeaseRow>,
}

impl Touched {
    fn new(row: BatchRow) -> Self {
        Self {
            pending_counted: row.pending,
            counts_shard: 0,
            before: row.clone(),
            row,
            events: Vec::new(),
            deliveries: Vec::new(),
            advance: false,
            entries_add: Vec::new(),
            entries_remove: Vec::new(),
            leases_add: Vec::new(),
            ranges_add: Vec::new(),
            leases_end: Vec::new(),
            ranges_end: BTreeMap::new(),
            materialized: HashMap::new(),
        }
    }

    /// A batch created in this transaction: none of its items is counted yet.
    fn created(row: BatchRow) -> Self {
        let counts_shard = 1 + row.seq.rem_euclid(POSITION_SHARDS - 1) as i32;
        Self { pending_counted: 0, counts_shard, ..Self::new(row) }
    }

    fn status(&self) -> Result<BatchStatus, StoreError> {
        self.row.status()
    }

    fn move_item(&mut self, from: ItemStatus, to: ItemStatus) {
        self.move_items(from, to, 1);
    }

    fn move_items(&mut self, from: ItemStatus, to: ItemStatus, n: i64) {
        let mut counts = self.row.counts();
        counts.shift(from, to, n);
        self.row.set_counts(counts);
    }

    /// Records an item that became pending: at the cursor, or in the queue of items claimed
    /// one by one.
    fn enter_pending(&mut self, item: &ItemRow) -> Result<(), StoreError> {
        match self.row.cursor().waiting(item.started_at.is_some(), item.item_index) {
            Some(Waiting::AtCursor) => self.row.unclaimed += 1,
            Some(Waiting::InQueue) => self.entries_add.push(EntryRow {
                item_seq: item.seq,
                batch_id: self.row.id.clone(),
                queue: self.row.queue.clone(),
                priority: self.row.priority,
                batch_seq: self.row.seq,
                item_index: item.item_index,
                blocked: item.blocked,
                not_before: item.next_attempt_at,
            }),
            None => {
                return Err(StoreError::Corrupt(format!(
                    "item {} of batch {} never started but lies below the claim cursor",
                    item.item_index, self.row.id
                )));
            }
        }
        Ok(())
    }

    /// Records a pending item that stops waiting (claimed one by one, or cancelled).
    fn leave_pending(&mut self, item: &ItemRow) {
        match self.row.cursor().waiting(item.started_at.is_some(), item.item_index) {
            Some(Waiting::AtCursor) => self.row.unclaimed -= 1,
            _ => self.entries_remove.push(item.seq),
        }
    }

    /// Records an item that stops running: its own lease goes, or it never gets one.
    fn leave_running(&mut self, item: &ItemRow) {
        if self.materialized.remove(&item.seq).is_none() {
            self.leases_end.push(item.seq);
        }
    }

    /// Takes an item out of its range lease: its row now says `running`, as if it had been
    /// claimed one by one, and it gets a lease of its own unless it stops running in this
    /// transaction. The caller writes the row.
    fn materialize(&mut self, item: &mut ItemRow, lease: &LeaseRow) {
        item.show_running_under(Some(lease));
        *self.ranges_end.entry(lease.id).or_default() += 1;
        self.materialized.insert(
            item.seq,
            NewLeaseRow {
                batch_id: self.row.id.clone(),
                queue: self.row.queue.clone(),
                first_index: item.item_index,
                last_index: item.item_index,
                item_seq: Some(item.seq),
                owner: lease.owner.clone(),
                secret: range_lease_token(lease.id, &lease.secret, item.item_index),
                running: 1,
                started_at: lease.started_at,
                expires_at: lease.expires_at,
            },
        );
    }

    /// Whether the batch's webhook asks for events of this type.
    fn delivers(&self, event_type: EventType) -> bool {
        self.row.webhook_url.is_some() && self.row.webhook_events().contains(&event_type)
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
        let step = item
            .and_then(|i| i.step.map(str::to_owned))
            .filter(|_| event_type == EventType::ItemStep);
        if let Some(url) = self.row.webhook_url.clone().filter(|_| self.delivers(event_type)) {
            let delivery_id = batchd_domain::new_item_id();
            let counts = self.row.counts();
            let payload = match item {
                Some(row) => json!({
                    "type": event_type, "id": delivery_id, "batch_id": self.row.id,
                    "item_id": row.id, "item_index": row.index, "custom_id": row.custom_id,
                    "status": row.status, "message": message.as_deref().or(row.message),
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
                item_id: item.map(|i| i.id.to_owned()),
                url,
                payload: payload.to_string(),
                status: "pending",
                attempts: 0,
                next_attempt_at: Some(now),
                created_at: now,
                updated_at: now,
            });
        }
        if let (Some(item), Some(last), None) = (item, self.events.last_mut(), &message)
            && step.is_none()
            && last.absorb(seq, item.index, event_type.as_str(), data.as_ref(), now)
        {
            return;
        }
        self.events.push(EventRow {
            batch_id: self.row.id.clone(),
            seq,
            more: Vec::new(),
            item_id: item.map(|i| i.id.to_owned()),
            item_index: item.map(|i| i.index),
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

    /// Marks the batch running when its first item starts.
    fn start(&mut self, now: OffsetDateTime) -> Result<(), StoreError> {
        let status = self.status()?;
        if status == BatchStatus::Pending {
            let to = batch_sm::start(status)?;
            self.set_status(to, EventType::BatchStarted, now);
        }
        Ok(())
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
        !self.events.is_empty()
            || self.row.counts() != self.before.counts()
            || self.row.status != self.before.status
            || self.row.next_index != self.before.next_index
            || self.row.unclaimed != self.before.unclaimed
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
    let t = OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1_000)?).ok()?;
    Some((t, id.to_owned()))
}

fn bad_cursor() -> StoreError {
    StoreError::InvalidCursor
}

/// Where a page of `list_recent_items` goes on: after this item, in the listing's order
/// (its batch's creation time, its batch's id, its index).
#[derive(Debug)]
struct RecentPlace {
    created_at: OffsetDateTime,
    batch_id: String,
    item_index: i32,
}

/// A cursor of `list_recent_items`.
#[derive(Debug)]
enum RecentCursor {
    /// `<micros>_<batch id>.<index>`, as written now: the batch's creation time, and the
    /// index after the last `.` (a batch id may hold `.` itself).
    At(RecentPlace),
    /// An item's seq, as earlier versions wrote their cursors (`<micros>_<seq>`, or a bare
    /// seq): the listing goes on after that item.
    ItemSeq(i64),
}

fn decode_recent_cursor(cursor: &str) -> Result<RecentCursor, StoreError> {
    let Some((created_at, rest)) = decode_time_cursor(cursor) else {
        return match cursor.contains('_') {
            false => cursor.parse().map(RecentCursor::ItemSeq).map_err(|_| bad_cursor()),
            true => Err(bad_cursor()),
        };
    };
    match rest.rsplit_once('.') {
        Some((batch_id, index)) if !batch_id.is_empty() => Ok(RecentCursor::At(RecentPlace {
            created_at,
            batch_id: batch_id.to_owned(),
            item_index: index.parse().map_err(|_| bad_cursor())?,
        })),
        Some(_) => Err(bad_cursor()),
        None => rest.parse().map(RecentCursor::ItemSeq).map_err(|_| bad_cursor()),
    }
}

/// Batches read at a time by [`recent_items`].
const RECENT_BATCHES: i64 = 100;

/// Up to `want` items of the batches created since `since` (and visible in `scope`), after
/// `after`, in the order of `list_recent_items`: by their batch's creation time and id, then
/// by index; each with its batch's creation time. An item is created with its batch, so no
/// index of items' own is needed: the batches' index on creation time gives the batches in
/// order and `(batch_id, item_index)` their items. Batches that fit whole are read in one
/// statement; a batch that does not, by index up to what is wanted.
async fn recent_items(
    c: &mut Conn,
    scope: Scope<'_>,
    since: OffsetDateTime,
    after: Option<RecentPlace>,
    want: usize,
) -> Result<Vec<(ItemRow, OffsetDateTime)>, StoreError> {
    let mut out: Vec<(ItemRow, OffsetDateTime)> = Vec::with_capacity(want.min(INSERT_CHUNK + 1));
    let mut from = None;
    if let Some(after) = after {
        // The rest of the batch the cursor is in, if it is still listed.
        let listed = batches::table
            .filter(batches::id.eq(&after.batch_id))
            .filter(batches::created_at.ge(db_time(since)))
            .select(batches::tenant)
            .first::<String>(c)
            .await
            .optional()?
            .is_some_and(|tenant| visible(&tenant, scope));
        if listed {
            let rest: Vec<ItemRow> = items::table
                .filter(items::batch_id.eq(&after.batch_id))
                .filter(items::item_index.gt(after.item_index))
                .order(items::item_index.asc())
                .limit(want as i64)
                .select(ItemRow::as_select())
                .load(c)
                .await?;
            out.extend(rest.into_iter().map(|r| (r, after.created_at)));
        }
        from = Some((after.created_at, after.batch_id));
    }
    while out.len() < want {
        let mut q = batches::table
            .filter(batches::created_at.ge(db_time(since)))
            .select((batches::id, batches::created_at, batches::total))
            .into_boxed();
        if let Some(t) = scope.tenant() {
            q = q.filter(batches::tenant.eq(t.to_owned()));
        }
        if let Some((t, id)) = &from {
            let t = db_time(*t);
            q = q.filter(batches::created_at.ge(t).and(batches::created_at.gt(t).or(batches::id.gt(id.clone()))));
        }
        let next: Vec<(String, OffsetDateTime, i64)> = q
            .order((batches::created_at.asc(), batches::id.asc()))
            .limit(RECENT_BATCHES)
            .load(c)
            .await?;
        let Some(last) = next.last() else { break };
        from = Some((last.1, last.0.clone()));
        let mut room = want - out.len();
        let fit = next.iter().take_while(|(_, _, total)| {
            let fits = usize::try_from(*total).is_ok_and(|n| n <= room);
            if fits {
                room -= *total as usize;
            }
            fits
        });
        let whole: HashMap<&str, (usize, OffsetDateTime)> =
            fit.enumerate().map(|(at, (id, created_at, _))| (id.as_str(), (at, *created_at))).collect();
        if !whole.is_empty() {
            let ids: Vec<&str> = whole.keys().copied().collect();
            let loaded: Vec<ItemRow> =
                items::table.filter(items::batch_id.eq_any(ids)).select(ItemRow::as_select()).load(c).await?;
            // In the batches' order, then by index.
            let mut rows: Vec<(usize, OffsetDateTime, ItemRow)> = loaded
                .into_iter()
                .filter_map(|r| {
                    let &(at, created_at) = whole.get(r.batch_id.as_str())?;
                    Some((at, created_at, r))
                })
                .collect();
            rows.sort_unstable_by_key(|(at, _, r)| (*at, r.item_index));
            out.extend(rows.into_iter().map(|(_, created_at, r)| (r, created_at)));
        }
        if let Some((id, created_at, _)) = next.get(whole.len()).filter(|_| out.len() < want) {
            // The first batch that does not fit whole: as much of it as is wanted, and no more.
            let part: Vec<ItemRow> = items::table
                .filter(items::batch_id.eq(id))
                .order(items::item_index.asc())
                .limit((want - out.len()) as i64)
                .select(ItemRow::as_select())
                .load(c)
                .await?;
            out.extend(part.into_iter().map(|r| (r, *created_at)));
            break;
        }
    }
    Ok(out)
}

/// Where the item with this seq stands in the listing of `list_recent_items`; a cursor that
/// names no item is a bad cursor.
async fn item_place(c: &mut Conn, seq: i64) -> Result<RecentPlace, StoreError> {
    let found: Option<(String, i32, OffsetDateTime)> = items::table
        .inner_join(batches::table.on(batches::id.eq(items::batch_id)))
        .filter(items::seq.eq(seq))
        .select((items::batch_id, items::item_index, batches::created_at))
        .first(c)
        .await
        .optional()?;
    let (batch_id, item_index, created_at) = found.ok_or_else(bad_cursor)?;
    Ok(RecentPlace {
        created_at,
        batch_id,
        item_index,
    })
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

/// Declares a statement of fixed text whose parameters are bound in order, with a static
/// query id, so each connection prepares it once: diesel prepares its own insert and update
/// statements, `sql` literals and `IN` lists again on every run, which for the small
/// statements of the hot path cost more than running them. `$field` is bound where it
/// appears.
macro_rules! fixed_statement {
    ($name:ident { $($field:ident : $rust:ty),* $(,)? } returns $sql_type:ty =
        $first:literal $(, $bind:ident => $st:ty, $more:literal)* $(,)?) => {
        pub(super) struct $name<'a> {
            $(pub(super) $field: $rust,)*
            pub(super) _row: std::marker::PhantomData<&'a ()>,
        }

        impl diesel::query_builder::QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl diesel::query_builder::Query for $name<'_> {
            type SqlType = $sql_type;
        }

        impl diesel::query_builder::QueryFragment<Db> for $name<'_> {
            fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, Db>) -> QueryResult<()> {
                out.push_sql($first);
                $(
                    out.push_bind_param::<$st, _>(&self.$bind)?;
                    out.push_sql($more);
                )*
                Ok(())
            }
        }
    };
}

/// A condition of fixed text, written out (SQLite uses a partial index only when a query's
/// own text implies the index's condition) yet cacheable, unlike diesel's `sql` literals.
/// Each condition is a type of its own: that is its query id.
macro_rules! condition {
    ($name:ident = $text:expr) => {
        #[derive(Debug, Clone, Copy, diesel::query_builder::QueryId)]
        pub(super) struct $name;

        impl diesel::expression::Expression for $name {
            type SqlType = diesel::sql_types::Bool;
        }

        impl<QS> diesel::expression::AppearsOnTable<QS> for $name {}

        impl<QS> diesel::expression::SelectableExpression<QS> for $name {}

        impl<GB> diesel::expression::ValidGrouping<GB> for $name {
            type IsAggregate = diesel::expression::is_aggregate::Never;
        }

        impl diesel::query_builder::QueryFragment<Db> for $name {
            fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, Db>) -> QueryResult<()> {
                out.push_sql($text);
                Ok(())
            }
        }
    };
}

use fixed::*;

/// The fixed statements and conditions of the hot path that both backends share.
mod fixed {
    use super::*;
    use diesel::sql_types::{BigInt, Integer, Nullable, Text};

    condition!(Unblocked = UNBLOCKED);
    condition!(HasUnclaimed = "batches.unclaimed > 0 AND batches.status IN ('pending', 'running')");
    condition!(BatchClaimable = "batches.status IN ('pending', 'running')");

    fixed_statement!(UpdateBatch {
        status: &'a str, pending: i64, running: i64, completed: i64, failed: i64, cancelled: i64,
        needs_input: i64, message: Option<&'a str>, error: Option<&'a str>, result: Option<&'a Value>,
        last_event_seq: i64, started_at: Option<OffsetDateTime>, updated_at: OffsetDateTime,
        completed_at: Option<OffsetDateTime>, next_index: i32, unclaimed: i64, id: &'a str,
    } returns () =
        "UPDATE batches SET status = ", status => Text, ", pending = ", pending => BigInt,
        ", running = ", running => BigInt, ", completed = ", completed => BigInt, ", failed = ", failed => BigInt,
        ", cancelled = ", cancelled => BigInt, ", needs_input = ", needs_input => BigInt,
        ", message = ", message => Nullable<Text>, ", error = ", error => Nullable<Text>,
        ", result = ", result => Nullable<SqlJson>, ", last_event_seq = ", last_event_seq => BigInt,
        ", started_at = ", started_at => Nullable<SqlTimestamp>, ", updated_at = ", updated_at => SqlTimestamp,
        ", completed_at = ", completed_at => Nullable<SqlTimestamp>, ", next_index = ", next_index => Integer,
        ", unclaimed = ", unclaimed => BigInt, " WHERE id = ", id => Text, ""
    );

    fixed_statement!(EndInRange { id: i64, ended: i32 } returns () =
        "UPDATE leases SET running = running - ", ended => Integer, " WHERE id = ", id => BigInt, ""
    );

    fixed_statement!(DropIdleLeases { now: OffsetDateTime } returns () =
        "DELETE FROM leases WHERE running <= 0 AND expires_at < ", now => SqlTimestamp, ""
    );

    // One statement whether or not the row exists yet, so that it can go out in a pipeline
    // whose last statement commits (nothing may follow on its answer).
    fixed_statement!(AddToBucket { queue: &'a str, priority: i32, bucket: i64, shard: i32, delta: i64 } returns () =
        "INSERT INTO queue_position_buckets (queue, priority, bucket, shard, pending) VALUES (", queue => Text, ", ",
        priority => Integer, ", ", bucket => BigInt, ", ", shard => Integer, ", ", delta => BigInt,
        ") ON CONFLICT (queue, priority, bucket, shard) DO UPDATE SET pending = queue_position_buckets.pending + excluded.pending"
    );

    fixed_statement!(InsertRangeLease {
        batch_id: &'a str, queue: &'a str, first_index: i32, last_index: i32, owner: &'a str, secret: &'a str,
        running: i32, started_at: OffsetDateTime, expires_at: OffsetDateTime,
    } returns BigInt =
        "INSERT INTO leases (batch_id, queue, first_index, last_index, item_seq, owner, secret, running, started_at, \
         expires_at) VALUES (", batch_id => Text, ", ", queue => Text, ", ", first_index => Integer, ", ",
        last_index => Integer, ", NULL, ", owner => Text, ", ", secret => Text, ", ", running => Integer, ", ",
        started_at => SqlTimestamp, ", ", expires_at => SqlTimestamp, ") RETURNING id"
    );
}

/// Locks a batch row (inside a write transaction).
async fn lock_batch(c: &mut Conn, id: &str) -> Result<Option<BatchRow>, StoreError> {
    Ok(locked!(batches::table.find(id).select(BatchRow::as_select())).first(c).await.optional()?)
}

/// Locks an item row (inside a write transaction).
async fn lock_item(c: &mut Conn, id: &str) -> Result<Option<ItemRow>, StoreError> {
    Ok(locked!(items::table.filter(items::id.eq(id)).select(ItemRow::as_select())).first(c).await.optional()?)
}

/// Locks the batches of these ids, in id order, in one statement.
async fn lock_batches(
    c: &mut Conn,
    ids: impl IntoIterator<Item = String>,
) -> Result<BTreeMap<String, Touched>, StoreError> {
    Ok(lock_batches_at(c, ids, None).await?.0)
}

/// `lock_batches`, and the items at the cursor of the batch `cursor` names (up to its
/// limit), read right after the lock in the same round trip where that saves one
/// (`lock_batch_rows_and_cursor`).
async fn lock_batches_at(
    c: &mut Conn,
    ids: impl IntoIterator<Item = String>,
    cursor: Option<(String, usize)>,
) -> Result<(BTreeMap<String, Touched>, Option<AtCursor>), StoreError> {
    let mut ids: Vec<String> = ids.into_iter().collect();
    ids.sort();
    ids.dedup();
    let (rows, at_cursor) = lock_batch_rows_and_cursor(c, ids.clone(), cursor).await?;
    let out: BTreeMap<String, Touched> = rows.into_iter().map(|row| (row.id.clone(), Touched::new(row))).collect();
    if let Some(missing) = ids.iter().find(|id| !out.contains_key(*id)) {
        return Err(StoreError::Corrupt(format!("item of missing batch {missing}")));
    }
    Ok((out, at_cursor))
}

/// The range leases of these batches, by batch.
async fn range_leases(
    c: &mut Conn,
    batch_ids: impl IntoIterator<Item = String>,
) -> Result<HashMap<String, Vec<LeaseRow>>, StoreError> {
    let mut ids: Vec<String> = batch_ids.into_iter().collect();
    ids.sort();
    ids.dedup();
    let mut out: HashMap<String, Vec<LeaseRow>> = HashMap::new();
    for chunk in ids.chunks(INSERT_CHUNK) {
        let rows: Vec<LeaseRow> = leases::table
            .filter(leases::batch_id.eq_any(chunk))
            .filter(leases::item_seq.is_null())
            .select(LeaseRow::as_select())
            .load(c)
            .await?;
        for lease in rows {
            out.entry(lease.batch_id.clone()).or_default().push(lease);
        }
    }
    Ok(out)
}

/// The range lease of `batch` that covers item `index`.
fn covering<'a>(leases: &'a HashMap<String, Vec<LeaseRow>>, batch: &str, index: i32) -> Option<&'a LeaseRow> {
    leases.get(batch)?.iter().find(|l| l.covers(index))
}

async fn save_item(c: &mut Conn, row: &ItemRow) -> Result<(), StoreError> {
    diesel::update(items::table.filter(items::seq.eq(row.seq))).set(row.state()).execute(c).await?;
    Ok(())
}

/// Where the position counts keep a batch's pending items: its queue, priority and bucket.
fn bucket_of(t: &Touched) -> (String, i32, i64, i32) {
    (t.row.queue.clone(), t.row.priority, t.row.seq.div_euclid(POSITION_BUCKET), t.counts_shard)
}

/// Adds `deltas` to the position counts. A bucket's row of a shard is written once it is
/// changed and stays: one statement per bucket and shard a transaction touches. A shard's
/// count may be negative (claims take from shard 0 what submits added to the others); the
/// sum over a bucket's shards is its pending items.
async fn count_pending(c: &mut Piped<'_>, deltas: BTreeMap<(String, i32, i64, i32), i64>) -> Result<(), StoreError> {
    piped_each!(c, ((queue, priority, bucket, shard), delta) in deltas.into_iter().filter(|(_, d)| *d != 0) => {
        AddToBucket { queue: &queue, priority, bucket, shard, delta, _row: std::marker::PhantomData }
            .execute(c)
            .await?;
    });
    Ok(())
}

/// Writes what the touched batches changed beside their rows: queue entries (removed ones
/// first), the next items of sequential batches, then together (`pipelined!`, and
/// `piped_each!` where there is a statement per row) the leases (ended ones first), each
/// batch's row, the position counts, and every new event and webhook delivery in bulk.
/// Returns the notices the changes call for.
async fn save_batches(
    c: &mut Conn,
    touched: &mut BTreeMap<String, Touched>,
    now: OffsetDateTime,
) -> Result<Vec<Notice>, StoreError> {
    Ok(save_touched(c, touched.values_mut().collect(), now, false).await?.0)
}

/// `save_batches` of one batch.
async fn save_batch(c: &mut Conn, t: &mut Touched, now: OffsetDateTime) -> Result<Vec<Notice>, StoreError> {
    Ok(save_touched(c, vec![t], now, false).await?.0)
}

/// Whether a transaction's closure has ended the transaction itself: its last statement
/// was the `COMMIT` (`end_piped`), and only the connection's bookkeeping is left.
#[derive(Debug, Clone, Copy)]
struct Ended(bool);

/// `save_batches` of these batches. With `last`, these are the transaction's last writes (of
/// one run by `write_ending`): the notices go out with them (`notify_piped`), and where the
/// backend allows it and every statement goes out at once, so does the `COMMIT`
/// (`end_piped`), in the same round trip; `Ended` says whether it did.
async fn save_touched(
    c: &mut Conn,
    mut touched: Vec<&mut Touched>,
    now: OffsetDateTime,
    last: bool,
) -> Result<(Vec<Notice>, Ended), StoreError> {
    let mut notices = Vec::new();
    let (mut entries_remove, mut entries_add, mut leases_end, mut leases_add, mut ranges_add) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ranges_end: BTreeMap<i64, i32> = BTreeMap::new();
    for t in touched.iter_mut() {
        entries_remove.append(&mut t.entries_remove);
        entries_add.append(&mut t.entries_add);
        leases_end.append(&mut t.leases_end);
        leases_add.append(&mut t.leases_add);
        ranges_add.append(&mut t.ranges_add);
        leases_add.extend(t.materialized.drain().map(|(_, lease)| lease));
        for (id, n) in std::mem::take(&mut t.ranges_end) {
            *ranges_end.entry(id).or_default() += n;
        }
    }
    if !entries_remove.is_empty() {
        delete_entries(c, entries_remove).await?;
    }
    if !entries_add.is_empty() {
        insert_chunked!(c, queue_entries::table, entries_add);
    }
    let (mut events, mut deliveries, mut updates) = (Vec::new(), Vec::new(), Vec::new());
    let mut counted: BTreeMap<(String, i32, i64, i32), i64> = BTreeMap::new();
    for t in touched.iter_mut() {
        if t.advance && t.row.mode == Mode::Sequential.as_str() && t.row.running == 0 && t.row.needs_input == 0 {
            notices.extend(unblock_next(c, &t.row, now).await?);
        }
        if t.row.pending != t.pending_counted {
            *counted.entry(bucket_of(t)).or_default() += t.row.pending - t.pending_counted;
            t.pending_counted = t.row.pending;
        }
        if !t.changed() {
            continue;
        }
        t.row.updated_at = now;
        updates.push(t.row.clone());
        events.append(&mut t.events);
        if !t.deliveries.is_empty() {
            notices.push(Notice::Webhooks);
        }
        deliveries.append(&mut t.deliveries);
        notices.push(Notice::Events { batch_id: t.row.id.clone() });
        let (old, new) = (t.before.status.as_str(), t.row.status.as_str());
        if old != new {
            notices.push(Notice::Control { batch_id: t.row.id.clone() });
            if matches!(new, "pending" | "running") {
                notices.push(Notice::Work { queue: t.row.queue.clone() });
            }
        }
        t.before = t.row.clone();
    }
    let runs = event_runs_of(events)?;
    notices.sort_by_key(Notice::encode);
    notices.dedup();
    let to_send: &[Notice] = if last { &notices } else { &[] };
    // The `COMMIT` may go last only if every statement before it is sent on the first poll:
    // one that waits for another's answer would be sent after it. Each block below sends one
    // statement, or one per row (`piped_each!`), except the leases' and deliveries' loops.
    let end = last
        && ENDS_IN_PIPELINE
        && leases_end.len().div_ceil(INSERT_CHUNK) + leases_add.len().div_ceil(INSERT_CHUNK) <= 1
        && deliveries.len() <= INSERT_CHUNK;
    // Each of these writes rows no other of them reads or writes, and every batch row is
    // already locked: on PostgreSQL they go out together instead of one round trip each, in
    // the order they are written here (each waits its turn for the connection's statement
    // cache, in that order, and is sent once it has it).
    pipelined!(c =>
        {
            // Ended item leases go before new ones: an item may end and start again here.
            for chunk in leases_end.chunks(INSERT_CHUNK) {
                diesel::delete(leases::table.filter(leases::item_seq.eq_any(chunk))).execute(c).await?;
            }
            if !leases_add.is_empty() {
                insert_chunked!(c, leases::table, leases_add);
            }
        }
        {
            // A range lease whose items have all ended stays until it expires: the rescuer
            // drops it then, in bulk, instead of every transaction deleting its own.
            piped_each!(c, (id, ended) in ranges_end => {
                EndInRange { id, ended, _row: std::marker::PhantomData }.execute(c).await?;
            });
        }
        { insert_range_leases(c, ranges_add).await?; }
        { piped_each!(c, row in &updates => { row.update().execute(c).await?; }); }
        { count_pending(c, counted).await?; }
        { insert_event_runs(c, runs).await?; }
        { insert_chunked!(c, webhook_deliveries::table, deliveries); }
        { notify_piped(c, to_send).await?; }
        { if end { end_piped(c).await?; } }
    );
    Ok((notices, Ended(end)))
}

/// Unblocks the next waiting item of a sequential batch whose items before it have ended.
async fn unblock_next(c: &mut Conn, batch: &BatchRow, now: OffsetDateTime) -> Result<Option<Notice>, StoreError> {
    let next: Option<EntryRow> = queue_entries::table
        .filter(queue_entries::batch_id.eq(&batch.id))
        .order(queue_entries::item_index.asc())
        .select(EntryRow::as_select())
        .first(c)
        .await
        .optional()?;
    let Some(next) = next.filter(|e| e.blocked) else {
        return Ok(None);
    };
    diesel::update(queue_entries::table.find(next.item_seq))
        .set(queue_entries::blocked.eq(false))
        .execute(c)
        .await?;
    diesel::update(items::table.filter(items::seq.eq(next.item_seq)))
        .set((items::blocked.eq(false), items::updated_at.eq(db_time(now))))
        .execute(c)
        .await?;
    Ok(Some(Notice::Work { queue: batch.queue.clone() }))
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
    batch.leave_running(item);
    let attempt = json!({"attempt": item.attempts});
    let to = match ending {
        Ending::Complete(result) => {
            let to = item_sm::complete(from)?;
            item.set_status(to, now);
            item.result = Some(result);
            item.error = None;
            batch.move_item(from, to);
            batch.event(EventType::ItemCompleted, Some(item.snapshot()), None, Some(attempt), now);
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
                    batch.event(EventType::ItemRetryScheduled, Some(item.snapshot()), Some(error), Some(data), now);
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
            batch.event(EventType::ItemNeedsInput, Some(item.snapshot()), None, Some(data), now);
            to
        }
        Ending::Cancel(reason) => {
            let to = item_sm::cancel(from, reason)?;
            item.set_status(to, now);
            item.cancel_reason = Some(reason.as_str().to_owned());
            batch.move_item(from, to);
            batch.event(EventType::ItemCancelled, Some(item.snapshot()), None, None, now);
            to
        }
        Ending::Release => {
            let to = item_sm::requeue(from)?;
            item.set_status(to, now);
            item.attempts = (item.attempts - 1).max(0);
            batch.move_item(from, to);
            let message = "handed back at shutdown; the attempt is not spent".to_owned();
            let data = json!({"attempt": item.attempts + 1, "released": true});
            batch.event(EventType::ItemRetryScheduled, Some(item.snapshot()), Some(message), Some(data), now);
            to
        }
        Ending::LeaseExpired => {
            let message = format!("the lease of attempt {} expired", item.attempts);
            batch.event(EventType::ItemLeaseExpired, Some(item.snapshot()), Some(message.clone()), Some(attempt), now);
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
    if to == ItemStatus::Pending {
        batch.enter_pending(item)?;
    }
    if to.is_ended() {
        batch.advance = true;
    }
    batch.settle(now)?;
    Ok(to)
}

/// Ends an item `failed`; under `fail_batch` the batch fails too (its other items are
/// cancelled by `cancel_waiting_items`, after the batch row is saved).
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
    batch.event(EventType::ItemFailed, Some(item.snapshot()), Some(error.clone()), Some(data), now);
    if batch.row.on_item_failure == OnItemFailure::FailBatch.as_str() && !batch.status()?.is_terminal() {
        let to_batch = batch_sm::fail_fast(batch.status()?)?;
        batch.row.error = Some(format!("item {} failed: {error}", item.item_index));
        batch.set_status(to_batch, EventType::BatchFailed, now);
    }
    Ok(to)
}

/// Cancels every waiting item of a batch (pending at its cursor or in the queue, or waiting
/// for input), skipping rows and queue entries another transaction holds (see the lock order
/// above), recording each with its event. Items running under a range lease run on.
async fn cancel_waiting_items(
    c: &mut Conn,
    t: &mut Touched,
    reason: CancelReason,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let rows: Vec<ItemRow> = skip_locked!(
        items::table
            .filter(items::batch_id.eq(&t.row.id))
            .filter(items::status.eq_any([ItemStatus::Pending.as_str(), ItemStatus::NeedsInput.as_str()]))
            .order(items::item_index.asc())
            .select(ItemRow::as_select())
    )
    .load(c)
    .await?;
    let waiting: Vec<ItemRow> =
        rows.into_iter().filter(|r| !t.row.runs_under_range(&r.status, r.started_at, r.item_index)).collect();
    if waiting.is_empty() {
        return Ok(());
    }
    // Of the items waiting in the queue, only those whose entry this transaction could take.
    let cursor = t.row.cursor();
    let queued: HashSet<i64> = waiting
        .iter()
        .filter(|r| {
            r.status == ItemStatus::Pending.as_str()
                && cursor.waiting(r.started_at.is_some(), r.item_index) != Some(Waiting::AtCursor)
        })
        .map(|r| r.seq)
        .collect();
    // Entries this transaction was about to write are dropped instead.
    let mut taken: HashSet<i64> = HashSet::new();
    t.entries_add.retain(|e| {
        let queued_here = queued.contains(&e.item_seq);
        if queued_here {
            taken.insert(e.item_seq);
        }
        !queued_here
    });
    let stored: Vec<i64> = queued.iter().copied().filter(|seq| !taken.contains(seq)).collect();
    taken.extend(delete_entries(c, stored).await?);
    let mut by_status: HashMap<&'static str, Vec<i64>> = HashMap::new();
    for mut item in waiting {
        if queued.contains(&item.seq) && !taken.contains(&item.seq) {
            continue;
        }
        let from = item.status()?;
        let to = item_sm::cancel(from, reason)?;
        if from == ItemStatus::Pending && !queued.contains(&item.seq) {
            t.row.unclaimed -= 1;
        }
        by_status.entry(from.as_str()).or_default().push(item.seq);
        item.set_status(to, now);
        item.cancel_reason = Some(reason.as_str().to_owned());
        t.move_item(from, to);
        t.event(EventType::ItemCancelled, Some(item.snapshot()), None, None, now);
    }
    for (from, seqs) in by_status {
        for chunk in seqs.chunks(INSERT_CHUNK) {
            diesel::update(items::table.filter(items::seq.eq_any(chunk)).filter(items::status.eq(from)))
                .set((
                    items::status.eq(ItemStatus::Cancelled.as_str()),
                    items::cancel_reason.eq(reason.as_str()),
                    items::completed_at.eq(db_time(now)),
                    items::updated_at.eq(db_time(now)),
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

async fn queue_paused<C>(c: &mut C, queue: &str) -> Result<bool, StoreError>
where
    C: diesel_async::AsyncConnectionCore<Backend = Db> + Send,
{
    Ok(queue_states::table
        .find(queue)
        .select(queue_states::paused)
        .first::<bool>(c)
        .await
        .optional()?
        .unwrap_or(false))
}

/// The narrow rows of these items, locked, by id.
async fn lock_end_rows<'f>(
    c: &mut Conn,
    ids: impl IntoIterator<Item = &'f str>,
) -> Result<HashMap<String, EndRow>, StoreError> {
    let mut ids: Vec<String> = ids.into_iter().map(str::to_owned).collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    ids.sort_unstable();
    ids.dedup();
    let rows = lock_end_rows_by_id(c, ids).await?;
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// These leases, by id (their secrets never change: no lock is needed to check a token).
async fn leases_by_id(c: &mut Conn, ids: Vec<i64>) -> Result<HashMap<i64, LeaseRow>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = leases_of(c, ids).await?;
    Ok(rows.into_iter().map(|l| (l.id, l)).collect())
}

/// A completion written by `complete_fast`.
enum FastEnd {
    /// An item that ran under range lease `lease`. It had never started before, so this was
    /// its first attempt, and nothing wrote its step or message (reporting either takes an
    /// item out of its range).
    Fresh { end: RangeDone, lease: i64 },
    /// An item claimed one by one: its row as the completion returned it.
    Own(CompletedItem),
}

impl FastEnd {
    fn batch_id(&self) -> &str {
        match self {
            FastEnd::Fresh { end, .. } => &end.batch_id,
            FastEnd::Own(done) => &done.batch_id,
        }
    }
}

/// Writes the completions of items whose batch runs on, before anything else is locked: one
/// conditional UPDATE for items of range leases (`complete_ranged`, which checks the lease
/// too) and one for items claimed one by one (`complete_own`). Their conditions are the
/// lease checks, so writing the row is locking it, and an item someone else changed
/// meanwhile is simply not written: its finish takes the general path. Returns what it
/// wrote, by position in `finishes`; an item finished twice in one group is written once,
/// for its first finish. On PostgreSQL it runs beside a claim's reads (`joined!`).
async fn complete_fast(
    c: &mut Piped<'_>,
    finishes: &[Finish],
    now: OffsetDateTime,
) -> Result<HashMap<usize, FastEnd>, StoreError> {
    let mut seen = HashSet::new();
    let mut range = Vec::new();
    let mut own = Vec::new();
    let mut positions: HashMap<&str, usize> = HashMap::new();
    for (pos, f) in finishes.iter().enumerate() {
        let Outcome::Completed { result } = &f.outcome else { continue };
        if !seen.insert(f.item_id.as_str()) {
            continue;
        }
        positions.insert(f.item_id.as_str(), pos);
        match parse_range_token(&f.lease_token) {
            Some((lease, secret, item_index)) => range.push(RangeEnd {
                id: f.item_id.clone(),
                lease,
                secret: secret.to_owned(),
                item_index,
                result: result.clone(),
            }),
            None => own.push(OwnEnd { id: f.item_id.clone(), token: f.lease_token.clone(), result: result.clone() }),
        }
    }
    let mut out = HashMap::with_capacity(positions.len());
    for (end, lease) in complete_ranged(c, range, now).await? {
        if let Some(&pos) = positions.get(end.id.as_str()) {
            out.insert(pos, FastEnd::Fresh { end, lease });
        }
    }
    for done in complete_own(c, own, now).await? {
        if let Some(&pos) = positions.get(done.id.as_str()) {
            out.insert(pos, FastEnd::Own(done));
        }
    }
    Ok(out)
}

/// The `custom_id` of a batch's item, by index.
async fn custom_id_at(c: &mut Conn, batch_id: &str, index: i32) -> Result<Option<String>, StoreError> {
    Ok(items::table
        .filter(items::batch_id.eq(batch_id))
        .filter(items::item_index.eq(index))
        .select(items::custom_id)
        .first::<Option<String>>(c)
        .await
        .optional()?
        .flatten())
}

/// Up to `max_items` queue entries of the request's queue that may be claimed now, in claim
/// order, locked (skipping entries other transactions hold), leaving out those in `taken`.
async fn entry_candidates<C>(
    c: &mut C,
    request: &ClaimRequest,
    taken: &HashSet<i64>,
    now: OffsetDateTime,
) -> Result<Vec<EntryRow>, StoreError>
where
    C: diesel_async::AsyncConnectionCore<Backend = Db> + Send,
{
    // The `blocked` condition is written out, not bound: only then can SQLite tell that the
    // partial index `queue_entries_claim` holds every row asked for, and read it in order.
    let rows: Vec<EntryRow> = skip_locked!(
        queue_entries::table
            .filter(queue_entries::queue.eq(&request.queue))
            .filter(Unblocked)
            .filter(queue_entries::not_before.is_null().or(queue_entries::not_before.le(db_time(now))))
            .filter(diesel::dsl::exists(
                batches::table
                    .filter(batches::id.eq(queue_entries::batch_id))
                    .filter(BatchClaimable)
                    .filter(batches::run_at.is_null().or(batches::run_at.le(db_time(now)))),
            ))
            .order((queue_entries::priority.desc(), queue_entries::batch_seq.asc(), queue_entries::item_index.asc()))
            .limit((request.max_items + taken.len()) as i64)
            .select(EntryRow::as_select())
    )
    .load(c)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|e| !taken.contains(&e.item_seq))
        .take(request.max_items)
        .collect())
}

/// Up to `max_items` batches of the request's queue with items waiting at their cursor, in
/// claim order: (id, seq, priority). Not locked: the claim locks them with every other batch
/// it touches, in id order, and looks again.
async fn range_candidates<C>(
    c: &mut C,
    request: &ClaimRequest,
    now: OffsetDateTime,
) -> Result<Vec<(String, i64, i32)>, StoreError>
where
    C: diesel_async::AsyncConnectionCore<Backend = Db> + Send,
{
    // Written out for SQLite's partial index `batches_claimable`, as above.
    let found: Vec<(String, i64, i32, i64)> = batches::table
        .filter(batches::queue.eq(&request.queue))
        .filter(HasUnclaimed)
        .filter(batches::run_at.is_null().or(batches::run_at.le(db_time(now))))
        .order((batches::priority.desc(), batches::seq.asc()))
        .limit(request.max_items as i64)
        .select((batches::id, batches::seq, batches::priority, batches::unclaimed))
        .load(c)
        .await?;
    // Only as many batches as the claim can take items from, and one more in case one of
    // them changes before it is locked: every candidate is locked, and with a long queue
    // there are `max_items` of them.
    let (mut needed, mut spare) = (request.max_items as i64, 1);
    let mut out = Vec::new();
    for (id, seq, priority, unclaimed) in found {
        if needed <= 0 {
            if spare == 0 {
                break;
            }
            spare -= 1;
        }
        needed -= unclaimed.max(1);
        out.push((id, seq, priority));
    }
    Ok(out)
}

/// Applies finished attempts to their batches (locked in `touched`). A completion that
/// `complete_fast` wrote (`fast`, by position) only moves its batch's counters and writes its
/// event; every other finish is checked against its (locked) narrow row in `rows`, then
/// reads the whole row and goes through `end_attempt`. Returns each finish's result and the
/// whole rows changed and not yet written; `failed_now` gets the batches that failed under
/// `fail_batch` here (their waiting items are cancelled and written already).
#[expect(clippy::too_many_arguments, reason = "one transaction's working state")]
async fn apply_finishes(
    c: &mut Conn,
    finishes: Vec<Finish>,
    mut fast: HashMap<usize, FastEnd>,
    rows: &mut HashMap<String, EndRow>,
    touched: &mut BTreeMap<String, Touched>,
    leases: &HashMap<i64, LeaseRow>,
    failed_now: &mut HashSet<String>,
    max_error_chars: usize,
    now: OffsetDateTime,
) -> Result<(Vec<FinishResult>, Vec<ItemRow>), StoreError> {
    let mut results = Vec::with_capacity(finishes.len());
    // Whole rows changed here and not yet written, by seq.
    let mut unsaved: BTreeMap<i64, ItemRow> = BTreeMap::new();
    for (pos, f) in finishes.into_iter().enumerate() {
        if let Some(done) = fast.remove(&pos) {
            let Some(t) = touched.get_mut(done.batch_id()) else {
                return Err(StoreError::Corrupt(format!("item {} of an unlocked batch", f.item_id)));
            };
            let to = item_sm::complete(ItemStatus::Running)?;
            t.move_item(ItemStatus::Running, to);
            let result = match &f.outcome {
                Outcome::Completed { result } => Some(result),
                _ => None,
            };
            // What the event and a webhook delivery show of the item. A fresh item's custom
            // id is only read when a delivery will carry it.
            let (index, custom_id, step, message, attempts) = match done {
                FastEnd::Fresh { end, lease } => {
                    *t.ranges_end.entry(lease).or_default() += 1;
                    let custom_id = if t.delivers(EventType::ItemCompleted) {
                        custom_id_at(c, &end.batch_id, end.item_index).await?
                    } else {
                        None
                    };
                    (end.item_index, custom_id, None, None, 1)
                }
                FastEnd::Own(done) => {
                    t.leases_end.push(done.seq);
                    (done.item_index, done.custom_id, done.step, done.message, done.attempts)
                }
            };
            let snapshot = ItemSnapshot {
                id: &f.item_id,
                index,
                custom_id: custom_id.as_deref(),
                status: to.as_str(),
                step: step.as_deref(),
                message: message.as_deref(),
                result,
                error: None,
            };
            t.event(EventType::ItemCompleted, Some(snapshot), None, Some(json!({"attempt": attempts})), now);
            t.advance = true;
            t.settle(now)?;
            results.push(FinishResult::Applied(to));
            continue;
        }
        let batch_id = rows.get(&f.item_id).map(|r| r.batch_id.clone()).unwrap_or_default();
        let (Some(row), Some(t)) = (rows.get_mut(&f.item_id), touched.get_mut(&batch_id)) else {
            results.push(FinishResult::LeaseLost);
            continue;
        };
        // `None`: not held; `Some(None)`: held in the item's own row; `Some(Some(l))`: held in
        // range lease `l`.
        let held: Option<Option<&LeaseRow>> = if row.status == ItemStatus::Running.as_str() {
            (row.lease_token.as_deref() == Some(f.lease_token.as_str())).then_some(None)
        } else if t.row.runs_under_range(&row.status, row.started_at, row.item_index) {
            parse_range_token(&f.lease_token)
                .and_then(|(lease, ..)| leases.get(&lease))
                .filter(|l| l.batch_id == row.batch_id && l.holds(row.item_index, &f.lease_token))
                .map(Some)
        } else {
            None
        };
        let Some(lease) = held else {
            let cancelled = row.status == ItemStatus::Cancelled.as_str()
                && row.cancel_reason.as_deref() != Some(CancelReason::Item.as_str());
            results.push(if cancelled { FinishResult::ItemCancelled } else { FinishResult::LeaseLost });
            continue;
        };
        let mut item = match unsaved.remove(&row.seq) {
            Some(item) => item,
            None => items::table.filter(items::seq.eq(row.seq)).select(ItemRow::as_select()).first(c).await?,
        };
        if let Some(lease) = lease {
            t.materialize(&mut item, lease);
        }
        let ending = match f.outcome {
            Outcome::Completed { result } => Ending::Complete(result),
            Outcome::Failed { error, retryable, retry_after, policy } => {
                Ending::Fail { error, retryable, retry_after, policy }
            }
            Outcome::NeedsInput { question } => Ending::AskInput(question),
            Outcome::Cancelled => Ending::Cancel(CancelReason::Batch),
            Outcome::Released => Ending::Release,
        };
        let to = end_attempt(&mut item, t, ending, max_error_chars, now)?;
        row.status = item.status.clone();
        row.started_at = item.started_at;
        unsaved.insert(item.seq, item);
        if fails_batch_now(t) {
            // The cancellation reads the batch's waiting items from the table: what this
            // group changed so far is written first.
            save_items(c, std::mem::take(&mut unsaved).into_values().collect()).await?;
            cancel_waiting_items(c, t, CancelReason::FailBatch, now).await?;
            failed_now.insert(t.row.id.clone());
        }
        results.push(if to == ItemStatus::Cancelled { FinishResult::ItemCancelled } else { FinishResult::Applied(to) });
    }
    Ok((results, unsaved.into_values().collect()))
}

/// What a claim starts from: an entry (an item claimed one by one) or a batch's cursor.
enum Source {
    Entry(EntryRow),
    Cursor(String),
}

/// Where a source comes in claim order: priority (highest first), batch seq, item index.
type ClaimKey = (std::cmp::Reverse<i32>, i64, i32);

/// Claims up to `request.max_items` items, in claim order, from the entries and batches
/// found for it (their batches locked in `touched`). Returns the claimed items and the whole
/// rows changed (items claimed one by one, and those their batch cancelled meanwhile).
#[expect(clippy::too_many_arguments, reason = "one transaction's working state")]
async fn claim_for(
    c: &mut Conn,
    request: &ClaimRequest,
    entries: Vec<EntryRow>,
    entry_rows: &mut HashMap<i64, ItemRow>,
    cursors: Vec<(String, i64, i32)>,
    touched: &mut BTreeMap<String, Touched>,
    failed_now: &HashSet<String>,
    reserved: &mut Vec<i64>,
    at_cursor: &mut Option<AtCursor>,
    now: OffsetDateTime,
) -> Result<(Vec<ClaimedItem>, Vec<ItemRow>), StoreError> {
    // A batch's entries come before the items at its cursor: their indexes are lower.
    let mut sources: Vec<(ClaimKey, Source)> = entries
        .into_iter()
        .map(|e| ((std::cmp::Reverse(e.priority), e.batch_seq, e.item_index), Source::Entry(e)))
        .chain(cursors.into_iter().map(|(id, seq, priority)| {
            ((std::cmp::Reverse(priority), seq, i32::MAX), Source::Cursor(id))
        }))
        .collect();
    sources.sort_by_key(|(key, _)| *key);
    let lease_expires_at = now + request.lease;
    let mut claimed = Vec::new();
    let mut changed = Vec::new();
    for (_, source) in sources {
        if claimed.len() >= request.max_items {
            break;
        }
        match source {
            Source::Entry(entry) => {
                // Items of a batch this group just failed were cancelled with it.
                if failed_now.contains(&entry.batch_id) {
                    continue;
                }
                let Some(t) = touched.get_mut(&entry.batch_id) else { continue };
                let Some(mut item) = entry_rows.remove(&entry.item_seq).filter(|i| i.status == "pending") else {
                    // Its item ended while the entry was held here: drop the entry.
                    t.entries_remove.push(entry.item_seq);
                    continue;
                };
                let batch_status = t.status()?;
                if !t.row.ready(now)? {
                    // The batch changed after the candidates were read.
                    let reason = match batch_status {
                        BatchStatus::Cancelling | BatchStatus::Cancelled => Some(CancelReason::Batch),
                        BatchStatus::Failed => Some(CancelReason::FailBatch),
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        t.leave_pending(&item);
                        let from = item.status()?;
                        let to = item_sm::cancel(from, reason)?;
                        item.set_status(to, now);
                        item.cancel_reason = Some(reason.as_str().to_owned());
                        t.move_item(from, to);
                        t.event(EventType::ItemCancelled, Some(item.snapshot()), None, None, now);
                        changed.push(item);
                        t.settle(now)?;
                    }
                    continue;
                }
                t.leave_pending(&item);
                let from = item.status()?;
                let to = item_sm::start(from)?;
                let ready_at = [Some(item.updated_at), item.next_attempt_at, t.row.run_at]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(item.created_at)
                    .min(now);
                let token = batchd_domain::new_lease_token();
                item.set_status(to, now);
                item.attempts += 1;
                item.lease_owner = Some(request.owner.clone());
                item.lease_token = Some(token.clone());
                item.lease_expires_at = Some(lease_expires_at);
                item.started_at = Some(now);
                t.move_item(from, to);
                t.start(now)?;
                let data = json!({"attempt": item.attempts, "lease_owner": request.owner});
                t.event(EventType::ItemStarted, Some(item.snapshot()), None, Some(data), now);
                t.leases_add.push(NewLeaseRow {
                    batch_id: t.row.id.clone(),
                    queue: t.row.queue.clone(),
                    first_index: item.item_index,
                    last_index: item.item_index,
                    item_seq: Some(item.seq),
                    owner: request.owner.clone(),
                    secret: token.clone(),
                    running: 1,
                    started_at: now,
                    expires_at: lease_expires_at,
                });
                claimed.push(ClaimedItem {
                    lease_token: token,
                    lease_expires_at,
                    id: item.id.clone(),
                    batch_id: item.batch_id.clone(),
                    tenant: item.tenant.clone(),
                    queue: item.queue.clone(),
                    index: item.item_index,
                    custom_id: item.custom_id.clone(),
                    attempt: item.attempts,
                    max_attempts: item.max_attempts,
                    input: item.input.clone(),
                    answer: item.answer.clone(),
                    item_config: object(item.config.clone()),
                    batch_config: object(t.row.config.clone()),
                    session_id: t.row.session_id.clone(),
                    mode: t.row.mode()?,
                    ready_at,
                });
                changed.push(item);
            }
            Source::Cursor(batch_id) => {
                if failed_now.contains(&batch_id) {
                    continue;
                }
                let Some(t) = touched.get_mut(&batch_id) else { continue };
                if !t.row.ready(now)? || t.row.unclaimed <= 0 || t.row.cursor().sequential {
                    continue;
                }
                let want = (request.max_items - claimed.len()).min(t.row.unclaimed as usize);
                let read = at_cursor.take_if(|a| a.batch_id == batch_id);
                claimed.extend(claim_range(c, t, request, want, reserved, read, now).await?);
            }
        }
    }
    Ok((claimed, changed))
}

/// Claims the next `want` pending items at a batch's cursor as one range lease: moves the
/// cursor past them (and past items that ended before it got there), writes their
/// `item.started` events and the lease; their rows are not written. The lease takes an id
/// from `reserved` while there is one, and its row is then written with the transaction's
/// other writes; otherwise it is inserted at once, for its id. Items already read at the
/// cursor (`read`) are taken first, if they were read from where the cursor is.
async fn claim_range(
    c: &mut Conn,
    t: &mut Touched,
    request: &ClaimRequest,
    want: usize,
    reserved: &mut Vec<i64>,
    read: Option<AtCursor>,
    now: OffsetDateTime,
) -> Result<Vec<ClaimedItem>, StoreError> {
    let lease_expires_at = now + request.lease;
    let mut taken: Vec<FreshRow> = Vec::with_capacity(want);
    let mut next = t.row.next_index;
    // Rows read from another cursor than this one would be the wrong items: they are dropped.
    let mut read = read.filter(|a| a.next_index == next).map(|a| a.rows);
    while taken.len() < want {
        let rows = match read.take() {
            Some(rows) => rows,
            None => items_from(c, t.row.id.clone(), next, want - taken.len()).await?,
        };
        if rows.is_empty() {
            tracing::error!(batch = %t.row.id, unclaimed = t.row.unclaimed, found = taken.len(), "fewer items at the claim cursor than counted");
            t.row.unclaimed = taken.len() as i64;
            break;
        }
        for row in rows {
            next = row.item_index + 1;
            // Items that ended before the cursor got to them are passed over.
            if row.status == ItemStatus::Pending.as_str() && row.started_at.is_none() {
                taken.push(row);
                if taken.len() == want {
                    break;
                }
            }
        }
    }
    t.row.next_index = next;
    let (Some(first), Some(last)) = (<[FreshRow]>::first(&taken), <[FreshRow]>::last(&taken)) else {
        return Ok(Vec::new());
    };
    let n = taken.len() as i64;
    let secret = batchd_domain::new_lease_token();
    let lease = NewLeaseRow {
        batch_id: t.row.id.clone(),
        queue: t.row.queue.clone(),
        first_index: first.item_index,
        last_index: last.item_index,
        item_seq: None,
        owner: request.owner.clone(),
        secret,
        running: n as i32,
        started_at: now,
        expires_at: lease_expires_at,
    };
    // The items' tokens name the lease. Under a reserved id its row is written with the
    // transaction's other writes; otherwise it is inserted now, for its id.
    let reserved_id = reserved.pop();
    let lease_id: i64 = match reserved_id {
        Some(id) => id,
        None => {
            InsertRangeLease {
                batch_id: &lease.batch_id,
                queue: &lease.queue,
                first_index: lease.first_index,
                last_index: lease.last_index,
                owner: &lease.owner,
                secret: &lease.secret,
                running: lease.running,
                started_at: now,
                expires_at: lease_expires_at,
                _row: std::marker::PhantomData,
            }
            .get_result(c)
            .await?
        }
    };
    t.row.unclaimed -= n;
    t.move_items(ItemStatus::Pending, ItemStatus::Running, n);
    t.start(now)?;
    let (batch_config, session_id) = (object(t.row.config.clone()), t.row.session_id.clone());
    let tokens = RangeTokens::new(lease_id, &lease.secret);
    if reserved_id.is_some() {
        t.ranges_add.push((lease_id, lease));
    }
    let mut out = Vec::with_capacity(taken.len());
    for row in taken {
        let snapshot = ItemSnapshot {
            id: &row.id,
            index: row.item_index,
            custom_id: row.custom_id.as_deref(),
            status: ItemStatus::Running.as_str(),
            step: None,
            message: None,
            result: None,
            error: None,
        };
        let attempt = row.attempts + 1;
        let data = json!({"attempt": attempt, "lease_owner": request.owner});
        t.event(EventType::ItemStarted, Some(snapshot), None, Some(data), now);
        let ready_at = [row.updated_at].into_iter().chain(t.row.run_at).max().unwrap_or(row.updated_at).min(now);
        out.push(ClaimedItem {
            lease_token: tokens.token(row.item_index),
            lease_expires_at,
            id: row.id,
            batch_id: t.row.id.clone(),
            tenant: row.tenant,
            queue: t.row.queue.clone(),
            index: row.item_index,
            custom_id: row.custom_id,
            attempt,
            max_attempts: row.max_attempts,
            input: row.input,
            answer: row.answer,
            item_config: object(row.config),
            batch_config: batch_config.clone(),
            session_id: session_id.clone(),
            mode: Mode::Parallel,
            ready_at,
        });
    }
    Ok(out)
}

/// Pending items are counted per queue, priority and bucket of this many batch `seq` values
/// (`queue_position_buckets`, from each batch's `pending` counter as `save_batches` writes
/// it); migrations/*/2026-12-04-000004_range_claims divides by the same number.
const POSITION_BUCKET: i64 = 1_024;

/// Each bucket's count is kept in this many rows (`shard`): shard 0 takes the changes of
/// claims and results, which one writer per instance makes; a submit adds its batch to one
/// of the others, by the batch's `seq`. A submit and a claim of the same bucket, or two
/// submits of neighbouring batches, then update different rows: neither waits for the
/// other's commit (migration 2026-12-04-000006_bucket_shards).
const POSITION_SHARDS: i64 = 4;

/// The number of ready items of `queue` that will be claimed before any item of the batch
/// of `priority` and `seq` (claim order: priority DESC, then batch seq, then index), in one
/// statement:
/// - the pending items of the batches ahead: the bucket counts of higher priorities and of
///   earlier buckets of the same priority, plus the `pending` counters of the batches ahead
///   in its own bucket (`batches_pending`, fewer than `POSITION_BUCKET` rows);
/// - minus those of batches ahead that are paused, cancelling or not yet due
///   (`batches_waiting`);
/// - minus the queue entries ahead waiting for a backoff, in batches that may run
///   (`queue_entries_backoff`).
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
    fn new(batch: &'a BatchRow, now: OffsetDateTime) -> Self {
        let bucket = batch.seq.div_euclid(POSITION_BUCKET);
        Self {
            queue: &batch.queue,
            priority: batch.priority,
            seq: batch.seq,
            bucket,
            bucket_start: bucket * POSITION_BUCKET,
            now,
        }
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
        out.push_sql("))) + (SELECT COALESCE(SUM(pending), 0) FROM batches WHERE queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        // The status terms are those of the `batches_pending` predicate, so that the index can
        // serve this; a batch that has ended has no pending items anyway.
        out.push_sql(" AND pending > 0 AND status IN ('pending', 'running', 'paused', 'cancelling') AND priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND seq >= ");
        out.push_bind_param::<BigInt, _>(&self.bucket_start)?;
        out.push_sql(" AND seq < ");
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(") - (SELECT COALESCE(SUM(b.pending), 0) FROM batches AS b WHERE b.queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(
            " AND (b.status IN ('paused', 'cancelling') OR (b.run_at IS NOT NULL AND b.status IN ('pending', 'running'))) \
             AND b.pending > 0 AND (b.status NOT IN ('pending', 'running') OR b.run_at > ",
        );
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(") AND (b.priority > ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" OR (b.priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND b.seq < ");
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql("))) - (SELECT COUNT(*) FROM queue_entries AS e WHERE e.queue = ");
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND e.not_before IS NOT NULL AND e.not_before > ");
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(" AND (e.priority > ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" OR (e.priority = ");
        out.push_bind_param::<Integer, _>(&self.priority)?;
        out.push_sql(" AND e.batch_seq < ");
        out.push_bind_param::<BigInt, _>(&self.seq)?;
        out.push_sql(
            ")) AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = e.batch_id \
             AND b.status IN ('pending', 'running') AND (b.run_at IS NULL OR b.run_at <= ",
        );
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql("))) AS BIGINT)");
        Ok(())
    }
}

/// The ready items of a batch ahead of its item `index`: its queue entries before it that
/// are not waiting for a backoff (blocked later items of a sequential batch count), plus the
/// pending items at its cursor from `from` to `index`. Prepared once per connection, as
/// [`ReadyAhead`].
struct ReadyInBatch<'a> {
    batch_id: &'a str,
    index: i32,
    from: i32,
    now: OffsetDateTime,
}

impl diesel::query_builder::QueryId for ReadyInBatch<'_> {
    type QueryId = ReadyInBatch<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for ReadyInBatch<'_> {
    type SqlType = diesel::sql_types::BigInt;
}

impl diesel::query_builder::QueryFragment<Db> for ReadyInBatch<'_> {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, Db>) -> QueryResult<()> {
        use diesel::sql_types::{Integer, Text};
        out.push_sql("SELECT CAST((SELECT COUNT(*) FROM queue_entries WHERE batch_id = ");
        out.push_bind_param::<Text, _>(self.batch_id)?;
        out.push_sql(" AND item_index < ");
        out.push_bind_param::<Integer, _>(&self.index)?;
        out.push_sql(" AND (not_before IS NULL OR not_before <= ");
        out.push_bind_param::<SqlTimestamp, _>(&self.now)?;
        out.push_sql(")) + (SELECT COUNT(*) FROM items WHERE batch_id = ");
        out.push_bind_param::<Text, _>(self.batch_id)?;
        out.push_sql(" AND item_index >= ");
        out.push_bind_param::<Integer, _>(&self.from)?;
        out.push_sql(" AND item_index < ");
        out.push_bind_param::<Integer, _>(&self.index)?;
        out.push_sql(" AND status = 'pending' AND started_at IS NULL) AS BIGINT)");
        Ok(())
    }
}

/// The ready items of `batch` that will be claimed before its pending item `first`.
async fn ready_in_batch<C>(c: &mut C, batch: &BatchRow, first: &ItemRow, now: OffsetDateTime) -> Result<i64, StoreError>
where
    C: diesel_async::AsyncConnectionCore<Backend = Db> + Send,
{
    let at_cursor = batch.cursor().waiting(first.started_at.is_some(), first.item_index) == Some(Waiting::AtCursor);
    let from = if at_cursor { batch.next_index } else { first.item_index };
    // Most batches have no queue entries, and no item at or after their cursor that ended
    // before it got there: then the count is a subtraction.
    let queued = batch.pending - batch.unclaimed;
    let dense = batch.unclaimed == batch.total - i64::from(batch.next_index);
    if queued == 0 && dense {
        return Ok(i64::from(first.item_index - from));
    }
    Ok(ReadyInBatch { batch_id: &batch.id, index: first.item_index, from, now }.get_result(c).await?)
}

/// Queue positions of the ready pending items among `rows` (shown as they are, after
/// `show_range_running`): 1 + the number of ready items of the same queue that will be
/// claimed before each. Per batch the rows hold every pending item between their first and
/// last: one [`ReadyAhead`] and at most one [`ReadyInBatch`] place the first, whatever the
/// queue holds, and the others follow it.
async fn positions(
    c: &mut Conn,
    rows: &[ItemRow],
    batches: &HashMap<String, BatchRow>,
    now: OffsetDateTime,
) -> Result<HashMap<i64, i64>, StoreError> {
    let mut groups: BTreeMap<&str, Vec<&ItemRow>> = BTreeMap::new();
    for r in rows {
        let Some(batch) = batches.get(&r.batch_id) else { continue };
        let ready = r.status == ItemStatus::Pending.as_str()
            && r.next_attempt_at.is_none_or(|t| t <= now)
            && batch.ready(now)?;
        if ready {
            groups.entry(r.batch_id.as_str()).or_default().push(r);
        }
    }
    let mut paused: HashMap<String, bool> = HashMap::new();
    let mut out = HashMap::new();
    for (batch_id, mut group) in groups {
        let batch = &batches[batch_id];
        let known = paused.get(&batch.queue).copied();
        if known == Some(true) {
            continue;
        }
        group.sort_by_key(|r| r.item_index);
        // Whether the queue is paused and the counts that place the first item go out
        // together (pipelined on PostgreSQL); a paused queue's counts are dropped.
        let (queue_paused, ahead, within) = joined!(c =>
            match known {
                Some(p) => p,
                None => queue_paused(c, &batch.queue).await?,
            },
            ReadyAhead::new(batch, now).get_result::<i64>(c).await?,
            ready_in_batch(c, batch, group[0], now).await?,
        );
        paused.insert(batch.queue.clone(), queue_paused);
        if queue_paused {
            continue;
        }
        for (i, r) in group.iter().enumerate() {
            out.insert(r.seq, 1 + ahead + within + i as i64);
        }
    }
    Ok(out)
}

/// The batch rows of these items, by id.
async fn batches_of(c: &mut Conn, rows: &[ItemRow]) -> Result<HashMap<String, BatchRow>, StoreError> {
    let mut ids: Vec<&str> = rows.iter().map(|r| r.batch_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(INSERT_CHUNK) {
        let found: Vec<BatchRow> =
            batches::table.filter(batches::id.eq_any(chunk)).select(BatchRow::as_select()).load(c).await?;
        out.extend(found.into_iter().map(|b| (b.id.clone(), b)));
    }
    Ok(out)
}

/// Shows the rows that run under a range lease as running, with their lease's times.
async fn show_range_running(
    c: &mut Conn,
    rows: &mut [ItemRow],
    batches: &HashMap<String, BatchRow>,
) -> Result<(), StoreError> {
    let under: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            batches.get(&r.batch_id).is_some_and(|b| b.runs_under_range(&r.status, r.started_at, r.item_index))
        })
        .map(|(i, _)| i)
        .collect();
    if under.is_empty() {
        return Ok(());
    }
    let leases = range_leases(c, under.iter().map(|&i| rows[i].batch_id.clone())).await?;
    for i in under {
        let row = &mut rows[i];
        let lease = covering(&leases, &row.batch_id, row.item_index).cloned();
        row.show_running_under(lease.as_ref());
    }
    Ok(())
}

/// Item records as clients see them: running under a range lease shown as running, and
/// positions of ready pending items.
async fn records(
    c: &mut Conn,
    mut rows: Vec<ItemRow>,
    batches: &HashMap<String, BatchRow>,
    now: OffsetDateTime,
) -> Result<Vec<ItemRecord>, StoreError> {
    show_range_running(c, &mut rows, batches).await?;
    let positions = positions(c, &rows, batches, now).await?;
    rows.into_iter()
        .map(|r| {
            let p = positions.get(&r.seq).copied();
            r.into_record(p)
        })
        .collect()
}

/// A page of a batch's items in index order, one row more than `limit` to tell whether
/// another page follows. `batch` is needed for the pending and running filters only: rows
/// that say `pending` may be running under a range lease, so they ask for the status clients
/// see, which depends on the batch's claim cursor.
fn items_page<'a>(
    batch_id: &'a str,
    status: Option<ItemStatus>,
    batch: Option<&BatchRow>,
    after: Option<i32>,
    limit: i64,
) -> items::BoxedQuery<'a, Db, diesel::dsl::SqlTypeOf<diesel::dsl::AsSelect<ItemRow, Db>>> {
    let mut q = items::table.filter(items::batch_id.eq(batch_id)).select(ItemRow::as_select()).into_boxed();
    let cursor = batch.map(|b| (b.cursor().sequential, b.next_index));
    match (status, cursor) {
        (Some(ItemStatus::Pending), Some((false, cursor))) => {
            q = q.filter(items::status.eq(ItemStatus::Pending.as_str())).filter(
                items::started_at.is_not_null().or(items::item_index.ge(cursor)),
            );
        }
        (Some(ItemStatus::Running), Some((false, cursor))) => {
            let under_range = items::status
                .eq(ItemStatus::Pending.as_str())
                .and(items::started_at.is_null())
                .and(items::item_index.lt(cursor));
            q = q.filter(items::status.eq(ItemStatus::Running.as_str()).or(under_range));
        }
        (Some(s), _) => q = q.filter(items::status.eq(s.as_str())),
        (None, _) => {}
    }
    if let Some(after) = after {
        q = q.filter(items::item_index.gt(after));
    }
    q.order(items::item_index.asc()).limit(limit + 1)
}

async fn find_visible_batch<C>(c: &mut C, scope: Scope<'_>, id: &str) -> Result<BatchRow, StoreError>
where
    C: diesel_async::AsyncConnectionCore<Backend = Db> + Send,
{
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
    async fn write<R: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<(R, Vec<Notice>), StoreError>>
            + Send
            + 'static,
    ) -> Result<R, StoreError> {
        let (result, notices) = self
            .transaction(move |c| {
                Box::pin(async move {
                    let (result, notices) = f(c).await?;
                    Self::notify_in_tx(c, &notices).await?;
                    Ok((result, notices))
                })
            })
            .await?;
        self.after_commit(notices);
        Ok(result)
    }

    /// `write` of a transaction whose last writes are `save_touched(…, last = true)`: they
    /// sent its notices (so they are only published here), and may have committed it.
    async fn write_ending<R: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<((R, Vec<Notice>), Ended), StoreError>>
            + Send
            + 'static,
    ) -> Result<R, StoreError> {
        let (result, notices) = self.transaction_with(f).await?;
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

    /// Locks a visible item and its batch, lets `change` act on them, and saves both. An
    /// item running under a range lease is shown to `change` as running (and refused by
    /// every change there is); one that starts or stops waiting is queued or unqueued.
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
                if t.row.runs_under_range(&item.status, item.started_at, item.item_index) {
                    let leases = range_leases(c, [item.batch_id.clone()]).await?;
                    item.show_running_under(covering(&leases, &item.batch_id, item.item_index));
                    change(&mut item, &mut t, now)?;
                    return Err(StoreError::Corrupt(format!(
                        "item {} was changed while running under a range lease",
                        item.id
                    )));
                }
                let was_pending = item.status == ItemStatus::Pending.as_str();
                change(&mut item, &mut t, now)?;
                match (was_pending, item.status == ItemStatus::Pending.as_str()) {
                    (true, false) => t.leave_pending(&item),
                    (false, true) => t.enter_pending(&item)?,
                    _ => {}
                }
                save_item(c, &item).await?;
                let notices = save_batch(c, &mut t, now).await?;
                let batches = HashMap::from([(t.row.id.clone(), t.row.clone())]);
                let record = records(c, vec![item], &batches, now).await?.remove(0);
                Ok((record, notices))
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
        let sequential = new.mode == Mode::Sequential;
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
            seq: next_batch_seq(c).await?,
            next_index: 0,
            unclaimed: if sequential { 0 } else { total },
        };
        diesel::insert_into(batches::table).values(row.clone()).execute(c).await?;
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
        let mut t = Touched::created(row);
        if sequential {
            // A sequential batch's items are claimed one by one, in order: every one waits in
            // the queue, the first one unblocked.
            let seqs: Vec<(i64, i32)> = items::table
                .filter(items::batch_id.eq(&new.id))
                .select((items::seq, items::item_index))
                .load(c)
                .await?;
            t.entries_add.extend(seqs.into_iter().map(|(item_seq, item_index)| EntryRow {
                item_seq,
                batch_id: new.id.clone(),
                queue: new.queue.clone(),
                priority: new.priority,
                batch_seq: t.row.seq,
                item_index,
                blocked: item_index > 0,
                not_before: None,
            }));
        }
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
        // Shared with the second attempt, not copied: a batch holds up to 10,000 inputs.
        let batch = Arc::new(batch);
        let again = batch.clone();
        let _one_at_a_time = self.insert_turn().await;
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
            q = q.filter(batches::created_at.gt(db_time(after)));
        }
        if let Some(cursor) = &page.cursor {
            let (t, id) = decode_time_cursor(cursor).ok_or_else(bad_cursor)?;
            q = q.filter(batches::created_at.lt(db_time(t)).or(batches::created_at.eq(db_time(t)).and(batches::id.lt(id))));
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
        let c: &mut Conn = &mut conn;
        let after = match page.cursor.as_deref().map(str::parse::<i32>) {
            Some(Ok(after)) => Some(after),
            Some(Err(_)) => {
                // A batch that is not there is the answer, whatever the cursor.
                find_visible_batch(c, scope, batch_id).await?;
                return Err(bad_cursor());
            }
            None => None,
        };
        let limit = page_limit(page);
        // Only the pending and running filters depend on the batch row (its claim cursor);
        // for the others the batch and the page go out together (pipelined on PostgreSQL).
        // Should the batch not be visible, the rows read beside it are dropped.
        let (batch, mut rows) = match status {
            Some(ItemStatus::Pending | ItemStatus::Running) => {
                let batch = find_visible_batch(c, scope, batch_id).await?;
                let q = items_page(batch_id, status, Some(&batch), after, limit);
                let rows: Vec<ItemRow> = q.load(c).await?;
                (batch, rows)
            }
            _ => joined!(c =>
                find_visible_batch(c, scope, batch_id).await?,
                items_page(batch_id, status, None, after, limit).load::<ItemRow>(c).await?,
            ),
        };
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| r.item_index.to_string())
        } else {
            None
        };
        let batches = HashMap::from([(batch.id.clone(), batch)]);
        Ok(Page { rows: records(c, rows, &batches, now).await?, next_cursor })
    }

    async fn list_recent_items(
        &self,
        scope: Scope<'_>,
        since: OffsetDateTime,
        page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        let now = self.now();
        let mut conn = self.read_conn().await?;
        let after = match &page.cursor {
            None => None,
            Some(cursor) => Some(match decode_recent_cursor(cursor)? {
                RecentCursor::At(at) => at,
                RecentCursor::ItemSeq(seq) => item_place(&mut conn, seq).await?,
            }),
        };
        let limit = page_limit(page);
        let mut rows = recent_items(&mut conn, scope, since, after, limit as usize + 1).await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|(r, created_at)| encode_time_cursor(*created_at, &format!("{}.{}", r.batch_id, r.item_index)))
        } else {
            None
        };
        let rows: Vec<ItemRow> = rows.into_iter().map(|(r, _)| r).collect();
        let batches = batches_of(&mut conn, &rows).await?;
        Ok(Page { rows: records(&mut conn, rows, &batches, now).await?, next_cursor })
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
        let rows = vec![row];
        let batches = batches_of(&mut conn, &rows).await?;
        Ok(records(&mut conn, rows, &batches, now).await?.remove(0))
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
        let limit = limit.clamp(1, 1_000);
        // Every run holds at least one event: `limit` runs hold enough.
        let runs: Vec<EventRunRow> = event_runs::table
            .filter(event_runs::batch_id.eq(batch_id))
            .filter(event_runs::last_seq.gt(after))
            .order(event_runs::last_seq.asc())
            .limit(limit as i64)
            .select(EventRunRow::as_select())
            .load(&mut *conn)
            .await?;
        let mut out: Vec<EventRecord> = Vec::with_capacity(limit);
        'runs: for run in runs {
            let events: Vec<EventRow> = serde_json::from_str(&run.events)
                .map_err(|e| StoreError::Corrupt(format!("the event run of batch {} up to {}: {e}", run.batch_id, run.last_seq)))?;
            for e in events {
                let event_type: EventType = e.event_type.parse()?;
                let items = std::iter::once((e.item_id, e.item_index)).chain(e.more.into_iter().map(|i| (None, Some(i))));
                for (seq, (item_id, item_index)) in (e.seq..).zip(items) {
                    if seq <= after {
                        continue;
                    }
                    if out.len() == limit {
                        break 'runs;
                    }
                    out.push(EventRecord {
                        event_type,
                        batch_id: run.batch_id.clone(),
                        seq,
                        item_id,
                        item_index,
                        step: e.step.clone(),
                        message: e.message.clone(),
                        data: e.data.clone(),
                        at: e.at,
                    });
                }
            }
        }
        // The ids of the items whose events were stored together with an earlier item's.
        let mut unnamed: Vec<i32> =
            out.iter().filter(|e| e.item_id.is_none()).filter_map(|e| e.item_index).collect();
        if !unnamed.is_empty() {
            unnamed.sort_unstable();
            unnamed.dedup();
            let mut ids: HashMap<i32, String> = HashMap::with_capacity(unnamed.len());
            for chunk in unnamed.chunks(INSERT_CHUNK) {
                let found: Vec<(i32, String)> = items::table
                    .filter(items::batch_id.eq(batch_id))
                    .filter(items::item_index.eq_any(chunk))
                    .select((items::item_index, items::id))
                    .load(&mut *conn)
                    .await?;
                ids.extend(found);
            }
            for e in out.iter_mut().filter(|e| e.item_id.is_none()) {
                e.item_id = e.item_index.and_then(|i| ids.get(&i).cloned());
            }
        }
        Ok(out)
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedItem>, StoreError> {
        let (_, mut claimed) = self.finish_and_claim(Vec::new(), vec![request.clone()]).await?;
        Ok(claimed.pop().unwrap_or_default())
    }

    async fn renew_lease(&self, item_id: &str, lease_token: &str, lease: Duration) -> Result<LeaseState, StoreError> {
        let now = self.now();
        let expires = now + lease;
        let (id, token) = (item_id.to_owned(), lease_token.to_owned());
        let held = self
            .write(move |c| {
                Box::pin(async move {
                    let row: Option<EndRow> =
                        locked!(items::table.filter(items::id.eq(&id)).select(EndRow::as_select()))
                            .first(c)
                            .await
                            .optional()?;
                    let Some(row) = row else { return Ok((None, Vec::new())) };
                    let held = if row.status == ItemStatus::Running.as_str() {
                        if row.lease_token.as_deref() != Some(token.as_str()) {
                            return Ok((None, Vec::new()));
                        }
                        diesel::update(items::table.filter(items::seq.eq(row.seq)))
                            .set((items::lease_expires_at.eq(db_time(expires)), items::updated_at.eq(db_time(now))))
                            .execute(c)
                            .await?;
                        diesel::update(leases::table.filter(leases::item_seq.eq(row.seq)))
                            .set(leases::expires_at.eq(db_time(expires)))
                            .execute(c)
                            .await?;
                        expires
                    } else if row.status == ItemStatus::Pending.as_str() && row.started_at.is_none() {
                        // Perhaps running under a range lease: renewing it renews the range,
                        // which the same holder runs.
                        let ranges = range_leases(c, [row.batch_id.clone()]).await?;
                        let Some(range) = covering(&ranges, &row.batch_id, row.item_index)
                            .filter(|l| l.holds(row.item_index, &token))
                        else {
                            return Ok((None, Vec::new()));
                        };
                        let until = range.expires_at.max(expires);
                        diesel::update(leases::table.find(range.id))
                            .set(leases::expires_at.eq(db_time(until)))
                            .execute(c)
                            .await?;
                        until
                    } else {
                        return Ok((None, Vec::new()));
                    };
                    let status: String =
                        batches::table.find(&row.batch_id).select(batches::status).first(c).await?;
                    Ok((Some((held, status)), Vec::new()))
                })
            })
            .await?;
        match held {
            Some((expires, status)) => {
                let status: BatchStatus = status.parse()?;
                Ok(if matches!(status, BatchStatus::Cancelling | BatchStatus::Cancelled | BatchStatus::Failed) {
                    LeaseState::Cancelled
                } else {
                    LeaseState::Held(expires)
                })
            }
            None => {
                let mut conn = self.read_conn().await?;
                lease_lost_state(&mut conn, item_id).await
            }
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
                    let batch = lock_batch(c, &item.batch_id).await?.ok_or(StoreError::NotFound)?;
                    let mut t = Touched::new(batch);
                    if t.row.runs_under_range(&item.status, item.started_at, item.item_index) {
                        // Its row is written now: take it out of its range first.
                        let ranges = range_leases(c, [item.batch_id.clone()]).await?;
                        let Some(range) = covering(&ranges, &item.batch_id, item.item_index)
                            .filter(|l| l.holds(item.item_index, &lease_token))
                        else {
                            return Ok((None, Vec::new()));
                        };
                        if matches!(t.status()?, BatchStatus::Cancelling | BatchStatus::Cancelled | BatchStatus::Failed) {
                            return Ok((Some(LeaseState::Cancelled), Vec::new()));
                        }
                        t.materialize(&mut item, range);
                    } else if item.status != ItemStatus::Running.as_str()
                        || item.lease_token.as_deref() != Some(&lease_token)
                    {
                        return Ok((None, Vec::new()));
                    }
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
                    t.event(event_type, Some(item.snapshot()), report.message.clone(), data, now);
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

    fn group_overlap(&self) -> usize {
        GROUP_OVERLAP
    }

    fn group_turn(&self) -> crate::Turn {
        self.turn()
    }

    async fn finish_and_claim_in_turn(
        &self,
        mut turn: crate::Turn,
        finishes: Vec<Finish>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<FinishResult>, Vec<Vec<ClaimedItem>>), StoreError> {
        if finishes.is_empty() && claims.iter().all(|r| r.max_items == 0) {
            return Ok((Vec::new(), claims.iter().map(|_| Vec::new()).collect()));
        }
        if GROUP_OVERLAP == 1 {
            // Write transactions run one at a time here: this one begins once the group before
            // it has ended, so groups keep their turns however their tasks are scheduled.
            turn.after_previous().await?;
        }
        let now = self.now();
        let max_error_chars = self.max_error_chars;
        let (results, claimed, turn) = self
            .write_ending(
                move |c| {
                Box::pin(async move {
                    // First phase (see `crate::order`): the completions write (and so lock)
                    // their own rows, and per claim whether its queue is paused and both kinds
                    // of candidates are read, together (pipelined on PostgreSQL); a paused
                    // queue's are dropped. Candidate queue entries are locked skipping those
                    // other transactions hold.
                    // The completions and the first claim's reads touch different rows, so they
                    // go out together: one round trip where there were three.
                    let none = HashSet::new();
                    let first = <[ClaimRequest]>::first(&claims).filter(|r| r.max_items > 0);
                    let ((), fast, first_paused, first_found, first_cursors, mut reserved) = joined!(c =>
                        // The transaction's `BEGIN`, first of all (`transaction_with`).
                        begin_piped(c).await?,
                        complete_fast(c, &finishes, now).await?,
                        match first {
                            Some(request) => queue_paused(c, &request.queue).await?,
                            None => false,
                        },
                        match first {
                            Some(request) => entry_candidates(c, request, &none, now).await?,
                            None => Vec::new(),
                        },
                        match first {
                            Some(request) => range_candidates(c, request, now).await?,
                            None => Vec::new(),
                        },
                        // Ids for the range leases the claims may make, so that making one
                        // costs no round trip of its own.
                        reserve_lease_ids(c, if first.is_some() { RESERVED_LEASES } else { 0 }).await?,
                    );
                    let mut entries: Vec<Vec<EntryRow>> = Vec::with_capacity(claims.len());
                    let mut cursors = Vec::with_capacity(claims.len());
                    let mut first_reads = Some((first_paused, first_found, first_cursors));
                    for request in &claims {
                        let reads = first_reads.take();
                        if request.max_items == 0 {
                            entries.push(Vec::new());
                            cursors.push(Vec::new());
                            continue;
                        }
                        let (paused, found, at_cursors) = match reads {
                            Some(reads) => reads,
                            None => {
                                let taken: HashSet<i64> = entries.iter().flatten().map(|e| e.item_seq).collect();
                                joined!(c =>
                                    queue_paused(c, &request.queue).await?,
                                    entry_candidates(c, request, &taken, now).await?,
                                    range_candidates(c, request, now).await?,
                                )
                            }
                        };
                        entries.push(if paused { Vec::new() } else { found });
                        cursors.push(if paused { Vec::new() } else { at_cursors });
                    }
                    // Second phase, once the group before has finished its own. Lock order
                    // (see the top of this file): the other finished items' rows and the
                    // claimed entries' items' rows, then every batch row involved, in id order.
                    turn.second_phase().await?;
                    let mut rows = lock_end_rows(
                        c,
                        finishes
                            .iter()
                            .enumerate()
                            .filter(|(pos, _)| !fast.contains_key(pos))
                            .map(|(_, f)| f.item_id.as_str()),
                    )
                    .await?;
                    let entry_seqs: Vec<i64> = entries.iter().flatten().map(|e| e.item_seq).collect();
                    let mut entry_rows: HashMap<i64, ItemRow> = HashMap::with_capacity(entry_seqs.len());
                    for chunk in entry_seqs.chunks(INSERT_CHUNK) {
                        let found: Vec<ItemRow> = locked!(
                            items::table
                                .filter(items::seq.eq_any(chunk))
                                .order(items::seq.asc())
                                .select(ItemRow::as_select())
                        )
                        .load(c)
                        .await?;
                        entry_rows.extend(found.into_iter().map(|r| (r.seq, r)));
                    }
                    // The first claim's first batch at its cursor (when no queue entry comes
                    // before it) is read with the lock: one round trip fewer.
                    let first_cursor = match (<[_]>::first(&claims), <[_]>::first(&entries), <[_]>::first(&cursors)) {
                        (Some(request), Some(entries), Some(cursors)) if entries.is_empty() => {
                            <[_]>::first(cursors).map(|(id, _, _)| (id.clone(), request.max_items))
                        }
                        _ => None,
                    };
                    let (mut touched, mut at_cursor) = lock_batches_at(
                        c,
                        fast.values()
                            .map(|done| done.batch_id().to_owned())
                            .chain(rows.values().map(|r| r.batch_id.clone()))
                            .chain(entries.iter().flatten().map(|e| e.batch_id.clone()))
                            .chain(cursors.iter().flatten().map(|(id, _, _)| id.clone())),
                        first_cursor,
                    )
                    .await?;
                    // The range leases that the other finishes name.
                    let leases = leases_by_id(
                        c,
                        finishes
                            .iter()
                            .enumerate()
                            .filter(|(pos, _)| !fast.contains_key(pos))
                            .filter_map(|(_, f)| Some(parse_range_token(&f.lease_token)?.0))
                            .collect(),
                    )
                    .await?;
                    let mut failed_now = HashSet::new();
                    let (results, mut changed) = apply_finishes(
                        c,
                        finishes,
                        fast,
                        &mut rows,
                        &mut touched,
                        &leases,
                        &mut failed_now,
                        max_error_chars,
                        now,
                    )
                    .await?;
                    let mut claimed_out = Vec::with_capacity(claims.len());
                    for ((request, entries), cursors) in claims.iter().zip(entries).zip(cursors) {
                        let (claimed, items) =
                            claim_for(
                                c,
                                request,
                                entries,
                                &mut entry_rows,
                                cursors,
                                &mut touched,
                                &failed_now,
                                &mut reserved,
                                &mut at_cursor,
                                now,
                            )
                                .await?;
                        claimed_out.push(claimed);
                        changed.extend(items);
                    }
                    // Entries found but not claimed stay; their rows were only locked.
                    save_items(c, changed).await?;
                    // This group commits after the one before it: its last writes may take the
                    // `COMMIT` with them, and the notices go with them too (one round trip for
                    // what were two).
                    turn.after_previous().await?;
                    let (notices, ended) = save_touched(c, touched.values_mut().collect(), now, true).await?;
                    turn.second_phase_done();
                    // The turn ends once this transaction has (it goes back with the answer).
                    Ok((((results, claimed_out, turn), notices), ended))
                })
                },
            )
            .await?;
        drop(turn);
        Ok((results, claimed))
    }

    async fn requeue_expired_leases(&self) -> Result<usize, StoreError> {
        let now = self.now();
        let max_error_chars = self.max_error_chars;
        self.write(move |c| {
            Box::pin(async move {
                // Range leases all of whose items ended are left to expire: they go here.
                DropIdleLeases { now, _row: std::marker::PhantomData }.execute(c).await?;
                // Read without locks first: the lock order puts lease rows last.
                let expired: Vec<LeaseRow> = leases::table
                    .filter(leases::expires_at.lt(db_time(now)))
                    .order(leases::expires_at.asc())
                    .limit(REQUEUE_BATCH)
                    .select(LeaseRow::as_select())
                    .load(c)
                    .await?;
                if expired.is_empty() {
                    return Ok((0, Vec::new()));
                }
                // The items still running under them, locked (skipping those whose worker is
                // recording a result right now).
                let singles: Vec<i64> = expired.iter().filter_map(|l| l.item_seq).collect();
                let mut found: Vec<ItemRow> = Vec::new();
                for chunk in singles.chunks(INSERT_CHUNK) {
                    found.extend(
                        skip_locked!(
                            items::table
                                .filter(items::seq.eq_any(chunk))
                                .filter(items::status.eq(ItemStatus::Running.as_str()))
                                .order(items::seq.asc())
                                .select(ItemRow::as_select())
                        )
                        .load(c)
                        .await?,
                    );
                }
                for range in expired.iter().filter(|l| l.item_seq.is_none()) {
                    found.extend(
                        skip_locked!(
                            items::table
                                .filter(items::batch_id.eq(&range.batch_id))
                                .filter(items::item_index.between(range.first_index, range.last_index))
                                .filter(items::status.eq(ItemStatus::Pending.as_str()))
                                .filter(items::started_at.is_null())
                                .order(items::item_index.asc())
                                .select(ItemRow::as_select())
                        )
                        .load(c)
                        .await?,
                    );
                }
                let mut touched = lock_batches(
                    c,
                    expired.iter().map(|l| l.batch_id.clone()).chain(found.iter().map(|i| i.batch_id.clone())),
                )
                .await?;
                // Renewed meanwhile? Look again with the lease rows locked.
                let ids: Vec<i64> = expired.iter().map(|l| l.id).collect();
                let still: HashMap<i64, LeaseRow> = locked!(
                    leases::table
                        .filter(leases::id.eq_any(ids))
                        .filter(leases::expires_at.lt(db_time(now)))
                        .order(leases::id.asc())
                        .select(LeaseRow::as_select())
                )
                .load(c)
                .await?
                .into_iter()
                .map(|l| (l.id, l))
                .collect();
                let by_item: HashMap<i64, &LeaseRow> =
                    still.values().filter_map(|l| Some((l.item_seq?, l))).collect();
                let mut handled: HashMap<i64, usize> = HashMap::new();
                let mut changed = Vec::new();
                for mut item in found {
                    let Some(t) = touched.get_mut(&item.batch_id) else { continue };
                    let lease = if item.status == ItemStatus::Running.as_str() {
                        by_item.get(&item.seq).copied()
                    } else if t.row.runs_under_range(&item.status, item.started_at, item.item_index) {
                        still.values().find(|l| l.batch_id == item.batch_id && l.covers(item.item_index))
                    } else {
                        None
                    };
                    let Some(lease) = lease else { continue };
                    *handled.entry(lease.id).or_default() += 1;
                    if lease.item_seq.is_none() {
                        t.materialize(&mut item, lease);
                    }
                    end_attempt(&mut item, t, Ending::LeaseExpired, max_error_chars, now)?;
                    changed.push(item);
                    if fails_batch_now(t) {
                        // The cancellation reads the batch's waiting items from the table.
                        save_items(c, std::mem::take(&mut changed)).await?;
                        cancel_waiting_items(c, t, CancelReason::FailBatch, now).await?;
                    }
                }
                // A lease none of whose items runs any more is dropped; one whose items
                // another transaction holds stays for the next round.
                for lease in still.values().filter(|l| !handled.contains_key(&l.id)) {
                    let still_running: i64 = match lease.item_seq {
                        Some(seq) => {
                            items::table
                                .filter(items::seq.eq(seq))
                                .filter(items::status.eq(ItemStatus::Running.as_str()))
                                .count()
                                .get_result(c)
                                .await?
                        }
                        None => {
                            items::table
                                .filter(items::batch_id.eq(&lease.batch_id))
                                .filter(items::item_index.between(lease.first_index, lease.last_index))
                                .filter(items::status.eq(ItemStatus::Pending.as_str()))
                                .filter(items::started_at.is_null())
                                .count()
                                .get_result(c)
                                .await?
                        }
                    };
                    if still_running == 0 {
                        diesel::delete(leases::table.find(lease.id)).execute(c).await?;
                    }
                }
                let n = handled.values().sum::<usize>();
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
                    t.enter_pending(&item)?;
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
            t.event(EventType::ItemCancelled, Some(item.snapshot()), None, None, now);
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
            t.event(EventType::ItemInputReceived, Some(item.snapshot()), None, Some(data), now);
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
                    .values((queue_states::name.eq(&queue), queue_states::paused.eq(paused), queue_states::updated_at.eq(db_time(now))))
                    .on_conflict(queue_states::name)
                    .do_update()
                    .set((queue_states::paused.eq(paused), queue_states::updated_at.eq(db_time(now))))
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
        // The batches' counters hold every item's state, including those running under a
        // range lease (whose rows say `pending`); items share their batch's `created_at`.
        let active: Vec<BatchRow> = batches::table
            .filter(batches::pending.gt(0).or(batches::running.gt(0)).or(batches::needs_input.gt(0)))
            .select(BatchRow::as_select())
            .load(&mut *conn)
            .await?;
        let recent: Vec<(String, i64)> = items::table
            .filter(items::status.eq(ItemStatus::Completed.as_str()))
            .filter(items::completed_at.gt(db_time(now - Duration::from_secs(60))))
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
        for b in active {
            let s = stats_of(&mut out, b.queue.clone());
            s.depth += b.pending;
            s.running += b.running;
            s.needs_input += b.needs_input;
            if b.pending > 0 {
                s.oldest_pending_at = Some(s.oldest_pending_at.map_or(b.created_at, |t| t.min(b.created_at)));
            }
        }
        for (queue, n) in recent {
            stats_of(&mut out, queue).completed_last_minute = n;
        }
        for (queue, p) in paused {
            stats_of(&mut out, queue).paused = p;
        }
        Ok(out.into_values().collect())
    }

    async fn purge_finished(&self, before: OffsetDateTime) -> Result<usize, StoreError> {
        self.write(move |c| {
            Box::pin(async move {
                let ids: Vec<String> = batches::table
                    .filter(batches::completed_at.lt(db_time(before)))
                    .filter(batches::status.eq_any([
                        BatchStatus::Completed.as_str(),
                        BatchStatus::Failed.as_str(),
                        BatchStatus::Cancelled.as_str(),
                    ]))
                    .select(batches::id)
                    .load(c)
                    .await?;
                // Items, events, queue entries and leases go explicitly (PostgreSQL keeps no
                // foreign key on them); webhook deliveries and their attempts go with their
                // batch.
                for chunk in ids.chunks(INSERT_CHUNK) {
                    diesel::delete(event_runs::table.filter(event_runs::batch_id.eq_any(chunk))).execute(c).await?;
                    diesel::delete(queue_entries::table.filter(queue_entries::batch_id.eq_any(chunk)))
                        .execute(c)
                        .await?;
                    diesel::delete(leases::table.filter(leases::batch_id.eq_any(chunk))).execute(c).await?;
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
                        .filter(webhook_deliveries::next_attempt_at.le(db_time(now)))
                        .filter(
                            webhook_deliveries::lease_expires_at
                                .is_null()
                                .or(webhook_deliveries::lease_expires_at.le(db_time(now))),
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
                            webhook_deliveries::lease_expires_at.eq(db_time(lease_expires_at)),
                            webhook_deliveries::updated_at.eq(db_time(now)),
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
                        webhook_deliveries::updated_at.eq(db_time(now)),
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
        .filter(webhook_deliveries::next_attempt_at.le(db_time(now)))
        .filter(
            webhook_deliveries::lease_expires_at
                .is_null()
                .or(webhook_deliveries::lease_expires_at.le(db_time(now))),
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

#[cfg(test)]
mod event_run_tests {
    use super::*;

    fn event(batch: &str, seq: i64, message: &str) -> EventRow {
        EventRow {
            batch_id: batch.to_owned(),
            seq,
            item_id: Some(format!("item-{seq}")),
            item_index: Some(seq as i32),
            more: Vec::new(),
            event_type: EventType::ItemStarted.to_string(),
            step: None,
            message: Some(message.to_owned()),
            data: Some(json!({"attempt": 1})),
            at: OffsetDateTime::from_unix_timestamp_nanos(1_733_283_593_123_456_000).expect("a time"),
        }
    }

    #[test]
    fn runs_hold_consecutive_events_of_one_batch_and_stay_small() {
        let mut events: Vec<EventRow> = (1..=40).map(|seq| event("a", seq, "m")).collect();
        events.push(event("b", 1, "m"));
        events.push(event("b", 3, "m"));
        let runs = event_runs_of(events).expect("runs");
        assert!(runs.iter().all(|r| r.events.len() < EVENT_RUN_BYTES + 200));
        let a: Vec<&EventRunRow> = runs.iter().filter(|r| r.batch_id == "a").collect();
        assert!(a.len() > 1, "40 events do not fit one run");
        assert_eq!(a[0].first_seq, 1);
        assert_eq!(a[a.len() - 1].last_seq, 40);
        assert!(a.windows(2).all(|w| w[0].last_seq + 1 == w[1].first_seq));
        let b: Vec<(i64, i64)> = runs.iter().filter(|r| r.batch_id == "b").map(|r| (r.first_seq, r.last_seq)).collect();
        assert_eq!(b, vec![(1, 1), (3, 3)], "a gap in seq starts a new run");
        let back: Vec<EventRow> = a.iter().flat_map(|r| serde_json::from_str::<Vec<EventRow>>(&r.events).expect("json")).collect();
        assert_eq!(back.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
        assert_eq!(back[0].at, event("a", 1, "m").at, "times keep their microseconds");
        assert_eq!(back[0].message.as_deref(), Some("m"));
    }

    #[test]
    fn like_events_of_consecutive_items_are_stored_as_one() {
        let mut first = event("a", 1, "m");
        first.message = None;
        let (at, data) = (first.at, first.data.clone());
        assert!(first.absorb(2, 7, "item.started", data.as_ref(), at));
        assert!(!first.absorb(4, 8, "item.started", data.as_ref(), at), "a gap in seq");
        assert!(!first.absorb(3, 8, "item.completed", data.as_ref(), at), "another type");
        assert!(!first.absorb(3, 8, "item.started", Some(&json!({"attempt": 2})), at), "other data");
        assert!(!first.absorb(3, 8, "item.started", data.as_ref(), at + Duration::from_secs(1)), "another time");
        assert_eq!((first.more.clone(), first.last_seq()), (vec![7], 2));
        assert!(!event("a", 1, "m").absorb(2, 7, "item.started", data.as_ref(), at), "an event with a message stays whole");

        let runs = event_runs_of(vec![first, event("a", 3, "m")]).expect("runs");
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first_seq, runs[0].last_seq), (1, 3));
        let back: Vec<EventRow> = serde_json::from_str(&runs[0].events).expect("json");
        assert_eq!(back.iter().map(|e| (e.seq, e.more.clone())).collect::<Vec<_>>(), vec![(1, vec![7]), (3, vec![])]);
        assert!(!runs[0].events.contains("\"more\":[]"), "a whole event stores no `more`");
    }

    #[test]
    fn times_moved_from_the_old_sqlite_table_are_read_as_text() {
        let e: EventRow = serde_json::from_str(
            r#"{"seq":1,"item_id":null,"item_index":null,"type":"batch.created","step":null,"message":null,"data":{"total_items":3},"at":"2026-12-04 03:41:20.123456+00:00"}"#,
        )
        .expect("an event");
        assert_eq!(e.at, time::macros::datetime!(2026-12-04 03:41:20.123456 UTC));
        let whole: EventRow = serde_json::from_str(
            r#"{"seq":2,"item_id":null,"item_index":null,"type":"batch.created","step":null,"message":null,"data":null,"at":"2026-12-04 03:41:20+00:00"}"#,
        )
        .expect("an event at a whole second");
        assert_eq!(whole.at, time::macros::datetime!(2026-12-04 03:41:20 UTC));
    }
}

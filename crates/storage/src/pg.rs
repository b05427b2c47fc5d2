//! The PostgreSQL backend: `AsyncPgConnection` in a deadpool pool, claims with
//! `FOR UPDATE SKIP LOCKED`, and notices as `NOTIFY batchd` so every instance sharing the
//! database wakes up.

mod schema;

use std::sync::Arc;

use diesel::connection::TransactionDepthChange;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod};
use diesel_async::{AnsiTransactionManager, AsyncConnection, AsyncPgConnection, TransactionManager};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::notify::{CHANNEL, Notifier};
use crate::{Clock, StoreOptions};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");
const BACKEND: &str = "postgres";
/// Group transactions in flight at once: the next one's completions are written while the
/// one before locks, writes and commits (see `crate::order`).
const GROUP_OVERLAP: usize = 2;
/// Batches this instance inserts at once. New item rows all go to the right edge of the same
/// indexes and to the end of the table, and transactions doing that together wait on each
/// other's page locks and on extending the table: with four at once an item row took
/// 22.5 µs of the server's time, with one 8.3 µs (`pg_stat_statements`). With at most two at
/// once, `batchd bench` on 2 cores submitted 87,000–92,000 items/s and ran 24,500–25,700
/// end to end, against 94,000–102,000 and 21,700–23,800 with no limit, and 69,000 and
/// 24,600–26,300 with one.
const CONCURRENT_INSERTS: usize = 2;

/// Queue entries that may be claimed, in the words of the `queue_entries_claim` index's
/// condition.
const UNBLOCKED: &str = "NOT queue_entries.blocked";

type Conn = AsyncPgConnection;

/// What `joined!` and `pipelined!` hand their expressions: the connection, shared, so that
/// their statements go out together.
type Piped<'a> = &'a Conn;
type Db = diesel::pg::Pg;
/// The SQL type of the times in hand-written SQL.
type SqlTimestamp = diesel::sql_types::Timestamptz;
/// A time as the query builder binds it: itself.
type DbTime = OffsetDateTime;
/// A time or none, as a row written by the query builder binds it: itself.
type DbMaybeTime = Option<OffsetDateTime>;

/// See [`DbTime`].
fn db_time(t: OffsetDateTime) -> DbTime {
    t
}

/// The SQL type of JSON columns in hand-written SQL.
type SqlJson = diesel::sql_types::Jsonb;
type ThisStore = PgStore;

macro_rules! locked {
    ($query:expr) => {
        $query.for_update()
    };
}

macro_rules! skip_locked {
    ($query:expr) => {
        $query.for_update().skip_locked()
    };
}

/// Runs each block as its own future on the same connection, polled together, so their
/// statements are pipelined: sent without waiting for the ones before them to answer.
/// PostgreSQL still runs them one after another, in the order they arrive, which is not
/// always the blocks' order (a statement not yet prepared here waits for its prepare): the
/// blocks must not touch the same rows. Inside each block, `$c` is a connection of its own
/// (`&mut &AsyncPgConnection`).
macro_rules! pipelined {
    ($c:ident => $($block:block)+) => {{
        let shared: &Conn = &*$c;
        tokio::try_join!(biased; $(async {
            let mut own = shared;
            let $c = &mut own;
            $block
            Ok::<(), StoreError>(())
        }),+)?;
    }};
}

/// Runs `$block` once for each item of `$iter`, each as its own future on the same
/// connection, polled together (as `pipelined!`): one round trip for all of them rather than
/// one each. The same caveats hold: the blocks must not touch the same rows.
macro_rules! piped_each {
    ($c:ident, $pat:pat in $iter:expr => $block:block) => {{
        let shared: &Conn = &*$c;
        futures_util::future::try_join_all($iter.into_iter().map(|$pat| async move {
            let mut own = shared;
            let $c = &mut own;
            $block
            Ok::<(), StoreError>(())
        }))
        .await?;
    }};
}

/// Evaluates each expression as its own future on the same connection, polled together (as
/// `pipelined!`), into a tuple of their values.
macro_rules! joined {
    ($c:ident => $($e:expr),+ $(,)?) => {{
        let shared: &Conn = &*$c;
        tokio::try_join!(biased; $(async {
            let mut own = shared;
            let $c = &mut own;
            Ok::<_, StoreError>($e)
        }),+)?
    }};
}

macro_rules! insert_rows {
    ($c:expr, $table:expr, $rows:expr) => {
        diesel::insert_into($table).values($rows).execute($c).await?
    };
}

/// Declares a statement of fixed text whose parameters are bound in order: the struct holds
/// the values, its query id is static, so each connection prepares it once (diesel never
/// caches statements built with `sql_query`, and parsing and planning them each time cost
/// more than running them). `statement!(Name { field: RustType, … } returns SqlType = "text",
/// field => SqlType, "text", …)`; `$field` is bound where it appears.
macro_rules! statement {
    ($name:ident { $($field:ident : $rust:ty),* $(,)? } returns $sql_type:ty =
        $first:literal $(, $bind:ident => $st:ty, $more:literal)* $(,)?) => {
        pub(super) struct $name {
            $(pub(super) $field: $rust),*
        }

        impl diesel::query_builder::QueryId for $name {
            type QueryId = $name;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl diesel::query_builder::Query for $name {
            type SqlType = $sql_type;
        }

        impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for $name {
            fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
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

/// The values of one column of `rows`, as the array a statement binds.
macro_rules! column {
    ($rows:expr, $field:ident) => {
        $rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
    };
}

use statements::*;

/// The fixed statements of the hot path.
mod statements {
    use super::*;
    use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};

    statement!(SaveItems {
        seq: Vec<i64>, status: Vec<String>, blocked: Vec<bool>, attempts: Vec<i32>,
        next_attempt_at: Vec<Option<OffsetDateTime>>, lease_owner: Vec<Option<String>>,
        lease_token: Vec<Option<String>>, lease_expires_at: Vec<Option<OffsetDateTime>>,
        step: Vec<Option<String>>, message: Vec<Option<String>>, progress_current: Vec<Option<i64>>,
        progress_total: Vec<Option<i64>>, result: Vec<Option<Value>>, error: Vec<Option<String>>,
        question: Vec<Option<Value>>, answer: Vec<Option<Value>>, cancel_reason: Vec<Option<String>>,
        started_at: Vec<Option<OffsetDateTime>>, updated_at: Vec<OffsetDateTime>, completed_at: Vec<Option<OffsetDateTime>>,
    } returns () =
        "UPDATE items AS i SET status = v.status, blocked = v.blocked, attempts = v.attempts, \
         next_attempt_at = v.next_attempt_at, lease_owner = v.lease_owner, lease_token = v.lease_token, \
         lease_expires_at = v.lease_expires_at, step = v.step, message = v.message, \
         progress_current = v.progress_current, progress_total = v.progress_total, result = v.result, \
         error = v.error, question = v.question, answer = v.answer, cancel_reason = v.cancel_reason, \
         started_at = v.started_at, updated_at = v.updated_at, completed_at = v.completed_at \
         FROM unnest(", seq => Array<BigInt>, "::bigint[], ", status => Array<Text>, "::text[], ",
        blocked => Array<Bool>, "::bool[], ", attempts => Array<Integer>, "::int[], ",
        next_attempt_at => Array<Nullable<Timestamptz>>, "::timestamptz[], ", lease_owner => Array<Nullable<Text>>, "::text[], ",
        lease_token => Array<Nullable<Text>>, "::text[], ", lease_expires_at => Array<Nullable<Timestamptz>>, "::timestamptz[], ",
        step => Array<Nullable<Text>>, "::text[], ", message => Array<Nullable<Text>>, "::text[], ",
        progress_current => Array<Nullable<BigInt>>, "::bigint[], ", progress_total => Array<Nullable<BigInt>>, "::bigint[], ",
        result => Array<Nullable<Jsonb>>, "::jsonb[], ", error => Array<Nullable<Text>>, "::text[], ",
        question => Array<Nullable<Jsonb>>, "::jsonb[], ", answer => Array<Nullable<Jsonb>>, "::jsonb[], ",
        cancel_reason => Array<Nullable<Text>>, "::text[], ", started_at => Array<Nullable<Timestamptz>>, "::timestamptz[], ",
        updated_at => Array<Timestamptz>, "::timestamptz[], ", completed_at => Array<Nullable<Timestamptz>>,
        "::timestamptz[]) AS v(seq, status, blocked, attempts, next_attempt_at, lease_owner, lease_token, \
         lease_expires_at, step, message, progress_current, progress_total, result, error, question, answer, \
         cancel_reason, started_at, updated_at, completed_at) WHERE i.seq = v.seq"
    );

    // The arrays are unnested in the select list, in lockstep, not in `FROM`: a function in
    // `FROM` is first copied into a tuplestore of its own, column by column, and read back.
    // What every item of the batch shares is bound once.
    statement!(InsertItems {
        id: Vec<String>, batch_id: String, tenant: String, queue: String, priority: i32,
        item_index: Vec<i32>, custom_id: Vec<Option<String>>, input: Vec<Value>, config: Vec<Value>,
        blocked: Vec<bool>, max_attempts: Vec<i32>, now: OffsetDateTime,
    } returns () =
        "INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, custom_id, input, config, status, \
         blocked, attempts, max_attempts, created_at, updated_at) SELECT unnest(",
        id => Array<Text>, "::text[]), ", batch_id => Text, "::text, ", tenant => Text, "::text, ",
        queue => Text, "::text, ", priority => Integer, "::int, unnest(", item_index => Array<Integer>, "::int[]), unnest(",
        custom_id => Array<Nullable<Text>>, "::text[]), unnest(", input => Array<Jsonb>, "::jsonb[]), unnest(",
        config => Array<Jsonb>, "::jsonb[]), 'pending', unnest(", blocked => Array<Bool>, "::bool[]), 0, unnest(",
        max_attempts => Array<Integer>, "::int[]), ", now => Timestamptz, "::timestamptz, ", now => Timestamptz,
        "::timestamptz"
    );

    // `InsertItems` of items with no custom id, config or block of their own, one
    // `max_attempts` and consecutive indexes (most batches' items): only the ids and inputs go
    // as arrays, the rest is bound once or left to the columns' defaults.
    statement!(InsertPlainItems {
        id: Vec<String>, batch_id: String, tenant: String, queue: String, priority: i32,
        first_index: i32, last_index: i32, input: Vec<Value>, max_attempts: i32, now: OffsetDateTime,
    } returns () =
        "INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, input, status, attempts, \
         max_attempts, created_at, updated_at) SELECT unnest(",
        id => Array<Text>, "::text[]), ", batch_id => Text, "::text, ", tenant => Text, "::text, ",
        queue => Text, "::text, ", priority => Integer, "::int, generate_series(", first_index => Integer, "::int, ",
        last_index => Integer, "::int), unnest(", input => Array<Jsonb>, "::jsonb[]), 'pending', 0, ",
        max_attempts => Integer, "::int, ", now => Timestamptz, "::timestamptz, ", now => Timestamptz,
        "::timestamptz"
    );

    statement!(InsertEventRuns {
        batch_id: Vec<String>, first_seq: Vec<i64>, last_seq: Vec<i64>, events: Vec<String>,
    } returns () =
        "INSERT INTO event_runs (batch_id, first_seq, last_seq, events) SELECT * FROM unnest(",
        batch_id => Array<Text>, "::text[], ", first_seq => Array<BigInt>, "::bigint[], ",
        last_seq => Array<BigInt>, "::bigint[], ", events => Array<Text>, "::text[])"
    );

    // The lease check is a join: the completion needs no read of the leases before it, and
    // goes out beside the first claim's reads.
    statement!(CompleteRanged {
        id: Vec<String>, lease: Vec<i64>, secret: Vec<String>, item_index: Vec<i32>, result: Vec<Value>,
        now: OffsetDateTime,
    } returns (BigInt, Text) =
        "UPDATE items AS i SET status = 'completed', attempts = 1, started_at = l.started_at, \
         result = v.result, error = NULL, completed_at = ", now => Timestamptz, "::timestamptz, updated_at = ",
        now => Timestamptz, "::timestamptz FROM unnest(", id => Array<Text>, "::text[], ",
        lease => Array<BigInt>, "::bigint[], ", secret => Array<Text>, "::text[], ",
        item_index => Array<Integer>, "::int[], ", result => Array<Jsonb>,
        "::jsonb[]) WITH ORDINALITY AS v(id, lease, secret, item_index, result, n) \
         JOIN leases AS l ON l.id = v.lease AND l.secret = v.secret AND l.item_seq IS NULL \
         AND v.item_index BETWEEN l.first_index AND l.last_index \
         WHERE i.batch_id = l.batch_id AND i.item_index = v.item_index AND i.id = v.id \
         AND i.status = 'pending' AND i.started_at IS NULL AND i.attempts = 0 \
         AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = i.batch_id AND b.status IN ('pending', 'running', 'paused')) \
         RETURNING v.n, l.batch_id"
    );

    // A run of consecutive items of one range lease: the items are one range of the
    // `(batch_id, item_index)` index, each checked against its own id and given its own
    // result by its place in the run; the lease is read once, and its batch's status once
    // (the subquery names no column of the row, so it runs once per statement).
    statement!(CompleteRun {
        lease: i64, secret: String, first: i32, last: i32, id: Vec<String>, result: Vec<Value>, now: OffsetDateTime,
    } returns (Integer, Text) =
        "UPDATE items AS i SET status = 'completed', attempts = 1, started_at = l.started_at, result = (",
        result => Array<Jsonb>, "::jsonb[])[i.item_index - ", first => Integer, "::int + 1], error = NULL, \
         completed_at = ", now => Timestamptz, "::timestamptz, updated_at = ", now => Timestamptz,
        "::timestamptz FROM leases AS l WHERE l.id = ", lease => BigInt, "::bigint AND l.secret = ", secret => Text,
        "::text AND l.item_seq IS NULL AND l.first_index <= ", first => Integer, "::int AND l.last_index >= ",
        last => Integer, "::int AND i.batch_id = l.batch_id AND i.item_index BETWEEN ", first => Integer,
        "::int AND ", last => Integer, "::int AND i.id = (", id => Array<Text>, "::text[])[i.item_index - ",
        first => Integer, "::int + 1] AND i.status = 'pending' AND i.started_at IS NULL AND i.attempts = 0 \
         AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = (SELECT r.batch_id FROM leases AS r WHERE r.id = ",
        lease => BigInt, "::bigint) AND b.status IN ('pending', 'running', 'paused')) RETURNING i.item_index, l.batch_id"
    );

    statement!(CompleteOwn {
        id: Vec<String>, token: Vec<String>, result: Vec<Value>, now: OffsetDateTime,
    } returns CompletedItemSql =
        "UPDATE items AS i SET status = 'completed', result = v.result, error = NULL, lease_owner = NULL, \
         lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, completed_at = v.now, updated_at = v.now \
         FROM (SELECT *, ", now => Timestamptz, "::timestamptz AS now FROM unnest(", id => Array<Text>, "::text[], ",
        token => Array<Text>, "::text[], ", result => Array<Jsonb>, "::jsonb[]) AS u(id, token, result)) AS v \
         WHERE i.id = ANY(", id => Array<Text>, "::text[]) AND i.id = v.id AND i.status = 'running' \
         AND i.lease_token = v.token \
         AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = i.batch_id AND b.status IN ('pending', 'running', 'paused')) \
         RETURNING i.seq, i.id, i.batch_id, i.item_index, i.custom_id, i.step, i.message, i.attempts"
    );

    statement!(ReserveLeaseIds { n: i32 } returns BigInt =
        "SELECT nextval('leases_id_seq') FROM generate_series(1, ", n => Integer, ")"
    );

    statement!(InsertRangeLeases {
        id: Vec<i64>, batch_id: Vec<String>, queue: Vec<String>, first_index: Vec<i32>, last_index: Vec<i32>,
        owner: Vec<String>, secret: Vec<String>, running: Vec<i32>, started_at: Vec<OffsetDateTime>,
        expires_at: Vec<OffsetDateTime>,
    } returns () =
        "INSERT INTO leases (id, batch_id, queue, first_index, last_index, owner, secret, running, started_at, \
         expires_at) OVERRIDING SYSTEM VALUE SELECT * FROM unnest(", id => Array<BigInt>, "::bigint[], ",
        batch_id => Array<Text>, "::text[], ", queue => Array<Text>, "::text[], ", first_index => Array<Integer>,
        "::int[], ", last_index => Array<Integer>, "::int[], ", owner => Array<Text>, "::text[], ",
        secret => Array<Text>, "::text[], ", running => Array<Integer>, "::int[], ",
        started_at => Array<Timestamptz>, "::timestamptz[], ", expires_at => Array<Timestamptz>, "::timestamptz[])"
    );

    statement!(Begin {} returns () = "BEGIN");

    statement!(Commit {} returns () = "COMMIT");

    statement!(Notify { channel: &'static str, payloads: Vec<String> } returns () =
        "SELECT pg_notify(", channel => Text, ", p) FROM unnest(", payloads => Array<Text>, "::text[]) AS p"
    );

    statement!(DeleteEntries { item_seq: Vec<i64> } returns BigInt =
        "DELETE FROM queue_entries WHERE item_seq IN (SELECT item_seq FROM queue_entries WHERE item_seq = ANY(",
        item_seq => Array<BigInt>, "::bigint[]) FOR UPDATE SKIP LOCKED) RETURNING item_seq"
    );
}

/// Writes changed item rows back in one statement: every changing column goes as an array,
/// and `unnest` turns the arrays back into rows to join on `seq`.
async fn save_items(c: &mut Conn, rows: Vec<ItemRow>) -> Result<Vec<ItemRow>, StoreError> {
    if rows.is_empty() {
        return Ok(rows);
    }
    let statement = SaveItems {
        seq: column!(rows, seq),
        status: column!(rows, status),
        blocked: column!(rows, blocked),
        attempts: column!(rows, attempts),
        next_attempt_at: column!(rows, next_attempt_at),
        lease_owner: column!(rows, lease_owner),
        lease_token: column!(rows, lease_token),
        lease_expires_at: column!(rows, lease_expires_at),
        step: column!(rows, step),
        message: column!(rows, message),
        progress_current: column!(rows, progress_current),
        progress_total: column!(rows, progress_total),
        result: column!(rows, result),
        error: column!(rows, error),
        question: column!(rows, question),
        answer: column!(rows, answer),
        cancel_reason: column!(rows, cancel_reason),
        started_at: column!(rows, started_at),
        updated_at: column!(rows, updated_at),
        completed_at: column!(rows, completed_at),
    };
    let updated = statement.execute(c).await?;
    if updated != rows.len() {
        return Err(StoreError::Corrupt(format!(
            "{updated} of {} item rows were written",
            rows.len()
        )));
    }
    Ok(rows)
}

/// Inserts a batch's new items in one statement, as arrays turned back into rows by
/// `unnest`, in index order (a multi-row insert of a thousand rows is parsed and planned
/// each time). The rows are one batch's, new: what they share is bound once, and a row that
/// does not share it is refused.
async fn insert_items(c: &mut Conn, rows: Vec<NewItemRow>) -> Result<(), StoreError> {
    let Some(first) = <[NewItemRow]>::first(&rows) else {
        return Ok(());
    };
    if let Some(r) = rows.iter().find(|r| !new_item_like(r, first)) {
        return Err(StoreError::Corrupt(format!(
            "item {} of batch {} is not a new item of batch {}",
            r.item_index, r.batch_id, first.batch_id
        )));
    }
    let n = rows.len();
    let plain = rows.iter().zip(first.item_index..).all(|(r, index)| {
        r.item_index == index
            && r.custom_id.is_none()
            && !r.blocked
            && r.max_attempts == first.max_attempts
            && r.config.as_object().is_some_and(serde_json::Map::is_empty)
    });
    if plain {
        let mut s = InsertPlainItems {
            id: Vec::with_capacity(n),
            batch_id: first.batch_id.clone(),
            tenant: first.tenant.clone(),
            queue: first.queue.clone(),
            priority: first.priority,
            first_index: first.item_index,
            last_index: first.item_index + (n as i32 - 1),
            input: Vec::with_capacity(n),
            max_attempts: first.max_attempts,
            now: first.created_at,
        };
        for r in rows {
            s.id.push(r.id);
            s.input.push(r.input);
        }
        return inserted_all(s.execute(c).await?, n);
    }
    let mut s = InsertItems {
        id: Vec::with_capacity(n),
        batch_id: first.batch_id.clone(),
        tenant: first.tenant.clone(),
        queue: first.queue.clone(),
        priority: first.priority,
        item_index: Vec::with_capacity(n),
        custom_id: Vec::with_capacity(n),
        input: Vec::with_capacity(n),
        config: Vec::with_capacity(n),
        blocked: Vec::with_capacity(n),
        max_attempts: Vec::with_capacity(n),
        now: first.created_at,
    };
    for r in rows {
        s.id.push(r.id);
        s.item_index.push(r.item_index);
        s.custom_id.push(r.custom_id);
        s.input.push(r.input);
        s.config.push(r.config);
        s.blocked.push(r.blocked);
        s.max_attempts.push(r.max_attempts);
    }
    inserted_all(s.execute(c).await?, n)
}

/// Whether `r` is a new item of the batch of `first`, sharing what the insert binds once.
fn new_item_like(r: &NewItemRow, first: &NewItemRow) -> bool {
    r.batch_id == first.batch_id
        && r.tenant == first.tenant
        && r.queue == first.queue
        && r.priority == first.priority
        && r.status == ItemStatus::Pending.as_str()
        && r.attempts == 0
        && r.created_at == first.created_at
        && r.updated_at == first.created_at
}

fn inserted_all(inserted: usize, n: usize) -> Result<(), StoreError> {
    if inserted == n {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "{inserted} of {n} item rows were inserted"
        )))
    }
}

/// Inserts event runs in one statement, each column as an array.
async fn insert_event_runs(c: &mut &Conn, runs: Vec<EventRunRow>) -> Result<(), StoreError> {
    if runs.is_empty() {
        return Ok(());
    }
    let n = runs.len();
    let mut s = InsertEventRuns {
        batch_id: Vec::with_capacity(n),
        first_seq: Vec::with_capacity(n),
        last_seq: Vec::with_capacity(n),
        events: Vec::with_capacity(n),
    };
    for r in runs {
        s.batch_id.push(r.batch_id);
        s.first_seq.push(r.first_seq);
        s.last_seq.push(r.last_seq);
        s.events.push(r.events);
    }
    s.execute(c).await?;
    Ok(())
}

/// Runs of at least this many consecutive items of one range lease are completed by
/// `CompleteRun`, one range of the index each; the other ends by `CompleteRanged`, an index
/// probe each. Bare, 256 items took 1.2–2.0 ms one way and 2.5–3.1 ms the other.
const RUN_MIN: usize = 16;

/// Completes items running under range leases, where the lease covers the item and its
/// secret matches and the item's row still says it runs under the range; returns the ends
/// it wrote, each with its lease. Runs of consecutive items of one lease are one statement
/// each, and the rest one statement together, all sent at once.
async fn complete_ranged(
    c: &mut &Conn,
    mut ends: Vec<RangeEnd>,
    now: OffsetDateTime,
) -> Result<Vec<(RangeDone, i64)>, StoreError> {
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    ends.sort_unstable_by(|a, b| (a.lease, &a.secret, a.item_index).cmp(&(b.lease, &b.secret, b.item_index)));
    let mut runs = Vec::new();
    let mut rest = Vec::new();
    let mut start = 0;
    for k in 1..=ends.len() {
        let (a, b) = (&ends[k - 1], ends.get(k));
        if b.is_some_and(|b| b.lease == a.lease && b.secret == a.secret && b.item_index == a.item_index + 1) {
            continue;
        }
        if k - start >= RUN_MIN {
            runs.push(start..k);
        } else {
            rest.extend(start..k);
        }
        start = k;
    }
    // The results go into the statements; the ends keep what the answers are matched with.
    let run_statements: Vec<(usize, CompleteRun)> = runs
        .iter()
        .map(|run| {
            let s = CompleteRun {
                lease: ends[run.start].lease,
                secret: ends[run.start].secret.clone(),
                first: ends[run.start].item_index,
                last: ends[run.end - 1].item_index,
                id: ends[run.clone()].iter().map(|e| e.id.clone()).collect(),
                result: ends[run.clone()]
                    .iter_mut()
                    .map(|e| std::mem::take(&mut e.result))
                    .collect(),
                now,
            };
            (run.start, s)
        })
        .collect();
    let shared: &Conn = c;
    let run_statements = run_statements.into_iter().map(|(base, s)| {
        let (first, len) = (s.first, s.id.len());
        async move {
            let mut own = shared;
            let done: Vec<(i32, String)> = s.load(&mut own).await?;
            // Each row's place in the run is its index's distance from the run's first.
            let written = done.into_iter().filter_map(|(i, batch_id)| {
                let offset = usize::try_from(i - first).ok().filter(|&o| o < len)?;
                Some((base + offset, batch_id))
            });
            Ok::<_, StoreError>(written.collect::<Vec<_>>())
        }
    });
    let mut s = CompleteRanged {
        id: Vec::with_capacity(rest.len()),
        lease: Vec::with_capacity(rest.len()),
        secret: Vec::with_capacity(rest.len()),
        item_index: Vec::with_capacity(rest.len()),
        result: Vec::with_capacity(rest.len()),
        now,
    };
    for &k in &rest {
        let e = &mut ends[k];
        s.id.push(e.id.clone());
        s.lease.push(e.lease);
        s.secret.push(std::mem::take(&mut e.secret));
        s.item_index.push(e.item_index);
        s.result.push(std::mem::take(&mut e.result));
    }
    let singles = async {
        if rest.is_empty() {
            return Ok(Vec::new());
        }
        let mut own = shared;
        // `n` counts from 1, in the order of `rest`.
        let written: Vec<(i64, String)> = s.load(&mut own).await?;
        let written = written
            .into_iter()
            .filter_map(|(n, batch_id)| Some((*rest.get(usize::try_from(n - 1).ok()?)?, batch_id)));
        Ok::<_, StoreError>(written.collect::<Vec<_>>())
    };
    let (singles, runs) = tokio::try_join!(singles, futures_util::future::try_join_all(run_statements))?;
    let mut ends: Vec<Option<RangeEnd>> = ends.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(ends.len());
    for (k, batch_id) in singles.into_iter().chain(runs.into_iter().flatten()) {
        let Some(e) = ends.get_mut(k).and_then(Option::take) else {
            continue;
        };
        out.push((
            RangeDone {
                id: e.id,
                batch_id,
                item_index: e.item_index,
            },
            e.lease,
        ));
    }
    Ok(out)
}

/// `n` new lease ids from the leases' sequence, for range leases whose rows are written
/// later in the transaction (`insert_range_leases`). Ids a transaction does not use are gaps.
async fn reserve_lease_ids(c: &mut &Conn, n: usize) -> Result<Vec<i64>, StoreError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(ReserveLeaseIds { n: n as i32 }.load(c).await?)
}

/// Writes range leases made under reserved ids, in one statement.
async fn insert_range_leases(c: &mut &Conn, rows: Vec<(i64, NewLeaseRow)>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (id, rows): (Vec<i64>, Vec<NewLeaseRow>) = rows.into_iter().unzip();
    let inserted = InsertRangeLeases {
        id,
        batch_id: column!(rows, batch_id),
        queue: column!(rows, queue),
        first_index: column!(rows, first_index),
        last_index: column!(rows, last_index),
        owner: column!(rows, owner),
        secret: column!(rows, secret),
        running: column!(rows, running),
        started_at: column!(rows, started_at),
        expires_at: column!(rows, expires_at),
    }
    .execute(c)
    .await?;
    if inserted != n {
        return Err(StoreError::Corrupt(format!(
            "{inserted} of {n} range leases were inserted"
        )));
    }
    Ok(())
}

/// Completes items claimed one by one, while they still run under these tokens.
async fn complete_own(c: &mut &Conn, rows: Vec<OwnEnd>, now: OffsetDateTime) -> Result<Vec<CompletedItem>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let n = rows.len();
    let mut s = CompleteOwn {
        id: Vec::with_capacity(n),
        token: Vec::with_capacity(n),
        result: Vec::with_capacity(n),
        now,
    };
    for r in rows {
        s.id.push(r.id);
        s.token.push(r.token);
        s.result.push(r.result);
    }
    Ok(s.load(c).await?)
}

/// Deletes the queue entries of these items that no other transaction holds (a claim that
/// holds one drops it itself); returns the items whose entries went.
async fn delete_entries(c: &mut Conn, item_seqs: Vec<i64>) -> Result<Vec<i64>, StoreError> {
    if item_seqs.is_empty() {
        return Ok(item_seqs);
    }
    Ok(DeleteEntries { item_seq: item_seqs }.load(c).await?)
}

/// The narrow rows of these items, locked in `seq` order, in one statement.
async fn lock_end_rows_by_id(c: &mut Conn, ids: Vec<String>) -> Result<Vec<EndRow>, StoreError> {
    Ok(locked!(
        items::table
            .filter(items::id.eq_any(ids))
            .order(items::seq.asc())
            .select(EndRow::as_select())
    )
    .load(c)
    .await?)
}

/// Up to `limit` items of a batch from index `from` on, in index order, as a range claim
/// reads them.
async fn items_from(c: &mut Conn, batch_id: String, from: i32, limit: usize) -> Result<Vec<FreshRow>, StoreError> {
    Ok(items::table
        .filter(items::batch_id.eq(&batch_id))
        .filter(items::item_index.ge(from))
        .order(items::item_index.asc())
        .limit(limit as i64)
        .select(FreshRow::as_select())
        .load(c)
        .await?)
}

/// These lease rows, in one statement.
async fn leases_of(c: &mut Conn, ids: Vec<i64>) -> Result<Vec<LeaseRow>, StoreError> {
    Ok(leases::table
        .filter(leases::id.eq_any(ids))
        .select(LeaseRow::as_select())
        .load(c)
        .await?)
}

/// The `BEGIN` of a `transaction_with`, as the first statement of its first pipeline: it
/// takes the statement cache first, so every statement polled after it is sent after it.
async fn begin_piped(c: &mut Piped<'_>) -> Result<(), StoreError> {
    Begin {}.execute(c).await?;
    Ok(())
}

/// A transaction's last writes can take its `COMMIT` with them (`end_piped`).
const ENDS_IN_PIPELINE: bool = true;

/// The `COMMIT`, as the last statement of a pipeline: a prepared statement like the others,
/// so it waits its turn for the statement cache behind those polled before it and is sent
/// after them (a simple-query `COMMIT` would not wait, and could overtake one still being
/// prepared). PostgreSQL runs a connection's statements in the order they arrive.
async fn end_piped(c: &mut Piped<'_>) -> Result<(), StoreError> {
    Commit {}.execute(c).await?;
    Ok(())
}

/// Sends these notices when the transaction commits, in one statement (which can go out
/// with others, `pipelined!`).
async fn notify_piped(c: &mut Piped<'_>, notices: &[Notice]) -> Result<(), StoreError> {
    if notices.is_empty() {
        return Ok(());
    }
    Notify {
        channel: CHANNEL,
        payloads: notices.iter().map(Notice::encode).collect(),
    }
    .execute(c)
    .await?;
    Ok(())
}

/// These batch rows, locked in id order, in one statement.
async fn lock_batch_rows<C>(c: &mut C, ids: Vec<String>) -> Result<Vec<BatchRow>, StoreError>
where
    C: diesel_async::AsyncConnectionCore<Backend = Db> + Send,
{
    Ok(locked!(
        batches::table
            .filter(batches::id.eq_any(ids))
            .order(batches::id.asc())
            .select(BatchRow::as_select())
    )
    .load(c)
    .await?)
}

/// `lock_batch_rows`, and in the same round trip up to `limit` items at the cursor of the
/// batch `cursor` names, read once its row is locked (see [`AtCursor`]).
async fn lock_batch_rows_and_cursor(
    c: &mut Conn,
    ids: Vec<String>,
    cursor: Option<(String, usize)>,
) -> Result<(Vec<BatchRow>, Option<AtCursor>), StoreError> {
    Ok(joined!(c =>
        lock_batch_rows(c, ids).await?,
        match cursor {
            Some((batch_id, limit)) => items_at_cursor(c, batch_id, limit).await?,
            None => None,
        },
    ))
}

/// Up to `limit` items of a batch from its cursor on, in index order, and the cursor they
/// were read from (`None` if there were none).
async fn items_at_cursor(c: &mut Piped<'_>, batch_id: String, limit: usize) -> Result<Option<AtCursor>, StoreError> {
    let cursor = || {
        batches::table
            .find(batch_id.clone())
            .select(batches::next_index)
            .single_value()
    };
    let rows: Vec<(Option<i32>, FreshRow)> = items::table
        .filter(items::batch_id.eq(&batch_id))
        .filter(items::item_index.nullable().ge(cursor()))
        .order(items::item_index.asc())
        .limit(limit as i64)
        .select((cursor(), FreshRow::as_select()))
        .load(c)
        .await?;
    let Some(next_index) = <[_]>::first(&rows).and_then(|(at, _)| *at) else {
        return Ok(None);
    };
    Ok(Some(AtCursor {
        batch_id,
        next_index,
        rows: rows.into_iter().map(|(_, row)| row).collect(),
    }))
}

/// The `seq` of a new batch: its place in claim order.
async fn next_batch_seq(c: &mut Conn) -> Result<i64, StoreError> {
    Ok(diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "nextval('batches_seq_seq')",
    ))
    .get_result(c)
    .await?)
}

/// A store on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    url: String,
    pool: Pool<AsyncPgConnection>,
    notifier: Notifier,
    clock: Clock,
    max_error_chars: usize,
    listener: Arc<ListenerTask>,
    commit_order: Arc<crate::order::CommitOrder>,
    inserts: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &crate::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// The LISTEN connection's task; stopped when the last clone of the store is dropped.
#[derive(Debug)]
struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgStore {
    /// Connects, applies migrations when asked, and starts listening for notices.
    pub async fn connect(options: StoreOptions) -> Result<Self, StoreError> {
        // No test query on each checkout: a closed connection is seen as broken without one,
        // and the query cost a round trip per transaction.
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = establish_on(tokio::runtime::Handle::current());
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(options.url.clone(), config);
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(2))
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        let notifier = Notifier::new();
        // Listen before anything else happens, so no notice after `connect` is missed.
        let listen_conn = AsyncPgConnection::establish(&options.url).await?;
        let listener = Arc::new(ListenerTask(tokio::spawn(listen(
            options.url.clone(),
            listen_conn,
            notifier.clone(),
        ))));
        let store = Self {
            url: options.url,
            pool,
            notifier,
            clock: options.clock,
            max_error_chars: 1_000,
            listener,
            commit_order: Arc::default(),
            inserts: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_INSERTS)),
        };
        if options.migrate {
            store.run_migrations().await?;
        }
        Ok(store)
    }

    /// The next group transaction's turn.
    fn turn(&self) -> crate::Turn {
        self.commit_order.turn()
    }

    /// Held while a batch's items are inserted (see [`CONCURRENT_INSERTS`]).
    async fn insert_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.inserts.acquire().await.ok()
    }

    async fn read_conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Connection(e.to_string()))
    }

    /// Runs `f` in a transaction on a pooled connection.
    async fn transaction<R: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<R, StoreError>> + Send + 'static,
    ) -> Result<R, StoreError> {
        let mut conn = self.read_conn().await?;
        let conn: &mut Conn = &mut conn;
        conn.transaction(async move |c: &mut Conn| f(c).await).await
    }

    /// `transaction` of an `f` that begins the transaction itself, its first statement
    /// being `begin_piped` (the `BEGIN` then goes out with the statements polled after it,
    /// not in a round trip of its own), and may have ended it (`Ended`): its last
    /// pipeline's last statement was the `COMMIT` (`end_piped`). The transaction manager's
    /// count is kept by hand around them. If `f` fails, the transaction is rolled back
    /// (after a failed `COMMIT` there is none left, and the `ROLLBACK` only warns). A
    /// connection dropped inside a transaction is discarded by the pool.
    async fn transaction_with<R: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<(R, Ended), StoreError>>
        + Send
        + 'static,
    ) -> Result<R, StoreError> {
        let mut conn = self.read_conn().await?;
        let conn: &mut Conn = &mut conn;
        AnsiTransactionManager::transaction_manager_status_mut(conn)
            .transaction_state()?
            .change_transaction_depth(TransactionDepthChange::IncreaseDepth)?;
        match f(conn).await {
            Ok((value, Ended(true))) => {
                AnsiTransactionManager::transaction_manager_status_mut(conn)
                    .transaction_state()?
                    .change_transaction_depth(TransactionDepthChange::DecreaseDepth)?;
                Ok(value)
            }
            Ok((value, Ended(false))) => {
                AnsiTransactionManager::commit_transaction(conn).await?;
                Ok(value)
            }
            Err(e) => {
                if let Err(rollback) = AnsiTransactionManager::rollback_transaction(conn).await {
                    tracing::warn!(error = %rollback, "rollback failed; the connection is dropped");
                }
                Err(e)
            }
        }
    }

    /// Sends the transaction's notices with it, all in one statement.
    async fn notify_in_tx(c: &mut Conn, notices: &[Notice]) -> Result<(), StoreError> {
        notify_piped(&mut &*c, notices).await
    }

    /// The LISTEN connection delivers the committed notices to this process too.
    fn after_commit(&self, _notices: Vec<Notice>) {
        let _ = &self.listener;
    }

    async fn run_migrations(&self) -> Result<usize, StoreError> {
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = <AsyncConnectionWrapper<AsyncPgConnection> as Connection>::establish(&url)
                .map_err(|e| StoreError::Connection(e.to_string()))?;
            conn.run_pending_migrations(MIGRATIONS)
                .map(|v| v.len())
                .map_err(|e| StoreError::Migration(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Migration(e.to_string()))?
    }

    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = <AsyncConnectionWrapper<AsyncPgConnection> as Connection>::establish(&url)
                .map_err(|e| StoreError::Connection(e.to_string()))?;
            conn.pending_migrations(MIGRATIONS)
                .map(|v| v.len())
                .map_err(|e| StoreError::Migration(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Migration(e.to_string()))?
    }
}

/// How the pool opens a connection: on `runtime`, the one the store was opened on. A
/// connection is driven by a task (tokio-postgres's connection future) spawned on the
/// runtime that opened it, and lives only as long as that runtime. The pool opens
/// connections when they are first asked for, and an HTTP handler runs on its actix
/// worker's own runtime: a connection opened there died when the server stopped its
/// workers, under whatever transaction ran on it then, such as the executor's last group
/// commit ("connection closed"; the server rolled the transaction back).
fn establish_on(runtime: tokio::runtime::Handle) -> diesel_async::pooled_connection::SetupCallback<AsyncPgConnection> {
    Box::new(move |url| {
        let url = url.to_owned();
        let opened = runtime.spawn(async move { AsyncPgConnection::establish(&url).await });
        Box::pin(async move {
            opened
                .await
                .map_err(|e| ConnectionError::BadConnection(format!("opening a connection stopped: {e}")))?
        })
    })
}

/// Forwards `NOTIFY batchd` payloads to the local subscribers, reconnecting with backoff.
async fn listen(url: String, first: AsyncPgConnection, notifier: Notifier) {
    let mut conn = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match AsyncPgConnection::establish(&url).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener cannot connect; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        if let Err(e) = diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(&mut c).await {
            tracing::warn!(error = %e, "LISTEN failed; reconnecting");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        // A reconnect may have missed notices: wake every waiter once.
        notifier.publish_resync();
        let mut stream = std::pin::pin!(c.notifications_stream());
        while let Some(n) = stream.next().await {
            match n {
                Ok(n) => {
                    if let Some(notice) = Notice::decode(&n.payload) {
                        notifier.publish([notice]);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener lost its connection; reconnecting");
                    break;
                }
            }
        }
    }
}

include!("common.rs");

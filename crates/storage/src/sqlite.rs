//! The SQLite backend, the embedded default: diesel-async's sync wrapper over
//! `SqliteConnection` (SQLite bundled), WAL mode, one writer connection whose transactions
//! start with `BEGIN IMMEDIATE`, a small pool of readers, and notices through an in-process
//! channel after each commit.

mod micros;
mod schema;

use std::path::PathBuf;
use std::sync::Arc;

use diesel::Connection;
use diesel::connection::AnsiTransactionManager;
use diesel::sqlite::SqliteConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod};
use diesel_async::sync_connection_wrapper::{SpawnBlocking, SyncConnectionWrapper};
use diesel_async::{AsyncConnection, TransactionManager};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use tokio::sync::{Mutex, OwnedMutexGuard};

use self::micros::{MaybeMicros, Micros, UnixMicros};
use crate::notify::Notifier;
use crate::{Clock, StoreOptions};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
const BACKEND: &str = "sqlite";
/// Write transactions run one at a time here: a second group in flight would only wait, and
/// groups run whole in turn order (see `finish_and_claim_in_turn`).
const GROUP_OVERLAP: usize = 1;

/// Queue entries that may be claimed, in the words of the `queue_entries_claim` index's
/// condition.
const UNBLOCKED: &str = "queue_entries.blocked = 0";

type Conn = SyncConnectionWrapper<SqliteConnection, Inline>;

/// What `joined!` hands its expressions: the connection itself, as they run one by one.
type Piped<'a> = Conn;

/// Runs each statement on the thread that asks for it. A write transaction runs whole on a
/// blocking thread (`SqliteStore::transaction`): one trip there per transaction, not one per
/// statement, which cost more than most statements themselves. Reads are short and run where
/// they are asked for.
#[derive(Debug, Clone, Copy, Default)]
struct Inline;

impl SpawnBlocking for Inline {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> futures_util::future::BoxFuture<'a, Result<R, Box<dyn std::error::Error + Send + Sync + 'static>>>
    where
        R: Send + 'static,
    {
        let result = task();
        Box::pin(std::future::ready(Ok(result)))
    }

    fn get_runtime() -> Self {
        Inline
    }
}
type Db = diesel::sqlite::Sqlite;
/// The SQL type of the times in hand-written SQL.
type SqlTimestamp = UnixMicros;
/// A time as the query builder binds it (see [`micros`]).
type DbTime = Micros;
/// A time or none, as a row written by the query builder binds it.
type DbMaybeTime = MaybeMicros;

/// See [`DbTime`].
fn db_time(t: OffsetDateTime) -> DbTime {
    Micros(t)
}

/// The SQL type of JSON columns in hand-written SQL.
type SqlJson = diesel::sql_types::Json;
type ThisStore = SqliteStore;

macro_rules! locked {
    ($query:expr) => {
        $query
    };
}

macro_rules! skip_locked {
    ($query:expr) => {
        $query
    };
}

/// Runs the blocks one after another: SQLite has no pipelining (PostgreSQL's `pipelined!`
/// sends them together).
macro_rules! pipelined {
    ($c:ident => $($block:block)+) => {{
        $($block)+
    }};
}

/// Runs `$block` for each item of `$iter`, one after another (PostgreSQL's `piped_each!`
/// pipelines them).
macro_rules! piped_each {
    ($c:ident, $pat:pat in $iter:expr => $block:block) => {{
        for $pat in $iter $block
    }};
}

/// Evaluates the expressions one after another into a tuple (PostgreSQL's `joined!`
/// pipelines them).
macro_rules! joined {
    ($c:ident => $($e:expr),+ $(,)?) => {
        ($($e),+)
    };
}

/// diesel-async cannot build SQLite's multi-row inserts; the wrapped sync connection can.
macro_rules! insert_rows {
    ($c:expr, $table:expr, $rows:expr) => {{
        let rows = $rows;
        $c.spawn_blocking(move |conn| diesel::RunQueryDsl::execute(diesel::insert_into($table).values(rows), conn))
            .await?
    }};
}

/// A store on one SQLite file.
/// Writes changed item rows back, all in one trip to the blocking pool, with one prepared
/// statement (see [`SaveItem`]).
async fn save_items(c: &mut Conn, rows: Vec<ItemRow>) -> Result<Vec<ItemRow>, StoreError> {
    if rows.is_empty() {
        return Ok(rows);
    }
    let rows = c
        .spawn_blocking(move |conn| {
            for row in &rows {
                diesel::RunQueryDsl::execute(SaveItem(row), conn)?;
            }
            Ok(rows)
        })
        .await?;
    Ok(rows)
}

/// `UPDATE items SET <every column that changes after insert> WHERE seq = ?`. Diesel's own
/// update statements are never kept in its statement cache, so each would be parsed again;
/// this one has a fixed text and a static query id, so SQLite prepares it once per
/// connection.
struct SaveItem<'a>(&'a ItemRow);

impl<Conn> diesel::RunQueryDsl<Conn> for SaveItem<'_> {}

impl diesel::query_builder::QueryId for SaveItem<'_> {
    type QueryId = SaveItem<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for SaveItem<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Bool, Integer, Json, Nullable, Text};
        let row = self.0;
        out.push_sql("UPDATE items SET status = ");
        out.push_bind_param::<Text, _>(&row.status)?;
        out.push_sql(", blocked = ");
        out.push_bind_param::<Bool, _>(&row.blocked)?;
        out.push_sql(", attempts = ");
        out.push_bind_param::<Integer, _>(&row.attempts)?;
        out.push_sql(", next_attempt_at = ");
        out.push_bind_param::<Nullable<UnixMicros>, _>(&row.next_attempt_at)?;
        out.push_sql(", lease_owner = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.lease_owner)?;
        out.push_sql(", lease_token = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.lease_token)?;
        out.push_sql(", lease_expires_at = ");
        out.push_bind_param::<Nullable<UnixMicros>, _>(&row.lease_expires_at)?;
        out.push_sql(", step = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.step)?;
        out.push_sql(", message = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.message)?;
        out.push_sql(", progress_current = ");
        out.push_bind_param::<Nullable<BigInt>, _>(&row.progress_current)?;
        out.push_sql(", progress_total = ");
        out.push_bind_param::<Nullable<BigInt>, _>(&row.progress_total)?;
        out.push_sql(", result = ");
        out.push_bind_param::<Nullable<Json>, _>(&row.result)?;
        out.push_sql(", error = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.error)?;
        out.push_sql(", question = ");
        out.push_bind_param::<Nullable<Json>, _>(&row.question)?;
        out.push_sql(", answer = ");
        out.push_bind_param::<Nullable<Json>, _>(&row.answer)?;
        out.push_sql(", cancel_reason = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.cancel_reason)?;
        out.push_sql(", started_at = ");
        out.push_bind_param::<Nullable<UnixMicros>, _>(&row.started_at)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<UnixMicros, _>(&row.updated_at)?;
        out.push_sql(", completed_at = ");
        out.push_bind_param::<Nullable<UnixMicros>, _>(&row.completed_at)?;
        out.push_sql(" WHERE seq = ");
        out.push_bind_param::<BigInt, _>(&row.seq)?;
        Ok(())
    }
}

/// Inserts a batch's new items, all in one trip, in statements of a few fixed sizes (see
/// [`ItemsInsert`]).
async fn insert_items(c: &mut Conn, rows: Vec<NewItemRow>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    c.spawn_blocking(move |conn| {
        let mut rest = rows.as_slice();
        while !rest.is_empty() {
            rest = match rest.len() {
                64.. => insert_items_first::<64>(conn, rest)?,
                8.. => insert_items_first::<8>(conn, rest)?,
                _ => insert_items_first::<1>(conn, rest)?,
            };
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Inserts the first `N` of `rows`; returns the rest.
fn insert_items_first<'a, const N: usize>(
    conn: &mut SqliteConnection,
    rows: &'a [NewItemRow],
) -> QueryResult<&'a [NewItemRow]> {
    let (head, rest) = rows.split_at(N);
    diesel::RunQueryDsl::execute(ItemsInsert::<N> { rows: head }, conn)?;
    Ok(rest)
}

/// `INSERT INTO items … VALUES (…), …` with exactly `N` rows, as [`FixedInsert`].
struct ItemsInsert<'a, const N: usize> {
    rows: &'a [NewItemRow],
}

impl<Conn, const N: usize> diesel::RunQueryDsl<Conn> for ItemsInsert<'_, N> {}

impl<const N: usize> diesel::query_builder::QueryId for ItemsInsert<'_, N> {
    type QueryId = ItemsInsert<'static, N>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<const N: usize> diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for ItemsInsert<'_, N> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Bool, Integer, Json, Nullable, Text};
        debug_assert_eq!(self.rows.len(), N);
        out.push_sql(
            "INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, custom_id, input, config, \
             status, blocked, attempts, max_attempts, created_at, updated_at) VALUES ",
        );
        for (i, row) in self.rows.iter().enumerate() {
            out.push_sql(if i == 0 { "(" } else { ", (" });
            out.push_bind_param::<Text, _>(&row.id)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&row.batch_id)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&row.tenant)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&row.queue)?;
            out.push_sql(", ");
            out.push_bind_param::<Integer, _>(&row.priority)?;
            out.push_sql(", ");
            out.push_bind_param::<Integer, _>(&row.item_index)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&row.custom_id)?;
            out.push_sql(", ");
            out.push_bind_param::<Json, _>(&row.input)?;
            out.push_sql(", ");
            out.push_bind_param::<Json, _>(&row.config)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&row.status)?;
            out.push_sql(", ");
            out.push_bind_param::<Bool, _>(&row.blocked)?;
            out.push_sql(", ");
            out.push_bind_param::<Integer, _>(&row.attempts)?;
            out.push_sql(", ");
            out.push_bind_param::<Integer, _>(&row.max_attempts)?;
            out.push_sql(", ");
            out.push_bind_param::<UnixMicros, _>(&row.created_at)?;
            out.push_sql(", ");
            out.push_bind_param::<UnixMicros, _>(&row.updated_at)?;
            out.push_sql(")");
        }
        Ok(())
    }
}

/// Inserts event runs the same way.
async fn insert_event_runs(c: &mut Conn, runs: Vec<EventRunRow>) -> Result<(), StoreError> {
    insert_fixed(c, runs).await
}

async fn insert_fixed<R: InsertRow + Send + 'static>(c: &mut Conn, rows: Vec<R>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    c.spawn_blocking(move |conn| {
        let mut rest = rows.as_slice();
        while !rest.is_empty() {
            rest = match rest.len() {
                64.. => insert_first::<R, 64>(conn, rest)?,
                8.. => insert_first::<R, 8>(conn, rest)?,
                _ => insert_first::<R, 1>(conn, rest)?,
            };
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Inserts the first `N` of `rows`; returns the rest.
fn insert_first<'a, R: InsertRow, const N: usize>(conn: &mut SqliteConnection, rows: &'a [R]) -> QueryResult<&'a [R]> {
    let (head, rest) = rows.split_at(N);
    diesel::RunQueryDsl::execute(FixedInsert::<R, N>(head), conn)?;
    Ok(rest)
}

/// A row of a table written through [`FixedInsert`].
trait InsertRow: 'static {
    /// `INSERT INTO table (columns) VALUES `.
    const INTO: &'static str;
    /// Binds the row's values, separated by commas.
    fn push_values<'b>(
        &'b self,
        out: &mut diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()>;
}

/// `INSERT INTO … VALUES (…), …` with exactly `N` rows: a fixed text and a static query id
/// per table and `N`, so SQLite prepares it once per connection. Diesel's own multi-row
/// inserts are prepared again each time, and preparing a thousand rows' statement cost more
/// than running it.
struct FixedInsert<'a, R, const N: usize>(&'a [R]);

impl<Conn, R, const N: usize> diesel::RunQueryDsl<Conn> for FixedInsert<'_, R, N> {}

impl<R: InsertRow, const N: usize> diesel::query_builder::QueryId for FixedInsert<'_, R, N> {
    type QueryId = FixedInsert<'static, R, N>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<R: InsertRow, const N: usize> diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite>
    for FixedInsert<'_, R, N>
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        debug_assert_eq!(self.0.len(), N);
        out.push_sql(R::INTO);
        for (i, row) in self.0.iter().enumerate() {
            out.push_sql(if i == 0 { "(" } else { ", (" });
            row.push_values(&mut out)?;
            out.push_sql(")");
        }
        Ok(())
    }
}

impl InsertRow for EventRunRow {
    const INTO: &'static str = "INSERT INTO event_runs (batch_id, first_seq, last_seq, events) VALUES ";

    fn push_values<'b>(
        &'b self,
        out: &mut diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Text};
        out.push_bind_param::<Text, _>(&self.batch_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.first_seq)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.last_seq)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.events)
    }
}

/// Completions in a run shorter than this are written one by one. A run adds a savepoint, its
/// release and returned rows; the threshold is a choice, not measured against single rows.
const MIN_FRESH_RUN: usize = 4;

/// No lease ids are reserved here: a transaction runs whole on one thread, so inserting a
/// range lease where it is made, for its id, costs no round trip.
async fn reserve_lease_ids(_c: &mut Conn, _n: usize) -> Result<Vec<i64>, StoreError> {
    Ok(Vec::new())
}

/// Range leases made under reserved ids: never here, as none are reserved.
async fn insert_range_leases(_c: &mut Conn, rows: Vec<(i64, NewLeaseRow)>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    Err(StoreError::Corrupt(format!(
        "{} range leases name reserved ids, which SQLite does not reserve",
        rows.len()
    )))
}

/// A completion of an item running under a range lease, as `complete_fresh` writes it: the
/// row must still say `pending`, never started (so no attempt counted yet: `attempts` is 0
/// until an item starts), in the lease's batch. Its attempt is the first.
#[derive(Debug, Clone)]
struct FreshEnd {
    id: String,
    batch_id: String,
    item_index: i32,
    started_at: OffsetDateTime,
    result: Value,
    lease: i64,
}

/// Completes items running under range leases, where the lease covers the item and its
/// secret matches, and the item's row still says it runs under the range (see
/// [`complete_fresh`]); returns the ends it wrote, each with its lease.
async fn complete_ranged(
    c: &mut Conn,
    ends: Vec<RangeEnd>,
    now: OffsetDateTime,
) -> Result<Vec<(RangeDone, i64)>, StoreError> {
    let mut lease_ids: Vec<i64> = ends.iter().map(|e| e.lease).collect();
    lease_ids.sort_unstable();
    lease_ids.dedup();
    let leases = leases_by_id(c, lease_ids).await?;
    let mut fresh = Vec::with_capacity(ends.len());
    for e in ends {
        let Some(lease) = leases
            .get(&e.lease)
            .filter(|l| l.covers(e.item_index) && l.secret == e.secret)
        else {
            continue;
        };
        fresh.push(FreshEnd {
            id: e.id,
            batch_id: lease.batch_id.clone(),
            item_index: e.item_index,
            started_at: lease.started_at,
            result: e.result,
            lease: e.lease,
        });
    }
    Ok(complete_fresh(c, fresh, now)
        .await?
        .into_iter()
        .map(|end| {
            let done = RangeDone {
                id: end.id,
                batch_id: end.batch_id,
                item_index: end.item_index,
            };
            (done, end.lease)
        })
        .collect())
}

/// Completes items running under range leases, while their rows still say so, for the items
/// of batches that run on (write transactions are serialized, so each batch's status is read
/// once, first). A run of consecutive items of one batch that started together and ended
/// with the same result is one statement (see [`CompleteFreshRun`]); any other item is one
/// cached statement (see [`CompleteFresh`]); all in one trip. Returns the ends it wrote.
async fn complete_fresh(
    c: &mut Conn,
    mut rows: Vec<FreshEnd>,
    now: OffsetDateTime,
) -> Result<Vec<FreshEnd>, StoreError> {
    if rows.is_empty() {
        return Ok(rows);
    }
    rows.sort_unstable_by(|a, b| (&a.batch_id, a.item_index).cmp(&(&b.batch_id, b.item_index)));
    Ok(c.spawn_blocking(move |conn| {
        let mut runs_on: HashMap<String, bool> = HashMap::new();
        let mut written = Vec::with_capacity(rows.len());
        let mut rows = rows.into_iter().peekable();
        while let Some(first) = rows.next() {
            let mut run = vec![first];
            while let Some(next) = rows.next_if(|next| run.last().is_some_and(|last| continues(last, next))) {
                run.push(next);
            }
            let batch_id = &run[0].batch_id;
            let batch_runs_on = match runs_on.get(batch_id) {
                Some(&known) => known,
                None => {
                    let known: bool = diesel::RunQueryDsl::get_result(BatchRunsOn { batch_id }, conn)?;
                    runs_on.insert(batch_id.clone(), known);
                    known
                }
            };
            if !batch_runs_on {
                continue;
            }
            // Every item of a run started together.
            let started_at = run[0].started_at;
            if run.len() >= MIN_FRESH_RUN {
                match complete_fresh_run(conn, &run, started_at, now)? {
                    Some(done) => {
                        written.extend(run.into_iter().zip(done).filter_map(|(end, done)| done.then_some(end)));
                        continue;
                    }
                    None => tracing::debug!(batch = %batch_id, "a run of completions names other items; writing them one by one"),
                }
            }
            for end in run {
                let statement = CompleteFresh {
                    end: &end,
                    started_at,
                    now,
                };
                if diesel::RunQueryDsl::execute(statement, conn)? == 1 {
                    written.push(end);
                }
            }
        }
        Ok::<_, diesel::result::Error>(written)
    })
    .await?)
}

/// Whether `next` extends a run that ends with `last`: the next item of the same batch,
/// started at the same time, with the same result.
fn continues(last: &FreshEnd, next: &FreshEnd) -> bool {
    next.batch_id == last.batch_id
        && Some(next.item_index) == last.item_index.checked_add(1)
        && next.started_at == last.started_at
        && next.result == last.result
}

/// Writes a run of completions in one statement, inside a savepoint. Returns, item by item,
/// whether it was written; or `None`, with nothing written, when a row in the run's range
/// has another id than its completion names (it is then written one by one, where such a
/// completion is simply not written).
fn complete_fresh_run(
    conn: &mut SqliteConnection,
    run: &[FreshEnd],
    started_at: OffsetDateTime,
    now: OffsetDateTime,
) -> QueryResult<Option<Vec<bool>>> {
    let first = run[0].item_index;
    let outcome = conn.transaction(|conn| {
        let statement = CompleteFreshRun {
            first: &run[0],
            last_index: first + (run.len() as i32 - 1),
            started_at,
            now,
        };
        let rows: Vec<(i32, String)> = diesel::RunQueryDsl::load(statement, conn)?;
        let mut done = vec![false; run.len()];
        for (index, id) in rows {
            let at = usize::try_from(index - first).ok().filter(|&at| at < run.len());
            match at {
                Some(at) if run[at].id == id => done[at] = true,
                // Undoes the run: the savepoint rolls back.
                _ => return Err(diesel::result::Error::RollbackTransaction),
            }
        }
        Ok(done)
    });
    match outcome {
        Ok(done) => Ok(Some(done)),
        Err(diesel::result::Error::RollbackTransaction) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Completes items claimed one by one, while they still run under these tokens, the same
/// way (see [`CompleteOwn`]).
async fn complete_own(c: &mut Conn, rows: Vec<OwnEnd>, now: OffsetDateTime) -> Result<Vec<CompletedItem>, StoreError> {
    complete_each(c, rows, move |end, conn| {
        diesel::RunQueryDsl::get_result(CompleteOwn { end, now }, conn).optional()
    })
    .await
}

/// Runs `complete` for each row, all in one trip to the connection; returns the items it
/// completed.
async fn complete_each<E, F>(c: &mut Conn, rows: Vec<E>, complete: F) -> Result<Vec<CompletedItem>, StoreError>
where
    E: Send + 'static,
    F: Fn(&E, &mut SqliteConnection) -> QueryResult<Option<CompletedItem>> + Send + 'static,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    Ok(c.spawn_blocking(move |conn| {
        let mut done = Vec::with_capacity(rows.len());
        for end in &rows {
            done.extend(complete(end, conn)?);
        }
        Ok(done)
    })
    .await?)
}

/// Implements a statement of fixed text over one borrowed row: a static query id, so SQLite
/// prepares it once per connection, and the SQL type of what it returns.
macro_rules! row_statement {
    ($name:ident<$row:ty>, $sql_type:ty) => {
        struct $name<'a> {
            end: &'a $row,
            now: OffsetDateTime,
        }

        impl<Conn> diesel::RunQueryDsl<Conn> for $name<'_> {}

        impl diesel::query_builder::QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl diesel::query_builder::Query for $name<'_> {
            type SqlType = $sql_type;
        }
    };
}

/// `UPDATE items SET <its first attempt completed> WHERE <the item, still pending and never
/// started>`: no `RETURNING` (SQLite gathers returned rows in a temporary table per run).
struct CompleteFresh<'a> {
    end: &'a FreshEnd,
    started_at: OffsetDateTime,
    now: OffsetDateTime,
}

impl<Conn> diesel::RunQueryDsl<Conn> for CompleteFresh<'_> {}

impl diesel::query_builder::QueryId for CompleteFresh<'_> {
    type QueryId = CompleteFresh<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for CompleteFresh<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Integer, Text};
        push_first_completion(&mut out, self.end, &self.started_at, &self.now)?;
        out.push_sql(" AND item_index = ");
        out.push_bind_param::<Integer, _>(&self.end.item_index)?;
        out.push_sql(" AND id = ");
        out.push_bind_param::<Text, _>(&self.end.id)?;
        out.push_sql(NEVER_STARTED);
        Ok(())
    }
}

/// `UPDATE items SET <their first attempt completed> WHERE <the items from one index to
/// another of a batch, still pending and never started> RETURNING item_index, id`: a run of
/// completions with one result, found by the `(batch_id, item_index)` index. The ids it
/// returns are checked against the completions (see [`complete_fresh_run`]).
struct CompleteFreshRun<'a> {
    first: &'a FreshEnd,
    last_index: i32,
    started_at: OffsetDateTime,
    now: OffsetDateTime,
}

impl<Conn> diesel::RunQueryDsl<Conn> for CompleteFreshRun<'_> {}

impl diesel::query_builder::QueryId for CompleteFreshRun<'_> {
    type QueryId = CompleteFreshRun<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for CompleteFreshRun<'_> {
    type SqlType = (diesel::sql_types::Integer, diesel::sql_types::Text);
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for CompleteFreshRun<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::Integer;
        push_first_completion(&mut out, self.first, &self.started_at, &self.now)?;
        out.push_sql(" AND item_index BETWEEN ");
        out.push_bind_param::<Integer, _>(&self.first.item_index)?;
        out.push_sql(" AND ");
        out.push_bind_param::<Integer, _>(&self.last_index)?;
        out.push_sql(NEVER_STARTED);
        out.push_sql(" RETURNING item_index, id");
        Ok(())
    }
}

/// `UPDATE items SET <a first attempt completed with end's result> WHERE batch_id = <end's>`,
/// for the conditions that follow.
fn push_first_completion<'b>(
    out: &mut diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    end: &'b FreshEnd,
    started_at: &'b OffsetDateTime,
    now: &'b OffsetDateTime,
) -> QueryResult<()> {
    use diesel::sql_types::{Json, Text};
    out.push_sql("UPDATE items SET status = 'completed', attempts = 1, started_at = ");
    out.push_bind_param::<UnixMicros, _>(started_at)?;
    out.push_sql(", result = ");
    out.push_bind_param::<Json, _>(&end.result)?;
    out.push_sql(", error = NULL, completed_at = ");
    out.push_bind_param::<UnixMicros, _>(now)?;
    out.push_sql(", updated_at = ");
    out.push_bind_param::<UnixMicros, _>(now)?;
    out.push_sql(" WHERE batch_id = ");
    out.push_bind_param::<Text, _>(&end.batch_id)
}

/// The row still says what a range lease leaves it: pending, never started.
const NEVER_STARTED: &str = " AND status = 'pending' AND started_at IS NULL AND attempts = 0";

row_statement!(CompleteOwn<OwnEnd>, CompletedItemSql);

/// Whether batch `b` runs on, so its items' completions are written the quick way: an item
/// of a batch that is cancelling or failed ends the general way. Without an `IN` list
/// (SQLite builds a temporary index for one on every run). Read by [`BatchRunsOn`] once
/// per batch, and part of every [`CompleteOwn`].
macro_rules! batch_runs_on {
    () => {
        "(b.status = 'pending' OR b.status = 'running' OR b.status = 'paused')"
    };
}

/// `SELECT EXISTS (<batch_id's batch runs on>)`: fixed text and a static query id, so the
/// connection prepares it once (diesel never caches a statement built with `sql`).
struct BatchRunsOn<'a> {
    batch_id: &'a str,
}

impl<Conn> diesel::RunQueryDsl<Conn> for BatchRunsOn<'_> {}

impl diesel::query_builder::QueryId for BatchRunsOn<'_> {
    type QueryId = BatchRunsOn<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for BatchRunsOn<'_> {
    type SqlType = diesel::sql_types::Bool;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for BatchRunsOn<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        out.push_sql("SELECT EXISTS (SELECT 1 FROM batches AS b WHERE b.id = ");
        out.push_bind_param::<diesel::sql_types::Text, _>(self.batch_id)?;
        out.push_sql(concat!(" AND ", batch_runs_on!(), ")"));
        Ok(())
    }
}

/// The batch condition of the completions.
const BATCH_RUNS_ON: &str = concat!(
    " AND EXISTS (SELECT 1 FROM batches AS b WHERE b.id = items.batch_id AND ",
    batch_runs_on!(),
    ") RETURNING seq, id, batch_id, item_index, custom_id, step, message, attempts"
);

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for CompleteOwn<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Json, Text};
        out.push_sql("UPDATE items SET status = 'completed', result = ");
        out.push_bind_param::<Json, _>(&self.end.result)?;
        out.push_sql(
            ", error = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, \
             next_attempt_at = NULL, completed_at = ",
        );
        out.push_bind_param::<UnixMicros, _>(&self.now)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<UnixMicros, _>(&self.now)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Text, _>(&self.end.id)?;
        out.push_sql(" AND status = 'running' AND lease_token = ");
        out.push_bind_param::<Text, _>(&self.end.token)?;
        out.push_sql(BATCH_RUNS_ON);
        Ok(())
    }
}

/// Deletes the queue entries of these items; returns the items whose entries went. (Write
/// transactions are serialized here: no other one can hold an entry.)
async fn delete_entries(c: &mut Conn, item_seqs: Vec<i64>) -> Result<Vec<i64>, StoreError> {
    let mut deleted = Vec::with_capacity(item_seqs.len());
    for chunk in item_seqs.chunks(INSERT_CHUNK) {
        deleted.extend(
            diesel::delete(queue_entries::table.filter(queue_entries::item_seq.eq_any(chunk)))
                .returning(queue_entries::item_seq)
                .get_results::<i64>(c)
                .await?,
        );
    }
    Ok(deleted)
}

/// The narrow rows of these items, one cached statement per row, all in one trip (an `IN`
/// list of a hundred ids would be prepared again each time). Write transactions are
/// serialized here, so nothing needs locking.
async fn lock_end_rows_by_id(c: &mut Conn, ids: Vec<String>) -> Result<Vec<EndRow>, StoreError> {
    Ok(c.spawn_blocking(move |conn| {
        let mut rows = Vec::with_capacity(ids.len());
        for id in &ids {
            let row = items::table.filter(items::id.eq(id)).select(EndRow::as_select());
            rows.extend(diesel::RunQueryDsl::first(row, conn).optional()?);
        }
        Ok(rows)
    })
    .await?)
}

/// Up to `limit` items of a batch from index `from` on, in index order, as a range claim
/// reads them: loaded straight from the statement on the connection's thread (a load through
/// the async wrapper copies every row into an owned row first).
async fn items_from(c: &mut Conn, batch_id: String, from: i32, limit: usize) -> Result<Vec<FreshRow>, StoreError> {
    Ok(c.spawn_blocking(move |conn| {
        let query = items::table
            .filter(items::batch_id.eq(&batch_id))
            .filter(items::item_index.ge(from))
            .order(items::item_index.asc())
            .limit(limit as i64)
            .select(FreshRow::as_select());
        diesel::RunQueryDsl::load(query, conn)
    })
    .await?)
}

/// `lock_batch_rows`; the items at a cursor are read when the claim gets to them (`items_from`):
/// there is no round trip to save.
async fn lock_batch_rows_and_cursor(
    c: &mut Conn,
    ids: Vec<String>,
    _cursor: Option<(String, usize)>,
) -> Result<(Vec<BatchRow>, Option<AtCursor>), StoreError> {
    Ok((lock_batch_rows(c, ids).await?, None))
}

/// Nothing: `transaction_with` has begun the transaction (`BEGIN IMMEDIATE`).
async fn begin_piped(_c: &mut Piped<'_>) -> Result<(), StoreError> {
    Ok(())
}

/// A transaction's last writes never take its commit with them here: `transaction` commits.
const ENDS_IN_PIPELINE: bool = false;

/// Never called (`ENDS_IN_PIPELINE`).
async fn end_piped(_c: &mut Piped<'_>) -> Result<(), StoreError> {
    Err(StoreError::Corrupt(
        "SQLite transactions are committed by `transaction`".to_owned(),
    ))
}

/// Nothing to send: SQLite's notices are published after the commit (`after_commit`).
async fn notify_piped(_c: &mut Piped<'_>, _notices: &[Notice]) -> Result<(), StoreError> {
    Ok(())
}

/// These lease rows, the same way.
async fn leases_of(c: &mut Conn, ids: Vec<i64>) -> Result<Vec<LeaseRow>, StoreError> {
    Ok(c.spawn_blocking(move |conn| {
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            let row = leases::table.find(id).select(LeaseRow::as_select());
            rows.extend(diesel::RunQueryDsl::first(row, conn).optional()?);
        }
        Ok(rows)
    })
    .await?)
}

/// These batch rows, the same way.
async fn lock_batch_rows(c: &mut Conn, ids: Vec<String>) -> Result<Vec<BatchRow>, StoreError> {
    Ok(c.spawn_blocking(move |conn| {
        let mut rows = Vec::with_capacity(ids.len());
        for id in &ids {
            let row = batches::table.find(id).select(BatchRow::as_select());
            rows.extend(diesel::RunQueryDsl::first(row, conn).optional()?);
        }
        Ok(rows)
    })
    .await?)
}

/// The `seq` of a new batch: its place in claim order. Write transactions are serialized,
/// so the next number after the largest is free.
async fn next_batch_seq(c: &mut Conn) -> Result<i64, StoreError> {
    let max: Option<i64> = batches::table.select(diesel::dsl::max(batches::seq)).first(c).await?;
    Ok(max.unwrap_or(0) + 1)
}

#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Conn>>,
    readers: Pool<Conn>,
    notifier: Notifier,
    checkpointer: Arc<Checkpointer>,
    commit_order: Arc<crate::order::CommitOrder>,
    clock: Clock,
    max_error_chars: usize,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Per-connection settings: WAL (persistent), full sync so a commit survives power loss,
/// foreign keys on, a busy timeout as a backstop behind the single writer, and checkpoints
/// left to the [`Checkpointer`] (a commit checkpoints by itself only once the WAL has grown
/// past [`CHECKPOINT_BACKSTOP`], should the checkpointer fall that far behind).
fn configure(conn: &mut SqliteConnection) -> QueryResult<()> {
    for pragma in [
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = FULL",
        "PRAGMA foreign_keys = ON",
        "PRAGMA busy_timeout = 10000",
        CHECKPOINT_BACKSTOP,
    ] {
        diesel::RunQueryDsl::execute(diesel::sql_query(pragma), conn)?;
    }
    Ok(())
}

/// See [`configure`]: 16,384 pages of 4 KiB, 64 MiB of WAL.
const CHECKPOINT_BACKSTOP: &str = "PRAGMA wal_autocheckpoint = 16384";

/// How long the checkpointer lets commits gather before it copies them into the database.
const CHECKPOINT_DELAY: Duration = Duration::from_millis(50);

/// Copies committed pages from the WAL back into the database file on a connection of its
/// own, woken after commits, so that work (and its fsync of the database file) is not done
/// by the writer while it holds the write lock, as SQLite's automatic checkpoints do. A
/// passive checkpoint never waits for readers or the writer; whatever it cannot copy yet,
/// the next one does. Stopped when the last clone of the store is dropped.
#[derive(Debug)]
struct Checkpointer {
    wake: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: String) -> Self {
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(checkpoint_after_commits(path, wake.clone()));
        Self { wake, task }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn checkpoint_after_commits(path: String, wake: Arc<tokio::sync::Notify>) {
    let mut conn: Option<SqliteConnection> = None;
    loop {
        wake.notified().await;
        tokio::time::sleep(CHECKPOINT_DELAY).await;
        let (open_conn, path) = (conn.take(), path.clone());
        let done = tokio::task::spawn_blocking(move || {
            let mut c = match open_conn {
                Some(c) => c,
                None => open(&path)?,
            };
            diesel::connection::SimpleConnection::batch_execute(&mut c, "PRAGMA wal_checkpoint(PASSIVE)")?;
            Ok::<_, StoreError>(c)
        })
        .await;
        match done {
            Ok(Ok(c)) => conn = Some(c),
            Ok(Err(e)) => tracing::warn!(error = %e, "a WAL checkpoint failed; the next commit retries it"),
            Err(e) => tracing::warn!(error = %e, "the WAL checkpoint task stopped"),
        }
    }
}

fn open(path: &str) -> Result<SqliteConnection, StoreError> {
    let mut conn = SqliteConnection::establish(path)?;
    configure(&mut conn)?;
    Ok(conn)
}

/// `sqlite://file.db` is relative to the working directory, `sqlite:///abs/file.db` absolute.
fn path_of(url: &str) -> Result<PathBuf, StoreError> {
    let path = url
        .strip_prefix("sqlite://")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| StoreError::Config(format!("`{url}` is not a sqlite://FILE URL")))?;
    Ok(PathBuf::from(path))
}

impl SqliteStore {
    /// Opens (creating) the file, applies migrations when asked.
    pub async fn connect(options: StoreOptions) -> Result<Self, StoreError> {
        let path = path_of(&options.url)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Connection(format!("{}: {e}", dir.display())))?;
        }
        let path_str = path.to_string_lossy().into_owned();
        let writer = {
            let p = path_str.clone();
            tokio::task::spawn_blocking(move || open(&p))
                .await
                .map_err(|e| StoreError::Connection(e.to_string()))??
        };
        let mut config = ManagerConfig::default();
        // No test query on each checkout (see `PgStore::connect`).
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = Box::new(|url| {
            let url = url.to_owned();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let mut conn = SqliteConnection::establish(&url)?;
                    configure(&mut conn).map_err(ConnectionError::CouldntSetupConfiguration)?;
                    Ok(SyncConnectionWrapper::new(conn))
                })
                .await
                .map_err(|e| ConnectionError::BadConnection(e.to_string()))?
            })
        });
        let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(path_str.clone(), config);
        let readers = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        let store = Self {
            path,
            writer: Arc::new(Mutex::new(SyncConnectionWrapper::new(writer))),
            readers,
            notifier: Notifier::new(),
            checkpointer: Arc::new(Checkpointer::start(path_str.clone())),
            commit_order: Arc::default(),
            clock: options.clock,
            max_error_chars: 1_000,
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

    /// Inserting a batch's items needs no turn of its own: the one writer inserts one batch
    /// at a time anyway.
    async fn insert_turn(&self) {}

    async fn read_conn(&self) -> Result<Object<Conn>, StoreError> {
        self.readers
            .get()
            .await
            .map_err(|e| StoreError::Connection(e.to_string()))
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) on the one writer, whole on a
    /// blocking thread: its statements run inline there (see [`Inline`]). Once begun, it
    /// runs to its end even if the caller stops waiting.
    /// `transaction` of an `f` that calls `begin_piped` first (nothing here: this begins the
    /// transaction) and may say it ended the transaction; on SQLite none does
    /// (`ENDS_IN_PIPELINE`).
    async fn transaction_with<R: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<(R, Ended), StoreError>>
        + Send
        + 'static,
    ) -> Result<R, StoreError> {
        self.transaction(move |c| {
            Box::pin(async move {
                let (value, Ended(ended)) = f(c).await?;
                debug_assert!(!ended, "SQLite transactions are committed by `transaction`");
                Ok(value)
            })
        })
        .await
    }

    async fn transaction<R: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Conn) -> futures_util::future::BoxFuture<'c, Result<R, StoreError>> + Send + 'static,
    ) -> Result<R, StoreError> {
        let mut conn = self.write_conn().await?;
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let conn: &mut Conn = &mut conn;
            runtime.block_on(async move {
                conn.spawn_blocking(|c| AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE"))
                    .await?;
                match f(&mut *conn).await {
                    Ok(value) => {
                        <Conn as AsyncConnection>::TransactionManager::commit_transaction(conn).await?;
                        Ok(value)
                    }
                    Err(e) => {
                        <Conn as AsyncConnection>::TransactionManager::rollback_transaction(conn).await?;
                        Err(e)
                    }
                }
            })
        })
        .await
        .map_err(|e| StoreError::Connection(format!("the write transaction stopped: {e}")))?
    }

    /// The one writer. A transaction left open (by a write that failed to roll back) is
    /// rolled back before the next one begins.
    async fn write_conn(&self) -> Result<OwnedMutexGuard<Conn>, StoreError> {
        let mut conn = self.writer.clone().lock_owned().await;
        let open = <Conn as AsyncConnection>::TransactionManager::transaction_manager_status_mut(&mut *conn)
            .transaction_depth()
            .map_err(StoreError::Database)?
            .is_some();
        if open {
            tracing::warn!("rolling back a write transaction left open by a cancelled request");
            <Conn as AsyncConnection>::TransactionManager::rollback_transaction(&mut *conn).await?;
        }
        Ok(conn)
    }

    async fn notify_in_tx(_c: &mut Conn, _notices: &[Notice]) -> Result<(), StoreError> {
        Ok(())
    }

    fn after_commit(&self, notices: Vec<Notice>) {
        self.notifier.publish(notices);
        self.checkpointer.wake.notify_one();
    }

    async fn run_migrations(&self) -> Result<usize, StoreError> {
        let path = self.path.to_string_lossy().into_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = open(&path)?;
            conn.run_pending_migrations(MIGRATIONS)
                .map(|v| v.len())
                .map_err(|e| StoreError::Migration(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Migration(e.to_string()))?
    }

    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        let path = self.path.to_string_lossy().into_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = open(&path)?;
            conn.pending_migrations(MIGRATIONS)
                .map(|v| v.len())
                .map_err(|e| StoreError::Migration(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Migration(e.to_string()))?
    }
}

include!("common.rs");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_stored_as_integer_microseconds() {
        use diesel::sql_types::BigInt;
        let mut conn = SqliteConnection::establish(":memory:").expect("an in-memory database");
        diesel::connection::SimpleConnection::batch_execute(&mut conn, "CREATE TABLE t (at TIMESTAMP)")
            .expect("create a table");
        let t = time::macros::datetime!(2026-12-06 05:00:00.123456 +01:00);
        diesel::RunQueryDsl::execute(
            diesel::sql_query("INSERT INTO t VALUES (?)").bind::<UnixMicros, _>(t),
            &mut conn,
        )
        .expect("store a time");
        let stored: i64 = diesel::RunQueryDsl::get_result(
            diesel::select(diesel::dsl::sql::<BigInt>("(SELECT at FROM t)")),
            &mut conn,
        )
        .expect("read the stored integer");
        assert_eq!(stored, 1_796_529_600_123_456);
        let read: OffsetDateTime = diesel::RunQueryDsl::get_result(
            diesel::select(diesel::dsl::sql::<UnixMicros>("(SELECT at FROM t)")),
            &mut conn,
        )
        .expect("read the stored time");
        assert_eq!(read, t);
    }
}

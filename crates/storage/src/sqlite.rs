//! The SQLite backend, the embedded default: diesel-async's sync wrapper over
//! `SqliteConnection` (SQLite bundled), WAL mode, one writer connection whose transactions
//! start with `BEGIN IMMEDIATE`, a small pool of readers, and notices through an in-process
//! channel after each commit.

mod schema;

use std::path::PathBuf;

use diesel::Connection;
use diesel::sqlite::SqliteConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, TransactionManager};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use tokio::sync::{Mutex, MutexGuard};

use crate::notify::Notifier;
use crate::{Clock, StoreOptions};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
const BACKEND: &str = "sqlite";

/// Claimable items, in the words of the `items_claimable` index's condition.
const CLAIMABLE: &str = "items.status = 'pending' AND items.blocked = 0";

type Conn = SyncConnectionWrapper<SqliteConnection>;
type Db = diesel::sqlite::Sqlite;
/// The SQL type of the times in hand-written SQL.
type SqlTimestamp = diesel::sql_types::TimestamptzSqlite;
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

/// diesel-async cannot build SQLite's multi-row inserts; the wrapped sync connection can.
macro_rules! insert_rows {
    ($c:expr, $table:expr, $rows:expr) => {{
        let rows = $rows;
        $c.spawn_blocking(move |conn| diesel::RunQueryDsl::execute(diesel::insert_into($table).values(rows), conn))
            .await?
    }};
}

macro_rules! write_tx {
    ($conn:expr, |$c:ident| $body:expr) => {{
        let conn: &mut Conn = &mut *$conn;
        conn.immediate_transaction(async move |$c: &mut Conn| $body).await
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
        use diesel::sql_types::{BigInt, Bool, Integer, Json, Nullable, Text, TimestamptzSqlite};
        let row = self.0;
        out.push_sql("UPDATE items SET status = ");
        out.push_bind_param::<Text, _>(&row.status)?;
        out.push_sql(", blocked = ");
        out.push_bind_param::<Bool, _>(&row.blocked)?;
        out.push_sql(", attempts = ");
        out.push_bind_param::<Integer, _>(&row.attempts)?;
        out.push_sql(", next_attempt_at = ");
        out.push_bind_param::<Nullable<TimestamptzSqlite>, _>(&row.next_attempt_at)?;
        out.push_sql(", lease_owner = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.lease_owner)?;
        out.push_sql(", lease_token = ");
        out.push_bind_param::<Nullable<Text>, _>(&row.lease_token)?;
        out.push_sql(", lease_expires_at = ");
        out.push_bind_param::<Nullable<TimestamptzSqlite>, _>(&row.lease_expires_at)?;
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
        out.push_bind_param::<Nullable<TimestamptzSqlite>, _>(&row.started_at)?;
        out.push_sql(", updated_at = ");
        out.push_bind_param::<TimestamptzSqlite, _>(&row.updated_at)?;
        out.push_sql(", completed_at = ");
        out.push_bind_param::<Nullable<TimestamptzSqlite>, _>(&row.completed_at)?;
        out.push_sql(" WHERE seq = ");
        out.push_bind_param::<BigInt, _>(&row.seq)?;
        Ok(())
    }
}

/// Inserts a batch's new items in multi-row statements of up to `INSERT_CHUNK` rows.
async fn insert_items(c: &mut Conn, rows: Vec<NewItemRow>) -> Result<(), StoreError> {
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<NewItemRow> = rows.by_ref().take(INSERT_CHUNK).collect();
        insert_rows!(c, items::table, chunk);
    }
    Ok(())
}

/// Inserts events, all in one trip to the blocking pool, in statements of a few fixed
/// sizes (see [`InsertEvents`]) so that each is prepared once per connection.
async fn insert_events(c: &mut Conn, rows: Vec<EventRow>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    c.spawn_blocking(move |conn| {
        let mut rest = rows.as_slice();
        while !rest.is_empty() {
            rest = match rest.len() {
                64.. => insert_events_of::<64>(conn, rest)?,
                8.. => insert_events_of::<8>(conn, rest)?,
                _ => insert_events_of::<1>(conn, rest)?,
            };
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Inserts the first `N` of `rows`; returns the rest.
fn insert_events_of<'a, const N: usize>(
    conn: &mut SqliteConnection,
    rows: &'a [EventRow],
) -> QueryResult<&'a [EventRow]> {
    let (head, rest) = rows.split_at(N);
    diesel::RunQueryDsl::execute(InsertEvents::<N>(head), conn)?;
    Ok(rest)
}

/// `INSERT INTO events (…) VALUES (…), … ` with exactly `N` rows: a fixed text and a static
/// query id per `N`, so SQLite prepares it once per connection. Diesel's own multi-row
/// inserts are prepared again each time.
struct InsertEvents<'a, const N: usize>(&'a [EventRow]);

impl<Conn, const N: usize> diesel::RunQueryDsl<Conn> for InsertEvents<'_, N> {}

impl<const N: usize> diesel::query_builder::QueryId for InsertEvents<'_, N> {
    type QueryId = InsertEvents<'static, N>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<const N: usize> diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for InsertEvents<'_, N> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Integer, Json, Nullable, Text, TimestamptzSqlite};
        debug_assert_eq!(self.0.len(), N);
        out.push_sql(
            "INSERT INTO events (batch_id, seq, item_id, item_index, event_type, step, message, data, at) VALUES ",
        );
        for (i, row) in self.0.iter().enumerate() {
            out.push_sql(if i == 0 { "(" } else { ", (" });
            out.push_bind_param::<Text, _>(&row.batch_id)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&row.seq)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&row.item_id)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Integer>, _>(&row.item_index)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&row.event_type)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&row.step)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Text>, _>(&row.message)?;
            out.push_sql(", ");
            out.push_bind_param::<Nullable<Json>, _>(&row.data)?;
            out.push_sql(", ");
            out.push_bind_param::<TimestamptzSqlite, _>(&row.at)?;
            out.push_sql(")");
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    writer: std::sync::Arc<Mutex<Conn>>,
    readers: Pool<Conn>,
    notifier: Notifier,
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
/// foreign keys on, and a busy timeout as a backstop behind the single writer.
fn configure(conn: &mut SqliteConnection) -> QueryResult<()> {
    for pragma in [
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = FULL",
        "PRAGMA foreign_keys = ON",
        "PRAGMA busy_timeout = 10000",
    ] {
        diesel::RunQueryDsl::execute(diesel::sql_query(pragma), conn)?;
    }
    Ok(())
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
        let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(path_str, config);
        let readers = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        let store = Self {
            path,
            writer: std::sync::Arc::new(Mutex::new(SyncConnectionWrapper::new(writer))),
            readers,
            notifier: Notifier::new(),
            clock: options.clock,
            max_error_chars: 1_000,
        };
        if options.migrate {
            store.run_migrations().await?;
        }
        Ok(store)
    }

    async fn read_conn(&self) -> Result<Object<Conn>, StoreError> {
        self.readers
            .get()
            .await
            .map_err(|e| StoreError::Connection(e.to_string()))
    }

    /// The one writer. A write whose future was dropped mid-transaction leaves it open;
    /// roll that back before the next one begins.
    async fn write_conn(&self) -> Result<MutexGuard<'_, Conn>, StoreError> {
        let mut conn = self.writer.lock().await;
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

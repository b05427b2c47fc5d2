//! The PostgreSQL backend: `AsyncPgConnection` in a deadpool pool, claims with
//! `FOR UPDATE SKIP LOCKED`, and notices as `NOTIFY batchd` so every instance sharing the
//! database wakes up.

mod schema;

use std::sync::Arc;

use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::notify::{CHANNEL, Notifier};
use crate::{Clock, StoreOptions};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");
const BACKEND: &str = "postgres";

/// Claimable items, in the words of the `items_claimable` index's condition.
const CLAIMABLE: &str = "items.status = 'pending' AND NOT items.blocked";

type Conn = AsyncPgConnection;
type Db = diesel::pg::Pg;
/// The SQL type of the times in hand-written SQL.
type SqlTimestamp = diesel::sql_types::Timestamptz;
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

macro_rules! insert_rows {
    ($c:expr, $table:expr, $rows:expr) => {
        diesel::insert_into($table).values($rows).execute($c).await?
    };
}

macro_rules! write_tx {
    ($conn:expr, |$c:ident| $body:expr) => {{
        let conn: &mut Conn = &mut *$conn;
        conn.transaction(async move |$c: &mut Conn| $body).await
    }};
}

/// Writes changed item rows back in one statement: every changing column goes as an array,
/// and `unnest` turns the arrays back into rows to join on `seq`.
async fn save_items(c: &mut Conn, rows: Vec<ItemRow>) -> Result<Vec<ItemRow>, StoreError> {
    use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};
    const SAVE_ITEMS: &str = "UPDATE items AS i SET status = v.status, blocked = v.blocked, \
        attempts = v.attempts, next_attempt_at = v.next_attempt_at, lease_owner = v.lease_owner, \
        lease_token = v.lease_token, lease_expires_at = v.lease_expires_at, step = v.step, \
        message = v.message, progress_current = v.progress_current, \
        progress_total = v.progress_total, result = v.result, error = v.error, \
        question = v.question, answer = v.answer, cancel_reason = v.cancel_reason, \
        started_at = v.started_at, updated_at = v.updated_at, completed_at = v.completed_at \
        FROM unnest($1::bigint[], $2::text[], $3::bool[], $4::int[], $5::timestamptz[], \
        $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::bigint[], \
        $12::bigint[], $13::jsonb[], $14::text[], $15::jsonb[], $16::jsonb[], $17::text[], \
        $18::timestamptz[], $19::timestamptz[], $20::timestamptz[]) AS v(seq, status, blocked, \
        attempts, next_attempt_at, lease_owner, lease_token, lease_expires_at, step, message, \
        progress_current, progress_total, result, error, question, answer, cancel_reason, \
        started_at, updated_at, completed_at) \
        WHERE i.seq = v.seq";
    if rows.is_empty() {
        return Ok(rows);
    }
    macro_rules! column {
        ($field:ident) => {
            rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
        };
    }
    let updated = diesel::sql_query(SAVE_ITEMS)
        .bind::<Array<BigInt>, _>(column!(seq))
        .bind::<Array<Text>, _>(column!(status))
        .bind::<Array<Bool>, _>(column!(blocked))
        .bind::<Array<Integer>, _>(column!(attempts))
        .bind::<Array<Nullable<Timestamptz>>, _>(column!(next_attempt_at))
        .bind::<Array<Nullable<Text>>, _>(column!(lease_owner))
        .bind::<Array<Nullable<Text>>, _>(column!(lease_token))
        .bind::<Array<Nullable<Timestamptz>>, _>(column!(lease_expires_at))
        .bind::<Array<Nullable<Text>>, _>(column!(step))
        .bind::<Array<Nullable<Text>>, _>(column!(message))
        .bind::<Array<Nullable<BigInt>>, _>(column!(progress_current))
        .bind::<Array<Nullable<BigInt>>, _>(column!(progress_total))
        .bind::<Array<Nullable<Jsonb>>, _>(column!(result))
        .bind::<Array<Nullable<Text>>, _>(column!(error))
        .bind::<Array<Nullable<Jsonb>>, _>(column!(question))
        .bind::<Array<Nullable<Jsonb>>, _>(column!(answer))
        .bind::<Array<Nullable<Text>>, _>(column!(cancel_reason))
        .bind::<Array<Nullable<Timestamptz>>, _>(column!(started_at))
        .bind::<Array<Timestamptz>, _>(column!(updated_at))
        .bind::<Array<Nullable<Timestamptz>>, _>(column!(completed_at))
        .execute(c)
        .await?;
    if updated != rows.len() {
        return Err(StoreError::Corrupt(format!(
            "{updated} of {} item rows were written",
            rows.len()
        )));
    }
    Ok(rows)
}

/// Inserts a batch's new items in one statement of fixed text, as arrays turned back into
/// rows by `unnest` (a multi-row insert of a thousand rows is parsed and planned each time).
async fn insert_items(c: &mut Conn, rows: Vec<NewItemRow>) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};
    const INSERT_ITEMS: &str = "INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, \
        custom_id, input, config, status, blocked, attempts, max_attempts, created_at, updated_at) \
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[], \
        $7::text[], $8::jsonb[], $9::jsonb[], $10::text[], $11::bool[], $12::int[], $13::int[], \
        $14::timestamptz[], $15::timestamptz[]) ORDER BY 6";
    if rows.is_empty() {
        return Ok(());
    }
    macro_rules! column {
        ($field:ident) => {
            rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
        };
    }
    let inserted = diesel::sql_query(INSERT_ITEMS)
        .bind::<Array<Text>, _>(column!(id))
        .bind::<Array<Text>, _>(column!(batch_id))
        .bind::<Array<Text>, _>(column!(tenant))
        .bind::<Array<Text>, _>(column!(queue))
        .bind::<Array<Integer>, _>(column!(priority))
        .bind::<Array<Integer>, _>(column!(item_index))
        .bind::<Array<Nullable<Text>>, _>(column!(custom_id))
        .bind::<Array<Jsonb>, _>(column!(input))
        .bind::<Array<Jsonb>, _>(column!(config))
        .bind::<Array<Text>, _>(column!(status))
        .bind::<Array<Bool>, _>(column!(blocked))
        .bind::<Array<Integer>, _>(column!(attempts))
        .bind::<Array<Integer>, _>(column!(max_attempts))
        .bind::<Array<Timestamptz>, _>(column!(created_at))
        .bind::<Array<Timestamptz>, _>(column!(updated_at))
        .execute(c)
        .await?;
    if inserted != rows.len() {
        return Err(StoreError::Corrupt(format!(
            "{inserted} of {} item rows were inserted",
            rows.len()
        )));
    }
    Ok(())
}

/// Inserts events in one statement of fixed text: each column goes as an array, and
/// `unnest` turns the arrays back into rows.
async fn insert_events(c: &mut Conn, rows: Vec<EventRow>) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, BigInt, Integer, Jsonb, Nullable, Text, Timestamptz};
    const INSERT_EVENTS: &str = "INSERT INTO events (batch_id, seq, item_id, item_index, event_type, \
        step, message, data, at) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], \
        $4::int[], $5::text[], $6::text[], $7::text[], $8::jsonb[], $9::timestamptz[])";
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (mut batch_id, mut seq, mut item_id, mut item_index, mut event_type) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut step, mut message, mut data, mut at) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in rows {
        batch_id.push(r.batch_id);
        seq.push(r.seq);
        item_id.push(r.item_id);
        item_index.push(r.item_index);
        event_type.push(r.event_type);
        step.push(r.step);
        message.push(r.message);
        data.push(r.data);
        at.push(r.at);
    }
    diesel::sql_query(INSERT_EVENTS)
        .bind::<Array<Text>, _>(batch_id)
        .bind::<Array<BigInt>, _>(seq)
        .bind::<Array<Nullable<Text>>, _>(item_id)
        .bind::<Array<Nullable<Integer>>, _>(item_index)
        .bind::<Array<Text>, _>(event_type)
        .bind::<Array<Nullable<Text>>, _>(step)
        .bind::<Array<Nullable<Text>>, _>(message)
        .bind::<Array<Nullable<Jsonb>>, _>(data)
        .bind::<Array<Timestamptz>, _>(at)
        .execute(c)
        .await?;
    Ok(())
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
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(options.url.clone());
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
        };
        if options.migrate {
            store.run_migrations().await?;
        }
        Ok(store)
    }

    async fn read_conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Connection(e.to_string()))
    }

    async fn write_conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.read_conn().await
    }

    async fn notify_in_tx(c: &mut Conn, notices: &[Notice]) -> Result<(), StoreError> {
        for notice in notices {
            diesel::sql_query("SELECT pg_notify($1, $2)")
                .bind::<diesel::sql_types::Text, _>(CHANNEL)
                .bind::<diesel::sql_types::Text, _>(notice.encode())
                .execute(c)
                .await?;
        }
        Ok(())
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

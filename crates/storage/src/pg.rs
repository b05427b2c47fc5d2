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

type Conn = AsyncPgConnection;
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

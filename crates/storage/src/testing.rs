//! Fresh databases for tests (the `testing` feature): each `TestDatabase` is a new SQLite
//! file in its own temporary directory or a new PostgreSQL database, removed when dropped.
//!
//! PostgreSQL tests run when `BATCHD_TEST_DATABASE_URL` names a server
//! (e.g. `postgres://postgres@127.0.0.1:5432/postgres`). Without it they are skipped, except
//! under CI (`CI` set), where a missing or unreachable server fails the test.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

use crate::Clock;
use crate::scratch::ScratchDatabase;

/// The variable that names the PostgreSQL server tests may create databases on.
pub const TEST_DATABASE_URL: &str = "BATCHD_TEST_DATABASE_URL";

/// A clock that moves only when the test says so, for the store's `StoreOptions::clock`.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// Starts at the current time, in whole microseconds.
    pub fn new() -> Self {
        let now = OffsetDateTime::now_utc();
        Self(Arc::new(AtomicI64::new((now.unix_timestamp_nanos() / 1_000) as i64)))
    }

    /// The clock to hand to the store.
    pub fn clock(&self) -> Clock {
        let micros = self.0.clone();
        Arc::new(move || {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(AtomicI64::load(&micros, Ordering::SeqCst)) * 1_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        })
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_micros() as i64, Ordering::SeqCst);
    }

    /// Moves the clock back, as a request that read the time before another one did may
    /// write after it.
    pub fn rewind(&self, by: Duration) {
        self.0.fetch_sub(by.as_micros() as i64, Ordering::SeqCst);
    }

    pub fn now(&self) -> OffsetDateTime {
        (self.clock())()
    }
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    _cleanup: Cleanup,
}

/// What goes when the test database is dropped.
#[derive(Debug)]
enum Cleanup {
    Dir { _dir: tempfile::TempDir },
    Postgres { _database: ScratchDatabase },
}

impl TestDatabase {
    /// A new SQLite file in a new temporary directory.
    pub fn sqlite() -> TestDatabase {
        let dir = tempfile::Builder::new()
            .prefix("batchd-test-")
            .tempdir()
            .expect("create a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("batchd.db").display());
        TestDatabase {
            url,
            _cleanup: Cleanup::Dir { _dir: dir },
        }
    }

    /// A new PostgreSQL database, or `None` when no server is configured outside CI.
    ///
    /// # Panics
    /// Under CI when `BATCHD_TEST_DATABASE_URL` is unset, and whenever the server it names
    /// cannot be reached: a PostgreSQL test must never pass by not running.
    pub async fn postgres() -> Option<TestDatabase> {
        let admin_url = match std::env::var(TEST_DATABASE_URL) {
            Ok(url) if !url.is_empty() => url,
            _ if std::env::var_os("CI").is_some() => {
                panic!("{TEST_DATABASE_URL} must name a PostgreSQL server under CI")
            }
            _ => return None,
        };
        let database = ScratchDatabase::create(&admin_url, "batchd_test")
            .await
            .unwrap_or_else(|e| panic!("cannot create a test database on {TEST_DATABASE_URL}: {e}"));
        Some(TestDatabase {
            url: database.url().to_owned(),
            _cleanup: Cleanup::Postgres { _database: database },
        })
    }

    /// The database URL to hand to `connect` or `batchd`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many rows of `table` (a table with a `batch_id` column) belong to a batch, read
    /// straight from the database: for tests that check what the store's API cannot show,
    /// such as rows left behind.
    ///
    /// # Panics
    /// When the database cannot be read.
    pub async fn count_batch_rows(&self, table: &str, batch_id: &str) -> i64 {
        use diesel::sql_types::{BigInt, Text};
        use diesel_async::{AsyncConnection, RunQueryDsl};

        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let count: Count = if let Some(path) = self.url.strip_prefix("sqlite://") {
            let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE batch_id = ?");
            let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<
                diesel::sqlite::SqliteConnection,
            >::establish(path)
            .await
            .expect("open the test database");
            diesel::sql_query(sql)
                .bind::<Text, _>(batch_id)
                .get_result(&mut conn)
                .await
        } else {
            let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE batch_id = $1");
            let mut conn = diesel_async::AsyncPgConnection::establish(&self.url)
                .await
                .expect("open the test database");
            diesel::sql_query(sql)
                .bind::<Text, _>(batch_id)
                .get_result(&mut conn)
                .await
        }
        .expect("count rows");
        count.n
    }
}

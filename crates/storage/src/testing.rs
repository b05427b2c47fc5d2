//! Fresh databases for tests (the `testing` feature): each `TestDatabase` is a new SQLite
//! file in its own temporary directory or a new PostgreSQL database, removed when dropped.
//!
//! PostgreSQL tests run when `BATCHD_TEST_DATABASE_URL` names a server
//! (e.g. `postgres://postgres@127.0.0.1:5432/postgres`). Without it they are skipped, except
//! under CI (`CI` set), where a missing or unreachable server fails the test.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use time::OffsetDateTime;

use crate::Clock;

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

    pub fn now(&self) -> OffsetDateTime {
        (self.clock())()
    }
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    /// Removed when dropped.
    Dir {
        _dir: tempfile::TempDir,
    },
    Postgres {
        admin_url: String,
        name: String,
    },
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
            cleanup: Cleanup::Dir { _dir: dir },
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
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "batchd_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        );
        let mut admin = AsyncPgConnection::establish(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {TEST_DATABASE_URL}: {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let url = with_database(&admin_url, &name);
        Some(TestDatabase {
            url,
            cleanup: Cleanup::Postgres { admin_url, name },
        })
    }

    /// The database URL to hand to `connect` or `batchd`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The same server URL with another database name (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs outside or inside a runtime; a thread with its own runtime works in both.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let mut admin = AsyncPgConnection::establish(&admin_url).await.ok()?;
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await
                        .ok()
                })
            })
            .join();
            if !matches!(dropped, Ok(Some(_))) {
                eprintln!("warning: could not drop test database");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn swaps_the_database_name() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "t1"), "postgres://u@h/t1");
    }
}

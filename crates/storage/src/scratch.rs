//! Throwaway PostgreSQL databases and server versions, for `batchd bench` and the test kits:
//! a database created for one run on a server the caller names, and dropped afterwards.

use std::sync::atomic::{AtomicU64, Ordering};

use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::StoreError;

/// A PostgreSQL database that exists for one run. Call [`drop_database`](Self::drop_database)
/// when done; a value dropped without it tries to drop the database from a helper thread.
#[derive(Debug)]
pub struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

impl ScratchDatabase {
    /// Creates a database named `{prefix}_{pid}_{n}_{random}` on the server of `admin_url`
    /// (any database URL of that server that the user may connect to and create databases
    /// from).
    pub async fn create(admin_url: &str, prefix: &str) -> Result<ScratchDatabase, StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        if !prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(StoreError::Config(format!("invalid database name prefix `{prefix}`")));
        }
        let name = format!(
            "{prefix}_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        );
        let mut admin = AsyncPgConnection::establish(admin_url).await?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        Ok(ScratchDatabase {
            url: with_database(admin_url, &name),
            admin_url: admin_url.to_owned(),
            name,
            dropped: false,
        })
    }

    /// The new database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database, closing whatever connections are left.
    pub async fn drop_database(mut self) -> Result<(), StoreError> {
        self.dropped = true;
        drop_named(&self.admin_url, &self.name).await
    }
}

async fn drop_named(admin_url: &str, name: &str) -> Result<(), StoreError> {
    let mut admin = AsyncPgConnection::establish(admin_url).await?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside or inside a runtime; a thread with its own runtime works in both.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(drop_named(&admin_url, &name)).ok()
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            tracing::warn!("could not drop a scratch database");
        }
    }
}

/// The version of the database server a URL names: PostgreSQL's `server_version`, or the
/// SQLite library's version for `sqlite://` URLs.
pub async fn server_version(url: &str) -> Result<String, StoreError> {
    if url.starts_with("sqlite://") {
        return Ok(format!("SQLite {}", sqlite_version()?));
    }
    let mut conn = AsyncPgConnection::establish(url).await?;
    let row: Version = diesel::sql_query("SELECT current_setting('server_version') AS version")
        .get_result(&mut conn)
        .await?;
    Ok(format!("PostgreSQL {}", row.version))
}

fn sqlite_version() -> Result<String, StoreError> {
    use diesel::{Connection, SqliteConnection};
    let mut conn = SqliteConnection::establish(":memory:")?;
    let row: Version =
        diesel::RunQueryDsl::get_result(diesel::sql_query("SELECT sqlite_version() AS version"), &mut conn)?;
    Ok(row.version)
}

/// The same server URL with another database name (query parameters kept).
pub(crate) fn with_database(url: &str, name: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn sqlite_reports_the_bundled_library() {
        let version = server_version("sqlite://x.db").await.expect("no connection needed");
        assert!(version.starts_with("SQLite 3."), "{version}");
    }

    #[test]
    fn refuses_a_prefix_that_is_not_an_identifier() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let error = rt
            .block_on(ScratchDatabase::create("postgres://u@h/db", "x; DROP"))
            .expect_err("not an identifier");
        assert!(matches!(error, StoreError::Config(_)), "{error}");
    }
}

//! A crash in the middle of a state change leaves nothing half-done: a child process starts
//! finishing an item, a trigger holds its transaction open after the item and batch rows are
//! written, and the child is killed (its PostgreSQL backend terminated). The item, the
//! counters and the timeline are exactly as before.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use batchd_domain::{BatchStatus, ItemStatus};
use batchd_storage::{Finish, FinishResult, Outcome, Scope, StoreOptions};
use diesel::Connection as _;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::json;

use crate::support::{Fixture, batch, conformance};

conformance!(a_crash_mid_transaction_leaves_items_and_counters_agreeing);

const URL_VAR: &str = "BATCHD_CRASH_DATABASE_URL";
const ITEM_VAR: &str = "BATCHD_CRASH_ITEM";
const MARKER: &str = "crash-test: finishing";

/// Runs in the child process: finish one item, which never commits.
#[tokio::test]
#[ignore = "run by a_crash_mid_transaction_leaves_items_and_counters_agreeing"]
async fn finish_in_child() {
    let (Ok(url), Ok(item)) = (std::env::var(URL_VAR), std::env::var(ITEM_VAR)) else {
        return;
    };
    let (item_id, lease_token) = item.split_once(' ').expect("item id and token");
    let mut options = StoreOptions::new(url);
    options.migrate = false;
    let store = batchd_storage::connect(options).await.expect("open");
    let finish = Finish {
        item_id: item_id.to_owned(),
        lease_token: lease_token.to_owned(),
        outcome: Outcome::Completed {
            result: json!("never committed"),
        },
    };
    println!("{MARKER}");
    let _ = store.finish(vec![finish]).await;
    panic!("the finish should have been killed before it returned");
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn a_crash_mid_transaction_leaves_items_and_counters_agreeing(f: Fixture) {
    let (b, _) = f.submit(batch("default", 3)).await;
    let claimed = f.claim("default", 3).await;
    f.complete(&claimed[1]).await;
    let before_batch = f.batch(&b.id).await;
    let before_events = f.event_types(&b.id).await;
    let postgres = f.store.backend() == "postgres";
    install_slow_trigger(f.db.url(), postgres).await;

    let child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "crash::finish_in_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(URL_VAR, f.db.url())
        .env(ITEM_VAR, format!("{} {}", claimed[0].id, claimed[0].lease_token))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child");
    let mut child = KillOnDrop(child);
    // First the child says it is about to finish...
    let stdout = child.0.stdout.take().expect("the child's stdout");
    let saw_marker = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains(MARKER))
    });
    let saw_marker = tokio::time::timeout(Duration::from_secs(60), saw_marker).await;
    assert!(matches!(saw_marker, Ok(Ok(true))), "the child never started finishing");
    // ...then poll, with a deadline, until its transaction is open and waiting in the trigger.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !child_is_inside(f.db.url(), postgres).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never reached the trigger"
        );
        assert!(
            child.0.try_wait().expect("child status").is_none(),
            "the child exited early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.0.kill().expect("kill the child");
    child.0.wait().expect("reap the child");
    if postgres {
        terminate_sleeping_backends(f.db.url()).await;
    }
    remove_slow_trigger(f.db.url(), postgres).await;

    let store = f.reopen().await;
    let after = store.get_batch(Scope::All, &b.id).await.expect("batch");
    assert_eq!(after.counts, before_batch.counts, "counters are as before the crash");
    assert_eq!(after.status, BatchStatus::Running);
    assert_eq!(
        f.event_types(&b.id).await,
        before_events,
        "no event of the crashed change"
    );
    let item = store.get_item(Scope::All, &claimed[0].id).await.expect("item");
    assert_eq!(
        item.status,
        ItemStatus::Running,
        "the item is still running under its lease"
    );
    f.assert_counts_match_items(&b.id).await;
    // Nothing is stuck: the real worker still finishes its items.
    assert_eq!(
        f.complete(&claimed[0]).await,
        FinishResult::Applied(ItemStatus::Completed)
    );
    assert_eq!(
        f.complete(&claimed[2]).await,
        FinishResult::Applied(ItemStatus::Completed)
    );
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Completed);
}

fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").expect("a sqlite URL")
}

async fn pg_exec(url: &str, sql: &str) {
    let mut conn = AsyncPgConnection::establish(url).await.expect("connect");
    diesel::sql_query(sql).execute(&mut conn).await.expect(sql);
}

fn sqlite_exec(url: &str, sql: &str) {
    let mut conn = diesel::SqliteConnection::establish(sqlite_path(url)).expect("open");
    diesel::RunQueryDsl::execute(diesel::sql_query(sql), &mut conn).expect(sql);
}

async fn install_slow_trigger(url: &str, postgres: bool) {
    if postgres {
        pg_exec(
            url,
            "CREATE FUNCTION crash_test_slow() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(120); RETURN NEW; END $$ LANGUAGE plpgsql",
        )
        .await;
        pg_exec(
            url,
            "CREATE TRIGGER crash_test_slow BEFORE INSERT ON event_runs FOR EACH ROW EXECUTE FUNCTION crash_test_slow()",
        )
        .await;
    } else {
        // SQLite triggers cannot sleep; a large cross join keeps the transaction busy instead.
        sqlite_exec(url, "CREATE TABLE crash_test_rows (x INTEGER)");
        sqlite_exec(
            url,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000) INSERT INTO crash_test_rows SELECT x FROM c",
        );
        sqlite_exec(
            url,
            "CREATE TRIGGER crash_test_slow BEFORE INSERT ON event_runs BEGIN SELECT count(*) FROM crash_test_rows a, crash_test_rows b, crash_test_rows c; END",
        );
    }
}

async fn remove_slow_trigger(url: &str, postgres: bool) {
    if postgres {
        pg_exec(url, "DROP TRIGGER crash_test_slow ON event_runs").await;
        pg_exec(url, "DROP FUNCTION crash_test_slow()").await;
    } else {
        sqlite_exec(url, "DROP TRIGGER crash_test_slow");
        sqlite_exec(url, "DROP TABLE crash_test_rows");
    }
}

/// Whether the child holds its write transaction open inside the trigger.
async fn child_is_inside(url: &str, postgres: bool) -> bool {
    if postgres {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = AsyncPgConnection::establish(url).await.expect("connect");
        let count: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .get_result(&mut conn)
        .await
        .expect("activity");
        count.n > 0
    } else {
        // The writer lock is taken: a second writer cannot begin.
        let mut conn = diesel::SqliteConnection::establish(sqlite_path(url)).expect("open");
        diesel::RunQueryDsl::execute(diesel::sql_query("PRAGMA busy_timeout = 0"), &mut conn).expect("pragma");
        let begin = diesel::RunQueryDsl::execute(diesel::sql_query("BEGIN IMMEDIATE"), &mut conn);
        if begin.is_ok() {
            diesel::RunQueryDsl::execute(diesel::sql_query("ROLLBACK"), &mut conn).expect("rollback");
        }
        begin.is_err()
    }
}

/// The server notices a dead client only when it next talks to it; end the backend now.
async fn terminate_sleeping_backends(url: &str) {
    pg_exec(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
    )
    .await;
}

//! An upgrade keeps what was stored: a database at migration 000003, with a batch half done
//! (an item completed, one running under its lease, one never started, one waiting for its
//! retry) and a sequential batch (its second item blocked), is migrated by `connect` to the
//! range-claim schema. Counts, items and the timeline read as before, the running item's
//! worker can still finish it with its old lease token, and every pending item is claimed
//! once, batch by batch in the order they would have been claimed before. Times written as
//! text read back as the same instants.

use batchd_domain::{BatchStatus, ItemStatus};
use batchd_storage::testing::{ManualClock, TestDatabase};
use batchd_storage::{Finish, FinishResult, Outcome, Scope, StoreOptions};
use diesel::connection::SimpleConnection;
use diesel::{Connection as _, SqliteConnection};
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use serde_json::json;
use time::macros::datetime;

use crate::support::{Fixture, batch, claim_request};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

/// The migrations before range claims and event runs.
const BEFORE_RANGE_CLAIMS: usize = 3;

/// Rows as the store wrote them at migration 000003. Batch `upgrade-a`: item 0 completed,
/// item 1 running, item 2 pending and never started, item 3 pending after a failed attempt,
/// due now. Batch `upgrade-b`, sequential: item 0 pending, item 1 blocked behind it.
const OLD_ROWS: &str = r#"
INSERT INTO batches (id, tenant, queue, mode, on_item_failure, priority, status, total, pending,
    running, completed, failed, cancelled, needs_input, request_hash, last_event_seq, created_at,
    started_at, updated_at)
VALUES ('upgrade-a', 'acme', 'default', 'parallel', 'continue', 0, 'running', 4, 2, 1, 1, 0, 0, 0,
    'h', 3, '2026-12-01 10:00:00+00:00', '2026-12-01 10:00:01+00:00', '2026-12-01 10:00:02+00:00');
INSERT INTO batches (id, tenant, queue, mode, on_item_failure, priority, status, total, pending,
    running, completed, failed, cancelled, needs_input, request_hash, last_event_seq, created_at,
    updated_at)
VALUES ('upgrade-b', 'acme', 'default', 'sequential', 'continue', 0, 'pending', 2, 2, 0, 0, 0, 0, 0,
    'h', 1, '2026-12-01 10:00:03+00:00', '2026-12-01 10:00:03+00:00');
INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, input, status, blocked,
    attempts, max_attempts, next_attempt_at, lease_owner, lease_token, lease_expires_at, result,
    created_at, started_at, updated_at, completed_at)
VALUES
    ('upgrade-a-0', 'upgrade-a', 'acme', 'default', 0, 0, '{"n": 0}', 'completed', FALSE, 1, 3,
        NULL, NULL, NULL, NULL, '{"done": 0}', '2026-12-01 10:00:00+00:00',
        '2026-12-01 10:00:01.25+00:00', '2026-12-01 10:00:02.123456+00:00', '2026-12-01 10:00:02.123456+00:00'),
    ('upgrade-a-1', 'upgrade-a', 'acme', 'default', 0, 1, '{"n": 1}', 'running', FALSE, 1, 3,
        NULL, 'old-worker', 'oldtoken1', '2100-01-01 00:00:00+00:00', NULL,
        '2026-12-01 10:00:00+00:00', '2026-12-01 10:00:01+00:00', '2026-12-01 10:00:01+00:00', NULL),
    ('upgrade-a-2', 'upgrade-a', 'acme', 'default', 0, 2, '{"n": 2}', 'pending', FALSE, 0, 3,
        NULL, NULL, NULL, NULL, NULL, '2026-12-01 10:00:00+00:00', NULL,
        '2026-12-01 10:00:00+00:00', NULL),
    ('upgrade-a-3', 'upgrade-a', 'acme', 'default', 0, 3, '{"n": 3}', 'pending', FALSE, 1, 3,
        '2000-01-01 00:00:00+00:00', NULL, NULL, NULL, NULL, '2026-12-01 10:00:00+00:00',
        '2026-12-01 10:00:01+00:00', '2026-12-01 10:00:02+00:00', NULL);
INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, input, status, blocked,
    attempts, max_attempts, created_at, updated_at)
VALUES
    ('upgrade-b-0', 'upgrade-b', 'acme', 'default', 0, 0, '{"n": 0}', 'pending', FALSE, 0, 3,
        '2026-12-01 10:00:03+00:00', '2026-12-01 10:00:03+00:00'),
    ('upgrade-b-1', 'upgrade-b', 'acme', 'default', 0, 1, '{"n": 1}', 'pending', TRUE, 0, 3,
        '2026-12-01 10:00:03+00:00', '2026-12-01 10:00:03+00:00');
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, data, at)
VALUES
    ('upgrade-a', 1, NULL, NULL, 'batch.created', '{"total_items": 4}', '2026-12-01 10:00:00+00:00'),
    ('upgrade-a', 2, 'upgrade-a-0', 0, 'item.started', NULL, '2026-12-01 10:00:01+00:00'),
    ('upgrade-a', 3, 'upgrade-a-0', 0, 'item.completed', NULL, '2026-12-01 10:00:02+00:00'),
    ('upgrade-b', 1, NULL, NULL, 'batch.created', '{"total_items": 2}', '2026-12-01 10:00:03+00:00');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrade_keeps_batches_items_and_events() {
    let db = TestDatabase::sqlite();
    let path = db.url().trim_start_matches("sqlite://").to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = SqliteConnection::establish(&path).expect("open");
        write_old_rows(&mut conn, SQLITE_MIGRATIONS);
    })
    .await
    .expect("join");
    upgrade_keeps_batches_items_and_events(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrade_keeps_batches_items_and_events() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url).expect("connect");
        write_old_rows(&mut conn, POSTGRES_MIGRATIONS);
    })
    .await
    .expect("join");
    upgrade_keeps_batches_items_and_events(db).await;
}

/// Brings an empty database to migration 000003 and writes `OLD_ROWS`.
fn write_old_rows<DB, C>(conn: &mut C, migrations: EmbeddedMigrations)
where
    DB: diesel::backend::Backend,
    C: MigrationHarness<DB> + SimpleConnection,
{
    let all = conn.pending_migrations(migrations).expect("the migrations");
    for migration in &all[..BEFORE_RANGE_CLAIMS] {
        conn.run_migration(migration.as_ref()).expect("an old migration");
    }
    conn.batch_execute(OLD_ROWS).expect("old rows");
}

/// Opens the store over `db`, which applies the pending migrations.
async fn migrated(db: TestDatabase) -> Fixture {
    let clock = ManualClock::new();
    let mut options = StoreOptions::new(db.url());
    options.clock = clock.clock();
    let store = batchd_storage::connect(options)
        .await
        .expect("open and migrate the store");
    Fixture { store, clock, db }
}

async fn upgrade_keeps_batches_items_and_events(db: TestDatabase) {
    let f = migrated(db).await;

    let a = f.batch("upgrade-a").await;
    assert_eq!((a.counts.pending, a.counts.running, a.counts.completed), (2, 1, 1));
    // Times stored as text before are the same instants after (stored as integers on SQLite).
    assert_eq!(a.created_at, datetime!(2026-12-01 10:00:00 UTC));
    assert_eq!(a.started_at, Some(datetime!(2026-12-01 10:00:01 UTC)));
    let done = &f.items("upgrade-a").await[0];
    assert_eq!(done.started_at, Some(datetime!(2026-12-01 10:00:01.25 UTC)));
    assert_eq!(done.completed_at, Some(datetime!(2026-12-01 10:00:02.123456 UTC)));
    let statuses: Vec<ItemStatus> = f.items("upgrade-a").await.iter().map(|i| i.status).collect();
    assert_eq!(
        statuses,
        [
            ItemStatus::Completed,
            ItemStatus::Running,
            ItemStatus::Pending,
            ItemStatus::Pending
        ]
    );
    f.assert_counts_match_items("upgrade-a").await;
    f.assert_counts_match_items("upgrade-b").await;
    assert_eq!(
        f.event_types("upgrade-a").await,
        ["batch.created", "item.started", "item.completed"]
    );
    let created = &f
        .store
        .read_events(Scope::All, "upgrade-a", 0, 10)
        .await
        .expect("events")[0];
    assert_eq!(created.data, Some(json!({"total_items": 4})));

    // The worker that held item 1 before the upgrade finishes it with its token.
    let finish = Finish {
        item_id: "upgrade-a-1".to_owned(),
        lease_token: "oldtoken1".to_owned(),
        outcome: Outcome::Completed { result: json!("late") },
    };
    let results = f.store.finish(vec![finish]).await.expect("finish");
    assert_eq!(results, [FinishResult::Applied(ItemStatus::Completed)]);

    // Every pending item once, batches in the old claim order, the blocked one after its
    // predecessor. Within a batch, the item waiting for its retry now comes first: after the
    // upgrade it waits in `queue_entries`, and a batch's entries are claimed before the
    // items at its cursor.
    let claimed = f.claim("default", 10).await;
    let order: Vec<(&str, i32, i32)> = claimed
        .iter()
        .map(|c| (c.batch_id.as_str(), c.index, c.attempt))
        .collect();
    assert_eq!(order, [("upgrade-a", 3, 2), ("upgrade-a", 2, 1), ("upgrade-b", 0, 1)]);
    for item in &claimed {
        assert_eq!(f.complete(item).await, FinishResult::Applied(ItemStatus::Completed));
    }
    let last = f.store.claim(&claim_request("default", 10)).await.expect("claim");
    assert_eq!(last.len(), 1);
    assert_eq!((last[0].batch_id.as_str(), last[0].index), ("upgrade-b", 1));
    f.complete(&last[0]).await;
    assert!(f.claim("default", 10).await.is_empty());

    // A batch submitted after the upgrade takes the next submission seq and runs.
    let (c, _) = f.submit(batch("default", 2)).await;
    let claimed = f.claim("default", 10).await;
    assert_eq!(claimed.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1]);
    for item in &claimed {
        f.complete(item).await;
    }
    assert_eq!(f.batch(&c.id).await.status, BatchStatus::Completed);

    for id in ["upgrade-a", "upgrade-b"] {
        assert_eq!(f.batch(id).await.status, BatchStatus::Completed, "{id}");
        f.assert_counts_match_items(id).await;
        let events = f.store.read_events(Scope::All, id, 0, 100).await.expect("events");
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>(), "{id}");
    }
}

/// The migrations before times were stored as integers on SQLite.
const BEFORE_INTEGER_TIMES: usize = 6;

/// 30,000 completed items with their times as text, more pages than SQLite keeps in memory
/// for undoing one statement (4 MiB in this build), are converted by the upgrade, and their
/// times read back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrade_converts_the_times_of_many_items() {
    let db = TestDatabase::sqlite();
    let path = db.url().trim_start_matches("sqlite://").to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = SqliteConnection::establish(&path).expect("open");
        let all = conn.pending_migrations(SQLITE_MIGRATIONS).expect("the migrations");
        for migration in &all[..BEFORE_INTEGER_TIMES] {
            conn.run_migration(migration.as_ref()).expect("an old migration");
        }
        conn.batch_execute(
            "INSERT INTO batches (id, tenant, queue, mode, on_item_failure, priority, status, total, pending,
                running, completed, failed, cancelled, needs_input, request_hash, last_event_seq, created_at,
                started_at, updated_at, completed_at, seq)
            VALUES ('many', 'acme', 'default', 'parallel', 'continue', 0, 'completed', 30000, 0, 0, 30000, 0, 0,
                0, 'h', 0, '2026-12-01 10:00:00+00:00', '2026-12-01 10:00:01.5+00:00',
                '2026-12-01 10:00:02.25+00:00', '2026-12-01 10:00:02.25+00:00', 1);
            WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n < 29999)
            INSERT INTO items (id, batch_id, tenant, queue, priority, item_index, input, status, attempts,
                max_attempts, result, created_at, started_at, updated_at, completed_at)
            SELECT 'many-' || n, 'many', 'acme', 'default', 0, n, '{\"n\": ' || n || '}', 'completed', 1, 3,
                'null', '2026-12-01 10:00:00+00:00', '2026-12-01 10:00:01.5+00:00',
                '2026-12-01 10:00:02.123456+00:00', '2026-12-01 10:00:02.123456+00:00'
            FROM i;",
        )
        .expect("old rows");
    })
    .await
    .expect("join");
    let f = migrated(db).await;
    let batch = f.batch("many").await;
    assert_eq!(batch.counts.completed, 30_000);
    assert_eq!(batch.created_at, datetime!(2026-12-01 10:00:00 UTC));
    let items = f.items("many").await;
    for item in [&items[0], items.last().expect("an item")] {
        assert_eq!(item.started_at, Some(datetime!(2026-12-01 10:00:01.5 UTC)));
        assert_eq!(item.completed_at, Some(datetime!(2026-12-01 10:00:02.123456 UTC)));
    }
}

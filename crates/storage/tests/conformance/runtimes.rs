//! The store is opened on the server's runtime and used from others too: actix runs each
//! HTTP worker on a runtime of its own, and stops them when the server stops while the
//! executor may still be writing its last results. A PostgreSQL connection is driven by a
//! task on the runtime that opened it; the pool opens connections when they are first asked
//! for, so one opened while serving a worker must not depend on that worker's runtime.

use std::time::Duration;

use batchd_storage::{CreateOutcome, Scope};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use tokio::sync::oneshot;

use crate::support::{Fixture, batch, completions};

/// Reads made at once from the other runtime, so that the pool opens several connections
/// there (and none anywhere else: it starts empty).
const READS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_outlives_the_runtime_its_connection_was_opened_from() {
    let Some(f) = Fixture::postgres().await else {
        return;
    };
    // The other runtime, as an actix worker's: a thread of its own, running until told to
    // stop; every task spawned on it ends with it.
    let (opened_tx, opened_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let store = f.store.clone();
    let other = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let id = match store
                .create_batch(batch("other-runtime", 3))
                .await
                .expect("create the batch")
            {
                CreateOutcome::Created(b, _) => b.id,
                CreateOutcome::Existing(..) => panic!("expected a new batch"),
            };
            let mut reads = tokio::task::JoinSet::new();
            for _ in 0..READS {
                let (store, id) = (store.clone(), id.clone());
                reads.spawn(async move { store.get_batch(Scope::All, &id).await });
            }
            while let Some(read) = reads.join_next().await {
                read.expect("a read task").expect("a read on the other runtime");
            }
            let _ = opened_tx.send(id);
            let _ = stop_rx.await;
        });
    });
    let batch_id = opened_rx.await.expect("the other runtime opened its connections");
    let claimed = f.claim("other-runtime", 3).await;
    assert_eq!(claimed.len(), 3);

    // The batch's row locked, so that the completions' transaction waits in the middle.
    let mut locker = AsyncPgConnection::establish(f.db.url()).await.expect("connect");
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM batches WHERE id = '{batch_id}' FOR UPDATE"
        ))
        .await
        .expect("lock the batch row");
    let store = f.store.clone();
    let finishes = completions(&claimed);
    let finishing = tokio::spawn(async move { store.finish(finishes).await });
    wait_for_a_lock_wait(f.db.url()).await;

    // The other runtime stops while the transaction waits on a connection it opened.
    let _ = stop_tx.send(());
    tokio::task::spawn_blocking(move || other.join())
        .await
        .expect("join")
        .expect("the other runtime's thread");
    locker.batch_execute("COMMIT").await.expect("unlock");

    let results = finishing
        .await
        .expect("the finishing task")
        .expect("the completions commit after the runtime that opened their connection stopped");
    assert_eq!(results.len(), 3);
    assert_eq!(f.batch(&batch_id).await.counts.completed, 3);
    f.assert_counts_match_items(&batch_id).await;
}

/// Waits (at most 60 s) until a session of the test's database waits for a lock.
async fn wait_for_a_lock_wait(url: &str) {
    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut c = AsyncPgConnection::establish(url).await.expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: Waiting = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .get_result(&mut c)
        .await
        .expect("read pg_stat_activity");
        if waiting.n > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the completions never waited for the batch row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

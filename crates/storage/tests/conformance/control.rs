//! Control requests: cancel, pause, resume, retry, item cancel, queue pause; stats; purge.

use std::time::Duration;

use batchd_domain::{BatchStatus, ItemStatus};
use batchd_storage::{FinishResult, LeaseState, Scope, StoreError};

use crate::support::{Fixture, batch, conformance, failure};

conformance!(
    cancel_ends_pending_items_at_once_and_running_ones_later,
    cancel_without_running_items_is_immediate,
    cancel_rewrites_a_thousand_large_items_at_once,
    finished_batches_refuse_control_with_their_status,
    pause_stops_new_starts_and_resume_restarts,
    items_ending_while_paused_settle_the_batch,
    item_cancel_only_while_pending,
    retry_needs_a_failed_item,
    queue_pause_and_stats,
    purge_removes_old_finished_batches,
);

fn current_status<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::InvalidState(e)) => e.current,
        other => panic!("expected invalid_state, got {other:?}"),
    }
}

async fn cancel_ends_pending_items_at_once_and_running_ones_later(f: Fixture) {
    let (b, _) = f.submit(batch("default", 4)).await;
    let running = f.claim("default", 1).await.remove(0);
    let cancelled = f.store.cancel_batch(Scope::All, &b.id).await.expect("cancel");
    assert_eq!(cancelled.status, BatchStatus::Cancelling);
    assert_eq!((cancelled.counts.cancelled, cancelled.counts.running), (3, 1));
    assert!(f.claim("default", 10).await.is_empty());
    // Cancelling again is a no-op.
    assert_eq!(
        f.store.cancel_batch(Scope::All, &b.id).await.expect("again").status,
        BatchStatus::Cancelling
    );
    // The running item's worker hears of it, and its result ends it cancelled.
    assert_eq!(
        f.store
            .renew_lease(&running.id, &running.lease_token, Duration::from_secs(5))
            .await
            .expect("renew"),
        LeaseState::Cancelled
    );
    assert_eq!(f.complete(&running).await, FinishResult::ItemCancelled);
    let done = f.batch(&b.id).await;
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert_eq!(done.counts.cancelled, 4);
    assert!(done.completed_at.is_some());
    let types = f.event_types(&b.id).await;
    assert!(types.contains(&"batch.cancelling".to_owned()));
    assert_eq!(types.last().map(String::as_str), Some("batch.cancelled"));
    assert_eq!(types.iter().filter(|t| *t == "item.cancelled").count(), 4);
    f.assert_counts_match_items(&b.id).await;
}

async fn cancel_without_running_items_is_immediate(f: Fixture) {
    let (b, _) = f.submit(batch("default", 2)).await;
    let done = f.store.cancel_batch(Scope::All, &b.id).await.expect("cancel");
    assert_eq!(done.status, BatchStatus::Cancelled);
    // An expired lease in a cancelling batch also ends the item cancelled.
    let (b2, _) = f.submit(batch("default", 1)).await;
    f.claim("default", 1).await;
    f.store.cancel_batch(Scope::All, &b2.id).await.expect("cancel");
    f.clock.advance(Duration::from_secs(31));
    f.store.requeue_expired_leases().await.expect("requeue");
    assert_eq!(f.batch(&b2.id).await.status, BatchStatus::Cancelled);
    f.assert_counts_match_items(&b2.id).await;
}

/// A thousand items of 16 KiB each end in one statement: more pages than SQLite keeps in
/// memory for undoing a statement, so its statement journal goes to a temporary file.
async fn cancel_rewrites_a_thousand_large_items_at_once(f: Fixture) {
    let mut new = batch("default", 1_000);
    for item in &mut new.items {
        item.input = serde_json::Value::String("x".repeat(16 * 1024));
    }
    let (b, _) = f.submit(new).await;
    let done = f.store.cancel_batch(Scope::All, &b.id).await.expect("cancel");
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert_eq!(done.counts.cancelled, 1_000);
    f.assert_counts_match_items(&b.id).await;
}

async fn finished_batches_refuse_control_with_their_status(f: Fixture) {
    let (b, _) = f.submit(batch("default", 1)).await;
    let item = f.claim("default", 1).await.remove(0);
    f.complete(&item).await;
    assert_eq!(
        current_status(f.store.cancel_batch(Scope::All, &b.id).await),
        "completed"
    );
    assert_eq!(
        current_status(f.store.pause_batch(Scope::All, &b.id).await),
        "completed"
    );
    assert_eq!(
        current_status(f.store.resume_batch(Scope::All, &b.id).await),
        "completed"
    );
    let events = f.event_types(&b.id).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("batch.completed"),
        "refusals write nothing"
    );
    assert!(matches!(
        f.store.cancel_batch(Scope::All, "missing").await,
        Err(StoreError::NotFound)
    ));
}

async fn pause_stops_new_starts_and_resume_restarts(f: Fixture) {
    let (b, _) = f.submit(batch("default", 3)).await;
    let paused = f.store.pause_batch(Scope::All, &b.id).await.expect("pause");
    assert_eq!(paused.status, BatchStatus::Paused);
    assert!(f.claim("default", 10).await.is_empty());
    assert_eq!(current_status(f.store.pause_batch(Scope::All, &b.id).await), "paused");
    let resumed = f.store.resume_batch(Scope::All, &b.id).await.expect("resume");
    assert_eq!(resumed.status, BatchStatus::Pending, "nothing had started yet");
    let first = f.claim("default", 1).await.remove(0);
    f.store
        .pause_batch(Scope::All, &b.id)
        .await
        .expect("pause while running");
    assert_eq!(
        f.complete(&first).await,
        FinishResult::Applied(ItemStatus::Completed),
        "running items finish"
    );
    assert!(f.claim("default", 10).await.is_empty());
    let resumed = f.store.resume_batch(Scope::All, &b.id).await.expect("resume");
    assert_eq!(resumed.status, BatchStatus::Running, "it had started");
    assert_eq!(f.claim("default", 10).await.len(), 2);
    assert_eq!(current_status(f.store.resume_batch(Scope::All, &b.id).await), "running");
    let types = f.event_types(&b.id).await;
    assert_eq!(types.iter().filter(|t| *t == "batch.paused").count(), 2);
    assert_eq!(types.iter().filter(|t| *t == "batch.resumed").count(), 2);
}

async fn items_ending_while_paused_settle_the_batch(f: Fixture) {
    let (b, _) = f.submit(batch("default", 1)).await;
    let item = f.claim("default", 1).await.remove(0);
    f.store.pause_batch(Scope::All, &b.id).await.expect("pause");
    f.complete(&item).await;
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Completed);
}

async fn item_cancel_only_while_pending(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 3)).await;
    let running = f.claim("default", 1).await.remove(0);
    let cancelled = f.store.cancel_item(Scope::All, &ids[2]).await.expect("cancel pending");
    assert_eq!(cancelled.status, ItemStatus::Cancelled);
    assert_eq!(
        current_status(f.store.cancel_item(Scope::All, &running.id).await),
        "running"
    );
    f.complete(&running).await;
    assert_eq!(
        current_status(f.store.cancel_item(Scope::All, &running.id).await),
        "completed"
    );
    assert_eq!(
        current_status(f.store.cancel_item(Scope::All, &ids[2]).await),
        "cancelled"
    );
    let last = f.claim("default", 10).await;
    assert_eq!(last.len(), 1);
    f.complete(&last[0]).await;
    let done = f.batch(&b.id).await;
    assert_eq!(
        (done.status, done.counts.completed, done.counts.cancelled),
        (BatchStatus::Completed, 2, 1)
    );
    // Cancelled items stay cancelled through a retry; a batch without failures cannot retry.
    assert_eq!(
        current_status(f.store.retry_batch(Scope::All, &b.id).await),
        "completed"
    );
}

async fn retry_needs_a_failed_item(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 2)).await;
    let claimed = f.claim("default", 2).await;
    f.finish(&claimed[0], failure("nope", false)).await;
    assert_eq!(
        current_status(f.store.retry_batch(Scope::All, &b.id).await),
        "running",
        "not finished yet"
    );
    f.complete(&claimed[1]).await;
    assert_eq!(
        f.batch(&b.id).await.status,
        BatchStatus::Completed,
        "one item completed"
    );
    let retried = f.store.retry_batch(Scope::All, &b.id).await.expect("retry");
    assert_eq!(
        (retried.status, retried.counts.pending, retried.counts.completed),
        (BatchStatus::Running, 1, 1)
    );
    assert!(retried.completed_at.is_none());
    let again = f.claim("default", 10).await;
    assert_eq!(
        again.iter().map(|c| (c.id.clone(), c.attempt)).collect::<Vec<_>>(),
        vec![(ids[0].clone(), 1)],
        "attempts reset"
    );
    assert!(f.event_types(&b.id).await.contains(&"batch.retried".to_owned()));
    // A cancelled batch cannot be retried.
    let (c, _) = f.submit(batch("default", 1)).await;
    f.store.cancel_batch(Scope::All, &c.id).await.expect("cancel");
    assert_eq!(
        current_status(f.store.retry_batch(Scope::All, &c.id).await),
        "cancelled"
    );
}

async fn queue_pause_and_stats(f: Fixture) {
    let (b, _) = f.submit(batch("emails", 3)).await;
    f.submit(batch("other", 1)).await;
    f.store.set_queue_paused("emails", true).await.expect("pause");
    assert!(f.claim("emails", 10).await.is_empty());
    assert_eq!(f.claim("other", 10).await.len(), 1, "other queues go on");
    f.store.set_queue_paused("emails", false).await.expect("resume");
    let claimed = f.claim("emails", 1).await;
    f.complete(&claimed[0]).await;
    f.claim("emails", 1).await;
    let stats = f.store.queue_stats().await.expect("stats");
    let emails = stats.iter().find(|s| s.name == "emails").expect("emails stats");
    assert_eq!(
        (
            emails.depth,
            emails.running,
            emails.completed_last_minute,
            emails.paused
        ),
        (1, 1, 1, false)
    );
    assert_eq!(emails.oldest_pending_at, Some(b.created_at));
    let other = stats.iter().find(|s| s.name == "other").expect("other stats");
    assert_eq!((other.depth, other.running), (0, 1));
}

async fn purge_removes_old_finished_batches(f: Fixture) {
    let (old, _) = f.submit(batch("default", 3)).await;
    f.store.cancel_batch(Scope::All, &old.id).await.expect("cancel");
    assert_eq!(f.db.count_batch_rows("items", &old.id).await, 3);
    assert!(f.db.count_batch_rows("event_runs", &old.id).await > 0);
    let (active, _) = f.submit(batch("default", 1)).await;
    f.clock.advance(Duration::from_secs(3600));
    let cutoff = f.clock.now() - Duration::from_secs(60);
    assert_eq!(f.store.purge_finished(cutoff).await.expect("purge"), 1);
    assert!(matches!(
        f.store.get_batch(Scope::All, &old.id).await,
        Err(StoreError::NotFound)
    ));
    for table in ["items", "event_runs", "queue_entries", "leases", "webhook_deliveries"] {
        assert_eq!(
            f.db.count_batch_rows(table, &old.id).await,
            0,
            "{table} of the purged batch"
        );
    }
    assert_eq!(
        f.batch(&active.id).await.status,
        BatchStatus::Pending,
        "active batches stay"
    );
    assert_eq!(
        f.db.count_batch_rows("items", &active.id).await,
        1,
        "items of active batches stay"
    );
}

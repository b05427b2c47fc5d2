//! Claiming, leases and finishing attempts.

use std::time::Duration;

use batchd_domain::{BatchStatus, ItemStatus};
use batchd_storage::{Finish, FinishResult, ItemReport, LeaseState, NewBatch, Notice, Outcome, Scope};
use serde_json::{Value, json};

use crate::support::{Fixture, batch, claim_request, completions_with, conformance, failure, input_n, sequential};

conformance!(
    claims_by_priority_then_fifo,
    completing_every_item_completes_the_batch,
    a_stale_lease_token_changes_nothing,
    transient_failures_retry_after_the_backoff,
    permanent_failures_and_used_up_attempts_fail,
    fail_batch_fails_the_batch_and_cancels_the_rest,
    sequential_batches_run_one_item_at_a_time_in_order,
    needs_input_waits_for_an_answer,
    expired_leases_go_back_with_the_attempt_counted,
    released_items_keep_their_attempt,
    reports_and_renewals_hold_the_lease,
    delayed_batches_wait_for_run_at,
    notices_wake_waiters,
    finish_and_claim_ends_and_starts_in_one_call,
    finish_and_claim_ends_one_item_lease_and_starts_another,
    finish_and_claim_gives_nothing_of_a_batch_it_fails,
    finish_and_claim_never_gives_an_item_twice,
    a_run_of_equal_results_completes_every_item,
    a_run_skips_an_item_that_left_its_range,
    a_run_naming_other_items_writes_only_the_right_ones,
    forged_range_tokens_write_nothing,
    long_runs_give_each_item_its_own_result,
    a_long_run_naming_other_items_writes_only_the_right_ones,
    a_long_run_past_its_lease_writes_only_what_it_covers,
    a_long_run_of_a_cancelled_batch_ends_cancelled,
);

async fn claims_by_priority_then_fifo(f: Fixture) {
    let (low, _) = f.submit(batch("q", 2)).await;
    f.clock.advance(Duration::from_millis(1));
    let (high, _) = f
        .submit(NewBatch {
            priority: 10,
            ..batch("q", 2)
        })
        .await;
    f.submit(batch("elsewhere", 5)).await;
    let claimed = f.claim("q", 3).await;
    let order: Vec<(String, i32)> = claimed.iter().map(|c| (c.batch_id.clone(), c.index)).collect();
    assert_eq!(
        order,
        vec![(high.id.clone(), 0), (high.id.clone(), 1), (low.id.clone(), 0)]
    );
    let c = &claimed[0];
    assert_eq!(c.attempt, 1);
    assert_eq!(c.queue, "q");
    assert_eq!(c.tenant, "acme");
    assert!(!c.lease_token.is_empty());
    assert_ne!(
        claimed[0].lease_token, claimed[1].lease_token,
        "every item has its own lease token"
    );
    assert_eq!(c.lease_expires_at, f.clock.now() + Duration::from_secs(30));
    assert_eq!(f.batch(&high.id).await.status, BatchStatus::Running);
    assert!(f.batch(&high.id).await.started_at.is_some());
    assert_eq!(
        f.event_types(&high.id).await,
        vec!["batch.created", "batch.started", "item.started", "item.started"]
    );
    assert_eq!(f.claim("q", 10).await.len(), 1, "one item left in the queue");
    assert!(f.claim("q", 10).await.is_empty());
    f.assert_counts_match_items(&low.id).await;
}

async fn completing_every_item_completes_the_batch(f: Fixture) {
    let (b, _) = f.submit(batch("default", 3)).await;
    let claimed = f.claim("default", 3).await;
    for (i, item) in claimed.iter().enumerate() {
        assert_eq!(f.complete(item).await, FinishResult::Applied(ItemStatus::Completed));
        let batch = f.batch(&b.id).await;
        assert_eq!(batch.counts.completed, i as i64 + 1);
        f.assert_counts_match_items(&b.id).await;
    }
    let batch = f.batch(&b.id).await;
    assert_eq!(batch.status, BatchStatus::Completed);
    assert!(batch.completed_at.is_some());
    assert!((batch.counts.progress() - 1.0).abs() < f64::EPSILON);
    let items = f.items(&b.id).await;
    assert_eq!(items[2].result, Some(json!({"done": 2})));
    assert!(
        items
            .iter()
            .all(|i| i.completed_at.is_some() && i.lease_expires_at.is_none())
    );
    let types = f.event_types(&b.id).await;
    assert_eq!(types.iter().filter(|t| *t == "item.completed").count(), 3);
    assert_eq!(types.last().map(String::as_str), Some("batch.completed"));
}

async fn a_stale_lease_token_changes_nothing(f: Fixture) {
    let (b, _) = f.submit(batch("default", 1)).await;
    let item = f.claim("default", 1).await.remove(0);
    let events_before = f.event_types(&b.id).await;
    let mut stale = item.clone();
    stale.lease_token = "not-the-token".into();
    assert_eq!(f.complete(&stale).await, FinishResult::LeaseLost);
    assert_eq!(
        f.store
            .renew_lease(&item.id, "not-the-token", Duration::from_secs(5))
            .await
            .expect("renew"),
        LeaseState::Lost
    );
    let report = ItemReport {
        message: Some("x".into()),
        ..Default::default()
    };
    assert_eq!(
        f.store.report(&item.id, "not-the-token", report).await.expect("report"),
        LeaseState::Lost
    );
    assert_eq!(f.event_types(&b.id).await, events_before, "no event was written");
    let batch = f.batch(&b.id).await;
    assert_eq!((batch.counts.running, batch.counts.completed), (1, 0));
    // The real holder still finishes, exactly once.
    assert_eq!(f.complete(&item).await, FinishResult::Applied(ItemStatus::Completed));
    assert_eq!(f.complete(&item).await, FinishResult::LeaseLost);
    f.assert_counts_match_items(&b.id).await;
}

async fn transient_failures_retry_after_the_backoff(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 1)).await;
    let item = f.claim("default", 1).await.remove(0);
    assert_eq!(
        f.finish(&item, failure("boom", true)).await,
        FinishResult::Applied(ItemStatus::Pending)
    );
    let stored = f.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(stored.error.as_deref(), Some("boom"));
    assert_eq!(stored.attempts, 1);
    let retry_at = stored.next_attempt_at.expect("a retry time");
    let delay = retry_at - f.clock.now();
    assert!(
        delay >= time::Duration::milliseconds(500) && delay <= time::Duration::seconds(1),
        "{delay}"
    );
    assert_eq!(stored.position, None, "waiting for its backoff, not ready");
    assert!(f.claim("default", 1).await.is_empty(), "not before the backoff");
    f.clock.advance(Duration::from_secs(1));
    let again = f.claim("default", 1).await.remove(0);
    assert_eq!(again.attempt, 2);
    assert!(f.event_types(&b.id).await.contains(&"item.retry_scheduled".to_owned()));
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Running);
    f.assert_counts_match_items(&b.id).await;
}

async fn permanent_failures_and_used_up_attempts_fail(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 2)).await;
    let claimed = f.claim("default", 2).await;
    assert_eq!(
        f.finish(&claimed[0], failure("bad input", false)).await,
        FinishResult::Applied(ItemStatus::Failed)
    );
    // The second fails on every attempt until its three attempts are used up.
    let mut item = claimed[1].clone();
    for attempt in 1..=3 {
        assert_eq!(item.attempt, attempt);
        let expected = if attempt < 3 {
            ItemStatus::Pending
        } else {
            ItemStatus::Failed
        };
        assert_eq!(
            f.finish(&item, failure(&"x".repeat(5_000), true)).await,
            FinishResult::Applied(expected)
        );
        f.clock.advance(Duration::from_secs(600));
        if attempt < 3 {
            item = f.claim("default", 1).await.remove(0);
        }
    }
    let stored = f.store.get_item(Scope::All, &ids[1]).await.expect("item");
    assert_eq!(stored.status, ItemStatus::Failed);
    assert_eq!(
        stored.error.map(|e| e.chars().count()),
        Some(1_000),
        "errors are truncated"
    );
    let batch = f.batch(&b.id).await;
    assert_eq!(batch.status, BatchStatus::Failed, "no item completed");
    assert_eq!(batch.counts.failed, 2);
    f.assert_counts_match_items(&b.id).await;
}

async fn fail_batch_fails_the_batch_and_cancels_the_rest(f: Fixture) {
    let strict = NewBatch {
        on_item_failure: batchd_domain::OnItemFailure::FailBatch,
        ..batch("default", 4)
    };
    let (b, _) = f.submit(strict).await;
    let claimed = f.claim("default", 2).await;
    assert_eq!(
        f.finish(&claimed[0], failure("fatal", false)).await,
        FinishResult::Applied(ItemStatus::Failed)
    );
    let batch = f.batch(&b.id).await;
    assert_eq!(batch.status, BatchStatus::Failed);
    assert_eq!(
        (batch.counts.failed, batch.counts.cancelled, batch.counts.running),
        (1, 2, 1)
    );
    assert!(batch.error.as_deref().is_some_and(|e| e.contains("fatal")));
    // The item still running learns that it must stop, and ends cancelled.
    assert_eq!(
        f.store
            .renew_lease(&claimed[1].id, &claimed[1].lease_token, Duration::from_secs(5))
            .await
            .expect("renew"),
        LeaseState::Cancelled
    );
    assert_eq!(f.complete(&claimed[1]).await, FinishResult::ItemCancelled);
    f.assert_counts_match_items(&b.id).await;
    assert!(f.claim("default", 10).await.is_empty());
    // A retry brings back the failed item and those fail_batch cancelled.
    let retried = f.store.retry_batch(Scope::All, &b.id).await.expect("retry");
    assert_eq!(retried.status, BatchStatus::Running);
    assert_eq!(
        (retried.counts.pending, retried.counts.failed, retried.counts.cancelled),
        (4, 0, 0)
    );
    assert_eq!(f.claim("default", 10).await.len(), 4);
    f.assert_counts_match_items(&b.id).await;
}

async fn sequential_batches_run_one_item_at_a_time_in_order(f: Fixture) {
    let (b, _) = f.submit(sequential("q", 3)).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let claimed = f.claim("q", 10).await;
        assert_eq!(claimed.len(), 1, "never two items of a sequential batch at once");
        assert!(f.claim("q", 10).await.is_empty());
        order.push(input_n(&claimed[0]));
        f.complete(&claimed[0]).await;
    }
    assert_eq!(order, vec![json!(0), json!(1), json!(2)]);
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Completed);
    // A failed head is retried before the next starts, and a cancelled pending item is skipped.
    let (b2, ids) = f.submit(sequential("q", 3)).await;
    let head = f.claim("q", 10).await.remove(0);
    f.store
        .cancel_item(Scope::All, &ids[1])
        .await
        .expect("cancel the second");
    f.finish(&head, failure("again", true)).await;
    f.clock.advance(Duration::from_secs(10));
    let retry = f.claim("q", 10).await;
    assert_eq!(
        retry.iter().map(|c| (c.index, c.attempt)).collect::<Vec<_>>(),
        vec![(0, 2)]
    );
    f.complete(&retry[0]).await;
    let last = f.claim("q", 10).await;
    assert_eq!(last.iter().map(|c| c.index).collect::<Vec<_>>(), vec![2]);
    f.assert_counts_match_items(&b2.id).await;
}

async fn needs_input_waits_for_an_answer(f: Fixture) {
    let (b, ids) = f.submit(sequential("q", 2)).await;
    let item = f.claim("q", 1).await.remove(0);
    let question = json!("which account?");
    assert_eq!(
        f.finish(
            &item,
            Outcome::NeedsInput {
                question: question.clone()
            }
        )
        .await,
        FinishResult::Applied(ItemStatus::NeedsInput)
    );
    let batch = f.batch(&b.id).await;
    assert_eq!((batch.status, batch.counts.needs_input), (BatchStatus::Running, 1));
    assert!(
        f.claim("q", 10).await.is_empty(),
        "the sequential batch waits for the answer"
    );
    let stored = f.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(stored.question, Some(question));
    // Answering a pending item is refused with its status.
    match f.store.answer_item(Scope::All, &ids[1], json!(1)).await {
        Err(batchd_storage::StoreError::InvalidState(e)) => assert_eq!(e.current, "pending"),
        other => panic!("expected invalid_state, got {other:?}"),
    }
    let answered = f
        .store
        .answer_item(Scope::All, &ids[0], json!({"account": 7}))
        .await
        .expect("answer");
    assert_eq!(answered.status, ItemStatus::Pending);
    let again = f.claim("q", 1).await.remove(0);
    assert_eq!(again.id, ids[0]);
    assert_eq!(again.answer, Some(json!({"account": 7})));
    assert!(
        f.event_types(&b.id)
            .await
            .ends_with(&["item.input_received".to_owned(), "item.started".to_owned()])
    );
    f.assert_counts_match_items(&b.id).await;
}

async fn expired_leases_go_back_with_the_attempt_counted(f: Fixture) {
    let (b, ids) = f
        .submit(NewBatch {
            items: batch("default", 1)
                .items
                .into_iter()
                .map(|mut i| {
                    i.max_attempts = 2;
                    i
                })
                .collect(),
            ..batch("default", 1)
        })
        .await;
    let first = f.claim("default", 1).await.remove(0);
    assert_eq!(
        f.store.requeue_expired_leases().await.expect("requeue"),
        0,
        "the lease still holds"
    );
    f.clock.advance(Duration::from_secs(31));
    assert_eq!(f.store.requeue_expired_leases().await.expect("requeue"), 1);
    let stored = f.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!((stored.status, stored.attempts), (ItemStatus::Pending, 1));
    assert!(f.event_types(&b.id).await.contains(&"item.lease_expired".to_owned()));
    let second = f.claim("default", 1).await.remove(0);
    assert_eq!(second.attempt, 2);
    assert_eq!(
        f.complete(&first).await,
        FinishResult::LeaseLost,
        "the dead worker's late result is rejected"
    );
    // The second attempt's lease expires too: attempts are used up, so it fails.
    f.clock.advance(Duration::from_secs(31));
    assert_eq!(f.store.requeue_expired_leases().await.expect("requeue"), 1);
    let stored = f.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(stored.status, ItemStatus::Failed);
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Failed);
    f.assert_counts_match_items(&b.id).await;
}

async fn released_items_keep_their_attempt(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 1)).await;
    let item = f.claim("default", 1).await.remove(0);
    assert_eq!(
        f.finish(&item, Outcome::Released).await,
        FinishResult::Applied(ItemStatus::Pending)
    );
    let stored = f.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!((stored.status, stored.attempts), (ItemStatus::Pending, 0));
    assert_eq!(f.claim("default", 1).await.remove(0).attempt, 1);
    f.assert_counts_match_items(&b.id).await;
}

async fn reports_and_renewals_hold_the_lease(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 1)).await;
    let item = f.claim("default", 1).await.remove(0);
    let report = ItemReport {
        step: Some("fetch".into()),
        message: Some("fetching".into()),
        progress: Some((1, Some(4))),
        ..Default::default()
    };
    assert!(matches!(
        f.store
            .report(&item.id, &item.lease_token, report)
            .await
            .expect("report"),
        LeaseState::Held(_)
    ));
    f.clock.advance(Duration::from_secs(20));
    let renewed = f
        .store
        .renew_lease(&item.id, &item.lease_token, Duration::from_secs(30))
        .await
        .expect("renew");
    assert_eq!(renewed, LeaseState::Held(f.clock.now() + Duration::from_secs(30)));
    f.clock.advance(Duration::from_secs(20));
    assert_eq!(
        f.store.requeue_expired_leases().await.expect("requeue"),
        0,
        "the renewed lease holds"
    );
    let stored = f.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(stored.step.as_deref(), Some("fetch"));
    assert_eq!(stored.message.as_deref(), Some("fetching"));
    assert_eq!(stored.progress, Some((1, Some(4))));
    let events = f.store.read_events(Scope::All, &b.id, 0, 100).await.expect("events");
    let step = events
        .iter()
        .find(|e| e.event_type.to_string() == "item.step")
        .expect("a step event");
    assert_eq!(step.step.as_deref(), Some("fetch"));
    assert_eq!(step.item_index, Some(0));
}

async fn delayed_batches_wait_for_run_at(f: Fixture) {
    let later = f.clock.now() + Duration::from_secs(60);
    let (b, _) = f
        .submit(NewBatch {
            run_at: Some(later),
            ..batch("default", 1)
        })
        .await;
    assert!(f.claim("default", 1).await.is_empty());
    assert_eq!(f.items(&b.id).await[0].position, None);
    f.clock.advance(Duration::from_secs(61));
    assert_eq!(f.claim("default", 1).await.len(), 1);
}

async fn notices_wake_waiters(f: Fixture) {
    let mut rx = f.store.subscribe();
    // A second instance on the same database sees the first one's notices too on PostgreSQL;
    // on SQLite a second store is a second process's view and has its own channel.
    let (b, _) = f.submit(batch("wake", 1)).await;
    let mut got_work = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !got_work {
        let notice = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a notice in time")
            .expect("open channel");
        got_work = notice == Notice::Work { queue: "wake".into() };
    }
    f.store.cancel_batch(Scope::All, &b.id).await.expect("cancel");
    let mut got_control = false;
    while !got_control {
        let notice = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a notice in time")
            .expect("open channel");
        got_control = notice == Notice::Control { batch_id: b.id.clone() };
    }
}

/// Completions of `items`, all with the same result, in one call: consecutive items of a
/// batch, started together, as a busy queue of no-op work finishes them.
fn same_result(items: &[batchd_storage::ClaimedItem]) -> Vec<Finish> {
    completions_with(items, |_| json!({"ok": true}))
}

async fn a_run_of_equal_results_completes_every_item(f: Fixture) {
    claimed_items_complete_out_of_order(f, 12, 10, |_| json!({"ok": true})).await;
}

/// Submits `n` items and claims `claim` of them, then finishes those in reverse order (as
/// results arrive), item `i` with `result(i)`: each is written once, with its own result.
async fn claimed_items_complete_out_of_order(f: Fixture, n: usize, claim: usize, result: impl Fn(i32) -> Value) {
    let (b, _) = f.submit(batch("q", n)).await;
    let claimed = f.claim("q", claim).await;
    f.clock.advance(Duration::from_secs(1));
    let mut finishes = completions_with(&claimed, |item| result(item.index));
    finishes.reverse();
    let results = f.store.finish(finishes).await.expect("finish");
    assert_eq!(results, vec![FinishResult::Applied(ItemStatus::Completed); claim]);
    let items = f.items(&b.id).await;
    for item in &items[..claim] {
        assert_eq!(item.status, ItemStatus::Completed);
        assert_eq!(item.result, Some(result(item.index)), "item {}", item.index);
        assert_eq!(item.attempts, 1);
        assert!(item.started_at.is_some_and(|at| Some(at) < item.completed_at));
    }
    assert!(
        items[claim..]
            .iter()
            .all(|i| i.status == ItemStatus::Pending && i.started_at.is_none())
    );
    let types = f.event_types(&b.id).await;
    assert_eq!(types.iter().filter(|t| *t == "item.completed").count(), claim);
    assert_eq!(f.batch(&b.id).await.counts.completed, claim as i64);
    f.assert_counts_match_items(&b.id).await;
    // Written once: the same completions again change nothing.
    let again = f.store.finish(same_result(&claimed)).await.expect("finish");
    assert_eq!(again, vec![FinishResult::LeaseLost; claim]);
    f.assert_counts_match_items(&b.id).await;
}

async fn a_run_skips_an_item_that_left_its_range(f: Fixture) {
    let (b, _) = f.submit(batch("q", 8)).await;
    let claimed = f.claim("q", 8).await;
    // Reporting progress takes an item out of its range: its row now runs on its own lease.
    let report = ItemReport {
        message: Some("halfway".into()),
        ..Default::default()
    };
    let state = f.store.report(&claimed[3].id, &claimed[3].lease_token, report).await;
    assert!(matches!(state.expect("report"), LeaseState::Held(_)));
    let results = f.store.finish(same_result(&claimed)).await.expect("finish");
    assert_eq!(results, vec![FinishResult::Applied(ItemStatus::Completed); 8]);
    let items = f.items(&b.id).await;
    assert!(
        items
            .iter()
            .all(|i| i.status == ItemStatus::Completed && i.attempts == 1)
    );
    assert_eq!(items[3].message.as_deref(), Some("halfway"));
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Completed);
    f.assert_counts_match_items(&b.id).await;
}

async fn a_run_naming_other_items_writes_only_the_right_ones(f: Fixture) {
    swapped_tokens_write_only_the_right_ones(f, 6, 2).await;
}

/// Submits and claims `n` items; items `k` and `k + 1` report with each other's tokens:
/// neither may be written, every other item is, and their own tokens still hold.
async fn swapped_tokens_write_only_the_right_ones(f: Fixture, n: usize, k: usize) {
    let (b, _) = f.submit(batch("q", n)).await;
    let claimed = f.claim("q", n).await;
    let mut finishes = same_result(&claimed);
    let token_k = finishes[k].lease_token.clone();
    finishes[k].lease_token = std::mem::replace(&mut finishes[k + 1].lease_token, token_k);
    let results = f.store.finish(finishes).await.expect("finish");
    let completed = FinishResult::Applied(ItemStatus::Completed);
    let swapped = |i: usize| i == k || i == k + 1;
    for (i, result) in results.iter().enumerate() {
        let expected = if swapped(i) { FinishResult::LeaseLost } else { completed };
        assert_eq!(*result, expected, "item {i}");
    }
    for (i, item) in f.items(&b.id).await.iter().enumerate() {
        let expected = if swapped(i) {
            ItemStatus::Running
        } else {
            ItemStatus::Completed
        };
        assert_eq!(item.status, expected, "item {i}");
    }
    f.assert_counts_match_items(&b.id).await;
    let results = f.store.finish(same_result(&claimed[k..k + 2])).await.expect("finish");
    assert_eq!(results, vec![completed; 2]);
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Completed);
    f.assert_counts_match_items(&b.id).await;
}

/// The lease id and secret of a range-claimed item's token (`lease.secret.index`).
fn lease_and_secret(item: &batchd_storage::ClaimedItem) -> (String, String) {
    let parts: Vec<&str> = item.lease_token.splitn(3, '.').collect();
    (parts[0].to_owned(), parts[1].to_owned())
}

async fn forged_range_tokens_write_nothing(f: Fixture) {
    let (b, _) = f.submit(batch("q", 8)).await;
    // One range lease over items 0 to 3; items 4 to 7 stay pending.
    let claimed = f.claim("q", 4).await;
    let parts: Vec<&str> = claimed[0].lease_token.splitn(3, '.').collect();
    let (lease, secret) = (parts[0], parts[1]);
    assert_eq!(parts[2], "0", "a range token names its item's index");
    let mut finishes = same_result(&claimed);
    // The right lease with another secret, an index the lease does not cover, a lease that
    // does not exist, and (item 3) its own token.
    finishes[0].lease_token = format!("{lease}.{}.0", secret.chars().rev().collect::<String>());
    finishes[1].lease_token = format!("{lease}.{secret}.7");
    finishes[2].lease_token = format!("{}.{secret}.2", lease.parse::<i64>().expect("a lease id") + 1000);
    let results = f.store.finish(finishes).await.expect("finish");
    let (lost, completed) = (FinishResult::LeaseLost, FinishResult::Applied(ItemStatus::Completed));
    assert_eq!(results, vec![lost, lost, lost, completed]);
    let items = f.items(&b.id).await;
    let statuses: Vec<ItemStatus> = items.iter().map(|i| i.status).collect();
    let (done, running, pending) = (ItemStatus::Completed, ItemStatus::Running, ItemStatus::Pending);
    assert_eq!(
        statuses,
        vec![running, running, running, done, pending, pending, pending, pending]
    );
    f.assert_counts_match_items(&b.id).await;
    // The true tokens still hold, once.
    let results = f.store.finish(same_result(&claimed[..3])).await.expect("finish");
    assert_eq!(results, vec![completed; 3]);
    let results = f.store.finish(same_result(&claimed[..3])).await.expect("finish");
    assert_eq!(results, vec![lost; 3]);
    f.assert_counts_match_items(&b.id).await;
}

fn completed(item: &batchd_storage::ClaimedItem) -> Finish {
    Finish {
        item_id: item.id.clone(),
        lease_token: item.lease_token.clone(),
        outcome: Outcome::Completed {
            result: json!({"done": item.index}),
        },
    }
}

async fn finish_and_claim_ends_and_starts_in_one_call(f: Fixture) {
    let (b, _) = f.submit(batch("q", 4)).await;
    let first = f.claim("q", 1).await;
    let (results, claimed) = f
        .store
        .finish_and_claim(vec![completed(&first[0])], vec![claim_request("q", 2)])
        .await
        .expect("finish and claim");
    assert_eq!(results, vec![FinishResult::Applied(ItemStatus::Completed)]);
    assert_eq!(claimed.len(), 1, "one list per claim request");
    let indexes: Vec<i32> = claimed[0].iter().map(|c| c.index).collect();
    assert_eq!(indexes, vec![1, 2], "claim order after the finished item");
    assert!(claimed[0].iter().all(|c| c.attempt == 1 && !c.lease_token.is_empty()));
    let batch = f.batch(&b.id).await;
    assert_eq!(batch.status, BatchStatus::Running);
    assert_eq!(
        (batch.counts.pending, batch.counts.running, batch.counts.completed),
        (1, 2, 1)
    );
    f.assert_counts_match_items(&b.id).await;
    assert_eq!(
        f.event_types(&b.id).await,
        [
            "batch.created",
            "batch.started",
            "item.started",
            "item.completed",
            "item.started",
            "item.started"
        ]
    );
    // The leases it handed out hold: their results apply.
    for item in &claimed[0] {
        assert_eq!(f.complete(item).await, FinishResult::Applied(ItemStatus::Completed));
    }
    // Nothing to finish and an empty request: nothing happens.
    let (results, claimed) = f
        .store
        .finish_and_claim(Vec::new(), vec![claim_request("q", 0)])
        .await
        .expect("no-op");
    assert!(results.is_empty());
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].is_empty());
}

/// A group that ends an item's own lease and makes another writes both lease statements in
/// one transaction (on PostgreSQL its last writes then cannot take the `COMMIT` with them,
/// and it commits on its own): both are kept, and seen from another connection.
async fn finish_and_claim_ends_one_item_lease_and_starts_another(f: Fixture) {
    let (a, _) = f.submit(sequential("q", 2)).await;
    f.clock.advance(Duration::from_millis(1));
    let (b, _) = f.submit(sequential("q", 1)).await;
    let heads = f.claim("q", 10).await;
    assert_eq!(
        heads.iter().map(|c| (c.batch_id.as_str(), c.index)).collect::<Vec<_>>(),
        vec![(a.id.as_str(), 0), (b.id.as_str(), 0)],
        "each sequential batch's head, one lease each"
    );
    f.clock.advance(Duration::from_millis(1));
    let (c, _) = f.submit(sequential("q", 1)).await;
    let (results, claimed) = f
        .store
        .finish_and_claim(vec![completed(&heads[0])], vec![claim_request("q", 1)])
        .await
        .expect("finish and claim");
    assert_eq!(results, vec![FinishResult::Applied(ItemStatus::Completed)]);
    assert_eq!(
        claimed[0]
            .iter()
            .map(|i| (i.batch_id.as_str(), i.index))
            .collect::<Vec<_>>(),
        vec![(c.id.as_str(), 0)],
        "the next ready item: the finished item's successor is unblocked only as the group ends"
    );
    let other = f.reopen().await;
    let seen = other.get_batch(Scope::All, &a.id).await.expect("batch a");
    assert_eq!((seen.counts.completed, seen.counts.pending), (1, 1));
    let seen = other.get_batch(Scope::All, &c.id).await.expect("batch c");
    assert_eq!((seen.status, seen.counts.running), (BatchStatus::Running, 1));
    // The new lease holds, and the finished item's successor is next.
    assert_eq!(
        f.complete(&claimed[0][0]).await,
        FinishResult::Applied(ItemStatus::Completed)
    );
    let next = f.claim("q", 10).await;
    assert_eq!(
        next.iter().map(|i| (i.batch_id.as_str(), i.index)).collect::<Vec<_>>(),
        vec![(a.id.as_str(), 1)]
    );
    for id in [&a.id, &b.id, &c.id] {
        f.assert_counts_match_items(id).await;
    }
}

async fn finish_and_claim_gives_nothing_of_a_batch_it_fails(f: Fixture) {
    let strict = NewBatch {
        on_item_failure: batchd_domain::OnItemFailure::FailBatch,
        ..batch("q", 4)
    };
    let (b, _) = f.submit(strict).await;
    let first = f.claim("q", 1).await;
    let fail = Finish {
        item_id: first[0].id.clone(),
        lease_token: first[0].lease_token.clone(),
        outcome: failure("fatal", false),
    };
    let (results, claimed) = f
        .store
        .finish_and_claim(vec![fail], vec![claim_request("q", 10)])
        .await
        .expect("finish and claim");
    assert_eq!(results, vec![FinishResult::Applied(ItemStatus::Failed)]);
    assert!(claimed[0].is_empty(), "the batch failed in the same transaction");
    let batch = f.batch(&b.id).await;
    assert_eq!(batch.status, BatchStatus::Failed);
    assert_eq!(
        (
            batch.counts.failed,
            batch.counts.cancelled,
            batch.counts.running,
            batch.counts.pending
        ),
        (1, 3, 0, 0)
    );
    f.assert_counts_match_items(&b.id).await;
    let types = f.event_types(&b.id).await;
    assert_eq!(types.iter().filter(|t| *t == "item.cancelled").count(), 3);
    assert_eq!(types.iter().filter(|t| *t == "item.started").count(), 1);
}

async fn finish_and_claim_never_gives_an_item_twice(f: Fixture) {
    let (b, _) = f.submit(batch("q", 5)).await;
    f.submit(batch("other", 2)).await;
    let (_, claimed) = f
        .store
        .finish_and_claim(
            Vec::new(),
            vec![claim_request("q", 2), claim_request("other", 1), claim_request("q", 2)],
        )
        .await
        .expect("claim");
    let sizes: Vec<usize> = claimed.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![2, 1, 2]);
    let mut ids: Vec<&str> = claimed.iter().flatten().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "every claimed item is distinct");
    assert_eq!(claimed[1][0].queue, "other");
    let batch = f.batch(&b.id).await;
    assert_eq!((batch.counts.running, batch.counts.pending), (4, 1));
    f.assert_counts_match_items(&b.id).await;
}

// The runs below are longer than the shortest run either backend writes with one statement
// (16 consecutive items of a lease on PostgreSQL, 4 on SQLite), so both ways are checked.

async fn long_runs_give_each_item_its_own_result(f: Fixture) {
    claimed_items_complete_out_of_order(f, 50, 40, |index| json!({"index": index})).await;
}

async fn a_long_run_naming_other_items_writes_only_the_right_ones(f: Fixture) {
    swapped_tokens_write_only_the_right_ones(f, 40, 20).await;
}

async fn a_long_run_past_its_lease_writes_only_what_it_covers(f: Fixture) {
    let (b, _) = f.submit(batch("q", 40)).await;
    // One range lease over items 0 to 19.
    let claimed = f.claim("q", 20).await;
    let (lease, secret) = lease_and_secret(&claimed[0]);
    let mut finishes = same_result(&claimed);
    // Item 20, pending, with that lease's secret and its own index: one past the lease.
    let item_20 = f.items(&b.id).await.remove(20);
    finishes.push(Finish {
        item_id: item_20.id.clone(),
        lease_token: format!("{lease}.{secret}.20"),
        outcome: Outcome::Completed {
            result: json!({"ok": true}),
        },
    });
    let results = f.store.finish(finishes).await.expect("finish");
    let completed = FinishResult::Applied(ItemStatus::Completed);
    assert_eq!(results[..20], vec![completed; 20]);
    assert_eq!(results[20], FinishResult::LeaseLost);
    let items = f.items(&b.id).await;
    assert!(items[..20].iter().all(|i| i.status == ItemStatus::Completed));
    assert!(
        items[20..]
            .iter()
            .all(|i| i.status == ItemStatus::Pending && i.started_at.is_none())
    );
    assert_eq!(f.batch(&b.id).await.counts.completed, 20);
    f.assert_counts_match_items(&b.id).await;
}

async fn a_long_run_of_a_cancelled_batch_ends_cancelled(f: Fixture) {
    let (b, _) = f.submit(batch("q", 30)).await;
    let claimed = f.claim("q", 30).await;
    let cancelling = f.store.cancel_batch(Scope::All, &b.id).await.expect("cancel");
    assert_eq!(cancelling.status, BatchStatus::Cancelling);
    assert_eq!(cancelling.counts.running, 30);
    let results = f.store.finish(same_result(&claimed)).await.expect("finish");
    assert_eq!(results, vec![FinishResult::ItemCancelled; 30]);
    let done = f.batch(&b.id).await;
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert_eq!((done.counts.completed, done.counts.cancelled), (0, 30));
    assert!(
        f.items(&b.id)
            .await
            .iter()
            .all(|i| i.status == ItemStatus::Cancelled && i.result.is_none())
    );
    assert!(!f.event_types(&b.id).await.contains(&"item.completed".to_owned()));
    f.assert_counts_match_items(&b.id).await;
}

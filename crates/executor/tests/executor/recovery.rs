//! Dead workers, pick-up without polling, and graceful shutdown.

use std::time::{Duration, Instant};

use batchd_domain::{BatchStatus, ItemStatus, Mode};
use batchd_storage::{ClaimRequest, Finish, FinishResult, Outcome, PageRequest, Scope};
use serde_json::json;

use crate::support::{Backend, Harness, both_backends, demo, queue};

both_backends!(
    a_dead_workers_item_is_rerun_after_its_lease_expires,
    running_items_keep_their_leases_past_their_length,
    an_idle_queue_picks_up_work_without_waiting_for_a_poll,
    shutdown_lets_short_items_finish,
    shutdown_hands_long_items_back_without_spending_an_attempt,
);

async fn a_dead_workers_item_is_rerun_after_its_lease_expires(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let (id, ids) = h
        .submit("q", Mode::Parallel, vec![json!({"result": "second try"})])
        .await;
    // A worker claims the item with a short lease and dies.
    let request = ClaimRequest {
        queue: "q".into(),
        max_items: 1,
        lease: Duration::from_millis(500),
        owner: "dead".into(),
    };
    let dead = h.store.claim(&request).await.expect("claim").remove(0);
    h.start(demo(), vec![queue("q", "demo", 2)], |_| {});
    let done = h.wait_until_ended(&id).await;
    assert_eq!(done.status, BatchStatus::Completed);
    let item = h.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(
        (item.attempts, item.result.clone()),
        (2, Some(json!("second try"))),
        "the lost attempt counts"
    );
    assert!(h.event_types(&id).await.contains(&"item.lease_expired".to_owned()));
    // The dead worker wakes up and reports: rejected.
    let late = Finish {
        item_id: dead.id,
        lease_token: dead.lease_token,
        outcome: Outcome::Completed { result: json!("late") },
    };
    assert_eq!(
        h.store.finish(vec![late]).await.expect("finish"),
        vec![FinishResult::LeaseLost]
    );
    assert_eq!(
        h.store.get_item(Scope::All, &ids[0]).await.expect("item").result,
        Some(json!("second try"))
    );
    h.shutdown().await;
}

async fn running_items_keep_their_leases_past_their_length(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    // Leases of 300 ms, items that run five times as long, expired leases looked for every
    // 100 ms: only renewals keep the items from being put back and run again.
    let mut q = queue("long", "demo", 8);
    q.lease = Duration::from_millis(300);
    h.start(demo(), vec![q], |_| {});
    let (first, _) = h
        .submit("long", Mode::Parallel, vec![json!({"sleep_ms": 1500}); 3])
        .await;
    // Items that start while others run, their renewals due at other times.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (second, _) = h
        .submit("long", Mode::Parallel, vec![json!({"sleep_ms": 1500}); 2])
        .await;
    for id in [&first, &second] {
        let done = h.wait_until_ended(id).await;
        assert_eq!(done.status, BatchStatus::Completed);
        let page = PageRequest {
            cursor: None,
            limit: 100,
        };
        let items = h.store.list_items(Scope::All, id, None, &page).await.expect("items");
        assert_eq!(items.rows.len(), done.counts.total as usize);
        assert!(
            items.rows.iter().all(|item| item.attempts == 1),
            "every item ran once: {:?}",
            items.rows.iter().map(|item| item.attempts).collect::<Vec<_>>()
        );
        assert!(!h.event_types(id).await.contains(&"item.lease_expired".to_owned()));
    }
    h.shutdown().await;
}

async fn an_idle_queue_picks_up_work_without_waiting_for_a_poll(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    // A minute-long fallback poll: only a notification can start the item in time.
    h.start(demo(), vec![queue("idle", "demo", 2)], |c| {
        c.poll_interval = Duration::from_secs(60)
    });
    // Let the loop reach its wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let submitted = Instant::now();
        let (id, _) = h.submit("idle", Mode::Parallel, vec![json!({})]).await;
        let done = h.wait_until_ended(&id).await;
        assert_eq!(done.status, BatchStatus::Completed);
        latencies.push(submitted.elapsed());
    }
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!("pick-up to completion on an idle queue ({backend:?}): {latencies:?}");
    assert!(
        worst < Duration::from_secs(30),
        "an item waited for the fallback poll ({worst:?})"
    );
    h.shutdown().await;
}

async fn shutdown_lets_short_items_finish(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    h.start(demo(), vec![queue("q", "demo", 4)], |c| {
        c.shutdown_grace = Duration::from_secs(20)
    });
    let (id, _) = h.submit("q", Mode::Parallel, vec![json!({"sleep_ms": 300}); 3]).await;
    h.wait_until(&id, "items running", |b| b.counts.running == 3).await;
    h.shutdown().await;
    let batch = h.batch(&id).await;
    assert_eq!(
        (batch.status, batch.counts.completed),
        (BatchStatus::Completed, 3),
        "running items finished in the grace period"
    );
}

async fn shutdown_hands_long_items_back_without_spending_an_attempt(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    h.start(demo(), vec![queue("q", "demo", 4)], |c| {
        c.shutdown_grace = Duration::from_millis(200)
    });
    let (id, ids) = h
        .submit("q", Mode::Parallel, vec![json!({"sleep_ms": 60_000}); 2])
        .await;
    h.wait_until(&id, "items running", |b| b.counts.running == 2).await;
    // The store counts an item running when its claim commits, a moment before the pool's
    // task registers it: wait for the pool too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.running() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool runs {} items, not 2",
            h.running()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.running(), 2);
    h.shutdown().await;
    let batch = h.batch(&id).await;
    assert_eq!((batch.counts.pending, batch.counts.running), (2, 0), "handed back");
    for item_id in &ids {
        let item = h.store.get_item(Scope::All, item_id).await.expect("item");
        assert_eq!(
            (item.status, item.attempts),
            (ItemStatus::Pending, 0),
            "the attempt is not spent"
        );
    }
}

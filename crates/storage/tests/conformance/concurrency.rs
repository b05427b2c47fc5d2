//! Eight concurrent claimers over 10,000 ready items: every item is claimed exactly once, no
//! sequential batch ever has two items running, and the counters equal a recount at the end.
//! Group transactions that overlap, as a writer runs them: they commit in turn.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use batchd_domain::{BatchStatus, ItemStatus, Mode};
use batchd_storage::{ClaimedItem, FinishResult, Scope};
use tokio::sync::Mutex;

use crate::support::{Fixture, batch, claim_request, completions, conformance, sequential};

conformance!(
    eight_claimers_claim_every_item_exactly_once,
    overlapping_groups_commit_in_turn
);

const CLAIMERS: usize = 8;
const PARALLEL_BATCHES: usize = 7;
const PARALLEL_ITEMS: usize = 1_400;
const SEQUENTIAL_BATCHES: usize = 2;
const SEQUENTIAL_ITEMS: usize = 100;
const TOTAL: usize = PARALLEL_BATCHES * PARALLEL_ITEMS + SEQUENTIAL_BATCHES * SEQUENTIAL_ITEMS;

#[derive(Default)]
struct Observed {
    claimed: HashSet<String>,
    duplicates: Vec<String>,
    running_in_sequential: HashMap<String, usize>,
    overlaps: Vec<String>,
}

async fn eight_claimers_claim_every_item_exactly_once(f: Fixture) {
    assert_eq!(TOTAL, 10_000);
    let mut batch_ids = Vec::new();
    for _ in 0..SEQUENTIAL_BATCHES {
        batch_ids.push(f.submit(sequential("load", SEQUENTIAL_ITEMS)).await.0.id);
    }
    for _ in 0..PARALLEL_BATCHES {
        batch_ids.push(f.submit(batch("load", PARALLEL_ITEMS)).await.0.id);
    }
    let observed = Arc::new(Mutex::new(Observed::default()));
    let finished = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut tasks = Vec::new();
    for _ in 0..CLAIMERS {
        let (store, observed, finished) = (f.store.clone(), observed.clone(), finished.clone());
        tasks.push(tokio::spawn(async move {
            let mut notices = store.subscribe();
            while finished.load(Ordering::SeqCst) < TOTAL {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the claimers did not finish in time"
                );
                let claimed = store.claim(&claim_request("load", 50)).await.expect("claim");
                if claimed.is_empty() {
                    // Wait for a wake-up (or a short fallback), never a fixed sleep.
                    let _ = tokio::time::timeout(Duration::from_millis(50), notices.recv()).await;
                    continue;
                }
                {
                    let mut o = observed.lock().await;
                    for item in &claimed {
                        if !o.claimed.insert(item.id.clone()) {
                            o.duplicates.push(item.id.clone());
                        }
                        if item.mode == Mode::Sequential {
                            let running = o.running_in_sequential.entry(item.batch_id.clone()).or_default();
                            *running += 1;
                            if *running > 1 {
                                o.overlaps.push(item.batch_id.clone());
                            }
                        }
                    }
                    // Released before the finish commits, so a claim that sees the next item
                    // of the batch can only come after it.
                    for item in claimed.iter().filter(|i| i.mode == Mode::Sequential) {
                        *o.running_in_sequential.entry(item.batch_id.clone()).or_default() -= 1;
                    }
                }
                let results = store.finish(completions(&claimed)).await.expect("finish");
                assert!(results.iter().all(|r| matches!(r, FinishResult::Applied(_))));
                finished.fetch_add(claimed.len(), Ordering::SeqCst);
            }
        }));
    }
    for task in tasks {
        task.await.expect("a claimer panicked");
    }
    let o = observed.lock().await;
    assert!(
        o.duplicates.is_empty(),
        "items claimed twice: {:?}",
        &o.duplicates[..o.duplicates.len().min(5)]
    );
    assert!(
        o.overlaps.is_empty(),
        "sequential batches with two items running: {:?}",
        o.overlaps
    );
    assert_eq!(o.claimed.len(), TOTAL);
    for id in &batch_ids {
        f.assert_counts_match_items(id).await;
        assert_eq!(f.batch(id).await.status, BatchStatus::Completed);
    }
}

/// The node's slots in `overlapping_groups_commit_in_turn`.
const SLOTS: usize = 60;
/// Groups in flight at once there.
const IN_FLIGHT: usize = 3;

/// Groups formed one after another, each in its turn, up to three in flight, as the pool's
/// writer forms them: each records the results of items that ran and claims for the slots
/// that earlier groups' results freed (a slot is free again once its result is handed over,
/// so the claim that reuses it may be in a later group than the result). Every item runs
/// exactly once, nothing waits forever, and since groups commit in turn, a batch never
/// shows more items running than there are slots.
async fn overlapping_groups_commit_in_turn(f: Fixture) {
    let (big, _) = f.submit(batch("turns", 1_000)).await;
    let (seq, _) = f.submit(sequential("turns", 20)).await;
    let total = 1_020;
    // Watches the big batch's running count while the groups commit.
    let stop = Arc::new(AtomicBool::new(false));
    let most_running = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (store, stop, most_running, id) = (f.store.clone(), stop.clone(), most_running.clone(), big.id.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let b = store.get_batch(Scope::All, &id).await.expect("the batch");
                most_running.fetch_max(b.counts.running, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut groups = tokio::task::JoinSet::new();
    // Slots free, and slots the last group's results freed (the next group's claim takes
    // both, though those results may not have committed yet).
    let (mut free, mut freeing) = (SLOTS, 0);
    let mut ran: Vec<ClaimedItem> = Vec::new();
    let mut seen = HashSet::new();
    let mut finished = 0;
    while finished < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the groups did not finish in time"
        );
        while groups.len() < IN_FLIGHT && (!ran.is_empty() || free + freeing > 0) {
            let finishes = completions(&ran);
            ran.clear();
            let want = free + freeing;
            free = 0;
            freeing = finishes.len();
            let store = f.store.clone();
            let turn = store.group_turn();
            groups.spawn(async move {
                let outcome = store
                    .finish_and_claim_in_turn(turn, finishes, vec![claim_request("turns", want)])
                    .await;
                (want, outcome)
            });
        }
        let Some(done) = groups.join_next().await else {
            continue;
        };
        let (want, outcome) = done.expect("a group task panicked");
        let (results, mut claimed) = outcome.expect("a group transaction");
        assert!(
            results
                .iter()
                .all(|r| *r == FinishResult::Applied(ItemStatus::Completed)),
            "{results:?}"
        );
        finished += results.len();
        let claimed = claimed.pop().unwrap_or_default();
        free += want - claimed.len();
        for item in claimed {
            assert!(seen.insert(item.id.clone()), "item {} claimed twice", item.id);
            ran.push(item);
        }
    }
    stop.store(true, Ordering::SeqCst);
    watcher.await.expect("the watcher");
    assert_eq!(seen.len(), total);
    let most = most_running.load(Ordering::SeqCst);
    assert!(
        most <= SLOTS as i64,
        "{most} items of one batch showed running with {SLOTS} slots"
    );
    for id in [&big.id, &seq.id] {
        f.assert_counts_match_items(id).await;
        assert_eq!(f.batch(id).await.status, BatchStatus::Completed);
    }
}

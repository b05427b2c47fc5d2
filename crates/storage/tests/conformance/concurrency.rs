//! Eight concurrent claimers over 10,000 ready items: every item is claimed exactly once, no
//! sequential batch ever has two items running, and the counters equal a recount at the end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use batchd_domain::{BatchStatus, Mode};
use batchd_storage::{Finish, Outcome};
use serde_json::json;
use tokio::sync::Mutex;

use crate::support::{Fixture, batch, claim_request, conformance, sequential};

conformance!(eight_claimers_claim_every_item_exactly_once);

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
                let finishes = claimed
                    .iter()
                    .map(|item| Finish {
                        item_id: item.id.clone(),
                        lease_token: item.lease_token.clone(),
                        outcome: Outcome::Completed {
                            result: json!(item.index),
                        },
                    })
                    .collect();
                let results = store.finish(finishes).await.expect("finish");
                assert!(
                    results
                        .iter()
                        .all(|r| matches!(r, batchd_storage::FinishResult::Applied(_)))
                );
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

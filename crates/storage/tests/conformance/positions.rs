//! Queue positions against a recount: every item's position as the store reports it equals
//! the one counted here from the definition (DESIGN.md, "Item"), through claims, finishes,
//! retries with backoff, pauses, `run_at`, cancels, retries of batches and purges.

use std::collections::HashMap;
use std::time::Duration;

use batchd_domain::{BatchStatus, ItemStatus};
use batchd_storage::{Finish, ItemRecord, NewBatch, Outcome, PageRequest, Scope};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use time::OffsetDateTime;

use crate::support::{Fixture, batch, conformance, failure, sequential};

conformance!(
    positions_match_a_recount_through_a_history,
    positions_match_a_recount_on_random_histories
);

/// The batches of one queue, in submission order (which is claim order within a priority).
struct Queue {
    name: String,
    batches: Vec<(String, i32)>,
    paused: bool,
}

impl Queue {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            batches: Vec::new(),
            paused: false,
        }
    }

    async fn submit(&mut self, f: &Fixture, new: NewBatch) -> String {
        let priority = new.priority;
        let (b, _) = f
            .submit(NewBatch {
                queue: self.name.clone(),
                ..new
            })
            .await;
        self.batches.push((b.id.clone(), priority));
        b.id
    }

    async fn set_paused(&mut self, f: &Fixture, paused: bool) {
        f.store
            .set_queue_paused(&self.name, paused)
            .await
            .expect("pause the queue");
        self.paused = paused;
    }

    /// Every item of the queue as `list_items` shows it, in claim order, and the position
    /// each should have by the definition. Purged batches are skipped.
    async fn expected(&self, f: &Fixture) -> Vec<(ItemRecord, Option<i64>)> {
        let now = f.clock.now();
        let mut all = Vec::new();
        for (order, (id, priority)) in self.batches.iter().enumerate() {
            let Ok(b) = f.store.get_batch(Scope::All, id).await else {
                continue;
            };
            let batch_ready =
                matches!(b.status, BatchStatus::Pending | BatchStatus::Running) && b.run_at.is_none_or(|t| t <= now);
            for item in f.items(id).await {
                let ready = !self.paused
                    && batch_ready
                    && item.status == ItemStatus::Pending
                    && item.next_attempt_at.is_none_or(|t| t <= now);
                all.push(((-priority, order, item.index), ready, item));
            }
        }
        all.sort_by_key(|(key, ..)| *key);
        let mut rank = 0;
        all.into_iter()
            .map(|(_, ready, item)| {
                let position = ready.then(|| {
                    rank += 1;
                    rank
                });
                (item, position)
            })
            .collect()
    }

    /// The store's positions equal the recount, through `list_items`, `get_item` and
    /// `list_recent_items`.
    async fn check(&self, f: &Fixture, since: OffsetDateTime, what: &str) -> Result<(), String> {
        let expected = self.expected(f).await;
        let mut wrong = Vec::new();
        for (item, position) in &expected {
            if item.position != *position {
                wrong.push(format!(
                    "{} #{}: {:?}, expected {position:?}",
                    item.batch_id, item.index, item.position
                ));
            }
        }
        // `get_item` counts one item alone; sample a few, the ready ones first.
        for (item, position) in expected.iter().filter(|(_, p)| p.is_some()).step_by(97).take(8) {
            let got = f
                .store
                .get_item(Scope::All, &item.id)
                .await
                .expect("get the item")
                .position;
            if got != *position {
                wrong.push(format!(
                    "get_item {} #{}: {got:?}, expected {position:?}",
                    item.batch_id, item.index
                ));
            }
        }
        let want: HashMap<&str, Option<i64>> = expected.iter().map(|(i, p)| (i.id.as_str(), *p)).collect();
        let mut cursor = None;
        loop {
            let page = f
                .store
                .list_recent_items(Scope::All, since, &PageRequest { cursor, limit: 700 })
                .await
                .expect("list recent items");
            for item in &page.rows {
                if let Some(position) = want.get(item.id.as_str()).filter(|p| item.position != **p) {
                    wrong.push(format!(
                        "recent {} #{}: {:?}, expected {position:?}",
                        item.batch_id, item.index, item.position
                    ));
                }
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            wrong.truncate(10);
            Err(format!("{what}: {}", wrong.join("; ")))
        }
    }
}

async fn finish_all(f: &Fixture, claimed: &[batchd_storage::ClaimedItem], outcome: impl Fn(usize) -> Outcome) {
    let finishes = claimed
        .iter()
        .enumerate()
        .map(|(i, c)| Finish {
            item_id: c.id.clone(),
            lease_token: c.lease_token.clone(),
            outcome: outcome(i),
        })
        .collect();
    f.store.finish(finishes).await.expect("finish");
}

async fn positions_match_a_recount_through_a_history(f: Fixture) {
    let since = f.clock.now();
    let mut q = Queue::new("positions");
    let mut other = Queue::new("positions-other");
    let check = async |q: &Queue, what: &str| q.check(&f, since, what).await.unwrap_or_else(|e| panic!("{e}"));
    // Enough items for several buckets of 1,024, in two priorities and two queues.
    let big = q.submit(&f, batch("", 1_500)).await;
    other.submit(&f, batch("", 700)).await;
    let seq = q.submit(&f, sequential("", 5)).await;
    let later = q
        .submit(
            &f,
            NewBatch {
                run_at: Some(f.clock.now() + Duration::from_secs(60)),
                ..batch("", 30)
            },
        )
        .await;
    let urgent = q
        .submit(
            &f,
            NewBatch {
                priority: 3,
                ..batch("", 1_200)
            },
        )
        .await;
    let paused = q.submit(&f, batch("", 900)).await;
    let tail = q.submit(&f, batch("", 40)).await;
    f.store.pause_batch(Scope::All, &paused).await.expect("pause");
    check(&q, "after submits").await;
    check(&other, "the other queue").await;

    // Claims take the urgent items first; some finish, some fail into a backoff, some go back.
    let claimed = f.claim(&q.name, 250).await;
    assert!(claimed.iter().all(|c| c.batch_id == urgent));
    finish_all(&f, &claimed, |i| match i % 3 {
        0 => Outcome::Completed {
            result: serde_json::json!(i),
        },
        1 => failure("try again", true),
        _ => Outcome::Released,
    })
    .await;
    check(&q, "after a claim with retries").await;

    // Drain the urgent batch and reach the big one; its retries wait behind their backoff.
    loop {
        let claimed = f.claim(&q.name, 400).await;
        let done = claimed.iter().any(|c| c.batch_id == big);
        finish_all(&f, &claimed, |i| {
            if i % 5 == 0 {
                failure("again", true)
            } else {
                Outcome::Completed {
                    result: serde_json::json!(i),
                }
            }
        })
        .await;
        if done {
            break;
        }
    }
    check(&q, "with backoffs ahead").await;
    f.clock.advance(Duration::from_secs(2));
    check(&q, "some backoffs over").await;

    // `run_at` passes; the paused batch resumes, then another pauses; the queue pauses.
    f.clock.advance(Duration::from_secs(60));
    check(&q, "run_at passed").await;
    f.store.resume_batch(Scope::All, &paused).await.expect("resume");
    f.store.pause_batch(Scope::All, &later).await.expect("pause");
    check(&q, "pause moved").await;
    q.set_paused(&f, true).await;
    check(&q, "queue paused").await;
    q.set_paused(&f, false).await;

    // Cancels: one item, a whole batch; the sequential batch moves on.
    let first_of_tail = f.items(&tail).await.remove(0);
    f.store
        .cancel_item(Scope::All, &first_of_tail.id)
        .await
        .expect("cancel item");
    f.store.cancel_batch(Scope::All, &paused).await.expect("cancel batch");
    check(&q, "after cancels").await;
    let claimed = f.claim(&q.name, 3_000).await;
    assert!(claimed.iter().any(|c| c.batch_id == seq));
    finish_all(&f, &claimed, |i| {
        if i % 4 == 0 {
            failure("no", false)
        } else {
            Outcome::Completed {
                result: serde_json::json!(i),
            }
        }
    })
    .await;
    check(&q, "after most finished").await;

    // A retried batch queues its failed items again at their old places; a purge removes
    // finished batches and their items.
    let big_batch = f.batch(&big).await;
    if big_batch.status.is_terminal() {
        f.store.retry_batch(Scope::All, &big).await.expect("retry");
    }
    check(&q, "after a batch retry").await;
    f.clock.advance(Duration::from_secs(3_600));
    f.store.purge_finished(f.clock.now()).await.expect("purge");
    check(&q, "after a purge").await;
    check(&other, "the other queue at the end").await;
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    Submit {
        items: usize,
        priority: i32,
        sequential: bool,
        delay_secs: Option<u64>,
    },
    Claim {
        n: usize,
        outcome: u8,
    },
    Pause(usize),
    Resume(usize),
    Cancel(usize),
    Retry(usize),
    PauseQueue(bool),
    Advance(u64),
    Purge,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1..40usize, 0..3i32, any::<bool>(), proptest::option::weighted(0.2, 1..30u64)).prop_map(
            |(items, priority, sequential, delay_secs)| Step::Submit { items, priority, sequential, delay_secs }
        ),
        4 => (1..30usize, 0..4u8).prop_map(|(n, outcome)| Step::Claim { n, outcome }),
        1 => any::<usize>().prop_map(Step::Pause),
        1 => any::<usize>().prop_map(Step::Resume),
        1 => any::<usize>().prop_map(Step::Cancel),
        1 => any::<usize>().prop_map(Step::Retry),
        1 => any::<bool>().prop_map(Step::PauseQueue),
        2 => (1..20u64).prop_map(Step::Advance),
        1 => Just(Step::Purge),
    ]
}

/// Runs a history on a queue of its own and checks the positions after every step.
async fn run_history(f: &Fixture, case: usize, steps: &[Step]) -> Result<(), String> {
    // Earlier cases' items are older than `since`, so `list_recent_items` shows this one's.
    f.clock.advance(Duration::from_secs(1));
    let since = f.clock.now();
    let mut q = Queue::new(&format!("random-{case}"));
    let pick = |q: &Queue, i: usize| (!q.batches.is_empty()).then(|| q.batches[i % q.batches.len()].0.clone());
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Submit {
                items,
                priority,
                sequential: seq,
                delay_secs,
            } => {
                let new = if *seq {
                    sequential("", *items)
                } else {
                    batch("", *items)
                };
                let run_at = delay_secs.map(|s| f.clock.now() + Duration::from_secs(s));
                q.submit(
                    f,
                    NewBatch {
                        priority: *priority,
                        run_at,
                        ..new
                    },
                )
                .await;
            }
            Step::Claim { n, outcome } => {
                let claimed = f.claim(&q.name, *n).await;
                finish_all(f, &claimed, |i| match (usize::from(*outcome) + i) % 4 {
                    0 => Outcome::Completed {
                        result: serde_json::json!(i),
                    },
                    1 => failure("again", true),
                    2 => failure("never", false),
                    _ => Outcome::Released,
                })
                .await;
            }
            Step::Pause(i) | Step::Resume(i) | Step::Cancel(i) | Step::Retry(i) => {
                let Some(id) = pick(&q, *i) else { continue };
                // Refusals (a batch in the wrong state, or purged) change nothing.
                let _ = match step {
                    Step::Pause(_) => f.store.pause_batch(Scope::All, &id).await,
                    Step::Resume(_) => f.store.resume_batch(Scope::All, &id).await,
                    Step::Cancel(_) => f.store.cancel_batch(Scope::All, &id).await,
                    _ => f.store.retry_batch(Scope::All, &id).await,
                };
            }
            Step::PauseQueue(paused) => q.set_paused(f, *paused).await,
            Step::Advance(secs) => f.clock.advance(Duration::from_secs(*secs)),
            Step::Purge => {
                f.store.purge_finished(f.clock.now()).await.expect("purge");
            }
        }
        q.check(f, since, &format!("step {n} ({step:?})")).await?;
    }
    Ok(())
}

async fn positions_match_a_recount_on_random_histories(f: Fixture) {
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::cell::Cell::new(0);
    let handle = tokio::runtime::Handle::current();
    let result = runner.run(&proptest::collection::vec(step(), 1..25), |steps| {
        case.set(case.get() + 1);
        tokio::task::block_in_place(|| handle.block_on(run_history(&f, case.get(), &steps)))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

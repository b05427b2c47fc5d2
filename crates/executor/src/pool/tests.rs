//! The writer's rule for a second group in flight (`MIN_OVERLAPPED_GROUP`), driven over a
//! store whose group transactions end only when the test lets them, on a paused clock.

use std::sync::Mutex;

use batchd_domain::ItemStatus;
use batchd_storage::{
    BatchFilter, BatchRecord, CreateOutcome, DeliveryAttempt, DeliveryNext, DeliveryRecord, DueDelivery, EventRecord,
    ItemRecord, ItemReport, NewBatch, Page, PageRequest, QueueStats, Readiness,
};
use time::OffsetDateTime;

use super::*;

/// A store that allows two group transactions at once, records the claims each carried, and
/// holds each open until the test releases one.
#[derive(Debug)]
struct GatedStore {
    groups: Mutex<Vec<Vec<usize>>>,
    release: Semaphore,
}

impl GatedStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            groups: Mutex::new(Vec::new()),
            release: Semaphore::new(0),
        })
    }

    /// The claims' sizes of each group begun so far, in the order they began.
    fn groups(&self) -> Vec<Vec<usize>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[async_trait::async_trait]
impl Store for GatedStore {
    fn group_overlap(&self) -> usize {
        2
    }

    fn group_turn(&self) -> Turn {
        Turn::unordered()
    }

    async fn finish_and_claim_in_turn(
        &self,
        turn: Turn,
        finishes: Vec<Finish>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<FinishResult>, Vec<Vec<ClaimedItem>>), StoreError> {
        // Its first phase is over at once: only the number in flight holds the next group.
        drop(turn);
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(claims.iter().map(|c| c.max_items).collect());
        self.release.acquire().await.expect("the gate stays open").forget();
        let results = finishes.iter().map(|_| FinishResult::LeaseLost).collect();
        Ok((results, claims.iter().map(|_| Vec::new()).collect()))
    }

    fn backend(&self) -> &'static str {
        unreachable!("the writer does not call this")
    }

    async fn readiness(&self) -> Readiness {
        unreachable!("the writer does not call this")
    }

    async fn migrate(&self) -> Result<usize, StoreError> {
        unreachable!("the writer does not call this")
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        unreachable!("the writer does not call this")
    }

    async fn create_batch(&self, _batch: NewBatch) -> Result<CreateOutcome, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn get_batch(&self, _scope: Scope<'_>, _id: &str) -> Result<BatchRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn list_batches(
        &self,
        _scope: Scope<'_>,
        _filter: &BatchFilter,
        _page: &PageRequest,
    ) -> Result<Page<BatchRecord>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn list_items(
        &self,
        _scope: Scope<'_>,
        _batch_id: &str,
        _status: Option<ItemStatus>,
        _page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn list_recent_items(
        &self,
        _scope: Scope<'_>,
        _since: OffsetDateTime,
        _page: &PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn get_item(&self, _scope: Scope<'_>, _id: &str) -> Result<ItemRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn read_events(
        &self,
        _scope: Scope<'_>,
        _batch_id: &str,
        _after: i64,
        _limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn claim(&self, _request: &ClaimRequest) -> Result<Vec<ClaimedItem>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn renew_lease(
        &self,
        _item_id: &str,
        _lease_token: &str,
        _lease: Duration,
    ) -> Result<LeaseState, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn report(&self, _item_id: &str, _lease_token: &str, _report: ItemReport) -> Result<LeaseState, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn finish(&self, _finishes: Vec<Finish>) -> Result<Vec<FinishResult>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn requeue_expired_leases(&self) -> Result<usize, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn cancel_batch(&self, _scope: Scope<'_>, _id: &str) -> Result<BatchRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn pause_batch(&self, _scope: Scope<'_>, _id: &str) -> Result<BatchRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn resume_batch(&self, _scope: Scope<'_>, _id: &str) -> Result<BatchRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn retry_batch(&self, _scope: Scope<'_>, _id: &str) -> Result<BatchRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn cancel_item(&self, _scope: Scope<'_>, _id: &str) -> Result<ItemRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn answer_item(&self, _scope: Scope<'_>, _id: &str, _answer: Value) -> Result<ItemRecord, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn set_queue_paused(&self, _queue: &str, _paused: bool) -> Result<(), StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn purge_finished(&self, _before: OffsetDateTime) -> Result<usize, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn claim_deliveries(&self, _max: usize, _lease: Duration) -> Result<Vec<DueDelivery>, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn record_delivery_attempt(
        &self,
        _delivery_id: &str,
        _lease_token: &str,
        _attempt: DeliveryAttempt,
        _next: DeliveryNext,
    ) -> Result<bool, StoreError> {
        unreachable!("the writer does not call this")
    }

    async fn list_deliveries(
        &self,
        _scope: Scope<'_>,
        _batch_id: &str,
        _page: &PageRequest,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        unreachable!("the writer does not call this")
    }
}

/// Asks the writer to claim `max_items`; the answer comes when the claim's group ends.
fn claim(
    writes: &mpsc::UnboundedSender<Write>,
    max_items: usize,
) -> oneshot::Receiver<Result<Vec<ClaimedItem>, String>> {
    let (reply, answer) = oneshot::channel();
    let request = ClaimRequest {
        queue: "q".to_owned(),
        max_items,
        lease: Duration::from_secs(30),
        owner: "test".to_owned(),
    };
    writes
        .send(Write::Claim(request, reply))
        .expect("the writer is running");
    answer
}

/// Lets every task run until all wait (the paused clock moves only then).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn a_small_group_waits_for_the_one_in_flight_and_takes_in_what_arrives_meanwhile() {
    let store = GatedStore::new();
    let (writes, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(writer(store.clone(), rx));

    let first = claim(&writes, MIN_OVERLAPPED_GROUP);
    settle().await;
    assert_eq!(store.groups(), vec![vec![MIN_OVERLAPPED_GROUP]]);

    let second = claim(&writes, 10);
    settle().await;
    assert_eq!(
        store.groups().len(),
        1,
        "a small group does not start beside a group in flight"
    );
    let third = claim(&writes, 20);
    settle().await;
    assert_eq!(store.groups().len(), 1);

    store.release.add_permits(1);
    settle().await;
    assert_eq!(
        store.groups(),
        vec![vec![MIN_OVERLAPPED_GROUP], vec![10, 20]],
        "once the group in flight ends, the waiting group takes in the claim that came meanwhile"
    );
    store.release.add_permits(1);
    for answer in [first, second, third] {
        let claimed = answer.await.expect("answered").expect("the group committed");
        assert!(claimed.is_empty());
    }
    drop(writes);
    writer.await.expect("the writer ends once its senders are gone");
}

#[tokio::test(start_paused = true)]
async fn a_large_group_starts_beside_the_one_in_flight() {
    let store = GatedStore::new();
    let (writes, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(writer(store.clone(), rx));

    let first = claim(&writes, 1);
    settle().await;
    let second = claim(&writes, MIN_OVERLAPPED_GROUP);
    settle().await;
    assert_eq!(
        store.groups(),
        vec![vec![1], vec![MIN_OVERLAPPED_GROUP]],
        "a group carrying at least MIN_OVERLAPPED_GROUP goes at once"
    );
    let third = claim(&writes, MIN_OVERLAPPED_GROUP);
    settle().await;
    assert_eq!(store.groups().len(), 2, "no more than two groups are in flight");

    store.release.add_permits(3);
    for answer in [first, second, third] {
        let claimed = answer.await.expect("answered").expect("the group committed");
        assert!(claimed.is_empty());
    }
    assert_eq!(store.groups().len(), 3);
    drop(writes);
    writer.await.expect("the writer ends once its senders are gone");
}

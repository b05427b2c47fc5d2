//! The worker pool: one claim loop per queue, one task per running item, a lease keeper
//! that renews the leases of all of them, a writer that records results and makes claims in
//! group commits, a watcher that relays control requests to running items, and a rescuer
//! that puts expired leases back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use batchd_domain::{BatchStatus, ItemSettings, ItemStatus, JsonMap, Mode, merge_config};
use batchd_storage::{
    ClaimRequest, ClaimedItem, Finish, FinishResult, FirstPhaseDone, LeaseState, Notice, Outcome, Scope, Store,
    StoreError, Turn,
};
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handler::{BatchContext, BatchInfo, Completion, Handler, HandlerError, HandlerRegistry, ItemContext, Retry};
use crate::limiter::TokenBucket;

/// Items claimed per claim at most: a claim is one transaction, and each costs about as much
/// as a hundred items' results, so the more a claim takes the cheaper each item. A queue
/// that finds the node's slots (`executor.max_running`, shared by every queue) all taken
/// waits for any queue's item to end, not only its own (see [`Inner::node_slot_freed`]).
const MAX_CLAIM: usize = 256;
/// While a queue has items running, it claims again only once this share of its slots
/// (at most `MAX_CLAIM`) is free: one claim of many items instead of many claims of one,
/// each its own transaction, as slots free up one by one.
const REFILL_DIVISOR: usize = 4;
/// Results written per group commit at most.
const MAX_FINISH_GROUP: usize = 500;
/// How many times the writer lets other tasks run, while forming a group, for the claims
/// that the group's results are about to cause.
const GATHER_YIELDS: usize = 3;
/// A group formed while another is in flight goes at once only if it carries at least this
/// many results and slots its claim loops ask to fill (a slot handed on with a result counts
/// once, as the result); a smaller one waits for the one in flight to end, and takes in what
/// arrives by then. Every group costs about the same fixed work whatever it carries, so with
/// few slots a second group in flight would only halve the groups.
const MIN_OVERLAPPED_GROUP: usize = 256;
/// How long a handler may go on after its item was cancelled before it is abandoned.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// One queue this node runs.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: String,
    /// The registered handler's name.
    pub handler: String,
    pub concurrency: usize,
    /// Items started per second; 0 for no limit.
    pub rate_per_second: f64,
    pub burst: u32,
    pub lease: Duration,
    /// The queue-level config under every batch's and item's: the server defaults, then the
    /// queue's own settings (`timeout_ms`, `max_attempts`, `backoff_base_ms`,
    /// `backoff_max_ms`) and its `defaults` table.
    pub defaults: JsonMap,
}

/// Told of every attempt that starts and ends here, e.g. to keep metrics.
pub trait ExecutorObserver: Send + Sync + 'static {
    /// An item started, `pickup` after it became ready to run.
    fn item_started(&self, queue: &str, pickup: Duration);
    /// An attempt ended with the item in `status` (`completed`, `failed`, `pending` for a
    /// retry, …), after running for `duration`.
    fn attempt_ended(&self, queue: &str, status: &str, duration: Duration);
}

/// The pool's settings.
#[derive(Clone)]
pub struct ExecutorConfig {
    /// This node's name, recorded as the lease owner.
    pub node_id: String,
    pub queues: Vec<QueueConfig>,
    /// Items running at once on this node, all queues together.
    pub max_running: usize,
    /// The fallback poll, for wake-ups that were lost and for retries coming due.
    pub poll_interval: Duration,
    /// How often expired leases are looked for.
    pub rescue_interval: Duration,
    /// How long running items may finish after shutdown begins.
    pub shutdown_grace: Duration,
    pub observer: Option<Arc<dyn ExecutorObserver>>,
}

impl std::fmt::Debug for ExecutorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorConfig")
            .field("node_id", &self.node_id)
            .field("queues", &self.queues)
            .field("max_running", &self.max_running)
            .field("poll_interval", &self.poll_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            node_id: format!("batchd-{}", std::process::id()),
            queues: Vec::new(),
            max_running: 256,
            poll_interval: Duration::from_secs(1),
            rescue_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            observer: None,
        }
    }
}

/// The pool could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    #[error("queue `{queue}` names handler `{handler}`, which is not registered")]
    UnknownHandler { queue: String, handler: String },
    #[error("queue `{0}` must have a concurrency of at least 1")]
    NoConcurrency(String),
}

/// Starts and stops the pool.
#[derive(Debug)]
pub struct Executor;

impl Executor {
    /// Starts a claim loop per queue and the pool's background tasks.
    pub fn start(
        store: Arc<dyn Store>,
        registry: HandlerRegistry,
        config: ExecutorConfig,
    ) -> Result<ExecutorHandle, ExecutorError> {
        let mut queues = Vec::new();
        for queue in &config.queues {
            let handler = registry
                .get(&queue.handler)
                .ok_or_else(|| ExecutorError::UnknownHandler {
                    queue: queue.name.clone(),
                    handler: queue.handler.clone(),
                })?;
            if queue.concurrency == 0 {
                return Err(ExecutorError::NoConcurrency(queue.name.clone()));
            }
            queues.push((queue.clone(), handler));
        }
        let (writes, write_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            store: store.clone(),
            global: Arc::new(Semaphore::new(config.max_running.max(1))),
            running: Mutex::new(RunningItems::default()),
            keeper: Notify::new(),
            contexts: tokio::sync::Mutex::new(HashMap::new()),
            writes,
            node_slot_freed: Arc::new(Notify::new()),
            starved: AtomicUsize::new(0),
            stop_claiming: CancellationToken::new(),
            release_now: CancellationToken::new(),
            items: TaskTracker::new(),
            config: config.clone(),
        });
        let stop_background = CancellationToken::new();
        let mut background = Vec::new();
        for (queue, handler) in queues {
            background.push(tokio::spawn(claim_loop(inner.clone(), queue, handler)));
        }
        let writer = tokio::spawn(writer(store.clone(), write_rx));
        background.push(tokio::spawn(watch_control(inner.clone(), stop_background.clone())));
        background.push(tokio::spawn(rescue_expired(inner.clone(), stop_background.clone())));
        background.push(tokio::spawn(keep_leases(inner.clone(), stop_background.clone())));
        Ok(ExecutorHandle {
            inner,
            background,
            writer,
            stop_background,
        })
    }
}

/// A running pool; `shutdown` stops it.
#[derive(Debug)]
pub struct ExecutorHandle {
    inner: Arc<Inner>,
    background: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
    stop_background: CancellationToken,
}

impl ExecutorHandle {
    /// Items running on this node now.
    pub fn running(&self) -> usize {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .items
            .len()
    }

    /// Stops claiming, lets running items finish within the grace period, hands the rest
    /// back without spending an attempt, writes every result, and joins every task.
    pub async fn shutdown(self) {
        let inner = self.inner;
        inner.stop_claiming.cancel();
        inner.items.close();
        if tokio::time::timeout(inner.config.shutdown_grace, inner.items.wait())
            .await
            .is_err()
        {
            tracing::info!(
                running = inner.items.len(),
                "grace period over; handing running items back"
            );
            inner.release_now.cancel();
            inner.items.wait().await;
        }
        self.stop_background.cancel();
        for task in self.background {
            let _ = task.await;
        }
        let contexts: Vec<_> = inner.contexts.lock().await.drain().collect();
        for (_, open) in contexts {
            open.handler.close_batch_context(&open.info, open.context).await;
        }
        // Every item task has ended, so the last sender goes with `inner`.
        drop(inner);
        let _ = self.writer.await;
    }
}

struct Inner {
    store: Arc<dyn Store>,
    config: ExecutorConfig,
    global: Arc<Semaphore>,
    /// Items running here, and when the lease keeper next looks at them.
    running: Mutex<RunningItems>,
    /// Wakes the lease keeper for an item that starts before its next look.
    keeper: Notify,
    /// Open shared contexts of sequential batches.
    contexts: tokio::sync::Mutex<HashMap<String, OpenContext>>,
    /// To the writer: results to record and claims to make.
    writes: mpsc::UnboundedSender<Write>,
    /// Told whenever an item gives its slot back: wakes the claim loops that found the node's
    /// slots all taken by other queues.
    node_slot_freed: Arc<Notify>,
    /// Claim loops waiting for a slot of the node that other queues hold. While any waits, no
    /// slot is handed on (see [`Handoff`]): each goes back, so the waiting queue can take it.
    starved: AtomicUsize,
    stop_claiming: CancellationToken,
    release_now: CancellationToken,
    items: TaskTracker,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

struct OpenContext {
    context: BatchContext,
    handler: Arc<dyn Handler>,
    info: BatchInfo,
}

/// A queue this node runs, shared by its claim loop and its items' tasks.
struct QueueRun {
    queue: QueueConfig,
    handler: Arc<dyn Handler>,
    /// Whether an ending item may hand its slot on (see [`Handoff`]). Not for a queue with a
    /// rate limit: its claim loop paces its starts.
    hands_on: bool,
    /// The settings of an item whose batch and own config are empty (most items): the
    /// queue's, read once.
    default_settings: ItemSettings,
}

impl QueueRun {
    /// An item's merged config and the settings read from it.
    fn config_of(&self, item: &ClaimedItem) -> (JsonMap, ItemSettings) {
        if item.batch_config.is_empty() && item.item_config.is_empty() {
            return (self.queue.defaults.clone(), self.default_settings);
        }
        let config = merge_config([&self.queue.defaults, &item.batch_config, &item.item_config]);
        let settings = ItemSettings::from_config(&config);
        (config, settings)
    }
}

/// Whether a notice may mean work for this queue.
fn wakes(notice: &Result<Notice, broadcast::error::RecvError>, queue: &str) -> bool {
    match notice {
        Ok(Notice::Work { queue: q } | Notice::Queue { queue: q }) => q == queue,
        Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
        Ok(Notice::Control { .. } | Notice::Events { .. } | Notice::Webhooks) => false,
        Err(broadcast::error::RecvError::Closed) => false,
    }
}

/// Claims and starts items of one queue whenever it has free slots and work may be there.
async fn claim_loop(inner: Arc<Inner>, queue: QueueConfig, handler: Arc<dyn Handler>) {
    let slots = Arc::new(Semaphore::new(queue.concurrency));
    let slot_freed = Arc::new(Notify::new());
    let mut bucket = (queue.rate_per_second > 0.0).then(|| TokenBucket::new(queue.rate_per_second, queue.burst));
    let run = Arc::new(QueueRun {
        default_settings: ItemSettings::from_config(&queue.defaults),
        queue: queue.clone(),
        handler,
        hands_on: bucket.is_none(),
    });
    // Subscribed before the first claim, so nothing that commits in between is missed.
    let mut notices = inner.store.subscribe();
    let request = ClaimRequest {
        queue: queue.name.clone(),
        max_items: 0,
        lease: queue.lease,
        owner: inner.config.node_id.clone(),
    };
    let mut error_backoff = Duration::from_millis(100);
    let refill = (queue.concurrency / REFILL_DIVISOR).clamp(1, MAX_CLAIM);
    loop {
        if inner.stop_claiming.is_cancelled() {
            return;
        }
        // Registered before the slots are counted, so a slot freed after the count still wakes
        // this loop.
        let node_freed = inner.node_slot_freed.notified();
        tokio::pin!(node_freed);
        node_freed.as_mut().enable();
        let free = slots.available_permits();
        let room = free.min(inner.global.available_permits()).min(MAX_CLAIM);
        // A queue with items running claims again once enough slots are free for a claim
        // worth its transaction; an idle one claims whatever it can at once.
        let busy = free < queue.concurrency;
        let take = if !busy || room >= refill { room } else { 0 };
        // It would claim but for the node's slots, which other queues hold.
        let starved = take == 0 && free >= if busy { refill } else { 1 };
        let mut permits = Vec::with_capacity(take);
        while permits.len() < take {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break;
            };
            let Ok(global) = inner.global.clone().try_acquire_owned() else {
                break;
            };
            permits.push((slot, global));
        }
        let mut want = permits.len();
        if let Some(bucket) = bucket.as_mut() {
            want = bucket.take(want);
            permits.truncate(want);
        }
        let mut more = false;
        if want > 0 {
            let (reply_tx, reply_rx) = oneshot::channel();
            let claim = ClaimRequest {
                max_items: want,
                ..request.clone()
            };
            let claimed = match inner.writes.send(Write::Claim(claim, reply_tx)) {
                Ok(()) => reply_rx.await.unwrap_or_else(|_| Err("the writer stopped".to_owned())),
                Err(_) => Err("the writer stopped".to_owned()),
            };
            match claimed {
                Ok(items) => {
                    more = items.len() == want;
                    if let Some(bucket) = bucket.as_mut() {
                        bucket.give_back(want - items.len());
                    }
                    for item in items {
                        let Some(permits) = permits.pop() else { break };
                        let slot = Slot {
                            permits: Some(permits),
                            freed: slot_freed.clone(),
                            node_freed: inner.node_slot_freed.clone(),
                        };
                        start_item(&inner, &run, item, slot);
                    }
                    error_backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(queue = %queue.name, error = %e, "claim failed; retrying");
                    if let Some(bucket) = bucket.as_mut() {
                        bucket.give_back(want);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(error_backoff) => {}
                        () = inner.stop_claiming.cancelled() => return,
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        if !permits.is_empty() {
            // Slots held for items the claim did not find: other queues may be waiting for them.
            drop(permits);
            inner.node_slot_freed.notify_waiters();
        }
        if more {
            continue;
        }
        let poll = match bucket.as_mut() {
            Some(bucket) if want == 0 && slots.available_permits() > 0 => {
                bucket.wait_for_one().max(Duration::from_millis(1))
            }
            _ => inner.config.poll_interval,
        };
        let deadline = tokio::time::sleep(poll);
        tokio::pin!(deadline);
        let _waiting_for_the_node = starved.then(|| Starving::new(&inner.starved));
        loop {
            tokio::select! {
                () = inner.stop_claiming.cancelled() => return,
                () = &mut deadline => break,
                () = slot_freed.notified() => break,
                () = &mut node_freed, if starved => break,
                notice = notices.recv() => {
                    if matches!(notice, Err(broadcast::error::RecvError::Closed)) {
                        return;
                    }
                    if wakes(&notice, &queue.name) {
                        break;
                    }
                }
            }
        }
    }
}

/// Counts a claim loop as waiting for a slot of the node while it lives.
struct Starving<'a>(&'a AtomicUsize);

impl<'a> Starving<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Starving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running item's place in its queue's and the node's limits. Given back as soon as the
/// attempt's result is handed to the writer, or handed on with it (see [`Handoff`]): the
/// claim that reuses it then lands in the same transaction as that result, or a later one,
/// never an earlier one.
struct Slot {
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    freed: Arc<Notify>,
    node_freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The permits go back before the claim loops are told, or one could wake, find no
        // free slot, and sleep until the next poll.
        drop(self.permits.take());
        self.freed.notify_one();
        self.node_freed.notify_waiters();
    }
}

fn start_item(inner: &Arc<Inner>, run: &Arc<QueueRun>, item: ClaimedItem, slot: Slot) {
    let cancel = CancellationToken::new();
    let lease = run.queue.lease;
    let renew_at = Instant::now() + renewal_interval(lease);
    let wake_keeper = {
        let mut running = inner.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.items.insert(
            item.id.clone(),
            RunningItem {
                batch_id: item.batch_id.clone(),
                cancel: cancel.clone(),
                lease_token: item.lease_token.clone(),
                lease,
                renew_at,
            },
        );
        renew_at < running.keeper_wakes_at
    };
    if wake_keeper {
        inner.keeper.notify_one();
    }
    let (inner, run) = (inner.clone(), run.clone());
    // Boxed, so that spawning it and ending it move a pointer, not the whole future.
    inner.items.clone().spawn(Box::pin(async move {
        let item_id = item.id.clone();
        run_item(&inner, &run, item, cancel, slot).await;
        inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .items
            .remove(&item_id);
    }));
}

/// Runs one claimed item to the end of its attempt and reports the result.
async fn run_item(inner: &Arc<Inner>, run: &Arc<QueueRun>, item: ClaimedItem, cancel: CancellationToken, slot: Slot) {
    let (queue, handler) = (&run.queue, &run.handler);
    let (config, settings) = run.config_of(&item);
    let releases_context = item.input.get("release_context").and_then(Value::as_bool) == Some(true);
    // Only a sequential batch shares a context, which needs these.
    let info = (item.mode == Mode::Sequential).then(|| BatchInfo {
        batch_id: item.batch_id.clone(),
        session_id: item.session_id.clone(),
        config: item.batch_config.clone(),
    });
    let (item_id, lease_token, attempt) = (item.id.clone(), item.lease_token.clone(), item.attempt);
    let started = Instant::now();
    if let Some(observer) = &inner.config.observer {
        let pickup = (time::OffsetDateTime::now_utc() - item.ready_at).unsigned_abs();
        observer.item_started(&queue.name, pickup);
    }
    // `None`: the handler handed the attempt on (`Completion::Accepted`); nothing to record.
    let outcome = match open_context(inner, handler, info.as_ref()).await {
        Err(e) => Some(failure(e, &settings)),
        Ok(batch_context) => {
            let context = ItemContext::new(item, config, batch_context, cancel.clone(), inner.store.clone());
            let attempt_future = std::panic::AssertUnwindSafe(handler.run(context)).catch_unwind();
            tokio::select! {
                result = tokio::time::timeout(settings.timeout, attempt_future) => match result {
                    Err(_) => {
                        cancel.cancel();
                        Some(failure(HandlerError::transient(format!("timed out after {} ms", settings.timeout.as_millis())), &settings))
                    }
                    Ok(Err(panic)) => Some(failure(HandlerError::transient(format!("handler panicked: {}", panic_message(&panic))), &settings)),
                    Ok(Ok(Ok(Completion::Completed(result)))) => Some(Outcome::Completed { result }),
                    Ok(Ok(Ok(Completion::NeedsInput(question)))) => Some(Outcome::NeedsInput { question }),
                    Ok(Ok(Ok(Completion::Accepted))) => None,
                    Ok(Ok(Err(e))) => Some(failure(e, &settings)),
                },
                () = cancelled_past_grace(&cancel) => Some(Outcome::Cancelled),
                () = inner.release_now.cancelled() => {
                    cancel.cancel();
                    Some(Outcome::Released)
                }
            }
        }
    };
    // Released before the attempt is recorded: the batch's next item cannot be claimed before
    // that, so it never starts on the context this item let go.
    if let (Some(info), true) = (&info, releases_context) {
        close_context(inner, &info.batch_id).await;
    }
    let Some(outcome) = outcome else {
        tracing::debug!(item = %item_id, attempt, "the attempt was accepted elsewhere; its worker reports it");
        if let Some(observer) = &inner.config.observer {
            observer.attempt_ended(&queue.name, "accepted", started.elapsed());
        }
        return;
    };
    let finish = Finish {
        item_id: item_id.clone(),
        lease_token,
        outcome,
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let handoff = if run.hands_on && !inner.stop_claiming.is_cancelled() && inner.starved.load(Ordering::SeqCst) == 0 {
        Some(Handoff {
            inner: inner.clone(),
            run: run.clone(),
            slot,
        })
    } else {
        drop(slot);
        None
    };
    let sent = inner.writes.send(Write::Finish(finish, reply_tx, handoff));
    let result = match sent {
        Ok(()) => reply_rx.await.unwrap_or_else(|_| Err("the writer stopped".to_owned())),
        Err(_) => Err("the writer stopped".to_owned()),
    };
    if let (Some(observer), Ok(result)) = (&inner.config.observer, &result) {
        let status = match result {
            FinishResult::Applied(status) => status.as_str(),
            FinishResult::ItemCancelled => ItemStatus::Cancelled.as_str(),
            FinishResult::LeaseLost => "lease_lost",
        };
        observer.attempt_ended(&queue.name, status, started.elapsed());
    }
    match &result {
        Ok(FinishResult::LeaseLost) => tracing::info!(item = %item_id, attempt, "lease lost; the result was dropped"),
        Ok(_) => {}
        Err(e) => {
            tracing::error!(item = %item_id, attempt, error = %e, "could not record the attempt; its lease will expire")
        }
    }
    if let Some(info) = &info {
        let item_waits = matches!(
            result,
            Ok(FinishResult::Applied(ItemStatus::NeedsInput | ItemStatus::Pending))
        );
        if !releases_context && !item_waits && batch_is_done(&inner.store, &info.batch_id).await {
            close_context(inner, &info.batch_id).await;
        }
    }
}

fn failure(e: HandlerError, settings: &ItemSettings) -> Outcome {
    let (retryable, retry_after) = match e.retry {
        Retry::Transient => (true, None),
        Retry::After(delay) => (true, Some(delay)),
        Retry::Permanent => (false, None),
    };
    Outcome::Failed {
        error: e.message,
        retryable,
        retry_after,
        policy: settings.retry,
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Completes `CANCEL_GRACE` after the token fires: a handler that ignores its cancellation
/// is abandoned then.
async fn cancelled_past_grace(cancel: &CancellationToken) {
    cancel.cancelled().await;
    tokio::time::sleep(CANCEL_GRACE).await;
}

/// Whether a batch has nothing left for its shared context to serve.
async fn batch_is_done(store: &Arc<dyn Store>, batch_id: &str) -> bool {
    match store.get_batch(Scope::All, batch_id).await {
        Ok(batch) => {
            batch.status.is_terminal()
                || matches!(batch.status, BatchStatus::Cancelling)
                || batch.counts.pending == 0 && batch.counts.running == 0 && batch.counts.needs_input == 0
        }
        Err(StoreError::NotFound) => true,
        Err(_) => false,
    }
}

async fn open_context(
    inner: &Arc<Inner>,
    handler: &Arc<dyn Handler>,
    info: Option<&BatchInfo>,
) -> Result<Option<BatchContext>, HandlerError> {
    let Some(info) = info else {
        return Ok(None);
    };
    let mut contexts = inner.contexts.lock().await;
    if let Some(open) = contexts.get(&info.batch_id) {
        return Ok(Some(open.context.clone()));
    }
    let Some(context) = handler.open_batch_context(info).await? else {
        return Ok(None);
    };
    contexts.insert(
        info.batch_id.clone(),
        OpenContext {
            context: context.clone(),
            handler: handler.clone(),
            info: info.clone(),
        },
    );
    Ok(Some(context))
}

async fn close_context(inner: &Arc<Inner>, batch_id: &str) {
    let open = inner.contexts.lock().await.remove(batch_id);
    if let Some(open) = open {
        open.handler.close_batch_context(&open.info, open.context).await;
    }
}

/// The items running on this node.
struct RunningItems {
    /// By item id.
    items: HashMap<String, RunningItem>,
    /// When the lease keeper wakes next unless woken: an item that starts needs it woken only
    /// if its first renewal is due before that.
    keeper_wakes_at: Instant,
}

impl Default for RunningItems {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            // The keeper looks as soon as it starts, whatever has started by then.
            keeper_wakes_at: Instant::now(),
        }
    }
}

/// An item running on this node.
struct RunningItem {
    batch_id: String,
    /// Fires when its batch is cancelled, its lease is lost, or its attempt ends early.
    cancel: CancellationToken,
    lease_token: String,
    lease: Duration,
    /// When its lease is renewed next.
    renew_at: Instant,
}

/// How often a running item's lease is renewed: every third of its length, at most every
/// 100 ms.
fn renewal_interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(100))
}

/// Lease renewals the keeper has in flight at once at most.
const RENEWALS_AT_ONCE: usize = 16;
/// How long the keeper sleeps with no item running, unless an item starts.
const KEEPER_IDLE: Duration = Duration::from_secs(60);

/// A lease to renew, as the keeper takes it from [`RunningItems`].
struct Renewal {
    item_id: String,
    lease_token: String,
    lease: Duration,
    cancel: CancellationToken,
}

/// Renews the leases of every item running here, each every third of its lease, from this
/// one task: starting an item costs no task or timer of its own for its lease, and a
/// handler that blocks its thread cannot hold its own renewals up. An item's lease is renewed
/// from its start until its result is recorded. Fires an item's cancellation when its batch
/// was cancelled or its lease lost; an item whose cancellation has fired is renewed no more
/// (it is ending).
async fn keep_leases(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let (due, wake_at) = due_renewals(&inner);
        futures_util::stream::iter(due)
            .for_each_concurrent(RENEWALS_AT_ONCE, |r| renew(&inner, r))
            .await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(wake_at) => {}
            () = inner.keeper.notified() => {}
        }
    }
}

/// Takes the renewals that are due, or due within a quarter of their interval (so that
/// items that started close together are renewed on one wake), and sets when each is due
/// next; returns them with the time of the next wake.
fn due_renewals(inner: &Inner) -> (Vec<Renewal>, Instant) {
    let now = Instant::now();
    let mut running = inner.running.lock().unwrap_or_else(PoisonError::into_inner);
    let mut due = Vec::new();
    let mut next = now + KEEPER_IDLE;
    for (id, item) in &mut running.items {
        if item.cancel.is_cancelled() {
            continue;
        }
        let every = renewal_interval(item.lease);
        if item.renew_at <= now + every / 4 {
            due.push(Renewal {
                item_id: id.clone(),
                lease_token: item.lease_token.clone(),
                lease: item.lease,
                cancel: item.cancel.clone(),
            });
            item.renew_at = now + every;
        }
        next = next.min(item.renew_at);
    }
    running.keeper_wakes_at = next;
    (due, next)
}

async fn renew(inner: &Inner, r: Renewal) {
    match inner.store.renew_lease(&r.item_id, &r.lease_token, r.lease).await {
        Ok(LeaseState::Held(_)) => {}
        Ok(LeaseState::Cancelled | LeaseState::Lost) => r.cancel.cancel(),
        Err(e) => tracing::warn!(item = %r.item_id, error = %e, "lease renewal failed; retrying"),
    }
}

/// What the writer is asked to do.
enum Write {
    /// Record an attempt's result, and claim an item in its place with its slot if one is
    /// handed on.
    Finish(Finish, oneshot::Sender<Result<FinishResult, String>>, Option<Handoff>),
    /// Claim items for a queue's free slots.
    Claim(ClaimRequest, oneshot::Sender<Result<Vec<ClaimedItem>, String>>),
}

/// An ending item's slot, handed on with its result: the writer claims an item of the same
/// queue with it in the same transaction as the result, and starts what it claimed. A slot
/// that finds no item is given back then. Without this, the slot would go back at once, and
/// the claim that reuses it would come from the queue's claim loop, which often reaches the
/// writer only after the result's group has formed: a group of results, then a group of
/// claims, one more transaction and one more group's wait between an item's end and the
/// next item's start.
struct Handoff {
    inner: Arc<Inner>,
    run: Arc<QueueRun>,
    slot: Slot,
}

/// Who is told of a claim's items.
enum ClaimReply {
    /// A claim loop, which starts them.
    Loop(oneshot::Sender<Result<Vec<ClaimedItem>, String>>),
    /// The writer starts them, each with one of these slots.
    Handoff {
        inner: Arc<Inner>,
        run: Arc<QueueRun>,
        slots: Vec<Slot>,
    },
}

/// Results and claims that go into one transaction, with whom to answer.
#[derive(Default)]
struct Group {
    finishes: Vec<Finish>,
    finish_replies: Vec<oneshot::Sender<Result<FinishResult, String>>>,
    claims: Vec<ClaimRequest>,
    claim_replies: Vec<ClaimReply>,
    /// The slots handed on, by queue.
    handoffs: Vec<(Arc<Inner>, Arc<QueueRun>, Vec<Slot>)>,
}

impl Group {
    /// Takes `first` and whatever else is waiting, up to `MAX_FINISH_GROUP` results.
    async fn gather(&mut self, first: Write, rx: &mut mpsc::UnboundedReceiver<Write>) {
        let mut next = Some(first);
        let mut yields = 0;
        while let Some(write) = next.take() {
            self.add(write);
            if self.finishes.len() < MAX_FINISH_GROUP {
                next = rx.try_recv().ok();
                while next.is_none() && yields < GATHER_YIELDS {
                    // The results just taken freed slots, whose claim loops are about to ask
                    // for more: let them, so their claims share this transaction.
                    yields += 1;
                    tokio::task::yield_now().await;
                    next = rx.try_recv().ok();
                }
            }
        }
    }

    /// Results and the slots its claim loops ask to fill (slots handed on with results are
    /// claimed later, in `claim_handoffs`): what the group's fixed cost is spread over.
    fn weight(&self) -> usize {
        self.finishes.len() + self.claims.iter().map(|c| c.max_items).sum::<usize>()
    }

    fn add(&mut self, write: Write) {
        match write {
            Write::Finish(finish, reply, handoff) => {
                self.finishes.push(finish);
                self.finish_replies.push(reply);
                if let Some(Handoff { inner, run, slot }) = handoff {
                    match self.handoffs.iter_mut().find(|(_, r, _)| Arc::ptr_eq(r, &run)) {
                        Some((_, _, slots)) => slots.push(slot),
                        None => self.handoffs.push((inner, run, vec![slot])),
                    }
                }
            }
            Write::Claim(request, reply) => {
                self.claims.push(request);
                self.claim_replies.push(ClaimReply::Loop(reply));
            }
        }
    }

    /// Turns the slots handed on into claims, after every other claim. Should claiming have
    /// stopped, or another queue begun to wait for a slot of the node, since the slots were
    /// handed on, they go back instead.
    fn claim_handoffs(&mut self) {
        for (inner, run, slots) in self.handoffs.drain(..) {
            if inner.stop_claiming.is_cancelled() || inner.starved.load(Ordering::SeqCst) > 0 {
                continue;
            }
            self.claims.push(ClaimRequest {
                queue: run.queue.name.clone(),
                max_items: slots.len(),
                lease: run.queue.lease,
                owner: inner.config.node_id.clone(),
            });
            self.claim_replies.push(ClaimReply::Handoff { inner, run, slots });
        }
    }
}

impl ClaimReply {
    fn send(self, claimed: Result<Vec<ClaimedItem>, String>) {
        match self {
            ClaimReply::Loop(reply) => {
                let _ = reply.send(claimed);
            }
            ClaimReply::Handoff { inner, run, mut slots } => {
                for item in claimed.unwrap_or_default() {
                    let Some(slot) = slots.pop() else { break };
                    start_item(&inner, &run, item, slot);
                }
                // The rest go back, and wake the claim loops.
            }
        }
    }
}

/// Writes results and claims in group commits: whatever is waiting when a transaction can
/// start goes into it, results first, then the claims that reuse their slots. As many
/// groups run at once as the store finds worth it (`Store::group_overlap`), each in the
/// turn it was formed in, so they commit in that order; a group that would start beside
/// another carrying little waits for it instead (`MIN_OVERLAPPED_GROUP`). A failed commit
/// is retried a few times for its results (its claims answer the error) before their items
/// are left to their leases.
async fn writer(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let overlap = store.group_overlap().max(1);
    let in_flight = Arc::new(Semaphore::new(overlap));
    let groups = TaskTracker::new();
    let mut previous: Option<FirstPhaseDone> = None;
    while let Some(first) = rx.recv().await {
        // While as many groups as are worth it are in flight, or the last one is still in its
        // first phase, what arrives joins this one.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        if let Some(previous) = previous.take() {
            previous.await;
        }
        let mut group = Group::default();
        group.gather(first, &mut rx).await;
        if in_flight.available_permits() + 1 < overlap && group.weight() < MIN_OVERLAPPED_GROUP {
            // Another group is in flight and this one is small: wait for that one to end.
            let Ok(others) = in_flight
                .acquire_many(u32::try_from(overlap - 1).unwrap_or(u32::MAX))
                .await
            else {
                break;
            };
            drop(others);
            if let Ok(write) = rx.try_recv() {
                group.gather(write, &mut rx).await;
            }
        }
        group.claim_handoffs();
        let mut turn = store.group_turn();
        previous = Some(turn.first_phase_done());
        let store = store.clone();
        groups.spawn(async move { write_group(&store, turn, group, permit).await });
    }
    groups.close();
    groups.wait().await;
}

/// Writes one group in its turn and answers everyone in it. The group's place among those
/// in flight (`permit`) is given back once its claims are answered, before its results are:
/// the next group can then begin while the tasks whose results these were are woken.
async fn write_group(store: &Arc<dyn Store>, turn: Turn, group: Group, permit: OwnedSemaphorePermit) {
    let Group {
        finishes,
        finish_replies,
        claims,
        claim_replies,
        handoffs: _,
    } = group;
    let started = Instant::now();
    let wanted: usize = claims.iter().map(|c| c.max_items).sum();
    let outcome = store.finish_and_claim_in_turn(turn, finishes.clone(), claims).await;
    let results = match outcome {
        Ok((results, claimed)) => {
            tracing::debug!(
                results = finishes.len(),
                wanted,
                claimed = claimed.iter().map(Vec::len).sum::<usize>(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "group commit"
            );
            for (reply, items) in claim_replies.into_iter().zip(claimed) {
                reply.send(Ok(items));
            }
            drop(permit);
            Ok(results)
        }
        Err(e) => {
            for reply in claim_replies {
                reply.send(Err(e.to_string()));
            }
            if finishes.is_empty() {
                return;
            }
            // Held while the results are written again, so no later group commits first.
            let retried = retry_finish(store, &finishes, e).await;
            drop(permit);
            retried
        }
    };
    match results {
        Ok(results) => {
            for (reply, result) in finish_replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) => {
            for reply in finish_replies {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}

/// Writes a group of results again after `first` failed, a few times with a growing pause.
async fn retry_finish(
    store: &Arc<dyn Store>,
    finishes: &[Finish],
    first: StoreError,
) -> Result<Vec<FinishResult>, StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut outcome = Err(first);
    for _ in 0..5 {
        let Err(e) = &outcome else { break };
        tracing::warn!(error = %e, items = finishes.len(), "recording results failed; retrying");
        tokio::time::sleep(delay).await;
        delay *= 2;
        outcome = store.finish(finishes.to_vec()).await;
    }
    outcome
}

/// Relays control requests to the items running here: when a batch is cancelled (or failed
/// under `fail_batch`), its running items' cancellation fires.
async fn watch_control(inner: Arc<Inner>, stop: CancellationToken) {
    let mut notices = inner.store.subscribe();
    loop {
        let batch_ids: Vec<String> = tokio::select! {
            () = stop.cancelled() => return,
            notice = notices.recv() => match notice {
                Ok(Notice::Control { batch_id }) => vec![batch_id],
                Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => running_batches(&inner),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        for batch_id in batch_ids {
            let tokens = tokens_of(&inner, &batch_id);
            if tokens.is_empty() {
                continue;
            }
            let stop_items = match inner.store.get_batch(Scope::All, &batch_id).await {
                Ok(batch) => matches!(
                    batch.status,
                    BatchStatus::Cancelling | BatchStatus::Cancelled | BatchStatus::Failed
                ),
                Err(StoreError::NotFound) => true,
                Err(e) => {
                    tracing::warn!(batch = %batch_id, error = %e, "cannot read a batch after a control request");
                    false
                }
            };
            if stop_items {
                tokens.iter().for_each(CancellationToken::cancel);
            }
        }
    }
}

fn running_batches(inner: &Inner) -> Vec<String> {
    let running = inner.running.lock().unwrap_or_else(PoisonError::into_inner);
    let mut ids: Vec<String> = running.items.values().map(|item| item.batch_id.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

fn tokens_of(inner: &Inner, batch_id: &str) -> Vec<CancellationToken> {
    let running = inner.running.lock().unwrap_or_else(PoisonError::into_inner);
    running
        .items
        .values()
        .filter(|item| item.batch_id == batch_id)
        .map(|item| item.cancel.clone())
        .collect()
}

/// Puts expired leases back (their workers died); every node runs it, and the store's
/// locking makes that safe.
async fn rescue_expired(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(inner.config.rescue_interval) => {}
        }
        match inner.store.requeue_expired_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(items = n, "put back items whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "looking for expired leases failed"),
        }
    }
}

#[cfg(test)]
mod tests;

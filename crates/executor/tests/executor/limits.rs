//! Limits: concurrency, rate, timeout, retries and their delays, panics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batchd_domain::{BatchStatus, ItemStatus, Mode};
use batchd_executor::{Completion, Handler, HandlerError, HandlerRegistry, ItemContext};
use batchd_storage::{NewBatch, Scope};
use serde_json::json;

use crate::support::{Backend, Harness, both_backends, new_batch, queue};

both_backends!(
    concurrency_limit_holds_and_work_overlaps,
    rate_limit_holds_within_its_burst,
    a_timed_out_attempt_fails_and_is_retried,
    batch_and_item_config_override_the_queue_settings,
    retry_delays_follow_the_policy,
    a_panic_is_a_failure,
    a_queue_kept_out_by_another_starts_once_it_frees_the_node,
    a_kept_out_queue_gets_a_slot_while_the_other_still_has_work,
);

/// Sleeps a little and records how many items ran at once.
#[derive(Clone, Default)]
struct InFlight {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

#[async_trait]
impl Handler for InFlight {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        self.starts.lock().expect("starts").push(tokio::time::Instant::now());
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        let ms = item
            .input
            .get("sleep_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(Completion::Completed(json!(null)))
    }
}

async fn concurrency_limit_holds_and_work_overlaps(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let handler = InFlight::default();
    let mut registry = HandlerRegistry::default();
    registry.register("inflight", handler.clone());
    h.start(registry, vec![queue("c3", "inflight", 3)], |_| {});
    let (id, _) = h.submit("c3", Mode::Parallel, vec![json!({"sleep_ms": 40}); 30]).await;
    assert_eq!(h.wait_until_ended(&id).await.counts.completed, 30);
    assert_eq!(
        handler.max.load(Ordering::SeqCst),
        3,
        "at most 3 at once, and the work overlapped"
    );
    h.shutdown().await;
}

async fn rate_limit_holds_within_its_burst(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let handler = InFlight::default();
    let mut registry = HandlerRegistry::default();
    registry.register("inflight", handler.clone());
    let mut limited = queue("rated", "inflight", 10);
    limited.rate_per_second = 20.0;
    limited.burst = 2;
    h.start(registry, vec![limited], |_| {});
    let (id, _) = h.submit("rated", Mode::Parallel, vec![json!({}); 30]).await;
    assert_eq!(h.wait_until_ended(&id).await.counts.completed, 30);
    let starts = handler.starts.lock().expect("starts").clone();
    assert_eq!(starts.len(), 30);
    // In any window of a second, at most the burst plus a second's worth started. A slow
    // machine can only start fewer, so this cannot fail by noise.
    for (i, first) in starts.iter().enumerate() {
        let in_window = starts[i..]
            .iter()
            .filter(|t| t.duration_since(*first) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 22, "{in_window} items started within one second");
    }
    let span = starts[29].duration_since(starts[0]);
    assert!(
        span >= Duration::from_millis(1_350),
        "30 items at 20/s with a burst of 2 took only {span:?}"
    );
    h.shutdown().await;
}

async fn a_timed_out_attempt_fails_and_is_retried(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let mut fast = queue("slow", "demo", 2);
    fast.defaults.insert("timeout_ms".into(), json!(100));
    h.start(crate::support::demo(), vec![fast], |_| {});
    let mut batch = new_batch("slow", Mode::Parallel, vec![json!({"sleep_ms": 10_000})]);
    batch.items[0].max_attempts = 2;
    let (id, ids) = h.submit_batch(batch).await;
    let done = h.wait_until_ended(&id).await;
    assert_eq!(done.status, BatchStatus::Failed);
    let item = h.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(
        (item.status, item.attempts),
        (ItemStatus::Failed, 2),
        "retried once, then failed"
    );
    assert!(
        item.error
            .as_deref()
            .is_some_and(|e| e.contains("timed out after 100 ms")),
        "{:?}",
        item.error
    );
    let types = h.event_types(&id).await;
    assert!(types.contains(&"item.retry_scheduled".to_owned()) && types.contains(&"item.failed".to_owned()));
    h.shutdown().await;
}

/// Sleeps for its input's `sleep_ms` and records the config each item ran with.
#[derive(Clone, Default)]
struct ConfigSeen {
    seen: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

#[async_trait]
impl Handler for ConfigSeen {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        self.seen
            .lock()
            .expect("not poisoned")
            .push((item.item_id.clone(), serde_json::Value::Object(item.config.clone())));
        let sleep = item
            .input
            .get("sleep_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(sleep)).await;
        Ok(Completion::Completed(json!(null)))
    }
}

/// An item without a config of its own or of its batch runs with its queue's; a batch's
/// config beats the queue's, and an item's beats its batch's, in what the handler sees and
/// in the settings the pool applies (here the timeout).
async fn batch_and_item_config_override_the_queue_settings(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let handler = ConfigSeen::default();
    let mut registry = HandlerRegistry::default();
    registry.register("seen", handler.clone());
    let mut q = queue("cfg", "seen", 4);
    q.defaults.insert("model".into(), json!("q"));
    h.start(registry, vec![q], |_| {});

    let mut batch = new_batch(
        "cfg",
        Mode::Parallel,
        vec![json!({"sleep_ms": 10_000}), json!({"sleep_ms": 300})],
    );
    batch.config = json!({"timeout_ms": 100, "model": "b"})
        .as_object()
        .cloned()
        .expect("an object");
    batch.items[0].max_attempts = 1;
    batch.items[1].config = json!({"timeout_ms": 5_000}).as_object().cloned().expect("an object");
    let (id, ids) = h.submit_batch(batch).await;
    let (plain, plain_ids) = h.submit("cfg", Mode::Parallel, vec![json!({})]).await;
    h.wait_until_ended(&id).await;
    h.wait_until_ended(&plain).await;

    let timed_out = h.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(timed_out.status, ItemStatus::Failed, "the batch's timeout applied");
    assert!(
        timed_out
            .error
            .as_deref()
            .is_some_and(|e| e.contains("timed out after 100 ms")),
        "{:?}",
        timed_out.error
    );
    let kept = h.store.get_item(Scope::All, &ids[1]).await.expect("item");
    assert_eq!(kept.status, ItemStatus::Completed, "the item's own timeout applied");

    let seen: std::collections::HashMap<String, serde_json::Value> =
        handler.seen.lock().expect("not poisoned").iter().cloned().collect();
    let config_of = |item: &str, key: &str| seen.get(item).and_then(|c| c.get(key)).cloned();
    assert_eq!(config_of(&ids[0], "timeout_ms"), Some(json!(100)));
    assert_eq!(config_of(&ids[0], "model"), Some(json!("b")));
    assert_eq!(config_of(&ids[1], "timeout_ms"), Some(json!(5_000)));
    assert_eq!(config_of(&ids[1], "model"), Some(json!("b")));
    assert_eq!(config_of(&plain_ids[0], "timeout_ms"), Some(json!(180_000)));
    assert_eq!(config_of(&plain_ids[0], "model"), Some(json!("q")));
    assert_eq!(config_of(&plain_ids[0], "max_attempts"), Some(json!(3)));
    h.shutdown().await;
}

async fn retry_delays_follow_the_policy(backend: Backend) {
    let Some(mut h) = Harness::open_with_manual_clock(backend).await else {
        return;
    };
    let clock = h.clock.clone().expect("a manual clock");
    let mut q = queue("retry", "demo", 2);
    q.defaults.insert("backoff_base_ms".into(), json!(60_000));
    q.defaults.insert("backoff_max_ms".into(), json!(600_000));
    h.start(crate::support::demo(), vec![q], |c| {
        c.poll_interval = Duration::from_millis(50)
    });
    let (id, ids) = h
        .submit("retry", Mode::Parallel, vec![json!({"fail": "flaky", "fail_times": 2})])
        .await;
    let (perm, perm_ids) = h
        .submit("retry", Mode::Parallel, vec![json!({"fail": "bad", "permanent": true})])
        .await;
    for attempt in 1..=2u32 {
        let failed_at = clock.now();
        let item = wait_for_item(&h, &ids[0], |i| {
            i.attempts == attempt as i32 && i.status == ItemStatus::Pending
        })
        .await;
        let delay = item.next_attempt_at.expect("a retry time") - failed_at;
        // Attempt n waits base * 2^(n-1), less up to half of it as jitter.
        let nominal = time::Duration::seconds(60 * 2i64.pow(attempt - 1));
        assert!(
            delay >= nominal / 2 && delay <= nominal,
            "attempt {attempt}: waited {delay}, policy says up to {nominal}"
        );
        // Nothing runs it before its time, however long the pool polls.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            h.store.get_item(Scope::All, &ids[0]).await.expect("item").attempts,
            attempt as i32
        );
        clock.advance(nominal.unsigned_abs() + Duration::from_secs(1));
    }
    let done = h.wait_until_ended(&id).await;
    assert_eq!(done.status, BatchStatus::Completed, "the third attempt succeeds");
    assert_eq!(h.store.get_item(Scope::All, &ids[0]).await.expect("item").attempts, 3);
    let permanent = h.wait_until_ended(&perm).await;
    assert_eq!(permanent.status, BatchStatus::Failed);
    assert_eq!(
        h.store.get_item(Scope::All, &perm_ids[0]).await.expect("item").attempts,
        1,
        "permanent errors are not retried"
    );
    h.shutdown().await;
}

async fn wait_for_item(
    h: &Harness,
    id: &str,
    done: impl Fn(&batchd_storage::ItemRecord) -> bool,
) -> batchd_storage::ItemRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let item = h.store.get_item(Scope::All, id).await.expect("item");
        if done(&item) {
            return item;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "item never reached the expected state: {item:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Panics;

#[async_trait]
impl Handler for Panics {
    async fn run(&self, _item: ItemContext) -> Result<Completion, HandlerError> {
        panic!("boom in the handler");
    }
}

async fn a_panic_is_a_failure(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let mut registry = HandlerRegistry::default();
    registry.register("panics", Panics);
    h.start(registry, vec![queue("p", "panics", 2)], |_| {});
    let batch = NewBatch {
        ..new_batch("p", Mode::Parallel, vec![json!({}), json!({})])
    };
    let (id, ids) = h.submit_batch(batch).await;
    let done = h.wait_until_ended(&id).await;
    assert_eq!((done.status, done.counts.failed), (BatchStatus::Failed, 2));
    let item = h.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(item.attempts, 3, "a panic is retried like any transient failure");
    assert!(
        item.error
            .as_deref()
            .is_some_and(|e| e.contains("handler panicked: boom in the handler")),
        "{:?}",
        item.error
    );
    h.shutdown().await;
}

/// Waits at a gate the test opens.
#[derive(Clone)]
struct Gated {
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Handler for Gated {
    async fn run(&self, _item: ItemContext) -> Result<Completion, HandlerError> {
        let _pass = self
            .gate
            .acquire()
            .await
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        Ok(Completion::Completed(json!(null)))
    }
}

/// One queue holds every slot of the node; another queue's item waits, and starts once the
/// first queue's items end. The pool's fallback poll is an hour: only the wake-up of a freed
/// slot can start it.
async fn a_queue_kept_out_by_another_starts_once_it_frees_the_node(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut registry = crate::support::demo();
    registry.register("gated", Gated { gate: gate.clone() });
    h.start(
        registry,
        vec![queue("hog", "gated", 4), queue("small", "demo", 1)],
        |config| {
            config.max_running = 4;
            config.poll_interval = Duration::from_secs(3_600);
        },
    );
    let (hog, _) = h.submit("hog", Mode::Parallel, vec![json!({}); 4]).await;
    h.wait_until(&hog, "4 items running", |b| b.counts.running == 4).await;
    let (small, _) = h.submit("small", Mode::Parallel, vec![json!({})]).await;
    assert_eq!(h.batch(&small).await.counts.pending, 1, "no slot of the node is free");
    gate.add_permits(4);
    assert_eq!(h.wait_until_ended(&hog).await.counts.completed, 4);
    assert_eq!(h.wait_until_ended(&small).await.counts.completed, 1);
    h.shutdown().await;
}

/// Lets one item end per permit added to its gate.
struct OneAtATime {
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Handler for OneAtATime {
    async fn run(&self, _item: ItemContext) -> Result<Completion, HandlerError> {
        self.gate
            .acquire()
            .await
            .map_err(|e| HandlerError::permanent(e.to_string()))?
            .forget();
        Ok(Completion::Completed(json!(null)))
    }
}

/// An ending item hands its slot on to the next item of its queue only while no other queue
/// waits for one of the node's slots. Here one queue holds both of the node's slots and has
/// many more items; once another queue's item waits, the first item to end gives its slot
/// back, and the waiting queue takes it (the first queue claims again only once two of its
/// eight slots are free), long before the first queue runs out of items.
async fn a_kept_out_queue_gets_a_slot_while_the_other_still_has_work(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut registry = crate::support::demo();
    registry.register("one-at-a-time", OneAtATime { gate: gate.clone() });
    h.start(
        registry,
        vec![queue("hog", "one-at-a-time", 8), queue("small", "demo", 1)],
        |config| {
            config.max_running = 2;
            config.poll_interval = Duration::from_secs(3_600);
        },
    );
    // Both claim loops first find their queues empty. Were the small queue's empty claim to
    // hold one of the node's slots while the hog queue claims, the hog queue would start one
    // item and then wait for two slots to be free at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (hog, _) = h.submit("hog", Mode::Parallel, vec![json!({}); 12]).await;
    h.wait_until(&hog, "2 items running", |b| b.counts.running == 2).await;
    let (small, _) = h.submit("small", Mode::Parallel, vec![json!({})]).await;
    assert_eq!(h.batch(&small).await.counts.pending, 1, "no slot of the node is free");
    // One hog item at a time, until the small queue's item has run.
    let mut ended = 0;
    while !h.batch(&small).await.status.is_terminal() {
        assert!(
            ended < 8,
            "the small queue never got a slot while the hog queue had work"
        );
        gate.add_permits(1);
        ended += 1;
        h.wait_until(&hog, "another item completed", |b| b.counts.completed == ended)
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.batch(&small).await.counts.completed, 1);
    assert!(
        h.batch(&hog).await.counts.pending > 0,
        "the hog queue still had items waiting"
    );
    gate.add_permits(12);
    assert_eq!(h.wait_until_ended(&hog).await.counts.completed, 12);
    h.shutdown().await;
}

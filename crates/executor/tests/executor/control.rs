//! Pause, resume, cancel and needs_input while the pool runs, with their events.

use std::time::Duration;

use batchd_domain::{BatchStatus, ItemStatus, Mode};
use batchd_storage::Scope;
use serde_json::json;

use crate::support::{Backend, Harness, both_backends, demo, queue};

both_backends!(
    pause_lets_running_items_finish_and_resume_restarts,
    cancel_stops_running_items,
    needs_input_waits_for_the_answer
);

async fn pause_lets_running_items_finish_and_resume_restarts(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    h.start(demo(), vec![queue("q", "demo", 2)], |_| {});
    let (id, _) = h.submit("q", Mode::Parallel, vec![json!({"sleep_ms": 300}); 6]).await;
    h.wait_until(&id, "items running", |b| b.counts.running == 2).await;
    let paused = h.store.pause_batch(Scope::All, &id).await.expect("pause");
    assert_eq!(paused.status, BatchStatus::Paused);
    // The two running items finish; nothing new starts.
    let settled = h
        .wait_until(&id, "its running items to finish", |b| b.counts.running == 0)
        .await;
    assert_eq!(
        (settled.status, settled.counts.completed, settled.counts.pending),
        (BatchStatus::Paused, 2, 4)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.batch(&id).await.counts.pending, 4, "nothing starts while paused");
    h.store.resume_batch(Scope::All, &id).await.expect("resume");
    assert_eq!(h.wait_until_ended(&id).await.status, BatchStatus::Completed);
    let types = h.event_types(&id).await;
    let paused_at = types.iter().position(|t| t == "batch.paused").expect("a pause event");
    let resumed_at = types.iter().position(|t| t == "batch.resumed").expect("a resume event");
    assert!(
        !types[paused_at..resumed_at].contains(&"item.started".to_owned()),
        "no start between pause and resume: {types:?}"
    );
    h.shutdown().await;
}

async fn cancel_stops_running_items(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    h.start(demo(), vec![queue("q", "demo", 2)], |_| {});
    let (id, _) = h
        .submit("q", Mode::Parallel, vec![json!({"sleep_ms": 60_000}); 5])
        .await;
    h.wait_until(&id, "items running", |b| b.counts.running == 2).await;
    let cancelling = h.store.cancel_batch(Scope::All, &id).await.expect("cancel");
    assert_eq!(cancelling.status, BatchStatus::Cancelling);
    // The running items see the signal and stop long before their minute of sleep is over.
    let started = tokio::time::Instant::now();
    let done = h.wait_until_ended(&id).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "running items ignored the cancel"
    );
    assert_eq!((done.status, done.counts.cancelled), (BatchStatus::Cancelled, 5));
    let types = h.event_types(&id).await;
    assert!(types.contains(&"batch.cancelling".to_owned()));
    assert_eq!(types.iter().filter(|t| *t == "item.cancelled").count(), 5);
    assert_eq!(types.last().map(String::as_str), Some("batch.cancelled"));
    h.shutdown().await;
}

async fn needs_input_waits_for_the_answer(backend: Backend) {
    let Some(mut h) = Harness::open(backend).await else {
        return;
    };
    h.start(demo(), vec![queue("q", "demo", 2)], |_| {});
    let (id, ids) = h
        .submit(
            "q",
            Mode::Parallel,
            vec![json!({"needs_input": "which account?", "result": "ok"})],
        )
        .await;
    let waiting = h
        .wait_until(&id, "an item waiting for input", |b| b.counts.needs_input == 1)
        .await;
    assert_eq!(
        waiting.status,
        BatchStatus::Running,
        "the batch stays running while an item waits"
    );
    let item = h.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(
        (item.status, item.question.clone()),
        (ItemStatus::NeedsInput, Some(json!("which account?")))
    );
    h.store
        .answer_item(Scope::All, &ids[0], json!({"account": 7}))
        .await
        .expect("answer");
    assert_eq!(h.wait_until_ended(&id).await.status, BatchStatus::Completed);
    let item = h.store.get_item(Scope::All, &ids[0]).await.expect("item");
    assert_eq!(
        (item.result, item.answer),
        (Some(json!("ok")), Some(json!({"account": 7})))
    );
    let types = h.event_types(&id).await;
    for t in ["item.needs_input", "item.input_received", "item.completed"] {
        assert!(types.contains(&t.to_owned()), "missing {t} in {types:?}");
    }
    h.shutdown().await;
}

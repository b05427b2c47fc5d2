//! Steering batches, items and queues: pause, resume, cancel, retry, answer.

use std::time::Duration;

use batchd_client::wire::BatchView;
use batchd_client::{BatchStatus, Client, ItemQuery, ItemStatus, RecentItemsQuery};
use batchd_testkit::TestServer;
use serde_json::json;

use crate::{DONE_WITHIN, on_both_backends, run_to_end};

on_both_backends!(
    a_paused_queue_holds_a_batch_that_can_be_paused_resumed_and_cancelled,
    a_failed_batch_is_retried,
    an_item_waits_for_its_answer,
    pending_items_are_listed_and_cancelled_one_by_one,
);

/// Polls the batch until `done` holds (a real server runs it: polling with a deadline).
async fn wait_for(client: &Client, batch_id: &str, done: impl Fn(&BatchView) -> bool) -> BatchView {
    let deadline = tokio::time::Instant::now() + DONE_WITHIN;
    loop {
        let batch = client.batch(batch_id).await.expect("the batch");
        if done(&batch) {
            return batch;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {batch:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_paused_queue_holds_a_batch_that_can_be_paused_resumed_and_cancelled(server: &TestServer) {
    let client = server.client();
    let paused = client.pause_queue("default").await.expect("an admin may pause a queue");
    assert!(paused.paused);
    let queues = client.queues().await.expect("the queues");
    let default = queues
        .queues
        .iter()
        .find(|q| q.name == "default")
        .expect("the default queue");
    assert!(default.paused);
    assert_eq!(default.handler.as_deref(), Some("demo"));

    let body = json!({"items": [{"input": {}}, {"input": {}}]});
    let id = client.submit_json(&body, None).await.expect("accepted").batch.id;
    assert_eq!(client.batch(&id).await.expect("the batch").status, BatchStatus::Pending);
    let depth = client.queues().await.expect("the queues").queues;
    assert_eq!(depth.iter().find(|q| q.name == "default").map(|q| q.depth), Some(2));

    let batch = client.pause_batch(&id).await.expect("a pending batch pauses");
    assert_eq!(batch.status, BatchStatus::Paused);
    let batch = client.resume_batch(&id).await.expect("a paused batch resumes");
    assert_eq!(batch.status, BatchStatus::Pending, "it never started");
    let batch = client.cancel_batch(&id).await.expect("a pending batch cancels");
    assert!(
        matches!(batch.status, BatchStatus::Cancelling | BatchStatus::Cancelled),
        "{batch:?}"
    );
    let batch = client.wait_until_done(&id, DONE_WITHIN).await.expect("the batch ends");
    assert_eq!(batch.status, BatchStatus::Cancelled);
    assert_eq!(batch.counts.cancelled, 2);

    let error = client
        .pause_batch(&id)
        .await
        .expect_err("an ended batch does not pause");
    assert_eq!((error.status(), error.code()), (Some(409), Some("invalid_state")));
    let current = error.body().and_then(|b| b.error.current_status.as_deref());
    assert_eq!(current, Some("cancelled"));

    let resumed = client
        .resume_queue("default")
        .await
        .expect("an admin may resume a queue");
    assert!(!resumed.paused);
}

async fn a_failed_batch_is_retried(server: &TestServer) {
    let client = server.client();
    let body = json!({"items": [{"input": {"fail": "boom", "permanent": true}}, {"input": {}}]});
    let batch = run_to_end(&client, &body).await;
    assert_eq!(batch.status, BatchStatus::Completed, "one item completed: {batch:?}");
    assert_eq!((batch.counts.failed, batch.counts.completed), (1, 1));
    let failed = client
        .batch_items(&batch.id, &ItemQuery::new().status(ItemStatus::Failed))
        .await
        .expect("the failed items");
    assert_eq!(failed.items.len(), 1);
    assert_eq!(failed.items[0].error.as_deref(), Some("boom"));

    let retried = client
        .retry_batch(&batch.id)
        .await
        .expect("a batch with a failed item retries");
    assert!(
        matches!(retried.status, BatchStatus::Running | BatchStatus::Pending),
        "{retried:?}"
    );
    let again = client
        .wait_until_done(&batch.id, DONE_WITHIN)
        .await
        .expect("the batch ends again");
    assert_eq!(
        (again.counts.failed, again.counts.completed),
        (1, 1),
        "the input still fails"
    );

    let clean = run_to_end(&client, &json!({"items": [{"input": {}}]})).await;
    let error = client.retry_batch(&clean.id).await.expect_err("nothing failed");
    assert_eq!(error.code(), Some("invalid_state"));
}

async fn an_item_waits_for_its_answer(server: &TestServer) {
    let client = server.client();
    let body = json!({"items": [{"input": {"needs_input": {"question": "which colour?"}}}]});
    let submitted = client.submit_json(&body, None).await.expect("accepted");
    let item_id = &submitted.batch.item_ids[0];
    let waiting = wait_for(&client, &submitted.batch.id, |b| b.counts.needs_input == 1).await;
    assert_eq!(
        waiting.status,
        BatchStatus::Running,
        "a batch stays running while an item waits"
    );
    let item = client.item(item_id).await.expect("the item");
    assert_eq!(item.status, ItemStatus::NeedsInput);
    assert_eq!(item.question, Some(json!({"question": "which colour?"})));

    let answered = client.answer_item(item_id, json!("green")).await.expect("answered");
    assert_eq!(answered.answer, Some(json!("green")));
    let done = client
        .wait_until_done(&submitted.batch.id, DONE_WITHIN)
        .await
        .expect("the batch ends");
    assert_eq!(done.status, BatchStatus::Completed);
    let error = client
        .answer_item(item_id, json!("again"))
        .await
        .expect_err("only an item in needs_input takes an answer");
    assert_eq!(error.status(), Some(409));
}

async fn pending_items_are_listed_and_cancelled_one_by_one(server: &TestServer) {
    let client = server.client();
    client.pause_queue("default").await.expect("paused");
    let body = json!({"items": [{"input": {}, "custom_id": "a"}, {"input": {}, "custom_id": "b"}]});
    let submitted = client.submit_json(&body, None).await.expect("accepted");
    let ids = &submitted.batch.item_ids;

    let recent = client
        .recent_items(&RecentItemsQuery::new())
        .await
        .expect("the recent items");
    let listed: Vec<&str> = recent.items.iter().map(|item| item.id.as_str()).collect();
    assert_eq!(listed, *ids, "oldest first");
    let custom: Vec<_> = recent.items.iter().map(|item| item.custom_id.as_deref()).collect();
    assert_eq!(custom, [Some("a"), Some("b")]);

    let cancelled = client.cancel_item(&ids[0]).await.expect("a pending item cancels");
    assert_eq!(cancelled.status, ItemStatus::Cancelled);
    client.resume_queue("default").await.expect("resumed");
    let done = client
        .wait_until_done(&submitted.batch.id, DONE_WITHIN)
        .await
        .expect("the batch ends");
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!((done.counts.cancelled, done.counts.completed), (1, 1));
    let error = client
        .cancel_item(&ids[1])
        .await
        .expect_err("a completed item does not cancel");
    assert_eq!(error.code(), Some("invalid_state"));
}

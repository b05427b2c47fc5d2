//! Submitting, waiting, replaying and listing batches.

use batchd_client::{BatchQuery, BatchStatus, ItemQuery, ItemStatus, NewBatch};
use batchd_testkit::TestServer;
use serde_json::json;

use crate::{DONE_WITHIN, assert_completed, demo_batch, on_both_backends, run_to_end};

on_both_backends!(
    a_demo_batch_runs_to_completion,
    a_replay_answers_the_same_batch,
    batches_are_listed_newest_first_and_filtered,
);

async fn a_demo_batch_runs_to_completion(server: &TestServer) {
    let client = server.client();
    let submitted = client
        .submit_json(&demo_batch(3), None)
        .await
        .expect("the batch is accepted");
    assert!(!submitted.replayed, "a new batch is 202");
    let reply = &submitted.batch;
    assert_eq!(reply.queue, "default");
    assert_eq!(reply.total_items, 3);
    assert_eq!(reply.item_ids.len(), 3);
    assert_eq!(reply.status_url, format!("/v1/batches/{}", reply.id));

    let done = client
        .wait_until_done(&reply.id, DONE_WITHIN)
        .await
        .expect("the batch ends");
    assert_completed(&done, 3);
    assert_eq!(done.id, reply.id);
    assert!(done.started_at.is_some() && done.completed_at.is_some(), "{done:?}");

    let items = client
        .batch_items(&reply.id, &ItemQuery::new())
        .await
        .expect("the items");
    let ids: Vec<&str> = items.items.iter().map(|item| item.id.as_str()).collect();
    assert_eq!(ids, reply.item_ids, "items come by index");
    for (index, item) in items.items.iter().enumerate() {
        assert_eq!(item.status, ItemStatus::Completed);
        assert_eq!(item.result, Some(json!(index)), "the demo handler returns `result`");
        assert_eq!(item.attempts, 1);
    }
    let one = client.item(&reply.item_ids[1]).await.expect("one item");
    assert_eq!(one.input, Some(json!({"sleep_ms": 5, "result": 1})));
}

async fn a_replay_answers_the_same_batch(server: &TestServer) {
    let client = server.client();
    let batch = NewBatch::new("default")
        .item(json!({"sleep_ms": 1}))
        .idempotency_key("replay-1");
    let first = client.submit(&batch).await.expect("accepted");
    let again = client.submit(&batch).await.expect("replayed");
    assert!(!first.replayed);
    assert!(again.replayed, "the same key and body answer 200");
    assert_eq!(again.batch.id, first.batch.id);
    assert_eq!(again.batch.item_ids, first.batch.item_ids);

    let other_body = NewBatch::new("default")
        .item(json!({"sleep_ms": 2}))
        .idempotency_key("replay-1");
    let conflict = client
        .submit(&other_body)
        .await
        .expect_err("the same key with another body");
    assert_eq!(conflict.status(), Some(409));
    assert_eq!(conflict.code(), Some("idempotency_conflict"));
    client
        .wait_until_done(&first.batch.id, DONE_WITHIN)
        .await
        .expect("the batch ends");
}

async fn batches_are_listed_newest_first_and_filtered(server: &TestServer) {
    let client = server.client();
    let older = run_to_end(&client, &demo_batch(1)).await;
    let newer = run_to_end(&client, &json!({"items": [{"input": {}}], "session_id": "s-2"})).await;

    let all = client.list_batches(&BatchQuery::new()).await.expect("a list");
    let ids: Vec<&str> = all.batches.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, [newer.id.as_str(), older.id.as_str()], "newest first");
    assert_eq!(all.next_cursor, None);

    let completed = client
        .list_batches(&BatchQuery::new().status(BatchStatus::Completed))
        .await
        .expect("a list");
    assert_eq!(completed.batches.len(), 2);
    let active = client.list_batches(&BatchQuery::new().active()).await.expect("a list");
    assert!(active.batches.is_empty(), "{active:?}");
    let session = client
        .list_batches(&BatchQuery::new().session_id("s-2"))
        .await
        .expect("a list");
    assert_eq!(session.batches.len(), 1);
    assert_eq!(session.batches[0].id, newer.id);
    let elsewhere = client
        .list_batches(&BatchQuery::new().queue("nowhere"))
        .await
        .expect("a list");
    assert!(elsewhere.batches.is_empty());

    let first_page = client.list_batches(&BatchQuery::new().limit(1)).await.expect("a page");
    assert_eq!(first_page.batches.len(), 1);
    assert_eq!(first_page.batches[0].id, newer.id);
    let cursor = first_page.next_cursor.expect("a second page");
    let second_page = client
        .list_batches(&BatchQuery::new().limit(1).cursor(cursor))
        .await
        .expect("a page");
    assert_eq!(second_page.batches.len(), 1);
    assert_eq!(second_page.batches[0].id, older.id);
}

//! The test server itself: it answers, it runs a test's own handlers and queues, and it
//! stops, with or without `shutdown`.

use std::time::Duration;

use async_trait::async_trait;
use batchd_client::{BatchStatus, ClientError, NewBatch};
use batchd_executor::{Completion, Handler, HandlerError, ItemContext};
use batchd_testkit::{Backend, TestServer};
use serde_json::json;

use crate::{DONE_WITHIN, on_both_backends};

on_both_backends!(health_and_readiness_answer, an_unknown_batch_is_not_found);

async fn health_and_readiness_answer(server: &TestServer) {
    let client = server.client();
    let health = client.health().await.expect("the server is alive");
    assert_eq!(health["status"], "ok");
    let ready = client.ready().await.expect("the database is reachable and migrated");
    assert_eq!(ready["status"], "ready");
    assert!(server.url().starts_with("http://127.0.0.1:"), "{}", server.url());
    let backend = match server.backend() {
        Backend::Sqlite => "sqlite",
        _ => "postgres",
    };
    assert_eq!(server.store().backend(), backend);
}

async fn an_unknown_batch_is_not_found(server: &TestServer) {
    let error = server
        .client()
        .batch("no-such-batch")
        .await
        .expect_err("there is no such batch");
    assert!(matches!(error, ClientError::Api { status: 404, .. }), "{error:?}");
    assert_eq!(error.code(), Some("not_found"));
    assert!(error.request_id().is_some_and(|id| !id.is_empty()), "{error:?}");
}

/// Answers `{"shouted": <its input's text, upper-cased>, "attempt": n}`.
struct Shout;

#[async_trait]
impl Handler for Shout {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        let text = item.input["text"]
            .as_str()
            .ok_or_else(|| HandlerError::permanent("no text"))?;
        Ok(Completion::Completed(
            json!({"shouted": text.to_uppercase(), "attempt": item.attempt}),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_handler_runs_on_a_test_queue() {
    let server = TestServer::builder()
        .handler("shout", Shout)
        .queue("shouting", |q| {
            q.handler = "shout".to_owned();
            q.max_attempts = 1;
        })
        .settings(|s| s.executor.max_running = 4)
        .start()
        .await
        .expect("the server starts")
        .expect("SQLite is always available");
    let shouting = &server.settings().queues["shouting"];
    assert_eq!(shouting.handler, "shout");
    assert_eq!(shouting.max_attempts, 1);
    assert_eq!(
        shouting.concurrency,
        server.settings().queue_defaults.concurrency,
        "an omitted key comes from [queue_defaults]"
    );
    assert_eq!(server.settings().executor.max_running, 4);
    assert_eq!(server.settings().executor.poll_interval_ms, 100, "the test default");

    let client = server.client();
    let batch = NewBatch::new("shouting")
        .item(json!({"text": "hello"}))
        .item(json!({"text": "batchd"}));
    let id = client.submit(&batch).await.expect("accepted").batch.id;
    let done = client.wait_until_done(&id, DONE_WITHIN).await.expect("the batch ends");
    assert_eq!(done.status, BatchStatus::Completed, "{done:?}");
    let items = client.batch_items(&id, &Default::default()).await.expect("the items");
    let results: Vec<_> = items.items.iter().map(|item| item.result.clone()).collect();
    assert_eq!(
        results,
        vec![
            Some(json!({"shouted": "HELLO", "attempt": 1})),
            Some(json!({"shouted": "BATCHD", "attempt": 1})),
        ]
    );

    let unknown = client
        .submit(&NewBatch::new("nowhere").item(json!({})))
        .await
        .expect_err("no such queue");
    assert_eq!(unknown.code(), Some("validation_error"));
    let issues = &unknown.body().expect("an error body").error.issues;
    assert!(issues.iter().any(|issue| issue.path == "queue"), "{issues:?}");
    server.shutdown().await.expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_server_stops_listening() {
    let server = TestServer::start().await.expect("the server starts");
    let client = server.client();
    client.health().await.expect("the server is alive");
    drop(server);
    let error = client.health().await.expect_err("nothing listens any more");
    assert!(matches!(error, ClientError::Transport(_)), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dropped_by_a_panic_is_stopped_too() {
    let (url_tx, url_rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let server = TestServer::start().await.expect("the server starts");
        url_tx.send(server.client()).expect("the test waits for the client");
        panic!("a failed assertion while the server runs");
    });
    let client = url_rx.await.expect("the server started");
    let joined = failing.await.expect_err("the task panicked");
    assert!(joined.is_panic());
    // The stop was scheduled as the panic unwound: poll until nothing listens.
    let deadline = tokio::time::Instant::now() + DONE_WITHIN;
    while client.health().await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the server still answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_independent() {
    let first = TestServer::start().await.expect("the first server starts");
    let second = TestServer::start().await.expect("the second server starts");
    assert_ne!(first.url(), second.url());
    let id = first
        .client()
        .submit(&NewBatch::new("default").item(json!({})))
        .await
        .expect("accepted")
        .batch
        .id;
    let elsewhere = second.client().batch(&id).await.expect_err("another database");
    assert_eq!(elsewhere.code(), Some("not_found"));
    first.shutdown().await.expect("a clean shutdown");
    second.shutdown().await.expect("a clean shutdown");
}

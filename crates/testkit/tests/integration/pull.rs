//! The pull-worker protocol through the typed client: claims never hand one item to two
//! workers, leases expire and move to another worker, cancellation and long polls, reports,
//! and who may call.

use std::collections::HashSet;
use std::time::Duration;

use batchd_client::wire::{ItemEventRequest, WorkerEventType};
use batchd_client::{BatchStatus, ClaimOptions, Client, EventType, Heartbeat, ItemStatus, wire::Progress};
use batchd_testkit::{Backend, TestServer};
use serde_json::{Value, json};

use crate::{DONE_WITHIN, on_both_backends_with_own_server};

on_both_backends_with_own_server!(
    two_workers_never_claim_the_same_item,
    an_expired_lease_moves_to_another_worker_and_the_late_report_is_refused,
    a_cancelled_batch_answers_item_cancelled,
    a_long_poll_returns_when_work_arrives_and_empty_after_its_wait,
    reports_reach_the_timeline_and_failures_follow_the_backoff,
    only_workers_claim_and_only_their_queues,
);

const CLIENT_KEY: &str = "client-key";
const WORKER_KEY: &str = "worker-key";
const OTHER_WORKER_KEY: &str = "other-worker-key";
const ADMIN_KEY: &str = "admin-key";

fn key(
    name: &str,
    tenant: &str,
    role: batchd_api::Role,
    key: &str,
    queues: Option<Vec<String>>,
) -> batchd_server::AuthKey {
    batchd_server::AuthKey {
        name: name.to_owned(),
        tenant: tenant.to_owned(),
        role,
        key_sha256: None,
        key: Some(batchd_server::Secret::new(key)),
        queues,
    }
}

/// A server with a pull queue `remote` and keys for a client, two workers (one limited to
/// queue `elsewhere`) and an admin; `None` without PostgreSQL.
async fn server(backend: Backend, lease_ms: u64) -> Option<TestServer> {
    TestServer::builder()
        .backend(backend)
        .queue("remote", move |q| {
            q.handler = "pull".to_owned();
            q.lease_ms = lease_ms;
            q.backoff_base_ms = 10;
            q.backoff_max_ms = 10;
        })
        .settings(|s| {
            use batchd_api::Role;
            s.auth.keys = vec![
                key("app", "acme", Role::Client, CLIENT_KEY, None),
                key("worker", "ops", Role::Worker, WORKER_KEY, None),
                key(
                    "limited",
                    "ops",
                    Role::Worker,
                    OTHER_WORKER_KEY,
                    Some(vec!["elsewhere".to_owned()]),
                ),
                key("admin", "ops", Role::Admin, ADMIN_KEY, None),
            ];
        })
        .start()
        .await
        .expect("the test server starts")
}

fn clients(server: &TestServer) -> (Client, Client) {
    (
        server.client().with_token(CLIENT_KEY),
        server.client().with_token(WORKER_KEY),
    )
}

async fn submit(app: &Client, inputs: impl IntoIterator<Item = Value>) -> String {
    let items: Vec<Value> = inputs.into_iter().map(|input| json!({"input": input})).collect();
    let body = json!({"queue": "remote", "items": items});
    app.submit_json(&body, None)
        .await
        .expect("the batch is accepted")
        .batch
        .id
}

async fn two_workers_never_claim_the_same_item(backend: Backend) {
    let Some(server) = server(backend, 30_000).await else {
        return;
    };
    let (app, worker) = clients(&server);
    let id = submit(&app, (0..1_000).map(|i| json!({"n": i}))).await;
    let work = |worker: Client| async move {
        let mut seen = Vec::new();
        let options = ClaimOptions::new().max_items(25).wait(Duration::from_millis(200));
        loop {
            let items = worker.claim("remote", &options).await.expect("a claim");
            if items.is_empty() {
                return seen;
            }
            for item in items {
                let result = json!({"n": item.input["n"]});
                worker
                    .complete(&item.id, &item.lease_token, result)
                    .await
                    .expect("the lease holds");
                seen.push(item.id);
            }
        }
    };
    let (a, b) = tokio::join!(tokio::spawn(work(worker.clone())), tokio::spawn(work(worker)));
    let (a, b) = (a.expect("worker a"), b.expect("worker b"));
    let all: Vec<&String> = a.iter().chain(&b).collect();
    let unique: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        1_000,
        "every item claimed once: a {} + b {}",
        a.len(),
        b.len()
    );
    assert_eq!(unique.len(), 1_000, "no item went to both workers");
    let batch = app.wait_until_done(&id, DONE_WITHIN).await.expect("the batch ends");
    assert_eq!((batch.status, batch.counts.completed), (BatchStatus::Completed, 1_000));
    server.shutdown().await.expect("a clean shutdown");
}

async fn an_expired_lease_moves_to_another_worker_and_the_late_report_is_refused(backend: Backend) {
    let Some(server) = server(backend, 30_000).await else {
        return;
    };
    let (app, worker) = clients(&server);
    let id = submit(&app, [json!({"job": 1})]).await;
    let short = ClaimOptions::new().lease(Duration::from_millis(300));
    let first = worker.claim("remote", &short).await.expect("a claim");
    assert_eq!(first.len(), 1);
    let stale = &first[0];
    // The first worker goes quiet; the rescuer puts the item back once its lease expired.
    let patient = ClaimOptions::new().wait(Duration::from_secs(10));
    let deadline = tokio::time::Instant::now() + DONE_WITHIN;
    let second = loop {
        let items = worker.claim("remote", &patient).await.expect("a claim");
        if let Some(item) = items.into_iter().next() {
            break item;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired item never came back"
        );
    };
    assert_eq!(second.id, stale.id);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.lease_token, stale.lease_token);
    let late = worker
        .complete(&stale.id, &stale.lease_token, json!("late"))
        .await
        .expect_err("the lease is gone");
    assert_eq!((late.status(), late.code()), (Some(409), Some("lease_lost")));
    let beat = worker
        .heartbeat(&stale.id, &stale.lease_token, &Heartbeat::default())
        .await
        .expect_err("gone");
    assert!(beat.is_lease_lost(), "{beat}");
    worker
        .complete(&second.id, &second.lease_token, json!("on time"))
        .await
        .expect("the new lease holds");
    let batch = app.wait_until_done(&id, DONE_WITHIN).await.expect("the batch ends");
    assert_eq!(batch.status, BatchStatus::Completed);
    let item = app.item(&second.id).await.expect("the item");
    assert_eq!(item.result, Some(json!("on time")));
    let events = app.batch_events(&id, None, None).await.expect("the timeline").events;
    assert!(events.iter().any(|e| e.event_type == EventType::ItemLeaseExpired));
    server.shutdown().await.expect("a clean shutdown");
}

async fn a_cancelled_batch_answers_item_cancelled(backend: Backend) {
    let Some(server) = server(backend, 30_000).await else {
        return;
    };
    let (app, worker) = clients(&server);
    let id = submit(&app, [json!({}), json!({})]).await;
    let claimed = worker.claim("remote", &ClaimOptions::new()).await.expect("a claim");
    let item = &claimed[0];
    let batch = app.cancel_batch(&id).await.expect("the batch cancels");
    assert_eq!(batch.status, BatchStatus::Cancelling, "one item still runs");
    let error = worker
        .heartbeat(&item.id, &item.lease_token, &Heartbeat::default())
        .await
        .expect_err("cancelled");
    assert_eq!((error.status(), error.code()), (Some(409), Some("item_cancelled")));
    assert!(error.is_lease_gone());
    let batch = app.wait_until_done(&id, DONE_WITHIN).await.expect("the batch ends");
    assert_eq!((batch.status, batch.counts.cancelled), (BatchStatus::Cancelled, 2));
    assert_eq!(
        app.item(&item.id).await.expect("the item").status,
        ItemStatus::Cancelled
    );
    let late = worker
        .complete(&item.id, &item.lease_token, json!(1))
        .await
        .expect_err("cancelled");
    assert!(late.is_item_cancelled(), "{late}");
    server.shutdown().await.expect("a clean shutdown");
}

async fn a_long_poll_returns_when_work_arrives_and_empty_after_its_wait(backend: Backend) {
    let Some(server) = server(backend, 30_000).await else {
        return;
    };
    let (app, worker) = clients(&server);
    let wait = Duration::from_millis(400);
    let started = tokio::time::Instant::now();
    let items = worker
        .claim("remote", &ClaimOptions::new().wait(wait))
        .await
        .expect("a claim");
    assert!(items.is_empty());
    assert!(
        started.elapsed() >= wait,
        "answered empty after {:?}",
        started.elapsed()
    );

    let long = Duration::from_secs(25);
    let polling = {
        let worker = worker.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let items = worker
                .claim("remote", &ClaimOptions::new().wait(long))
                .await
                .expect("a claim");
            (items, started.elapsed())
        })
    };
    // The poll is waiting (or about to): the submit must wake it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = submit(&app, [json!({"wake": true})]).await;
    let (items, waited) = polling.await.expect("the poll ends");
    assert_eq!(items.len(), 1, "the long poll returned the new item");
    assert!(waited < long, "returned with work before its wait ran out ({waited:?})");
    assert_eq!(items[0].batch_id, id);
    assert_eq!(items[0].input, json!({"wake": true}));
    server.shutdown().await.expect("a clean shutdown");
}

async fn reports_reach_the_timeline_and_failures_follow_the_backoff(backend: Backend) {
    let Some(server) = server(backend, 30_000).await else {
        return;
    };
    let (app, worker) = clients(&server);
    let id = submit(&app, [json!({"a": 1}), json!({"b": 2}), json!({"c": 3})]).await;
    let items = worker
        .claim("remote", &ClaimOptions::new().max_items(3))
        .await
        .expect("a claim");
    assert_eq!(items.len(), 3);
    let (first, second, third) = (&items[0], &items[1], &items[2]);
    assert_eq!(first.config["max_attempts"], 3, "the merged config");

    let beat = Heartbeat {
        lease: Some(Duration::from_secs(60)),
        step: Some("fetch".to_owned()),
        progress: Some(Progress {
            current: 1,
            total: Some(4),
        }),
        ..Heartbeat::default()
    };
    let lease = worker
        .heartbeat(&first.id, &first.lease_token, &beat)
        .await
        .expect("renewed");
    assert!(lease.lease_expires_at > first.lease_expires_at);
    let event = ItemEventRequest {
        lease_token: first.lease_token.clone(),
        event_type: WorkerEventType::Log,
        step: None,
        message: Some("halfway".to_owned()),
        data: Some(json!({"rows": 10})),
        progress: None,
    };
    worker.item_event(&first.id, &event).await.expect("logged");
    let done = worker
        .complete(&first.id, &first.lease_token, json!({"ok": 1}))
        .await
        .expect("completed");
    assert_eq!(done.status, ItemStatus::Completed);

    let asked = worker
        .needs_input(&second.id, &second.lease_token, json!("which one?"))
        .await
        .expect("asked");
    assert_eq!(asked.status, ItemStatus::NeedsInput);
    assert_eq!(
        app.item(&second.id).await.expect("the item").question,
        Some(json!("which one?"))
    );

    let retried = worker
        .fail(&third.id, &third.lease_token, "flaky", true)
        .await
        .expect("failed");
    assert_eq!(retried.status, ItemStatus::Pending, "retried after the backoff");
    let deadline = tokio::time::Instant::now() + DONE_WITHIN;
    let again = loop {
        let items = worker
            .claim("remote", &ClaimOptions::new().wait(Duration::from_secs(2)))
            .await
            .expect("a claim");
        if let Some(item) = items.into_iter().next() {
            break item;
        }
        assert!(tokio::time::Instant::now() < deadline, "the retry never came due");
    };
    assert_eq!((again.id.as_str(), again.attempt), (third.id.as_str(), 2));
    let failed = worker
        .fail(&again.id, &again.lease_token, "broken for good", false)
        .await
        .expect("failed");
    assert_eq!(failed.status, ItemStatus::Failed);

    let events = app.batch_events(&id, None, None).await.expect("the timeline").events;
    let step = events
        .iter()
        .find(|e| e.event_type == EventType::ItemStep)
        .expect("an item.step");
    assert_eq!(step.step.as_deref(), Some("fetch"));
    let log = events
        .iter()
        .find(|e| e.event_type == EventType::ItemLog)
        .expect("an item.log");
    assert_eq!(log.message.as_deref(), Some("halfway"));
    assert_eq!(log.data.as_ref().map(|d| d["rows"].clone()), Some(json!(10)));
    assert!(events.iter().any(|e| e.event_type == EventType::ItemNeedsInput));
    assert!(events.iter().any(|e| e.event_type == EventType::ItemRetryScheduled));
    let item = app.item(&third.id).await.expect("the item");
    assert_eq!(
        (item.status, item.error.as_deref()),
        (ItemStatus::Failed, Some("broken for good"))
    );
    server.shutdown().await.expect("a clean shutdown");
}

async fn only_workers_claim_and_only_their_queues(backend: Backend) {
    let Some(server) = server(backend, 30_000).await else {
        return;
    };
    let (app, worker) = clients(&server);
    let id = submit(&app, [json!({})]).await;
    let error = app
        .claim("remote", &ClaimOptions::new())
        .await
        .expect_err("a client key");
    assert_eq!((error.status(), error.code()), (Some(403), Some("forbidden")));
    let limited = server.client().with_token(OTHER_WORKER_KEY);
    let error = limited
        .claim("remote", &ClaimOptions::new())
        .await
        .expect_err("not its queue");
    assert_eq!((error.status(), error.code()), (Some(403), Some("forbidden")));
    let error = server
        .client()
        .claim("remote", &ClaimOptions::new())
        .await
        .expect_err("no key");
    assert_eq!(error.status(), Some(401));
    for queue in ["default", "nowhere"] {
        let error = worker
            .claim(queue, &ClaimOptions::new())
            .await
            .expect_err("not a pull queue");
        assert_eq!((error.status(), error.code()), (Some(400), Some("validation_error")));
        let paths: Vec<&str> = error
            .body()
            .into_iter()
            .flat_map(|b| &b.error.issues)
            .map(|i| i.path.as_str())
            .collect();
        assert_eq!(paths, ["queue"]);
    }
    let error = worker
        .claim("remote", &ClaimOptions::new().max_items(101))
        .await
        .expect_err("too many");
    let paths: Vec<&str> = error
        .body()
        .into_iter()
        .flat_map(|b| &b.error.issues)
        .map(|i| i.path.as_str())
        .collect();
    assert_eq!(paths, ["max_items"]);

    // A worker key serves every tenant; the item calls refuse a client key.
    let admin = server.client().with_token(ADMIN_KEY);
    let items = admin
        .claim("remote", &ClaimOptions::new())
        .await
        .expect("an admin may claim");
    let item = &items[0];
    assert_eq!(item.batch_id, id);
    let error = app
        .complete(&item.id, &item.lease_token, json!(1))
        .await
        .expect_err("a client key");
    assert_eq!(error.status(), Some(403));
    let error = worker
        .complete("no-such-item", "no-token", json!(1))
        .await
        .expect_err("unknown");
    assert!(error.is_lease_lost(), "{error}");
    worker
        .complete(&item.id, &item.lease_token, json!(1))
        .await
        .expect("any worker key with the token");
    server.shutdown().await.expect("a clean shutdown");
}

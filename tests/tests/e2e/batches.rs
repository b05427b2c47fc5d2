//! Batches through the real binary: the demo queue runs a submitted batch out of the box, and
//! a `kill -9` in the middle of a batch loses nothing: after a restart every item runs to the
//! end, the interrupted ones again (their lease expired), and the counters match the items.

use batchd_storage::testing::TestDatabase;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::{STOP_TIMEOUT, Server};

fn ended(batch: &Value) -> bool {
    matches!(batch["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

async fn runs_a_demo_batch(mut server: Server) {
    server.wait_ready().await;
    let body = json!({"items": [
        {"input": {"steps": ["fetch", "write"], "sleep_ms": 20, "result": {"ok": 1}}, "custom_id": "a"},
        {"input": {"fail": "boom", "permanent": true}},
        {"input": {"sleep_ms": 5}}
    ]});
    let created = server.post("/v1/batches", &body).await;
    assert_eq!(created.status, 202, "{:?}", created.body);
    let id = created.body["id"].as_str().expect("an id").to_owned();
    let done = server.wait_until(&format!("/v1/batches/{id}"), ended).await;
    assert_eq!(done.body["status"], "completed", "{:?}", done.body);
    assert_eq!(done.body["counts"]["completed"], 2);
    assert_eq!(done.body["counts"]["failed"], 1);
    let items = server.get(&format!("/v1/batches/{id}/items")).await;
    assert_eq!(items.body["items"][0]["result"], json!({"ok": 1}));
    assert_eq!(items.body["items"][0]["step"], "write");
    assert_eq!(items.body["items"][1]["error"], "boom");
    let events = server.get(&format!("/v1/batches/{id}/events")).await;
    let types: Vec<&str> = events.body["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for t in [
        "batch.created",
        "batch.started",
        "item.step",
        "item.completed",
        "item.failed",
        "batch.completed",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    // The worker pool's attempts and pick-up latency reach /metrics.
    let metrics = server.get_text("/metrics").await;
    for expected in [
        r#"batchd_item_attempts_total{queue="default",status="completed"} 2"#,
        r#"batchd_item_attempts_total{queue="default",status="failed"} 1"#,
        r#"batchd_pickup_latency_seconds_count{queue="default"} 3"#,
        r#"batchd_item_duration_seconds_count{queue="default",status="completed"} 2"#,
    ] {
        assert!(metrics.contains(expected), "missing {expected:?} in:\n{metrics}");
    }
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(STOP_TIMEOUT).await.code(), Some(0));
}

#[tokio::test]
async fn the_default_queue_runs_a_batch_on_sqlite() {
    let dir = tempfile::tempdir().expect("a temp dir");
    runs_a_demo_batch(Server::serve(dir.path(), &[], &[])).await;
}

#[tokio::test]
async fn the_default_queue_runs_a_batch_on_postgres() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    runs_a_demo_batch(Server::serve(dir.path(), &["--database-url", db.url()], &[])).await;
}

#[tokio::test]
async fn a_killed_server_loses_nothing_after_a_restart() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // A short lease, so the items the dead server held come back quickly.
    let env = [
        ("BATCHD__QUEUE_DEFAULTS__LEASE_MS", "1000"),
        ("BATCHD__QUEUE_DEFAULTS__CONCURRENCY", "4"),
    ];
    let mut server = Server::serve(dir.path(), &[], &env);
    server.wait_ready().await;
    let created = server
        .post(
            "/v1/batches",
            &json!({"items": vec![json!({"input": {"sleep_ms": 400}}); 12]}),
        )
        .await;
    assert_eq!(created.status, 202);
    let id = created.body["id"].as_str().expect("an id").to_owned();
    let path = format!("/v1/batches/{id}");
    server
        .wait_until(&path, |b| b["counts"]["running"].as_i64() == Some(4))
        .await;
    server.signal(Signal::SIGKILL);
    server.wait_exit(STOP_TIMEOUT).await;

    let mut restarted = Server::serve(dir.path(), &[], &env);
    restarted.wait_ready().await;
    let done = restarted.wait_until(&path, ended).await;
    assert_eq!(done.body["status"], "completed", "{:?}", done.body);
    assert_eq!(done.body["counts"]["completed"], 12, "no item was lost");
    let items = restarted.get(&format!("{path}/items")).await;
    let attempts: Vec<i64> = items.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["attempts"].as_i64())
        .collect();
    assert_eq!(attempts.len(), 12);
    assert!(
        attempts.iter().filter(|a| **a == 2).count() >= 4,
        "the interrupted items ran again: {attempts:?}"
    );
    let events = restarted.get(&format!("{path}/events?limit=1000")).await;
    let expired = events.body["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "item.lease_expired")
        .count();
    assert!(expired >= 4, "their leases expired: {expired}");
    restarted.signal(Signal::SIGTERM);
    assert_eq!(restarted.wait_exit(STOP_TIMEOUT).await.code(), Some(0));
}

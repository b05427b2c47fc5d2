//! The `/v1` API over real storage, on SQLite and on PostgreSQL: every endpoint, the error
//! paths, idempotency, tenancy, the event stream, and seed 002's queue flow. Items are moved
//! through the store directly (no worker pool runs here), so every step is deterministic.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::test::{TestRequest, call_service, init_service};
use actix_web::web;
use batchd_api::{ApiConfig, ApiState, AuthConfig, QueueInfo, Role, app, json_config, sha256_hex};
use batchd_storage::testing::TestDatabase;
use batchd_storage::{ClaimRequest, Finish, Outcome, Store, StoreOptions};
use serde_json::{Value, json};

use crate::{Reply, send};

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[actix_web::test]
                async fn $name() {
                    super::$name(crate::v1::Db::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[actix_web::test]
                async fn $name() {
                    if let Some(db) = crate::v1::Db::postgres().await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

both_backends!(
    submit_then_read_everything,
    bad_requests_get_the_error_shape_with_paths,
    idempotent_submits,
    control_follows_the_state_machine,
    tenants_never_see_each_other,
    the_event_stream_resumes_without_repeats_or_gaps,
    seed_002_queue_positions_and_item_cancel,
    metrics_count_requests_and_show_queues,
    callers_over_their_rate_get_429,
);

pub(crate) struct Db(TestDatabase);

impl Db {
    fn sqlite() -> Db {
        Db(TestDatabase::sqlite())
    }

    async fn postgres() -> Option<Db> {
        TestDatabase::postgres().await.map(Db)
    }

    async fn store(&self) -> Arc<dyn Store> {
        batchd_storage::connect(StoreOptions::new(self.0.url()))
            .await
            .expect("open the store")
    }
}

fn config(auth: AuthConfig) -> ApiConfig {
    let mut config = ApiConfig {
        auth,
        ..ApiConfig::default()
    };
    let defaults = json!({"max_attempts": 2}).as_object().cloned().unwrap_or_default();
    config.queues.insert(
        "emails".into(),
        QueueInfo {
            handler: "demo".into(),
            max_items: 100,
            defaults,
            lease: Duration::from_secs(30),
        },
    );
    config
}

async fn api(
    store: &Arc<dyn Store>,
    auth: AuthConfig,
) -> impl Service<actix_http::Request, Response = ServiceResponse<impl MessageBody>, Error = actix_web::Error> {
    let state = web::Data::new(ApiState::new(store.clone(), config(auth)));
    init_service(app(state).app_data(json_config(64 * 1024))).await
}

fn post(uri: &str, body: Value) -> TestRequest {
    TestRequest::post().uri(uri).set_json(body)
}

fn get(uri: &str) -> TestRequest {
    TestRequest::get().uri(uri)
}

fn as_tenant(request: TestRequest, token: &str) -> TestRequest {
    request.insert_header(("authorization", format!("Bearer {token}")))
}

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], code, "{}", reply.body);
    assert!(reply.body["error"]["message"].is_string());
    assert!(reply.body["error"]["issues"].is_array());
    assert!(reply.headers.contains_key("x-request-id"));
}

fn issue_paths(reply: &Reply) -> Vec<String> {
    reply.body["error"]["issues"]
        .as_array()
        .map(|issues| {
            issues
                .iter()
                .filter_map(|i| i["path"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Claims up to `n` items of a queue and completes them, as a worker would.
async fn work(store: &Arc<dyn Store>, queue: &str, n: usize) {
    let request = ClaimRequest {
        queue: queue.into(),
        max_items: n,
        lease: Duration::from_secs(30),
        owner: "t".into(),
    };
    let claimed = store.claim(&request).await.expect("claim");
    let finishes = claimed
        .into_iter()
        .map(|c| Finish {
            item_id: c.id,
            lease_token: c.lease_token,
            outcome: Outcome::Completed {
                result: json!({"ok": c.index}),
            },
        })
        .collect();
    store.finish(finishes).await.expect("finish");
}

async fn submit_then_read_everything(db: Db) {
    let store = db.store().await;
    let app = api(&store, AuthConfig::open()).await;
    let body = json!({
        "items": [{"input": {"n": 0}, "custom_id": "first"}, {"input": {"n": 1}}],
        "session_id": "chat-1", "metadata": {"from": "test"}, "config": {"model": "m"},
        "webhook": {"url": "https://example.com/hook", "secret": "s3cret"}
    });
    let created = send(&app, post("/v1/batches", body)).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let id = created.body["id"].as_str().expect("an id").to_owned();
    assert_eq!(
        created.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/v1/batches/{id}").as_str())
    );
    assert_eq!(created.body["status"], "pending");
    assert_eq!(created.body["queue"], "default");
    assert_eq!(created.body["total_items"], 2);
    assert_eq!(created.body["item_ids"].as_array().map(Vec::len), Some(2));
    assert_eq!(created.body["status_url"], format!("/v1/batches/{id}"));
    assert_eq!(created.body["events_url"], format!("/v1/batches/{id}/events"));
    assert!(created.body["created_at"].is_string());

    let batch = send(&app, get(&format!("/v1/batches/{id}"))).await;
    assert_eq!(batch.status, 200);
    let b = &batch.body;
    for key in [
        "id",
        "queue",
        "session_id",
        "status",
        "mode",
        "on_item_failure",
        "priority",
        "run_at",
        "counts",
        "progress",
        "current",
        "message",
        "error",
        "result",
        "metadata",
        "config",
        "webhook",
        "created_at",
        "started_at",
        "updated_at",
        "completed_at",
    ] {
        assert!(b.get(key).is_some(), "batch field {key} missing: {b}");
    }
    assert_eq!(
        b["counts"],
        json!({"total": 2, "pending": 2, "running": 0, "completed": 0, "failed": 0, "cancelled": 0, "needs_input": 0})
    );
    assert_eq!(
        b["webhook"],
        json!({"url": "https://example.com/hook", "events": ["item.completed", "item.failed", "item.needs_input", "batch.completed", "batch.failed", "batch.cancelled"]})
    );
    assert!(
        !b.to_string().contains("s3cret"),
        "the webhook secret is never returned"
    );
    assert_eq!(
        (b["mode"].clone(), b["metadata"].clone()),
        (json!("parallel"), json!({"from": "test"}))
    );

    let items = send(&app, get(&format!("/v1/batches/{id}/items"))).await;
    assert_eq!(items.status, 200);
    let first = &items.body["items"][0];
    for key in [
        "id",
        "batch_id",
        "index",
        "custom_id",
        "status",
        "position",
        "attempts",
        "max_attempts",
        "step",
        "message",
        "progress",
        "result",
        "error",
        "question",
        "answer",
        "next_attempt_at",
        "created_at",
        "started_at",
        "completed_at",
    ] {
        assert!(first.get(key).is_some(), "item field {key} missing: {first}");
    }
    assert_eq!(
        (first["custom_id"].clone(), first["position"].clone()),
        (json!("first"), json!(1))
    );
    assert!(first.get("input").is_none(), "lists leave the input out");
    assert_eq!(items.body["next_cursor"], Value::Null);

    let item_id = first["id"].as_str().expect("an item id").to_owned();
    let one = send(&app, get(&format!("/v1/items/{item_id}"))).await;
    assert_eq!(one.body["input"], json!({"n": 0}));
    let recent = send(&app, get("/v1/items")).await;
    assert_eq!(recent.body["items"].as_array().map(Vec::len), Some(2));

    work(&store, "default", 1).await;
    let batch = send(&app, get(&format!("/v1/batches/{id}"))).await;
    assert_eq!(
        (batch.body["status"].clone(), batch.body["counts"]["completed"].clone()),
        (json!("running"), json!(1))
    );
    assert!((batch.body["progress"].as_f64().unwrap_or_default() - 0.5).abs() < 1e-9);

    let events = send(&app, get(&format!("/v1/batches/{id}/events"))).await;
    let types: Vec<&str> = events.body["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        types,
        vec!["batch.created", "batch.started", "item.started", "item.completed"]
    );
    let after = send(&app, get(&format!("/v1/batches/{id}/events?after=2&limit=1"))).await;
    assert_eq!(after.body["events"][0]["seq"], 3);
    let e = &after.body["events"][0];
    for key in [
        "seq",
        "batch_id",
        "item_id",
        "item_index",
        "type",
        "step",
        "message",
        "data",
        "at",
    ] {
        assert!(e.get(key).is_some(), "event field {key} missing: {e}");
    }

    let listed = send(&app, get("/v1/batches?status=active&session_id=chat-1")).await;
    assert_eq!(listed.body["batches"][0]["id"], json!(id));
    let queues = send(&app, get("/v1/queues")).await;
    let default = queues.body["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|q| q["name"] == "default")
        .cloned();
    let default = default.expect("the default queue");
    assert_eq!(
        (default["depth"].clone(), default["throughput_per_minute"].clone()),
        (json!(1), json!(1))
    );
}

async fn bad_requests_get_the_error_shape_with_paths(db: Db) {
    let store = db.store().await;
    let app = api(&store, AuthConfig::open()).await;
    let reply = send(
        &app,
        post(
            "/v1/batches",
            json!({"queue": "nope", "mode": "both", "items": [{"input": 1}, {}]}),
        ),
    )
    .await;
    assert_error(&reply, 400, "validation_error");
    let paths = issue_paths(&reply);
    for path in ["queue", "mode", "items[1].input"] {
        assert!(paths.contains(&path.to_owned()), "{path} missing in {paths:?}");
    }
    let too_many = json!({"queue": "emails", "items": vec![json!({"input": 1}); 101]});
    assert_eq!(
        issue_paths(&send(&app, post("/v1/batches", too_many)).await),
        vec!["items"]
    );
    let malformed = TestRequest::post()
        .uri("/v1/batches")
        .insert_header(("content-type", "application/json"))
        .set_payload("{not json");
    assert_error(&send(&app, malformed).await, 400, "malformed_json");
    let wrong_type = TestRequest::post()
        .uri("/v1/batches")
        .insert_header(("content-type", "text/plain"))
        .set_payload("{}");
    assert_error(&send(&app, wrong_type).await, 415, "unsupported_media_type");
    let big = json!({"items": [{"input": "x".repeat(70 * 1024)}]});
    assert_error(&send(&app, post("/v1/batches", big)).await, 413, "payload_too_large");
    assert_error(&send(&app, get("/v1/batches/missing")).await, 404, "not_found");
    assert_error(&send(&app, get("/v1/items/missing")).await, 404, "not_found");
    let bad_query = send(&app, get("/v1/batches?limit=0&status=done&created_after=yesterday")).await;
    assert_error(&bad_query, 400, "validation_error");
    assert_eq!(issue_paths(&bad_query).len(), 3);
    assert_error(
        &send(&app, get("/v1/batches?cursor=garbage")).await,
        400,
        "validation_error",
    );
    let bad_answer = send(&app, post("/v1/items/x/input", json!({"reply": 1}))).await;
    assert_error(&bad_answer, 400, "validation_error");
}

async fn idempotent_submits(db: Db) {
    let store = db.store().await;
    let app = api(&store, AuthConfig::open()).await;
    let body = json!({"items": [{"input": 1}]});
    let keyed = |b: Value| post("/v1/batches", b).insert_header(("idempotency-key", "k-1"));
    let first = send(&app, keyed(body.clone())).await;
    assert_eq!(first.status, 202);
    let replay = send(&app, keyed(body.clone())).await;
    assert_eq!(replay.status, 200, "a replay answers 200");
    assert_eq!(replay.body, first.body, "with the same body shape and values");
    assert_error(
        &send(&app, keyed(json!({"items": [{"input": 2}]}))).await,
        409,
        "idempotency_conflict",
    );
    let by_id = json!({"id": "job-7", "items": [{"input": 1}]});
    assert_eq!(send(&app, post("/v1/batches", by_id.clone())).await.status, 202);
    assert_eq!(send(&app, post("/v1/batches", by_id)).await.status, 200);
    assert_error(
        &send(
            &app,
            post("/v1/batches", json!({"id": "job-7", "items": [{"input": 9}]})),
        )
        .await,
        409,
        "idempotency_conflict",
    );
    // A batch whose id the server chose: a request naming that id, even with the same
    // items, is another request.
    let generated = send(&app, post("/v1/batches", body.clone())).await;
    assert_eq!(generated.status, 202);
    let id = generated.body["id"].as_str().expect("an id").to_owned();
    assert_error(
        &send(&app, post("/v1/batches", json!({"id": id, "items": [{"input": 1}]}))).await,
        409,
        "idempotency_conflict",
    );
    let listed = send(&app, get("/v1/batches")).await;
    assert_eq!(
        listed.body["batches"].as_array().map(Vec::len),
        Some(3),
        "replays create nothing"
    );
}

async fn control_follows_the_state_machine(db: Db) {
    let store = db.store().await;
    let app = api(&store, AuthConfig::open()).await;
    let id = send(
        &app,
        post("/v1/batches", json!({"items": [{"input": 1}, {"input": 2}]})),
    )
    .await
    .body["id"]
        .clone();
    let id = id.as_str().expect("an id").to_owned();
    let paused = send(&app, TestRequest::post().uri(&format!("/v1/batches/{id}/pause"))).await;
    assert_eq!((paused.status, paused.body["status"].clone()), (200, json!("paused")));
    let again = send(&app, TestRequest::post().uri(&format!("/v1/batches/{id}/pause"))).await;
    assert_error(&again, 409, "invalid_state");
    assert_eq!(again.body["error"]["current_status"], "paused");
    let resumed = send(&app, TestRequest::post().uri(&format!("/v1/batches/{id}/resume"))).await;
    assert_eq!(resumed.body["status"], "pending");
    let retry = send(&app, TestRequest::post().uri(&format!("/v1/batches/{id}/retry"))).await;
    assert_error(&retry, 409, "invalid_state");
    let cancelled = send(&app, TestRequest::post().uri(&format!("/v1/batches/{id}/cancel"))).await;
    assert_eq!(cancelled.body["status"], "cancelled");
    let twice = send(&app, TestRequest::post().uri(&format!("/v1/batches/{id}/cancel"))).await;
    assert_error(&twice, 409, "invalid_state");
    assert_eq!(twice.body["error"]["current_status"], "cancelled");
    // needs_input → answer through the API.
    let asked = send(
        &app,
        post("/v1/batches", json!({"queue": "emails", "items": [{"input": 1}]})),
    )
    .await;
    let item_id = asked.body["item_ids"][0].as_str().expect("an item").to_owned();
    let request = ClaimRequest {
        queue: "emails".into(),
        max_items: 1,
        lease: Duration::from_secs(30),
        owner: "t".into(),
    };
    let claimed = store.claim(&request).await.expect("claim").remove(0);
    let ask = Finish {
        item_id: claimed.id,
        lease_token: claimed.lease_token,
        outcome: Outcome::NeedsInput {
            question: json!("which?"),
        },
    };
    store.finish(vec![ask]).await.expect("ask");
    let waiting = send(&app, get(&format!("/v1/items/{item_id}"))).await;
    assert_eq!(
        (waiting.body["status"].clone(), waiting.body["question"].clone()),
        (json!("needs_input"), json!("which?"))
    );
    assert_eq!(waiting.body["max_attempts"], 2, "the queue's max_attempts");
    let answered = send(
        &app,
        post(&format!("/v1/items/{item_id}/input"), json!({"answer": {"pick": 2}})),
    )
    .await;
    assert_eq!(
        (answered.status, answered.body["status"].clone()),
        (200, json!("pending"))
    );
    assert_eq!(answered.body["answer"], json!({"pick": 2}));
    let not_waiting = send(&app, post(&format!("/v1/items/{item_id}/input"), json!({"answer": 1}))).await;
    assert_error(&not_waiting, 409, "invalid_state");
    assert_eq!(not_waiting.body["error"]["current_status"], "pending");
}

async fn tenants_never_see_each_other(db: Db) {
    let store = db.store().await;
    let auth = AuthConfig::default()
        .with_key("a", "tenant-a", Role::Client, &sha256_hex("key-a"), None)
        .and_then(|c| c.with_key("b", "tenant-b", Role::Client, &sha256_hex("key-b"), None))
        .and_then(|c| c.with_key("w", "tenant-a", Role::Worker, &sha256_hex("key-w"), None))
        .and_then(|c| c.with_key("ops", "ops", Role::Admin, &sha256_hex("key-admin"), None))
        .expect("keys");
    let app = api(&store, auth).await;
    let created = send(
        &app,
        as_tenant(post("/v1/batches", json!({"items": [{"input": 1}]})), "key-a"),
    )
    .await;
    assert_eq!(created.status, 202);
    let id = created.body["id"].as_str().expect("an id").to_owned();
    let item = created.body["item_ids"][0].as_str().expect("an item").to_owned();

    assert_error(
        &send(&app, get(&format!("/v1/batches/{id}"))).await,
        401,
        "unauthorized",
    );
    assert_error(
        &send(&app, as_tenant(get("/v1/batches"), "wrong")).await,
        401,
        "unauthorized",
    );
    assert_error(
        &send(&app, as_tenant(get("/v1/batches"), "key-w")).await,
        403,
        "forbidden",
    );
    for uri in [
        format!("/v1/batches/{id}"),
        format!("/v1/batches/{id}/items"),
        format!("/v1/batches/{id}/events"),
        format!("/v1/batches/{id}/events/stream"),
        format!("/v1/batches/{id}/webhooks"),
        format!("/v1/items/{item}"),
    ] {
        assert_error(&send(&app, as_tenant(get(&uri), "key-b")).await, 404, "not_found");
    }
    for action in ["cancel", "pause", "resume", "retry"] {
        let reply = send(
            &app,
            as_tenant(TestRequest::post().uri(&format!("/v1/batches/{id}/{action}")), "key-b"),
        )
        .await;
        assert_error(&reply, 404, "not_found");
    }
    assert_error(
        &send(
            &app,
            as_tenant(TestRequest::post().uri(&format!("/v1/items/{item}/cancel")), "key-b"),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        &send(
            &app,
            as_tenant(post(&format!("/v1/items/{item}/input"), json!({"answer": 1})), "key-b"),
        )
        .await,
        404,
        "not_found",
    );
    let b_lists = send(&app, as_tenant(get("/v1/batches"), "key-b")).await;
    assert_eq!(b_lists.body["batches"], json!([]));
    assert_eq!(
        send(&app, as_tenant(get("/v1/items"), "key-b")).await.body["items"],
        json!([])
    );
    // B may not take A's id either, and learns nothing about it.
    let taken = send(
        &app,
        as_tenant(post("/v1/batches", json!({"id": id, "items": [{"input": 1}]})), "key-b"),
    )
    .await;
    assert_error(&taken, 409, "idempotency_conflict");
    // A sees its own; the admin sees everything and may pause queues; clients may not.
    assert_eq!(
        send(&app, as_tenant(get(&format!("/v1/batches/{id}")), "key-a"))
            .await
            .status,
        200
    );
    assert_eq!(
        send(&app, as_tenant(get("/v1/batches"), "key-admin")).await.body["batches"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_error(
        &send(
            &app,
            as_tenant(TestRequest::post().uri("/v1/queues/default/pause"), "key-a"),
        )
        .await,
        403,
        "forbidden",
    );
    let paused = send(
        &app,
        as_tenant(TestRequest::post().uri("/v1/queues/default/pause"), "key-admin"),
    )
    .await;
    assert_eq!((paused.status, paused.body["paused"].clone()), (200, json!(true)));
    assert_error(
        &send(
            &app,
            as_tenant(TestRequest::post().uri("/v1/queues/nope/pause"), "key-admin"),
        )
        .await,
        404,
        "not_found",
    );
}

/// Reads SSE frames from a streaming body until `stop` says so or the body ends.
async fn read_frames(body: impl MessageBody + Unpin, stop: impl Fn(&[(i64, String)]) -> bool) -> Vec<(i64, String)> {
    let mut body = Box::pin(body);
    let mut text = String::new();
    let mut frames = Vec::new();
    loop {
        let chunk = std::future::poll_fn(|cx| Pin::new(&mut body).as_mut().poll_next(cx)).await;
        let Some(Ok(bytes)) = chunk else { return frames };
        text.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let id = frame
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .and_then(|s| s.parse::<i64>().ok());
            let event = frame.lines().find_map(|l| l.strip_prefix("event: ")).map(str::to_owned);
            if let (Some(id), Some(event)) = (id, event) {
                let data = frame.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("{}");
                let parsed: Value = serde_json::from_str(data).expect("data is the event JSON");
                assert_eq!(
                    (parsed["seq"].as_i64(), parsed["type"].as_str()),
                    (Some(id), Some(event.as_str()))
                );
                frames.push((id, event));
            }
        }
        if stop(&frames) {
            return frames;
        }
    }
}

async fn the_event_stream_resumes_without_repeats_or_gaps(db: Db) {
    let store = db.store().await;
    let app = api(&store, AuthConfig::open()).await;
    let created = send(
        &app,
        post(
            "/v1/batches",
            json!({"items": [{"input": 1}, {"input": 2}, {"input": 3}]}),
        ),
    )
    .await;
    let id = created.body["id"].as_str().expect("an id").to_owned();
    work(&store, "default", 1).await;
    // Read the first frames, then hang up.
    let response = call_service(&app, get(&format!("/v1/batches/{id}/events/stream")).to_request()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let first = read_frames(response.into_body(), |f| f.len() >= 3).await;
    assert_eq!(first.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
    // The batch goes on while nobody listens, and ends.
    work(&store, "default", 2).await;
    let last_seen = first.last().map(|(s, _)| *s).expect("frames");
    let request =
        get(&format!("/v1/batches/{id}/events/stream")).insert_header(("last-event-id", last_seen.to_string()));
    let response = call_service(&app, request.to_request()).await;
    let rest = read_frames(response.into_body(), |_| false).await;
    let total = store
        .get_batch(batchd_storage::Scope::All, &id)
        .await
        .expect("batch")
        .last_event_seq;
    let seqs: Vec<i64> = first.iter().chain(rest.iter()).map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "every event once, in order");
    assert_eq!(
        rest.last().map(|(_, t)| t.as_str()),
        Some("batch.completed"),
        "the stream ended after the batch did"
    );
}

async fn seed_002_queue_positions_and_item_cancel(db: Db) {
    let store = db.store().await;
    let app = api(&store, AuthConfig::open()).await;
    let mut batch_ids = Vec::new();
    for n in [2, 3, 1] {
        let body = json!({"queue": "emails", "items": vec![json!({"input": {"to": "x"}}); n]});
        batch_ids.push(
            send(&app, post("/v1/batches", body)).await.body["id"]
                .as_str()
                .expect("an id")
                .to_owned(),
        );
    }
    let positions = |reply: &Reply| -> Vec<Value> {
        reply.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["position"].clone())
            .collect()
    };
    let recent = send(&app, get("/v1/items")).await;
    assert_eq!(
        positions(&recent),
        (1..=6).map(|p| json!(p)).collect::<Vec<_>>(),
        "1..N in FIFO order, no gaps"
    );
    // The queue runs one at a time: the first item starts and leaves the positions.
    let request = ClaimRequest {
        queue: "emails".into(),
        max_items: 1,
        lease: Duration::from_secs(30),
        owner: "t".into(),
    };
    let running = store.claim(&request).await.expect("claim").remove(0);
    let second_batch = send(&app, get(&format!("/v1/batches/{}/items", batch_ids[1]))).await;
    assert_eq!(positions(&second_batch), vec![json!(2), json!(3), json!(4)]);
    // A pending item can be cancelled; everyone behind it moves up.
    let pending_id = second_batch.body["items"][0]["id"]
        .as_str()
        .expect("an item")
        .to_owned();
    let cancelled = send(&app, TestRequest::post().uri(&format!("/v1/items/{pending_id}/cancel"))).await;
    assert_eq!(
        (cancelled.status, cancelled.body["status"].clone()),
        (200, json!("cancelled"))
    );
    let second_batch = send(&app, get(&format!("/v1/batches/{}/items", batch_ids[1]))).await;
    assert_eq!(positions(&second_batch), vec![Value::Null, json!(2), json!(3)]);
    // A running or finished item cannot be cancelled on its own.
    assert_error(
        &send(
            &app,
            TestRequest::post().uri(&format!("/v1/items/{}/cancel", running.id)),
        )
        .await,
        409,
        "invalid_state",
    );
    let done = Finish {
        item_id: running.id.clone(),
        lease_token: running.lease_token,
        outcome: Outcome::Completed { result: json!("sent") },
    };
    store.finish(vec![done]).await.expect("finish");
    let finished = send(
        &app,
        TestRequest::post().uri(&format!("/v1/items/{}/cancel", running.id)),
    )
    .await;
    assert_error(&finished, 409, "invalid_state");
    assert_eq!(finished.body["error"]["current_status"], "completed");
}

async fn metrics_count_requests_and_show_queues(db: Db) {
    let store = db.store().await;
    let app = api(
        &store,
        AuthConfig::default()
            .with_key("a", "t", Role::Client, &sha256_hex("k"), None)
            .expect("a key"),
    )
    .await;
    let created = send(
        &app,
        as_tenant(post("/v1/batches", json!({"items": [{"input": 1}, {"input": 2}]})), "k"),
    )
    .await;
    let id = created.body["id"].as_str().expect("an id").to_owned();
    send(&app, as_tenant(get(&format!("/v1/batches/{id}")), "k")).await;
    // No token is needed, like the health checks.
    let response = call_service(&app, get("/metrics").to_request()).await;
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = String::from_utf8(actix_web::test::read_body(response).await.to_vec()).expect("text");
    for expected in [
        r#"batchd_http_requests_total{method="POST",route="/v1/batches",status="202"} 1"#,
        r#"batchd_http_requests_total{method="GET",route="/v1/batches/{id}",status="200"} 1"#,
        r#"batchd_queue_depth{queue="default"} 2"#,
        r#"batchd_items{queue="default",status="pending"} 2"#,
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains(&id), "ids never become labels");
}

async fn callers_over_their_rate_get_429(db: Db) {
    let store = db.store().await;
    let mut limited = config(AuthConfig::open());
    limited.rate_limit = Some(batchd_api::RateLimit {
        requests_per_second: 0.5,
        burst: 2,
    });
    let app = init_service(app(web::Data::new(ApiState::new(store.clone(), limited)))).await;
    for _ in 0..2 {
        assert_eq!(
            send(
                &app,
                get("/v1/batches").peer_addr("10.0.0.7:5000".parse().expect("an address"))
            )
            .await
            .status,
            200
        );
    }
    let refused = send(
        &app,
        get("/v1/batches").peer_addr("10.0.0.7:5000".parse().expect("an address")),
    )
    .await;
    assert_error(&refused, 429, "rate_limited");
    assert_eq!(
        refused.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let other = send(
        &app,
        get("/v1/batches").peer_addr("10.0.0.8:5000".parse().expect("an address")),
    )
    .await;
    assert_eq!(other.status, 200, "another caller has its own budget");
    assert_eq!(
        send(&app, get("/healthz")).await.status,
        200,
        "health checks are not limited"
    );
}

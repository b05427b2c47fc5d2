//! The `http` handler against a real worker on loopback: what it sends (every documented
//! field, both signatures) and how each kind of answer ends the attempt.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use batchd_client::wire::BatchView;
use batchd_client::{BatchStatus, Client, ItemQuery, ItemStatus};
use batchd_testkit::{Backend, TestServer};
use batchd_webhook::{DEFAULT_TOLERANCE, Secret, StandardHeaders, verify_standard, verify_x_signature};
use serde_json::{Value, json};

use crate::{DONE_WITHIN, on_both_backends_with_own_server};

on_both_backends_with_own_server!(
    a_2xx_completes_with_the_result_and_the_request_is_signed_with_every_field,
    a_500_is_retried_and_a_400_is_not,
    a_timeout_is_retried,
    a_429_waits_for_its_retry_after,
    an_accepted_item_waits_for_its_worker_to_report_with_the_lease_token,
);

const SECRET: &str = "push-secret";

/// One request the worker received.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the push body is JSON")
    }
}

/// The worker's answer to its n-th request (from 0): status, headers, body, and a delay
/// before answering.
type Script = Arc<dyn Fn(usize, &Value) -> Answer + Send + Sync>;

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
    delay: Duration,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        headers: Vec::new(),
        body,
        delay: Duration::ZERO,
    }
}

/// A worker on a loopback port that records what it gets and answers by script.
struct PushWorker {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    handle: actix_web::dev::ServerHandle,
}

impl PushWorker {
    fn start(script: impl Fn(usize, &Value) -> Answer + Send + Sync + 'static) -> PushWorker {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Script = Arc::new(script);
        let state = (received.clone(), script);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("an address");
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(state.clone()))
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("the worker listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        PushWorker {
            url: format!("http://{addr}/work"),
            received,
            handle,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

async fn receive(
    state: web::Data<(Arc<Mutex<Vec<Received>>>, Script)>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let (received, script) = state.get_ref();
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let n = {
        let mut received = received.lock().unwrap_or_else(PoisonError::into_inner);
        received.push(Received {
            at: Instant::now(),
            headers,
            body: body.to_vec(),
        });
        received.len() - 1
    };
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let answer = script(n, &json);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let status = actix_web::http::StatusCode::from_u16(answer.status).expect("a status");
    let mut response = HttpResponse::build(status);
    for (name, value) in answer.headers {
        response.insert_header((name, value));
    }
    response.json(answer.body)
}

/// A server whose queue `push` POSTs to `url` with quick retries; `None` without PostgreSQL.
async fn server(
    backend: Backend,
    url: &str,
    edit: impl FnOnce(&mut batchd_server::QueueSettings) + Send + 'static,
) -> Option<TestServer> {
    let url = url.to_owned();
    TestServer::builder()
        .backend(backend)
        .queue("push", move |q| {
            q.handler = "http".to_owned();
            q.url = Some(url);
            q.secret = Some(batchd_server::Secret::new(SECRET));
            q.backoff_base_ms = 10;
            q.backoff_max_ms = 10;
            q.max_attempts = 3;
            edit(q);
        })
        .start()
        .await
        .expect("the test server starts")
}

async fn submit(client: &Client, items: Value) -> String {
    let body = json!({"queue": "push", "items": items, "config": {"model": "small"}, "session_id": "s-1"});
    client
        .submit_json(&body, None)
        .await
        .expect("the batch is accepted")
        .batch
        .id
}

async fn done(client: &Client, id: &str) -> BatchView {
    client.wait_until_done(id, DONE_WITHIN).await.expect("the batch ends")
}

async fn a_2xx_completes_with_the_result_and_the_request_is_signed_with_every_field(backend: Backend) {
    let worker = PushWorker::start(|n, body| match n {
        0 => answer(200, json!({"status": "completed", "result": {"echo": body["input"]}})),
        _ => answer(200, json!({"plain": true})),
    });
    let Some(server) = server(backend, &worker.url, |_| {}).await else {
        return;
    };
    let client = server.client();
    let id = submit(
        &client,
        json!([{"input": {"n": 1}, "custom_id": "first", "config": {"temperature": 0}}]),
    )
    .await;
    let batch = done(&client, &id).await;
    assert_eq!(batch.status, BatchStatus::Completed, "{batch:?}");
    let items = client
        .batch_items(&id, &ItemQuery::new())
        .await
        .expect("the items")
        .items;
    assert_eq!(items[0].result, Some(json!({"echo": {"n": 1}})));
    assert_eq!(items[0].attempts, 1);

    let received = worker.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    let body = request.json();
    let mut keys: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "answer",
            "attempt",
            "batch_id",
            "config",
            "custom_id",
            "id",
            "index",
            "input",
            "lease_expires_at",
            "lease_token",
            "session_id"
        ]
    );
    assert_eq!(body["id"], json!(items[0].id));
    assert_eq!(body["batch_id"], json!(id));
    assert_eq!((body["index"].clone(), body["attempt"].clone()), (json!(0), json!(1)));
    assert_eq!(body["custom_id"], "first");
    assert_eq!(body["input"], json!({"n": 1}));
    assert_eq!(body["answer"], Value::Null);
    assert_eq!(body["session_id"], "s-1");
    assert!(body["lease_token"].as_str().is_some_and(|t| !t.is_empty()));
    let expires = body["lease_expires_at"].as_str().expect("a time");
    time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    // Merged: the item's, the batch's and the queue's levels.
    assert_eq!(body["config"]["temperature"], 0);
    assert_eq!(body["config"]["model"], "small");
    assert_eq!(body["config"]["max_attempts"], 3);
    assert_eq!(request.header("content-type"), "application/json");

    let secret = Secret::new(SECRET).expect("a secret");
    let headers = StandardHeaders {
        id: request.header("webhook-id"),
        timestamp: request.header("webhook-timestamp"),
        signature: request.header("webhook-signature"),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    verify_standard(&secret, &headers, &request.body, now, DEFAULT_TOLERANCE)
        .expect("a valid Standard Webhooks signature");
    verify_x_signature(&secret, request.header("x-signature"), &request.body).expect("a valid X-Signature");
    let wrong = Secret::new("another").expect("a secret");
    assert!(verify_x_signature(&wrong, request.header("x-signature"), &request.body).is_err());

    // Any other 2xx body is the result as it is.
    let id = submit(&client, json!([{"input": {}}])).await;
    done(&client, &id).await;
    let items = client
        .batch_items(&id, &ItemQuery::new())
        .await
        .expect("the items")
        .items;
    assert_eq!(items[0].result, Some(json!({"plain": true})));
    server.shutdown().await.expect("a clean shutdown");
    worker.stop().await;
}

async fn a_500_is_retried_and_a_400_is_not(backend: Backend) {
    let worker = PushWorker::start(|_, body| {
        let plan = body["input"]["plan"].as_str().unwrap_or_default().to_owned();
        let attempt = body["attempt"].as_i64().unwrap_or_default();
        match (plan.as_str(), attempt) {
            ("500-then-200", 1) => answer(500, json!({"oops": 1})),
            ("500-then-200", _) => answer(200, json!({"ok": attempt})),
            _ => answer(400, json!({"bad": "input"})),
        }
    });
    let Some(server) = server(backend, &worker.url, |_| {}).await else {
        return;
    };
    let client = server.client();
    let id = submit(
        &client,
        json!([{"input": {"plan": "500-then-200"}}, {"input": {"plan": "400"}}]),
    )
    .await;
    let batch = done(&client, &id).await;
    assert_eq!((batch.counts.completed, batch.counts.failed), (1, 1), "{batch:?}");
    let items = client
        .batch_items(&id, &ItemQuery::new())
        .await
        .expect("the items")
        .items;
    assert_eq!(items[0].status, ItemStatus::Completed);
    assert_eq!(items[0].attempts, 2);
    assert_eq!(items[0].result, Some(json!({"ok": 2})));
    assert_eq!(items[1].status, ItemStatus::Failed);
    assert_eq!(items[1].attempts, 1, "a 400 is not retried");
    let error = items[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("400") && error.contains("input"), "{error}");
    let pushes_of_400 = worker
        .received()
        .iter()
        .filter(|r| r.json()["input"]["plan"] == "400")
        .count();
    assert_eq!(pushes_of_400, 1);
    server.shutdown().await.expect("a clean shutdown");
    worker.stop().await;
}

async fn a_timeout_is_retried(backend: Backend) {
    let worker = PushWorker::start(|n, _| Answer {
        delay: if n == 0 { Duration::from_secs(3) } else { Duration::ZERO },
        ..answer(200, json!({"late": false}))
    });
    let Some(server) = server(backend, &worker.url, |q| q.timeout_ms = 300).await else {
        return;
    };
    let client = server.client();
    let id = submit(&client, json!([{"input": {}}])).await;
    let batch = done(&client, &id).await;
    assert_eq!(batch.status, BatchStatus::Completed, "{batch:?}");
    let items = client
        .batch_items(&id, &ItemQuery::new())
        .await
        .expect("the items")
        .items;
    assert_eq!(items[0].attempts, 2, "the timed-out attempt was retried");
    assert_eq!(worker.received().len(), 2);
    server.shutdown().await.expect("a clean shutdown");
    worker.stop().await;
}

async fn a_429_waits_for_its_retry_after(backend: Backend) {
    let worker = PushWorker::start(|n, _| match n {
        0 => Answer {
            headers: vec![("Retry-After", "1".to_owned())],
            ..answer(429, json!({"slow": "down"}))
        },
        _ => answer(200, json!({"ok": true})),
    });
    let Some(server) = server(backend, &worker.url, |_| {}).await else {
        return;
    };
    let client = server.client();
    let id = submit(&client, json!([{"input": {}}])).await;
    let batch = done(&client, &id).await;
    assert_eq!(batch.status, BatchStatus::Completed, "{batch:?}");
    let received = worker.received();
    assert_eq!(received.len(), 2);
    let waited = received[1].at - received[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "the retry came after {waited:?}, before Retry-After"
    );
    server.shutdown().await.expect("a clean shutdown");
    worker.stop().await;
}

async fn an_accepted_item_waits_for_its_worker_to_report_with_the_lease_token(backend: Backend) {
    let worker = PushWorker::start(|_, _| answer(202, json!({"status": "accepted"})));
    let url = worker.url.clone();
    let started = TestServer::builder()
        .backend(backend)
        .queue("push", move |q| {
            q.handler = "http".to_owned();
            q.url = Some(url);
        })
        .settings(|s| {
            s.auth.keys.push(batchd_server::AuthKey {
                name: "app".to_owned(),
                tenant: "acme".to_owned(),
                role: batchd_api::Role::Client,
                key_sha256: None,
                key: Some(batchd_server::Secret::new("client-key")),
                queues: None,
            });
        })
        .start()
        .await
        .expect("the test server starts");
    let Some(server) = started else { return };
    let app = server.client().with_token("client-key");
    let id = submit(&app, json!([{"input": {"job": 1}}])).await;
    let deadline = tokio::time::Instant::now() + DONE_WITHIN;
    while worker.received().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the item was never pushed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pushed = worker.received()[0].json();
    let item_id = pushed["id"].as_str().expect("an id");
    let token = pushed["lease_token"].as_str().expect("a token");
    let item = app.item(item_id).await.expect("the item");
    assert_eq!(
        item.status,
        ItemStatus::Running,
        "accepted: it runs until the worker reports"
    );

    // No key at all: the lease token is the authority.
    let anonymous = server.client();
    let wrong = anonymous
        .complete(item_id, "not-the-token", json!(1))
        .await
        .expect_err("a wrong token");
    assert!(wrong.is_lease_lost(), "{wrong}");
    anonymous
        .heartbeat(item_id, token, &batchd_client::Heartbeat::default())
        .await
        .expect("the token renews its lease");
    let reported = anonymous
        .complete(item_id, token, json!({"done": true}))
        .await
        .expect("the token completes it");
    assert_eq!(reported.status, ItemStatus::Completed);
    let batch = done(&app, &id).await;
    assert_eq!(batch.status, BatchStatus::Completed);
    let item = app.item(item_id).await.expect("the item");
    assert_eq!(item.result, Some(json!({"done": true})));
    assert_eq!(worker.received().len(), 1, "pushed once");
    server.shutdown().await.expect("a clean shutdown");
    worker.stop().await;
}

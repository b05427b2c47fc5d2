//! Webhooks end to end in-process: a receiver on loopback gets the batch's events, signed so
//! that code batchd did not write verifies them (the `standardwebhooks` Python package for
//! `webhook-signature`, seed 003's own recipe for `X-Signature`); a receiver that fails gets
//! the delivery later, with every attempt shown by `GET /v1/batches/{id}/webhooks`; `410`
//! stops; a 429's `Retry-After` is honoured; non-public destinations are refused unless the
//! config allows them.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchd_client::wire::{DeliveryList, DeliveryView};
use batchd_client::{Client, ClientError, DeliveryStatus, EventType};
use batchd_testkit::{Backend, TestServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::DONE_WITHIN;

/// How long a test waits for deliveries to arrive or settle.
const WAIT: Duration = Duration::from_secs(30);
const PLAIN_SECRET: &str = "seed-003-secret";
const WHSEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: String,
    at: Instant,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// The answer to the `n`th request (from 1) for one `webhook-id`: status and extra headers.
type Script = Arc<dyn Fn(usize) -> (u16, Vec<(&'static str, String)>) + Send + Sync>;

/// A tiny HTTP/1.1 receiver on 127.0.0.1: one request per connection, answered by `script`.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: Script) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let url = format!("http://{}/hooks", listener.local_addr().expect("an address"));
        let received = Arc::new(Mutex::new(Vec::<Received>::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let (log, script) = (log.clone(), script.clone());
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else {
                        return;
                    };
                    let n = {
                        let mut log = log.lock().expect("the log");
                        log.push(request.clone());
                        let id = request.header("webhook-id");
                        log.iter().filter(|r| r.header("webhook-id") == id).count()
                    };
                    let (status, headers) = script(n);
                    let body = format!("{{\"seen\":{n}}}");
                    let mut answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n",
                        body.len()
                    );
                    for (name, value) in headers {
                        answer.push_str(&format!("{name}: {value}\r\n"));
                    }
                    answer.push_str("\r\n");
                    answer.push_str(&body);
                    let _ = socket.write_all(answer.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Receiver { url, received, task }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("the log").clone()
    }

    /// Waits until `done` holds for what was received; panics at the deadline.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(Instant::now() < deadline, "never received {what}; got {received:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers.get("content-length")?.parse().ok()?;
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8(buf[head_end..head_end + length].to_vec()).ok()?;
    Some(Received {
        headers,
        body,
        at: Instant::now(),
    })
}

fn always(status: u16) -> Script {
    Arc::new(move |_| (status, Vec::new()))
}

/// A server that may deliver to loopback, retrying fast.
async fn server(backend: Backend, allow_private: bool) -> Option<TestServer> {
    TestServer::builder()
        .backend(backend)
        .settings(move |s| {
            s.webhooks.allow_private_destinations = allow_private;
            s.webhooks.backoff_base_ms = 50;
            s.webhooks.backoff_max_ms = 200;
            s.webhooks.max_attempts = 4;
            s.webhooks.timeout_ms = 5_000;
        })
        .start()
        .await
        .expect("the test server starts")
}

async fn submit(client: &Client, body: Value) -> String {
    client
        .submit_json(&body, None)
        .await
        .expect("the batch is accepted")
        .batch
        .id
}

async fn deliveries(client: &Client, batch_id: &str) -> Vec<DeliveryView> {
    let DeliveryList {
        deliveries,
        next_cursor,
    } = client
        .batch_webhooks(batch_id, None, Some(1_000))
        .await
        .expect("the deliveries");
    assert_eq!(next_cursor, None);
    deliveries
}

/// Waits until no delivery of the batch is pending, and returns them.
async fn settled(client: &Client, batch_id: &str) -> Vec<DeliveryView> {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = deliveries(client, batch_id).await;
        if !list.is_empty() && list.iter().all(|d| d.status != DeliveryStatus::Pending) {
            return list;
        }
        assert!(Instant::now() < deadline, "deliveries never settled: {list:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- verification by code batchd did not write ----

/// Verifies every request with the `standardwebhooks` package and recomputes `X-Signature`
/// with seed 003's recipe (HMAC-SHA256 keyed with the secret's bytes over the raw body, hex).
/// Prints one line per request: `<standard verdict> <x-signature verdict>`.
const VERIFY_PY: &str = r#"
import hashlib, hmac, json, sys
from standardwebhooks.webhooks import Webhook

secret = sys.argv[1]
for line in sys.stdin:
    request = json.loads(line)
    body = request["body"].encode("utf-8")
    headers = request["headers"]
    webhook = Webhook(secret) if secret.startswith("whsec_") else Webhook(secret.encode("utf-8"))
    try:
        webhook.verify(body, headers)
        standard = "ok"
    except Exception as error:
        standard = "rejected:" + type(error).__name__
    # Seed 003: crypto.createHmac('sha256', webhookSecret).update(req.body).digest('hex')
    if secret.startswith("whsec_"):
        import base64
        key = base64.b64decode(secret[len("whsec_"):])
    else:
        key = secret.encode("utf-8")
    computed = hmac.new(key, body, hashlib.sha256).hexdigest()
    x_signature = "ok" if hmac.compare_digest(computed, headers.get("x-signature", "")) else "rejected"
    print(standard, x_signature)
"#;

/// Whether python3 with `standardwebhooks` is here; under CI its absence is a failure.
fn python_verifier_available() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import standardwebhooks.webhooks"])
        .output();
    let ok = matches!(&probe, Ok(output) if output.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with `standardwebhooks` is needed under CI: python3 -m pip install standardwebhooks"
        );
        eprintln!("note: skipping the standardwebhooks verification (python3 -m pip install standardwebhooks)");
    }
    ok
}

fn python_verdicts(secret: &str, requests: &[Received]) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", VERIFY_PY, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    {
        let mut stdin = child.stdin.take().expect("a stdin");
        for r in requests {
            let line = json!({"body": r.body, "headers": r.headers});
            writeln!(stdin, "{line}").expect("the request is written");
        }
    }
    let output = child.wait_with_output().expect("python3 ends");
    assert!(
        output.status.success(),
        "the verifier failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

// ---- scenarios ----

async fn a_receiver_gets_signed_item_and_batch_events(backend: Backend) {
    let Some(server) = server(backend, true).await else {
        return;
    };
    let client = server.client();
    let receiver = Receiver::start(always(204)).await;
    for secret in [PLAIN_SECRET, WHSEC_SECRET] {
        let before = receiver.received().len();
        let id = submit(
            &client,
            json!({
                "items": [{"input": {"sleep_ms": 5}, "custom_id": "a"}, {"input": {"sleep_ms": 5}, "custom_id": "b"}],
                "webhook": {"url": receiver.url, "secret": secret},
            }),
        )
        .await;
        client.wait_until_done(&id, DONE_WITHIN).await.expect("the batch ends");
        let all = receiver
            .wait_for("item.completed twice and batch.completed", |r| {
                r[before..].iter().any(|r| r.json()["type"] == "batch.completed")
                    && r[before..]
                        .iter()
                        .filter(|r| r.json()["type"] == "item.completed")
                        .count()
                        == 2
            })
            .await;
        let got = &all[before..];
        let mut types: Vec<String> = got
            .iter()
            .map(|r| r.json()["type"].as_str().unwrap_or("").to_owned())
            .collect();
        types.sort();
        // The default selection: no batch.created, batch.started or item.started.
        assert_eq!(types, ["batch.completed", "item.completed", "item.completed"]);
        for r in got {
            let body = r.json();
            assert_eq!(body["batch_id"], id.as_str());
            assert_eq!(r.header("webhook-id"), body["id"].as_str().expect("an id"));
            assert_eq!(r.header("content-type"), "application/json");
            assert!(r.header("user-agent").starts_with("batchd/"), "{:?}", r.headers);
            assert!(r.header("webhook-signature").starts_with("v1,"));
            assert_eq!(r.header("x-signature").len(), 64);
            for key in [
                "type",
                "id",
                "batch_id",
                "item_id",
                "item_index",
                "custom_id",
                "status",
                "message",
                "result",
                "error",
                "counts",
                "timestamp",
            ] {
                assert!(body.get(key).is_some(), "{key} missing from {body}");
            }
        }
        let batch_event = got
            .iter()
            .find(|r| r.json()["type"] == "batch.completed")
            .expect("batch.completed");
        assert_eq!(batch_event.json()["item_id"], Value::Null);
        assert_eq!(batch_event.json()["counts"]["completed"], 2);
        if python_verifier_available() {
            let verdicts = python_verdicts(secret, got);
            assert_eq!(verdicts, vec!["ok ok"; got.len()], "secret {secret}");
            // A wrong secret is refused by both: the check can fail.
            let wrong = python_verdicts("another-secret", &got[..1]);
            assert_eq!(wrong, ["rejected:WebhookVerificationError rejected"]);
        }
        let list = settled(&client, &id).await;
        assert_eq!(list.len(), 3);
        assert!(
            list.iter()
                .all(|d| d.status == DeliveryStatus::Delivered && d.attempts.len() == 1)
        );
        assert!(
            list.iter()
                .all(|d| d.attempts[0].status_code == Some(204) && d.next_attempt_at.is_none())
        );
    }
    // The secret is never shown.
    let batches = client.list_batches(&Default::default()).await.expect("the batches");
    let text = serde_json::to_string(&batches).expect("JSON");
    assert!(!text.contains(PLAIN_SECRET) && !text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    server.shutdown().await.expect("a clean shutdown");
}

async fn a_failing_receiver_gets_the_delivery_on_the_third_attempt(backend: Backend) {
    let Some(server) = server(backend, true).await else {
        return;
    };
    let client = server.client();
    let receiver = Receiver::start(Arc::new(|n| (if n <= 2 { 500 } else { 200 }, Vec::new()))).await;
    let id = submit(
        &client,
        json!({
            "items": [{"input": {"sleep_ms": 1}}],
            "webhook": {"url": receiver.url, "events": ["batch.completed"]},
        }),
    )
    .await;
    let list = settled(&client, &id).await;
    assert_eq!(list.len(), 1);
    let d = &list[0];
    assert_eq!(d.event_type, EventType::BatchCompleted);
    assert_eq!(d.status, DeliveryStatus::Delivered);
    let codes: Vec<Option<i32>> = d.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [Some(500), Some(500), Some(200)]);
    assert_eq!(d.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(d.attempts[0].error.as_deref().is_some_and(|e| e.contains("500")));
    assert_eq!(d.attempts[0].response_body.as_deref(), Some("{\"seen\":1}"));
    assert_eq!(d.attempts[2].error, None);
    let got = receiver.received();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|r| r.header("webhook-id") == d.id),
        "one id across retries"
    );
    assert!(
        got.iter().all(|r| r.body == got[0].body),
        "the same body on every attempt"
    );
    // Unsigned without a secret, but still identified.
    assert!(
        got.iter()
            .all(|r| !r.headers.contains_key("webhook-signature") && !r.headers.contains_key("x-signature"))
    );
    let metrics = reqwest_free_get(server.url(), "/metrics").await;
    for line in [
        r#"batchd_webhook_attempts_total{event_type="batch.completed",outcome="retry"} 2"#,
        r#"batchd_webhook_attempts_total{event_type="batch.completed",outcome="delivered"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    server.shutdown().await.expect("a clean shutdown");
}

async fn gone_stops_and_attempts_run_out(backend: Backend) {
    let Some(server) = server(backend, true).await else {
        return;
    };
    let client = server.client();
    let gone = Receiver::start(always(410)).await;
    let broken = Receiver::start(always(503)).await;
    let to_gone = submit(
        &client,
        json!({"items": [{"input": {}}], "webhook": {"url": gone.url, "events": ["batch.completed"]}}),
    )
    .await;
    let to_broken = submit(
        &client,
        json!({"items": [{"input": {}}], "webhook": {"url": broken.url, "events": ["batch.completed"]}}),
    )
    .await;
    let d = settled(&client, &to_gone).await.remove(0);
    assert_eq!(d.status, DeliveryStatus::Failed);
    assert_eq!(d.attempts.len(), 1, "410 is not retried");
    assert_eq!(d.attempts[0].status_code, Some(410));
    let d = settled(&client, &to_broken).await.remove(0);
    assert_eq!(d.status, DeliveryStatus::Failed);
    assert_eq!(d.attempts.len(), 4, "max_attempts = 4");
    assert!(d.attempts.iter().all(|a| a.status_code == Some(503)));
    assert_eq!(d.next_attempt_at, None);
    assert_eq!(gone.received().len(), 1);
    assert_eq!(broken.received().len(), 4);
    server.shutdown().await.expect("a clean shutdown");
}

async fn retry_after_on_429_is_honoured(backend: Backend) {
    let Some(server) = server(backend, true).await else {
        return;
    };
    let client = server.client();
    let receiver = Receiver::start(Arc::new(|n| {
        if n == 1 {
            (429, vec![("retry-after", "2".to_owned())])
        } else {
            (200, Vec::new())
        }
    }))
    .await;
    let id = submit(
        &client,
        json!({"items": [{"input": {}}], "webhook": {"url": receiver.url, "events": ["batch.completed"]}}),
    )
    .await;
    let d = settled(&client, &id).await.remove(0);
    assert_eq!(d.status, DeliveryStatus::Delivered);
    assert_eq!(
        d.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(),
        [Some(429), Some(200)]
    );
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    // The backoff cap is 200 ms; only Retry-After explains a gap this long. A lower bound.
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(1_900), "the retry came after {gap:?}");
    server.shutdown().await.expect("a clean shutdown");
}

async fn private_destinations_are_refused_by_default(backend: Backend) {
    let Some(server) = server(backend, false).await else {
        return;
    };
    let client = server.client();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/hook",
        "http://[::1]:9/hook",
        "http://localhost:9/x",
    ] {
        let refused = client
            .submit_json(&json!({"items": [{"input": {}}], "webhook": {"url": url}}), None)
            .await
            .expect_err("a private destination");
        let ClientError::Api { status, body, .. } = refused else {
            panic!("{url}: {refused:?}");
        };
        assert_eq!(status, 400, "{url}");
        assert_eq!(body.error.code, "validation_error");
        assert_eq!(body.error.issues[0].path, "webhook.url", "{url}");
    }
    // A bad whsec_ secret is refused at submit too.
    let refused = client
        .submit_json(
            &json!({"items": [{"input": {}}], "webhook": {"url": "https://example.com/h", "secret": "whsec_!!"}}),
            None,
        )
        .await
        .expect_err("a bad secret");
    assert!(
        matches!(&refused, ClientError::Api { status: 400, body, .. } if body.error.issues[0].path == "webhook.secret")
    );
    server.shutdown().await.expect("a clean shutdown");
}

async fn private_destinations_are_allowed_when_configured(backend: Backend) {
    let Some(server) = server(backend, true).await else {
        return;
    };
    let client = server.client();
    for url in ["http://127.0.0.1:9/hook", "http://10.0.0.1/hook"] {
        client
            .submit_json(
                &json!({"items": [{"input": {}}], "webhook": {"url": url, "events": ["batch.created"]}}),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{url} is allowed: {e}"));
    }
    server.shutdown().await.expect("a clean shutdown");
}

/// A name that resolves to loopback passes submit but is refused at send time: the attempt is
/// recorded with the reason and the delivery fails without a retry.
async fn a_name_resolving_to_loopback_is_refused_at_send_time(backend: Backend) {
    let Some(server) = server(backend, false).await else {
        return;
    };
    let client = server.client();
    let receiver = Receiver::start(always(200)).await;
    // `localhost.` is refused at submit; a name that is not `localhost` but resolves to
    // loopback: the receiver's address written as an IPv4-compatible name would be a
    // literal, so use the system's own host name when it resolves to loopback.
    let Some(name) = loopback_name() else {
        eprintln!("note: no host name resolving to loopback here; skipping");
        server.shutdown().await.expect("a clean shutdown");
        return;
    };
    let port = receiver
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .expect("a port");
    let url = format!("http://{name}:{port}/hooks");
    let id = submit(
        &client,
        json!({"items": [{"input": {}}], "webhook": {"url": url, "events": ["batch.completed"]}}),
    )
    .await;
    let d = settled(&client, &id).await.remove(0);
    assert_eq!(d.status, DeliveryStatus::Failed);
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(d.attempts[0].status_code, None);
    assert!(
        d.attempts[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("allow_private_destinations")),
        "{:?}",
        d.attempts[0].error
    );
    assert!(receiver.received().is_empty(), "nothing was sent");
    server.shutdown().await.expect("a clean shutdown");
}

/// A host name (not `localhost`) whose every address is loopback, if this machine has one.
fn loopback_name() -> Option<String> {
    use std::net::ToSocketAddrs;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    hosts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|name| {
            let lower = name.to_ascii_lowercase();
            lower != "localhost" && !lower.ends_with(".localhost") && name.contains(|c: char| c.is_ascii_alphabetic())
        })
        .find(|name| {
            (name.as_str(), 80)
                .to_socket_addrs()
                .map(|addrs| {
                    let addrs: Vec<_> = addrs.collect();
                    !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
                })
                .unwrap_or(false)
        })
}

async fn other_tenants_see_no_deliveries(backend: Backend) {
    let Some(server) = TestServer::builder()
        .backend(backend)
        .settings(|s| {
            s.webhooks.allow_private_destinations = true;
            for (name, tenant) in [("a", "acme"), ("b", "globex")] {
                s.auth.keys.push(batchd_server::AuthKey {
                    name: name.to_owned(),
                    tenant: tenant.to_owned(),
                    role: batchd_api::Role::Client,
                    key_sha256: None,
                    key: Some(batchd_server::Secret::new(format!("key-{name}"))),
                    queues: None,
                });
            }
        })
        .start()
        .await
        .expect("the test server starts")
    else {
        return;
    };
    let acme = server.client().with_token("key-a");
    let globex = server.client().with_token("key-b");
    let id = submit(
        &acme,
        json!({"items": [{"input": {}}], "webhook": {"url": "http://127.0.0.1:9/h", "secret": "s", "events": ["batch.created"]}}),
    )
    .await;
    assert_eq!(deliveries(&acme, &id).await.len(), 1);
    let refused = globex
        .batch_webhooks(&id, None, None)
        .await
        .expect_err("another tenant's batch");
    assert!(matches!(&refused, ClientError::Api { status: 404, body, .. } if body.error.code == "not_found"));
    server.shutdown().await.expect("a clean shutdown");
}

/// A GET without an HTTP client crate: `/metrics` is plain text.
async fn reqwest_free_get(base: &str, path: &str) -> String {
    let addr = base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.expect("the server accepts");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("the request is sent");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("the reply is read");
    reply
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(batchd_testkit::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(batchd_testkit::Backend::Postgres).await;
                }
            )*
        }
    };
}

both!(
    a_receiver_gets_signed_item_and_batch_events,
    a_failing_receiver_gets_the_delivery_on_the_third_attempt,
    gone_stops_and_attempts_run_out,
    retry_after_on_429_is_honoured,
    private_destinations_are_refused_by_default,
    private_destinations_are_allowed_when_configured,
    a_name_resolving_to_loopback_is_refused_at_send_time,
    other_tenants_see_no_deliveries,
);

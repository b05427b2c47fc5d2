//! Webhooks through the real binary: deliveries due while the receiver is down survive a
//! `kill -9`; after the restart every expected delivery arrives, and none acknowledged before
//! the kill is sent again. The server's log shows every attempt.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use batchd_storage::testing::TestDatabase;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{STOP_TIMEOUT, Server};

/// What the receiver got: the `webhook-id`, the status it answered, and in which phase.
#[derive(Debug, Clone)]
struct Hit {
    id: String,
    status: u16,
    after_restart: bool,
}

/// A loopback receiver that answers 204 while `up`, else 503, and logs every request.
struct Receiver {
    url: String,
    up: Arc<AtomicBool>,
    restarted: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let url = format!("http://{}/hook", listener.local_addr().expect("an address"));
        let up = Arc::new(AtomicBool::new(true));
        let restarted = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (u, r, h) = (up.clone(), restarted.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (u, r, h) = (u.clone(), r.clone(), h.clone());
                tokio::spawn(async move {
                    let Some(id) = read_webhook_id(&mut socket).await else {
                        return;
                    };
                    let status = if u.load(Ordering::SeqCst) { 204 } else { 503 };
                    h.lock().expect("the log").push(Hit {
                        id,
                        status,
                        after_restart: r.load(Ordering::SeqCst),
                    });
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = socket.write_all(answer.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Receiver {
            url,
            up,
            restarted,
            hits,
            task,
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("the log").clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request and returns its `webhook-id`.
async fn read_webhook_id(socket: &mut tokio::net::TcpStream) -> Option<String> {
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
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let length: usize = header("content-length")?.parse().ok()?;
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    header("webhook-id")
}

const ENV: &[(&str, &str)] = &[
    ("BATCHD__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true"),
    ("BATCHD__WEBHOOKS__BACKOFF_BASE_MS", "100"),
    ("BATCHD__WEBHOOKS__BACKOFF_MAX_MS", "300"),
    ("BATCHD__WEBHOOKS__MAX_ATTEMPTS", "1000"),
    ("BATCHD__WEBHOOKS__TIMEOUT_MS", "2000"),
    ("BATCHD__EXECUTOR__POLL_INTERVAL_MS", "100"),
];

fn deliveries(body: &Value) -> Vec<Value> {
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

fn all_delivered(body: &Value, n: usize) -> bool {
    let list = deliveries(body);
    list.len() == n && list.iter().all(|d| d["status"] == "delivered")
}

async fn submit(server: &Server, url: &str, items: usize) -> String {
    let items: Vec<Value> = (0..items)
        .map(|i| json!({"input": {"sleep_ms": 5}, "custom_id": format!("c{i}")}))
        .collect();
    let created = server
        .post(
            "/v1/batches",
            &json!({"items": items, "webhook": {"url": url, "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}),
        )
        .await;
    assert_eq!(created.status, 202, "{:?}", created.body);
    created.body["id"].as_str().expect("an id").to_owned()
}

async fn deliveries_survive_a_kill(database_args: &[&str]) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let receiver = Receiver::start().await;

    let mut server = Server::serve(dir.path(), database_args, ENV);
    server.wait_ready().await;
    // Acknowledged before the kill: two items and the batch.
    let acked = submit(&server, &receiver.url, 2).await;
    let acked_path = format!("/v1/batches/{acked}/webhooks");
    let before = server.wait_until(&acked_path, |b| all_delivered(b, 3)).await;
    let acked_ids: HashSet<String> = deliveries(&before.body)
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();

    // Due while the receiver is down: three items and the batch, each failed at least once.
    receiver.up.store(false, Ordering::SeqCst);
    let due = submit(&server, &receiver.url, 3).await;
    let due_path = format!("/v1/batches/{due}/webhooks");
    let failing = server
        .wait_until(&due_path, |b| {
            let list = deliveries(b);
            list.len() == 4
                && list
                    .iter()
                    .all(|d| d["status"] == "pending" && d["attempts"].as_array().is_some_and(|a| a.len() >= 2))
        })
        .await;
    let due_ids: Vec<String> = deliveries(&failing.body)
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    for d in deliveries(&failing.body) {
        let attempt = &d["attempts"][0];
        assert_eq!(attempt["status_code"], 503, "{d}");
        assert!(attempt["error"].as_str().is_some_and(|e| e.contains("503")), "{d}");
        assert!(attempt["latency_ms"].is_i64() && attempt["at"].is_string(), "{d}");
    }
    server.signal(Signal::SIGKILL);
    server.wait_exit(STOP_TIMEOUT).await;
    // Every failed attempt was logged, with its delivery id and never the secret.
    let logs = server.logs();
    for id in &due_ids {
        assert!(
            logs.lines()
                .any(|l| l.contains("webhook attempt failed") && l.contains(id.as_str())),
            "no log line for {id}:\n{logs}"
        );
    }
    assert!(
        !logs.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the secret was logged"
    );

    receiver.restarted.store(true, Ordering::SeqCst);
    receiver.up.store(true, Ordering::SeqCst);
    let mut restarted = Server::serve(dir.path(), database_args, ENV);
    restarted.wait_ready().await;
    let after = restarted.wait_until(&due_path, |b| all_delivered(b, 4)).await;
    for d in deliveries(&after.body) {
        let attempts = d["attempts"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            attempts.last().map(|a| a["status_code"].clone()),
            Some(json!(204)),
            "{d}"
        );
    }

    let hits = receiver.hits();
    let acknowledged: HashMap<&str, usize> =
        hits.iter()
            .filter(|h| h.status == 204)
            .fold(HashMap::new(), |mut m, h| {
                *m.entry(h.id.as_str()).or_default() += 1;
                m
            });
    for id in acked_ids.iter().chain(&due_ids) {
        assert!(acknowledged.contains_key(id.as_str()), "{id} never arrived: {hits:?}");
    }
    let resent: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.after_restart && acked_ids.contains(&h.id))
        .collect();
    assert!(resent.is_empty(), "acknowledged deliveries were sent again: {resent:?}");
    restarted.signal(Signal::SIGTERM);
    assert_eq!(restarted.wait_exit(STOP_TIMEOUT).await.code(), Some(0));
}

#[tokio::test]
async fn webhook_deliveries_survive_a_kill_on_sqlite() {
    deliveries_survive_a_kill(&[]).await;
}

#[tokio::test]
async fn webhook_deliveries_survive_a_kill_on_postgres() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    deliveries_survive_a_kill(&["--database-url", db.url()]).await;
}

#[tokio::test]
async fn private_webhook_urls_are_refused_by_default() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = Server::serve(dir.path(), &[], &[]);
    server.wait_ready().await;
    for url in ["http://127.0.0.1:8080/hook", "http://10.0.0.1/hook"] {
        let reply = server
            .post(
                "/v1/batches",
                &json!({"items": [{"input": {}}], "webhook": {"url": url}}),
            )
            .await;
        assert_eq!(reply.status, 400, "{url}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], "validation_error");
        assert_eq!(reply.body["error"]["issues"][0]["path"], "webhook.url");
    }
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(STOP_TIMEOUT).await.code(), Some(0));
    let mut allowed = Server::serve(
        dir.path(),
        &[],
        // 10.0.0.1 does not answer here: a short timeout keeps the stop quick.
        &[
            ("BATCHD__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true"),
            ("BATCHD__WEBHOOKS__TIMEOUT_MS", "500"),
        ],
    );
    allowed.wait_ready().await;
    for url in ["http://127.0.0.1:8080/hook", "http://10.0.0.1/hook"] {
        let reply = allowed
            .post(
                "/v1/batches",
                &json!({"items": [{"input": {}}], "webhook": {"url": url, "events": ["batch.created"]}}),
            )
            .await;
        assert_eq!(reply.status, 202, "{url}: {:?}", reply.body);
    }
    allowed.signal(Signal::SIGTERM);
    assert_eq!(allowed.wait_exit(STOP_TIMEOUT).await.code(), Some(0));
}

//! Two dispatchers (as on two batchd instances sharing one database) deliver every outbox
//! row exactly once to a receiver that always acknowledges: the lease keeps them apart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchd_domain::{DeliveryStatus, EventType, JsonMap, Mode, OnItemFailure};
use batchd_storage::testing::TestDatabase;
use batchd_storage::{
    ClaimRequest, Finish, NewBatch, NewItem, NewWebhook, Outcome, PageRequest, Scope, Store, StoreOptions,
};
use batchd_webhook::{Dispatcher, DispatcherConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ITEMS: usize = 60;

/// A receiver that answers 200 to everything and counts requests per `webhook-id`.
async fn receiver() -> (String, Arc<Mutex<HashMap<String, usize>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let url = format!("http://{}/h", listener.local_addr().expect("an address"));
    let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let log = counts.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, length) = loop {
                    let Ok(n) = socket.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let Ok(n) = socket.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                if let Some(id) = head.lines().find_map(|l| l.strip_prefix("webhook-id:")) {
                    *log.lock().expect("the log").entry(id.trim().to_owned()).or_default() += 1;
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, counts, task)
}

async fn run_items_to_completion(store: &dyn Store, url: &str) -> String {
    let id = batchd_domain::new_batch_id();
    store
        .create_batch(NewBatch {
            id: id.clone(),
            tenant: "t".to_owned(),
            queue: "q".to_owned(),
            session_id: None,
            mode: Mode::Parallel,
            on_item_failure: OnItemFailure::Continue,
            priority: 0,
            run_at: None,
            config: JsonMap::new(),
            webhook: Some(NewWebhook {
                url: url.to_owned(),
                secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
                events: vec![EventType::ItemCompleted, EventType::BatchCompleted],
            }),
            metadata: None,
            idempotency_key: None,
            client_chose_id: false,
            request_hash: "h".to_owned(),
            items: (0..ITEMS)
                .map(|_| NewItem {
                    input: serde_json::json!({}),
                    custom_id: None,
                    config: JsonMap::new(),
                    max_attempts: 1,
                })
                .collect(),
        })
        .await
        .expect("the batch is created");
    let request = ClaimRequest {
        queue: "q".to_owned(),
        max_items: ITEMS,
        lease: Duration::from_secs(30),
        owner: "test".to_owned(),
    };
    let claimed = store.claim(&request).await.expect("claim");
    assert_eq!(claimed.len(), ITEMS);
    let finishes = claimed
        .into_iter()
        .map(|c| Finish {
            item_id: c.id,
            lease_token: c.lease_token,
            outcome: Outcome::Completed {
                result: serde_json::json!(null),
            },
        })
        .collect();
    store.finish(finishes).await.expect("finish");
    id
}

async fn two_dispatchers_send_each_delivery_once(db: TestDatabase) {
    let (url, counts, task) = receiver().await;
    let first = batchd_storage::connect(StoreOptions::new(db.url()))
        .await
        .expect("a store");
    let mut options = StoreOptions::new(db.url());
    options.migrate = false;
    let second = batchd_storage::connect(options).await.expect("a second store");
    let mut config = DispatcherConfig::default();
    config.allow_private_destinations = true;
    config.poll_interval = Duration::from_millis(50);
    config.concurrency = 4;
    let dispatchers = [
        Dispatcher::start(first.clone(), config.clone()).expect("a dispatcher"),
        Dispatcher::start(second.clone(), config).expect("another dispatcher"),
    ];
    let batch_id = run_items_to_completion(first.as_ref(), &url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let deliveries = loop {
        let page = first
            .list_deliveries(
                Scope::All,
                &batch_id,
                &PageRequest {
                    cursor: None,
                    limit: 1_000,
                },
            )
            .await
            .expect("the deliveries");
        if page.rows.iter().all(|d| d.status == DeliveryStatus::Delivered) {
            break page.rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for dispatcher in dispatchers {
        dispatcher.shutdown().await;
    }
    task.abort();
    assert_eq!(deliveries.len(), ITEMS + 1);
    assert!(
        deliveries.iter().all(|d| d.attempts.len() == 1),
        "each took one attempt"
    );
    let counts = counts.lock().expect("the log").clone();
    assert_eq!(counts.len(), ITEMS + 1, "every delivery arrived");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_send_each_delivery_once_on_sqlite() {
    two_dispatchers_send_each_delivery_once(TestDatabase::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_send_each_delivery_once_on_postgres() {
    if let Some(db) = TestDatabase::postgres().await {
        two_dispatchers_send_each_delivery_once(db).await;
    }
}

//! batchd end to end through its client, against a real in-process server on SQLite and,
//! when `BATCHD_TEST_DATABASE_URL` names one, PostgreSQL. One test binary: linking is the
//! slow part.

mod batches;
mod control;
mod events;
mod pull;
mod push;
mod server;
mod webhooks;

use std::time::Duration;

use batchd_client::wire::BatchView;
use batchd_client::{BatchStatus, Client};
use batchd_testkit::{Backend, TestServer};
use serde_json::{Value, json};

/// How long a small demo batch may take to finish, generously.
const DONE_WITHIN: Duration = Duration::from_secs(30);

/// A server on `backend` with every default; `None` for PostgreSQL when none is configured.
async fn server_on(backend: Backend) -> Option<TestServer> {
    TestServer::builder()
        .backend(backend)
        .start()
        .await
        .expect("the test server starts")
}

/// A demo batch of `n` items that each sleep a few milliseconds.
fn demo_batch(n: usize) -> Value {
    let items: Vec<Value> = (0..n).map(|i| json!({"input": {"sleep_ms": 5, "result": i}})).collect();
    json!({ "items": items })
}

/// Submits `body` and waits until the batch has ended.
async fn run_to_end(client: &Client, body: &Value) -> BatchView {
    let submitted = client.submit_json(body, None).await.expect("the batch is accepted");
    assert!(!submitted.replayed);
    client
        .wait_until_done(&submitted.batch.id, DONE_WITHIN)
        .await
        .expect("the batch ends")
}

fn assert_completed(batch: &BatchView, items: i64) {
    assert_eq!(batch.status, BatchStatus::Completed, "{batch:?}");
    assert_eq!(batch.counts.total, items);
    assert_eq!(batch.counts.completed, items);
    assert_eq!(
        batch.counts.pending + batch.counts.running + batch.counts.failed + batch.counts.cancelled,
        0
    );
}

/// Defines `<name>_sqlite` and `<name>_postgres` tests that run `scenario(&server)`, then
/// shut the server down. The PostgreSQL one returns early when no server is configured
/// (under CI that fails instead, in `TestDatabase::postgres`).
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let server = crate::server_on(batchd_testkit::Backend::Sqlite)
                        .await
                        .expect("SQLite is always available");
                    super::$scenario(&server).await;
                    server.shutdown().await.expect("a clean shutdown");
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let Some(server) = crate::server_on(batchd_testkit::Backend::Postgres).await else {
                        eprintln!("skipped: BATCHD_TEST_DATABASE_URL is not set");
                        return;
                    };
                    super::$scenario(&server).await;
                    server.shutdown().await.expect("a clean shutdown");
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

/// Defines `<name>_sqlite` and `<name>_postgres` tests that run `scenario(backend)`: for
/// scenarios that build a server of their own (keys, queues). The PostgreSQL one returns early
/// when no server is configured (under CI that fails instead).
macro_rules! on_both_backends_with_own_server {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(batchd_testkit::Backend::Sqlite).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(batchd_testkit::Backend::Postgres).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends_with_own_server;

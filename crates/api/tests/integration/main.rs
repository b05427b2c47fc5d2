//! The API in-process over real storage (a fresh SQLite file per test). One test binary:
//! linking is the slow part.

mod errors;
mod health;
mod openapi;
mod v1;
mod workers;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::test::{TestRequest, call_service, init_service, read_body};
use actix_web::web;
use batchd_api::{ApiConfig, ApiState, app};
use batchd_storage::testing::TestDatabase;
use batchd_storage::{Store, StoreOptions, connect};

/// A fresh database and a store over it; the database goes away with the value.
struct TestStore {
    store: Arc<dyn Store>,
    _db: TestDatabase,
}

impl TestStore {
    async fn migrated() -> Self {
        Self::open(true).await
    }

    async fn unmigrated() -> Self {
        Self::open(false).await
    }

    async fn open(migrate: bool) -> Self {
        let db = TestDatabase::sqlite();
        let mut options = StoreOptions::new(db.url());
        options.migrate = migrate;
        let store = connect(options).await.expect("a fresh SQLite database opens");
        Self { store, _db: db }
    }
}

/// The whole app over a store.
async fn service(
    store: &TestStore,
) -> impl Service<actix_http::Request, Response = ServiceResponse<impl MessageBody>, Error = actix_web::Error> {
    init_service(app(web::Data::new(ApiState::new(
        store.store.clone(),
        ApiConfig::default(),
    ))))
    .await
}

/// Status, headers and JSON body of one call.
struct Reply {
    status: u16,
    headers: actix_web::http::header::HeaderMap,
    body: serde_json::Value,
}

async fn send<S, B>(app: &S, request: TestRequest) -> Reply
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let response = call_service(app, request.to_request()).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = read_body(response).await;
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("the API answers JSON")
    };
    Reply { status, headers, body }
}

fn assert_error_shape(reply: &Reply, code: &str) {
    assert_eq!(reply.body["error"]["code"], code, "{}", reply.body);
    assert!(reply.body["error"]["message"].is_string(), "{}", reply.body);
    assert_eq!(reply.body["error"]["issues"], serde_json::json!([]), "{}", reply.body);
    assert!(reply.headers.contains_key("x-request-id"));
}

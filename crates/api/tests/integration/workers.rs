//! The pull-worker endpoints in-process: the body checks, and a long poll that answers at
//! once when the server begins to stop.

use std::time::Duration;

use actix_web::test::{TestRequest, init_service};
use actix_web::web;
use batchd_api::{ApiConfig, ApiState, QueueInfo, app};
use serde_json::json;

use crate::{TestStore, assert_error_shape, send};

fn pull_config() -> ApiConfig {
    let mut config = ApiConfig::default();
    config.queues.insert(
        "remote".into(),
        QueueInfo {
            handler: "pull".into(),
            max_items: 100,
            defaults: Default::default(),
            lease: Duration::from_secs(30),
        },
    );
    config
}

#[actix_web::test]
async fn a_long_poll_answers_at_once_once_the_server_is_stopping() {
    let store = TestStore::migrated().await;
    let state = web::Data::new(ApiState::new(store.store.clone(), pull_config()));
    let service = init_service(app(state.clone())).await;
    state.begin_shutdown();
    let request = TestRequest::post()
        .uri("/v1/queues/remote/claim")
        .set_json(json!({"wait_ms": 30000}));
    // Within the test's own timeout, far below the 30 s wait: the poll did not wait.
    let reply = tokio::time::timeout(Duration::from_secs(20), send(&service, request))
        .await
        .expect("the long poll answered without waiting");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, json!({"items": []}));
}

#[actix_web::test]
async fn worker_bodies_are_checked_field_by_field() {
    let store = TestStore::migrated().await;
    let service = init_service(app(web::Data::new(ApiState::new(store.store.clone(), pull_config())))).await;
    let request = TestRequest::post()
        .uri("/v1/queues/remote/claim")
        .set_json(json!({"max_items": 0, "wait_ms": -1, "extra": true}));
    let reply = send(&service, request).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "validation_error");
    let paths: Vec<&str> = reply.body["error"]["issues"]
        .as_array()
        .expect("issues")
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    assert_eq!(paths, ["max_items", "wait_ms", "extra"]);

    let request = TestRequest::post()
        .uri("/v1/queues/remote/claim")
        .insert_header(("content-type", "application/json"))
        .set_payload("{not json");
    let reply = send(&service, request).await;
    assert_eq!(reply.status, 400);
    assert_error_shape(&reply, "malformed_json");

    let request = TestRequest::post()
        .uri("/v1/items/nope/complete")
        .set_json(json!({"result": 1}));
    let reply = send(&service, request).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "validation_error");
    assert_eq!(reply.body["error"]["issues"][0]["path"], "lease_token");

    let request = TestRequest::post()
        .uri("/v1/items/nope/complete")
        .set_json(json!({"lease_token": "t", "result": 1}));
    let reply = send(&service, request).await;
    assert_eq!(reply.status, 409);
    assert_error_shape(&reply, "lease_lost");
}

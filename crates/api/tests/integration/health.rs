use actix_web::test::TestRequest;
use serde_json::json;

use crate::{TestStore, assert_error_shape, send, service};

#[actix_web::test]
async fn healthz_answers_ok() {
    let store = TestStore::migrated().await;
    let app = service(&store).await;
    let reply = send(&app, TestRequest::get().uri("/healthz")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, json!({"status": "ok"}));
    let id = reply.headers.get("x-request-id").expect("every response has an id");
    uuid::Uuid::parse_str(id.to_str().expect("ASCII")).expect("a new id is a UUID");
}

#[actix_web::test]
async fn readyz_is_ready_on_a_migrated_database() {
    let store = TestStore::migrated().await;
    let app = service(&store).await;
    let reply = send(&app, TestRequest::get().uri("/readyz")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        json!({"status": "ready", "database": "ok", "migrations": "applied"})
    );
}

#[actix_web::test]
async fn readyz_says_migrations_are_missing() {
    let store = TestStore::unmigrated().await;
    let app = service(&store).await;
    let reply = send(&app, TestRequest::get().uri("/readyz")).await;
    assert_eq!(reply.status, 503);
    assert_error_shape(&reply, "unavailable");
    let message = reply.body["error"]["message"].as_str().expect("a message");
    assert!(message.contains("migrations"), "{message}");

    store.store.migrate().await.expect("migrations apply");
    let reply = send(&app, TestRequest::get().uri("/readyz")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[actix_web::test]
async fn health_checks_answer_head_but_not_post() {
    let store = TestStore::migrated().await;
    let app = service(&store).await;
    let reply = send(
        &app,
        TestRequest::default()
            .method(actix_web::http::Method::HEAD)
            .uri("/healthz"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let reply = send(&app, TestRequest::post().uri("/healthz")).await;
    assert_eq!(reply.status, 405);
    assert_error_shape(&reply, "method_not_allowed");
    assert_eq!(
        reply.headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );
}

use actix_web::middleware::from_fn;
use actix_web::test::{TestRequest, init_service};
use actix_web::{App, HttpResponse, web};
use batchd_api::request_id;

use crate::{TestStore, assert_error_shape, send, service};

#[derive(serde::Deserialize)]
struct Page {
    limit: u32,
}

#[actix_web::test]
async fn unknown_paths_are_not_found_in_the_error_shape() {
    let store = TestStore::migrated().await;
    let app = service(&store).await;
    let reply = send(&app, TestRequest::get().uri("/v0/nothing")).await;
    assert_eq!(reply.status, 404);
    assert_error_shape(&reply, "not_found");
    assert_eq!(reply.body["error"]["message"], "no route for GET /v0/nothing");
}

#[actix_web::test]
async fn a_valid_incoming_request_id_is_reused_and_an_invalid_one_replaced() {
    let store = TestStore::migrated().await;
    let app = service(&store).await;
    let reply = send(
        &app,
        TestRequest::get()
            .uri("/healthz")
            .insert_header(("x-request-id", "lb-1234")),
    )
    .await;
    assert_eq!(
        reply.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("lb-1234")
    );
    let reply = send(
        &app,
        TestRequest::get()
            .uri("/nope")
            .insert_header(("x-request-id", "two words")),
    )
    .await;
    let id = reply
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("an id");
    uuid::Uuid::parse_str(id).expect("an invalid id is replaced by a UUID");
}

/// JSON extractor errors (under `json_config`), errors that actix produces itself, and plain
/// actix errors a handler returns all leave in the same shape; a server error's text never
/// does.
#[actix_web::test]
async fn every_error_leaves_in_the_error_shape() {
    let app = init_service(
        App::new()
            .wrap(from_fn(request_id))
            .app_data(batchd_api::json_config(16))
            .route(
                "/json",
                web::post()
                    .to(|body: web::Json<serde_json::Value>| async move { HttpResponse::Ok().json(body.into_inner()) }),
            )
            .route(
                "/page",
                web::get().to(|page: web::Query<Page>| async move { HttpResponse::Ok().json(page.limit) }),
            )
            .route(
                "/boom",
                web::get().to(|| async {
                    Err::<HttpResponse, _>(actix_web::error::ErrorInternalServerError("secret detail"))
                }),
            ),
    )
    .await;

    let reply = send(
        &app,
        TestRequest::post()
            .uri("/json")
            .set_json(serde_json::json!({"long": "x".repeat(64)})),
    )
    .await;
    assert_eq!(reply.status, 413);
    assert_error_shape(&reply, "payload_too_large");

    let reply = send(
        &app,
        TestRequest::post()
            .uri("/json")
            .insert_header(("content-type", "application/json"))
            .set_payload("{nope"),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_error_shape(&reply, "malformed_json");

    let reply = send(
        &app,
        TestRequest::post()
            .uri("/json")
            .insert_header(("content-type", "text/plain"))
            .set_payload("{}"),
    )
    .await;
    assert_eq!(reply.status, 415);
    assert_error_shape(&reply, "unsupported_media_type");

    let reply = send(&app, TestRequest::get().uri("/page?limit=many")).await;
    assert_eq!(reply.status, 400);
    assert_error_shape(&reply, "malformed_json");

    let reply = send(&app, TestRequest::get().uri("/boom")).await;
    assert_eq!(reply.status, 500);
    assert_error_shape(&reply, "internal");
    assert!(!reply.body.to_string().contains("secret detail"), "{}", reply.body);
}

/// An inner middleware that fails with `Err` instead of a response still yields the error
/// shape and the request id.
#[actix_web::test]
async fn errors_returned_by_inner_middleware_keep_the_shape_and_the_id() {
    use actix_web::body::MessageBody;
    use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
    use actix_web::middleware::Next;

    async fn refuse(
        _req: ServiceRequest,
        _next: Next<impl MessageBody + 'static>,
    ) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
        Err::<ServiceResponse, _>(actix_web::error::ErrorForbidden("no entry"))
    }

    let app = init_service(
        App::new()
            .wrap(from_fn(refuse))
            .wrap(from_fn(request_id))
            .route("/", web::get().to(HttpResponse::Ok)),
    )
    .await;
    let request = TestRequest::get()
        .uri("/")
        .insert_header(("x-request-id", "abc-1"))
        .to_request();
    let error = app.call(request).await.expect_err("the inner middleware refuses");
    let response = error.error_response();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("abc-1")
    );
    let bytes = actix_web::body::to_bytes(response.into_body()).await.expect("a body");
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(body["error"]["message"], "no entry");
}

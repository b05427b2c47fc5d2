//! batchd's OpenAPI document and its reference page. The document is generated from the
//! route annotations and the wire types, so it cannot drift from what the handlers answer;
//! `GET /openapi.json` serves it and `GET /docs` serves a page, compiled into the binary, that
//! reads it and renders every endpoint, parameter and schema without loading anything from the
//! network. Neither needs a token.

use std::sync::LazyLock;

use actix_web::http::header::{self, ContentType};
use actix_web::{HttpResponse, web};
use batchd_domain::wire::{
    AnswerRequest, BatchList, BatchView, ClaimItem, ClaimRequest, ClaimResponse, CompleteRequest, CurrentItem,
    DeliveryAttemptView, DeliveryList, DeliveryView, ErrorBody, ErrorDetail, EventList, EventView, FailRequest,
    HeartbeatRequest, ItemEventRequest, ItemList, ItemView, LeaseResponse, NeedsInputRequest, Progress, QueueList,
    QueueView, ReportResponse, SubmitBatch, SubmitItem, SubmitResponse, WebhookSpec, WebhookView, WorkerEventType,
};
use batchd_domain::{BatchStatus, Counts, DeliveryStatus, EventType, Issue, ItemStatus, Mode, OnItemFailure};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::AdditionalProperties;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Schema, Type};
use utoipa::{Modify, OpenApi};

use crate::stream::SseFrame;
use crate::{batches, health, items, queues, stream, webhooks, workers};

/// The reference page: plain HTML with its CSS and script inline.
const DOCS_HTML: &str = include_str!("docs.html");

/// Keeps the page to what it carries and to this server: a browser refuses anything else.
const DOCS_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                        connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'";

/// The error answers every client call on one batch documents: 401, 403 (worker keys may
/// not) and 404 (also for another tenant's batch).
#[derive(utoipa::IntoResponses)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; ApiError writes these answers"
)]
pub(crate) enum BatchCallErrors {
    #[response(status = 401, description = "`unauthorized`: no token, or one that is not valid")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "`forbidden`: a worker key")]
    Forbidden(ErrorBody),
    #[response(status = 404, description = "`not_found`: no such batch in the caller's tenant")]
    NotFound(ErrorBody),
}

/// The 409 of the batch control calls (cancel, pause, resume, retry).
#[derive(utoipa::IntoResponses)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; ApiError writes this answer"
)]
pub(crate) enum BatchStateConflict {
    #[response(
        status = 409,
        description = "`invalid_state`: the batch's status forbids it; `current_status` says what it is"
    )]
    InvalidState(ErrorBody),
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "batchd",
        version = env!("CARGO_PKG_VERSION"),
        description = "A self-hosted batch-job server: submit a batch of items, follow it by polling, by its \
                       timeline or live over Server-Sent Events, and control it. JSON in and out; times are RFC \
                       3339 UTC; a value that does not apply is `null`. Every error has the shape \
                       `{\"error\": {\"code\", \"message\", \"issues\": [{\"path\", \"message\"}]}}` and every \
                       response carries `x-request-id`.",
    ),
    paths(
        health::healthz,
        health::readyz,
        batches::submit,
        batches::list,
        batches::get,
        batches::cancel,
        batches::pause,
        batches::resume,
        batches::retry,
        batches::items,
        batches::events,
        stream::events_stream,
        webhooks::deliveries,
        items::recent,
        items::get,
        items::cancel,
        items::answer,
        queues::list,
        queues::pause,
        queues::resume,
        workers::claim,
        workers::heartbeat,
        workers::events,
        workers::complete,
        workers::fail,
        workers::needs_input,
    ),
    components(schemas(
        SubmitBatch,
        SubmitItem,
        WebhookSpec,
        SubmitResponse,
        BatchList,
        BatchView,
        Counts,
        CurrentItem,
        Progress,
        WebhookView,
        ItemList,
        ItemView,
        EventList,
        EventView,
        SseFrame,
        DeliveryList,
        DeliveryView,
        DeliveryAttemptView,
        DeliveryStatus,
        AnswerRequest,
        QueueList,
        QueueView,
        ErrorBody,
        ErrorDetail,
        Issue,
        BatchStatus,
        ItemStatus,
        Mode,
        OnItemFailure,
        EventType,
        health::Health,
        health::Ready,
        ClaimRequest,
        ClaimResponse,
        ClaimItem,
        HeartbeatRequest,
        ItemEventRequest,
        WorkerEventType,
        LeaseResponse,
        CompleteRequest,
        FailRequest,
        NeedsInputRequest,
        ReportResponse,
    )),
    modifiers(&BearerAuth, &RateLimited, &RequestIdHeader, &ClosedRequestBodies),
    tags(
        (name = "batches", description = "Submit, read, list and control batches; their items and timeline."),
        (name = "items", description = "The caller's recent items, one item, cancelling and answering one."),
        (name = "queues", description = "Queue statistics; pausing and resuming a whole queue."),
        (name = "workers", description = "The pull-worker protocol: claim items of a pull queue, renew their \
                                          leases, write to their timeline and report how they ended."),
        (name = "health", description = "Liveness and readiness, for load balancers and orchestrators."),
    ),
)]
struct ApiDoc;

/// `Authorization: Bearer <token>`: an API key or an HS256 JWT.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "An API key from the server's config, or an HS256 JWT whose `sub` is the tenant. A server with \
                 neither configured runs open on loopback and needs no token.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The rate limiter sits in front of every `/v1` route, so each of them may answer `429`.
struct RateLimited;

impl Modify for RateLimited {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let retry_after = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)))
            .description(Some("Seconds until a request will be accepted again."))
            .build();
        let response = ResponseBuilder::new()
            .description("`rate_limited`: the caller is over its request rate")
            .header("Retry-After", retry_after)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for (path, item) in &mut openapi.paths.paths {
            if !path.starts_with("/v1/") {
                continue;
            }
            for operation in operations(item) {
                operation
                    .responses
                    .responses
                    .insert("429".to_owned(), RefOr::T(response.clone()));
            }
        }
    }
}

/// Every response carries `x-request-id`; saying so once here beats saying it on every
/// response of every route.
struct RequestIdHeader;

impl Modify for RequestIdHeader {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let header = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some(
                "The request's id: the incoming one when it is valid, else a new UUID. Server logs carry it.",
            ))
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in operations(item) {
                for response in operation.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response.headers.insert("x-request-id".to_owned(), header.clone());
                    }
                }
            }
        }
    }
}

/// The operations of a path, whatever their method.
fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// The request bodies are checked key by key and refuse unknown keys (`validate_submission`,
/// the answer handler), which derived schemas cannot say without changing how serde reads
/// the types.
struct ClosedRequestBodies;

impl Modify for ClosedRequestBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let closed = [
            "SubmitBatch",
            "SubmitItem",
            "WebhookSpec",
            "AnswerRequest",
            "ClaimRequest",
            "HeartbeatRequest",
            "ItemEventRequest",
            "CompleteRequest",
            "FailRequest",
            "NeedsInputRequest",
        ];
        for name in closed {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) {
                object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
        }
    }
}

/// Built once: it only depends on the code.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/openapi.json").route(web::get().to(openapi_json)))
        .service(web::resource("/docs").route(web::get().to(docs)));
}

/// `GET /openapi.json`: the OpenAPI document of the API.
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(&*DOCUMENT)
}

/// `GET /docs`: the API reference page.
async fn docs() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::html())
        .insert_header((header::CONTENT_SECURITY_POLICY, DOCS_CSP))
        .body(DOCS_HTML)
}

//! `/v1/batches`: submit, read, list, control, and a batch's items and events.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::wire::{BatchList, BatchView, ErrorBody, EventList, ItemList, SubmitBatch, SubmitResponse};
use batchd_domain::{BatchStatus, Issue, ItemSettings, ItemStatus, JsonMap, merge_config, validate_submission};
use batchd_storage::{BatchFilter, CreateOutcome, NewBatch, NewItem, NewWebhook, PageRequest, Scope};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::openapi::{BatchCallErrors, BatchStateConflict};
use crate::params::{PageParams, Query};
use crate::views::{batch_view, event_view, item_view};
use crate::{ApiError, ApiState};

/// The header a client sends to make a submit safe to repeat.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/batches")
            .route(web::post().to(submit))
            .route(web::get().to(list)),
    )
    .service(web::resource("/v1/batches/{id}").route(web::get().to(get)))
    .service(web::resource("/v1/batches/{id}/cancel").route(web::post().to(cancel)))
    .service(web::resource("/v1/batches/{id}/pause").route(web::post().to(pause)))
    .service(web::resource("/v1/batches/{id}/resume").route(web::post().to(resume)))
    .service(web::resource("/v1/batches/{id}/retry").route(web::post().to(retry)))
    .service(web::resource("/v1/batches/{id}/items").route(web::get().to(items)))
    .service(web::resource("/v1/batches/{id}/events").route(web::get().to(events)))
    .service(web::resource("/v1/batches/{id}/events/stream").route(web::get().to(crate::stream::events_stream)));
}

/// `POST /v1/batches`: validates, stores the batch with its items, and answers `202` with
/// its id at once (`200` with the same body for an idempotent replay).
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "submit_batch",
    summary = "Submit a batch",
    description = "Validates the batch, stores it with its items and answers at once with its id; the items run \
                   in the background. A replay with the same client `id` or `Idempotency-Key` and the same body \
                   answers `200` with the existing batch; with another body, `409 idempotency_conflict`.",
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false,
            description = "Makes the submit safe to repeat: 1-255 visible ASCII characters"),
    ),
    request_body(content = SubmitBatch, content_type = "application/json"),
    responses(
        (status = 202, description = "The batch is stored; its items run in the background", body = SubmitResponse,
            headers(("Location" = String, description = "The batch's URL"))),
        (status = 200, description = "An idempotent replay: the existing batch", body = SubmitResponse,
            headers(("Location" = String, description = "The batch's URL"))),
        (status = 400, description = "`malformed_json`: the body is not JSON; `validation_error`: every issue with its \
                                      path from the body root, e.g. `items[3].input`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the id or key is already used by a different request",
            body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not `application/json`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn submit(
    state: web::Data<ApiState>,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let body = body.into_inner();
    let idempotency_key = match req.headers().get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => match value.to_str().map(str::trim) {
            Ok(key) if (1..=255).contains(&key.len()) => Some(key.to_owned()),
            _ => {
                let issue = Issue::new("Idempotency-Key", "must be 1-255 visible ASCII characters");
                return Err(ApiError::validation("invalid Idempotency-Key header", vec![issue]));
            }
        },
    };
    let config = &state.config;
    let submitted = validate_submission(&body, &config.limits, |q| {
        config.queues.get(q).map(|info| info.max_items)
    })
    .and_then(|submitted| check_webhook(submitted, config.allow_private_webhooks))
    .map_err(|issues| ApiError::validation("the batch is not valid", issues))?;
    let queue_defaults = config
        .queues
        .get(&submitted.queue)
        .map(|q| q.defaults.clone())
        .unwrap_or_default();
    let client_chose_id = submitted.id.is_some();
    // The hash is only ever compared with a retry's, found by its idempotency key or by the
    // id its client chose. No later request can name a batch that has neither (a request
    // naming its generated id has a body of its own, with that id in it), so it keeps none:
    // hashing a large body costs more than validating it.
    let request_hash = if idempotency_key.is_some() || client_chose_id {
        request_hash(&body)
    } else {
        String::new()
    };
    // Most items have no config of their own: theirs is the batch's, read once.
    let batch_max_attempts = max_attempts([&queue_defaults, &submitted.config]);
    let items = submitted
        .items
        .into_iter()
        .map(|item| {
            let max_attempts = if item.config.is_empty() {
                batch_max_attempts
            } else {
                max_attempts([&queue_defaults, &submitted.config, &item.config])
            };
            NewItem {
                input: item.input,
                custom_id: item.custom_id,
                config: item.config,
                max_attempts,
            }
        })
        .collect();
    let new = NewBatch {
        id: submitted.id.unwrap_or_else(batchd_domain::new_batch_id),
        tenant: caller.tenant.clone(),
        queue: submitted.queue,
        session_id: submitted.session_id,
        mode: submitted.mode,
        on_item_failure: submitted.on_item_failure,
        priority: submitted.priority,
        run_at: submitted.run_at,
        config: submitted.config,
        webhook: submitted.webhook.map(|w| NewWebhook {
            url: w.url,
            secret: w.secret,
            events: w.events,
        }),
        metadata: submitted.metadata,
        idempotency_key,
        client_chose_id,
        request_hash,
        items,
    };
    let (created, batch, item_ids) = match state.store.create_batch(new).await? {
        CreateOutcome::Created(batch, ids) => (true, batch, ids),
        CreateOutcome::Existing(batch, ids) => (false, batch, ids),
    };
    let status_url = format!("/v1/batches/{}", batch.id);
    let reply = SubmitResponse {
        events_url: format!("{status_url}/events"),
        id: batch.id,
        status: batch.status,
        queue: batch.queue,
        total_items: batch.counts.total,
        item_ids,
        created_at: batch.created_at,
        status_url: status_url.clone(),
    };
    let mut response = if created {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Ok()
    };
    Ok(response.insert_header((header::LOCATION, status_url)).json(reply))
}

/// What validation cannot know: the server's destination policy (a webhook URL whose host is
/// a non-public IP literal) and whether a `whsec_` secret decodes.
fn check_webhook(submitted: SubmitBatch, allow_private: bool) -> Result<SubmitBatch, Vec<Issue>> {
    let Some(webhook) = &submitted.webhook else {
        return Ok(submitted);
    };
    let mut issues = Vec::new();
    if let Err(error) = batchd_webhook::check_submitted_url(&webhook.url, allow_private) {
        issues.push(Issue::new("webhook.url", error.to_string()));
    }
    if let Some(secret) = &webhook.secret
        && let Err(error) = batchd_webhook::Secret::new(secret.as_str())
    {
        issues.push(Issue::new("webhook.secret", error.to_string()));
    }
    if issues.is_empty() { Ok(submitted) } else { Err(issues) }
}

/// The query of `GET /v1/batches`, for the OpenAPI document; [`list`] reads it by hand.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; `list` reads its query with `Query`"
)]
struct BatchListParams {
    /// Only batches in this status (described in [`batch_status_filter`]).
    #[param(schema_with = batch_status_filter)]
    status: Option<String>,
    /// Only batches of this queue.
    queue: Option<String>,
    /// Only batches of this session.
    session_id: Option<String>,
    /// Only batches created after this time (RFC 3339).
    created_after: Option<time::OffsetDateTime>,
}

/// A batch status or `active`. The description lives in the schema: utoipa drops a
/// `schema_with` parameter's doc comment.
fn batch_status_filter() -> utoipa::openapi::Object {
    let spellings = BatchStatus::ALL.iter().map(|s| s.as_str()).chain(["active"]);
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(spellings))
        .description(Some(
            "Only batches in this status; `active` stands for pending, running, paused and cancelling.",
        ))
        .build()
}

/// `GET /v1/batches`: the caller's batches, newest first.
/// The SHA-256 of the body as compact JSON with its keys sorted, so the same request always
/// hashes the same; streamed into the hash rather than written out first.
fn request_hash(body: &Value) -> String {
    struct Hashing(Sha256);
    impl std::io::Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(Sha256::new());
    // Neither a `Value` nor the hash can fail to write.
    let _ = serde_json::to_writer(&mut hashing, body);
    hex::encode(hashing.0.finalize())
}

/// The attempts an item may take under these config levels, merged.
fn max_attempts<'a>(levels: impl IntoIterator<Item = &'a JsonMap>) -> i32 {
    ItemSettings::from_config(&merge_config(levels)).retry.max_attempts
}

#[utoipa::path(
    get,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "list_batches",
    summary = "List batches",
    description = "The caller's batches, newest first, a page at a time.",
    params(BatchListParams, PageParams),
    responses(
        (status = 200, description = "A page of batches", body = BatchList),
        (status = 400, description = "`validation_error`: a query parameter is not valid; each issue names it",
            body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list(state: web::Data<ApiState>, caller: Caller, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let mut query = Query::parse(req.query_string())?;
    // `active` stands for pending, running, paused and cancelling.
    let statuses = match query.string("status").as_deref() {
        None => Vec::new(),
        Some("active") => BatchStatus::ACTIVE.to_vec(),
        Some(_) => query.parsed::<BatchStatus>("status").into_iter().collect(),
    };
    let filter = BatchFilter {
        statuses,
        queue: query.string("queue"),
        session_id: query.string("session_id"),
        created_after: query.time("created_after"),
    };
    let page = query.page();
    query.finish()?;
    let page = state.store.list_batches(caller.scope(), &filter, &page).await?;
    let batches = page.rows.into_iter().map(|b| batch_view(b, None)).collect();
    Ok(HttpResponse::Ok().json(BatchList {
        batches,
        next_cursor: page.next_cursor,
    }))
}

/// The batch with the item that runs now (the first by index), for `current`.
async fn batch_with_current(
    state: &ApiState,
    scope: Scope<'_>,
    batch: batchd_storage::BatchRecord,
) -> Result<HttpResponse, ApiError> {
    let running = if batch.counts.running > 0 {
        let page = PageRequest { cursor: None, limit: 1 };
        state
            .store
            .list_items(scope, &batch.id, Some(ItemStatus::Running), &page)
            .await?
            .rows
    } else {
        Vec::new()
    };
    Ok(HttpResponse::Ok().json(batch_view(batch, running.first())))
}

/// `GET /v1/batches/{id}`.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "batches",
    operation_id = "get_batch",
    summary = "Read a batch",
    description = "The batch with its counts, progress and the item that runs now.",
    params(
        ("id" = String, Path, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        BatchCallErrors,
    ),
    security(("bearer" = [])),
)]
async fn get(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.get_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

#[utoipa::path(
    post,
    path = "/v1/batches/{id}/cancel",
    tag = "batches",
    operation_id = "cancel_batch",
    summary = "Cancel a batch",
    description = "Cancels the batch's pending items and lets running ones stop; the batch is `cancelling` until \
                   they have. Cancelling a batch that is already `cancelling` answers 200.",
    params(
        ("id" = String, Path, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        BatchCallErrors,
        BatchStateConflict,
    ),
    security(("bearer" = [])),
)]
async fn cancel(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.cancel_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

#[utoipa::path(
    post,
    path = "/v1/batches/{id}/pause",
    tag = "batches",
    operation_id = "pause_batch",
    summary = "Pause a batch",
    description = "No new item of the batch starts until it is resumed; running items finish.",
    params(
        ("id" = String, Path, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        BatchCallErrors,
        BatchStateConflict,
    ),
    security(("bearer" = [])),
)]
async fn pause(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.pause_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

#[utoipa::path(
    post,
    path = "/v1/batches/{id}/resume",
    tag = "batches",
    operation_id = "resume_batch",
    summary = "Resume a batch",
    description = "A paused batch goes back to `running` if it had started, else to `pending`.",
    params(
        ("id" = String, Path, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        BatchCallErrors,
        BatchStateConflict,
    ),
    security(("bearer" = [])),
)]
async fn resume(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.resume_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

#[utoipa::path(
    post,
    path = "/v1/batches/{id}/retry",
    tag = "batches",
    operation_id = "retry_batch",
    summary = "Retry a batch",
    description = "Sends the batch's failed items back to pending with their attempts reset, with the items that \
                   `fail_batch` cancelled; items a user cancelled stay cancelled. A batch with no failed item \
                   answers 409.",
    params(
        ("id" = String, Path, description = "The batch id"),
    ),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        BatchCallErrors,
        BatchStateConflict,
    ),
    security(("bearer" = [])),
)]
async fn retry(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.retry_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

/// The query of `GET /v1/batches/{id}/items`, for the OpenAPI document; [`items`] reads it
/// by hand.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; `items` reads its query with `Query`"
)]
struct ItemFilterParams {
    /// Only items in this status.
    status: Option<ItemStatus>,
}

/// `GET /v1/batches/{id}/items`: by index, with queue positions of pending items.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/items",
    tag = "batches",
    operation_id = "list_batch_items",
    summary = "List a batch's items",
    description = "The batch's items by index, a page at a time, with the queue positions of pending items; \
                   without their input.",
    params(
        ("id" = String, Path, description = "The batch id"),
        ItemFilterParams,
        PageParams,
    ),
    responses(
        (status = 200, description = "A page of items", body = ItemList),
        (status = 400, description = "`validation_error`: a query parameter is not valid; each issue names it",
            body = ErrorBody),
        BatchCallErrors,
    ),
    security(("bearer" = [])),
)]
async fn items(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let mut query = Query::parse(req.query_string())?;
    let status = query.parsed::<ItemStatus>("status");
    let page = query.page();
    query.finish()?;
    let page = state.store.list_items(caller.scope(), &id, status, &page).await?;
    let items = page.rows.into_iter().map(|i| item_view(i, false)).collect();
    Ok(HttpResponse::Ok().json(ItemList {
        items,
        next_cursor: page.next_cursor,
    }))
}

/// The query of `GET /v1/batches/{id}/events`, for the OpenAPI document; [`events`] reads it
/// by hand.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; `events` reads its query with `Query`"
)]
struct EventsParams {
    /// Only events after this `seq`; the next page is `?after=<last seq>`.
    #[param(minimum = 0, default = 0)]
    after: Option<i64>,
    /// Events per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
}

/// `GET /v1/batches/{id}/events?after=<seq>&limit=`: the timeline in `seq` order.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/events",
    tag = "batches",
    operation_id = "list_batch_events",
    summary = "Read a batch's timeline",
    description = "The batch's events after a sequence number, in `seq` order.",
    params(
        ("id" = String, Path, description = "The batch id"),
        EventsParams,
    ),
    responses(
        (status = 200, description = "Events in `seq` order", body = EventList),
        (status = 400, description = "`validation_error`: a query parameter is not valid; each issue names it",
            body = ErrorBody),
        BatchCallErrors,
    ),
    security(("bearer" = [])),
)]
async fn events(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let mut query = Query::parse(req.query_string())?;
    let after = query.integer("after", 0, i64::MAX).unwrap_or(0);
    let limit = query.page().limit;
    query.finish()?;
    let events = state.store.read_events(caller.scope(), &id, after, limit).await?;
    Ok(HttpResponse::Ok().json(EventList {
        events: events.into_iter().map(event_view).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sha2::{Digest, Sha256};

    use super::request_hash;

    #[test]
    fn the_request_hash_is_the_hash_of_the_compact_body() {
        // Stored hashes were taken of `body.to_string()`: a stream of the same bytes keeps an
        // idempotency key's earlier request recognised.
        let body = json!({"queue": "q", "items": [{"input": {"text": "é \"quoted\"", "n": 1.5}}], "metadata": null});
        assert_eq!(
            request_hash(&body),
            hex::encode(Sha256::digest(body.to_string().as_bytes()))
        );
    }
}

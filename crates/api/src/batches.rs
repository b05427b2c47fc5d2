//! `/v1/batches`: submit, read, list, control, and a batch's items and events.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::wire::{BatchList, EventList, ItemList, SubmitResponse};
use batchd_domain::{BatchStatus, Issue, ItemSettings, ItemStatus, merge_config, validate_submission};
use batchd_storage::{BatchFilter, CreateOutcome, NewBatch, NewItem, NewWebhook, PageRequest, Scope};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::params::Query;
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
    .map_err(|issues| ApiError::validation("the batch is not valid", issues))?;
    let queue_defaults = config
        .queues
        .get(&submitted.queue)
        .map(|q| q.defaults.clone())
        .unwrap_or_default();
    // The body with its keys sorted: the same request always hashes the same.
    let request_hash = hex::encode(Sha256::digest(body.to_string().as_bytes()));
    let client_chose_id = submitted.id.is_some();
    let items = submitted
        .items
        .into_iter()
        .map(|item| {
            let merged = merge_config([&queue_defaults, &submitted.config, &item.config]);
            let max_attempts = ItemSettings::from_config(&merged).retry.max_attempts;
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

/// `GET /v1/batches`: the caller's batches, newest first.
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
async fn get(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.get_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

async fn cancel(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.cancel_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

async fn pause(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.pause_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

async fn resume(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.resume_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

async fn retry(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let batch = state.store.retry_batch(caller.scope(), &id).await?;
    batch_with_current(&state, caller.scope(), batch).await
}

/// `GET /v1/batches/{id}/items`: by index, with queue positions of pending items.
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

/// `GET /v1/batches/{id}/events?after=<seq>&limit=`: the timeline in `seq` order.
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

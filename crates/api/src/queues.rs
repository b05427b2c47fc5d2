//! `/v1/queues`: depth, running, throughput and oldest pending age of every queue; pausing
//! and resuming a whole queue (admins).

use actix_web::{HttpResponse, web};
use batchd_domain::wire::{ErrorBody, QueueList, QueueView};
use batchd_storage::QueueStats;
use time::OffsetDateTime;

use crate::auth::Caller;
use crate::{ApiError, ApiState};

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/queues").route(web::get().to(list)))
        .service(web::resource("/v1/queues/{queue}/pause").route(web::post().to(pause)))
        .service(web::resource("/v1/queues/{queue}/resume").route(web::post().to(resume)));
}

/// Every configured queue, and any other queue that still holds items.
async fn views(state: &ApiState) -> Result<Vec<QueueView>, ApiError> {
    let now = OffsetDateTime::now_utc();
    let mut stats: std::collections::BTreeMap<String, QueueStats> = state
        .store
        .queue_stats()
        .await?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    for name in state.config.queues.keys() {
        stats.entry(name.clone()).or_insert_with(|| QueueStats {
            name: name.clone(),
            paused: false,
            depth: 0,
            running: 0,
            needs_input: 0,
            completed_last_minute: 0,
            oldest_pending_at: None,
        });
    }
    Ok(stats
        .into_values()
        .map(|s| QueueView {
            handler: state.config.queues.get(&s.name).map(|q| q.handler.clone()),
            oldest_pending_age_seconds: s.oldest_pending_at.map(|t| (now - t).as_seconds_f64().max(0.0)),
            name: s.name,
            paused: s.paused,
            depth: s.depth,
            running: s.running,
            needs_input: s.needs_input,
            throughput_per_minute: s.completed_last_minute,
        })
        .collect())
}

#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    operation_id = "list_queues",
    summary = "List queues",
    description = "Every configured queue, and any other queue that still holds items, with its depth, running \
                   items, throughput and the age of its oldest pending item.",
    responses(
        (status = 200, description = "The queues, by name", body = QueueList),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list(state: web::Data<ApiState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    Ok(HttpResponse::Ok().json(QueueList {
        queues: views(&state).await?,
    }))
}

async fn set_paused(state: &ApiState, caller: &Caller, queue: &str, paused: bool) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    if !state.config.queues.contains_key(queue) {
        return Err(ApiError::NotFound(format!("no queue `{queue}` is configured")));
    }
    state.store.set_queue_paused(queue, paused).await?;
    let view = views(state).await?.into_iter().find(|q| q.name == queue);
    view.map(|v| HttpResponse::Ok().json(v))
        .ok_or_else(|| ApiError::internal("a configured queue has no view"))
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/pause",
    tag = "queues",
    operation_id = "pause_queue",
    summary = "Pause a queue (admins)",
    description = "No new item of the queue starts until it is resumed; running items finish.",
    params(("queue" = String, Path, description = "The queue name")),
    responses(
        (status = 200, description = "The queue", body = QueueView),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such queue is configured", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn pause(state: web::Data<ApiState>, caller: Caller, queue: web::Path<String>) -> Result<HttpResponse, ApiError> {
    set_paused(&state, &caller, &queue, true).await
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/resume",
    tag = "queues",
    operation_id = "resume_queue",
    summary = "Resume a queue (admins)",
    description = "Items of the queue start again.",
    params(("queue" = String, Path, description = "The queue name")),
    responses(
        (status = 200, description = "The queue", body = QueueView),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such queue is configured", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn resume(
    state: web::Data<ApiState>,
    caller: Caller,
    queue: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_paused(&state, &caller, &queue, false).await
}

//! `GET /v1/batches/{id}/webhooks`: a batch's webhook deliveries with every attempt, so a
//! client can see what its receiver got and when the next attempt is due.

use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::wire::{DeliveryAttemptView, DeliveryList, DeliveryView, ErrorBody};
use batchd_storage::DeliveryRecord;

use crate::auth::Caller;
use crate::openapi::BatchCallErrors;
use crate::params::{PageParams, Query};
use crate::{ApiError, ApiState};

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/batches/{id}/webhooks").route(web::get().to(deliveries)));
}

/// `GET /v1/batches/{id}/webhooks`: deliveries in the order of the batch's events.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/webhooks",
    tag = "batches",
    operation_id = "list_batch_webhooks",
    summary = "List a batch's webhook deliveries",
    description = "The batch's webhook deliveries in the order of its events, each with every attempt so far \
                   (time, HTTP status, latency, error, the first KiB of the answer) and when the next one is due. \
                   The webhook secret is never shown.",
    params(
        ("id" = String, Path, description = "The batch id"),
        PageParams,
    ),
    responses(
        (status = 200, description = "A page of deliveries", body = DeliveryList),
        (status = 400, description = "`validation_error`: a query parameter is not valid; each issue names it",
            body = ErrorBody),
        BatchCallErrors,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn deliveries(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let mut query = Query::parse(req.query_string())?;
    let page = query.page();
    query.finish()?;
    let page = state.store.list_deliveries(caller.scope(), &id, &page).await?;
    Ok(HttpResponse::Ok().json(DeliveryList {
        deliveries: page.rows.into_iter().map(delivery_view).collect(),
        next_cursor: page.next_cursor,
    }))
}

fn delivery_view(d: DeliveryRecord) -> DeliveryView {
    DeliveryView {
        id: d.id,
        event_type: d.event_type,
        item_id: d.item_id,
        status: d.status,
        attempts: d
            .attempts
            .into_iter()
            .map(|a| DeliveryAttemptView {
                attempt: a.attempt,
                at: a.at,
                status_code: a.status_code,
                latency_ms: a.latency_ms,
                error: a.error,
                response_body: a.response_body,
            })
            .collect(),
        next_attempt_at: d.next_attempt_at,
        created_at: d.created_at,
    }
}

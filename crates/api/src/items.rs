//! `/v1/items`: the caller's recent items, one item, cancelling a pending item, and
//! answering one that needs input.

use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::wire::{AnswerRequest, ErrorBody, ItemList, ItemView};
use time::OffsetDateTime;

use crate::auth::Caller;
use crate::params::{PageParams, Query};
use crate::views::item_view;
use crate::{ApiError, ApiState};

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/items").route(web::get().to(recent)))
        .service(web::resource("/v1/items/{id}").route(web::get().to(get)))
        .service(web::resource("/v1/items/{id}/cancel").route(web::post().to(cancel)))
        .service(web::resource("/v1/items/{id}/input").route(web::post().to(answer)));
}

/// `GET /v1/items?since=`: the caller's items of the last 24 hours (or since `since`),
/// oldest first (by their batch's creation, then by index), with queue positions.
#[utoipa::path(
    get,
    path = "/v1/items",
    tag = "items",
    operation_id = "list_recent_items",
    summary = "List recent items",
    description = "The caller's items created since `since` (by default the last 24 hours), oldest first (by \
                   their batch's creation, then by index), a page at a time, with the queue positions of pending \
                   items; without their input.",
    params(RecentItemsParams, PageParams),
    responses(
        (status = 200, description = "A page of items", body = ItemList),
        (status = 400, description = "`validation_error`: a query parameter is not valid; each issue names it",
            body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn recent(state: web::Data<ApiState>, caller: Caller, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let mut query = Query::parse(req.query_string())?;
    let since = query
        .time("since")
        .unwrap_or_else(|| OffsetDateTime::now_utc() - time::Duration::hours(24));
    let page = query.page();
    query.finish()?;
    let page = state.store.list_recent_items(caller.scope(), since, &page).await?;
    let items = page.rows.into_iter().map(|i| item_view(i, false)).collect();
    Ok(HttpResponse::Ok().json(ItemList {
        items,
        next_cursor: page.next_cursor,
    }))
}

/// The query of `GET /v1/items`, for the OpenAPI document; [`recent`] reads it by hand.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; `recent` reads its query with `Query`"
)]
struct RecentItemsParams {
    /// Items created after this time (RFC 3339); by default 24 hours ago.
    since: Option<OffsetDateTime>,
}

/// `GET /v1/items/{id}`: one item, with its input.
#[utoipa::path(
    get,
    path = "/v1/items/{id}",
    tag = "items",
    operation_id = "get_item",
    summary = "Read an item",
    description = "One item, with its input.",
    params(("id" = String, Path, description = "The item id")),
    responses(
        (status = 200, description = "The item, with `input`", body = ItemView),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such item in the caller's tenant", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let item = state.store.get_item(caller.scope(), &id).await?;
    Ok(HttpResponse::Ok().json(item_view(item, true)))
}

/// `POST /v1/items/{id}/cancel`: pending items only; anything else is `409 invalid_state`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/cancel",
    tag = "items",
    operation_id = "cancel_item",
    summary = "Cancel an item",
    description = "Cancels a pending item; an item in any other status answers 409.",
    params(("id" = String, Path, description = "The item id")),
    responses(
        (status = 200, description = "The cancelled item, with `input`", body = ItemView),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such item in the caller's tenant", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the item is not pending; `current_status` says what it is",
            body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn cancel(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let item = state.store.cancel_item(caller.scope(), &id).await?;
    Ok(HttpResponse::Ok().json(item_view(item, true)))
}

/// `POST /v1/items/{id}/input` `{"answer": …}`: an item in `needs_input` goes back to
/// pending with the answer beside its input; any other status is `409 invalid_state`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/input",
    tag = "items",
    operation_id = "answer_item",
    summary = "Answer an item that needs input",
    description = "An item in `needs_input` goes back to pending with the answer beside its input; an item in any \
                   other status answers 409.",
    params(("id" = String, Path, description = "The item id")),
    request_body(content = AnswerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The item, with `input`", body = ItemView),
        (status = 400, description = "`malformed_json`: the body is not JSON; `validation_error`: the body is not \
                                      `{\"answer\": <any JSON>}`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a worker key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such item in the caller's tenant", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the item does not need input; `current_status` says what it is",
            body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over `server.max_body_bytes`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not `application/json`", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn answer(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let body: AnswerRequest = match body.into_inner() {
        serde_json::Value::Object(map) if map.contains_key("answer") && map.len() == 1 => AnswerRequest {
            answer: map.into_iter().next().map(|(_, v)| v).unwrap_or_default(),
        },
        _ => {
            let issue = batchd_domain::Issue::new("answer", "the body must be {\"answer\": <any JSON>}");
            return Err(ApiError::validation("invalid answer", vec![issue]));
        }
    };
    let item = state.store.answer_item(caller.scope(), &id, body.answer).await?;
    Ok(HttpResponse::Ok().json(item_view(item, true)))
}

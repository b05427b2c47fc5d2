//! `/v1/items`: the caller's recent items, one item, cancelling a pending item, and
//! answering one that needs input.

use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::wire::{AnswerRequest, ItemList};
use time::OffsetDateTime;

use crate::auth::Caller;
use crate::params::Query;
use crate::views::item_view;
use crate::{ApiError, ApiState};

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/items").route(web::get().to(recent)))
        .service(web::resource("/v1/items/{id}").route(web::get().to(get)))
        .service(web::resource("/v1/items/{id}/cancel").route(web::post().to(cancel)))
        .service(web::resource("/v1/items/{id}/input").route(web::post().to(answer)));
}

/// `GET /v1/items?since=`: the caller's items of the last 24 hours (or since `since`),
/// oldest first, with queue positions.
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

/// `GET /v1/items/{id}`: one item, with its input.
async fn get(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let item = state.store.get_item(caller.scope(), &id).await?;
    Ok(HttpResponse::Ok().json(item_view(item, true)))
}

/// `POST /v1/items/{id}/cancel`: pending items only; anything else is `409 invalid_state`.
async fn cancel(state: web::Data<ApiState>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let item = state.store.cancel_item(caller.scope(), &id).await?;
    Ok(HttpResponse::Ok().json(item_view(item, true)))
}

/// `POST /v1/items/{id}/input` `{"answer": …}`: an item in `needs_input` goes back to
/// pending with the answer beside its input; any other status is `409 invalid_state`.
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

//! `GET /v1/batches/{id}/events/stream`: the timeline as Server-Sent Events, live. Frames
//! are `id: <seq>`, `event: <type>`, `data: <event JSON>`; a client that reconnects with
//! `Last-Event-ID` gets what came after, with no repeat and no gap; the stream ends once the
//! batch has ended and every event is sent. A comment line every 15 s keeps proxies open.

use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::EventType;
use batchd_domain::wire::{ErrorBody, EventView};
use batchd_storage::{Notice, Scope, Store};
use tokio::sync::{broadcast, mpsc};

use crate::auth::Caller;
use crate::openapi::BatchCallErrors;
use crate::params::Query;
use crate::views::event_view;
use crate::{ApiError, ApiState};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
const PAGE: usize = 500;

/// One frame of the stream as the OpenAPI document describes it: an event with `id`, `event`
/// and `data` fields, as an SSE parser hands it over (before OpenAPI 3.2's `itemSchema`, a
/// `text/event-stream` schema describes each event). Keep-alive comments are not events.
pub(crate) struct SseFrame;

impl utoipa::PartialSchema for SseFrame {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Ref, Type};
        // utoipa has no builder for `contentSchema`; an extension entry serializes the same.
        let data_schema = utoipa::openapi::extensions::Extensions::from_iter([(
            "contentSchema",
            serde_json::json!({"$ref": "#/components/schemas/EventView"}),
        )]);
        ObjectBuilder::new()
            .description(Some(
                "One Server-Sent Event: `id: <seq>`, `event: <type>`, `data: <EventView JSON>`.",
            ))
            .property(
                "id",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[0-9]+$"))
                    .description(Some("The event's `seq`; send it back as `Last-Event-ID` to resume.")),
            )
            .required("id")
            .property("event", Ref::from_schema_name("EventType"))
            .required("event")
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/json")
                    .description(Some("The event as JSON, an `EventView`."))
                    .extensions(Some(data_schema)),
            )
            .required("data")
            .into()
    }
}

impl utoipa::ToSchema for SseFrame {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("SseFrame")
    }

    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        use utoipa::PartialSchema;
        schemas.push((EventView::name().into_owned(), EventView::schema()));
        schemas.push((EventType::name().into_owned(), EventType::schema()));
    }
}

/// The query of the event stream, for the OpenAPI document; [`events_stream`] reads it by hand.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; `events_stream` reads its query with `Query`"
)]
struct StreamParams {
    /// Start after this `seq`; `Last-Event-ID` wins when both are sent.
    #[param(minimum = 0, default = 0)]
    after: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/batches/{id}/events/stream",
    tag = "batches",
    operation_id = "stream_batch_events",
    summary = "Follow a batch's timeline live",
    description = "The batch's events as Server-Sent Events: every event after `after` (or `Last-Event-ID`), \
                   then each new one as it happens. Frames are `id: <seq>`, `event: <type>`, `data: <the event \
                   JSON>` (an `EventView`); a comment line every 15 s keeps proxies open. The stream ends once the \
                   batch has ended and every event is sent; a client that reconnects with `Last-Event-ID` gets \
                   what came after, with no repeat and no gap.",
    params(
        ("id" = String, Path, description = "The batch id"),
        StreamParams,
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0,
            description = "The `id` of the last event received (a sequence number); wins over `after`"),
    ),
    responses(
        (status = 200, description = "A stream of events until the batch has ended",
            content_type = "text/event-stream", body = SseFrame),
        (status = 400, description = "`validation_error`: `after` or `Last-Event-ID` is not a sequence number",
            body = ErrorBody),
        BatchCallErrors,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn events_stream(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    caller.require_client()?;
    let mut query = Query::parse(req.query_string())?;
    let after_query = query.integer("after", 0, i64::MAX);
    query.finish()?;
    let last_event_id = match req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().map(|s| s.trim().parse::<i64>()))
    {
        None => None,
        Some(Ok(Ok(seq))) if seq >= 0 => Some(seq),
        Some(_) => {
            let issue = batchd_domain::Issue::new("Last-Event-ID", "must be the `id` of an event (a sequence number)");
            return Err(ApiError::validation("invalid Last-Event-ID header", vec![issue]));
        }
    };
    let after = last_event_id.or(after_query).unwrap_or(0);
    // Subscribed before the first read, so nothing committed in between is missed; and the
    // batch is looked up now, so a stranger's id answers 404 rather than an empty stream.
    let notices = state.store.subscribe();
    state.store.get_batch(caller.scope(), &id).await?;
    let tenant = match caller.scope() {
        Scope::Tenant(t) => Some(t.to_owned()),
        Scope::All => None,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(pump(state.store.clone(), tenant, id.into_inner(), after, notices, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body))
}

/// Sends every event after `after`, then each new one as it commits, until the batch has
/// ended or the client has gone.
async fn pump(
    store: std::sync::Arc<dyn Store>,
    tenant: Option<String>,
    batch_id: String,
    mut after: i64,
    mut notices: broadcast::Receiver<Notice>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let scope = || tenant.as_deref().map_or(Scope::All, Scope::Tenant);
    loop {
        // Read the status before the events: events of the change that ended the batch
        // commit with it, so they are in the drain below.
        let ended = match store.get_batch(scope(), &batch_id).await {
            Ok(batch) => batch.status.is_terminal(),
            Err(_) => true,
        };
        loop {
            let events = match store.read_events(scope(), &batch_id, after, PAGE).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(batch = %batch_id, %error, "event stream stopped: reading events failed");
                    return;
                }
            };
            let full_page = events.len() == PAGE;
            for event in events {
                after = event.seq;
                if tx.send(Ok(frame(event))).await.is_err() {
                    return;
                }
            }
            if !full_page {
                break;
            }
        }
        if ended {
            return;
        }
        let keep_alive = tokio::time::sleep(KEEP_ALIVE);
        tokio::pin!(keep_alive);
        loop {
            tokio::select! {
                () = &mut keep_alive => {
                    if tx.send(Ok(Bytes::from_static(b": keep-alive\n\n"))).await.is_err() {
                        return;
                    }
                    break;
                }
                () = tx.closed() => return,
                notice = notices.recv() => match notice {
                    Ok(Notice::Events { batch_id: id } | Notice::Control { batch_id: id }) if id == batch_id => break,
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

fn frame(event: batchd_storage::EventRecord) -> Bytes {
    let view = event_view(event);
    let data = serde_json::to_string(&view).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        view.seq, view.event_type
    ))
}

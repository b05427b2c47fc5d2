//! The pull-worker protocol: `POST /v1/queues/{queue}/claim` (a long poll for up to 100
//! items, each leased with its own token), then per item `heartbeat`, `events`, `complete`,
//! `fail` and `needs-input` under `/v1/items/{id}/`.
//!
//! Claims need a worker key (restricted to its `queues`, all pull queues when it lists none)
//! or an admin key, and serve every tenant of the queue. The item calls are authorised by the
//! lease token alone, so a push worker that answered `202 accepted` can report without a key;
//! a token that does not hold the item answers `409 lease_lost` whether the item exists or not
//! (an unknown id too), so a call tells nothing the token does not already prove. When the
//! item's batch was cancelled the call answers `409 item_cancelled` and the item ends
//! cancelled.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use batchd_domain::wire::{
    ClaimItem, ClaimRequest, ClaimResponse, CompleteRequest, ErrorBody, FailRequest, HeartbeatRequest,
    ItemEventRequest, LeaseResponse, NeedsInputRequest, Progress, ReportResponse, WorkerEventType,
};
use batchd_domain::{EventType, Issue, ItemSettings, JsonMap, merge_config};
use batchd_storage::{ClaimedItem, Finish, FinishResult, ItemReport, LeaseState, Notice, Outcome, Scope};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::auth::{Caller, Role};
use crate::{ApiError, ApiState};

/// Items one claim may take.
const MAX_CLAIM_ITEMS: u64 = 100;
/// The longest long poll.
const MAX_WAIT_MS: u64 = 30_000;
/// The shortest and longest lease a worker may ask for.
const LEASE_MS_RANGE: (u64, u64) = (100, 3_600_000);
/// While a long poll waits, how often it looks again without a wake-up (retries coming due
/// publish none).
const LONG_POLL_RECHECK: Duration = Duration::from_millis(500);

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/queues/{queue}/claim").route(web::post().to(claim)))
        .service(web::resource("/v1/items/{id}/heartbeat").route(web::post().to(heartbeat)))
        .service(web::resource("/v1/items/{id}/events").route(web::post().to(events)))
        .service(web::resource("/v1/items/{id}/complete").route(web::post().to(complete)))
        .service(web::resource("/v1/items/{id}/fail").route(web::post().to(fail)))
        .service(web::resource("/v1/items/{id}/needs-input").route(web::post().to(needs_input)));
}

/// `POST /v1/queues/{queue}/claim`.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/claim",
    tag = "workers",
    operation_id = "claim_items",
    summary = "Claim items of a pull queue (workers)",
    description = "Leases up to `max_items` ready items of a `pull` queue, from every tenant, each with its own \
                   `lease_token` and `lease_expires_at`. When none is ready it waits up to `wait_ms` for one \
                   (a long poll) and answers as soon as work arrives, or with an empty list. Renew each lease \
                   with a heartbeat before it expires, or the item goes back to the queue.",
    params(("queue" = String, Path, description = "A configured queue whose handler is `pull`")),
    request_body(content = ClaimRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The claimed items; empty when nothing came within `wait_ms`",
            body = ClaimResponse),
        (status = 400, description = "`validation_error`: a field is out of range, or `queue` is not a pull \
                                      queue; `malformed_json`: the body is not JSON", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a client key, or a worker key not allowed on this queue",
            body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn claim(
    state: web::Data<ApiState>,
    caller: Caller,
    queue: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_worker(&caller)?;
    let queue = queue.into_inner();
    if let Some(allowed) = &caller.queues
        && !allowed.contains(&queue)
    {
        return Err(ApiError::Forbidden(format!(
            "this worker key may not claim from queue `{queue}`"
        )));
    }
    let info = match state.config.queues.get(&queue) {
        Some(info) if info.handler == "pull" => info,
        Some(info) => {
            let issue = Issue::new(
                "queue",
                format!("`{queue}` runs the `{}` handler, not `pull`", info.handler),
            );
            return Err(ApiError::validation("not a pull queue", vec![issue]));
        }
        None => {
            let issue = Issue::new("queue", format!("no queue `{queue}` is configured"));
            return Err(ApiError::validation("not a pull queue", vec![issue]));
        }
    };
    // An empty body takes every default.
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(JsonMap::new())
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(format!("the body is not JSON: {e}")))?
    };
    let request = parse_claim(body)?;
    let lease = request.lease_ms.map_or(info.lease, Duration::from_millis);
    let storage_request = batchd_storage::ClaimRequest {
        queue: queue.clone(),
        max_items: request.max_items as usize,
        lease,
        owner: format!("worker:{}", caller.name),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms);
    // Subscribed before the first claim, so work that commits in between still wakes us.
    let mut notices = state.store.subscribe();
    let mut stopping = state.stopping();
    let claimed = loop {
        let claimed = state.store.claim(&storage_request).await?;
        if !claimed.is_empty() || tokio::time::Instant::now() >= deadline || *stopping.borrow() {
            break claimed;
        }
        let recheck = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + LONG_POLL_RECHECK));
        tokio::pin!(recheck);
        loop {
            tokio::select! {
                () = &mut recheck => break,
                // The server is stopping: one last claim, then answer.
                _ = stopping.changed() => break,
                notice = notices.recv() => match notice {
                    Ok(Notice::Work { queue: q } | Notice::Queue { queue: q }) if q == queue => break,
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        recheck.as_mut().await;
                        break;
                    }
                },
            }
        }
    };
    // Pick-up latency in /metrics, as the in-process pool records it.
    let now = time::OffsetDateTime::now_utc();
    for item in &claimed {
        state.metrics.item_started(&queue, (now - item.ready_at).unsigned_abs());
    }
    let items = claimed
        .into_iter()
        .map(|item| claim_item(item, &info.defaults))
        .collect();
    Ok(HttpResponse::Ok().json(ClaimResponse { items }))
}

/// A stored claim as the worker sees it, its config merged under the queue's.
pub(crate) fn claim_item(item: ClaimedItem, queue_defaults: &JsonMap) -> ClaimItem {
    let config = merge_config([queue_defaults, &item.batch_config, &item.item_config]);
    ClaimItem {
        id: item.id,
        batch_id: item.batch_id,
        index: item.index,
        custom_id: item.custom_id,
        attempt: item.attempt,
        input: item.input,
        answer: item.answer,
        config,
        session_id: item.session_id,
        lease_token: item.lease_token,
        lease_expires_at: item.lease_expires_at,
    }
}

fn require_worker(caller: &Caller) -> Result<(), ApiError> {
    match caller.role {
        Role::Worker | Role::Admin => Ok(()),
        Role::Client => Err(ApiError::Forbidden(
            "the pull-worker endpoints need a worker or admin key".into(),
        )),
    }
}

/// The item calls take the lease token alone; a token sent beside it must be a worker's or an
/// admin's (a client key is refused, an invalid one is 401).
fn authorize_item_call(state: &ApiState, req: &HttpRequest) -> Result<(), ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if header.is_none() && !state.config.auth.is_open() {
        return Ok(());
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let caller = state.config.auth.authenticate(header, now)?;
    require_worker(&caller)
}

/// `POST /v1/items/{id}/heartbeat`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/heartbeat",
    tag = "workers",
    operation_id = "heartbeat_item",
    summary = "Renew an item's lease (workers)",
    description = "Extends the lease by `lease_ms` (the queue's `lease_ms` by default) from now; `step`, `message` \
                   and `progress` are recorded with an `item.step`, `item.progress` or `item.log` event. \
                   Authorised by the lease token; a key, if sent, must be a worker's or an admin's.",
    params(("id" = String, Path, description = "The item id")),
    request_body(content = HeartbeatRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The lease holds until `lease_expires_at`", body = LeaseResponse),
        (status = 400, description = "`validation_error` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a client key", body = ErrorBody),
        (status = 409, description = "`item_cancelled`: the batch was cancelled, stop (the item ends cancelled); \
                                      `lease_lost`: the lease expired or is another's (an unknown item too)",
            body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn heartbeat(
    state: web::Data<ApiState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    authorize_item_call(&state, &req)?;
    let body = parse_heartbeat(body.into_inner())?;
    let lease = match body.lease_ms {
        Some(ms) => Duration::from_millis(ms),
        None => queue_lease(&state, &id).await?,
    };
    let expires = match state.store.renew_lease(&id, &body.lease_token, lease).await? {
        LeaseState::Held(expires) => expires,
        other => return Err(lease_gone(&state, &id, &body.lease_token, other).await),
    };
    if body.step.is_some() || body.message.is_some() || body.progress.is_some() {
        let report = ItemReport {
            event_type: None,
            step: body.step,
            message: body.message,
            progress: body.progress.map(|p| (p.current, p.total)),
            data: None,
        };
        let state_after = state.store.report(&id, &body.lease_token, report).await?;
        if !matches!(state_after, LeaseState::Held(_)) {
            return Err(lease_gone(&state, &id, &body.lease_token, state_after).await);
        }
    }
    Ok(HttpResponse::Ok().json(LeaseResponse {
        lease_expires_at: expires,
    }))
}

/// `POST /v1/items/{id}/events`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/events",
    tag = "workers",
    operation_id = "item_event",
    summary = "Write to a running item's timeline (workers)",
    description = "`type` `step` writes `item.step` (and sets the item's step), `progress` writes `item.progress` \
                   (and sets its progress), `log` writes `item.log` with `message` and `data`. Does not renew \
                   the lease. Authorised by the lease token.",
    params(("id" = String, Path, description = "The item id")),
    request_body(content = ItemEventRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Recorded; the lease holds until `lease_expires_at`", body = LeaseResponse),
        (status = 400, description = "`validation_error` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a client key", body = ErrorBody),
        (status = 409, description = "`item_cancelled` or `lease_lost`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn events(
    state: web::Data<ApiState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    authorize_item_call(&state, &req)?;
    let body = parse_event(body.into_inner())?;
    let event_type = match body.event_type {
        WorkerEventType::Step => EventType::ItemStep,
        WorkerEventType::Progress => EventType::ItemProgress,
        WorkerEventType::Log => EventType::ItemLog,
    };
    let report = ItemReport {
        event_type: Some(event_type),
        step: body.step,
        message: body.message,
        progress: body.progress.map(|p| (p.current, p.total)),
        data: body.data,
    };
    match state.store.report(&id, &body.lease_token, report).await? {
        LeaseState::Held(expires) => Ok(HttpResponse::Ok().json(LeaseResponse {
            lease_expires_at: expires,
        })),
        other => Err(lease_gone(&state, &id, &body.lease_token, other).await),
    }
}

/// `POST /v1/items/{id}/complete`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/complete",
    tag = "workers",
    operation_id = "complete_item",
    summary = "Complete an item (workers)",
    description = "Ends the attempt with `result`. Authorised by the lease token.",
    params(("id" = String, Path, description = "The item id")),
    request_body(content = CompleteRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The item's status now", body = ReportResponse),
        (status = 400, description = "`validation_error` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a client key", body = ErrorBody),
        (status = 409, description = "`item_cancelled` or `lease_lost`: the result is dropped", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn complete(
    state: web::Data<ApiState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    authorize_item_call(&state, &req)?;
    let body = parse_complete(body.into_inner())?;
    finish(
        &state,
        &id,
        body.lease_token,
        Outcome::Completed { result: body.result },
    )
    .await
}

/// `POST /v1/items/{id}/fail`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/fail",
    tag = "workers",
    operation_id = "fail_item",
    summary = "Fail an item's attempt (workers)",
    description = "Ends the attempt with `error`. A `retryable` failure (the default) is retried after the \
                   item's backoff while attempts remain; otherwise the item fails now. Authorised by the lease \
                   token.",
    params(("id" = String, Path, description = "The item id")),
    request_body(content = FailRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The item's status now: `pending` when it will be retried", body = ReportResponse),
        (status = 400, description = "`validation_error` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a client key", body = ErrorBody),
        (status = 409, description = "`item_cancelled` or `lease_lost`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn fail(
    state: web::Data<ApiState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    authorize_item_call(&state, &req)?;
    let body = parse_fail(body.into_inner())?;
    // The backoff of the item's merged config, as the in-process pool uses. An unknown item
    // gets the defaults; the finish below answers lease_lost for it anyway.
    let config = match state.store.get_item(Scope::All, &id).await {
        Ok(item) => {
            let batch_config = match state.store.get_batch(Scope::All, &item.batch_id).await {
                Ok(batch) => batch.config,
                Err(batchd_storage::StoreError::NotFound) => JsonMap::new(),
                Err(e) => return Err(e.into()),
            };
            let queue_defaults = state
                .config
                .queues
                .get(&item.queue)
                .map(|q| q.defaults.clone())
                .unwrap_or_default();
            merge_config([&queue_defaults, &batch_config, &item.config])
        }
        Err(batchd_storage::StoreError::NotFound) => JsonMap::new(),
        Err(e) => return Err(e.into()),
    };
    let outcome = Outcome::Failed {
        error: body.error,
        retryable: body.retryable,
        retry_after: None,
        policy: ItemSettings::from_config(&config).retry,
    };
    finish(&state, &id, body.lease_token, outcome).await
}

/// `POST /v1/items/{id}/needs-input`.
#[utoipa::path(
    post,
    path = "/v1/items/{id}/needs-input",
    tag = "workers",
    operation_id = "item_needs_input",
    summary = "Ask a question about an item (workers)",
    description = "Ends the attempt with the item in `needs_input`; the client's answer puts it back to pending \
                   with the answer beside its input. Authorised by the lease token.",
    params(("id" = String, Path, description = "The item id")),
    request_body(content = NeedsInputRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The item's status now", body = ReportResponse),
        (status = 400, description = "`validation_error` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid", body = ErrorBody),
        (status = 403, description = "`forbidden`: a client key", body = ErrorBody),
        (status = 409, description = "`item_cancelled` or `lease_lost`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn needs_input(
    state: web::Data<ApiState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    authorize_item_call(&state, &req)?;
    let body = parse_needs_input(body.into_inner())?;
    finish(
        &state,
        &id,
        body.lease_token,
        Outcome::NeedsInput {
            question: body.question,
        },
    )
    .await
}

async fn finish(state: &ApiState, id: &str, lease_token: String, outcome: Outcome) -> Result<HttpResponse, ApiError> {
    let finish = Finish {
        item_id: id.to_owned(),
        lease_token,
        outcome,
    };
    let result = state.store.finish(vec![finish]).await?.into_iter().next();
    match result {
        Some(FinishResult::Applied(status)) => Ok(HttpResponse::Ok().json(ReportResponse {
            id: id.to_owned(),
            status,
        })),
        Some(FinishResult::ItemCancelled) => Err(ApiError::ItemCancelled),
        Some(FinishResult::LeaseLost) | None => Err(ApiError::LeaseLost),
    }
}

/// The answer to a call whose lease no longer holds. A cancelled batch's item is ended
/// cancelled here (its worker is told to stop, so nothing else would end it).
async fn lease_gone(state: &ApiState, id: &str, lease_token: &str, lease: LeaseState) -> ApiError {
    match lease {
        LeaseState::Cancelled => {
            let finish = Finish {
                item_id: id.to_owned(),
                lease_token: lease_token.to_owned(),
                outcome: Outcome::Cancelled,
            };
            if let Err(error) = state.store.finish(vec![finish]).await {
                tracing::warn!(item = %id, %error, "cannot end a cancelled item; its lease will expire");
            }
            ApiError::ItemCancelled
        }
        LeaseState::Lost | LeaseState::Held(_) => ApiError::LeaseLost,
    }
}

/// The lease length of the item's queue (the server default for an unknown item: the renewal
/// then answers lease_lost anyway).
async fn queue_lease(state: &ApiState, id: &str) -> Result<Duration, ApiError> {
    let default = Duration::from_secs(30);
    match state.store.get_item(Scope::All, id).await {
        Ok(item) => Ok(state.config.queues.get(&item.queue).map_or(default, |q| q.lease)),
        Err(batchd_storage::StoreError::NotFound) => Ok(default),
        Err(e) => Err(e.into()),
    }
}

/// Reads a body's fields one by one, collecting every issue with its path.
struct Fields {
    map: JsonMap,
    issues: Vec<Issue>,
}

impl Fields {
    fn new(body: Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Self {
                map,
                issues: Vec::new(),
            }),
            _ => Err(ApiError::validation(
                "invalid body",
                vec![Issue::new("", "the body must be a JSON object")],
            )),
        }
    }

    /// The value of a key, null counting as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str, required: bool) -> Option<String> {
        match self.take(key) {
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(Value::String(_)) => {
                self.issues.push(Issue::new(key, "must not be empty"));
                None
            }
            Some(_) => {
                self.issues.push(Issue::new(key, "must be a string"));
                None
            }
            None => {
                if required {
                    self.issues.push(Issue::new(key, "required"));
                }
                None
            }
        }
    }

    fn integer(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        let value = self.take(key)?;
        match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.issues
                    .push(Issue::new(key, format!("must be an integer from {min} to {max}")));
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.take(key)? {
            Value::Bool(b) => Some(b),
            _ => {
                self.issues.push(Issue::new(key, "must be true or false"));
                None
            }
        }
    }

    fn progress(&mut self, key: &str) -> Option<Progress> {
        let value = self.take(key)?;
        match serde_json::from_value::<Progress>(value) {
            Ok(p) if p.current >= 0 && p.total.is_none_or(|t| t >= 0) => Some(p),
            _ => {
                self.issues.push(Issue::new(
                    key,
                    "must be {\"current\": <integer ≥ 0>, \"total\": <integer ≥ 0 or null>}",
                ));
                None
            }
        }
    }

    fn any(&mut self, key: &str) -> Option<Value> {
        self.take(key)
    }

    fn required_any(&mut self, key: &str) -> Value {
        match self.map.remove(key) {
            Some(value) => value,
            None => {
                self.issues.push(Issue::new(key, "required"));
                Value::Null
            }
        }
    }

    fn lease_token(&mut self) -> String {
        self.string("lease_token", true).unwrap_or_default()
    }

    fn lease_ms(&mut self) -> Option<u64> {
        self.integer("lease_ms", LEASE_MS_RANGE.0, LEASE_MS_RANGE.1)
    }

    /// Refuses unknown keys, then any issue found.
    fn finish(mut self) -> Result<(), ApiError> {
        let mut unknown: Vec<String> = self.map.keys().cloned().collect();
        unknown.sort();
        for key in unknown {
            self.issues.push(Issue::new(key, "unknown field"));
        }
        if self.issues.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation("invalid body", self.issues))
        }
    }
}

fn parse_claim(body: Value) -> Result<ClaimRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let request = ClaimRequest {
        max_items: f.integer("max_items", 1, MAX_CLAIM_ITEMS).map_or(1, |n| n as u32),
        wait_ms: f.integer("wait_ms", 0, MAX_WAIT_MS).unwrap_or(0),
        lease_ms: f.lease_ms(),
    };
    f.finish()?;
    Ok(request)
}

fn parse_heartbeat(body: Value) -> Result<HeartbeatRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let request = HeartbeatRequest {
        lease_token: f.lease_token(),
        lease_ms: f.lease_ms(),
        step: f.string("step", false),
        message: f.string("message", false),
        progress: f.progress("progress"),
    };
    f.finish()?;
    Ok(request)
}

fn parse_event(body: Value) -> Result<ItemEventRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let lease_token = f.lease_token();
    let event_type = match f.string("type", true).as_deref() {
        Some("step") => Some(WorkerEventType::Step),
        Some("progress") => Some(WorkerEventType::Progress),
        Some("log") => Some(WorkerEventType::Log),
        Some(other) => {
            f.issues.push(Issue::new(
                "type",
                format!("`{other}` is not one of step, progress, log"),
            ));
            None
        }
        None => None,
    };
    let request = ItemEventRequest {
        lease_token,
        event_type: event_type.unwrap_or(WorkerEventType::Log),
        step: f.string("step", event_type == Some(WorkerEventType::Step)),
        message: f.string("message", false),
        data: f.any("data"),
        progress: f.progress("progress"),
    };
    if event_type == Some(WorkerEventType::Progress)
        && request.progress.is_none()
        && !f.issues.iter().any(|i| i.path == "progress")
    {
        f.issues.push(Issue::new("progress", "required for a progress event"));
    }
    f.finish()?;
    Ok(request)
}

fn parse_complete(body: Value) -> Result<CompleteRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let request = CompleteRequest {
        lease_token: f.lease_token(),
        result: f.any("result").unwrap_or(Value::Null),
    };
    f.finish()?;
    Ok(request)
}

fn parse_fail(body: Value) -> Result<FailRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let lease_token = f.lease_token();
    let error = match f.take("error") {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => {
            f.issues.push(Issue::new("error", "required"));
            String::new()
        }
    };
    let request = FailRequest {
        lease_token,
        error,
        retryable: f.boolean("retryable").unwrap_or(true),
    };
    f.finish()?;
    Ok(request)
}

fn parse_needs_input(body: Value) -> Result<NeedsInputRequest, ApiError> {
    let mut f = Fields::new(body)?;
    let request = NeedsInputRequest {
        lease_token: f.lease_token(),
        question: f.required_any("question"),
    };
    f.finish()?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(error: ApiError) -> Vec<String> {
        match error {
            ApiError::Validation { issues, .. } => issues.into_iter().map(|i| i.path).collect(),
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn claims_take_defaults_and_refuse_out_of_range_values_by_path() {
        assert_eq!(parse_claim(json!({})).expect("valid"), ClaimRequest::default());
        let request = parse_claim(json!({"max_items": 100, "wait_ms": 30000, "lease_ms": 100})).expect("valid");
        assert_eq!(
            (request.max_items, request.wait_ms, request.lease_ms),
            (100, 30_000, Some(100))
        );
        let error = parse_claim(json!({"max_items": 0, "wait_ms": 30001, "lease_ms": 5, "x": 1})).expect_err("invalid");
        assert_eq!(paths(error), ["max_items", "wait_ms", "lease_ms", "x"]);
        assert_eq!(paths(parse_claim(json!([1])).expect_err("not an object")), [""]);
    }

    #[test]
    fn item_calls_need_a_token_and_their_own_fields() {
        assert_eq!(paths(parse_complete(json!({})).expect_err("no token")), ["lease_token"]);
        assert_eq!(
            parse_complete(json!({"lease_token": "t"})).expect("valid").result,
            Value::Null
        );
        let fail = parse_fail(json!({"lease_token": "t", "error": "e"})).expect("valid");
        assert!(fail.retryable, "retryable defaults to true");
        assert_eq!(
            paths(parse_fail(json!({"lease_token": "t", "retryable": "no"})).expect_err("invalid")),
            ["error", "retryable"]
        );
        assert_eq!(
            paths(parse_needs_input(json!({"lease_token": "t"})).expect_err("no question")),
            ["question"]
        );
        assert_eq!(
            paths(parse_event(json!({"lease_token": "t", "type": "shout"})).expect_err("bad type")),
            ["type"]
        );
        assert_eq!(
            paths(parse_event(json!({"lease_token": "t", "type": "progress"})).expect_err("no progress")),
            ["progress"]
        );
        let heartbeat =
            parse_heartbeat(json!({"lease_token": "t", "progress": {"current": 2, "total": 5}})).expect("valid");
        assert_eq!(
            heartbeat.progress,
            Some(Progress {
                current: 2,
                total: Some(5)
            })
        );
        assert_eq!(
            paths(parse_heartbeat(json!({"lease_token": "t", "progress": {"current": -1}})).expect_err("negative")),
            ["progress"]
        );
    }
}

#![doc = include_str!("../README.md")]

mod auth;
mod batches;
mod error;
mod health;
mod items;
mod metrics;
mod openapi;
mod params;
mod queues;
mod ratelimit;
mod request_id;
mod stream;
mod views;
mod webhooks;
mod workers;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpRequest, HttpResponse, web};
use batchd_domain::{JsonMap, Limits};
use batchd_storage::Store;

pub use auth::{AuthConfig, Caller, OPEN_TENANT, Role, sha256_hex};
pub use error::{ApiError, ErrorCode};
pub use metrics::{Metrics, record_http};
pub use ratelimit::{RateLimit, limit_requests};
pub use request_id::{RequestId, X_REQUEST_ID, request_id};

/// What every handler shares, passed as `web::Data<ApiState>`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub config: ApiConfig,
    /// What `/metrics` shows; the server also hands it to the worker pool.
    pub metrics: Arc<Metrics>,
    limiter: Arc<ratelimit::Limiter>,
    /// Set when the server begins to stop: long polls answer at once.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ApiState {
    /// A state over `store`; [`ApiConfig::default`] runs open with the `default` demo queue.
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        Self {
            store,
            config,
            metrics: Arc::new(Metrics::new()),
            limiter: Arc::default(),
            stopping: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Tells waiting requests that the server is stopping: pull-worker long polls answer at
    /// once (with what they have) instead of holding the shutdown up for their `wait_ms`.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }
}

/// What the API needs to know of the server's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub auth: AuthConfig,
    /// The queues items may be submitted to.
    pub queues: BTreeMap<String, QueueInfo>,
    pub limits: Limits,
    /// Requests per caller on `/v1`; `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// `webhooks.allow_private_destinations`: when false, a submitted webhook URL whose host
    /// is a loopback, private or other non-public IP literal (or `localhost`) is refused.
    pub allow_private_webhooks: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        let mut queues = BTreeMap::new();
        queues.insert(
            "default".to_owned(),
            QueueInfo {
                handler: "demo".to_owned(),
                max_items: 10_000,
                defaults: JsonMap::new(),
                lease: Duration::from_secs(30),
            },
        );
        Self {
            auth: AuthConfig::open(),
            queues,
            limits: Limits::default(),
            rate_limit: None,
            allow_private_webhooks: false,
        }
    }
}

/// A configured queue, as the API sees it.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub handler: String,
    /// Items one batch may hold.
    pub max_items: usize,
    /// The queue level of config precedence (its settings and its `defaults` table): where
    /// an item's `max_attempts` comes from when neither it nor its batch sets one.
    pub defaults: JsonMap,
    /// The lease of a claimed item (`lease_ms`), for pull workers that do not ask for one.
    pub lease: Duration,
}

/// Registers batchd's routes. Mount it at the root of an app or in a scope; the app must
/// carry `web::Data<ApiState>` and should wrap [`request_id`].
pub fn configure(cfg: &mut web::ServiceConfig) {
    health::configure(cfg);
    batches::configure(cfg);
    items::configure(cfg);
    queues::configure(cfg);
    workers::configure(cfg);
    webhooks::configure(cfg);
    metrics::configure(cfg);
    openapi::configure(cfg);
}

/// batchd's whole HTTP app: the state, the routes, the [`request_id`] middleware and a
/// default service that answers unknown paths with `404 not_found`.
pub fn app(
    state: web::Data<ApiState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .wrap(from_fn(limit_requests))
        .wrap(from_fn(record_http))
        .wrap(from_fn(request_id))
        .configure(configure)
        .default_service(web::to(not_found))
}

/// The JSON body settings of the API: bodies up to `limit` bytes, and extractor errors in the
/// error shape (`malformed_json`, `payload_too_large`, `unsupported_media_type`).
pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default().limit(limit).error_handler(|error, _req| {
        use actix_web::error::JsonPayloadError;
        let api_error = match &error {
            JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
                ApiError::PayloadTooLarge(error.to_string())
            }
            JsonPayloadError::ContentType => {
                ApiError::UnsupportedMediaType("the body must be application/json".to_owned())
            }
            _ => ApiError::MalformedJson(error.to_string()),
        };
        api_error.into()
    })
}

/// The default service: `404 not_found` in the error shape for any path batchd does not
/// serve.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

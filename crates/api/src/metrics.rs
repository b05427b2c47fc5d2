//! `GET /metrics`: Prometheus metrics in the OpenMetrics text format. HTTP requests are
//! counted by a middleware, item attempts and pick-up latency by the worker pool and webhook
//! attempts by the dispatcher (through the server's observers), and queue gauges are read from the store at scrape time.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::{ApiError, ApiState};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    /// The route pattern (`/v1/batches/{id}`), never the raw path: ids would explode the
    /// number of series.
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ItemLabels {
    queue: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    event_type: String,
    /// `delivered`, `retry` or `failed`.
    outcome: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// batchd's metrics, shared by the API, the middleware and the worker pool.
pub struct Metrics {
    registry: Mutex<Registry>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    attempts: Family<ItemLabels, Counter>,
    attempt_duration: Family<ItemLabels, Histogram, fn() -> Histogram>,
    pickup: Family<QueueLabels, Histogram, fn() -> Histogram>,
    items: Family<ItemLabels, Gauge>,
    depth: Family<QueueLabels, Gauge>,
    oldest: Family<QueueLabels, FloatGauge>,
    paused: Family<QueueLabels, Gauge>,
    completed_last_minute: Family<QueueLabels, Gauge>,
    webhook_attempts: Family<WebhookLabels, Counter>,
    webhook_duration: Family<WebhookLabels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register("batchd_http_requests", "HTTP requests answered", http_requests.clone());
        let http_duration = Family::<HttpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "batchd_http_request_duration_seconds",
            "Time to answer an HTTP request",
            http_duration.clone(),
        );
        let attempts = Family::<ItemLabels, Counter>::default();
        registry.register(
            "batchd_item_attempts",
            "Item attempts ended on this server, by the item's new status",
            attempts.clone(),
        );
        let attempt_duration =
            Family::<ItemLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "batchd_item_duration_seconds",
            "Run time of an item attempt",
            attempt_duration.clone(),
        );
        let pickup = Family::<QueueLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "batchd_pickup_latency_seconds",
            "Time from an item becoming ready to its start on this server",
            pickup.clone(),
        );
        let items = Family::<ItemLabels, Gauge>::default();
        registry.register(
            "batchd_items",
            "Items that have not ended, by queue and status",
            items.clone(),
        );
        let depth = Family::<QueueLabels, Gauge>::default();
        registry.register("batchd_queue_depth", "Pending items of a queue", depth.clone());
        let oldest = Family::<QueueLabels, FloatGauge>::default();
        registry.register(
            "batchd_queue_oldest_pending_age_seconds",
            "Age of a queue's oldest pending item",
            oldest.clone(),
        );
        let paused = Family::<QueueLabels, Gauge>::default();
        registry.register("batchd_queue_paused", "1 while a queue is paused", paused.clone());
        let completed_last_minute = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "batchd_queue_completed_last_minute",
            "Items of a queue completed in the last minute",
            completed_last_minute.clone(),
        );
        let webhook_attempts = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "batchd_webhook_attempts",
            "Webhook delivery attempts made by this server, by event type and outcome (delivered, retry, failed)",
            webhook_attempts.clone(),
        );
        let webhook_duration =
            Family::<WebhookLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "batchd_webhook_attempt_duration_seconds",
            "Time a webhook receiver took to answer an attempt (or to fail)",
            webhook_duration.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            webhook_attempts,
            webhook_duration,
            http_requests,
            http_duration,
            attempts,
            attempt_duration,
            pickup,
            items,
            depth,
            oldest,
            paused,
            completed_last_minute,
        }
    }

    /// An item started `pickup` after it became ready.
    pub fn item_started(&self, queue: &str, pickup: Duration) {
        self.pickup
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .observe(pickup.as_secs_f64());
    }

    /// An attempt ended, leaving its item in `status`.
    pub fn attempt_ended(&self, queue: &str, status: &str, duration: Duration) {
        let labels = ItemLabels {
            queue: queue.to_owned(),
            status: status.to_owned(),
        };
        self.attempts.get_or_create(&labels).inc();
        self.attempt_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
    }

    /// A webhook attempt was recorded with its outcome.
    pub fn webhook_attempt(&self, event_type: &str, outcome: &str, latency: Duration) {
        let labels = WebhookLabels {
            event_type: event_type.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.webhook_attempts.get_or_create(&labels).inc();
        self.webhook_duration
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
    }

    fn http_answered(&self, labels: HttpLabels, duration: Duration) {
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
    }
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)));
}

/// `GET /metrics`: needs no token, like the health checks.
async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let metrics = &state.metrics;
    let now = OffsetDateTime::now_utc();
    for queue in state.store.queue_stats().await? {
        let labels = QueueLabels {
            queue: queue.name.clone(),
        };
        metrics.depth.get_or_create(&labels).set(queue.depth);
        metrics.paused.get_or_create(&labels).set(i64::from(queue.paused));
        metrics
            .completed_last_minute
            .get_or_create(&labels)
            .set(queue.completed_last_minute);
        let age = queue
            .oldest_pending_at
            .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
        metrics.oldest.get_or_create(&labels).set(age);
        for (status, n) in [
            ("pending", queue.depth),
            ("running", queue.running),
            ("needs_input", queue.needs_input),
        ] {
            let labels = ItemLabels {
                queue: queue.name.clone(),
                status: status.to_owned(),
            };
            metrics.items.get_or_create(&labels).set(n);
        }
    }
    let mut text = String::new();
    let registry = metrics
        .registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    encode(&mut text, &registry).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(text))
}

/// Counts every request by method, route pattern and status.
pub async fn record_http(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<ApiState>>().map(|state| state.metrics.clone());
    let method = req.method().as_str().to_owned();
    let response = next.call(req).await?;
    if let Some(metrics) = metrics {
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned());
        let labels = HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        };
        metrics.http_answered(labels, started.elapsed());
    }
    Ok(response)
}

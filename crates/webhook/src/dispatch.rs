//! The dispatcher: sends the rows of the webhook outbox. It claims due deliveries under a
//! lease (so several batchd instances on one database never send the same attempt twice),
//! signs and POSTs each one, records every attempt (status, latency, error, the first KiB of
//! the answer), and decides what comes next: delivered on a 2xx, given up on `410 Gone`, a
//! refused destination or the last attempt, else another attempt after a full-jitter backoff
//! (at least the `Retry-After` of a 429). It wakes on `Notice::Webhooks` and polls as a
//! fallback, for retries that come due and for notices it missed. Deliveries are at least
//! once: a crash between the receiver's 2xx and the record sends that attempt again once the
//! lease expires, with the same `webhook-id`, so receivers drop duplicates by that id.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use batchd_storage::{DeliveryAttempt, DeliveryNext, DueDelivery, Notice, Store};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, broadcast};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::backoff::{parse_retry_after, retry_delay};
use crate::destination::{DestinationError, is_non_public, resolve};
use crate::{Secret, header, sign};

/// How much of a receiver's answer is kept with the attempt.
pub const RESPONSE_EXCERPT_BYTES: usize = 1_024;

/// How the dispatcher runs; [`Default`] is batchd's `[webhooks]` defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct DispatcherConfig {
    /// Also deliver to loopback, private-network and other non-public addresses.
    pub allow_private_destinations: bool,
    /// Attempts of one delivery before it is given up.
    pub max_attempts: u32,
    /// The cap of the first retry's delay; it doubles per attempt.
    pub backoff_base: Duration,
    /// The longest delay between two attempts.
    pub backoff_max: Duration,
    /// Time a receiver has to answer one attempt.
    pub timeout: Duration,
    /// Deliveries in flight at once on this instance.
    pub concurrency: usize,
    /// The fallback poll for due retries and missed notices.
    pub poll_interval: Duration,
    /// Told about every recorded attempt (metrics).
    pub observer: Option<Arc<dyn DeliveryObserver>>,
}

impl std::fmt::Debug for DispatcherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherConfig")
            .field("allow_private_destinations", &self.allow_private_destinations)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            allow_private_destinations: false,
            max_attempts: 12,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3_600),
            timeout: Duration::from_secs(10),
            concurrency: 16,
            poll_interval: Duration::from_secs(1),
            observer: None,
        }
    }
}

impl DispatcherConfig {
    /// The lease of a claimed delivery: the whole attempt fits in it with room to record it.
    /// A record that comes late still applies unless another dispatcher claimed the delivery
    /// again in between; the margin only bounds how long a crashed dispatcher's claim blocks.
    fn lease(&self) -> Duration {
        self.timeout + Duration::from_secs(5)
    }
}

/// Sees each recorded attempt; the server feeds `/metrics` with it.
pub trait DeliveryObserver: Send + Sync + 'static {
    /// `outcome`: `delivered`, `retry` or `failed`.
    fn attempt_recorded(&self, event_type: &str, outcome: &str, latency: Duration);
}

/// Why the dispatcher cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}

/// Starts dispatchers.
#[derive(Debug)]
pub struct Dispatcher;

impl Dispatcher {
    /// Starts sending the outbox of `store` in the background; must be called inside a tokio
    /// runtime. Stop it with [`DispatcherHandle::shutdown`].
    pub fn start(store: Arc<dyn Store>, config: DispatcherConfig) -> Result<DispatcherHandle, DispatchError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect could lead anywhere (an IP literal skips the resolver's check):
            // a 3xx is an answer like any other non-2xx.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: config.allow_private_destinations,
            }))
            .build()
            .map_err(|e| DispatchError::Client(e.to_string()))?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Arc::new(Inner { store, config, client }), stop.clone()));
        Ok(DispatcherHandle { stop, task })
    }
}

/// A running dispatcher.
#[derive(Debug)]
#[must_use = "the dispatcher runs until shut down"]
pub struct DispatcherHandle {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl DispatcherHandle {
    /// Stops claiming, lets attempts in flight finish (each is bounded by the timeout), and
    /// joins every task. An attempt cut short is sent again after its lease expires.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await
            && error.is_panic()
        {
            tracing::error!(%error, "the webhook dispatcher panicked");
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    config: DispatcherConfig,
    client: reqwest::Client,
}

async fn run(inner: Arc<Inner>, stop: CancellationToken) {
    // Subscribed before the first claim: nothing written in between is missed.
    let mut notices = inner.store.subscribe();
    let slots = Arc::new(Semaphore::new(inner.config.concurrency.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        while in_flight.try_join_next().is_some() {}
        let free = slots.available_permits();
        let mut claimed_all_free = false;
        if free > 0 {
            match inner.store.claim_deliveries(free, inner.config.lease()).await {
                Ok(claimed) => {
                    claimed_all_free = claimed.len() == free;
                    for due in claimed {
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            break;
                        };
                        let inner = inner.clone();
                        in_flight.spawn(async move {
                            deliver(&inner, due).await;
                            drop(permit);
                        });
                    }
                }
                Err(error) => tracing::warn!(%error, "claiming webhook deliveries failed; retrying"),
            }
        }
        if claimed_all_free {
            // More may be due: claim again as soon as a slot frees up.
            tokio::select! {
                () = stop.cancelled() => break,
                _ = in_flight.join_next() => continue,
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = wake_up(&mut notices) => {}
            () = tokio::time::sleep(inner.config.poll_interval) => {}
            Some(_) = in_flight.join_next(), if free == 0 => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Returns when a notice says deliveries may be due, having drained the notices already
/// queued: one claim answers them all.
async fn wake_up(notices: &mut broadcast::Receiver<Notice>) {
    loop {
        match notices.recv().await {
            Ok(Notice::Webhooks | Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                while !matches!(
                    notices.try_recv(),
                    Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
                ) {}
                return;
            }
            Ok(_) => {}
            // The store is gone: the poll goes on until shutdown.
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// What one attempt got.
struct Sent {
    status_code: Option<u16>,
    error: Option<String>,
    body: Option<String>,
    retry_after: Option<Duration>,
    /// Sending again cannot help (a refused destination, a secret that cannot sign).
    permanent: bool,
}

impl Sent {
    fn permanent(error: String) -> Self {
        Self {
            status_code: None,
            error: Some(error),
            body: None,
            retry_after: None,
            permanent: true,
        }
    }
}

/// One attempt of one delivery, recorded with what comes next.
async fn deliver(inner: &Inner, due: DueDelivery) {
    let config = &inner.config;
    let attempt = u32::try_from(due.attempts).unwrap_or(0) + 1;
    let at = OffsetDateTime::now_utc();
    let started = Instant::now();
    let sent = send(inner, &due).await;
    let latency = started.elapsed();
    let next = match sent.status_code {
        Some(code) if (200..300).contains(&code) => DeliveryNext::Delivered,
        Some(410) => DeliveryNext::Failed,
        _ if sent.permanent || attempt >= config.max_attempts => DeliveryNext::Failed,
        _ => {
            let jitter = retry_delay(attempt, config.backoff_base, config.backoff_max);
            let delay = sent.retry_after.map_or(jitter, |after| after.max(jitter));
            DeliveryNext::RetryAt(OffsetDateTime::now_utc() + delay)
        }
    };
    let outcome = match next {
        DeliveryNext::Delivered => "delivered",
        DeliveryNext::RetryAt(_) => "retry",
        DeliveryNext::Failed => "failed",
    };
    let host = crate::destination::parse_target(&due.url)
        .map(|t| t.host)
        .unwrap_or_default();
    let latency_ms = i64::try_from(latency.as_millis()).unwrap_or(i64::MAX);
    let retry_in_ms = match next {
        DeliveryNext::RetryAt(when) => Some((when - OffsetDateTime::now_utc()).whole_milliseconds().max(0)),
        _ => None,
    };
    // Never the URL's path or query (they may carry a token), the secret or the signatures.
    if outcome == "delivered" {
        tracing::info!(
            delivery_id = %due.id, batch_id = %due.batch_id, event_type = %due.event_type, attempt, host,
            status = sent.status_code, latency_ms, "webhook delivered"
        );
    } else {
        tracing::warn!(
            delivery_id = %due.id, batch_id = %due.batch_id, event_type = %due.event_type, attempt, host,
            status = sent.status_code, error = sent.error.as_deref().unwrap_or(""), latency_ms, retry_in_ms,
            outcome, "webhook attempt failed"
        );
    }
    let record = DeliveryAttempt {
        at,
        status_code: sent.status_code.map(i32::from),
        latency_ms,
        error: sent.error,
        response_body: sent.body,
    };
    match inner
        .store
        .record_delivery_attempt(&due.id, &due.lease_token, record, next)
        .await
    {
        Ok(true) => {
            if let Some(observer) = &config.observer {
                observer.attempt_recorded(due.event_type.as_str(), outcome, latency);
            }
        }
        Ok(false) => tracing::warn!(
            delivery_id = %due.id, attempt,
            "the delivery's lease expired before its attempt was recorded; it will be sent again"
        ),
        Err(error) => tracing::error!(
            delivery_id = %due.id, attempt, %error,
            "recording a webhook attempt failed; it will be sent again after its lease"
        ),
    }
}

async fn send(inner: &Inner, due: &DueDelivery) -> Sent {
    let resolving = resolve(&due.url, inner.config.allow_private_destinations);
    let Ok(resolved) = tokio::time::timeout(inner.config.timeout, resolving).await else {
        return Sent {
            permanent: false,
            ..Sent::permanent("resolving the webhook host timed out".to_owned())
        };
    };
    match resolved {
        Ok(_) => {}
        // DNS may be down for a moment: that is worth another attempt.
        Err(error @ DestinationError::Unresolved(_)) => {
            return Sent {
                permanent: false,
                ..Sent::permanent(error.to_string())
            };
        }
        Err(error) => return Sent::permanent(error.to_string()),
    }
    let headers = match request_headers(due) {
        Ok(headers) => headers,
        Err(error) => return Sent::permanent(error),
    };
    let response = inner
        .client
        .post(&due.url)
        .headers(headers)
        .body(due.payload.clone())
        .send()
        .await;
    let mut response = match response {
        Ok(response) => response,
        Err(error) => {
            return Sent {
                permanent: false,
                ..Sent::permanent(describe(&error))
            };
        }
    };
    let status = response.status();
    let retry_after = (status.as_u16() == 429)
        .then(|| response.headers().get(RETRY_AFTER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut excerpt = Vec::new();
    let mut read_error = None;
    while excerpt.len() < RESPONSE_EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(error) => {
                read_error = Some(describe(&error));
                break;
            }
        }
    }
    let error = if status.is_success() {
        None
    } else {
        Some(match status.canonical_reason() {
            Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
            None => format!("HTTP {}", status.as_u16()),
        })
    };
    Sent {
        status_code: Some(status.as_u16()),
        error: error.or(read_error.filter(|_| !status.is_success())),
        body: (!excerpt.is_empty()).then(|| excerpt_text(&excerpt)),
        retry_after,
        permanent: false,
    }
}

/// The first [`RESPONSE_EXCERPT_BYTES`] of a body as text, cut at a character boundary.
fn excerpt_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(RESPONSE_EXCERPT_BYTES)]).into_owned();
    let mut end = text.len().min(RESPONSE_EXCERPT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A send error in words, without the URL (whose query may hold a token).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else {
        "the request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

/// Content type, user agent, the message id and time, and the signatures when the batch has
/// a secret (`webhook-id` and `webhook-timestamp` go out unsigned too, for deduplication).
fn request_headers(due: &DueDelivery) -> Result<HeaderMap, String> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut pairs: Vec<(&'static str, String)> = match &due.secret {
        Some(secret) => {
            let secret = Secret::new(secret.as_str()).map_err(|e| format!("the webhook secret cannot sign: {e}"))?;
            sign(&secret, &due.id, timestamp, due.payload.as_bytes()).headers()
        }
        None => vec![
            (header::WEBHOOK_ID, due.id.clone()),
            (header::WEBHOOK_TIMESTAMP, timestamp.to_string()),
        ],
    };
    pairs.push((CONTENT_TYPE.as_str(), "application/json".to_owned()));
    pairs.push((
        USER_AGENT.as_str(),
        concat!("batchd/", env!("CARGO_PKG_VERSION")).to_owned(),
    ));
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(&value).map_err(|_| format!("the `{name}` header is not valid"))?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Resolves hosts for the HTTP client, keeping only the addresses the guard allows, so the
/// connection goes where the check looked even if DNS answers differently the second time.
#[derive(Debug)]
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || !is_non_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(DestinationError::Unresolved(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_keep_the_first_kib_on_a_character_boundary() {
        assert_eq!(excerpt_text(b"ok"), "ok");
        let long = "é".repeat(1_000);
        let cut = excerpt_text(long.as_bytes());
        assert!(cut.len() <= RESPONSE_EXCERPT_BYTES && cut.len() >= RESPONSE_EXCERPT_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}

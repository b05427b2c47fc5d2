//! The client: one async method per endpoint of the v1 API, each returning the wire type the
//! server writes, plus the two ways to follow a batch: polling until it ends
//! ([`Client::wait_until_done`]) and its live timeline as Server-Sent Events
//! ([`Client::events_stream`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use batchd_domain::EventType;
use batchd_domain::wire::{
    AnswerRequest, BatchList, BatchView, DeliveryList, EventList, EventView, ItemList, ItemView, QueueList, QueueView,
    SubmitResponse,
};
use futures_util::{Stream, StreamExt};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ClientError;
use crate::error::from_error_answer;
use crate::request::{BatchQuery, ItemQuery, NewBatch, QueryPairs, RecentItemsQuery};
use crate::sse::{Frame, SseParser};

const REQUEST_ID: &str = "x-request-id";
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
const LAST_EVENT_ID: &str = "Last-Event-ID";
const JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream";

/// How often [`Client::wait_until_done`] asks.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call may take as a whole unless [`Client::with_timeout`] says otherwise. The
/// event stream has none: it lasts as long as the batch.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one batchd server. Cheap to clone: clones share their connection pool.
///
/// With a token every request carries `Authorization: Bearer <token>`; a server with no
/// keys configured (open on loopback) needs none.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<Arc<str>>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The answer to a submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The batch: new, or the one an earlier submit with the same id or key created.
    pub batch: SubmitResponse,
    /// `true` when the server answered `200` (an idempotent replay: nothing new was
    /// created), `false` for `202 Accepted`.
    pub replayed: bool,
}

impl Client {
    /// A client of the server at `base_url` (`http://127.0.0.1:8080`; a path prefix such as
    /// `https://example.com/batchd` is kept). `https` needs the `rustls-tls` feature.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let invalid = |why: &str| ClientError::InvalidRequest(format!("base URL `{base_url}`: {why}"));
        let mut base = Url::parse(base_url).map_err(|error| invalid(&error.to_string()))?;
        match base.scheme() {
            "http" => {}
            "https" if cfg!(feature = "rustls-tls") => {}
            "https" => return Err(invalid("https needs the `rustls-tls` feature of batchd-client")),
            _ => return Err(invalid("the scheme must be http or https")),
        }
        if base.cannot_be_a_base() {
            return Err(invalid("not a base URL"));
        }
        base.set_query(None);
        base.set_fragment(None);
        let http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build()?;
        Ok(Self {
            http,
            base,
            token: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sends `Authorization: Bearer <token>` (an API key or a JWT) with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into().into());
        self
    }

    /// How long one call may take, answer included (30 s by default). The event stream is
    /// not limited.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long one call may take (see [`with_timeout`](Self::with_timeout)).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// `GET /healthz`: the process answers.
    pub async fn health(&self) -> Result<Value, ClientError> {
        self.call(self.request(Method::GET, &["healthz"])).await
    }

    /// `GET /readyz`: the database answers and is migrated; else `503 unavailable` as
    /// [`ClientError::Api`].
    pub async fn ready(&self) -> Result<Value, ClientError> {
        self.call(self.request(Method::GET, &["readyz"])).await
    }

    /// `POST /v1/batches`, with the batch's idempotency key as the `Idempotency-Key` header.
    pub async fn submit(&self, batch: &NewBatch) -> Result<Submitted, ClientError> {
        self.submit_body(batch, batch.idempotency_key_header()).await
    }

    /// `POST /v1/batches` with a body of the caller's making, sent as it is: for bodies
    /// [`NewBatch`] cannot express, such as invalid ones in tests.
    pub async fn submit_json(&self, body: &Value, idempotency_key: Option<&str>) -> Result<Submitted, ClientError> {
        self.submit_body(body, idempotency_key).await
    }

    async fn submit_body(
        &self,
        body: &impl Serialize,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, ClientError> {
        let mut request = self.json_request(Method::POST, &["v1", "batches"], body)?;
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        let (status, batch) = self.exchange::<SubmitResponse>(request).await?;
        Ok(Submitted {
            batch,
            replayed: status == 200,
        })
    }

    /// `GET /v1/batches`: the caller's batches, newest first.
    pub async fn list_batches(&self, query: &BatchQuery) -> Result<BatchList, ClientError> {
        let request = self.request(Method::GET, &["v1", "batches"]).query(&query.pairs()?);
        self.call(request).await
    }

    /// `GET /v1/batches/{id}`.
    pub async fn batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.call(self.request(Method::GET, &["v1", "batches", batch_id])).await
    }

    /// `POST /v1/batches/{id}/cancel`: pending items are cancelled at once, running ones are
    /// asked to stop; `409 invalid_state` once the batch has ended.
    pub async fn cancel_batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.batch_action(batch_id, "cancel").await
    }

    /// `POST /v1/batches/{id}/pause`: no new item of the batch starts.
    pub async fn pause_batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.batch_action(batch_id, "pause").await
    }

    /// `POST /v1/batches/{id}/resume`.
    pub async fn resume_batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.batch_action(batch_id, "resume").await
    }

    /// `POST /v1/batches/{id}/retry`: failed items (and those `fail_batch` cancelled) run
    /// again with fresh attempts.
    pub async fn retry_batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.batch_action(batch_id, "retry").await
    }

    async fn batch_action(&self, batch_id: &str, action: &str) -> Result<BatchView, ClientError> {
        self.call(self.request(Method::POST, &["v1", "batches", batch_id, action]))
            .await
    }

    /// `GET /v1/batches/{id}/items`: by index.
    pub async fn batch_items(&self, batch_id: &str, query: &ItemQuery) -> Result<ItemList, ClientError> {
        let request = self
            .request(Method::GET, &["v1", "batches", batch_id, "items"])
            .query(&query.pairs());
        self.call(request).await
    }

    /// `GET /v1/batches/{id}/events`: the timeline after sequence number `after` (from the
    /// start without one), in `seq` order; the next page is `after` the last `seq`.
    pub async fn batch_events(
        &self,
        batch_id: &str,
        after: Option<i64>,
        limit: Option<u32>,
    ) -> Result<EventList, ClientError> {
        let mut pairs = QueryPairs::default();
        pairs.number("after", after);
        pairs.number("limit", limit);
        let request = self
            .request(Method::GET, &["v1", "batches", batch_id, "events"])
            .query(&pairs.0);
        self.call(request).await
    }

    /// `GET /v1/batches/{id}/webhooks`: the batch's webhook deliveries in event order, each
    /// with its attempts; the next page is `cursor` = the previous page's `next_cursor`.
    pub async fn batch_webhooks(
        &self,
        batch_id: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<DeliveryList, ClientError> {
        let mut pairs = QueryPairs::default();
        if let Some(cursor) = cursor {
            pairs.0.push(("cursor", cursor.to_owned()));
        }
        pairs.number("limit", limit);
        let request = self
            .request(Method::GET, &["v1", "batches", batch_id, "webhooks"])
            .query(&pairs.0);
        self.call(request).await
    }

    /// `GET /v1/batches/{id}/events/stream`: the timeline live, as the server sends it.
    ///
    /// The stream yields the events after `last_event_id` (all of them without one) and
    /// ends when the server closes it, which it does once the batch has ended (or when it
    /// shuts down). After an error it ends too; to go on, open a new one with the `seq` of
    /// the last event received. Keep-alive comments are skipped, and so are frames whose
    /// `event:` is not an event type this client knows.
    pub fn events_stream(&self, batch_id: &str, last_event_id: Option<i64>) -> EventStream {
        let state = StreamState::Connecting {
            client: self.clone(),
            url: self.url(&["v1", "batches", batch_id, "events", "stream"]),
            last_event_id,
        };
        EventStream {
            // Fused: polling an ended stream again answers `None` rather than panicking.
            inner: Box::pin(futures_util::stream::unfold(state, next_event).fuse()),
        }
    }

    /// Polls `GET /v1/batches/{id}` about every 50 ms until the batch is completed, failed
    /// or cancelled, and returns it; [`ClientError::Timeout`] if that takes longer than
    /// `timeout`.
    pub async fn wait_until_done(&self, batch_id: &str, timeout: Duration) -> Result<BatchView, ClientError> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        loop {
            let batch = self.batch(batch_id).await?;
            if batch.status.is_terminal() {
                return Ok(batch);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    batch_id: batch_id.to_owned(),
                    waited: now - started,
                    last_status: batch.status,
                });
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// `GET /v1/items`: the caller's recent items, oldest first, with queue positions.
    pub async fn recent_items(&self, query: &RecentItemsQuery) -> Result<ItemList, ClientError> {
        let request = self.request(Method::GET, &["v1", "items"]).query(&query.pairs()?);
        self.call(request).await
    }

    /// `GET /v1/items/{id}`: one item with its `input`.
    pub async fn item(&self, item_id: &str) -> Result<ItemView, ClientError> {
        self.call(self.request(Method::GET, &["v1", "items", item_id])).await
    }

    /// `POST /v1/items/{id}/cancel`: a pending item only, else `409`.
    pub async fn cancel_item(&self, item_id: &str) -> Result<ItemView, ClientError> {
        self.call(self.request(Method::POST, &["v1", "items", item_id, "cancel"]))
            .await
    }

    /// `POST /v1/items/{id}/input`: answers an item in `needs_input`.
    pub async fn answer_item(&self, item_id: &str, answer: Value) -> Result<ItemView, ClientError> {
        let request = self.json_request(
            Method::POST,
            &["v1", "items", item_id, "input"],
            &AnswerRequest { answer },
        )?;
        self.call(request).await
    }

    /// `GET /v1/queues`: depth, running items and throughput of every queue.
    pub async fn queues(&self) -> Result<QueueList, ClientError> {
        self.call(self.request(Method::GET, &["v1", "queues"])).await
    }

    /// `POST /v1/queues/{queue}/pause` (admin): no item of the queue starts.
    pub async fn pause_queue(&self, queue: &str) -> Result<QueueView, ClientError> {
        self.call(self.request(Method::POST, &["v1", "queues", queue, "pause"]))
            .await
    }

    /// `POST /v1/queues/{queue}/resume` (admin).
    pub async fn resume_queue(&self, queue: &str) -> Result<QueueView, ClientError> {
        self.call(self.request(Method::POST, &["v1", "queues", queue, "resume"]))
            .await
    }

    /// The base URL with these path segments appended, each percent-encoded (an id cannot
    /// reach another path).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `new` refused URLs that cannot be a base, the only ones without segments.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A request with the token and the JSON `Accept`, limited by the call timeout.
    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.authorized(self.http.request(method, self.url(segments)))
            .header(ACCEPT, JSON)
            .timeout(self.timeout)
    }

    pub(crate) fn json_request(
        &self,
        method: Method,
        segments: &[&str],
        body: &impl Serialize,
    ) -> Result<RequestBuilder, ClientError> {
        let body = serde_json::to_vec(body)
            .map_err(|error| ClientError::InvalidRequest(format!("the body does not serialize: {error}")))?;
        Ok(self.request(method, segments).header(CONTENT_TYPE, JSON).body(body))
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub(crate) async fn call<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, ClientError> {
        self.exchange(request).await.map(|(_, body)| body)
    }

    /// Sends the request; a 2xx body decoded as `T` with its status, else the error.
    async fn exchange<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<(u16, T), ClientError> {
        let response = request.send().await?;
        let status = response.status();
        let request_id = request_id(response.headers());
        let body = response.bytes().await?;
        if !status.is_success() {
            return Err(from_error_answer(status.as_u16(), request_id, &body));
        }
        serde_json::from_slice(&body)
            .map(|decoded| (status.as_u16(), decoded))
            .map_err(|source| ClientError::Decode {
                status: status.as_u16(),
                request_id,
                source,
            })
    }

    /// Opens the event stream; a refusal (404, 401…) is read as an error body.
    async fn open_stream(&self, url: Url, last_event_id: Option<i64>) -> Result<Response, ClientError> {
        let mut request = self.authorized(self.http.get(url)).header(ACCEPT, EVENT_STREAM);
        if let Some(seq) = last_event_id {
            request = request.header(LAST_EVENT_ID, seq.to_string());
        }
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let request_id = request_id(response.headers());
        let body = response.bytes().await?;
        Err(from_error_answer(status.as_u16(), request_id, &body))
    }
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// A batch's live timeline from [`Client::events_stream`]: a [`Stream`] of its events in
/// `seq` order (use `futures_util::StreamExt::next`).
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Result<EventView, ClientError>> + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = Result<EventView, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

enum StreamState {
    Connecting {
        client: Client,
        url: Url,
        last_event_id: Option<i64>,
    },
    Open {
        response: Response,
        request_id: Option<String>,
        parser: SseParser,
        /// Parsed from the chunks so far and not yet yielded.
        ready: VecDeque<Result<EventView, ClientError>>,
    },
    Ended,
}

/// One step of the event stream: connect, or yield what the last chunk completed, or read
/// the next chunk. Ends after the server closes the body or after the first error.
async fn next_event(mut state: StreamState) -> Option<(Result<EventView, ClientError>, StreamState)> {
    loop {
        state = match state {
            StreamState::Ended => return None,
            StreamState::Connecting {
                client,
                url,
                last_event_id,
            } => match client.open_stream(url, last_event_id).await {
                Ok(response) => StreamState::Open {
                    request_id: request_id(response.headers()),
                    response,
                    parser: SseParser::default(),
                    ready: VecDeque::new(),
                },
                Err(error) => return Some((Err(error), StreamState::Ended)),
            },
            StreamState::Open {
                mut response,
                request_id,
                mut parser,
                mut ready,
            } => {
                if let Some(next) = ready.pop_front() {
                    let after = if next.is_ok() {
                        StreamState::Open {
                            response,
                            request_id,
                            parser,
                            ready,
                        }
                    } else {
                        StreamState::Ended
                    };
                    return Some((next, after));
                }
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        let frames = parser.feed(&chunk);
                        ready.extend(frames.into_iter().filter_map(|frame| decode_frame(frame, &request_id)));
                        StreamState::Open {
                            response,
                            request_id,
                            parser,
                            ready,
                        }
                    }
                    // An unfinished frame at the end is dropped, as the format says.
                    Ok(None) => StreamState::Ended,
                    Err(error) => return Some((Err(error.into()), StreamState::Ended)),
                }
            }
        }
    }
}

/// A frame's event, or `None` for a frame that is not a timeline event.
fn decode_frame(frame: Frame, request_id: &Option<String>) -> Option<Result<EventView, ClientError>> {
    if let Some(event) = &frame.event
        && event.parse::<EventType>().is_err()
    {
        return None;
    }
    Some(serde_json::from_str(&frame.data).map_err(|source| ClientError::Decode {
        status: 200,
        request_id: request_id.clone(),
        source,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(base).expect("a valid base URL")
    }

    #[test]
    fn paths_are_appended_to_the_base_and_ids_are_encoded() {
        assert_eq!(
            client("http://127.0.0.1:8080").url(&["v1", "batches", "b-1"]).as_str(),
            "http://127.0.0.1:8080/v1/batches/b-1"
        );
        assert_eq!(
            client("http://h/prefix/").url(&["v1", "batches"]).as_str(),
            "http://h/prefix/v1/batches"
        );
        assert_eq!(
            client("http://h/prefix?x=1#f").url(&["healthz"]).as_str(),
            "http://h/prefix/healthz"
        );
        assert_eq!(
            client("http://h").url(&["v1", "items", "../a b/c?d"]).as_str(),
            "http://h/v1/items/..%2Fa%20b%2Fc%3Fd"
        );
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in ["", "127.0.0.1:8080", "ftp://h", "mailto:x@example.com"] {
            let error = Client::new(bad).expect_err("not an http base URL");
            assert!(matches!(error, ClientError::InvalidRequest(_)), "{bad}: {error:?}");
        }
    }

    #[cfg(not(feature = "rustls-tls"))]
    #[test]
    fn https_without_tls_says_which_feature_to_enable() {
        let error = Client::new("https://example.com").expect_err("no TLS");
        assert!(error.to_string().contains("rustls-tls"), "{error}");
    }

    #[test]
    fn the_token_is_not_printed() {
        let printed = format!("{:?}", client("http://h").with_token("s3cret"));
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn frames_of_unknown_types_are_skipped_and_bad_data_is_an_error() {
        let event = r#"{"seq": 3, "batch_id": "b", "item_id": null, "item_index": null,
            "type": "batch.completed", "step": null, "message": null, "data": null,
            "at": "2026-01-31T12:00:00Z"}"#;
        let frame = |event_type: Option<&str>, data: &str| Frame {
            id: Some("3".to_owned()),
            event: event_type.map(str::to_owned),
            data: data.to_owned(),
        };
        let decoded = decode_frame(frame(Some("batch.completed"), event), &None)
            .expect("a timeline event")
            .expect("valid data");
        assert_eq!((decoded.seq, decoded.event_type), (3, EventType::BatchCompleted));
        assert!(decode_frame(frame(None, event), &None).is_some_and(|r| r.is_ok()));
        assert!(decode_frame(frame(Some("ping"), "{}"), &None).is_none());
        let error = decode_frame(frame(Some("item.log"), "not json"), &Some("r1".to_owned()))
            .expect("a timeline event")
            .expect_err("invalid data");
        assert!(matches!(error, ClientError::Decode { status: 200, .. }), "{error:?}");
        assert_eq!(error.request_id(), Some("r1"));
    }
}

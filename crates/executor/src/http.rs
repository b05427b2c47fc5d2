//! The `http` handler: each attempt is POSTed to a worker URL as the claim item JSON, signed
//! like a webhook, and the worker's answer decides how the attempt ended.
//!
//! | answer | attempt |
//! | --- | --- |
//! | 2xx, an object with `status` `completed`, `failed`, `needs_input` or `accepted` | as it says (`result`, `error` + `retryable`, `question`) |
//! | 2xx, any other body | completed, the body (JSON, else its text; null when empty) is the result |
//! | 408, 429, 5xx, a timeout, a connection error | failed, retried after the backoff (429 and 503 honour `Retry-After` in seconds) |
//! | any other status | failed for good |

use std::time::Duration;

use async_trait::async_trait;
use batchd_domain::ItemSettings;
use batchd_domain::wire::ClaimItem;
use batchd_webhook::Secret;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER, USER_AGENT};
use serde_json::Value;

use crate::handler::{Completion, Handler, HandlerError, ItemContext};

/// How much of a worker's error answer goes into the item's error.
const MAX_ERROR_BODY: usize = 500;
/// How long a connection to the worker may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pushes items to a worker URL (`handler = "http"`). One value serves every item of its
/// queue, over one connection pool.
#[derive(Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Secret>,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("url", &self.url.as_str())
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

/// An `http` handler could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpHandlerError {
    #[error("`{url}` is not an http:// or https:// URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl HttpHandler {
    /// A handler that POSTs to `url`, signing with `secret` when there is one. Each request
    /// may take the item's `timeout_ms` (the merged config), like any other attempt.
    pub fn new(url: &str, secret: Option<Secret>) -> Result<Self, HttpHandlerError> {
        let invalid = |reason: &str| HttpHandlerError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        match parsed.scheme() {
            "http" => {}
            "https" if cfg!(feature = "rustls-tls") => {}
            "https" => return Err(invalid("https needs the `rustls-tls` feature of batchd-executor")),
            _ => return Err(invalid("the scheme must be http or https")),
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect would resend (or drop) a signed body somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            url: parsed,
            secret,
        })
    }

    /// The body of the push: the claim item of the attempt.
    fn body(item: &ItemContext) -> ClaimItem {
        ClaimItem {
            id: item.item_id.clone(),
            batch_id: item.batch_id.clone(),
            index: item.index,
            custom_id: item.custom_id.clone(),
            attempt: item.attempt,
            input: item.input.clone(),
            answer: item.answer.clone(),
            config: item.config.clone(),
            session_id: item.session_id.clone(),
            lease_token: item.lease_token.clone(),
            lease_expires_at: item.lease_expires_at,
        }
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        let timeout = ItemSettings::from_config(&item.config).timeout;
        let body = serde_json::to_vec(&Self::body(&item))
            .map_err(|e| HandlerError::permanent(format!("the item does not serialize: {e}")))?;
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("batchd/", env!("CARGO_PKG_VERSION")));
        if let Some(secret) = &self.secret {
            // One message id per attempt: a receiver may drop a duplicate delivery of it.
            let message_id = format!("{}.{}", item.item_id, item.attempt);
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for (name, value) in batchd_webhook::sign(secret, &message_id, now, &body).headers() {
                request = request.header(name, value);
            }
        }
        let response = tokio::select! {
            response = request.body(body).send() => response,
            () = item.cancellation().cancelled() => {
                return Err(HandlerError::transient("cancelled while the worker was called"));
            }
        };
        let response = response.map_err(|e| HandlerError::transient(describe_send_error(&e, timeout)))?;
        let status = response.status();
        let retry_after = retry_after(status, response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| HandlerError::transient(format!("reading the worker's answer failed: {e}")))?;
        answer(status, retry_after, &bytes)
    }
}

/// The attempt's end, from the worker's answer.
fn answer(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Result<Completion, HandlerError> {
    if status.is_success() {
        return read_success(body);
    }
    let message = format!("the worker answered {status}: {}", excerpt(body));
    let retryable =
        status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    Err(match (retryable, retry_after) {
        (true, Some(delay)) => HandlerError::retry_after(message, delay),
        (true, None) => HandlerError::transient(message),
        (false, _) => HandlerError::permanent(message),
    })
}

/// A 2xx body: `{status, ...}` says how the attempt ended; anything else is the result.
fn read_success(body: &[u8]) -> Result<Completion, HandlerError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Completion::Completed(Value::Null));
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(_) => {
            return Ok(Completion::Completed(Value::String(
                String::from_utf8_lossy(body).into_owned(),
            )));
        }
    };
    let status = value.get("status").and_then(Value::as_str);
    match status {
        Some("completed") => Ok(Completion::Completed(
            value.get("result").cloned().unwrap_or(Value::Null),
        )),
        Some("accepted") => Ok(Completion::Accepted),
        Some("needs_input") => Ok(Completion::NeedsInput(
            value.get("question").cloned().unwrap_or(Value::Null),
        )),
        Some("failed") => {
            let error = match value.get("error") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => "the worker reported a failure".to_owned(),
                Some(other) => other.to_string(),
            };
            let retryable = value.get("retryable").and_then(Value::as_bool).unwrap_or(true);
            Err(if retryable {
                HandlerError::transient(error)
            } else {
                HandlerError::permanent(error)
            })
        }
        // Not one of the four: an ordinary result that happens to have a `status` field.
        _ => Ok(Completion::Completed(value)),
    }
}

/// `Retry-After` in seconds on a 429 or 503.
fn retry_after(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let seconds: u64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

fn describe_send_error(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        format!("the worker did not answer within {} ms", timeout.as_millis())
    } else if error.is_connect() {
        format!("cannot connect to the worker: {error}")
    } else {
        format!("the request to the worker failed: {error}")
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]);
    let text = text.trim();
    if body.len() > MAX_ERROR_BODY {
        format!("{text}…")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Retry;
    use serde_json::json;

    fn ok(body: &str) -> Result<Completion, HandlerError> {
        answer(StatusCode::OK, None, body.as_bytes())
    }

    #[test]
    fn a_2xx_body_is_the_result_unless_its_status_says_otherwise() {
        assert_eq!(ok(r#"{"x": 1}"#), Ok(Completion::Completed(json!({"x": 1}))));
        assert_eq!(ok(""), Ok(Completion::Completed(Value::Null)));
        assert_eq!(ok("plain text"), Ok(Completion::Completed(json!("plain text"))));
        assert_eq!(ok("[1,2]"), Ok(Completion::Completed(json!([1, 2]))));
        assert_eq!(
            ok(r#"{"status": "completed", "result": {"y": 2}}"#),
            Ok(Completion::Completed(json!({"y": 2})))
        );
        assert_eq!(
            ok(r#"{"status": "ok", "n": 1}"#),
            Ok(Completion::Completed(json!({"status": "ok", "n": 1})))
        );
        assert_eq!(ok(r#"{"status": "accepted"}"#), Ok(Completion::Accepted));
        assert_eq!(
            ok(r#"{"status": "needs_input", "question": "which?"}"#),
            Ok(Completion::NeedsInput(json!("which?")))
        );
        let failed = ok(r#"{"status": "failed", "error": "no", "retryable": false}"#).expect_err("failed");
        assert_eq!((failed.message.as_str(), failed.retry), ("no", Retry::Permanent));
        let failed = ok(r#"{"status": "failed"}"#).expect_err("failed");
        assert_eq!(failed.retry, Retry::Transient);
    }

    #[test]
    fn statuses_map_to_retries() {
        let err = |status: u16| {
            answer(StatusCode::from_u16(status).expect("a status"), None, b"nope").expect_err("an error status")
        };
        for status in [408, 429, 500, 502, 503] {
            assert_eq!(err(status).retry, Retry::Transient, "{status}");
        }
        for status in [301, 400, 401, 404, 410, 422] {
            assert_eq!(err(status).retry, Retry::Permanent, "{status}");
        }
        assert!(err(500).message.contains("500") && err(500).message.contains("nope"));
        let limited = answer(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(2)), b"").expect_err("429");
        assert_eq!(limited.retry, Retry::After(Duration::from_secs(2)));
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().expect("a header value"));
        assert_eq!(
            retry_after(StatusCode::TOO_MANY_REQUESTS, &headers),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(StatusCode::INTERNAL_SERVER_ERROR, &headers), None);
    }

    #[test]
    fn only_http_urls_are_taken() {
        assert!(HttpHandler::new("http://127.0.0.1:9/work", None).is_ok());
        assert!(HttpHandler::new("ftp://h/x", None).is_err());
        assert!(HttpHandler::new("not a url", None).is_err());
    }
}

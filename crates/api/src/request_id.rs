//! The request-id middleware: every response carries `x-request-id`, every log line of a
//! request carries the same id, and every error leaves in the one error shape. Server errors
//! are logged here, once, with their cause; the client only gets the id to quote.
//!
//! The middleware never clones the request: actix routes by mutating it after the middleware
//! has run, which a live clone would forbid.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use tracing::Instrument;

use crate::error::{Chain, error_body};
use crate::{ApiError, ErrorCode};

/// The header that carries a request's id, in and out.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming request id that is reused.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The id of the current request; handlers take it as an extractor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromRequest for RequestId {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(
            req.extensions()
                .get::<RequestId>()
                .cloned()
                .ok_or_else(|| ApiError::internal("RequestId extracted in an app without the request_id middleware")),
        )
    }
}

/// An incoming id is reused only when it is short and made of URL-safe characters, so it is
/// safe in a header and in a log line.
fn is_valid_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The middleware; wrap an app with `.wrap(actix_web::middleware::from_fn(request_id))`.
pub async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_valid_request_id(value))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    // Valid ids and UUIDs are ASCII, so this never fails; a failure only loses the header.
    let header = HeaderValue::from_str(&id).ok();
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.path(),
    );
    match next.call(req).instrument(span.clone()).await {
        Ok(response) => {
            let mut response = response.map_into_boxed_body();
            let status = response.status();
            let replacement = match response.response().error() {
                Some(error) => {
                    span.in_scope(|| log_failure(error, status));
                    error_shaped(error, status)
                }
                None => {
                    span.in_scope(|| tracing::debug!(status = status.as_u16(), "request done"));
                    None
                }
            };
            if let Some(replacement) = replacement {
                response = response.into_response(replacement);
            }
            if let Some(header) = header {
                response.headers_mut().insert(X_REQUEST_ID, header);
            }
            Ok(response)
        }
        // An error that an inner middleware returned instead of a response: actix renders it
        // further out, so it is wrapped to render in the error shape, with the id.
        Err(error) => {
            span.in_scope(|| log_failure(&error, error.as_response_error().status_code()));
            Err(Escaped { error, header }.into())
        }
    }
}

/// Logs a failed request, once: server errors with their cause, refusals at debug level.
fn log_failure(error: &Error, status: StatusCode) {
    let code = status.as_u16();
    match error.as_error::<ApiError>() {
        Some(api_error) if status.is_server_error() => {
            tracing::error!(status = code, error = %Chain(api_error), "request failed");
        }
        _ if status.is_server_error() => tracing::error!(status = code, %error, "request failed"),
        _ => tracing::debug!(status = code, %error, "request refused"),
    }
}

/// The error-shaped response for an error that is not an [`ApiError`] (one that actix
/// produced itself); `None` for an `ApiError`, which renders itself.
fn error_shaped(error: &Error, status: StatusCode) -> Option<HttpResponse> {
    if error.as_error::<ApiError>().is_some() {
        return None;
    }
    let code = ErrorCode::for_status(status);
    let message = if status.is_server_error() {
        code.generic_message().to_owned()
    } else {
        error.to_string()
    };
    Some(HttpResponse::build(status).json(error_body(code, message)))
}

/// An error that left the inner service as `Err`, carrying the request id.
struct Escaped {
    error: Error,
    header: Option<HeaderValue>,
}

impl std::fmt::Debug for Escaped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Escaped")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Escaped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl ResponseError for Escaped {
    fn status_code(&self) -> StatusCode {
        self.error.as_response_error().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut response = error_shaped(&self.error, status).unwrap_or_else(|| self.error.error_response());
        if let Some(header) = &self.header {
            response.headers_mut().insert(X_REQUEST_ID, header.clone());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_ids_are_reused() {
        assert!(is_valid_request_id("0b7c1f3e-2a4d-4c55-9f00-1234567890ab"));
        assert!(is_valid_request_id("lb:trace_42.a"));
        assert!(!is_valid_request_id(""));
        assert!(!is_valid_request_id("has space"));
        assert!(!is_valid_request_id("new\nline"));
        assert!(!is_valid_request_id(&"a".repeat(MAX_REQUEST_ID_LEN + 1)));
    }
}

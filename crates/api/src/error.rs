//! The API's one error type and its one table from code to HTTP status.
//!
//! Policy: every handler returns `Result<_, ApiError>`. A store error converts with `?`
//! (`From<StoreError>`); anything unexpected becomes [`ApiError::Internal`], whose cause is
//! logged once, with the request id, by the `request_id` middleware and never sent to the
//! client. Errors that actix produces itself are re-rendered by the same middleware through
//! [`ErrorCode::for_status`], so every error response has the same shape.

use std::error::Error as StdError;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use batchd_domain::Issue;
use batchd_domain::wire::{ErrorBody, ErrorDetail};
use batchd_storage::StoreError;

/// Declares [`ErrorCode`] from rows of `Variant => "code", STATUS`: the one table from an
/// error code to its HTTP status.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident => $code:literal, $status:ident;)+) => {
        /// An error's machine-readable code (`error.code` in the body) and its HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order of the table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            /// The code as it appears in `error.code`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)+
                }
            }

            /// The HTTP status an error with this code is answered with.
            pub const fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)+
                }
            }
        }
    };
}

error_codes! {
    /// The body is not JSON, or not the JSON shape the endpoint takes.
    MalformedJson => "malformed_json", BAD_REQUEST;
    /// The body parsed but breaks a rule; every issue is listed with its path.
    ValidationError => "validation_error", BAD_REQUEST;
    /// No token, or one that is not valid.
    Unauthorized => "unauthorized", UNAUTHORIZED;
    /// A valid token whose role may not do this.
    Forbidden => "forbidden", FORBIDDEN;
    /// No such resource in the caller's tenant (another tenant's ids too).
    NotFound => "not_found", NOT_FOUND;
    /// The path exists but not with this method; the `Allow` header lists the methods.
    MethodNotAllowed => "method_not_allowed", METHOD_NOT_ALLOWED;
    /// The state machine refuses the request in the resource's current state.
    InvalidState => "invalid_state", CONFLICT;
    /// An idempotency key or client id reused with a different body.
    IdempotencyConflict => "idempotency_conflict", CONFLICT;
    /// A worker reported on an item whose lease it no longer holds.
    LeaseLost => "lease_lost", CONFLICT;
    /// A worker reported on an item that was cancelled.
    ItemCancelled => "item_cancelled", CONFLICT;
    /// The body is larger than `server.max_body_bytes`.
    PayloadTooLarge => "payload_too_large", PAYLOAD_TOO_LARGE;
    /// The body is not `application/json`.
    UnsupportedMediaType => "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE;
    /// Too many requests; `Retry-After` says when to try again.
    RateLimited => "rate_limited", TOO_MANY_REQUESTS;
    /// A bug or an unexpected failure; the server log has the cause under the request id.
    Internal => "internal", INTERNAL_SERVER_ERROR;
    /// A dependency (the database) is not available; retry later.
    Unavailable => "unavailable", SERVICE_UNAVAILABLE;
}

impl ErrorCode {
    /// The code for an error response that actix produced itself (a body too large, a bad
    /// path parameter): the closest code for its status.
    pub fn for_status(status: StatusCode) -> ErrorCode {
        if let Some(code) = ErrorCode::ALL.iter().copied().find(|code| code.status() == status) {
            return code;
        }
        if status.is_server_error() {
            ErrorCode::Internal
        } else {
            ErrorCode::MalformedJson
        }
    }

    /// A message for a response whose own message must not be shown (server errors).
    pub const fn generic_message(self) -> &'static str {
        match self {
            ErrorCode::Unavailable => "the service is temporarily unavailable; retry later",
            ErrorCode::Internal => "internal error; the server log has the cause under this response's x-request-id",
            _ => "the request failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Every error the API answers with. [`ApiError::code`] maps it to its [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{message}")]
    Validation { message: String, issues: Vec<Issue> },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{} is not allowed here; use {}", .method, allow_list(.allowed))]
    MethodNotAllowed { method: Method, allowed: &'static [Method] },
    /// The state machine refuses; `current_status` goes into the body.
    #[error("{message}")]
    InvalidState {
        message: String,
        current_status: Option<String>,
    },
    #[error("the idempotency key or batch id is already used by a different request")]
    IdempotencyConflict,
    #[error("the lease on this item was lost; the result is dropped")]
    LeaseLost,
    #[error("the item was cancelled; stop working on it")]
    ItemCancelled,
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many requests; retry after {} s", retry_after_secs(.retry_after))]
    RateLimited { retry_after: Duration },
    /// Never shown to the client: the body carries a generic message, the log the source.
    #[error("internal error")]
    Internal(#[source] BoxError),
    /// The message is shown; the source, if any, is only logged.
    #[error("{message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

fn allow_list(methods: &[Method]) -> String {
    methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
}

fn retry_after_secs(retry_after: &Duration) -> u64 {
    // Rounded up: a client that waits the advertised time must not be refused again.
    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)
}

impl ApiError {
    /// An unexpected failure; its cause is logged, never answered.
    pub fn internal(source: impl Into<BoxError>) -> Self {
        ApiError::Internal(source.into())
    }

    /// A request that breaks rules; every issue with its path.
    pub fn validation(message: impl Into<String>, issues: Vec<Issue>) -> Self {
        ApiError::Validation {
            message: message.into(),
            issues,
        }
    }

    /// A dependency is down; `message` says which and is shown to the client.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// The code, and so the HTTP status, of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::MalformedJson(_) => ErrorCode::MalformedJson,
            ApiError::Validation { .. } => ErrorCode::ValidationError,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            ApiError::InvalidState { .. } => ErrorCode::InvalidState,
            ApiError::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            ApiError::LeaseLost => ErrorCode::LeaseLost,
            ApiError::ItemCancelled => ErrorCode::ItemCancelled,
            ApiError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::RateLimited { .. } => ErrorCode::RateLimited,
            ApiError::Internal(_) => ErrorCode::Internal,
            ApiError::Unavailable { .. } => ErrorCode::Unavailable,
        }
    }

    /// The body of this error as the client sees it.
    pub fn body(&self) -> ErrorBody {
        let code = self.code();
        let message = match self {
            ApiError::Internal(_) => code.generic_message().to_owned(),
            other => other.to_string(),
        };
        let mut body = error_body(code, message);
        match self {
            ApiError::Validation { issues, .. } => body.error.issues.clone_from(issues),
            ApiError::InvalidState { current_status, .. } => {
                body.error.current_status.clone_from(current_status);
            }
            _ => {}
        }
        body
    }
}

/// The body of an error with no issues.
pub(crate) fn error_body(code: ErrorCode, message: String) -> ErrorBody {
    ErrorBody {
        error: ErrorDetail {
            code: code.as_str().to_owned(),
            message,
            issues: Vec::new(),
            current_status: None,
        },
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code().status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::RateLimited { retry_after } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs(retry_after)));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                if let Ok(value) = HeaderValue::from_str(&allow_list(allowed)) {
                    response.insert_header((header::ALLOW, value));
                }
            }
            _ => {}
        }
        response.json(self.body())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::NotFound("not found".to_owned()),
            StoreError::InvalidState(refused) => ApiError::InvalidState {
                message: refused.to_string(),
                current_status: Some(refused.current),
            },
            StoreError::IdempotencyConflict => ApiError::IdempotencyConflict,
            StoreError::InvalidCursor => ApiError::validation(
                "invalid cursor",
                vec![Issue::new("cursor", "not a cursor this list handed out")],
            ),
            StoreError::Connection(_) => ApiError::Unavailable {
                message: "the database is not reachable; retry later".to_owned(),
                source: Some(Box::new(error)),
            },
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

/// Displays an error with its chain of sources: `outer: inner: root`.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::to_bytes;

    async fn rendered(error: &ApiError) -> (StatusCode, serde_json::Value) {
        let response = error.error_response();
        let status = response.status();
        let bytes = to_bytes(response.into_body())
            .await
            .expect("an error body is in memory");
        (status, serde_json::from_slice(&bytes).expect("an error body is JSON"))
    }

    #[test]
    fn the_table_gives_every_documented_code_its_status() {
        let expected = [
            ("malformed_json", 400),
            ("validation_error", 400),
            ("unauthorized", 401),
            ("forbidden", 403),
            ("not_found", 404),
            ("method_not_allowed", 405),
            ("invalid_state", 409),
            ("idempotency_conflict", 409),
            ("lease_lost", 409),
            ("item_cancelled", 409),
            ("payload_too_large", 413),
            ("unsupported_media_type", 415),
            ("rate_limited", 429),
            ("internal", 500),
            ("unavailable", 503),
        ];
        let table: Vec<_> = ErrorCode::ALL
            .iter()
            .map(|code| (code.as_str(), code.status().as_u16()))
            .collect();
        assert_eq!(table, expected);
    }

    #[test]
    fn foreign_statuses_map_to_the_closest_code() {
        assert_eq!(
            ErrorCode::for_status(StatusCode::PAYLOAD_TOO_LARGE),
            ErrorCode::PayloadTooLarge
        );
        assert_eq!(ErrorCode::for_status(StatusCode::BAD_REQUEST), ErrorCode::MalformedJson);
        assert_eq!(
            ErrorCode::for_status(StatusCode::URI_TOO_LONG),
            ErrorCode::MalformedJson
        );
        assert_eq!(ErrorCode::for_status(StatusCode::BAD_GATEWAY), ErrorCode::Internal);
        assert_eq!(
            ErrorCode::for_status(StatusCode::SERVICE_UNAVAILABLE),
            ErrorCode::Unavailable
        );
    }

    #[actix_web::test]
    async fn an_internal_error_hides_its_cause() {
        let error = ApiError::internal("password=hunter2 in a connection string");
        let (status, body) = rendered(&error).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal");
        assert_eq!(body["error"]["issues"], serde_json::json!([]));
        assert!(!body.to_string().contains("hunter2"), "{body}");
    }

    #[actix_web::test]
    async fn validation_errors_list_their_issues() {
        let error = ApiError::Validation {
            message: "the batch is not valid".to_owned(),
            issues: vec![Issue::new("items[3].input", "required")],
        };
        let (status, body) = rendered(&error).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "code": "validation_error",
                "message": "the batch is not valid",
                "issues": [{"path": "items[3].input", "message": "required"}],
            }})
        );
    }

    #[actix_web::test]
    async fn store_errors_keep_their_meaning() {
        let refused = batchd_domain::InvalidTransition {
            entity: "batch",
            action: "pause",
            current: "completed".to_owned(),
        };
        let (status, body) = rendered(&ApiError::from(StoreError::InvalidState(refused))).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["error"]["code"], "invalid_state");
        assert_eq!(body["error"]["current_status"], "completed");

        let (status, _) = rendered(&ApiError::from(StoreError::NotFound)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = rendered(&ApiError::from(StoreError::Connection("10.0.0.7 refused".to_owned()))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!body.to_string().contains("10.0.0.7"), "{body}");
        let (status, body) = rendered(&ApiError::from(StoreError::Corrupt("row 7 of items".to_owned()))).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!body.to_string().contains("row 7"), "{body}");
    }

    #[actix_web::test]
    async fn rate_limits_say_when_to_retry() {
        let response = ApiError::RateLimited {
            retry_after: Duration::from_millis(1500),
        }
        .error_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER).map(HeaderValue::as_bytes),
            Some(&b"2"[..])
        );
    }
}

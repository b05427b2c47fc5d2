//! The client's one error type. Every method returns [`ClientError`]: an answer from batchd
//! in its error shape is [`ClientError::Api`], with the code to match on; everything else
//! says whether the request never got an answer, got one that is not batchd's, or was never
//! sent.

use std::time::Duration;

use batchd_domain::BatchStatus;
use batchd_domain::wire::ErrorBody;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// batchd answered with an error (any non-2xx status with its error body): match on
    /// `body.error.code` (`not_found`, `invalid_state`, `validation_error`…).
    #[error("{}", api_message(*.status, .body, .request_id.as_deref()))]
    Api {
        status: u16,
        body: ErrorBody,
        /// The `x-request-id` header, to find the request in the server's logs.
        request_id: Option<String>,
    },
    /// No answer: the connection failed, timed out, or broke while the body was read.
    #[error("the request to batchd failed")]
    Transport(#[from] reqwest::Error),
    /// A non-2xx answer without batchd's error body (a proxy in between, or not batchd).
    #[error("HTTP {status} without batchd's error body: {body}")]
    UnexpectedStatus {
        status: u16,
        request_id: Option<String>,
        /// The start of the body, as text.
        body: String,
    },
    /// A 2xx answer (or a Server-Sent Event) whose body is not the JSON this call expects.
    #[error("batchd answered {status} with a body that is not the expected JSON")]
    Decode {
        status: u16,
        request_id: Option<String>,
        #[source]
        source: serde_json::Error,
    },
    /// [`Client::wait_until_done`](crate::Client::wait_until_done) ran out of time.
    #[error("batch {batch_id} did not finish within {waited:?}; it is {last_status}")]
    Timeout {
        batch_id: String,
        waited: Duration,
        last_status: BatchStatus,
    },
    /// The request could not be built: an invalid base URL, a body that does not serialize,
    /// a time RFC 3339 cannot express.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The HTTP status of an answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::UnexpectedStatus { status, .. } | Self::Decode { status, .. } => {
                Some(*status)
            }
            Self::Transport(error) => error.status().map(|s| s.as_u16()),
            Self::Timeout { .. } | Self::InvalidRequest(_) => None,
        }
    }

    /// batchd's error code (`not_found`, `invalid_state`…) when batchd answered with one.
    pub fn code(&self) -> Option<&str> {
        self.body().map(|body| body.error.code.as_str())
    }

    /// batchd's error body when it answered with one.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            Self::Api { body, .. } => Some(body),
            _ => None,
        }
    }

    /// The `x-request-id` of the answer, if there was one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::Api { request_id, .. }
            | Self::UnexpectedStatus { request_id, .. }
            | Self::Decode { request_id, .. } => request_id.as_deref(),
            _ => None,
        }
    }
}

/// `batchd answered 400 validation_error: the batch is not valid (items[0].input: required)`.
fn api_message(status: u16, body: &ErrorBody, request_id: Option<&str>) -> String {
    let error = &body.error;
    let mut message = format!("batchd answered {status} {}: {}", error.code, error.message);
    if !error.issues.is_empty() {
        let issues: Vec<String> = error
            .issues
            .iter()
            .map(|issue| {
                if issue.path.is_empty() {
                    issue.message.clone()
                } else {
                    format!("{}: {}", issue.path, issue.message)
                }
            })
            .collect();
        message.push_str(&format!(" ({})", issues.join("; ")));
    }
    if let Some(status) = &error.current_status {
        message.push_str(&format!(" [current status: {status}]"));
    }
    if let Some(id) = request_id {
        message.push_str(&format!(" [request id {id}]"));
    }
    message
}

/// The error for a non-2xx answer: batchd's error body if it is one.
pub(crate) fn from_error_answer(status: u16, request_id: Option<String>, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => ClientError::Api {
            status,
            body,
            request_id,
        },
        Err(_) => ClientError::UnexpectedStatus {
            status,
            request_id,
            body: excerpt(body),
        },
    }
}

/// The first 512 bytes of a body as text, for an error message.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 512;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    if body.len() > MAX {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_becomes_api_with_code_issues_and_request_id() {
        let body = br#"{"error": {"code": "validation_error", "message": "the batch is not valid",
            "issues": [{"path": "items[1].input", "message": "required"}, {"path": "", "message": "odd"}]}}"#;
        let error = from_error_answer(400, Some("req-1".to_owned()), body);
        assert_eq!(error.status(), Some(400));
        assert_eq!(error.code(), Some("validation_error"));
        assert_eq!(error.request_id(), Some("req-1"));
        let issues = &error.body().expect("an api error").error.issues;
        assert_eq!(issues[0].path, "items[1].input");
        assert_eq!(
            error.to_string(),
            "batchd answered 400 validation_error: the batch is not valid (items[1].input: required; odd) \
             [request id req-1]"
        );
    }

    #[test]
    fn invalid_state_shows_the_current_status() {
        let body = br#"{"error": {"code": "invalid_state", "message": "cannot pause", "issues": [],
            "current_status": "completed"}}"#;
        let error = from_error_answer(409, None, body);
        assert_eq!(
            error.body().and_then(|b| b.error.current_status.as_deref()),
            Some("completed")
        );
        assert_eq!(
            error.to_string(),
            "batchd answered 409 invalid_state: cannot pause [current status: completed]"
        );
    }

    #[test]
    fn another_body_is_an_unexpected_status_with_an_excerpt() {
        let error = from_error_answer(502, None, b"<html>Bad Gateway</html>");
        assert!(
            matches!(error, ClientError::UnexpectedStatus { status: 502, .. }),
            "{error:?}"
        );
        assert_eq!(error.code(), None);
        assert_eq!(
            error.to_string(),
            "HTTP 502 without batchd's error body: <html>Bad Gateway</html>"
        );

        let long = vec![b'x'; 2_000];
        let ClientError::UnexpectedStatus { body, .. } = from_error_answer(500, None, &long) else {
            panic!("not an error body");
        };
        assert_eq!(body.chars().count(), 513, "512 bytes and an ellipsis");
    }
}

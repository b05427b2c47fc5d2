//! Errors of the webhook crate. Each function returns the one error type it can produce: a
//! secret that cannot be read is a [`SecretError`] when it is built, and a request that does
//! not verify is a [`VerifyError`]. Neither ever carries the secret or a signature, so both
//! can be logged as they are.

/// A signing secret that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret is empty, or is `whsec_` with nothing after it: signing with an empty key
    /// would prove nothing.
    #[error("the signing secret is empty")]
    Empty,
    /// The secret starts with `whsec_` but the rest is not standard base64.
    #[error("the signing secret starts with `whsec_` but the rest is not standard base64")]
    NotBase64,
}

/// Why a signed request was refused. A receiver answers every one of them the same way
/// (typically 401), and logs which one it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A header the scheme needs is absent or empty.
    #[error("the `{name}` header is missing or empty")]
    MissingHeader { name: &'static str },
    /// `webhook-timestamp` is not a whole number of seconds.
    #[error("the `webhook-timestamp` header is not a whole number of seconds")]
    InvalidTimestamp,
    /// The request was signed longer ago than the tolerance allows: a replay, or a clock
    /// that is far behind.
    #[error("the webhook timestamp {timestamp} is too far before the current time {now}")]
    TimestampTooOld { timestamp: i64, now: i64 },
    /// The request claims to be signed further in the future than the tolerance allows.
    #[error("the webhook timestamp {timestamp} is too far after the current time {now}")]
    TimestampTooNew { timestamp: i64, now: i64 },
    /// `webhook-signature` holds no `v1,` entry.
    #[error("the `webhook-signature` header holds no `v1` signature")]
    NoSignature,
    /// No signature in the header matches the body, the headers and the secret.
    #[error("no signature matches")]
    Mismatch,
}

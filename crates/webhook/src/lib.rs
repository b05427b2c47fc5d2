#![doc = include_str!("../README.md")]

mod backoff;
mod destination;
mod dispatch;
mod error;
mod secret;
mod sign;
mod verify;

pub use backoff::{MAX_RETRY_AFTER, backoff_cap, parse_retry_after, retry_delay};
pub use destination::{DestinationError, check_submitted_url, is_non_public};
pub use dispatch::{
    DeliveryObserver, DispatchError, Dispatcher, DispatcherConfig, DispatcherHandle, RESPONSE_EXCERPT_BYTES,
};
pub use error::{SecretError, VerifyError};
pub use secret::Secret;
pub use sign::{Signatures, sign};
pub use verify::{DEFAULT_TOLERANCE, StandardHeaders, verify_standard, verify_x_signature};

/// The names of the headers that carry the signatures, as batchd sends them. HTTP header names
/// are case-insensitive; receivers should look them up that way.
pub mod header {
    /// The message id, the same on every retry of one delivery.
    pub const WEBHOOK_ID: &str = "webhook-id";
    /// The send time in Unix seconds.
    pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
    /// The lowercase hex HMAC-SHA256 of the body.
    pub const X_SIGNATURE: &str = "X-Signature";
}

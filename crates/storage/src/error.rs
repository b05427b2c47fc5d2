//! The storage error. Policy: every store call returns `StoreError`; the variants a caller
//! acts on (not found, invalid state, conflicts) are typed, and database failures carry the
//! source for the log, never for the client.

use batchd_domain::InvalidTransition;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such batch or item in the caller's scope.
    #[error("not found")]
    NotFound,
    /// The state machine refuses the request; carries the current status.
    #[error(transparent)]
    InvalidState(#[from] InvalidTransition),
    /// A replay of an idempotency key or client id with another body, or a batch id that
    /// another tenant has used.
    #[error("the idempotency key or batch id is already used by a different request")]
    IdempotencyConflict,
    /// A pagination cursor this store did not hand out.
    #[error("invalid cursor")]
    InvalidCursor,
    /// A database URL that names no supported backend, or a bad option.
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("cannot connect to the database: {0}")]
    Connection(String),
    #[error("migration failed: {0}")]
    Migration(String),
    /// A stored value that does not parse (a corrupt row or a schema from a newer batchd).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl From<diesel::ConnectionError> for StoreError {
    fn from(e: diesel::ConnectionError) -> Self {
        Self::Connection(e.to_string())
    }
}

impl From<batchd_domain::ParseEnumError> for StoreError {
    fn from(e: batchd_domain::ParseEnumError) -> Self {
        Self::Corrupt(e.to_string())
    }
}

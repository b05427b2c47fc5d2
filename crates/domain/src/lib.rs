#![doc = include_str!("../README.md")]

#[macro_use]
mod macros;
pub mod claim;
mod config;
mod counts;
mod error;
mod event;
mod ids;
mod retry;
mod status;
pub mod transition;
mod validation;
pub mod wire;

pub use config::{ItemSettings, merge_config};
pub use counts::Counts;
pub use error::{InvalidTransition, ParseEnumError};
pub use event::EventType;
pub use ids::{is_valid_client_id, is_valid_queue_name, new_batch_id, new_item_id, new_lease_token};
pub use retry::{FailureDecision, RetryPolicy, decide_failure, truncate_error};
pub use status::{BatchStatus, CancelReason, DeliveryStatus, ItemStatus, Mode, OnItemFailure};
pub use validation::{Issue, Limits, validate_submission};

/// A JSON object: the type of every config map (server, queue, batch and item levels).
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

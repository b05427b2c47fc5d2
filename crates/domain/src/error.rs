//! Errors of the domain crate. Each function returns the one error type it can produce.

use std::fmt;

/// A string that is not one of an enum's spellings; the message lists the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: expected one of {}", .expected.join(", "))]
pub struct ParseEnumError {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

/// A transition the state table does not allow; the state is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a {entity} that is {current}")]
pub struct InvalidTransition {
    pub entity: &'static str,
    pub action: &'static str,
    pub current: String,
}

impl InvalidTransition {
    pub(crate) fn new(entity: &'static str, action: &'static str, current: impl fmt::Display) -> Self {
        Self {
            entity,
            action,
            current: current.to_string(),
        }
    }
}

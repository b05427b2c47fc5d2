//! Query parameters, read by hand so that every bad value is a `validation_error` naming
//! the parameter.

use std::collections::HashMap;

use batchd_domain::Issue;
use batchd_storage::PageRequest;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ApiError;

/// The page size when `limit` is absent, and its ceiling.
pub(crate) const DEFAULT_LIMIT: usize = 100;
pub(crate) const MAX_LIMIT: usize = 1_000;

/// A request's query string, with each read recording any issue.
#[derive(Debug)]
pub(crate) struct Query {
    values: HashMap<String, String>,
    issues: Vec<Issue>,
}

impl Query {
    pub(crate) fn parse(query_string: &str) -> Result<Self, ApiError> {
        let values: Vec<(String, String)> = serde_urlencoded_pairs(query_string)?;
        Ok(Self {
            values: values.into_iter().collect(),
            issues: Vec::new(),
        })
    }

    pub(crate) fn string(&self, key: &str) -> Option<String> {
        self.values.get(key).cloned()
    }

    pub(crate) fn time(&mut self, key: &str) -> Option<OffsetDateTime> {
        let raw = self.values.get(key)?;
        match OffsetDateTime::parse(raw, &Rfc3339) {
            Ok(t) => Some(t),
            Err(_) => {
                self.issues
                    .push(Issue::new(key, "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"));
                None
            }
        }
    }

    pub(crate) fn integer(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
        let raw = self.values.get(key)?;
        match raw.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.issues
                    .push(Issue::new(key, format!("must be an integer from {min} to {max}")));
                None
            }
        }
    }

    pub(crate) fn parsed<T: std::str::FromStr<Err = batchd_domain::ParseEnumError>>(&mut self, key: &str) -> Option<T> {
        let raw = self.values.get(key)?;
        match raw.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.issues
                    .push(Issue::new(key, format!("must be one of {}", e.expected.join(", "))));
                None
            }
        }
    }

    /// `cursor` and `limit` (default 100, at most 1,000).
    pub(crate) fn page(&mut self) -> PageRequest {
        let limit = self
            .integer("limit", 1, MAX_LIMIT as i64)
            .map_or(DEFAULT_LIMIT, |n| n as usize);
        PageRequest {
            cursor: self.string("cursor"),
            limit,
        }
    }

    /// Every issue found, as one `validation_error`.
    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if self.issues.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation("invalid query parameters", self.issues))
        }
    }
}

/// `cursor` and `limit`, as the OpenAPI document declares them; [`Query::page`] reads them.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "declared for the OpenAPI document only; handlers read queries with `Query`"
)]
pub(crate) struct PageParams {
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Rows per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
}

fn serde_urlencoded_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    actix_web::web::Query::<Vec<(String, String)>>::from_query(query)
        .map(actix_web::web::Query::into_inner)
        .map_err(|e| ApiError::validation("invalid query string", vec![Issue::new("", e.to_string())]))
}

//! The pull-worker side of the API: claim items of a pull queue, renew their leases, write to
//! their timeline and report how they ended. A lost lease is a [`ClientError::Api`] with code
//! `lease_lost` or `item_cancelled`; [`ClientError::is_lease_gone`] says "stop working on it".

use std::time::Duration;

use batchd_domain::wire::{
    ClaimItem, ClaimRequest, ClaimResponse, CompleteRequest, FailRequest, HeartbeatRequest, ItemEventRequest,
    LeaseResponse, NeedsInputRequest, Progress, ReportResponse, WorkerEventType,
};
use reqwest::Method;
use serde_json::Value;

use crate::{Client, ClientError};

/// What to claim: up to `max_items` (1-100), waiting up to `wait` (at most 30 s) when none is
/// ready, each leased for `lease` (the queue's `lease_ms` when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimOptions {
    pub max_items: u32,
    pub wait: Duration,
    pub lease: Option<Duration>,
}

impl Default for ClaimOptions {
    fn default() -> Self {
        Self {
            max_items: 1,
            wait: Duration::ZERO,
            lease: None,
        }
    }
}

impl ClaimOptions {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn max_items(mut self, max_items: u32) -> Self {
        self.max_items = max_items;
        self
    }

    /// Long-poll: wait this long for work when none is ready.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }
}

/// What a heartbeat may carry beside the renewal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heartbeat {
    /// The new lease from now; the queue's `lease_ms` when `None`.
    pub lease: Option<Duration>,
    pub step: Option<String>,
    pub message: Option<String>,
    pub progress: Option<Progress>,
}

impl ClientError {
    /// `409 lease_lost`: the lease expired or another worker holds the item now.
    pub fn is_lease_lost(&self) -> bool {
        self.code() == Some("lease_lost")
    }

    /// `409 item_cancelled`: the item's batch was cancelled.
    pub fn is_item_cancelled(&self) -> bool {
        self.code() == Some("item_cancelled")
    }

    /// Either of the two: stop working on the item, its result would be dropped.
    pub fn is_lease_gone(&self) -> bool {
        self.is_lease_lost() || self.is_item_cancelled()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Client {
    /// `POST /v1/queues/{queue}/claim` (a worker or admin key): leased items, an empty list
    /// when none came within the wait. The call may take the wait plus the client's timeout.
    pub async fn claim(&self, queue: &str, options: &ClaimOptions) -> Result<Vec<ClaimItem>, ClientError> {
        let body = ClaimRequest {
            max_items: options.max_items,
            wait_ms: millis(options.wait),
            lease_ms: options.lease.map(millis),
        };
        let request = self
            .json_request(Method::POST, &["v1", "queues", queue, "claim"], &body)?
            .timeout(self.timeout() + options.wait);
        let response: ClaimResponse = self.call(request).await?;
        Ok(response.items)
    }

    /// `POST /v1/items/{id}/heartbeat`: renews the lease; returns when it now ends.
    pub async fn heartbeat(
        &self,
        item_id: &str,
        lease_token: &str,
        heartbeat: &Heartbeat,
    ) -> Result<LeaseResponse, ClientError> {
        let body = HeartbeatRequest {
            lease_token: lease_token.to_owned(),
            lease_ms: heartbeat.lease.map(millis),
            step: heartbeat.step.clone(),
            message: heartbeat.message.clone(),
            progress: heartbeat.progress,
        };
        self.item_call(item_id, "heartbeat", &body).await
    }

    /// `POST /v1/items/{id}/events`: writes a step, progress or log event to the item's
    /// timeline.
    pub async fn item_event(&self, item_id: &str, event: &ItemEventRequest) -> Result<LeaseResponse, ClientError> {
        self.item_call(item_id, "events", event).await
    }

    /// An `item.log` event with this message (the common case of [`item_event`](Self::item_event)).
    pub async fn item_log(
        &self,
        item_id: &str,
        lease_token: &str,
        message: impl Into<String>,
    ) -> Result<LeaseResponse, ClientError> {
        let event = ItemEventRequest {
            lease_token: lease_token.to_owned(),
            event_type: WorkerEventType::Log,
            step: None,
            message: Some(message.into()),
            data: None,
            progress: None,
        };
        self.item_event(item_id, &event).await
    }

    /// `POST /v1/items/{id}/complete`.
    pub async fn complete(
        &self,
        item_id: &str,
        lease_token: &str,
        result: Value,
    ) -> Result<ReportResponse, ClientError> {
        let body = CompleteRequest {
            lease_token: lease_token.to_owned(),
            result,
        };
        self.item_call(item_id, "complete", &body).await
    }

    /// `POST /v1/items/{id}/fail`: retried after the item's backoff when `retryable` and
    /// attempts remain.
    pub async fn fail(
        &self,
        item_id: &str,
        lease_token: &str,
        error: impl Into<String>,
        retryable: bool,
    ) -> Result<ReportResponse, ClientError> {
        let body = FailRequest {
            lease_token: lease_token.to_owned(),
            error: error.into(),
            retryable,
        };
        self.item_call(item_id, "fail", &body).await
    }

    /// `POST /v1/items/{id}/needs-input`.
    pub async fn needs_input(
        &self,
        item_id: &str,
        lease_token: &str,
        question: Value,
    ) -> Result<ReportResponse, ClientError> {
        let body = NeedsInputRequest {
            lease_token: lease_token.to_owned(),
            question,
        };
        self.item_call(item_id, "needs-input", &body).await
    }

    async fn item_call<T: serde::de::DeserializeOwned>(
        &self,
        item_id: &str,
        action: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let request = self.json_request(Method::POST, &["v1", "items", item_id, action], body)?;
        self.call(request).await
    }
}

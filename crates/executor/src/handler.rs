//! The `Handler` trait, what a handler sees of its item, and what it answers.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use batchd_domain::{EventType, JsonMap, Mode};
use batchd_storage::{ItemReport, LeaseState, Store, StoreError};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The work of one queue. One handler value serves every item of its queues, concurrently.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of one item.
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError>;

    /// Opens the shared context of a sequential batch, before its first item runs (and again
    /// after an item released it). The default has none.
    async fn open_batch_context(&self, _batch: &BatchInfo) -> Result<Option<BatchContext>, HandlerError> {
        Ok(None)
    }

    /// Releases a shared context after the batch's last item, or after an item whose input
    /// says `"release_context": true`.
    async fn close_batch_context(&self, _batch: &BatchInfo, _context: BatchContext) {}
}

/// A sequential batch's shared resource (a browser session, a connection); the handler
/// downcasts it to its own type.
pub type BatchContext = Arc<dyn Any + Send + Sync>;

/// What a handler knows of the batch whose context it opens or closes.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    pub batch_id: String,
    pub session_id: Option<String>,
    pub config: JsonMap,
}

/// How an attempt succeeded.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Done, with this result.
    Completed(Value),
    /// The item waits for an answer to this question.
    NeedsInput(Value),
    /// Someone else now holds the attempt (an `http` worker that answered
    /// `202 {"status":"accepted"}`): the pool stops renewing the lease and records nothing;
    /// the item stays running until that worker reports with the lease token, or its lease
    /// expires and the item is put back.
    Accepted,
}

/// Why an attempt failed, and whether to try again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    pub retry: Retry,
}

/// Whether a failed attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry after the queue's backoff (while attempts remain).
    Transient,
    /// Retry after this delay (while attempts remain), e.g. a rate limit's Retry-After.
    After(Duration),
    /// Do not retry: the item fails now.
    Permanent,
}

impl HandlerError {
    /// A failure worth retrying after the backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: Retry::Transient,
        }
    }

    /// A failure no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: Retry::Permanent,
        }
    }

    /// A failure to retry after a given delay.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        Self {
            message: message.into(),
            retry: Retry::After(delay),
        }
    }
}

/// One attempt of one item, as its handler sees it.
#[derive(Clone)]
pub struct ItemContext {
    pub item_id: String,
    pub batch_id: String,
    pub queue: String,
    pub index: i32,
    pub custom_id: Option<String>,
    /// The attempt being run, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
    pub input: Value,
    /// The answer to the item's question, once given.
    pub answer: Option<Value>,
    /// Item > batch > queue > server config, merged by key.
    pub config: JsonMap,
    pub session_id: Option<String>,
    pub mode: Mode,
    /// The item's lease token: the idempotency key of this attempt's reports.
    pub lease_token: String,
    /// When the lease ends unless renewed (the pool renews it while the handler runs).
    pub lease_expires_at: time::OffsetDateTime,
    batch_context: Option<BatchContext>,
    cancel: CancellationToken,
    reporter: Reporter,
}

impl std::fmt::Debug for ItemContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemContext")
            .field("item_id", &self.item_id)
            .field("batch_id", &self.batch_id)
            .field("index", &self.index)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl ItemContext {
    pub(crate) fn new(
        claimed: batchd_storage::ClaimedItem,
        config: JsonMap,
        batch_context: Option<BatchContext>,
        cancel: CancellationToken,
        store: Arc<dyn Store>,
    ) -> Self {
        let reporter = Reporter {
            store,
            item_id: claimed.id.clone(),
            lease_token: claimed.lease_token.clone(),
            cancel: cancel.clone(),
        };
        Self {
            item_id: claimed.id,
            batch_id: claimed.batch_id,
            queue: claimed.queue,
            index: claimed.index,
            custom_id: claimed.custom_id,
            attempt: claimed.attempt,
            max_attempts: claimed.max_attempts,
            input: claimed.input,
            answer: claimed.answer,
            config,
            session_id: claimed.session_id,
            mode: claimed.mode,
            lease_token: claimed.lease_token,
            lease_expires_at: claimed.lease_expires_at,
            batch_context,
            cancel,
            reporter,
        }
    }

    /// The batch's shared context (sequential batches whose handler opens one).
    pub fn batch_context(&self) -> Option<&BatchContext> {
        self.batch_context.as_ref()
    }

    /// Fires when the item's batch is cancelled, the lease is lost, or the attempt timed out
    /// or is handed back at shutdown: stop as soon as you can.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports the step the item is on (`item.step`).
    pub async fn step(&self, step: impl Into<String>) -> Result<(), ReportError> {
        self.reporter
            .send(ItemReport {
                step: Some(step.into()),
                ..Default::default()
            })
            .await
    }

    /// Reports progress, e.g. query 3 of 10 (`item.progress`).
    pub async fn progress(&self, current: i64, total: Option<i64>, message: Option<String>) -> Result<(), ReportError> {
        let report = ItemReport {
            progress: Some((current, total)),
            message,
            ..Default::default()
        };
        self.reporter.send(report).await
    }

    /// Writes a log line to the timeline (`item.log`).
    pub async fn log(&self, message: impl Into<String>) -> Result<(), ReportError> {
        let report = ItemReport {
            event_type: Some(EventType::ItemLog),
            message: Some(message.into()),
            ..Default::default()
        };
        self.reporter.send(report).await
    }

    /// Writes event data to the timeline (`item.log` with data).
    pub async fn event(&self, message: Option<String>, data: Value) -> Result<(), ReportError> {
        let report = ItemReport {
            event_type: Some(EventType::ItemLog),
            message,
            data: Some(data),
            ..Default::default()
        };
        self.reporter.send(report).await
    }
}

/// A report could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The item's batch was cancelled or its lease lost: stop.
    #[error("the item no longer runs here (cancelled or lease lost)")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
struct Reporter {
    store: Arc<dyn Store>,
    item_id: String,
    lease_token: String,
    cancel: CancellationToken,
}

impl Reporter {
    async fn send(&self, report: ItemReport) -> Result<(), ReportError> {
        match self.store.report(&self.item_id, &self.lease_token, report).await? {
            LeaseState::Held(_) => Ok(()),
            LeaseState::Cancelled | LeaseState::Lost => {
                self.cancel.cancel();
                Err(ReportError::Stopped)
            }
        }
    }
}

/// Handlers by name; queues name theirs in config (`handler = "demo"`).
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl HandlerRegistry {
    /// A registry with the built-in `demo` handler (`http` handlers are registered per queue,
    /// as each has its own URL and secret).
    pub fn with_builtins() -> Self {
        let mut registry = Self::default();
        registry.register("demo", crate::DemoHandler);
        registry
    }

    /// Registers (or replaces) a handler under a name.
    pub fn register(&mut self, name: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.handlers.contains_key(name)
    }
}

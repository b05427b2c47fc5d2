//! What the client sends: a batch to submit, built up field by field and serialized to
//! exactly the submit body (absent options are left out, so the server's defaults apply),
//! and the filters of the list calls.

use batchd_domain::{BatchStatus, EventType, ItemStatus, JsonMap, Mode, OnItemFailure};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ClientError;

/// A batch to submit with [`Client::submit`](crate::Client::submit).
///
/// ```
/// use batchd_client::{Mode, NewBatch, NewItem};
/// use serde_json::json;
///
/// let batch = NewBatch::new("default")
///     .item(json!({"sleep_ms": 5}))
///     .push_item(NewItem::new(json!({"sleep_ms": 10})).custom_id("second"))
///     .mode(Mode::Sequential)
///     .idempotency_key("import-2026-01-31");
/// assert_eq!(batch.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewBatch {
    queue: String,
    items: Vec<NewItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_item_failure: Option<OnItemFailure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    run_at: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<JsonMap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<NewWebhook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    /// Sent as the `Idempotency-Key` header, not in the body.
    #[serde(skip)]
    idempotency_key: Option<String>,
}

impl NewBatch {
    /// An empty batch for `queue` (`default` is the demo queue every server has unless its
    /// config redefines it).
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            items: Vec::new(),
            id: None,
            session_id: None,
            mode: None,
            on_item_failure: None,
            priority: None,
            run_at: None,
            config: None,
            webhook: None,
            metadata: None,
            idempotency_key: None,
        }
    }

    /// Adds an item with this input.
    pub fn item(self, input: Value) -> Self {
        self.push_item(NewItem::new(input))
    }

    /// Adds one item per input.
    pub fn items(mut self, inputs: impl IntoIterator<Item = Value>) -> Self {
        self.items.extend(inputs.into_iter().map(NewItem::new));
        self
    }

    /// Adds an item with its own `custom_id` or `config`.
    pub fn push_item(mut self, item: NewItem) -> Self {
        self.items.push(item);
        self
    }

    /// The batch's own id (1–128 of `A-Z a-z 0-9 . _ : -`); submitting the same id with the
    /// same body again answers the existing batch.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn session_id(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    pub fn on_item_failure(mut self, on_item_failure: OnItemFailure) -> Self {
        self.on_item_failure = Some(on_item_failure);
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// No item starts before this time.
    pub fn run_at(mut self, run_at: OffsetDateTime) -> Self {
        self.run_at = Some(run_at);
        self
    }

    /// Batch-level config, merged over the queue's and under each item's.
    pub fn config(mut self, config: JsonMap) -> Self {
        self.config = Some(config);
        self
    }

    pub fn webhook(mut self, webhook: NewWebhook) -> Self {
        self.webhook = Some(webhook);
        self
    }

    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Sent as the `Idempotency-Key` header: a repeated submit with the same key and body
    /// answers the batch the first one created.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// How many items the batch has so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn idempotency_key_header(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
}

/// One item of a [`NewBatch`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewItem {
    input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<JsonMap>,
}

impl NewItem {
    pub fn new(input: Value) -> Self {
        Self {
            input,
            custom_id: None,
            config: None,
        }
    }

    /// The caller's own name for the item, shown beside it everywhere.
    pub fn custom_id(mut self, custom_id: impl Into<String>) -> Self {
        self.custom_id = Some(custom_id.into());
        self
    }

    /// Item-level config, the highest level of the merge.
    pub fn config(mut self, config: JsonMap) -> Self {
        self.config = Some(config);
        self
    }
}

/// A batch's webhook: where its events are POSTed, signed with `secret` when one is given.
#[derive(Clone, PartialEq, Serialize)]
pub struct NewWebhook {
    url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<Vec<EventType>>,
}

impl NewWebhook {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            secret: None,
            events: None,
        }
    }

    /// Signs each delivery (a `whsec_` secret is used decoded).
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// The event types to deliver; without this the server's default set.
    pub fn events(mut self, events: impl IntoIterator<Item = EventType>) -> Self {
        self.events = Some(events.into_iter().collect());
        self
    }
}

impl std::fmt::Debug for NewWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewWebhook")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("events", &self.events)
            .finish()
    }
}

/// The filters of [`Client::list_batches`](crate::Client::list_batches); the default lists
/// every batch of the caller, newest first, 100 per page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchQuery {
    status: Option<String>,
    queue: Option<String>,
    session_id: Option<String>,
    created_after: Option<OffsetDateTime>,
    cursor: Option<String>,
    limit: Option<u32>,
}

impl BatchQuery {
    pub fn new() -> Self {
        Self::default()
    }

    /// Only batches in this status.
    pub fn status(mut self, status: BatchStatus) -> Self {
        self.status = Some(status.to_string());
        self
    }

    /// Only batches that have not ended: pending, running, paused or cancelling.
    pub fn active(mut self) -> Self {
        self.status = Some("active".to_owned());
        self
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    pub fn session_id(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    pub fn created_after(mut self, time: OffsetDateTime) -> Self {
        self.created_after = Some(time);
        self
    }

    /// The page after the one whose `next_cursor` this is.
    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    /// Page size: 100 by default, at most 1,000.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    pub(crate) fn pairs(&self) -> Result<Vec<(&'static str, String)>, ClientError> {
        let mut pairs = QueryPairs::default();
        pairs.text("status", &self.status);
        pairs.text("queue", &self.queue);
        pairs.text("session_id", &self.session_id);
        pairs.time("created_after", self.created_after)?;
        pairs.text("cursor", &self.cursor);
        pairs.number("limit", self.limit);
        Ok(pairs.0)
    }
}

/// The filters of [`Client::batch_items`](crate::Client::batch_items): by index, 100 per
/// page unless told otherwise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemQuery {
    status: Option<ItemStatus>,
    cursor: Option<String>,
    limit: Option<u32>,
}

impl ItemQuery {
    pub fn new() -> Self {
        Self::default()
    }

    /// Only items in this status.
    pub fn status(mut self, status: ItemStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = QueryPairs::default();
        pairs.text("status", &self.status.map(|s| s.to_string()));
        pairs.text("cursor", &self.cursor);
        pairs.number("limit", self.limit);
        pairs.0
    }
}

/// The filters of [`Client::recent_items`](crate::Client::recent_items): the caller's items
/// of the last 24 hours unless `since` says otherwise, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentItemsQuery {
    since: Option<OffsetDateTime>,
    cursor: Option<String>,
    limit: Option<u32>,
}

impl RecentItemsQuery {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn since(mut self, time: OffsetDateTime) -> Self {
        self.since = Some(time);
        self
    }

    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    pub(crate) fn pairs(&self) -> Result<Vec<(&'static str, String)>, ClientError> {
        let mut pairs = QueryPairs::default();
        pairs.time("since", self.since)?;
        pairs.text("cursor", &self.cursor);
        pairs.number("limit", self.limit);
        Ok(pairs.0)
    }
}

/// Query parameters, the absent ones left out.
#[derive(Default)]
pub(crate) struct QueryPairs(pub(crate) Vec<(&'static str, String)>);

impl QueryPairs {
    pub(crate) fn text(&mut self, key: &'static str, value: &Option<String>) {
        if let Some(value) = value {
            self.0.push((key, value.clone()));
        }
    }

    pub(crate) fn number(&mut self, key: &'static str, value: Option<impl ToString>) {
        if let Some(value) = value {
            self.0.push((key, value.to_string()));
        }
    }

    /// In UTC, as the server writes its own times.
    fn time(&mut self, key: &'static str, value: Option<OffsetDateTime>) -> Result<(), ClientError> {
        if let Some(time) = value {
            let text = time
                .to_offset(time::UtcOffset::UTC)
                .format(&Rfc3339)
                .map_err(|error| ClientError::InvalidRequest(format!("{key}: {error}")))?;
            self.0.push((key, text));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn a_minimal_batch_serializes_to_queue_and_items_only() {
        let batch = NewBatch::new("default").item(json!({"sleep_ms": 5})).item(json!("x"));
        assert_eq!(
            serde_json::to_value(&batch).expect("serializes"),
            json!({"queue": "default", "items": [{"input": {"sleep_ms": 5}}, {"input": "x"}]})
        );
    }

    #[test]
    fn every_option_serializes_under_its_wire_name() {
        let mut config = JsonMap::new();
        config.insert("model".into(), json!("small"));
        let batch = NewBatch::new("emails")
            .push_item(
                NewItem::new(json!({"to": "a@example.com"}))
                    .custom_id("a")
                    .config(config.clone()),
            )
            .id("job-1")
            .session_id("s-1")
            .mode(Mode::Sequential)
            .on_item_failure(OnItemFailure::FailBatch)
            .priority(5)
            .run_at(datetime!(2026-01-31 12:00 +01:00))
            .config(config)
            .webhook(
                NewWebhook::new("https://example.com/hook")
                    .secret("whsec_abc")
                    .events([EventType::BatchCompleted, EventType::ItemFailed]),
            )
            .metadata(json!({"owner": "ops"}))
            .idempotency_key("key-1");
        assert_eq!(
            serde_json::to_value(&batch).expect("serializes"),
            json!({
                "queue": "emails",
                "items": [{"input": {"to": "a@example.com"}, "custom_id": "a", "config": {"model": "small"}}],
                "id": "job-1",
                "session_id": "s-1",
                "mode": "sequential",
                "on_item_failure": "fail_batch",
                "priority": 5,
                "run_at": "2026-01-31T12:00:00+01:00",
                "config": {"model": "small"},
                "webhook": {"url": "https://example.com/hook", "secret": "whsec_abc",
                            "events": ["batch.completed", "item.failed"]},
                "metadata": {"owner": "ops"}
            }),
            "the idempotency key goes in a header, not the body"
        );
        assert_eq!(batch.idempotency_key_header(), Some("key-1"));
    }

    #[test]
    fn a_webhook_without_secret_or_events_leaves_them_to_the_server() {
        let webhook = NewWebhook::new("https://example.com/hook");
        assert_eq!(
            serde_json::to_value(&webhook).expect("serializes"),
            json!({"url": "https://example.com/hook"})
        );
        let printed = format!("{:?}", webhook.secret("s3cret"));
        assert!(!printed.contains("s3cret"), "{printed}");
    }

    #[test]
    fn list_filters_become_query_pairs() {
        assert!(BatchQuery::new().pairs().expect("no times").is_empty());
        let query = BatchQuery::new()
            .active()
            .queue("q")
            .session_id("s")
            .created_after(datetime!(2026-01-31 13:00 +01:00))
            .cursor("c1")
            .limit(10);
        assert_eq!(
            query.pairs().expect("a valid time"),
            vec![
                ("status", "active".to_owned()),
                ("queue", "q".to_owned()),
                ("session_id", "s".to_owned()),
                ("created_after", "2026-01-31T12:00:00Z".to_owned()),
                ("cursor", "c1".to_owned()),
                ("limit", "10".to_owned()),
            ]
        );
        let query = BatchQuery::new().status(BatchStatus::Cancelling);
        assert_eq!(
            query.pairs().expect("no times"),
            vec![("status", "cancelling".to_owned())]
        );
        assert_eq!(
            ItemQuery::new().status(ItemStatus::NeedsInput).limit(3).pairs(),
            vec![("status", "needs_input".to_owned()), ("limit", "3".to_owned())]
        );
        assert_eq!(
            RecentItemsQuery::new()
                .since(datetime!(2026-01-31 00:00 UTC))
                .pairs()
                .expect("a valid time"),
            vec![("since", "2026-01-31T00:00:00Z".to_owned())]
        );
    }

    #[test]
    fn a_time_rfc3339_cannot_write_is_an_invalid_request() {
        let long_ago = datetime!(-0001-01-01 00:00 UTC);
        let error = RecentItemsQuery::new()
            .since(long_ago)
            .pairs()
            .expect_err("a negative year");
        assert!(
            matches!(error, ClientError::InvalidRequest(ref m) if m.starts_with("since:")),
            "{error}"
        );
    }
}

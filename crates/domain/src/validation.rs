//! Validation of a submitted batch: every issue is reported with its path from the body
//! root (`queue`, `items[3].input`, `webhook.url`), all at once, so a client can fix its
//! request in one round.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::TYPED_KEYS;
use crate::wire::{SubmitBatch, SubmitItem, WebhookSpec};
use crate::{EventType, JsonMap, Mode, OnItemFailure, is_valid_client_id, is_valid_queue_name};

/// One thing wrong with a request, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Issue {
    /// Where, from the body root with no `$` (`items[3].input`, `webhook.url`), or the query
    /// parameter or header; empty for the body as a whole.
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The limits a submission is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Items per batch; a queue may lower it.
    pub max_items: usize,
    /// Serialized size of one item's `input`.
    pub max_input_bytes: usize,
    /// Serialized size of `metadata`.
    pub max_metadata_bytes: usize,
    /// Characters of an item error kept.
    pub max_error_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: 10_000,
            max_input_bytes: 256 * 1024,
            max_metadata_bytes: 64 * 1024,
            max_error_chars: 1_000,
        }
    }
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "queue",
    "items",
    "id",
    "session_id",
    "mode",
    "on_item_failure",
    "priority",
    "run_at",
    "config",
    "webhook",
    "metadata",
];
const ITEM_KEYS: &[&str] = &["input", "custom_id", "config"];
const WEBHOOK_KEYS: &[&str] = &["url", "secret", "events"];
const MAX_LABEL_CHARS: usize = 256;

/// Validates a submission body and returns it typed.
///
/// `queue_max_items` answers, for a queue name, the queue's own item limit, or `None` when
/// no such queue is configured (unknown queues are refused at `queue`).
///
/// # Returns
/// The typed batch, or every issue found (never an empty list).
pub fn validate_submission(
    body: &Value,
    limits: &Limits,
    queue_max_items: impl Fn(&str) -> Option<usize>,
) -> Result<SubmitBatch, Vec<Issue>> {
    let mut v = Validator::default();
    let Some(obj) = body.as_object() else {
        return Err(vec![Issue::new("", "the body must be a JSON object")]);
    };
    v.unknown_keys("", obj, TOP_LEVEL_KEYS);

    let queue = match obj.get("queue") {
        None | Some(Value::Null) => "default".to_owned(),
        Some(Value::String(q)) => q.clone(),
        Some(_) => v.fail("queue", "must be a string", String::new()),
    };
    let mut max_items = limits.max_items;
    if !queue.is_empty() {
        if !is_valid_queue_name(&queue) {
            v.push("queue", "must be 1-64 characters of letters, digits, '.', '_' or '-'");
        } else if let Some(queue_limit) = queue_max_items(&queue) {
            max_items = max_items.min(queue_limit);
        } else {
            v.push("queue", format!("unknown queue `{queue}`"));
        }
    }

    let items = match obj.get("items") {
        Some(Value::Array(items)) => {
            if items.is_empty() {
                v.push("items", "must hold at least one item");
            } else if items.len() > max_items {
                v.push(
                    "items",
                    format!("must hold at most {max_items} items, got {}", items.len()),
                );
            }
            let mut seen = std::collections::HashSet::new();
            items
                .iter()
                .enumerate()
                .map(|(i, item)| v.item(i, item, limits, &mut seen))
                .collect()
        }
        None | Some(Value::Null) => v.fail("items", "is required", Vec::new()),
        Some(_) => v.fail("items", "must be an array of items", Vec::new()),
    };

    let id = v.optional_string(obj, "id").and_then(|id| {
        if is_valid_client_id(&id) {
            Some(id)
        } else {
            v.fail(
                "id",
                "must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                None,
            )
        }
    });
    let session_id = v
        .optional_string(obj, "session_id")
        .and_then(|s| v.label("session_id", s));
    let mode = v.parse_enum::<Mode>(obj, "mode").unwrap_or_default();
    let on_item_failure = v
        .parse_enum::<OnItemFailure>(obj, "on_item_failure")
        .unwrap_or_default();
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(p) => match p.as_i64().and_then(|p| i32::try_from(p).ok()) {
            Some(p) => p,
            None => v.fail("priority", "must be an integer (32-bit)", 0),
        },
    };
    let run_at = v
        .optional_string(obj, "run_at")
        .and_then(|s| match OffsetDateTime::parse(&s, &Rfc3339) {
            Ok(t) => Some(t),
            Err(_) => v.fail("run_at", "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z", None),
        });
    let config = v.config("config", obj.get("config"));
    let webhook = match obj.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::Object(w)) => v.webhook(w),
        Some(_) => v.fail("webhook", "must be an object {url, secret?, events?}", None),
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m) => {
            if m.to_string().len() > limits.max_metadata_bytes {
                v.push(
                    "metadata",
                    format!("must be at most {} bytes of JSON", limits.max_metadata_bytes),
                );
            }
            Some(m.clone())
        }
    };

    if v.issues.is_empty() {
        Ok(SubmitBatch {
            queue,
            items,
            id,
            session_id,
            mode,
            on_item_failure,
            priority,
            run_at,
            config,
            webhook,
            metadata,
        })
    } else {
        Err(v.issues)
    }
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
}

impl Validator {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(Issue::new(path, message));
    }

    /// Records an issue and returns the placeholder the caller goes on with.
    fn fail<T>(&mut self, path: &str, message: impl Into<String>, placeholder: T) -> T {
        self.push(path, message);
        placeholder
    }

    fn unknown_keys(&mut self, prefix: &str, obj: &JsonMap, known: &[&str]) {
        for key in obj.keys().filter(|k| !known.contains(&k.as_str())) {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            self.push(&path, format!("unknown field; expected one of {}", known.join(", ")));
        }
    }

    fn optional_string(&mut self, obj: &JsonMap, key: &str) -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => self.fail(key, "must be a string", None),
        }
    }

    fn label(&mut self, path: &str, s: String) -> Option<String> {
        if s.is_empty() || s.chars().count() > MAX_LABEL_CHARS {
            self.fail(path, format!("must be 1-{MAX_LABEL_CHARS} characters"), None)
        } else {
            Some(s)
        }
    }

    fn parse_enum<T: std::str::FromStr<Err = crate::ParseEnumError>>(&mut self, obj: &JsonMap, key: &str) -> Option<T> {
        let s = self.optional_string(obj, key)?;
        match s.parse() {
            Ok(value) => Some(value),
            Err(e) => self.fail(key, format!("must be one of {}", e.expected.join(", ")), None),
        }
    }

    fn config(&mut self, path: &str, value: Option<&Value>) -> JsonMap {
        let map = match value {
            None | Some(Value::Null) => return JsonMap::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return self.fail(path, "must be an object", JsonMap::new()),
        };
        for key in TYPED_KEYS {
            if let Some(v) = map.get(*key)
                && v.as_u64().is_none_or(|n| n == 0 || n > i32::MAX as u64)
            {
                self.push(&format!("{path}.{key}"), "must be a positive integer");
            }
        }
        map.clone()
    }

    /// Item `index` of the batch. Its issues' paths are built only when it has one: most
    /// items have none, and a batch may hold thousands.
    fn item(
        &mut self,
        index: usize,
        item: &Value,
        limits: &Limits,
        seen_custom_ids: &mut std::collections::HashSet<String>,
    ) -> SubmitItem {
        let path = |field: &str| format!("items[{index}]{field}");
        let placeholder = SubmitItem {
            input: Value::Null,
            custom_id: None,
            config: JsonMap::new(),
        };
        let Some(obj) = item.as_object() else {
            return self.fail(&path(""), "must be an object {input, custom_id?, config?}", placeholder);
        };
        if obj.keys().any(|key| !ITEM_KEYS.contains(&key.as_str())) {
            self.unknown_keys(&path(""), obj, ITEM_KEYS);
        }
        let input = match obj.get("input") {
            None => self.fail(&path(".input"), "is required", Value::Null),
            Some(input) => {
                let size = json_len(input);
                if size > limits.max_input_bytes {
                    self.push(
                        &path(".input"),
                        format!("is {size} bytes; at most {} are allowed", limits.max_input_bytes),
                    );
                }
                input.clone()
            }
        };
        let custom_id = match obj.get("custom_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => self.label(&path(".custom_id"), s.clone()).and_then(|s| {
                if seen_custom_ids.insert(s.clone()) {
                    Some(s)
                } else {
                    self.fail(
                        &path(".custom_id"),
                        format!("`{s}` is used by an earlier item of this batch"),
                        None,
                    )
                }
            }),
            Some(_) => self.fail(&path(".custom_id"), "must be a string", None),
        };
        let config = match obj.get("config") {
            None | Some(Value::Null) => JsonMap::new(),
            config => self.config(&path(".config"), config),
        };
        SubmitItem {
            input,
            custom_id,
            config,
        }
    }

    fn webhook(&mut self, w: &JsonMap) -> Option<WebhookSpec> {
        self.unknown_keys("webhook", w, WEBHOOK_KEYS);
        let url = match w.get("url") {
            Some(Value::String(u)) => match url::Url::parse(u) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => u.clone(),
                Ok(_) => self.fail(
                    "webhook.url",
                    "must be an http:// or https:// URL with a host",
                    String::new(),
                ),
                Err(e) => self.fail("webhook.url", format!("is not a URL: {e}"), String::new()),
            },
            None | Some(Value::Null) => self.fail("webhook.url", "is required", String::new()),
            Some(_) => self.fail("webhook.url", "must be a string", String::new()),
        };
        let secret = match w.get("secret") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => self.fail("webhook.secret", "must be a non-empty string", None),
        };
        let events = match w.get("events") {
            None | Some(Value::Null) => EventType::WEBHOOK_DEFAULTS.to_vec(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .filter_map(|(i, e)| match e.as_str().map(str::parse::<EventType>) {
                    Some(Ok(t)) => Some(t),
                    _ => self.fail(
                        &format!("webhook.events[{i}]"),
                        "must be an event type such as item.completed",
                        None,
                    ),
                })
                .collect(),
            Some(_) => self.fail("webhook.events", "must be an array of event types", Vec::new()),
        };
        Some(WebhookSpec { url, secret, events })
    }
}

/// The length of `value` as compact JSON (as `value.to_string()` would write it), counted
/// without building the text.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Neither a `Value` nor the counter can fail to write.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn known(q: &str) -> Option<usize> {
        match q {
            "default" => Some(10_000),
            "emails" => Some(100),
            _ => None,
        }
    }

    fn paths(body: Value) -> Vec<String> {
        validate_submission(&body, &Limits::default(), known)
            .expect_err("invalid")
            .into_iter()
            .map(|i| i.path)
            .collect()
    }

    #[test]
    fn a_minimal_body_gets_the_defaults() {
        let b = validate_submission(&json!({"items": [{"input": 1}]}), &Limits::default(), known).expect("valid");
        assert_eq!(b.queue, "default");
        assert_eq!(b.mode, Mode::Parallel);
        assert_eq!(b.on_item_failure, OnItemFailure::Continue);
        assert_eq!(b.items.len(), 1);
        assert!(b.webhook.is_none());
    }

    #[test]
    fn a_full_body_is_read_field_by_field() {
        let b = validate_submission(
            &json!({
                "queue": "emails", "id": "job-1", "session_id": "s", "mode": "sequential",
                "on_item_failure": "fail_batch", "priority": 5, "run_at": "2030-01-01T00:00:00Z",
                "config": {"timeout_ms": 1000, "model": "x"}, "metadata": {"k": [1]},
                "webhook": {"url": "https://example.com/h", "secret": "whsec_abc", "events": ["batch.completed"]},
                "items": [{"input": {"a": 1}, "custom_id": "c1", "config": {"max_attempts": 2}}]
            }),
            &Limits::default(),
            known,
        )
        .expect("valid");
        assert_eq!(b.id.as_deref(), Some("job-1"));
        assert_eq!(b.mode, Mode::Sequential);
        assert_eq!(b.priority, 5);
        assert_eq!(
            b.webhook.as_ref().map(|w| w.events.clone()),
            Some(vec![EventType::BatchCompleted])
        );
        assert_eq!(b.items[0].custom_id.as_deref(), Some("c1"));
        assert!(
            format!("{:?}", b.webhook).contains("<redacted>"),
            "the secret never prints"
        );
    }

    #[test]
    fn every_issue_is_reported_with_its_path() {
        let got = paths(json!({
            "queue": "nope", "mode": "both", "priority": 1.5, "run_at": "tomorrow", "id": "has space",
            "webhook": {"url": "ftp://x/y", "events": ["item.done"]}, "extra": 1,
            "items": [{"input": 1}, {"custom_id": 3}, 7, {"input": 1, "config": {"timeout_ms": -1}}]
        }));
        for expected in [
            "queue",
            "mode",
            "priority",
            "run_at",
            "id",
            "webhook.url",
            "webhook.events[0]",
            "extra",
            "items[1].input",
            "items[1].custom_id",
            "items[2]",
            "items[3].config.timeout_ms",
        ] {
            assert!(got.contains(&expected.to_owned()), "missing {expected} in {got:?}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(paths(json!({"items": []})), vec!["items"]);
        assert_eq!(paths(json!({})), vec!["items"]);
        assert_eq!(
            paths(json!({"queue": "emails", "items": vec![json!({"input": 1}); 101]})),
            vec!["items"]
        );
        let big = "x".repeat(256 * 1024);
        assert_eq!(
            paths(json!({"items": [{"input": 1}, {"input": big}]})),
            vec!["items[1].input"]
        );
        assert_eq!(
            paths(json!({"items": [{"input": 1, "custom_id": "a"}, {"input": 2, "custom_id": "a"}]})),
            vec!["items[1].custom_id"]
        );
        assert_eq!(paths(json!([1])), vec![""]);
    }

    #[test]
    fn an_items_unknown_key_and_a_config_that_is_no_object_are_reported_there() {
        assert_eq!(
            paths(
                json!({"items": [{"input": 1, "extra": 2}, {"input": 1, "config": 5}, {"input": 1, "config": null}]})
            ),
            vec!["items[0].extra", "items[1].config"]
        );
    }

    #[test]
    fn json_len_counts_what_to_string_writes() {
        let values = [
            json!(null),
            json!(-1.5e300),
            json!("quote \" backslash \\ newline \n control \u{1} emoji \u{1F600} accent é"),
            json!({"b": [1, {"c": null}], "a": "x", "": {}}),
            json!([]),
        ];
        for value in values {
            assert_eq!(json_len(&value), value.to_string().len(), "{value}");
        }
    }
}

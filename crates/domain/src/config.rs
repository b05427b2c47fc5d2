//! Config precedence: item > batch > queue > server, a shallow merge by key, and the typed
//! settings the executor reads out of the merged map.

use std::time::Duration;

use serde_json::Value;

use crate::JsonMap;
use crate::retry::RetryPolicy;

/// Merges config maps, lowest precedence first: `[server, queue, batch, item]`. A key set
/// at a higher level replaces the whole value of the same key below it (shallow).
pub fn merge_config<'a>(levels: impl IntoIterator<Item = &'a JsonMap>) -> JsonMap {
    let mut merged = JsonMap::new();
    for level in levels {
        for (key, value) in level {
            merged.insert(key.clone(), value.clone());
        }
    }
    merged
}

/// The settings of one item's run, read from its merged config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ItemSettings {
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// The config keys with a meaning to batchd itself; any other key is the handler's.
pub(crate) const TIMEOUT_MS: &str = "timeout_ms";
pub(crate) const MAX_ATTEMPTS: &str = "max_attempts";
pub(crate) const BACKOFF_BASE_MS: &str = "backoff_base_ms";
pub(crate) const BACKOFF_MAX_MS: &str = "backoff_max_ms";

/// Keys that a batch or item config may carry with a meaning to batchd, each a positive
/// integer.
pub(crate) const TYPED_KEYS: &[&str] = &[TIMEOUT_MS, MAX_ATTEMPTS, BACKOFF_BASE_MS, BACKOFF_MAX_MS];

impl Default for ItemSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(180),
            retry: RetryPolicy::default(),
        }
    }
}

impl ItemSettings {
    /// Reads the typed keys of a merged config; a key that is absent or not a positive
    /// integer keeps the default (validation refuses such values at submit).
    pub fn from_config(config: &JsonMap) -> Self {
        let d = Self::default();
        let ms = |key: &str| config.get(key).and_then(Value::as_u64).filter(|v| *v > 0);
        Self {
            timeout: ms(TIMEOUT_MS).map_or(d.timeout, Duration::from_millis),
            retry: RetryPolicy {
                max_attempts: ms(MAX_ATTEMPTS).map_or(d.retry.max_attempts, |v| i32::try_from(v).unwrap_or(i32::MAX)),
                base: ms(BACKOFF_BASE_MS).map_or(d.retry.base, Duration::from_millis),
                factor: d.retry.factor,
                max: ms(BACKOFF_MAX_MS).map_or(d.retry.max, Duration::from_millis),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> JsonMap {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn item_beats_batch_beats_queue_beats_server() {
        let server = map(json!({"timeout_ms": 1, "model": "s", "a": 1}));
        let queue = map(json!({"timeout_ms": 2, "model": "q"}));
        let batch = map(json!({"timeout_ms": 3}));
        let item = map(json!({"model": "i", "nested": {"x": 1}}));
        let merged = merge_config([&server, &queue, &batch, &item]);
        assert_eq!(merged["timeout_ms"], 3);
        assert_eq!(merged["model"], "i");
        assert_eq!(merged["a"], 1);
        let replaced = merge_config([&item, &map(json!({"nested": {"y": 2}}))]);
        assert_eq!(replaced["nested"], json!({"y": 2}), "the merge is shallow");
    }

    #[test]
    fn typed_settings_come_from_the_merged_map() {
        let s = ItemSettings::from_config(&map(
            json!({"timeout_ms": 500, "max_attempts": 5, "backoff_base_ms": 10}),
        ));
        assert_eq!(s.timeout, Duration::from_millis(500));
        assert_eq!(s.retry.max_attempts, 5);
        assert_eq!(s.retry.base, Duration::from_millis(10));
        assert_eq!(s.retry.max, Duration::from_secs(300));
        assert_eq!(
            ItemSettings::from_config(&map(json!({"timeout_ms": "x"}))),
            ItemSettings::default()
        );
    }
}

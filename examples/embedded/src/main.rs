//! Runs a batch with batchd's crates alone: a custom handler, SQLite, no HTTP.

use std::time::Duration;

use async_trait::async_trait;
use batchd_domain::{BatchStatus, JsonMap, Mode, OnItemFailure};
use batchd_executor::{
    Completion, Executor, ExecutorConfig, Handler, HandlerError, HandlerRegistry, ItemContext, QueueConfig,
};
use batchd_storage::{CreateOutcome, NewBatch, NewItem, PageRequest, Scope, StoreOptions};
use serde_json::{Value, json};

/// Counts the words of `{"text": "..."}`, reporting a step on the way.
struct WordCount;

#[async_trait]
impl Handler for WordCount {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        let text = item
            .input
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::permanent("input.text must be a string"))?;
        item.step("counting")
            .await
            .map_err(|e| HandlerError::transient(e.to_string()))?;
        Ok(Completion::Completed(json!({"words": text.split_whitespace().count()})))
    }
}

/// Runs three texts through the `words` queue and returns each item's result, by index.
async fn run(database_url: &str) -> anyhow::Result<Vec<Value>> {
    let store = batchd_storage::connect(StoreOptions::new(database_url)).await?;
    let mut registry = HandlerRegistry::with_builtins();
    registry.register("word-count", WordCount);
    let queue = QueueConfig {
        name: "words".into(),
        handler: "word-count".into(),
        concurrency: 4,
        rate_per_second: 0.0,
        burst: 1,
        lease: Duration::from_secs(30),
        defaults: JsonMap::new(),
    };
    let pool = Executor::start(
        store.clone(),
        registry,
        ExecutorConfig {
            queues: vec![queue],
            ..ExecutorConfig::default()
        },
    )?;

    let mut notices = store.subscribe();
    let texts = ["the quick brown fox", "jumps over", "the lazy dog today"];
    let batch = NewBatch {
        id: batchd_domain::new_batch_id(),
        tenant: "local".into(),
        queue: "words".into(),
        session_id: None,
        mode: Mode::Parallel,
        on_item_failure: OnItemFailure::Continue,
        priority: 0,
        run_at: None,
        config: JsonMap::new(),
        webhook: None,
        metadata: None,
        idempotency_key: None,
        client_chose_id: false,
        request_hash: String::new(),
        items: texts
            .iter()
            .map(|t| NewItem {
                input: json!({"text": t}),
                custom_id: None,
                config: JsonMap::new(),
                max_attempts: 3,
            })
            .collect(),
    };
    let CreateOutcome::Created(created, _) = store.create_batch(batch).await? else {
        anyhow::bail!("a fresh batch id cannot be a replay");
    };
    // Wait for the batch to end, woken by the store's notifications.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !store.get_batch(Scope::All, &created.id).await?.status.is_terminal() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the batch did not finish in 30 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), notices.recv()).await;
    }
    let done = store.get_batch(Scope::All, &created.id).await?;
    anyhow::ensure!(done.status == BatchStatus::Completed, "the batch ended {}", done.status);
    let items = store
        .list_items(
            Scope::All,
            &created.id,
            None,
            &PageRequest {
                cursor: None,
                limit: 100,
            },
        )
        .await?;
    pool.shutdown().await;
    Ok(items
        .rows
        .into_iter()
        .map(|i| i.result.unwrap_or(Value::Null))
        .collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("embedded.db").display());
    for (i, result) in run(&url).await?.iter().enumerate() {
        println!("item {i}: {result}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_the_words_of_every_item() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("embedded.db").display());
        let results = super::run(&url).await.expect("the batch runs");
        assert_eq!(
            results,
            vec![
                serde_json::json!({"words": 4}),
                serde_json::json!({"words": 2}),
                serde_json::json!({"words": 4})
            ]
        );
    }
}

//! The `demo` handler: its item's input says what to do, so the quick start, tests and
//! benchmarks can make every path happen.
//!
//! `{"sleep_ms": 20, "steps": ["fetch", "write"], "result": {…}, "fail": "message",
//! "fail_times": 2, "permanent": true, "needs_input": "question"}`: report each step (the
//! sleep is spread over them), return `result` (else the input), fail with the message on
//! every attempt (or only the first `fail_times`; "demo failure" without a message), fail
//! without retry when `permanent`, and ask the question unless the item carries an answer.
//! Cancellation is honoured while it sleeps.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::handler::{Completion, Handler, HandlerError, ItemContext};

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct DemoHandler;

#[async_trait]
impl Handler for DemoHandler {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        let input = &item.input;
        let sleep = Duration::from_millis(input.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0));
        let steps: Vec<String> = input
            .get("steps")
            .and_then(Value::as_array)
            .map(|s| s.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        if steps.is_empty() {
            nap(&item, sleep).await?;
        } else {
            let share = sleep / steps.len() as u32;
            for step in steps {
                item.step(step)
                    .await
                    .map_err(|e| HandlerError::transient(e.to_string()))?;
                nap(&item, share).await?;
            }
        }
        let fail_message = input.get("fail").and_then(Value::as_str);
        let fail_times = input.get("fail_times").and_then(Value::as_i64);
        let should_fail = match (fail_message, fail_times) {
            (_, Some(times)) => i64::from(item.attempt) <= times,
            (Some(_), None) => true,
            (None, None) => false,
        };
        if should_fail {
            let message = fail_message.unwrap_or("demo failure");
            let permanent = input.get("permanent").and_then(Value::as_bool).unwrap_or(false);
            return Err(if permanent {
                HandlerError::permanent(message)
            } else {
                HandlerError::transient(message)
            });
        }
        if let Some(question) = input.get("needs_input").filter(|q| !q.is_null())
            && item.answer.is_none()
        {
            return Ok(Completion::NeedsInput(question.clone()));
        }
        Ok(Completion::Completed(
            input.get("result").cloned().unwrap_or_else(|| input.clone()),
        ))
    }
}

async fn nap(item: &ItemContext, duration: Duration) -> Result<(), HandlerError> {
    if duration.is_zero() {
        return Ok(());
    }
    tokio::select! {
        () = tokio::time::sleep(duration) => Ok(()),
        () = item.cancellation().cancelled() => Err(HandlerError::transient("cancelled while sleeping")),
    }
}

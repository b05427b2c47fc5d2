//! `batchd worker --queue Q -- CMD ARGS…`: a pull worker that runs a local command per item,
//! so any script becomes a worker.
//!
//! Per claimed item the command is started in its own process group with:
//! - **stdin**: the item's `input` as JSON (one line), then end of file;
//! - **environment**: `BATCHD_ITEM_ID`, `BATCHD_BATCH_ID`, `BATCHD_INDEX`, `BATCHD_ATTEMPT`,
//!   `BATCHD_QUEUE`, `BATCHD_CUSTOM_ID`, `BATCHD_SESSION_ID` (empty when the item has none),
//!   `BATCHD_CONFIG` (the merged config as JSON), `BATCHD_ANSWER` (the answer as JSON, empty
//!   when none), and `BATCHD_SERVER`, `BATCHD_LEASE_TOKEN` for scripts that report progress
//!   themselves;
//! - **stderr**: each line becomes an `item.log` event, in order, before the item ends;
//! - **stdout**: read to the end. A JSON object with `status` `failed` (`error`, `retryable`)
//!   fails the attempt; with exit code 0, `{"status":"needs_input","question":…}` asks,
//!   `{"status":"completed","result":…}` completes with `result`, and any other JSON is the
//!   result; text that is not JSON is the result as a string; nothing is a null result.
//! - **exit code**: 0 completes as above; anything else (or a signal) fails the attempt,
//!   retryably, with the last stderr line in the error.
//!
//! The lease is renewed every third of its length. When a renewal answers `409` (the batch
//! was cancelled or the lease is lost) the command's process group gets SIGTERM, then SIGKILL
//! two seconds later, and nothing is reported. On SIGINT or SIGTERM the worker stops claiming
//! and lets running commands finish; a second signal kills them and fails their attempts
//! (retryably) before exiting.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use batchd_client::wire::ClaimItem;
use batchd_client::{ClaimOptions, Client, Heartbeat};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After SIGTERM, how long a command's process group has before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// The longest wait after a failed claim.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(5);
/// The most of a command's stdout that is kept.
const MAX_STDOUT_BYTES: u64 = 32 * 1024 * 1024;

/// What `batchd worker` runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub server: String,
    pub token: Option<String>,
    pub queue: String,
    pub concurrency: usize,
    /// The long poll of each claim.
    pub wait: Duration,
    /// The lease asked for; the queue's when `None`.
    pub lease: Option<Duration>,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// Why the worker should stop.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Stop claiming; let running commands finish.
    pub drain: CancellationToken,
    /// Kill running commands too.
    pub kill: CancellationToken,
}

/// Claims and runs items until `stop.drain` fires and every running command has ended.
pub async fn run_worker(options: WorkerOptions, stop: Stop) -> anyhow::Result<()> {
    anyhow::ensure!(!options.command.is_empty(), "no command to run: give it after `--`");
    anyhow::ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
    let mut client = Client::new(&options.server).context("--server")?;
    if let Some(token) = &options.token {
        client = client.with_token(token.clone());
    }
    let options = Arc::new(options);
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let tasks = TaskTracker::new();
    let mut backoff = Duration::from_millis(200);
    tracing::info!(queue = %options.queue, server = %options.server, concurrency = options.concurrency, "worker started");
    loop {
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.context("the slots closed")?,
            () = stop.drain.cancelled() => break,
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let claim = ClaimOptions {
            max_items: u32::try_from(permits.len()).unwrap_or(100).min(100),
            wait: options.wait,
            lease: options.lease,
        };
        // Not cut short by a stop: items it claims are run, not lost.
        match client.claim(&options.queue, &claim).await {
            Ok(items) => {
                backoff = Duration::from_millis(200);
                for item in items {
                    let Some(permit) = permits.pop() else { break };
                    let (client, options, kill) = (client.clone(), options.clone(), stop.kill.clone());
                    tasks.spawn(async move {
                        run_item(&client, &options, item, kill).await;
                        drop(permit);
                    });
                }
            }
            Err(error) if error.status().is_some_and(|s| (400..500).contains(&s) && s != 429) => {
                // A refusal (bad queue, bad key) will not fix itself.
                return Err(error).with_context(|| format!("claiming from queue `{}`", options.queue));
            }
            Err(error) => {
                tracing::warn!(%error, "claim failed; retrying in {} ms", backoff.as_millis());
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.drain.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_CLAIM_BACKOFF);
            }
        }
    }
    tasks.close();
    if !tasks.is_empty() {
        tracing::info!(running = tasks.len(), "stopping: waiting for running commands");
    }
    tasks.wait().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// How an item's command ended.
enum Ended {
    Exited(std::process::ExitStatus),
    /// The lease is gone (cancelled batch, expired lease): nothing to report.
    LeaseGone,
    /// The worker is stopping now.
    Killed,
}

async fn run_item(client: &Client, options: &WorkerOptions, item: ClaimItem, kill: CancellationToken) {
    let item_id = item.id.clone();
    let token = item.lease_token.clone();
    let lease_left = (item.lease_expires_at - time::OffsetDateTime::now_utc()).unsigned_abs();
    let every = (lease_left / 3).max(Duration::from_millis(100));
    tracing::info!(item = %item_id, attempt = item.attempt, "running");

    let mut child = match spawn(options, &item) {
        Ok(child) => child,
        Err(error) => {
            let message = format!("cannot start `{}`: {error}", options.command[0]);
            tracing::error!(item = %item_id, "{message}");
            report(client.fail(&item_id, &token, message, true).await, &item_id);
            return;
        }
    };
    let pid = child.id();
    let input = serde_json::to_vec(&item.input).unwrap_or_else(|_| b"null".to_vec());
    if let Some(mut stdin) = child.stdin.take() {
        // In its own task: a command that does not read its stdin must not block the rest.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.write_all(b"\n").await;
        });
    }
    let stdout = child.stdout.take().map(|stdout| {
        tokio::spawn(async move {
            let mut bytes = Vec::new();
            let _ = stdout.take(MAX_STDOUT_BYTES).read_to_end(&mut bytes).await;
            bytes
        })
    });
    let gone = CancellationToken::new();
    let stderr = child.stderr.take().map(|stderr| {
        let (client, item_id, token, gone) = (client.clone(), item_id.clone(), token.clone(), gone.clone());
        tokio::spawn(async move { forward_stderr(stderr, &client, &item_id, &token, &gone).await })
    });
    let heartbeat = {
        let (client, item_id, token, gone) = (client.clone(), item_id.clone(), token.clone(), gone.clone());
        let lease = options.lease;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let beat = Heartbeat {
                    lease,
                    ..Heartbeat::default()
                };
                match client.heartbeat(&item_id, &token, &beat).await {
                    Ok(_) => {}
                    Err(error) if error.is_lease_gone() => {
                        tracing::info!(item = %item_id, %error, "stopping the command");
                        gone.cancel();
                        return;
                    }
                    Err(error) => tracing::warn!(item = %item_id, %error, "heartbeat failed; retrying"),
                }
            }
        })
    };

    let ended = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => Ended::Exited(status),
            Err(error) => {
                tracing::error!(item = %item_id, %error, "cannot wait for the command");
                Ended::Killed
            }
        },
        () = gone.cancelled() => Ended::LeaseGone,
        () = kill.cancelled() => Ended::Killed,
    };
    heartbeat.abort();
    if !matches!(ended, Ended::Exited(_)) {
        terminate(&mut child, pid).await;
    }
    let last_stderr = match stderr {
        Some(task) => task.await.unwrap_or_default(),
        None => None,
    };
    let stdout = match stdout {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let status = match ended {
        Ended::LeaseGone => return,
        Ended::Killed => {
            let result = client
                .fail(&item_id, &token, "the worker stopped before the command finished", true)
                .await;
            report(result, &item_id);
            return;
        }
        Ended::Exited(status) => status,
    };
    if gone.is_cancelled() {
        return;
    }
    let result = match outcome(status, &stdout, last_stderr.as_deref()) {
        Outcome::Complete(result) => client.complete(&item_id, &token, result).await,
        Outcome::NeedsInput(question) => client.needs_input(&item_id, &token, question).await,
        Outcome::Fail { error, retryable } => client.fail(&item_id, &token, error, retryable).await,
    };
    report(result, &item_id);
}

fn spawn(options: &WorkerOptions, item: &ClaimItem) -> std::io::Result<tokio::process::Child> {
    let json = |value: &Value| serde_json::to_string(value).unwrap_or_default();
    let mut command = tokio::process::Command::new(&options.command[0]);
    command
        .args(&options.command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env("BATCHD_ITEM_ID", &item.id)
        .env("BATCHD_BATCH_ID", &item.batch_id)
        .env("BATCHD_INDEX", item.index.to_string())
        .env("BATCHD_ATTEMPT", item.attempt.to_string())
        .env("BATCHD_QUEUE", &options.queue)
        .env("BATCHD_CUSTOM_ID", item.custom_id.as_deref().unwrap_or_default())
        .env("BATCHD_SESSION_ID", item.session_id.as_deref().unwrap_or_default())
        .env("BATCHD_CONFIG", json(&Value::Object(item.config.clone())))
        .env("BATCHD_ANSWER", item.answer.as_ref().map(json).unwrap_or_default())
        .env("BATCHD_SERVER", &options.server)
        .env("BATCHD_LEASE_TOKEN", &item.lease_token);
    // Its own process group, so a stop reaches whatever the command started too.
    #[cfg(unix)]
    command.process_group(0);
    command.spawn()
}

/// Sends each stderr line as an `item.log` event, in order; returns the last non-empty line.
async fn forward_stderr(
    stderr: tokio::process::ChildStderr,
    client: &Client,
    item_id: &str,
    token: &str,
    gone: &CancellationToken,
) -> Option<String> {
    let mut lines = BufReader::new(stderr).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        if !gone.is_cancelled() {
            match client.item_log(item_id, token, line.clone()).await {
                Ok(_) => {}
                Err(error) if error.is_lease_gone() => gone.cancel(),
                Err(error) => tracing::warn!(item = %item_id, %error, "cannot send a log line"),
            }
        }
        last = Some(line);
    }
    last
}

/// Stops a command's process group: SIGTERM, then SIGKILL after the grace.
async fn terminate(child: &mut tokio::process::Child, pid: Option<u32>) {
    #[cfg(unix)]
    if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
            let _ = killpg(group, Signal::SIGKILL);
        } else {
            // The leader is gone; whatever it left in the group goes too.
            let _ = killpg(group, Signal::SIGKILL);
            return;
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// How an attempt ended, read from the command's exit and stdout.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Complete(Value),
    NeedsInput(Value),
    Fail { error: String, retryable: bool },
}

fn outcome(status: std::process::ExitStatus, stdout: &[u8], last_stderr: Option<&str>) -> Outcome {
    let text = String::from_utf8_lossy(stdout);
    let trimmed = text.trim();
    let value = if trimmed.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(trimmed).unwrap_or_else(|_| Value::String(trimmed.to_owned()))
    };
    let said = value.get("status").and_then(Value::as_str);
    if said == Some("failed") {
        let error = match value.get("error") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => "the command reported a failure".to_owned(),
            Some(other) => other.to_string(),
        };
        let retryable = value.get("retryable").and_then(Value::as_bool).unwrap_or(true);
        return Outcome::Fail { error, retryable };
    }
    if !status.success() {
        let how = match status.code() {
            Some(code) => format!("the command exited with status {code}"),
            None => "the command was killed by a signal".to_owned(),
        };
        let error = match last_stderr {
            Some(line) => format!("{how}: {line}"),
            None => how,
        };
        return Outcome::Fail { error, retryable: true };
    }
    match said {
        Some("needs_input") => Outcome::NeedsInput(value.get("question").cloned().unwrap_or(Value::Null)),
        Some("completed") => Outcome::Complete(value.get("result").cloned().unwrap_or(Value::Null)),
        _ => Outcome::Complete(value),
    }
}

fn report<T>(result: Result<T, batchd_client::ClientError>, item_id: &str) {
    match result {
        Ok(_) => tracing::info!(item = %item_id, "reported"),
        Err(error) if error.is_lease_gone() => {
            tracing::info!(item = %item_id, %error, "the lease is gone; the result was dropped");
        }
        Err(error) => tracing::error!(item = %item_id, %error, "cannot report the item; its lease will expire"),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::process::ExitStatusExt;

    fn exit(code: i32) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn stdout_and_the_exit_code_decide_the_outcome() {
        assert_eq!(
            outcome(exit(0), br#"{"a": 1}"#, None),
            Outcome::Complete(json!({"a": 1}))
        );
        assert_eq!(outcome(exit(0), b"", None), Outcome::Complete(Value::Null));
        assert_eq!(outcome(exit(0), b"hello\n", None), Outcome::Complete(json!("hello")));
        assert_eq!(
            outcome(exit(0), br#"{"status": "completed", "result": 7}"#, None),
            Outcome::Complete(json!(7))
        );
        assert_eq!(
            outcome(exit(0), br#"{"status": "needs_input", "question": "which?"}"#, None),
            Outcome::NeedsInput(json!("which?"))
        );
        assert_eq!(
            outcome(
                exit(0),
                br#"{"status": "failed", "error": "no", "retryable": false}"#,
                None
            ),
            Outcome::Fail {
                error: "no".to_owned(),
                retryable: false
            }
        );
        assert_eq!(
            outcome(exit(3), b"{}", Some("boom")),
            Outcome::Fail {
                error: "the command exited with status 3: boom".to_owned(),
                retryable: true
            }
        );
        assert!(matches!(
            outcome(std::process::ExitStatus::from_raw(9), b"", None),
            Outcome::Fail { retryable: true, .. }
        ));
    }
}

//! `batchd worker -- CMD`: a shell script becomes a pull worker. Its stdout is the result,
//! its stderr lines are `item.log` events, and cancelling the batch kills the running command.
//! Also the Python example worker (examples/python-worker) against the real server.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use batchd_storage::testing::TestDatabase;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::support::{Background, STOP_TIMEOUT, Server, batchd};

/// A server with a pull queue `remote` (leases of 1.5 s, so a cancel is seen within 0.5 s),
/// on SQLite in `dir` or on the database `database_url`.
fn serve_with_pull_queue(dir: &Path, database_url: Option<&str>) -> Server {
    let config = dir.join("batchd.toml");
    let text = "[queues.remote]\nhandler = \"pull\"\nlease_ms = 1500\nbackoff_base_ms = 10\n";
    std::fs::write(&config, text).expect("the config is written");
    let mut args = vec!["--config", config.to_str().expect("a UTF-8 path")];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    Server::serve(dir, &args, &[])
}

const SCRIPT: &str = r#"#!/bin/sh
input=$(cat)
echo "starting item $BATCHD_INDEX of batch $BATCHD_BATCH_ID" >&2
case "$input" in
  *sleep*)
    echo $$ > "$PID_DIR/$BATCHD_ITEM_ID.pid"
    sleep 120
    ;;
esac
echo "finishing item $BATCHD_INDEX" >&2
printf '{"index": %s, "attempt": %s, "input": %s}\n' "$BATCHD_INDEX" "$BATCHD_ATTEMPT" "$input"
"#;

fn worker(dir: &Path, server: &Server, concurrency: &str) -> Background {
    let script = dir.join("work.sh");
    std::fs::write(&script, SCRIPT).expect("the script is written");
    let url = format!("http://{}", server.addr);
    let script = script.to_str().expect("a UTF-8 path");
    let args = [
        "worker",
        "--queue",
        "remote",
        "--server",
        &url,
        "--concurrency",
        concurrency,
        "--wait-ms",
        "1000",
        "--",
        "sh",
        script,
    ];
    let mut command: Command = batchd(dir, &args);
    command.env("PID_DIR", dir);
    Background::spawn(dir, command)
}

fn ended(batch: &Value) -> bool {
    matches!(batch["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

#[tokio::test]
async fn a_shell_script_works_a_batch_with_its_stderr_as_events_on_sqlite() {
    shell_script_works_a_batch(None).await;
}

#[tokio::test]
async fn a_shell_script_works_a_batch_with_its_stderr_as_events_on_postgres() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    shell_script_works_a_batch(Some(db.url())).await;
}

async fn shell_script_works_a_batch(database_url: Option<&str>) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = serve_with_pull_queue(dir.path(), database_url);
    server.wait_ready().await;
    let items: Vec<Value> = (0..20).map(|i| json!({"input": {"n": i}})).collect();
    let created = server
        .post("/v1/batches", &json!({"queue": "remote", "items": items}))
        .await;
    assert_eq!(created.status, 202, "{:?}", created.body);
    let id = created.body["id"].as_str().expect("an id").to_owned();
    let mut worker = worker(dir.path(), &server, "4");

    let done = server.wait_until(&format!("/v1/batches/{id}"), ended).await;
    assert_eq!(
        done.body["status"],
        "completed",
        "{:?}\n{}",
        done.body,
        worker.describe()
    );
    assert_eq!(done.body["counts"]["completed"], 20);
    let listed = server.get(&format!("/v1/batches/{id}/items?limit=100")).await;
    for (i, item) in listed.body["items"].as_array().expect("items").iter().enumerate() {
        assert_eq!(
            item["result"],
            json!({"index": i, "attempt": 1, "input": {"n": i}}),
            "{item}"
        );
    }
    let events = server.get(&format!("/v1/batches/{id}/events?limit=1000")).await;
    let logs: Vec<&str> = events.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "item.log")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(logs.len(), 40, "two stderr lines per item: {logs:?}");
    assert!(
        logs.contains(&format!("starting item 7 of batch {id}").as_str()),
        "{logs:?}"
    );
    assert!(logs.contains(&"finishing item 19"), "{logs:?}");
    assert!(
        worker.exited().is_none(),
        "the worker keeps polling\n{}",
        worker.describe()
    );
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(STOP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", worker.describe());
}

#[tokio::test]
async fn cancelling_a_batch_kills_its_running_command() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = serve_with_pull_queue(dir.path(), None);
    server.wait_ready().await;
    let body = json!({"queue": "remote", "items": [{"input": {"sleep": true}}]});
    let created = server.post("/v1/batches", &body).await;
    let id = created.body["id"].as_str().expect("an id").to_owned();
    let item_id = created.body["item_ids"][0].as_str().expect("an item id").to_owned();
    let worker = worker(dir.path(), &server, "1");

    let pid_file = dir.path().join(format!("{item_id}.pid"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the command never started\n{}",
            worker.describe()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(kill(Pid::from_raw(pid), None).is_ok(), "the command runs");
    let cancelled = server.post(&format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);

    let deadline = Instant::now() + Duration::from_secs(60);
    while kill(Pid::from_raw(pid), None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the command was never killed\n{}",
            worker.describe()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let done = server.wait_until(&format!("/v1/batches/{id}"), ended).await;
    assert_eq!(done.body["status"], "cancelled", "{:?}", done.body);
    let item = server.get(&format!("/v1/items/{item_id}")).await;
    assert_eq!(item.body["status"], "cancelled");
}

/// examples/python-worker/worker.py, standard library only, against the real server.
#[tokio::test]
async fn the_python_example_worker_completes_a_batch() {
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        assert!(std::env::var_os("CI").is_none(), "python3 is required under CI");
        eprintln!("skipped: no python3");
        return;
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = serve_with_pull_queue(dir.path(), None);
    server.wait_ready().await;
    let texts = ["one two three", "", "a b", "hello world again and again"];
    let items: Vec<Value> = texts.iter().map(|t| json!({"input": {"text": t}})).collect();
    let created = server
        .post("/v1/batches", &json!({"queue": "remote", "items": items}))
        .await;
    let id = created.body["id"].as_str().expect("an id").to_owned();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-worker/worker.py");
    let mut command = Command::new("python3");
    command
        .current_dir(dir.path())
        .arg(script)
        .args(["--queue", "remote", "--exit-when-idle"])
        .env("BATCHD_URL", format!("http://{}", server.addr))
        .env_remove("BATCHD_TOKEN");
    let mut worker = Background::spawn(dir.path(), command);
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", worker.describe());

    let done = server.wait_until(&format!("/v1/batches/{id}"), ended).await;
    assert_eq!(
        done.body["status"],
        "completed",
        "{:?}\n{}",
        done.body,
        worker.describe()
    );
    let listed = server.get(&format!("/v1/batches/{id}/items")).await;
    let words: Vec<Value> = listed.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["result"]["words"].clone())
        .collect();
    assert_eq!(words, [json!(3), json!(0), json!(2), json!(5)]);
}

//! The client commands of the binary against a real server: `submit` from JSON Lines and
//! JSON, `status` (with `--watch` and its exit codes), `events` (with `--follow`),
//! `cancel`/`pause`/`resume`/`retry`, `queues`, and how errors are reported.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use batchd_storage::testing::TestDatabase;
use serde_json::{Value, json};

use crate::support::{Background, Finished, Server, batchd, run};

/// `batchd <args> --server <the server>` in `dir`.
fn client(dir: &Path, server: &Server, args: &[&str]) -> Command {
    let url = format!("http://{}", server.addr);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--server", url.as_str()]);
    let mut command = batchd(dir, &all);
    command.env_remove("BATCHD_TOKEN").env_remove("BATCHD_SERVER");
    command
}

async fn run_client(dir: &Path, server: &Server, args: &[&str]) -> Finished {
    run(dir, client(dir, server, args)).await
}

fn json_of(finished: &Finished) -> Value {
    serde_json::from_str(&finished.stdout).unwrap_or_else(|error| panic!("not JSON ({error}): {finished:?}"))
}

async fn started(dir: &Path, database_url: Option<&str>) -> Server {
    let mut args = vec![];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let mut server = Server::serve(dir, &args, &[]);
    server.wait_ready().await;
    server
}

#[tokio::test]
async fn submit_watch_status_and_events_on_sqlite() {
    submit_watch_status_and_events(None).await;
}

#[tokio::test]
async fn submit_watch_status_and_events_on_postgres() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    submit_watch_status_and_events(Some(db.url())).await;
}

async fn submit_watch_status_and_events(database_url: Option<&str>) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = started(dir.path(), database_url).await;
    let lines = [
        r#"{"input": {"steps": ["fetch", "write"], "result": {"n": 0}}, "custom_id": "first"}"#,
        "",
        r#"{"sleep_ms": 10, "result": {"n": 1}}"#,
        r#"{"result": {"n": 2}}"#,
    ];
    std::fs::write(dir.path().join("items.jsonl"), lines.join("\n")).expect("the file is written");

    let submitted = run_client(
        dir.path(),
        &server,
        &["submit", "items.jsonl", "--queue", "default", "--watch"],
    )
    .await;
    assert_eq!(submitted.status.code(), Some(0), "{submitted:?}");
    let id = submitted.stdout.lines().next().expect("the id first").to_owned();
    assert!(submitted.stdout.contains("status    completed"), "{submitted:?}");
    assert!(submitted.stdout.contains("3 completed"), "{submitted:?}");
    assert!(
        submitted.stderr.contains(&format!("submitted batch {id}: 3 items")),
        "{submitted:?}"
    );
    assert!(
        submitted.stderr.contains("100%  3/3 ended"),
        "the progress was shown: {submitted:?}"
    );

    let status = run_client(dir.path(), &server, &["status", &id, "--json"]).await;
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let batch = json_of(&status);
    assert_eq!(batch["id"], id.as_str());
    assert_eq!(batch["status"], "completed");
    assert_eq!(batch["counts"]["completed"], 3);
    let items = server.get(&format!("/v1/batches/{id}/items")).await;
    assert_eq!(items.body["items"][0]["custom_id"], "first");
    assert_eq!(items.body["items"][1]["result"], json!({"n": 1}));

    let events = run_client(dir.path(), &server, &["events", &id]).await;
    assert_eq!(events.status.code(), Some(0), "{events:?}");
    let lines: Vec<&str> = events.stdout.lines().collect();
    assert!(lines.first().is_some_and(|l| l.contains("batch.created")), "{lines:?}");
    assert!(lines.last().is_some_and(|l| l.contains("batch.completed")), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("item.step") && l.contains("item 0") && l.contains("step=write")),
        "{lines:?}"
    );

    // JSON Lines after a sequence number, then the same through the live stream (which
    // ends at once for a batch that has ended).
    let after = run_client(dir.path(), &server, &["events", &id, "--after", "2", "--json"]).await;
    let seqs: Vec<i64> = after
        .stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).expect("a JSON line")["seq"]
                .as_i64()
                .expect("a seq")
        })
        .collect();
    assert_eq!(seqs.first(), Some(&3), "{after:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let followed = run_client(
        dir.path(),
        &server,
        &["events", &id, "--after", "2", "--json", "--follow"],
    )
    .await;
    assert_eq!(followed.status.code(), Some(0), "{followed:?}");
    assert_eq!(followed.stdout, after.stdout, "the stream replays the same events");
}

#[tokio::test]
async fn events_follow_streams_a_running_batch_until_it_ends() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = started(dir.path(), None).await;
    let body = json!({"items": [{"input": {"sleep_ms": 60000}}]});
    let created = server.post("/v1/batches", &body).await;
    let id = created.body["id"].as_str().expect("an id").to_owned();
    let mut follower = Background::spawn(dir.path(), client(dir.path(), &server, &["events", &id, "--follow"]));
    server
        .wait_until(&format!("/v1/batches/{id}"), |batch| batch["counts"]["running"] == 1)
        .await;
    assert!(
        follower.exited().is_none(),
        "it follows a live batch\n{}",
        follower.describe()
    );

    let cancelled = run_client(dir.path(), &server, &["cancel", &id]).await;
    assert_eq!(cancelled.status.code(), Some(0), "{cancelled:?}");
    assert!(
        cancelled.stdout.starts_with(&format!("batch     {id}\n")),
        "{cancelled:?}"
    );
    let exit = follower.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(exit.code(), Some(0), "{}", follower.describe());
    let output = follower.describe();
    assert!(output.contains("item.started"), "{output}");
    assert!(output.contains("batch.cancelled"), "{output}");
}

#[tokio::test]
async fn watch_exits_2_when_the_batch_fails_and_retry_sends_it_back() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = started(dir.path(), None).await;
    std::fs::write(
        dir.path().join("batch.json"),
        r#"[{"fail": "no luck", "permanent": true}]"#,
    )
    .expect("the file is written");
    let submitted = run_client(dir.path(), &server, &["submit", "batch.json", "--watch"]).await;
    assert_eq!(submitted.status.code(), Some(2), "{submitted:?}");
    let id = submitted.stdout.lines().next().expect("the id").to_owned();
    assert!(submitted.stdout.contains("status    failed"), "{submitted:?}");
    assert!(
        !submitted.stderr.contains("error:"),
        "no error is reported: {submitted:?}"
    );

    let watched = run_client(dir.path(), &server, &["status", &id, "--watch", "--json"]).await;
    assert_eq!(watched.status.code(), Some(2), "{watched:?}");
    assert_eq!(json_of(&watched)["status"], "failed");

    // With --json, the submit reply and the ended batch are two lines of JSON.
    let both = run_client(dir.path(), &server, &["submit", "batch.json", "--watch", "--json"]).await;
    assert_eq!(both.status.code(), Some(2), "{both:?}");
    let lines: Vec<Value> = both
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{both:?}");
    assert_eq!(lines[0]["total_items"], 1);
    assert_eq!(lines[1]["id"], lines[0]["id"]);
    assert_eq!(lines[1]["status"], "failed");

    let retried = run_client(dir.path(), &server, &["retry", &id, "--json"]).await;
    assert_eq!(retried.status.code(), Some(0), "{retried:?}");
    assert_ne!(json_of(&retried)["status"], "failed", "{retried:?}");
}

#[tokio::test]
async fn pause_resume_and_a_forbidden_transition() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = started(dir.path(), None).await;
    let body = json!({
        "id": "cli-pause",
        "mode": "sequential",
        "items": [{"input": {"sleep_ms": 60000}}, {"input": {}}],
    });
    std::fs::write(dir.path().join("body.json"), body.to_string()).expect("the file is written");
    let submitted = run_client(dir.path(), &server, &["submit", "body.json", "--json"]).await;
    assert_eq!(submitted.status.code(), Some(0), "{submitted:?}");
    assert_eq!(json_of(&submitted)["id"], "cli-pause");

    let paused = run_client(dir.path(), &server, &["pause", "cli-pause"]).await;
    assert_eq!(paused.status.code(), Some(0), "{paused:?}");
    assert!(paused.stdout.contains("status    paused"), "{paused:?}");
    let again = run_client(dir.path(), &server, &["pause", "cli-pause"]).await;
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(again.stderr.contains("409 invalid_state"), "{again:?}");
    assert!(again.stderr.contains("current status: paused"), "{again:?}");
    let resumed = run_client(dir.path(), &server, &["resume", "cli-pause", "--json"]).await;
    assert_eq!(resumed.status.code(), Some(0), "{resumed:?}");
    assert_ne!(json_of(&resumed)["status"], "paused");
    let cancelled = run_client(dir.path(), &server, &["cancel", "cli-pause", "--json"]).await;
    assert!(
        matches!(json_of(&cancelled)["status"].as_str(), Some("cancelling" | "cancelled")),
        "{cancelled:?}"
    );

    // A replay of the same body is no new batch.
    let replayed = run_client(dir.path(), &server, &["submit", "body.json"]).await;
    assert_eq!(replayed.status.code(), Some(0), "{replayed:?}");
    assert_eq!(replayed.stdout.trim(), "cli-pause");
    assert!(replayed.stderr.contains("already exists"), "{replayed:?}");
}

#[tokio::test]
async fn queues_and_errors() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = started(dir.path(), None).await;
    let queues = run_client(dir.path(), &server, &["queues"]).await;
    assert_eq!(queues.status.code(), Some(0), "{queues:?}");
    assert!(queues.stdout.starts_with("QUEUE"), "{queues:?}");
    assert!(
        queues
            .stdout
            .lines()
            .any(|line| line.starts_with("default ") && line.contains("demo")),
        "{queues:?}"
    );
    let listed = json_of(&run_client(dir.path(), &server, &["queues", "--json"]).await);
    assert!(
        listed["queues"]
            .as_array()
            .is_some_and(|q| q.iter().any(|q| q["name"] == "default"))
    );

    let missing = run_client(dir.path(), &server, &["status", "no-such-batch"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(missing.stderr.contains("404 not_found"), "{missing:?}");
    assert!(missing.stdout.is_empty(), "{missing:?}");

    std::fs::write(dir.path().join("bad.jsonl"), "{\"a\": 1}\n{\"a\": 2\n").expect("the file is written");
    let bad = run_client(dir.path(), &server, &["submit", "bad.jsonl"]).await;
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(bad.stderr.contains("line 2: not JSON"), "{bad:?}");

    std::fs::write(dir.path().join("items.jsonl"), "{\"a\": 1}\n").expect("the file is written");
    let unknown = run_client(dir.path(), &server, &["submit", "items.jsonl", "--queue", "nope"]).await;
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(unknown.stderr.contains("validation_error"), "{unknown:?}");
    assert!(
        unknown.stderr.contains("queue:"),
        "the issue path is shown: {unknown:?}"
    );

    let refused = run(
        dir.path(),
        batchd(dir.path(), &["queues", "--server", "http://127.0.0.1:9"]),
    )
    .await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.starts_with("error:"), "{refused:?}");
}

#[tokio::test]
async fn the_token_is_sent_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("batchd.toml");
    let text = "[[auth.keys]]\nname = \"cli\"\ntenant = \"acme\"\nrole = \"client\"\nkey = \"s3cret-key\"\n";
    std::fs::write(&config, text).expect("the config is written");
    let mut server = Server::serve(dir.path(), &["--config", config.to_str().expect("a UTF-8 path")], &[]);
    server.wait_ready().await;
    std::fs::write(dir.path().join("items.jsonl"), "{\"n\": 1}\n").expect("the file is written");

    let mut with_env = client(dir.path(), &server, &["submit", "items.jsonl", "--watch"]);
    with_env.env("BATCHD_TOKEN", "s3cret-key");
    let submitted = run(dir.path(), with_env).await;
    assert_eq!(submitted.status.code(), Some(0), "{submitted:?}");
    let id = submitted.stdout.lines().next().expect("the id").to_owned();
    let status = run_client(dir.path(), &server, &["status", &id, "--token", "s3cret-key"]).await;
    assert_eq!(status.status.code(), Some(0), "{status:?}");

    let refused = run_client(dir.path(), &server, &["status", &id]).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("401 unauthorized"), "{refused:?}");
    assert!(!refused.stderr.contains("s3cret-key"), "{refused:?}");
}

//! `batchd serve`: zero-config start on SQLite, PostgreSQL, clean stop, the open-mode rule.

use batchd_storage::testing::TestDatabase;
use nix::sys::signal::Signal;

use crate::support::{STOP_TIMEOUT, Server, batchd, free_port, run};

/// The grace period the servers under test get (shorter than the default).
const GRACE_MS: u64 = 5_000;

/// Checks a freshly started server's health, readiness, 404 shape and request ids, then
/// stops it with SIGTERM and expects exit code 0.
async fn serves_then_stops_cleanly(mut server: Server) {
    let ready = server.wait_ready().await;
    assert_eq!(
        ready.body,
        serde_json::json!({"status": "ready", "database": "ok", "migrations": "applied"})
    );

    let health = server.get("/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body, serde_json::json!({"status": "ok"}));

    let missing = server.get("/no/such/path").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "not_found", "{:?}", missing.body);
    assert!(missing.body["error"]["message"].is_string());
    assert_eq!(missing.body["error"]["issues"], serde_json::json!([]));
    let id = missing
        .headers
        .get("x-request-id")
        .expect("every response carries x-request-id");
    assert!(!id.is_empty());

    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(STOP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop\n{}", server.logs());
}

#[tokio::test]
async fn serves_on_sqlite_in_the_working_directory_with_no_config() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let grace = GRACE_MS.to_string();
    let mut server = Server::serve(dir.path(), &[], &[("BATCHD__SERVER__SHUTDOWN_GRACE_MS", &grace)]);
    server.wait_ready().await;
    let logs = server.logs();
    let start_up = logs
        .lines()
        .find(|line| line.contains("batchd is serving"))
        .expect("a start-up line");
    for shown in [server.addr.to_string().as_str(), "sqlite", "sqlite://batchd.db"] {
        assert!(
            start_up.contains(shown),
            "{shown:?} missing from the start-up line: {start_up}"
        );
    }
    serves_then_stops_cleanly(server).await;
    assert!(
        dir.path().join("batchd.db").is_file(),
        "the default database is batchd.db in the cwd"
    );
}

#[tokio::test]
async fn serves_on_postgres() {
    let Some(db) = TestDatabase::postgres().await else {
        eprintln!("skipped: no PostgreSQL (set BATCHD_TEST_DATABASE_URL)");
        return;
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let grace = GRACE_MS.to_string();
    let mut server = Server::serve(
        dir.path(),
        &["--database-url", db.url()],
        &[("BATCHD__SERVER__SHUTDOWN_GRACE_MS", &grace)],
    );
    server.wait_ready().await;
    let logs = server.logs();
    let start_up = logs
        .lines()
        .find(|line| line.contains("batchd is serving"))
        .expect("a start-up line");
    assert!(start_up.contains("postgres"), "{start_up}");
    serves_then_stops_cleanly(server).await;
    assert!(
        !dir.path().join("batchd.db").exists(),
        "no SQLite file when PostgreSQL is used"
    );
}

#[tokio::test]
async fn sigint_is_a_clean_stop_too() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = Server::serve(dir.path(), &[], &[]);
    server.wait_ready().await;
    server.signal(Signal::SIGINT);
    let status = server.wait_exit(STOP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", server.logs());
}

#[tokio::test]
async fn refuses_to_run_open_on_a_non_loopback_address() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let bind = format!("0.0.0.0:{}", free_port());
    let finished = run(dir.path(), batchd(dir.path(), &["serve", "--bind", &bind])).await;
    assert!(!finished.status.success(), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains(&format!("refusing to listen on {bind} without authentication")),
        "{finished:?}"
    );
    assert!(
        finished.stderr.contains("auth.keys"),
        "the message says what to configure: {finished:?}"
    );
    assert!(
        !dir.path().join("batchd.db").exists(),
        "a refused start touches no database"
    );
}

#[tokio::test]
async fn serves_on_any_address_once_a_key_is_configured() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("batchd.toml");
    let text = "[[auth.keys]]\nname = \"ops\"\ntenant = \"acme\"\nrole = \"admin\"\nkey = \"dev-key\"\n";
    std::fs::write(&config, text).expect("the config is written");
    let port = free_port();
    let bind = format!("0.0.0.0:{port}");
    let config = config.to_str().expect("a UTF-8 path");
    let command = batchd(dir.path(), &["serve", "--config", config, "--bind", &bind]);
    let mut server = Server::spawn(dir.path(), command, ([127, 0, 0, 1], port).into());
    server.wait_ready().await;
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(STOP_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", server.logs());
}

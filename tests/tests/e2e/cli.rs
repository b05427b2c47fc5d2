//! `batchd migrate` and `batchd config check`.

use nix::sys::signal::Signal;

use crate::support::{STOP_TIMEOUT, Server, batchd, run};

#[tokio::test]
async fn migrate_then_serve_without_migrating_on_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let no_migrate = [("BATCHD__DATABASE__MIGRATE_ON_START", "false")];

    // Without migrations the server is alive but not ready, and says why.
    let mut server = Server::serve(dir.path(), &[], &no_migrate);
    server.wait_for("/healthz", 200).await;
    let not_ready = server.get("/readyz").await;
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.body["error"]["code"], "unavailable");
    let message = not_ready.body["error"]["message"].as_str().expect("a message");
    assert!(message.contains("migrations"), "{message}");
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(STOP_TIMEOUT).await.code(), Some(0));

    let first = run(dir.path(), batchd(dir.path(), &["migrate"])).await;
    assert!(first.status.success(), "{first:?}");
    assert!(first.stdout.starts_with("applied "), "{first:?}");
    assert!(
        !first.stdout.starts_with("applied 0 "),
        "a fresh database gets migrations: {first:?}"
    );
    assert!(first.stdout.contains("(sqlite)"), "{first:?}");

    let again = run(dir.path(), batchd(dir.path(), &["migrate"])).await;
    assert!(again.status.success(), "{again:?}");
    assert!(again.stdout.starts_with("applied 0 migrations"), "{again:?}");

    let mut server = Server::serve(dir.path(), &[], &no_migrate);
    server.wait_ready().await;
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(STOP_TIMEOUT).await.code(), Some(0));
}

#[tokio::test]
async fn config_check_prints_the_effective_settings_with_secrets_hidden() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("batchd.toml");
    let text = r#"
        [database]
        url = "postgres://batchd:db-password@db.internal/batchd"

        [[auth.keys]]
        name = "web-app"
        tenant = "acme"
        role = "client"
        key = "plain-key-value"

        [auth.jwt]
        hs256_secret = "jwt-secret-value"

        [queues.emails]
        handler = "demo"
        concurrency = 1
    "#;
    std::fs::write(&config, text).expect("the config is written");
    let config = config.to_str().expect("a UTF-8 path");
    let mut command = batchd(dir.path(), &["config", "check", "--config", config]);
    command.env("BATCHD__SERVER__SHUTDOWN_GRACE_MS", "1234");
    let finished = run(dir.path(), command).await;
    assert!(finished.status.success(), "{finished:?}");
    let out = &finished.stdout;
    for secret in ["db-password", "plain-key-value", "jwt-secret-value"] {
        assert!(!out.contains(secret), "{secret} leaked:\n{out}");
    }
    for shown in [
        "key = \"***\"",
        "hs256_secret = \"***\"",
        "postgres://batchd:***@db.internal/batchd",
        "shutdown_grace_ms = 1234",
        "[queues.emails]",
        "[queues.default]",
        "handler = \"demo\"",
    ] {
        assert!(out.contains(shown), "{shown:?} missing from:\n{out}");
    }
}

#[tokio::test]
async fn config_check_refuses_an_invalid_file_naming_the_key() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("batchd.toml");
    let text = r#"
        [[auth.keys]]
        name = "web-app"
        tenant = "acme"
        role = "client"
        key = "plain"
        key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    "#;
    std::fs::write(&config, text).expect("the config is written");
    let config = config.to_str().expect("a UTF-8 path");
    let finished = run(dir.path(), batchd(dir.path(), &["config", "check", "--config", config])).await;
    assert_eq!(finished.status.code(), Some(1), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains("auth.keys[0]: set either key or key_sha256, not both"),
        "{finished:?}"
    );
    assert!(finished.stdout.is_empty(), "{finished:?}");
}

#[tokio::test]
async fn config_check_with_no_file_prints_the_defaults() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let finished = run(dir.path(), batchd(dir.path(), &["config", "check"])).await;
    assert!(finished.status.success(), "{finished:?}");
    assert!(finished.stdout.contains("bind = \"127.0.0.1:8080\""), "{finished:?}");
    assert!(finished.stdout.contains("url = \"sqlite://batchd.db\""), "{finished:?}");
}

//! A real batchd server for one test: a fresh database, the API on a free loopback port, the
//! worker pool running the queues, and a client pointed at it. Built from batchd's own
//! defaults (never the process environment, so a test behaves the same on every machine),
//! tuned for tests, then changed by the test's own edits.

use std::collections::HashMap;
use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use batchd_client::Client;
use batchd_executor::{Handler, HandlerRegistry};
use batchd_server::{Overrides, QueueSettings, ServerHandle, Settings};
use batchd_storage::Store;
use batchd_storage::testing::TestDatabase;
use tokio::runtime::{Handle, RuntimeFlavor};

/// The worker pool's fallback poll: new work wakes it at once, but due retries and backoffs
/// are found by this poll, and a test should not wait the production second for them.
const POLL_INTERVAL_MS: u64 = 100;
/// How long running items and open requests get at shutdown: short, so a test that leaves
/// work behind still ends quickly.
const SHUTDOWN_GRACE_MS: u64 = 1_000;
/// When a server is dropped without `shutdown`, how long beyond the grace the stop may take.
const DROP_STOP_MARGIN: Duration = Duration::from_secs(5);

/// The database a test server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// A new SQLite file in a temporary directory: always available.
    #[default]
    Sqlite,
    /// A new database on the PostgreSQL server `BATCHD_TEST_DATABASE_URL` names.
    Postgres,
}

type SettingsEdit = Box<dyn FnOnce(&mut Settings) + Send>;

/// Configures a [`TestServer`]; from [`TestServer::builder`].
#[must_use = "a builder does nothing until start() is awaited"]
pub struct TestServerBuilder {
    backend: Backend,
    handlers: HandlerRegistry,
    edits: Vec<SettingsEdit>,
}

impl std::fmt::Debug for TestServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServerBuilder")
            .field("backend", &self.backend)
            .field("handlers", &self.handlers)
            .field("edits", &self.edits.len())
            .finish()
    }
}

impl TestServerBuilder {
    /// Runs on a fresh SQLite file (the default).
    pub fn sqlite(self) -> Self {
        self.backend(Backend::Sqlite)
    }

    /// Runs on a fresh PostgreSQL database; [`start`](Self::start) answers `None` when no
    /// PostgreSQL server is configured (`BATCHD_TEST_DATABASE_URL` unset), except under CI,
    /// where that is a failure.
    pub fn postgres(self) -> Self {
        self.backend(Backend::Postgres)
    }

    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Registers a handler under `name`, beside the built-in `demo`; a queue runs it when its
    /// `handler` is that name (see [`queue`](Self::queue)).
    pub fn handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.register(name, handler);
        self
    }

    /// Adds the queue `name`, or changes it if it exists (`default` always does). A new
    /// queue starts from the `[queue_defaults]` values with the `demo` handler and no
    /// `defaults` table; set `handler` to run one registered with
    /// [`handler`](Self::handler).
    ///
    /// ```no_run
    /// # async fn example() -> anyhow::Result<()> {
    /// let _server = batchd_testkit::TestServer::builder()
    ///     .queue("slow", |q| {
    ///         q.concurrency = 1;
    ///         q.max_attempts = 1;
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn queue(self, name: impl Into<String>, edit: impl FnOnce(&mut QueueSettings) + Send + 'static) -> Self {
        let name = name.into();
        self.settings(move |settings| {
            let queue = settings
                .queues
                .entry(name)
                .or_insert_with(|| QueueSettings::from_defaults(&settings.queue_defaults));
            edit(queue);
        })
    }

    /// Changes any setting. Edits apply in the order they were given, after the test
    /// defaults (`executor.poll_interval_ms` = 100, `server.shutdown_grace_ms` = 1000) and
    /// before the server starts. They are not validated again: keep values in the ranges
    /// `config/default.toml` documents. `server.bind` and `database.url` are already the
    /// bound port and the fresh database; changing them has no effect on the first and
    /// leaves the fresh database unused for the second.
    pub fn settings(mut self, edit: impl FnOnce(&mut Settings) + Send + 'static) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Creates the database, migrates it, and starts the server on `127.0.0.1` on a free
    /// port. `Ok(None)` only for PostgreSQL when none is configured.
    pub async fn start(self) -> anyhow::Result<Option<TestServer>> {
        let database = match self.backend {
            Backend::Sqlite => TestDatabase::sqlite(),
            Backend::Postgres => match TestDatabase::postgres().await {
                Some(database) => database,
                None => return Ok(None),
            },
        };
        let overrides = Overrides {
            bind: None,
            database_url: Some(database.url().to_owned()),
        };
        let mut settings =
            Settings::load(None, &HashMap::new(), &overrides).context("batchd's default settings do not load")?;
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a free port on 127.0.0.1")?;
        let addr = listener.local_addr().context("the listener has no address")?;
        settings.server.bind = addr;
        settings.server.shutdown_grace_ms = SHUTDOWN_GRACE_MS;
        settings.executor.poll_interval_ms = POLL_INTERVAL_MS;
        for edit in self.edits {
            edit(&mut settings);
        }
        let handle = batchd_server::start_with(settings.clone(), listener, self.handlers)
            .await
            .context("the test server did not start")?;
        let url = format!("http://{addr}");
        let client = Client::new(&url).context("a client of the test server")?;
        Ok(Some(TestServer {
            store: handle.store().clone(),
            handle: Some(handle),
            database: Some(database),
            url,
            client,
            settings,
            backend: self.backend,
        }))
    }
}

/// A running batchd server over its own fresh database.
///
/// Call [`shutdown`](Self::shutdown) at the end of the test: it stops the API and the worker
/// pool, joins their tasks, then removes the database. Dropping the server without it stops
/// what it can: on a multi-threaded runtime it runs the same shutdown in place; on a
/// current-thread runtime, or while a panic unwinds, it only schedules it (the runtime's own
/// end then cancels the tasks). The database goes either way.
#[must_use = "a test server runs until it is shut down; call shutdown().await"]
pub struct TestServer {
    // Stopped before the database goes: `handle` is taken by shutdown or drop first.
    handle: Option<ServerHandle>,
    database: Option<TestDatabase>,
    store: Arc<dyn Store>,
    url: String,
    client: Client,
    settings: Settings,
    backend: Backend,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("url", &self.url)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// Configures a server: SQLite, the built-in `demo` handler, batchd's default queues.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder {
            backend: Backend::Sqlite,
            handlers: HandlerRegistry::with_builtins(),
            edits: Vec::new(),
        }
    }

    /// A server with every default, on SQLite.
    pub async fn start() -> anyhow::Result<TestServer> {
        Self::builder()
            .start()
            .await?
            .context("a SQLite test server always starts")
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of this server, without a token (the server runs open unless the test
    /// configured keys; then add one with `with_token`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The server's store, to look at or arrange what the API does not show.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The settings the server runs with, the test's edits included.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Stops accepting requests and claiming items, lets running items finish within the
    /// grace period (1 s unless the test changed it), joins every task, then removes the
    /// database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let stopped = match self.handle.take() {
            Some(handle) => handle.shutdown().await,
            None => Ok(()),
        };
        self.database.take();
        stopped
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let database = self.database.take();
        let limit = Duration::from_millis(self.settings.server.shutdown_grace_ms) + DROP_STOP_MARGIN;
        let stop = async move {
            let _ = tokio::time::timeout(limit, handle.shutdown()).await;
            drop(database);
        };
        match Handle::try_current() {
            // Not while a failed assertion unwinds: a panic in here would then abort the
            // whole test binary. Scheduling the stop is enough for that case.
            Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread && !std::thread::panicking() => {
                eprintln!("batchd-testkit: a TestServer was dropped without shutdown().await; stopping it in drop");
                // Blocks this thread only; the runtime's other workers run the server's tasks.
                // Caught: a runtime that is itself shutting down refuses to block, and a
                // drop must not panic for that.
                let stopped = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    tokio::task::block_in_place(|| runtime.block_on(stop));
                }));
                if stopped.is_err() {
                    eprintln!("batchd-testkit: the dropped TestServer could not be stopped in place");
                }
            }
            // This thread may be the runtime: it cannot wait here for tasks it must run.
            Ok(runtime) => drop(runtime.spawn(stop)),
            // Outside any runtime the server's tasks ended with the runtime they ran on;
            // dropping the stop drops the handle and removes the database.
            Err(_) => drop(stop),
        }
    }
}

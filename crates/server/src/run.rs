//! Building and running a server from its settings: open the store, serve the API on a
//! listener, and stop everything on request. The binary, the test kit and `batchd bench` all
//! go through [`start`] (or [`serve`] with a store of their own), and every task started
//! here is joined by [`ServerHandle::shutdown`]; nothing is spawned and forgotten.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpServer, web};
use anyhow::{Context, bail};
use batchd_api::{ApiConfig, ApiState, AuthConfig, QueueInfo, RateLimit};
use batchd_domain::{JsonMap, Limits};
use batchd_executor::{
    Executor, ExecutorConfig, ExecutorHandle, ExecutorObserver, HandlerRegistry, HttpHandler, QueueConfig,
};
use batchd_storage::{Store, StoreOptions};
use batchd_webhook::{DeliveryObserver, Dispatcher, DispatcherConfig, DispatcherHandle};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::settings::{AuthSettings, DatabaseSettings, QueueSettings, Settings};

/// Beyond the grace period, how long a stop may take before its task is aborted.
const STOP_MARGIN: Duration = Duration::from_secs(1);

/// Refuses to serve open (no keys, no JWT) on anything but a loopback address.
pub fn check_open_mode(auth: &AuthSettings, addr: SocketAddr) -> anyhow::Result<()> {
    if auth.is_open() && !addr.ip().is_loopback() {
        bail!(
            "refusing to listen on {addr} without authentication: no auth.keys and no auth.jwt \
             are configured, and batchd runs open (as tenant `local`) only on a loopback address \
             such as 127.0.0.1; configure [[auth.keys]] or [auth.jwt], or bind to 127.0.0.1"
        );
    }
    Ok(())
}

/// Opens the configured database without migrating it.
pub async fn open_store(database: &DatabaseSettings) -> anyhow::Result<Arc<dyn Store>> {
    let mut options = StoreOptions::new(database.url.expose());
    options.migrate = false;
    options.max_connections = database.max_connections;
    batchd_storage::connect(options)
        .await
        .with_context(|| format!("cannot open the database {}", database.url))
}

/// Applies pending migrations; returns how many ran.
pub async fn migrate(store: &dyn Store) -> anyhow::Result<usize> {
    store.migrate().await.context("cannot apply the database migrations")
}

/// Opens the store (migrating it if `database.migrate_on_start`) and serves on `listener`,
/// running the queues with the built-in handlers.
pub async fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<ServerHandle> {
    start_with(settings, listener, HandlerRegistry::with_builtins()).await
}

/// [`start`] with handlers of the caller's choosing (an embedder's, a test's).
pub async fn start_with(
    settings: Settings,
    listener: TcpListener,
    handlers: HandlerRegistry,
) -> anyhow::Result<ServerHandle> {
    let addr = listener.local_addr().context("the listener has no local address")?;
    // Before the database is touched: a refused start changes nothing.
    check_open_mode(&settings.auth, addr)?;
    let store = open_store(&settings.database).await?;
    if settings.database.migrate_on_start {
        let applied = migrate(store.as_ref()).await?;
        if applied > 0 {
            tracing::info!(applied, "applied database migrations");
        }
    }
    serve(settings, store, listener, handlers).await
}

/// The worker pool's settings for the configured queues. Queues whose handler runs
/// elsewhere (`pull`: remote workers claim over the API) get no claim loop here.
pub fn executor_config(settings: &Settings) -> ExecutorConfig {
    let queues = settings
        .queues
        .iter()
        .filter(|(_, queue)| queue.handler != "pull")
        .map(|(name, queue)| QueueConfig {
            name: name.clone(),
            handler: registered_handler_name(name, queue),
            concurrency: queue.concurrency as usize,
            rate_per_second: queue.rate_per_second,
            burst: queue.burst,
            lease: Duration::from_millis(queue.lease_ms),
            defaults: queue_config_defaults(queue),
        })
        .collect();
    ExecutorConfig {
        node_id: format!(
            "batchd-{}-{}",
            std::process::id(),
            &batchd_domain::new_lease_token()[..8]
        ),
        queues,
        max_running: settings.executor.max_running as usize,
        poll_interval: Duration::from_millis(settings.executor.poll_interval_ms),
        shutdown_grace: Duration::from_millis(settings.server.shutdown_grace_ms),
        ..ExecutorConfig::default()
    }
}

/// The name a queue's handler is registered under: an `http` queue has its own (its URL and
/// secret), `http:<queue>`; any other queue the name it configures.
fn registered_handler_name(name: &str, queue: &QueueSettings) -> String {
    if queue.handler == "http" {
        format!("http:{name}")
    } else {
        queue.handler.clone()
    }
}

/// Registers an [`HttpHandler`] for each `http` queue, under `http:<queue>`.
pub fn register_http_handlers(settings: &Settings, handlers: &mut HandlerRegistry) -> anyhow::Result<()> {
    for (name, queue) in settings.queues.iter().filter(|(_, q)| q.handler == "http") {
        let url = queue
            .url
            .as_deref()
            .with_context(|| format!("queues.{name}.url: required by the http handler"))?;
        let secret = queue
            .secret
            .as_ref()
            .map(|secret| batchd_webhook::Secret::new(secret.expose()))
            .transpose()
            .with_context(|| format!("queues.{name}.secret"))?;
        let handler = HttpHandler::new(url, secret).with_context(|| format!("queues.{name}.url"))?;
        handlers.register(registered_handler_name(name, queue), handler);
    }
    Ok(())
}

/// What the API needs of the settings: who may call, and the queues items may go to.
pub fn api_config(settings: &Settings) -> anyhow::Result<ApiConfig> {
    let mut auth = AuthConfig::default();
    for key in &settings.auth.keys {
        let sha256 = match (&key.key_sha256, &key.key) {
            (Some(hash), _) => hash.expose().to_owned(),
            (None, Some(plain)) => batchd_api::sha256_hex(plain.expose()),
            (None, None) => bail!("auth.keys `{}`: set key or key_sha256", key.name),
        };
        auth = auth
            .with_key(&key.name, &key.tenant, key.role, &sha256, key.queues.clone())
            .map_err(|e| anyhow::anyhow!("auth.keys `{}`: {e}", key.name))?;
    }
    if let Some(jwt) = &settings.auth.jwt {
        auth = auth.with_jwt(jwt.hs256_secret.expose().as_bytes().to_vec(), jwt.audience.clone());
    }
    let queues = settings
        .queues
        .iter()
        .map(|(name, queue)| {
            let info = QueueInfo {
                handler: queue.handler.clone(),
                max_items: queue.max_items as usize,
                defaults: queue_config_defaults(queue),
                lease: Duration::from_millis(queue.lease_ms),
            };
            (name.clone(), info)
        })
        .collect();
    let rate_limit = (settings.server.requests_per_second > 0.0).then_some(RateLimit {
        requests_per_second: settings.server.requests_per_second,
        burst: settings.server.request_burst,
    });
    Ok(ApiConfig {
        auth,
        queues,
        limits: Limits::default(),
        rate_limit,
        allow_private_webhooks: settings.webhooks.allow_private_destinations,
    })
}

/// The webhook dispatcher's settings: `[webhooks]`, with the executor's fallback poll.
pub fn dispatcher_config(settings: &Settings) -> DispatcherConfig {
    let webhooks = &settings.webhooks;
    let mut config = DispatcherConfig::default();
    config.allow_private_destinations = webhooks.allow_private_destinations;
    config.max_attempts = webhooks.max_attempts;
    config.backoff_base = Duration::from_millis(webhooks.backoff_base_ms);
    config.backoff_max = Duration::from_millis(webhooks.backoff_max_ms);
    config.timeout = Duration::from_millis(webhooks.timeout_ms);
    config.poll_interval = Duration::from_millis(settings.executor.poll_interval_ms);
    config
}

/// The queue level of config precedence: the queue's own settings (already filled in from
/// `[queue_defaults]`) under its `defaults` table.
pub fn queue_config_defaults(queue: &QueueSettings) -> JsonMap {
    let mut map = JsonMap::new();
    map.insert("timeout_ms".into(), json!(queue.timeout_ms));
    map.insert("max_attempts".into(), json!(queue.max_attempts));
    map.insert("backoff_base_ms".into(), json!(queue.backoff_base_ms));
    map.insert("backoff_max_ms".into(), json!(queue.backoff_max_ms));
    for (key, value) in &queue.defaults {
        map.insert(key.clone(), value.clone());
    }
    map
}

/// Serves the API over `store` on `listener`, runs the queues' worker pool (with an
/// [`HttpHandler`] for each `http` queue beside `handlers`) and the webhook dispatcher. Must
/// be called inside a tokio runtime.
pub async fn serve(
    settings: Settings,
    store: Arc<dyn Store>,
    listener: TcpListener,
    mut handlers: HandlerRegistry,
) -> anyhow::Result<ServerHandle> {
    let local_addr = listener.local_addr().context("the listener has no local address")?;
    check_open_mode(&settings.auth, local_addr)?;
    register_http_handlers(&settings, &mut handlers)?;
    let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
    let max_body_bytes = settings.server.max_body_bytes;
    let state = web::Data::new(ApiState::new(store.clone(), api_config(&settings)?));
    let metrics = state.metrics.clone();
    let api = state.clone();
    let server = HttpServer::new(move || {
        batchd_api::app(state.clone())
            .app_data(web::PayloadConfig::new(max_body_bytes))
            .app_data(batchd_api::json_config(max_body_bytes))
    })
    // The owner of the handle decides when to stop (the binary on SIGINT/SIGTERM).
    .disable_signals()
    // actix counts whole seconds; rounded up so a request is never cut before the grace ends.
    .shutdown_timeout(grace.as_secs() + u64::from(grace.subsec_nanos() > 0))
    .listen(listener)
    .with_context(|| format!("cannot serve on {local_addr}"))?
    .run();
    let http = server.handle();
    let http_task = tokio::spawn(server);
    let mut pool = executor_config(&settings);
    pool.observer = Some(Arc::new(MetricsObserver(metrics.clone())));
    let executor = match Executor::start(store.clone(), handlers, pool) {
        Ok(executor) => executor,
        Err(error) => {
            http.stop(false).await;
            return Err(error).context("cannot start the worker pool");
        }
    };
    let mut webhooks = dispatcher_config(&settings);
    webhooks.observer = Some(Arc::new(MetricsObserver(metrics.clone())));
    let dispatcher = match Dispatcher::start(store.clone(), webhooks) {
        Ok(dispatcher) => dispatcher,
        Err(error) => {
            http.stop(false).await;
            executor.shutdown().await;
            return Err(error).context("cannot start the webhook dispatcher");
        }
    };
    let stop_maintenance = CancellationToken::new();
    let maintenance = tokio::spawn(purge_finished_batches(
        store.clone(),
        settings.retention.finished_batch_days,
        stop_maintenance.clone(),
    ));
    Ok(ServerHandle {
        local_addr,
        api,
        store,
        http,
        http_task,
        executor,
        dispatcher,
        maintenance,
        stop_maintenance,
        grace,
    })
}

/// Feeds the worker pool's and the webhook dispatcher's attempts into `/metrics`.
struct MetricsObserver(Arc<batchd_api::Metrics>);

impl DeliveryObserver for MetricsObserver {
    fn attempt_recorded(&self, event_type: &str, outcome: &str, latency: Duration) {
        self.0.webhook_attempt(event_type, outcome, latency);
    }
}

impl ExecutorObserver for MetricsObserver {
    fn item_started(&self, queue: &str, pickup: Duration) {
        self.0.item_started(queue, pickup);
    }

    fn attempt_ended(&self, queue: &str, status: &str, duration: Duration) {
        self.0.attempt_ended(queue, status, duration);
    }
}

/// Deletes finished batches older than the retention period, once an hour (and at start).
async fn purge_finished_batches(store: Arc<dyn Store>, days: u32, stop: CancellationToken) {
    if days == 0 {
        return;
    }
    loop {
        let before = time::OffsetDateTime::now_utc() - Duration::from_secs(u64::from(days) * 86_400);
        match store.purge_finished(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(batches = n, days, "purged finished batches past retention"),
            Err(error) => tracing::warn!(%error, "purging finished batches failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3_600)) => {}
        }
    }
}

/// A running server. Drop it only after [`shutdown`](Self::shutdown) or
/// [`wait`](Self::wait): those join every task it started.
#[derive(Debug)]
#[must_use = "a server runs until it is shut down; call shutdown() or wait()"]
pub struct ServerHandle {
    local_addr: SocketAddr,
    api: web::Data<ApiState>,
    store: Arc<dyn Store>,
    http: actix_web::dev::ServerHandle,
    http_task: JoinHandle<std::io::Result<()>>,
    executor: ExecutorHandle,
    dispatcher: DispatcherHandle,
    maintenance: JoinHandle<()>,
    stop_maintenance: CancellationToken,
    grace: Duration,
}

impl ServerHandle {
    /// The address the server listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The store the server runs on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stops accepting connections and claiming items and deliveries; in-flight requests and
    /// running items get `server.shutdown_grace_ms` to finish, items still running then are
    /// handed back without spending an attempt; webhook attempts in flight finish within
    /// `webhooks.timeout_ms`; joins every task.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!(grace_ms = self.grace.as_millis(), "shutting down");
        // Long polls answer now rather than hold the stop up.
        self.api.begin_shutdown();
        let http_stop = async {
            let stopped = tokio::time::timeout(self.grace + STOP_MARGIN, self.http.stop(true)).await;
            if stopped.is_err() {
                tracing::warn!("the HTTP server did not stop within the grace period; aborting it");
                self.http_task.abort();
            }
            join(self.http_task).await
        };
        let (http, (), ()) = tokio::join!(http_stop, self.executor.shutdown(), self.dispatcher.shutdown());
        self.stop_maintenance.cancel();
        let _ = self.maintenance.await;
        http?;
        tracing::info!("stopped");
        Ok(())
    }

    /// Waits until the server stops by itself (an I/O failure), then stops the rest.
    pub async fn wait(self) -> anyhow::Result<()> {
        let http = join(self.http_task).await;
        self.executor.shutdown().await;
        self.dispatcher.shutdown().await;
        self.stop_maintenance.cancel();
        let _ = self.maintenance.await;
        http
    }

    /// Serves until `signal` completes, then shuts down; returns early if the server stops
    /// by itself.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            ended = &mut self.http_task => {
                self.executor.shutdown().await;
                self.dispatcher.shutdown().await;
                self.stop_maintenance.cancel();
                let _ = self.maintenance.await;
                return joined(ended);
            }
            () = signal => {}
        }
        self.shutdown().await
    }
}

async fn join(task: JoinHandle<std::io::Result<()>>) -> anyhow::Result<()> {
    joined(task.await)
}

fn joined(ended: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match ended {
        Ok(result) => result.context("the HTTP server failed"),
        // Aborted by `shutdown` after the grace period: already logged.
        Err(error) if error.is_cancelled() => Ok(()),
        Err(error) => Err(anyhow::anyhow!("the HTTP server task panicked: {error}")),
    }
}

/// Completes on the first SIGINT or SIGTERM (Ctrl-C elsewhere). The handlers are installed
/// when this is called, so a signal that arrives before the future is polled is not lost.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        Ok(async move {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            tracing::info!(signal = name, "received a shutdown signal");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot wait for Ctrl-C; shutting down");
            }
            tracing::info!(signal = "ctrl-c", "received a shutdown signal");
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::settings::{AuthKey, Overrides};
    use std::collections::HashMap;

    #[test]
    fn open_mode_is_loopback_only() {
        let open = AuthSettings::default();
        for addr in ["127.0.0.1:8080", "[::1]:8080", "127.0.0.2:1"] {
            check_open_mode(&open, addr.parse().expect("an address")).expect("loopback may run open");
        }
        for addr in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:80"] {
            let error = check_open_mode(&open, addr.parse().expect("an address"))
                .expect_err("not loopback")
                .to_string();
            assert!(error.contains("without authentication"), "{error}");
        }
        let keyed = AuthSettings {
            keys: vec![AuthKey {
                name: "web".to_owned(),
                tenant: "acme".to_owned(),
                role: batchd_api::Role::Client,
                key_sha256: None,
                key: Some(Secret::new("k")),
                queues: None,
            }],
            jwt: None,
        };
        check_open_mode(&keyed, "0.0.0.0:8080".parse().expect("an address")).expect("keys allow any address");
    }

    #[tokio::test]
    async fn a_started_server_answers_and_shuts_down() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let url = format!("sqlite://{}", dir.path().join("batchd.db").display());
        let overrides = Overrides {
            bind: None,
            database_url: Some(url),
        };
        let settings = Settings::load(None, &HashMap::new(), &overrides).expect("valid settings");
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let handle = start(settings, listener).await.expect("the server starts");
        assert_eq!(handle.store().backend(), "sqlite");
        let readiness = handle.store().readiness().await;
        assert!(readiness.reachable && readiness.migrated, "{readiness:?}");

        let addr = handle.local_addr();
        let reply = tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
            .await
            .expect("the request thread ends");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains("x-request-id:"), "{reply}");
        handle.shutdown().await.expect("a clean shutdown");
    }

    /// A bare HTTP/1.1 GET, so this crate's tests need no HTTP client.
    fn http_get(addr: SocketAddr, path: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("the server accepts");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("the request is sent");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("the reply is read");
        reply
    }
}
